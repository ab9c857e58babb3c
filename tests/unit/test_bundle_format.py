"""Bundle format: canonical JSON, manifest schema, the safe streaming tar reader, tamper detection, split parts."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest

from bundle_builder import build, signing
from offline_delivery_core.bundle import format as bf
from offline_delivery_core.bundle.format import BundleError
from offline_delivery_core.bundle.ed25519 import load_public_key_files
from tests.helpers.bundles import (copy_with_flipped_bit, flip_bit, member_data, members, regular, rewrite, special,
                                   truncate_copy)
from tests.helpers.images import sample_images, sample_model, write_docker_archive

import yaml


# ----------------------------------------------------------------------------------------------------------
# fixtures: one signed bundle (and its split form) per module; tests work on copies


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("made")
    images = sample_images(filler=150_000)
    archive = write_docker_archive(root / "all.tar", images.all())
    model = root / "app.yml"
    model.write_text(yaml.safe_dump(sample_model()))
    key, pub = signing.keygen(root / "vendor")
    whole = root / "whole"
    split = root / "split"
    for out, vs in ((whole, None), (split, "64K")):
        out.mkdir()
        # format 1 (nothing compressed): the reader of today's bundles stays; format 2 in test_bundle_compressed.py
        build.build_bundle(model, out, image_sources=[f"archive:{archive}"],
                           platforms=["linux/amd64", "linux/arm64"], sign_key=key, volume_size=vs,
                           compression=build.Compression("none"))
    return {"bundle": whole / "demo-1.0.0.bundle", "parts": split / "demo-1.0.0.bundle.parts.json",
            "pub": pub, "key": key}


@pytest.fixture(scope="module")
def trusted(made: dict[str, Path]) -> list[bytes]:
    return [load_public_key_files([str(made["pub"])])[0]]


def _refused(path: Path, trusted: list[bytes] | None, match: str) -> BundleError:
    with pytest.raises(BundleError, match=match) as err:
        bf.verify_bundle(str(path), trusted)
    return err.value


# ----------------------------------------------------------------------------------------------------------
# JSON, digests, manifest schema


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert bf.canonical_json({"b": 1, "a": ["é", {"z": None, "y": True}]}) == \
        '{"a":["é",{"y":true,"z":null}],"b":1}'.encode()
    with pytest.raises(ValueError):
        bf.canonical_json({"x": float("nan")})


def test_blob_path_and_digest_checks() -> None:
    d = bf.sha256_digest(b"x")
    assert bf.blob_path(d) == "blobs/sha256/" + hashlib.sha256(b"x").hexdigest()
    for bad in ("sha256:ABC", "md5:" + "0" * 32, "sha256:" + "0" * 63, "../../etc/passwd"):
        with pytest.raises(BundleError, match="bad digest"):
            bf.blob_path(bad)


def _manifest(made: dict[str, Path]) -> dict:
    return json.loads(member_data(made["bundle"], "manifest.json"))


@pytest.mark.parametrize("mutate,match", [
    (lambda m: m.update(mediaType="application/json"), "mediaType: is 'application/json'"),
    (lambda m: m.update(extra=1), r"unknown fields \['extra'\]"),
    (lambda m: m["blobs"].append(dict(m["blobs"][1])), r"blobs\[\d+\]: blob sha256:\w+ is listed twice"),
    (lambda m: m["blobs"][1].update(size=-1), r"blobs\[1\].size: must be a non-negative integer"),
    (lambda m: m["blobs"][2].update(bundled=False), "delta: is null but 1 blobs are marked bundled: false"),
    (lambda m: m["blobs"][0].update(bundled=False), "model: the model blob must be listed in blobs and bundled"),
    (lambda m: m["images"]["api"]["manifests"].pop("linux/arm64"), "images.api.manifests: must map each platform"),
    (lambda m: m.update(platforms=["amd64"]), "platforms: must be a list like"),
    (lambda m: m.update(delta={"base": {"name": "x"}}), "delta.base: must hold name, version and the base manifest"),
])
def test_manifest_schema_errors_name_the_field(made: dict[str, Path], mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    m = _manifest(made)
    bf.validate_manifest(m)
    mutate(m)
    with pytest.raises(BundleError, match=match) as err:
        bf.validate_manifest(m)
    assert err.value.member == "manifest.json"


def test_manifest_has_no_timestamps_and_records_builder(made: dict[str, Path]) -> None:
    m = _manifest(made)
    assert m["builder"]["name"] == "bundle-builder" and m["builder"]["version"]
    assert "time" not in json.dumps(m).lower() and "date" not in json.dumps(m).lower()
    assert member_data(made["bundle"], "manifest.json") == bf.canonical_json(m)


# ----------------------------------------------------------------------------------------------------------
# The tar reader refuses what a bundle never holds


def _blob_name(made: dict[str, Path], index: int = 1) -> str:
    return bf.blob_path(_manifest(made)["blobs"][index]["digest"])


def _with_inserted(made: dict[str, Path], tmp_path: Path, entry: tuple[tarfile.TarInfo, bytes]) -> Path:
    return rewrite(made["bundle"], tmp_path / "evil.bundle", insert_after={"manifest.sig": [entry]})


@pytest.mark.parametrize("entry,match", [
    (lambda b: regular("../../etc/cron.d/evil", b"x"), r"contains '\.\.' \(path traversal\)"),
    (lambda b: regular("blobs/sha256/../../../evil", b"x"), r"contains '\.\.'"),
    (lambda b: regular("/etc/passwd", b"x"), "has an absolute path"),
    (lambda b: special(b, tarfile.SYMTYPE, "/etc/shadow"), "is a symbolic link pointing to '/etc/shadow'"),
    (lambda b: special(b, tarfile.SYMTYPE, "../../outside"), "is a symbolic link pointing to '../../outside'"),
    (lambda b: special(b, tarfile.LNKTYPE, "/etc/passwd"), "is a hard link pointing to '/etc/passwd'"),
    (lambda b: special("blobs/sha256/dev", tarfile.CHRTYPE), "is a character device"),
    (lambda b: special(b, tarfile.BLKTYPE), "is a block device"),
    (lambda b: special(b, tarfile.FIFOTYPE), "is a FIFO"),
    (lambda b: special("blobs", tarfile.DIRTYPE), "is a directory"),
    (lambda b: regular(b, b"x", mode=0o4755), r"has the setuid/setgid bit \(mode 4755\)"),
    (lambda b: regular(b, b"x", mode=0o2755), "setuid/setgid"),
    (lambda b: regular("README", b"hello"), "'README' is not allowed in a bundle"),
    (lambda b: regular("blobs/sha256/" + "ab" * 32, b"x"), "is not listed in the manifest as bundled"),
])
def test_reader_refuses_crafted_members(made, trusted, tmp_path: Path, entry, match: str) -> None:  # type: ignore[no-untyped-def]
    name = _blob_name(made)
    evil = _with_inserted(made, tmp_path, entry(name))
    err = _refused(evil, trusted, match)
    assert err.member is not None and err.offset is not None
    assert "refuse" in str(err) or "not listed" in str(err)


def test_rewrite_helper_keeps_a_valid_bundle_valid(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    copy = rewrite(made["bundle"], tmp_path / "copy.bundle")
    assert bf.verify_bundle(str(copy), trusted).blobs_checked == len(_manifest(made)["blobs"])


def test_duplicate_member_refused(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    name = _blob_name(made, 2)
    dup = rewrite(made["bundle"], tmp_path / "dup.bundle", append=[regular(name, member_data(made["bundle"], name))])
    _refused(dup, trusted, f"tar member '{name}' appears twice")


def test_extra_member_after_last_blob_refused(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    extra = rewrite(made["bundle"], tmp_path / "extra.bundle", append=[regular("blobs/sha256/" + "cd" * 32, b"more")])
    _refused(extra, trusted, "more members than the manifest lists")


def test_out_of_order_and_missing_blobs_refused(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first, second = _blob_name(made, 1), _blob_name(made, 2)
    swapped = rewrite(made["bundle"], tmp_path / "swap.bundle", drop={first},
                      insert_after={second: [regular(first, member_data(made["bundle"], first))]})
    _refused(swapped, trusted, "listed in the manifest but out of order")
    last = _blob_name(made, -1)
    missing = rewrite(made["bundle"], tmp_path / "missing.bundle", drop={last})
    _refused(missing, trusted, f"ends before {last}")


def test_size_mismatch_refused(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    name = _blob_name(made, 1)
    bad = rewrite(made["bundle"], tmp_path / "size.bundle", replace={name: member_data(made["bundle"], name) + b"!"})
    _refused(bad, trusted, f"{name} is \\d+ bytes, the manifest says \\d+")


def test_pax_path_is_never_honoured(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    info, data = regular("innocent", b"x")
    info.pax_headers = {"path": "../../etc/evil"}
    evil = tmp_path / "pax.bundle"
    with tarfile.open(made["bundle"]) as tin, tarfile.open(evil, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin.getmembers()[:2]:
            tout.addfile(m, tin.extractfile(m))
        tout.addfile(info, io.BytesIO(data))
    _refused(evil, trusted, "tar member 'innocent' is not allowed in a bundle")  # the PAX path is ignored


def test_non_canonical_manifest_refused(made, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manifest = json.loads(member_data(made["bundle"], "manifest.json"))
    pretty = json.dumps(manifest, indent=1).encode()
    bad = rewrite(made["bundle"], tmp_path / "pretty.bundle", replace={"manifest.json": pretty}, drop={"manifest.sig"})
    _refused(bad, None, "not canonical JSON")
    dup = bf.canonical_json(manifest)[:-1] + b',"name":"other"}'
    bad = rewrite(made["bundle"], tmp_path / "dup.bundle", replace={"manifest.json": dup}, drop={"manifest.sig"})
    _refused(bad, None, "not canonical JSON")


def test_oversized_manifest_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.bundle"
    path.write_bytes(bf.tar_header("manifest.json", 65 * 1024 * 1024) + b"{" * 4096)
    _refused(path, None, "manifest.json is 68157440 bytes, more than the 67108864 allowed")


def test_not_a_bundle(tmp_path: Path) -> None:
    path = tmp_path / "x.bundle"
    rng = random.Random(1)
    for _ in range(20):
        path.write_bytes(bytes(rng.randrange(256) for _ in range(2048)))
        _refused(path, None, "not a bundle, or the header is damaged")
    with tarfile.open(tmp_path / "y.bundle", "w") as tar:
        tar.addfile(regular("blobs/sha256/" + "00" * 32, b"")[0])
    _refused(tmp_path / "y.bundle", None, "the first member must be manifest.json")


# ----------------------------------------------------------------------------------------------------------
# Truncation and flipped bits


def test_truncation_anywhere_is_refused(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    size = made["bundle"].stat().st_size
    ms = members(made["bundle"])
    cuts = {0, 100, 512, 600, ms[1].data_offset + 3, ms[3].data_offset + ms[3].size // 2, ms[-1].data_offset,
            ms[-1].data_offset + ms[-1].size, size - 1024, size - 1}
    for cut in sorted(cuts):
        short = truncate_copy(made["bundle"], tmp_path / f"cut{cut}.bundle", cut)
        with pytest.raises(BundleError, match="truncated|must be manifest.json|ends before") as err:
            bf.verify_bundle(str(short), trusted)
        assert err.value.offset is not None, cut


def test_appended_data_refused(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "appended.bundle"
    shutil.copyfile(made["bundle"], path)
    with open(path, "ab") as fh:
        fh.write(b"trailing garbage")
    _refused(path, trusted, "data after the end-of-archive marker")


def test_flipped_bit_in_every_blob_is_detected(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    blobs = [m for m in members(made["bundle"]) if m.name.startswith("blobs/")]
    assert len(blobs) == 16
    for m in blobs:
        bad = copy_with_flipped_bit(made["bundle"], tmp_path / "flip.bundle", m.data_offset + m.size // 2, bit=3)
        err = _refused(bad, trusted, "blob content hashes to sha256:[0-9a-f]+, not sha256")
        assert err.member == m.name and err.offset == m.data_offset
        # without a key (integrity only) the blob is still refused
        _refused(bad, None, "damaged or tampered")


def test_flipped_bit_in_manifest_is_detected(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = members(made["bundle"])[0]
    for pos in (0, m.size // 3, m.size - 1):
        bad = copy_with_flipped_bit(made["bundle"], tmp_path / "flip.bundle", m.data_offset + pos, bit=1)
        err = _refused(bad, trusted, "signature does not match manifest.json")
        assert err.member == "manifest.sig"


def test_flipped_bit_in_signature_is_detected(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sig = members(made["bundle"])[1]
    assert sig.name == "manifest.sig"
    for pos in range(0, sig.size, 7):
        bad = copy_with_flipped_bit(made["bundle"], tmp_path / "flip.bundle", sig.data_offset + pos, bit=0)
        err = _refused(bad, trusted, "signature|not one of the trusted keys")
        assert err.member == "manifest.sig", pos


def test_flipped_bit_in_a_header_is_detected(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = members(made["bundle"])[4]
    bad = copy_with_flipped_bit(made["bundle"], tmp_path / "flip.bundle", m.header_offset + 10)
    _refused(bad, trusted, "checksum mismatch")


# ----------------------------------------------------------------------------------------------------------
# Streaming with a sink


def test_sink_receives_every_blob_in_chunks(made, trusted) -> None:  # type: ignore[no-untyped-def]
    got: dict[str, bytes] = {}

    def sink(desc: dict, chunks) -> None:  # type: ignore[no-untyped-def]
        # a chunk is valid only until the next one is read: a sink that keeps data copies it
        got[desc["digest"]] = b"".join(bytes(chunk) for chunk in chunks)

    result = bf.verify_bundle(str(made["bundle"]), trusted, sink=sink)
    assert set(got) == {b["digest"] for b in result.manifest["blobs"]}
    assert all(bf.sha256_digest(data) == digest for digest, data in got.items())


def test_sink_chunks_are_reused_buffers(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Chunks are views of a few reused read buffers (no allocation per chunk): keeping a view without
    copying it sees later data, which is why the sink contract says a chunk is valid only during the call."""
    blob = bytes(range(256)) * (5 * bf.CHUNK_SIZE // 256 + 7)  # 5 chunks and a bit
    path = tmp_path / "one.bundle"
    with open(path, "wb") as out:
        manifest = _one_blob_manifest(blob)
        data = bf.canonical_json(manifest)
        out.write(bf.tar_header(bf.MANIFEST_NAME, len(data)) + data + bf.tar_padding(len(data)))
        for desc in manifest["blobs"]:
            content = blob if desc["digest"] == bf.sha256_digest(blob) else _MODEL
            out.write(bf.tar_header(bf.blob_path(desc["digest"]), len(content)) + content
                      + bf.tar_padding(len(content)))
        out.write(bf.TAR_END)
    monkeypatch.setattr(bf, "VERIFY_RING", 2)  # the real ring (48 MiB) is larger than this blob
    views: list[memoryview] = []
    copies: list[bytes] = []

    def sink(desc: dict, chunks) -> None:  # type: ignore[no-untyped-def]
        for chunk in chunks:
            assert isinstance(chunk, memoryview)
            views.append(chunk)
            copies.append(bytes(chunk))

    bf.verify_bundle(str(path), None, sink=sink)
    assert b"".join(copies) == _MODEL + blob
    buffers = {id(v.obj) for v in views}
    assert len(buffers) == 2 < len(views), "read buffers are reused across chunks"


_MODEL = b'{"name":"one"}'


def _one_blob_manifest(blob: bytes) -> dict:
    model = {"digest": bf.sha256_digest(_MODEL), "size": len(_MODEL), "mediaType": bf.MODEL_MEDIA_TYPE}
    return bf.build_manifest(
        name="one", version="1.0.0", builder={"name": "bundle-builder", "version": "test"},
        platforms=["linux/amd64"], model=model, images={},
        blobs=[bf.blob_descriptor(model["digest"], len(_MODEL), bf.MODEL_MEDIA_TYPE, ["model"]),
               bf.blob_descriptor(bf.sha256_digest(blob), len(blob), "application/octet-stream", ["c@linux/amd64"])],
        delta=None)


def test_sink_sees_the_error_before_finishing_a_bad_blob(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = [m for m in members(made["bundle"]) if m.name.startswith("blobs/")][-1]
    bad = copy_with_flipped_bit(made["bundle"], tmp_path / "flip.bundle", m.data_offset)
    published: list[str] = []

    def sink(desc: dict, chunks) -> None:  # type: ignore[no-untyped-def]
        for _ in chunks:
            pass
        published.append(desc["digest"])  # reached only when the iterator ended without error

    with pytest.raises(BundleError):
        bf.verify_bundle(str(bad), trusted, sink=sink)
    assert bf.blob_path(published[-1]) != m.name and len(published) == 15


def test_read_head_and_read_blob(made) -> None:  # type: ignore[no-untyped-def]
    head = bf.read_head(str(made["bundle"]))
    model = json.loads(bf.read_blob(str(made["bundle"]), head.manifest["model"]["digest"]))
    assert model["name"] == "demo" and set(model["components"]) == {"api", "web"}
    with pytest.raises(BundleError, match="is not bundled"):
        bf.read_blob(str(made["bundle"]), "sha256:" + "0" * 64)


# ----------------------------------------------------------------------------------------------------------
# Split parts


def _split_copy(made: dict[str, Path], tmp_path: Path) -> tuple[Path, list[dict]]:
    dst = tmp_path / "split"
    shutil.copytree(made["parts"].parent, dst)
    parts_json = dst / made["parts"].name
    return parts_json, json.loads(parts_json.read_text())["parts"]


def test_split_set_verifies_from_any_entry_point(made, trusted) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(made["parts"].read_text())
    assert doc["mediaType"] == bf.PARTS_MEDIA_TYPE and len(doc["parts"]) > 4
    for entry in (made["parts"], made["parts"].parent / doc["parts"][0]["name"], made["parts"].parent):
        assert bf.verify_bundle(str(entry), trusted).blobs_checked == 16


def test_flipped_bit_in_each_part_names_the_part(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    parts_json, parts = _split_copy(made, tmp_path)
    for part in parts:
        path = parts_json.parent / part["name"]
        original = path.read_bytes()
        flip_bit(path, part["size"] // 2, bit=5)
        err = _refused(parts_json, trusted, f"part {part['name']} has sha256 .*the part is damaged")
        assert err.member == part["name"]
        path.write_bytes(original)


def test_missing_part(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    parts_json, parts = _split_copy(made, tmp_path)
    (parts_json.parent / parts[2]["name"]).unlink()
    err = _refused(parts_json, trusted, f"part {parts[2]['name']} \\(3 of {len(parts)}\\) is missing")
    assert err.member == parts[2]["name"]


def test_parts_out_of_order(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    parts_json, parts = _split_copy(made, tmp_path)
    a, b = (parts_json.parent / parts[i]["name"] for i in (1, 2))
    data_a = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data_a)
    # the first part found damaged is named, with the part its content belongs to (either of the two)
    _refused(parts_json, trusted, f"part ({parts[1]['name']}|{parts[2]['name']}) .*its content is that of "
                                  f"({parts[2]['name']}|{parts[1]['name']}) " r"\(parts out of order or renamed\?\)")


def test_truncated_part(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    parts_json, parts = _split_copy(made, tmp_path)
    last = parts_json.parent / parts[-1]["name"]
    last.write_bytes(last.read_bytes()[:-10])
    _refused(parts_json, trusted, f"part {parts[-1]['name']} is \\d+ bytes, parts.json says")


def test_parts_json_with_path_in_part_name_refused(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    parts_json = _split_copy(made, tmp_path)[0]
    doc = json.loads(parts_json.read_text())
    doc["parts"][0]["name"] = "../" + doc["parts"][0]["name"]
    parts_json.write_text(json.dumps(doc))
    _refused(parts_json, trusted, "entry 0 of 'parts' is '../")


def test_split_error_in_a_sound_part_keeps_its_own_reason(made, other_keypair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    parts_json, parts = _split_copy(made, tmp_path)
    (parts_json.parent / parts[1]["name"]).unlink()  # a later problem must not hide the first one
    err = _refused(parts_json, [load_public_key_files([str(other_keypair[1])])[0]], "not one of the trusted keys")
    assert err.member == "manifest.sig"


@pytest.mark.parametrize("lanes,backlog", [(1, 1), (2, 3000), (3, 1 << 20)])
def test_hash_lanes_give_each_blob_its_own_digest(lanes: int, backlog: int) -> None:
    rng = random.Random(lanes)
    blobs = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 20000))) for _ in range(7)]
    hl = bf.HashLanes(lanes=lanes, max_backlog=backlog)
    try:
        hashers = []
        for data in blobs:
            h = hl.hasher()
            for i in range(0, len(data), 997):
                h.update(data[i:i + 997])
            hashers.append(h)
        assert [h.digest() for h in hashers] == [bf.sha256_digest(d) for d in blobs]
    finally:
        hl.shutdown()


def test_any_flipped_bit_anywhere_is_refused(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Headers, data, padding, end marker: no byte of a bundle goes unchecked."""
    size = made["bundle"].stat().st_size
    rng = random.Random(2024)
    ms = members(made["bundle"])
    # every header, every padding area, the end marker, and random places
    spots = {m.header_offset + rng.randrange(512) for m in ms}
    spots |= {m.data_offset + m.size + (-m.size % 512) - 1 for m in ms if m.size % 512}
    spots |= {size - 1, size - 700} | {rng.randrange(size) for _ in range(40)}
    for spot in sorted(spots):
        bad = copy_with_flipped_bit(made["bundle"], tmp_path / "flip.bundle", spot, bit=rng.randrange(8))
        with pytest.raises(BundleError):
            bf.verify_bundle(str(bad), trusted)


def test_header_fields_no_check_reads_are_still_fixed(made, trusted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = members(made["bundle"])[3]
    info, _ = regular(m.name, b"")
    info.size, info.mtime, info.uname = m.size, 1700000000, "mallory"
    header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    bad = tmp_path / "mtime.bundle"
    data = bytearray(made["bundle"].read_bytes())
    data[m.header_offset:m.header_offset + 512] = header
    bad.write_bytes(bytes(data))
    err = _refused(bad, trusted, "is not the one bundle-builder writes")
    assert err.member == m.name
