"""Building bundles from real docker-save archives and OCI layouts: dedup, platforms, deltas, splitting,
determinism and atomic output."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import yaml

from bundle_builder import build
from bundle_builder.images import ImageError, OciLayoutSource, Platform
from offline_delivery_core.bundle import format as bundle_format
from offline_delivery_core.common.oci import OCI_INDEX_MEDIA_TYPE
from offline_delivery_core.bundle.ed25519 import load_public_key_files
from tests.helpers.bundles import members
from tests.helpers.images import (OCI_LAYER_GZIP, TestImage, file_sha256, rootfs_layer, sample_images,
                                  sample_model, sha256, write_docker_archive, write_oci_layout)

BOTH = ["linux/amd64", "linux/arm64"]


def _build(world, out: Path, sources=None, platforms=BOTH, **kwargs):  # type: ignore[no-untyped-def]
    out.mkdir(parents=True, exist_ok=True)
    model = kwargs.pop("model", None) or world.write_model()
    return build.build_bundle(model, out, image_sources=sources or world.archives, platforms=platforms,
                              sign_key=kwargs.pop("sign_key", None), **kwargs)


def _manifest(path: Path) -> dict:
    return bundle_format.read_head(str(path)).manifest


def test_dedup_across_images_and_platforms(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = _build(sample_world, tmp_path / "out")
    manifest = _manifest(result.path)
    digests = [b["digest"] for b in manifest["blobs"]]
    assert len(digests) == len(set(digests))
    s = sample_world.images
    # base layer per arch shared by both images of that arch; api top layer shared by both arches
    by_digest = {b["digest"]: b for b in manifest["blobs"]}
    assert by_digest[sha256(s.base["amd64"])]["usedBy"] == ["api@linux/amd64", "web@linux/amd64"]
    api_top = s.api["amd64"].diff_ids[1]
    assert api_top == s.api["arm64"].diff_ids[1]
    assert by_digest[api_top]["usedBy"] == ["api@linux/amd64", "api@linux/arm64"]
    # 1 model + 1 SBOM + 2 indexes + 4 manifests + 4 configs + 4 unique layers
    assert len(digests) == 16 == result.blobs_bundled
    names = [m.name for m in members(result.path)]
    # unsigned: manifest.json, then each blob once, in manifest order
    assert names == ["manifest.json"] + [bundle_format.member_name(b) for b in manifest["blobs"]]
    unique_layers = sum(len(x) for x in (s.base["amd64"], s.base["arm64"], *(i.layers[1] for i in
                                         (s.api["amd64"], s.web["amd64"]))))
    assert result.bytes_bundled < unique_layers * 1.01 + 64 * 1024
    assert result.size <= result.bytes_bundled + 512 * (len(names) * 2 + 2) + len(json.dumps(manifest)) + 512


def test_images_stored_as_oci_index_per_component(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = _build(sample_world, tmp_path / "out")
    manifest = _manifest(result.path)
    api = manifest["images"]["api"]
    index = json.loads(bundle_format.read_blob(str(result.path), api["index"]))
    assert index["mediaType"] == OCI_INDEX_MEDIA_TYPE
    assert index["annotations"]["org.opencontainers.image.ref.name"] == "test/api:1.0.0"
    assert [(m["platform"]["architecture"], m["digest"]) for m in index["manifests"]] == [
        ("amd64", api["manifests"]["linux/amd64"]), ("arm64", api["manifests"]["linux/arm64"])]
    oci = json.loads(bundle_format.read_blob(str(result.path), api["manifests"]["linux/arm64"]))
    assert oci["config"]["digest"] == sample_world.images.api["arm64"].config_digest
    assert [layer["mediaType"] for layer in oci["layers"]] == ["application/vnd.oci.image.layer.v1.tar"] * 2
    assert [layer["digest"] for layer in oci["layers"]] == sample_world.images.api["arm64"].diff_ids


def test_oci_layout_and_archive_give_the_same_blobs(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from_archive = _manifest(_build(sample_world, tmp_path / "a").path)
    from_oci = _manifest(_build(sample_world, tmp_path / "o", sources=[f"oci:{sample_world.oci}"]).path)
    layers = lambda m: {b["digest"] for b in m["blobs"] if "layer" in b["mediaType"]}  # noqa: E731
    assert layers(from_archive) == layers(from_oci) and len(layers(from_oci)) == 4


def test_first_source_wins_per_platform(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # amd64 only in the first archive; arm64 only found in the OCI layout
    result = _build(sample_world, tmp_path / "out",
                    sources=[f"archive:{sample_world.archive_amd64}", f"oci:{sample_world.oci}"])
    assert result.blobs_bundled == 16


def test_platform_missing_lists_what_exists(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(build.BuildError) as err:
        _build(sample_world, tmp_path / "out", sources=[f"archive:{sample_world.archive_amd64}"])
    text = str(err.value)
    assert "image test/api:1.0.0 has no linux/arm64 variant" in text
    assert f"platforms found: linux/amd64 (in archive:{sample_world.archive_amd64})" in text
    assert "test/web:1.0.0 has no linux/arm64" in text  # every problem reported at once
    assert not list((tmp_path / "out").iterdir())


def test_image_claiming_another_platform_than_its_index(tmp_path: Path) -> None:
    liar = TestImage("test/liar:1", "amd64", [rootfs_layer()], index_arch="arm64")
    layout = write_oci_layout(tmp_path / "oci", [liar])
    with pytest.raises(ImageError, match="lists manifest sha256:[0-9a-f]+ as linux/arm64, but its config says "
                                         "linux/amd64; the image claims another platform"):
        OciLayoutSource(layout).find("test/liar:1")
    model = tmp_path / "app.yml"
    model.write_text(yaml.safe_dump({"apiVersion": "offline.delivery/v1", "kind": "Application", "name": "liar",
                                     "version": "1.0.0", "components": {"x": {"image": "test/liar:1"}}}))
    with pytest.raises(build.BuildError, match="claims another platform"):
        build.build_bundle(model, tmp_path, image_sources=[f"oci:{layout}"], platforms=["linux/arm64"], sign_key=None)


def test_image_in_no_source(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = sample_world.write_model(api_tag="9.9.9")
    with pytest.raises(build.BuildError) as err:
        _build(sample_world, tmp_path / "out", model=model,
               sources=[*sample_world.archives, f"oci:{sample_world.oci}"])
    assert (f"image test/api:9.9.9 not found in any source (tried: archive:{sample_world.archive_amd64}, "
            f"archive:{sample_world.archive_arm64}, oci:{sample_world.oci})") in str(err.value)


def test_bad_source_spec_and_missing_paths(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(build.BuildError, match="bad image source 'registry:x'"):
        _build(sample_world, tmp_path / "o1", sources=["registry:x"])
    with pytest.raises(build.BuildError, match="archive:/nonexistent.tar: no such file"):
        _build(sample_world, tmp_path / "o2", sources=["archive:/nonexistent.tar"])
    with pytest.raises(build.BuildError, match="not an OCI image layout"):
        _build(sample_world, tmp_path / "o3", sources=[f"oci:{tmp_path}"])


def test_invalid_model_is_refused_with_the_field(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = sample_model()
    data["components"]["api"]["imagee"] = "typo"  # type: ignore[index]
    model = tmp_path / "bad.yml"
    model.write_text(yaml.safe_dump(data))
    with pytest.raises(build.BuildError, match="bad.yml.*components.api.imagee"):
        _build(sample_world, tmp_path / "out", model=model)


def test_byte_identical_rebuild(sample_world, keypair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    one = _build(sample_world, tmp_path / "one", sign_key=keypair[0])
    two = _build(sample_world, tmp_path / "two", sign_key=keypair[0])
    assert one.manifest_digest == two.manifest_digest
    assert one.path.read_bytes() == two.path.read_bytes()
    # fixed header fields
    with tarfile.open(one.path) as tar:
        for m in tar.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) == (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)
    # a rebuild over an existing bundle replaces it atomically and leaves no temp files behind
    three = _build(sample_world, tmp_path / "one", sign_key=keypair[0])
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["demo-1.0.0.bundle"]
    assert three.path.read_bytes() == one.path.read_bytes()


def _v11(tmp_path: Path, world) -> tuple[Path, list[str]]:  # type: ignore[no-untyped-def]
    """Images and model of version 1.1.0: only the api's top layer changes."""
    s2 = sample_images(api_tag="1.1.0", api_payload=b"v2")
    archive = write_docker_archive(tmp_path / "v11.tar", [*s2.api.values()])
    model = world.write_model("app-1.1.0.yml", version="1.1.0", api_tag="1.1.0")
    return model, [f"archive:{archive}", *world.archives]


def test_delta_against_base_carries_only_new_blobs(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = _build(sample_world, tmp_path / "v1")
    model, sources = _v11(tmp_path, sample_world)
    full = _build(sample_world, tmp_path / "full", model=model, sources=sources)
    delta = _build(sample_world, tmp_path / "delta", model=model, sources=sources, base=base.path)
    m = _manifest(delta.path)
    assert m["delta"] == {"base": {"name": "demo", "version": "1.0.0", "manifest": base.manifest_digest}}
    assert {b["digest"] for b in m["blobs"]} == {b["digest"] for b in _manifest(full.path)["blobs"]}
    base_digests = {b["digest"] for b in _manifest(base.path)["blobs"]}
    carried = [b for b in m["blobs"] if b["bundled"]]
    # model, SBOM, api index, 2 api manifests, 2 api configs, 1 new api layer (shared by both arches)
    assert len(carried) == 8
    assert all(b["digest"] not in base_digests for b in carried)
    assert {b["digest"] for b in m["blobs"] if not b["bundled"]} <= base_digests
    new_layer = sha256(sample_images(api_payload=b"v2").api["amd64"].layers[1])
    assert new_layer in {b["digest"] for b in carried}
    assert delta.bytes_bundled == sum(b["size"] for b in carried)
    assert delta.omitted_bytes == full.bytes_total - delta.bytes_bundled
    assert delta.size < full.size
    # the delta verifies on its own: omitted blobs are listed but not expected in the tar
    result = bundle_format.verify_bundle(str(delta.path), None)
    assert result.blobs_checked == 8 and result.blobs_omitted == len(m["blobs"]) - 8


def test_delta_against_have_file(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = _build(sample_world, tmp_path / "v1")
    have = tmp_path / "have.json"
    have.write_text(json.dumps({"mediaType": bundle_format.HAVE_MEDIA_TYPE, "site": "plant-1",
                                "blobs": [b["digest"] for b in _manifest(base.path)["blobs"]]}))
    model, sources = _v11(tmp_path, sample_world)
    delta = _build(sample_world, tmp_path / "delta", model=model, sources=sources, have=have)
    m = _manifest(delta.path)
    assert m["delta"]["have"]["digest"] == file_sha256(have)
    assert m["delta"]["have"]["blobs"] == 16
    assert delta.blobs_bundled == 8


def test_model_blob_always_carried(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = _build(sample_world, tmp_path / "v1")
    again = _build(sample_world, tmp_path / "v1b", base=base.path)  # same release against itself
    m = _manifest(again.path)
    assert [b["usedBy"] for b in m["blobs"] if b["bundled"]] == [["model"], ["sbom"]]


@pytest.mark.parametrize("content,match", [
    ("[]", r'expected \{"blobs"'),
    ('{"blobs": ["sha256:abc"]}', r"blobs\[0\] = 'sha256:abc' is not a"),
    ('{"blobs": [], "mediaType": "text/plain"}', "mediaType 'text/plain'"),
    ("not json", "is not JSON"),
])
def test_bad_have_file(sample_world, tmp_path: Path, content: str, match: str) -> None:  # type: ignore[no-untyped-def]
    have = tmp_path / "have.json"
    have.write_text(content)
    with pytest.raises(build.BuildError, match=match):
        _build(sample_world, tmp_path / "out", have=have)


def test_base_signature_checked_when_key_given(sample_world, keypair, other_keypair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = _build(sample_world, tmp_path / "v1", sign_key=keypair[0])
    _build(sample_world, tmp_path / "ok", base=base.path, base_pub=[load_public_key_files([str(keypair[1])])[0]])
    with pytest.raises(build.BuildError, match="base bundle .*not one of the trusted keys"):
        _build(sample_world, tmp_path / "bad", base=base.path,
               base_pub=[load_public_key_files([str(other_keypair[1])])[0]])


def test_split_and_reassembly(sample_world, keypair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sample_world.images = sample_images(filler=200_000)
    world_root = tmp_path / "big"
    world_root.mkdir()
    archive = write_docker_archive(world_root / "all.tar", sample_world.images.all())
    whole = _build(sample_world, tmp_path / "whole", sources=[f"archive:{archive}"], sign_key=keypair[0])
    split = _build(sample_world, tmp_path / "split", sources=[f"archive:{archive}"], sign_key=keypair[0],
                   volume_size="4K")
    assert split.path.name == "demo-1.0.0.bundle.parts.json"
    doc = json.loads(split.path.read_text())
    assert split.parts == len(doc["parts"]) > 5
    assert all(p["size"] == 4 * 1024 for p in doc["parts"][:-1])
    joined = b"".join((split.path.parent / p["name"]).read_bytes() for p in doc["parts"])
    assert joined == whole.path.read_bytes()
    assert doc["sha256"] == file_sha256(whole.path) and doc["size"] == len(joined)
    assert split.manifest_digest == whole.manifest_digest
    pub = [load_public_key_files([str(keypair[1])])[0]]
    for form in (split.path, split.path.parent / doc["parts"][0]["name"], split.path.parent,
                 split.path.parent / "demo-1.0.0.bundle"):
        assert bundle_format.verify_bundle(str(form), pub).blobs_checked == 16, form
    # rebuilding unsplit into the same directory removes the parts: one form of a release remains
    again = _build(sample_world, tmp_path / "split", sources=[f"archive:{archive}"], sign_key=keypair[0])
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == [again.path.name]


def test_bad_volume_size(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(build.BuildError, match="bad volume size '4X'"):
        _build(sample_world, tmp_path / "out", volume_size="4X")
    assert build.parse_size("4G") == 4 * 1024**3 and build.parse_size("500M") == 500 * 1024**2


def test_gzip_layers_kept_as_their_source_had_them(tmp_path: Path) -> None:
    images = sample_images()
    layout = write_oci_layout(tmp_path / "oci", images.all(), gzip_layers=True)
    archive = write_docker_archive(tmp_path / "gz.tar", [images.api["amd64"], images.web["amd64"]],
                                   gzip_layers=True)
    model = tmp_path / "app.yml"
    model.write_text(yaml.safe_dump(sample_model()))
    for name, src in (("oci", f"oci:{layout}"), ("archive", f"archive:{archive}")):
        out = tmp_path / f"out-{name}"
        out.mkdir()
        result = build.build_bundle(model, out, image_sources=[src], platforms=["linux/amd64"], sign_key=None)
        layers = [b for b in _manifest(result.path)["blobs"] if "layer" in b["mediaType"]]
        assert layers and all(b["mediaType"] == OCI_LAYER_GZIP for b in layers), name
        assert bundle_format.verify_bundle(str(result.path), None).blobs_checked == result.blobs_bundled


def test_symlinked_layers_in_docker_archive_are_followed(sample_world) -> None:  # type: ignore[no-untyped-def]
    with tarfile.open(sample_world.archive_amd64) as tar:
        assert any(m.issym() for m in tar.getmembers())  # the web image's base layer is a link to the api's


def test_damaged_source_fails_and_leaves_nothing(tmp_path: Path) -> None:
    images = sample_images()
    layout = write_oci_layout(tmp_path / "oci", [images.api["amd64"], images.web["amd64"]])
    base_blob = layout / "blobs" / "sha256" / sha256(images.base["amd64"]).split(":")[1]
    data = bytearray(base_blob.read_bytes())
    data[700] ^= 1
    base_blob.write_bytes(bytes(data))
    model = tmp_path / "app.yml"
    model.write_text(yaml.safe_dump(sample_model()))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(build.BuildError, match=f"blob {sha256(images.base['amd64'])} .*api@linux/amd64.*damaged"):
        build.build_bundle(model, out, image_sources=[f"oci:{layout}"], platforms=["linux/amd64"], sign_key=None)
    assert list(out.iterdir()) == []


def test_platform_parsing() -> None:
    assert Platform.parse("linux/arm64/v8") == Platform.parse("linux/arm64")
    assert str(Platform.parse("linux/arm/v7")) == "linux/arm/v7"
    with pytest.raises(ImageError, match="bad platform 'amd64'"):
        Platform.parse("amd64")


def test_oci_refs_from_either_annotation(tmp_path: Path) -> None:
    image = TestImage("test/x:1.0", "amd64", [rootfs_layer()])
    layout = write_oci_layout(tmp_path / "oci", [image])
    index = json.loads((layout / "index.json").read_text())
    # what buildx writes: a bare tag in ref.name, the full name in io.containerd.image.name
    index["manifests"][0]["annotations"] = {"org.opencontainers.image.ref.name": "1.0",
                                            "io.containerd.image.name": "docker.io/test/x:1.0"}
    (layout / "index.json").write_text(json.dumps(index))
    (found,) = OciLayoutSource(layout).find("test/x:1.0")
    assert str(found.platform) == "linux/amd64" and found.load().config.digest == image.config_digest
    assert OciLayoutSource(layout).find("test/x:2.0") == []
