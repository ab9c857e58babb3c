"""Binaries carried in a bundle (`bundle-builder build --file NAME[@VERSION]/ARCH=PATH`): parsing and checking
the option, the manifest's `files` section, dedup, deltas, reproducibility, the strict manifest reader, and
what `inspect` and `diff` show."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bundle_builder import build
from bundle_builder.cli import main
from offline_delivery_core.bundle import format as bundle_format
from offline_delivery_core.bundle.format import BundleError

BOTH = ["linux/amd64", "linux/arm64"]
ARCHES = ["amd64", "arm64"]


def _binary(where: Path, data: bytes, mode: int = 0o755) -> Path:
    """Write an input file beside the sample world's files (tmp_path/in/<name>, away from its names)."""
    path = where.parent / "in" / where.name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _build(world, out: Path, files: list[str], **kwargs: Any) -> build.BuildResult:  # type: ignore[no-untyped-def]
    out.mkdir(parents=True, exist_ok=True)
    return build.build_bundle(kwargs.pop("model", None) or world.write_model(), out, image_sources=world.archives,
                              platforms=kwargs.pop("platforms", BOTH), sign_key=None, files=files, **kwargs)


def _manifest(path: Path) -> dict[str, Any]:
    return bundle_format.read_head(str(path)).manifest


# -- the option ---------------------------------------------------------------------------------------------


def test_spec_with_and_without_version(tmp_path: Path) -> None:
    path = _binary(tmp_path / "k3s", b"x")
    f = build.parse_file_spec(f"k3s@v1.30.2+k3s1/arm64={path}", ARCHES, "1.0.0")
    assert (f.name, f.version, f.arch, f.path, f.key) == ("k3s", "v1.30.2+k3s1", "arm64", path, "k3s/arm64")
    assert build.parse_file_spec(f"k3s/amd64={path}", ARCHES, "2.1.0").version == "2.1.0"


@pytest.mark.parametrize("spec, message", [
    ("k3s/amd64", "expected NAME[@VERSION]/ARCH=PATH"),
    ("k3s/amd64=", "expected NAME[@VERSION]/ARCH=PATH"),
    ("k3s={path}", "no architecture"),
    ("K3s/amd64={path}", "name 'K3s' must be lowercase"),
    ("-k3s/amd64={path}", "name '-k3s' must be lowercase"),
    ("k3s-/amd64={path}", "name 'k3s-' must be lowercase"),
    ("k3s.bin/amd64={path}", "name 'k3s.bin' must be lowercase"),
    (("a" * 41) + "/amd64={path}", "max 40"),
    ("/amd64={path}", "name '' must be lowercase"),
    ("k3s@/amd64={path}", "version '' must start with a letter or digit"),
    ("k3s@../amd64={path}", "version '..' must start with a letter or digit"),
    ("k3s@v1/x/amd64={path}", "version 'v1/x' must start"),
    ("k3s@v1 2/amd64={path}", "version 'v1 2' must start"),
    ("k3s@v1/s390x={path}", "architecture 's390x' is not one of the --platform architectures (amd64, arm64)"),
    ("k3s@v1/={path}", "architecture '' is not one of"),
    ("k3s/amd64={missing}", "cannot read"),
    ("k3s/amd64={dir}", "is not a regular file"),
])
def test_bad_spec_names_the_option(tmp_path: Path, spec: str, message: str) -> None:
    path = _binary(tmp_path / "k3s", b"x")
    text = spec.format(path=path, missing=tmp_path / "nope", dir=tmp_path)
    with pytest.raises(build.BuildError) as err:
        build.parse_file_spec(text, ARCHES, "1.0.0")
    assert str(err.value).startswith(f"--file {text!r}: ")
    assert message in str(err.value)


_PARSE_IN_CHILD = """
import sys
from bundle_builder import build
try:
    build.parse_file_spec(sys.argv[1], ("amd64", "arm64"), "1.0.0")
except build.BuildError as exc:
    print(exc)
"""


def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    path = _binary(tmp_path / "k3s", b"x", mode=0o000)
    # Root reads every file through CAP_DAC_OVERRIDE: the check runs in a child that has lost those capabilities
    # (still uid 0, so the test needs no other user), as a build by an ordinary user would.
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    proc = subprocess.run([*drop, sys.executable, "-c", _PARSE_IN_CHILD, f"k3s/amd64={path}"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "is not readable" in proc.stdout, proc.stdout


def test_fifo_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(build.BuildError, match="is not a regular file"):
        build.parse_file_spec(f"k3s/amd64={fifo}", ARCHES, "1.0.0")


def test_one_version_per_name_and_arch(tmp_path: Path) -> None:
    a, b = _binary(tmp_path / "a", b"a"), _binary(tmp_path / "b", b"b")
    with pytest.raises(build.BuildError) as err:
        build.parse_file_specs([f"k3s@v1/amd64={a}", f"k3s@v2/amd64={b}"], ARCHES, "1.0.0")
    assert "both give k3s/amd64" in str(err.value) and f"k3s@v1/amd64={a}" in str(err.value)
    ok = build.parse_file_specs([f"k3s@v1/arm64={b}", f"k3s@v1/amd64={a}"], ARCHES, "1.0.0")
    assert [f.key for f in ok] == ["k3s/amd64", "k3s/arm64"]


def test_build_refuses_an_arch_outside_the_platforms(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = _binary(tmp_path / "k3s", b"x")
    with pytest.raises(build.BuildError, match="not one of the --platform architectures .amd64."):
        _build(sample_world, tmp_path / "out", [f"k3s/arm64={path}"], platforms=["linux/amd64"])
    assert not list((tmp_path / "out").iterdir())


def test_cli_bad_file_exits_2_naming_the_option(sample_world, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["build", str(sample_world.write_model()), "-o", str(tmp_path / "out"), "--unsigned",
                 "--images-from", sample_world.archives[0], "--file", f"k3s/amd64={tmp_path / 'nope'}"])
    assert code == 2
    assert f"--file 'k3s/amd64={tmp_path / 'nope'}': cannot read" in capsys.readouterr().err


# -- the bundle -------------------------------------------------------------------------------------------


def test_files_section_and_blobs(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    k3s = _binary(tmp_path / "k3s-amd64", b"\x7fELF amd64 binary")
    k3s_arm = _binary(tmp_path / "k3s-arm64", b"\x7fELF arm64 binary")
    images = _binary(tmp_path / "images.tar", b"tarball" * 1000, mode=0o600)
    result = _build(sample_world, tmp_path / "out", [f"k3s@v1.30.2+k3s1/amd64={k3s}", f"k3s@v1.30.2+k3s1/arm64={k3s_arm}",
                                                     f"k3s-airgap-images/amd64={images}"])
    manifest = _manifest(result.path)
    digest = "sha256:" + hashlib.sha256(k3s.read_bytes()).hexdigest()
    assert manifest["files"] == {
        "k3s/amd64": {"name": "k3s", "version": "v1.30.2+k3s1", "arch": "amd64", "digest": digest,
                      "size": k3s.stat().st_size, "mode": "0755"},
        "k3s/arm64": {"name": "k3s", "version": "v1.30.2+k3s1", "arch": "arm64",
                      "digest": "sha256:" + hashlib.sha256(k3s_arm.read_bytes()).hexdigest(), "size": 17, "mode": "0755"},
        "k3s-airgap-images/amd64": {"name": "k3s-airgap-images", "version": "1.0.0", "arch": "amd64",
                                    "digest": "sha256:" + hashlib.sha256(images.read_bytes()).hexdigest(),
                                    "size": 7000, "mode": "0644"},
    }
    by_digest = {b["digest"]: b for b in manifest["blobs"]}
    assert by_digest[digest] == {"digest": digest, "size": 17, "mediaType": bundle_format.FILE_MEDIA_TYPE,
                                 "usedBy": ["files:k3s/amd64"], "bundled": True}
    # the blob is in the tar with the file's bytes, and the whole bundle verifies
    assert bundle_format.read_blob(str(result.path), digest) == k3s.read_bytes()
    assert bundle_format.verify_bundle(str(result.path), None).blobs_checked == len(manifest["blobs"])


def test_same_bytes_stored_once(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # a script (same bytes on both arches) and a file identical to an image layer are stored once each
    script = _binary(tmp_path / "tool", b"#!/bin/sh\necho hi\n")
    layer = _binary(tmp_path / "layer", sample_world.images.base["amd64"], mode=0o644)
    without = _build(sample_world, tmp_path / "plain", [])
    result = _build(sample_world, tmp_path / "out", [f"tool/amd64={script}", f"tool/arm64={script}",
                                                     f"layer/amd64={layer}"])
    manifest = _manifest(result.path)
    by_digest = {b["digest"]: b for b in manifest["blobs"]}
    tool = by_digest[manifest["files"]["tool/amd64"]["digest"]]
    assert tool["usedBy"] == ["files:tool/amd64", "files:tool/arm64"]
    assert "files:layer/amd64" in by_digest[manifest["files"]["layer/amd64"]["digest"]]["usedBy"]
    assert result.blobs_total == without.blobs_total + 1
    digests = [b["digest"] for b in manifest["blobs"]]
    assert len(digests) == len(set(digests))


def test_reproducible_and_without_files_unchanged(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    k3s = _binary(tmp_path / "k3s", b"binary")
    model = sample_world.write_model()
    a = _build(sample_world, tmp_path / "a", [f"k3s/amd64={k3s}"], model=model)
    os.utime(k3s, (1, 1))  # another mtime, same bytes and mode
    b = _build(sample_world, tmp_path / "b", [f"k3s/amd64={k3s}"], model=model)
    assert a.path.read_bytes() == b.path.read_bytes()
    # a release without files has no files key at all: manifests of such releases keep their bytes
    plain = _build(sample_world, tmp_path / "c", [], model=model)
    assert "files" not in _manifest(plain.path)
    k3s.chmod(0o644)  # the executable bit is part of the release
    c = _build(sample_world, tmp_path / "d", [f"k3s/amd64={k3s}"], model=model)
    assert _manifest(c.path)["files"]["k3s/amd64"]["mode"] == "0644"


def test_delta_omits_a_file_the_base_has(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    k3s, images = _binary(tmp_path / "k3s", b"k3s v1"), _binary(tmp_path / "images", b"images v1")
    base = _build(sample_world, tmp_path / "v1", [f"k3s@v1/amd64={k3s}", f"images@v1/amd64={images}"])
    images2 = _binary(tmp_path / "images2", b"images v2")
    delta = _build(sample_world, tmp_path / "v2", [f"k3s@v1/amd64={k3s}", f"images@v2/amd64={images2}"],
                   model=sample_world.write_model("v2.yml", version="1.1.0"), base=base.path)
    manifest = _manifest(delta.path)
    by_digest = {b["digest"]: b for b in manifest["blobs"]}
    assert by_digest[manifest["files"]["k3s/amd64"]["digest"]]["bundled"] is False
    assert by_digest[manifest["files"]["images/amd64"]["digest"]]["bundled"] is True
    assert manifest["files"]["k3s/amd64"]["digest"] in delta.omitted


def test_file_changed_during_the_build_is_caught(sample_world, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    k3s = _binary(tmp_path / "k3s", b"original")
    real = build._plan_files

    def plan_then_change(plan, inputs):  # type: ignore[no-untyped-def]
        section = real(plan, inputs)
        k3s.write_bytes(b"replaced")  # same size, other bytes: only the digest check can see it
        return section
    monkeypatch.setattr(build, "_plan_files", plan_then_change)
    with pytest.raises(build.BuildError, match="hashes to"):
        _build(sample_world, tmp_path / "out", [f"k3s/amd64={k3s}"])
    assert not list((tmp_path / "out").iterdir())


# -- the manifest reader ------------------------------------------------------------------------------------


@pytest.fixture
def with_files(sample_world, tmp_path: Path) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    k3s = _binary(tmp_path / "k3s", b"k3s")
    return _manifest(_build(sample_world, tmp_path / "out", [f"k3s@v1/amd64={k3s}"]).path)


def _tamper(manifest: dict[str, Any], change) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    m = copy.deepcopy(manifest)
    change(m)
    return m


def _entry(m: dict[str, Any]) -> dict[str, Any]:
    return m["files"]["k3s/amd64"]


def _unlist(m: dict[str, Any]) -> None:
    for b in m["blobs"]:
        if b["digest"] == _entry(m)["digest"]:
            b["usedBy"] = ["model"]


@pytest.mark.parametrize("change, field, message", [
    (lambda m: m.update(files=[]), "files", "must be an object"),
    (lambda m: m["files"].update({"k3s/amd64": "x"}), "files.k3s/amd64", "must be an object"),
    (lambda m: _entry(m).update(extra=1), "files.k3s/amd64", "must have exactly the fields"),
    (lambda m: _entry(m).pop("mode"), "files.k3s/amd64", "must have exactly the fields"),
    (lambda m: _entry(m).update(name="K3S"), "files.k3s/amd64.name", "lowercase"),
    (lambda m: _entry(m).update(name=["k3s"]), "files.k3s/amd64.name", "lowercase"),
    (lambda m: _entry(m).update(version="../x"), "files.k3s/amd64.version", "must start with a letter"),
    (lambda m: _entry(m).update(version=1), "files.k3s/amd64.version", "must start with a letter"),
    (lambda m: _entry(m).update(arch="riscv64"), "files.k3s/amd64.arch", "one of the bundle's architectures"),
    (lambda m: m["files"].update({"k3s/arm64": m["files"].pop("k3s/amd64")}), "files.k3s/arm64",
     "key must be '<name>/<arch>'"),
    (lambda m: _entry(m).update(mode="4755"), "files.k3s/amd64.mode", "must be one of"),
    (lambda m: _entry(m).update(digest="sha256:" + "0" * 64), "files.k3s/amd64.digest", "listed blob"),
    (lambda m: _entry(m).update(digest={}), "files.k3s/amd64.digest", "listed blob"),
    (lambda m: _entry(m).update(size=_entry(m)["size"] + 1), "files.k3s/amd64.digest", "same size"),
    (lambda m: _entry(m).update(size=True), "files.k3s/amd64.digest", "same size"),
    (_unlist, "files.k3s/amd64.digest", "usedBy"),
])
def test_reader_refuses_a_bad_files_section(with_files: dict[str, Any], change, field: str,  # type: ignore[no-untyped-def]
                                            message: str) -> None:
    bundle_format.validate_manifest(with_files)  # the untampered one passes
    bad = _tamper(with_files, change)
    with pytest.raises(BundleError) as err:
        bundle_format.parse_manifest(bundle_format.canonical_json(bad))
    assert f"manifest.json: {field}: " in str(err.value) and message in str(err.value)


def test_reader_accepts_a_manifest_without_files(with_files: dict[str, Any]) -> None:
    old = _tamper(with_files, lambda m: m.pop("files"))
    for b in old["blobs"]:
        b["usedBy"] = [u for u in b["usedBy"] if not u.startswith("files:")] or ["model"]
    assert "files" not in bundle_format.validate_manifest(old)
    assert bundle_format.summarize_manifest(old)["files"] == {}


# -- inspect and diff ---------------------------------------------------------------------------------------


def test_inspect_and_diff_show_files(sample_world, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    k3s, tool = _binary(tmp_path / "k3s", b"k3s v1"), _binary(tmp_path / "tool", b"tool")
    k3s2, images = _binary(tmp_path / "k3s2", b"k3s v2"), _binary(tmp_path / "images", b"img")
    v1 = _build(sample_world, tmp_path / "v1", [f"k3s@v1/amd64={k3s}", f"tool@1/arm64={tool}"])
    v2 = _build(sample_world, tmp_path / "v2", [f"k3s@v2/amd64={k3s2}", f"images@v2/amd64={images}"],
                model=sample_world.write_model("v2.yml", version="1.1.0"))
    assert main(["inspect", str(v1.path)]) == 0
    out = capsys.readouterr().out
    assert "files:\n  k3s/amd64: k3s v1 (6 B, mode 0755) sha256:" in out
    assert "  tool/arm64: tool 1 " in out
    assert main(["inspect", str(v1.path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["files"]["k3s/amd64"]["version"] == "v1" and doc["manifest"]["files"]["tool/arm64"]["arch"] == "arm64"
    assert main(["diff", str(v1.path), str(v2.path), "--json"]) == 0
    diff = json.loads(capsys.readouterr().out)["files"]
    assert sorted(diff["added"]) == ["images/amd64"] and sorted(diff["removed"]) == ["tool/arm64"]
    assert diff["changed"]["k3s/amd64"]["old"]["version"] == "v1"
    assert diff["changed"]["k3s/amd64"]["new"]["version"] == "v2"
    assert main(["diff", str(v1.path), str(v2.path)]) == 0
    out = capsys.readouterr().out
    assert "file images/amd64: added v2" in out and "file tool/arm64: removed 1" in out
    assert "file k3s/amd64: v1 -> v2" in out


def test_inspect_without_files(sample_world, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    plain = _build(sample_world, tmp_path / "out", [])
    assert main(["inspect", str(plain.path)]) == 0
    assert "files:      none" in capsys.readouterr().out
