"""Bundle format 2: blobs travel zstd-compressed with their uncompressed sha256 as content address.

Round trip through verify and a site import (the store keeps blobs uncompressed), the per-blob choice,
damaged compressed members refused naming the blob, decompression bounded by the signed size, split parts
read once, the explicit media check, inspect/diff, and ``--compress none`` writing format 1.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from bundle_builder import build, signing
from bundle_builder.cli import main as cli_main
from offline_delivery_core.bundle import format as bf
from offline_delivery_core.bundle.ed25519 import load_public_key_files
from offline_delivery_core.bundle.format import BundleError
from offline_delivery_core.common import zstd
from offline_delivery_core.site.repo import SiteRepo, import_bundle
from tests.helpers.bundles import members
from tests.helpers.images import sample_images, sample_model, write_docker_archive


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zmade")
    images = sample_images(filler=150_000)
    archive = write_docker_archive(root / "all.tar", images.all())
    model = root / "app.yml"
    model.write_text(yaml.safe_dump(sample_model()))
    key, pub = signing.keygen(root / "vendor")
    out: dict[str, Path] = {"pub": pub, "model": model, "archive": archive, "key": key}
    for name, vs, method in (("bundle", None, "zstd"), ("parts", "4K", "zstd"), ("plain", None, "none")):
        d = root / name
        d.mkdir()
        res = build.build_bundle(model, d, image_sources=[f"archive:{archive}"],
                                 platforms=["linux/amd64", "linux/arm64"], sign_key=key, volume_size=vs,
                                 compression=build.Compression(method))
        out[name] = res.path
    return out


@pytest.fixture(scope="module")
def trusted(made: dict[str, Path]) -> list[bytes]:
    return [load_public_key_files([str(made["pub"])])[0]]


def _compressed_members(path: Path) -> list:  # type: ignore[type-arg]
    return [m for m in members(path) if m.name.endswith(bf.ZSTD_SUFFIX)]


def test_format_2_signs_how_each_blob_travels(made, trusted) -> None:  # type: ignore[no-untyped-def]
    head = bf.read_head(str(made["bundle"]), trusted)
    m = head.manifest
    assert m["mediaType"] == bf.MEDIA_TYPE_V2 and m["schemaVersion"] == 2
    stored = {b["digest"] for b in m["blobs"] if b.get("stored") == bf.STORED_ZSTD}
    assert stored, "the docker-save layers and JSON blobs shrink"
    names = {m_.name for m_ in _compressed_members(made["bundle"])}
    assert names == {bf.blob_path(d) + ".zst" for d in stored}
    # the content addresses are those of format 1: same digests, same sizes, same order
    plain = bf.read_head(str(made["plain"]), trusted).manifest
    assert plain["mediaType"] == bf.MEDIA_TYPE and plain["schemaVersion"] == 1
    assert [(b["digest"], b["size"]) for b in plain["blobs"]] == [(b["digest"], b["size"]) for b in m["blobs"]]
    assert made["bundle"].stat().st_size < made["plain"].stat().st_size * 0.8
    res = bf.verify_bundle(str(made["bundle"]), trusted)
    assert res.bytes_checked == bf.verify_bundle(str(made["plain"]), trusted).bytes_checked
    assert res.bytes_stored < res.bytes_checked


def test_site_stores_blobs_uncompressed_and_same_as_format_1(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo = SiteRepo(str(tmp_path / "repo"))
    res = import_bundle(repo, str(made["bundle"]), trusted)
    assert res.changed
    for b in res_blobs(made["bundle"]):
        data = Path(repo.blob_file(b["digest"])).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == b["digest"] and len(data) == b["size"]
    # the format-1 bundle of the same release needs nothing new: every blob is there already
    other = SiteRepo(str(tmp_path / "repo2"))
    assert import_bundle(other, str(made["plain"]), trusted).changed
    assert sorted(p.name for p in Path(repo.root, "blobs", "sha256").iterdir()) == \
        sorted(p.name for p in Path(other.root, "blobs", "sha256").iterdir())


def res_blobs(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return bf.bundled_blobs(bf.read_head(str(path)).manifest)


def _flip(src: Path, dst: Path, pos: int) -> Path:
    data = bytearray(src.read_bytes())
    data[pos] ^= 0x40
    dst.write_bytes(data)
    return dst


def test_damaged_compressed_member_is_refused_naming_the_blob(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for m in _compressed_members(made["bundle"])[:6]:
        for pos in (m.data_offset + m.size // 2, m.data_offset + m.size - 1, m.data_offset + 1):
            bad = _flip(made["bundle"], tmp_path / "bad.bundle", pos)
            with pytest.raises(BundleError) as err:
                bf.verify_bundle(str(bad), trusted)
            assert err.value.member == m.name, err.value
            assert "refuse this bundle" in str(err.value) and "damaged or tampered" in str(err.value)
            repo = SiteRepo(str(tmp_path / "site"))
            with pytest.raises(BundleError):
                import_bundle(repo, str(bad), trusted)
            assert not repo.catalog()["releases"] and not list(Path(repo.root, "blobs", "sha256").glob("*"))


def _replace_member(path: Path, member, new_data: bytes, dst: Path) -> Path:  # type: ignore[no-untyped-def]
    """The bundle with one member's data replaced (header rewritten for the new size)."""
    data = path.read_bytes()
    end = member.data_offset + member.size + (-member.size % 512)
    out = (data[:member.header_offset] + bf.tar_header(member.name, len(new_data)) + new_data
           + bf.tar_padding(len(new_data)) + data[end:])
    dst.write_bytes(out)
    return dst


def _zstd(data: bytes) -> bytes:
    buf = io.BytesIO()
    with zstd.ZstdWriter(buf, 3) as w:
        w.write(data)
    return buf.getvalue()


def test_a_member_that_decompresses_to_more_or_other_bytes_is_refused(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    victim = _compressed_members(made["bundle"])[-1]
    desc = next(b for b in res_blobs(made["bundle"]) if bf.member_name(b) == victim.name)
    cases = {"bomb": (b"\0" * (desc["size"] * 50 + 10_000_000), "more than"),
             "short": (b"x" * (desc["size"] // 2), "decompresses to"),
             "other": (b"y" * desc["size"], "hashes to"),
             "not zstd": (None, "compressed data is damaged")}
    for name, (content, match) in cases.items():
        raw = b"plain bytes, no zstd frame" * 10 if content is None else _zstd(content)
        bad = _replace_member(made["bundle"], victim, raw, tmp_path / f"{name}.bundle")
        with pytest.raises(BundleError, match=match) as err:
            bf.verify_bundle(str(bad), trusted)
        assert err.value.member == victim.name, (name, err.value)


def test_stored_field_is_signed_and_checked(made, trusted) -> None:  # type: ignore[no-untyped-def]
    manifest = bf.read_head(str(made["bundle"]), trusted).manifest
    bad = json.loads(json.dumps(manifest))
    next(b for b in bad["blobs"] if b.get("stored"))["stored"] = "gzip"
    with pytest.raises(BundleError, match="stored: must be 'zstd'"):
        bf.validate_manifest(bad)
    v1 = json.loads(json.dumps(manifest))
    v1["mediaType"], v1["schemaVersion"] = bf.MEDIA_TYPE, 1
    with pytest.raises(BundleError, match="unknown fields \\['stored'\\]"):
        bf.validate_manifest(v1)
    mixed = json.loads(json.dumps(manifest))
    mixed["schemaVersion"] = 1
    with pytest.raises(BundleError, match="schemaVersion"):
        bf.validate_manifest(mixed)


def test_split_parts_read_once_and_damage_names_the_part(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    parts_json = made["parts"]
    doc = json.loads(parts_json.read_text())
    assert len(doc["parts"]) > 3
    whole = bf.verify_bundle(str(made["bundle"]), trusted)
    split = bf.verify_bundle(str(parts_json), trusted)
    assert split.manifest_digest == whole.manifest_digest and split.bytes_checked == whole.bytes_checked
    assert bf.check_media(str(parts_json)) == len(doc["parts"]) and bf.check_media(str(made["bundle"])) == 0
    media = tmp_path / "media"
    shutil.copytree(parts_json.parent, media)
    victim = media / doc["parts"][2]["name"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(data)
    with pytest.raises(BundleError, match=f"part {victim.name} has sha256") as err:
        bf.verify_bundle(str(media / parts_json.name), trusted)
    assert err.value.member == victim.name
    with pytest.raises(BundleError, match=f"part {victim.name} has sha256"):
        bf.check_media(str(media / parts_json.name))


def test_one_file_and_parts_hold_the_same_bytes(made) -> None:  # type: ignore[no-untyped-def]
    """Into one file a compressed member is written straight after a placeholder header that is filled in
    afterwards; into parts it is spooled first. Both give the same stream, byte for byte."""
    doc = json.loads(made["parts"].read_text())
    joined = b"".join((made["parts"].parent / p["name"]).read_bytes() for p in doc["parts"])
    assert joined == made["bundle"].read_bytes()
    assert _compressed_members(made["bundle"])


def test_split_verify_does_not_hash_the_parts(made, trusted, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Hash every byte once: a sound split bundle verifies without computing any part sha256."""
    calls = []
    monkeypatch.setattr(bf.PartsReader, "_check_part_hash", lambda self, index: calls.append(index))
    bf.verify_bundle(str(made["parts"]), trusted)
    assert calls == []


def test_blobs_that_do_not_shrink_travel_as_they_are(tmp_path: Path) -> None:
    """A gzip layer is not even sampled (media type); an incompressible file is sampled and left as it is."""
    import os

    from bundle_builder import images as img

    comp = build.Compression()
    sampler = zstd.ZstdWriter(io.BytesIO(), 3)
    noise = tmp_path / "noise"
    noise.write_bytes(os.urandom(600_000))
    text = tmp_path / "text"
    text.write_bytes(b"a config line that repeats\n" * 30_000)

    def blob(path: Path, media_type: str) -> img.Blob:
        return img.Blob("sha256:" + "0" * 64, path.stat().st_size, media_type, opener=lambda: open(path, "rb"))

    def unopenable() -> io.BytesIO:
        raise AssertionError("a gzip layer must not be opened to decide")

    gz = img.Blob("sha256:" + "1" * 64, 10_000_000, build.OCI_LAYER_GZIP, opener=unopenable)
    assert build._stored(gz, comp, sampler) is None  # pylint: disable=protected-access
    assert build._stored(blob(noise, bf.FILE_MEDIA_TYPE), comp, sampler) is None  # pylint: disable=protected-access
    assert build._stored(blob(text, bf.FILE_MEDIA_TYPE), comp, sampler) == "zstd"  # pylint: disable=protected-access
    sampler.release()


def test_cli_compress_none_level_inspect_diff(made, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base = ["build", str(made["model"]), "--images-from", f"archive:{made['archive']}", "--platform",
            "linux/amd64", "--sign-key", str(made["key"]), "--json"]
    assert cli_main([*base, "-o", str(tmp_path / "none"), "--compress", "none"]) == 0
    none = json.loads(capsys.readouterr().out)
    assert none["compression"]["blobs"] == 0
    assert cli_main([*base, "-o", str(tmp_path / "l9"), "--compress-level", "9", "--compress-threads", "1"]) == 0
    l9 = json.loads(capsys.readouterr().out)
    assert l9["compression"] == {"method": "zstd", "level": 9, "blobs": l9["compression"]["blobs"],
                                 "bytes": l9["compression"]["bytes"]} and l9["compression"]["blobs"] > 0
    assert l9["size"] < none["size"] and l9["manifest_digest"] != none["manifest_digest"]
    assert cli_main([*base, "-o", str(tmp_path / "bad"), "--compress-level", "42"]) != 0
    capsys.readouterr()
    assert cli_main(["inspect", l9["path"], "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == 2 and doc["compressed_blobs"] == l9["compression"]["blobs"]
    assert cli_main(["diff", none["path"], l9["path"], "--json"]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff["unchanged"] == ["api", "web"] and not diff["changed"]
    assert cli_main(["verify", l9["path"], "--pub", str(made["pub"]), "--json", "--media"]) == 0
    ok = json.loads(capsys.readouterr().out)
    assert ok["ok"] and ok["format"] == 2 and ok["bytes_stored"] < ok["bytes_checked"]
