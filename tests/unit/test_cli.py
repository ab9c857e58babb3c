"""The bundle-builder CLI: output, --json, exit codes (0 ok, 1 failed check, 2 bad usage/input)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bundle_builder.cli import main
from offline_delivery_core.app import model as app_model
from tests.helpers.bundles import copy_with_flipped_bit, members
from tests.helpers.images import sample_images, write_docker_archive

BOTH = "linux/amd64,linux/arm64"


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def v1(sample_world, keypair, tmp_path: Path, capsys) -> Path:  # type: ignore[no-untyped-def]
    code, out, _ = run(capsys, "build", sample_world.write_model(), "-o", tmp_path / "v1",
                       *[x for s in sample_world.archives for x in ("--images-from", s)],
                       "--platform", BOTH, "--sign-key", keypair[0], "--json")
    assert code == 0
    return Path(json.loads(out)["path"])


def test_keygen(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, "keygen", tmp_path / "site")
    assert code == 0 and "site.key" in err and (tmp_path / "site.pub").exists()
    assert (tmp_path / "site.key").stat().st_mode & 0o777 == 0o600
    code, _, err = run(capsys, "keygen", tmp_path / "site")
    assert code == 2 and "already exists" in err


def test_build_json_prints_only_json(sample_world, keypair, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run(capsys, "build", sample_world.write_model(), "-o", tmp_path / "out",
                         "--images-from", f"oci:{sample_world.oci}", "--platform", BOTH,
                         "--sign-key", keypair[0], "--json")
    assert code == 0 and err == ""
    doc = json.loads(out)
    assert doc["blobs_bundled"] == 16 and doc["signed_keyid"] and doc["path"].endswith("demo-1.0.0.bundle")


def test_build_plain_progress_lines_when_not_a_tty(sample_world, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run(capsys, "build", sample_world.write_model(), "-o", tmp_path / "out",
                         "--images-from", f"oci:{sample_world.oci}", "--platform", BOTH, "--unsigned")
    assert code == 0 and out == ""
    assert "writing blobs: 100%" in err and "\r" not in err
    assert "UNSIGNED" in err and "16 of 16 blobs carried" in err


@pytest.mark.parametrize("extra,message", [
    ([], "give --sign-key KEY"),
    (["--unsigned", "--images-from", "archive:/nope.tar"], "archive:/nope.tar: no such file"),
    (["--unsigned", "--images-from", "ftp:x"], "bad image source 'ftp:x'"),
    (["--unsigned", "--volume-size", "lots"], "bad volume size 'lots'"),
])
def test_build_bad_input_exits_2(sample_world, tmp_path: Path, capsys, extra, message: str) -> None:  # type: ignore[no-untyped-def]
    sources = [] if "--images-from" in extra else ["--images-from", f"oci:{sample_world.oci}"]
    code, _, err = run(capsys, "build", sample_world.write_model(), "-o", tmp_path / "out", *sources, *extra)
    assert code == 2 and message in err


def test_build_missing_image_exits_2(sample_world, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, "build", sample_world.write_model(api_tag="2.0.0"), "-o", tmp_path / "out",
                       "--images-from", f"oci:{sample_world.oci}", "--unsigned")
    assert code == 2 and "image test/api:2.0.0 not found in any source" in err


def test_inspect(v1: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(capsys, "inspect", v1)
    assert code == 0
    assert "release:    demo 1.0.0" in out and "platforms:  linux/amd64, linux/arm64" in out
    assert "api: test/api:1.0.0" in out and "delta:      none" in out
    code, out, _ = run(capsys, "inspect", v1, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["components"] == ["api", "web"] and doc["signed"] is True
    assert doc["manifest"]["mediaType"] == "application/vnd.offline-delivery.manifest.v2+json"
    assert doc["format"] == 2 and doc["compressed_blobs"] > 0


def test_inspect_missing_and_damaged(v1: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, "inspect", tmp_path / "nope.bundle")
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(v1.read_bytes()[:700])
    code, _, err = run(capsys, "inspect", bad)
    assert code == 1 and "truncated" in err


def test_verify_ok_and_failures(v1: Path, keypair, other_keypair, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(capsys, "verify", v1, "--pub", keypair[1])
    assert code == 0 and out.startswith("OK: demo 1.0.0: signature OK") and "16 blobs" in out
    code, _, err = run(capsys, "verify", v1, "--pub", other_keypair[1])
    assert code == 1 and "FAILED" in err and "not one of the trusted keys" in err and "member: manifest.sig" in err
    blob = [m for m in members(v1) if m.name.startswith("blobs/")][3]
    bad = copy_with_flipped_bit(v1, tmp_path / "bad.bundle", blob.data_offset + 5)
    code, _, err = run(capsys, "verify", bad, "--pub", keypair[1])
    assert code == 1 and f"member: {blob.name}" in err and f"offset: {blob.data_offset}" in err
    code, out, err = run(capsys, "verify", bad, "--pub", keypair[1], "--json")
    doc = json.loads(out)
    assert code == 1 and err == "" and doc["ok"] is False and doc["member"] == blob.name
    assert "hashes to" in doc["error"]


def test_verify_usage_errors(v1: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, "verify", v1)
    assert code == 2 and "give --pub KEY" in err
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    code, _, err = run(capsys, "verify", v1, "--pub", rsa_pub)
    assert code == 2 and "key type is RSA" in err
    code, _, err = run(capsys, "verify", tmp_path / "missing.bundle", "--integrity-only")
    assert code == 2 and "does not exist" in err
    code, out, _ = run(capsys, "verify", v1, "--integrity-only")
    assert code == 0 and "signature NOT checked" in out


def test_verify_split_from_first_part(sample_world, keypair, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(capsys, "build", sample_world.write_model(), "-o", tmp_path / "split",
                       "--images-from", f"oci:{sample_world.oci}", "--platform", BOTH,
                       "--sign-key", keypair[0], "--volume-size", "4K", "--json")
    assert code == 0 and json.loads(out)["parts"] > 3
    code, out, _ = run(capsys, "verify", tmp_path / "split" / "demo-1.0.0.bundle.part000", "--pub", keypair[1])
    assert code == 0 and "OK" in out


def test_diff(v1: Path, sample_world, keypair, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    s2 = sample_images(api_tag="1.1.0", api_payload=b"v2")
    archive = write_docker_archive(tmp_path / "v11.tar", list(s2.api.values()))
    model = sample_world.write_model("app-1.1.0.yml", version="1.1.0", api_tag="1.1.0",
                                     extra_env={"GREETING": "hi"})
    code, out, _ = run(capsys, "build", model, "-o", tmp_path / "v11", "--images-from", f"archive:{archive}",
                       *[x for s in sample_world.archives for x in ("--images-from", s)],
                       "--platform", BOTH, "--sign-key", keypair[0], "--json")
    assert code == 0
    v11 = json.loads(out)["path"]
    code, out, _ = run(capsys, "diff", v1, v11, "--json")
    d = json.loads(out)
    assert code == 0
    assert d["added"] == [] and d["removed"] == [] and d["unchanged"] == ["web"]
    assert {"image", "image@linux/amd64", "image@linux/arm64", "env.GREETING"} <= set(d["changed"]["api"])
    assert d["env_defaults"]["api"]["GREETING"] == {"old": "hello", "new": "hi"}
    # model + SBOM + index + 2 manifests + 2 configs + 1 new layer
    assert d["delta"]["blobs"] == 8 and 0 < d["delta"]["bytes"] < d["delta"]["full_bytes"]
    code, out, _ = run(capsys, "diff", v1, v11)
    assert code == 0 and "changed:   api (" in out and "unchanged: web" in out
    assert "env default api.GREETING: 'hello' -> 'hi'" in out and "carries 8 blobs" in out
    code, _, err = run(capsys, "diff", v1, tmp_path / "nope.bundle")
    assert code == 2 and "nope.bundle does not exist" in err


def test_from_compose(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(yaml.safe_dump({"services": {
        "web": {"image": "nginx:1.25", "ports": ["8080:80"], "depends_on": ["api"]},
        "api": {"image": "shop/api:1.0.0", "environment": {"MODE": "prod"}, "privileged": True}}}))
    code, _, err = run(capsys, "from-compose", compose, "--name", "shop", "--version", "1.0.0",
                       "-o", tmp_path / "app.yml")
    assert code == 0 and "privileged" in err  # unsupported key reported, not dropped silently
    model = app_model.load_model(yaml.safe_load((tmp_path / "app.yml").read_text()))
    assert model["components"]["api"]["env"]["MODE"] == "prod"
    code, _, err = run(capsys, "from-compose", tmp_path / "missing.yml", "--name", "x", "--version", "1.0.0", "-o", "-")
    assert code == 2 and "cannot read" in err


def test_console_script_exit_codes(v1: Path, keypair) -> None:  # type: ignore[no-untyped-def]
    exe = Path(sys.executable).parent / "bundle-builder"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "bundle_builder.cli"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    ok = subprocess.run([*cmd, "verify", str(v1), "--pub", str(keypair[1])], capture_output=True, text=True,
                        env=env, timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    usage = subprocess.run([*cmd, "verify"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_progress_bar_on_a_tty_lines_otherwise_nothing_with_json() -> None:
    import io

    from bundle_builder.progress import make_progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = make_progress(False, tty)
    assert bar is not None
    bar(0, 4 << 20, "writing blobs")
    bar(4 << 20, 4 << 20, "writing blobs")
    assert tty.getvalue().startswith("\r[") and "100.0%" in tty.getvalue() and tty.getvalue().endswith("\n")
    plain = io.StringIO()
    lines = make_progress(False, plain)
    assert lines is not None
    for done in range(0, 101, 5):
        lines(done, 100, "verifying")
    out = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue() and out[-1] == "verifying: 100% (100 B of 100 B)"
    assert 5 <= len(out) <= 12  # one line per 10 % step, not one per call
    assert make_progress(True, plain) is None


# ----------------------------------------------------------------------------------------------------------
# the bundle_export module builds "with the same code as the CLI": it takes every input build takes


# build's options that are about the command line itself, and the module's names for the others
CLI_ONLY = {"json"}  # the module returns its summary as the result
MODULE_NAME = {"output": "dest", "platform": "platforms", "file": "files"}


def test_bundle_export_takes_every_option_of_build() -> None:
    """issue #15: the module lacked packages, package_profiles, files and have_pub; a new build option without
    its module option (or its documentation) fails here."""
    import argparse
    import ast

    from bundle_builder.cli import make_parser

    parser = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # pylint: disable=protected-access
    build_options = {a.dest for a in sub.choices["build"]._actions if a.dest != "help"}  # pylint: disable=protected-access
    wanted = {MODULE_NAME.get(d, d) for d in build_options - CLI_ONLY}

    source = Path(__file__).resolve().parents[2] / "plugins" / "modules" / "bundle_export.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    doc = next(n.value.value for n in tree.body if isinstance(n, ast.Assign)
               and getattr(n.targets[0], "id", "") == "DOCUMENTATION")
    documented = set(yaml.safe_load(doc)["options"])
    spec = next(n for n in ast.walk(tree) if isinstance(n, ast.keyword) and n.arg == "argument_spec")
    in_spec = {ast.literal_eval(k) for k in spec.value.keys}
    assert wanted <= documented, f"bundle_export does not document {sorted(wanted - documented)}"
    assert wanted <= in_spec, f"bundle_export does not take {sorted(wanted - in_spec)}"
    assert documented == in_spec
