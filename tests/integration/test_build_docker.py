"""Build a bundle from images in the running Docker engine (``--images-from docker``)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
import yaml

from bundle_builder.cli import main
from bundle_builder.images import DockerEngineSource, Platform, resolve
from offline_delivery_core.bundle import format as bundle_format
from tests.helpers.images import rootfs_layer

pytestmark = pytest.mark.docker
PREFIX = "h2bundle-test"


def _docker_ok() -> str | None:
    if shutil.which("docker") is None:
        return "docker CLI not installed"
    try:
        proc = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    return None if proc.returncode == 0 else f"docker info failed: {proc.stderr.strip()[:200]}"


@pytest.fixture
def imported_image(tmp_path: Path):  # type: ignore[no-untyped-def]
    reason = _docker_ok()
    if reason:
        pytest.skip(f"needs a running Docker engine ({reason})")
    ref = f"{PREFIX}/tiny:{uuid.uuid4().hex[:10]}"
    rootfs = tmp_path / "rootfs.tar"
    rootfs.write_bytes(rootfs_layer({"hello.txt": b"hello from the engine\n"}))
    subprocess.run(["docker", "import", "--change", "CMD [\"/hello\"]", str(rootfs), ref],
                   check=True, capture_output=True, timeout=120)
    try:
        yield ref
    finally:
        subprocess.run(["docker", "rmi", "-f", ref], capture_output=True, timeout=120, check=False)


def test_build_from_docker_engine(imported_image: str, keypair, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "app.yml"
    model.write_text(yaml.safe_dump({"apiVersion": "offline.delivery/v1", "kind": "Application", "name": "engine",
                                     "version": "1.0.0", "components": {"tiny": {"image": imported_image}}}))
    code = main(["build", str(model), "-o", str(tmp_path / "out"), "--images-from", "docker",
                 "--platform", "linux/amd64", "--sign-key", str(keypair[0]), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    bundle = json.loads(out)["path"]
    code = main(["verify", bundle, "--pub", str(keypair[1])])
    assert code == 0, capsys.readouterr()

    head = bundle_format.read_head(bundle)
    image = head.manifest["images"]["tiny"]
    assert image["reference"] == imported_image
    manifest = json.loads(bundle_format.read_blob(bundle, image["manifests"]["linux/amd64"]))
    engine_id = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", imported_image], check=True,
                               capture_output=True, text=True, timeout=60).stdout.strip()
    assert manifest["config"]["digest"] == engine_id  # the config blob is the engine's, byte for byte
    config = json.loads(bundle_format.read_blob(bundle, engine_id))
    assert config["architecture"] == "amd64" and config["config"]["Cmd"] == ["/hello"]
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    assert layer["digest"] == config["rootfs"]["diff_ids"][0]
    data = bundle_format.read_blob(bundle, layer["digest"], limit=64 * 1024 * 1024)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.extractfile("hello.txt").read() == b"hello from the engine\n"  # type: ignore[union-attr]


def test_docker_source_reports_missing_platform_and_image(imported_image: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "app.yml"
    model.write_text(yaml.safe_dump({"apiVersion": "offline.delivery/v1", "kind": "Application", "name": "engine",
                                     "version": "1.0.0", "components": {
                                         "tiny": {"image": imported_image},
                                         "gone": {"image": f"{PREFIX}/absent:{uuid.uuid4().hex[:8]}"}}}))
    code = main(["build", str(model), "-o", str(tmp_path / "out"), "--images-from", "docker",
                 "--platform", "linux/amd64,linux/arm64", "--unsigned"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"image {imported_image} has no linux/arm64 variant; platforms found: linux/amd64 (in docker)" in err
    assert "absent" in err and "not found in any source (tried: docker)" in err


def test_engine_archive_and_helper_agree(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A helper-written docker-save archive loads into the engine, and building from the engine, from the
    engine's own ``docker save`` and from the helper's archive gives the same image digests."""
    from tests.helpers.images import TestImage, write_docker_archive

    reason = _docker_ok()
    if reason:
        pytest.skip(f"needs a running Docker engine ({reason})")
    tag = uuid.uuid4().hex[:10]
    image = TestImage(f"{PREFIX}/loaded:{tag}", "amd64",
                      [rootfs_layer({"a.txt": b"base\n"}), rootfs_layer({"b.txt": b"top\n"})])
    helper_archive = write_docker_archive(tmp_path / "helper.tar", [image])
    engine_archive = tmp_path / "engine.tar"
    try:
        subprocess.run(["docker", "load", "-i", str(helper_archive)], check=True, capture_output=True, timeout=120)
        subprocess.run(["docker", "save", "-o", str(engine_archive), image.ref], check=True, capture_output=True,
                       timeout=120)
        model = tmp_path / "app.yml"
        model.write_text(yaml.safe_dump({"apiVersion": "offline.delivery/v1", "kind": "Application",
                                         "name": "agree", "version": "1.0.0",
                                         "components": {"x": {"image": image.ref}}}))
        digests = {}
        for name, source in (("engine", "docker"), ("engine-save", f"archive:{engine_archive}"),
                             ("helper", f"archive:{helper_archive}")):
            code = main(["build", str(model), "-o", str(tmp_path / name), "--images-from", source, "--unsigned",
                         "--json"])
            out, err = capsys.readouterr()
            assert code == 0, err
            digests[name] = bundle_format.read_head(json.loads(out)["path"]).manifest["images"]["x"]
        assert digests["engine"] == digests["engine-save"] == digests["helper"]
    finally:
        subprocess.run(["docker", "rmi", "-f", image.ref], capture_output=True, timeout=120, check=False)


def _inspect(ref: str, template: str) -> str:
    return subprocess.run(["docker", "image", "inspect", "-f", template, ref], check=True, capture_output=True,
                          text=True, timeout=60).stdout.strip()


@pytest.fixture
def image_family(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A base imported from a small rootfs tar and three images built FROM it (legacy builder, no network),
    each adding one layer: four images, all holding the base layer. Tagged under a prefix of their own and
    removed (exactly those tags) at the end."""
    reason = _docker_ok()
    if reason:
        pytest.skip(f"needs a running Docker engine ({reason})")
    prefix = f"od-test-multi-{uuid.uuid4().hex[:10]}"
    base = f"{prefix}/base:1"
    refs = [base]
    rootfs = tmp_path / "base-rootfs.tar"
    rootfs.write_bytes(rootfs_layer({"etc/base.txt": b"the shared base\n", "bin/app": b"#!app\n"}))
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    try:
        subprocess.run(["docker", "import", "--change", "CMD [\"/bin/app\"]", str(rootfs), base],
                       check=True, capture_output=True, timeout=120)
        for name in ("alpha", "beta", "gamma"):
            context = tmp_path / f"context-{name}"
            context.mkdir()
            (context / f"{name}.txt").write_bytes(f"I am {name}\n".encode())
            (context / "Dockerfile").write_text(f"FROM {base}\nCOPY {name}.txt /app/{name}.txt\n")
            ref = f"{prefix}/{name}:1"
            refs.append(ref)
            subprocess.run(["docker", "build", "--network", "none", "--force-rm", "-t", ref, str(context)],
                           check=True, capture_output=True, timeout=300, env=env)
        yield refs
    finally:
        subprocess.run(["docker", "rmi", "-f", *refs], capture_output=True, timeout=120, check=False)


def test_build_saves_several_engine_images_into_one_bundle(  # type: ignore[no-untyped-def]
        image_family: list[str], keypair, tmp_path: Path, capsys) -> None:
    """Four engine images, one base layer among them all: the bundle holds every image's config and layers
    as the engine has them, the base layer once, and verifies."""
    names = ["base", "alpha", "beta", "gamma"]
    model = tmp_path / "app.yml"
    model.write_text(yaml.safe_dump({"apiVersion": "offline.delivery/v1", "kind": "Application", "name": "family",
                                     "version": "1.0.0",
                                     "components": {n: {"image": ref} for n, ref in zip(names, image_family)}}))
    code = main(["build", str(model), "-o", str(tmp_path / "out"), "--images-from", "docker",
                 "--platform", "linux/amd64", "--sign-key", str(keypair[0]), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    bundle = json.loads(out)["path"]
    assert main(["verify", bundle, "--pub", str(keypair[1])]) == 0, capsys.readouterr()

    head = bundle_format.read_head(bundle)
    blobs = head.manifest["blobs"]
    by_digest = {b["digest"]: b for b in blobs}
    assert len(by_digest) == len(blobs), "every blob listed once"
    base_layer = json.loads(_inspect(image_family[0], "{{json .RootFS.Layers}}"))[0]
    for name, ref in zip(names, image_family):
        image = head.manifest["images"][name]
        assert image["reference"] == ref
        manifest = json.loads(bundle_format.read_blob(bundle, image["manifests"]["linux/amd64"]))
        engine_id = _inspect(ref, "{{.Id}}")
        engine_layers = json.loads(_inspect(ref, "{{json .RootFS.Layers}}"))
        assert manifest["config"]["digest"] == engine_id  # the engine's config, byte for byte
        config = json.loads(bundle_format.read_blob(bundle, engine_id))
        assert config["rootfs"]["diff_ids"] == engine_layers
        assert [layer["digest"] for layer in manifest["layers"]] == engine_layers
        assert engine_layers[0] == base_layer and len(engine_layers) == (1 if name == "base" else 2)
        for digest in (engine_id, *engine_layers):
            assert by_digest[digest]["bundled"], digest
        if name != "base":
            top = bundle_format.read_blob(bundle, engine_layers[1], limit=64 * 1024 * 1024)
            with tarfile.open(fileobj=io.BytesIO(top)) as tar:
                assert tar.extractfile(f"app/{name}.txt").read() == f"I am {name}\n".encode()  # type: ignore[union-attr]
    assert len(by_digest[base_layer]["usedBy"]) == 4, by_digest[base_layer]
    with tarfile.open(bundle) as tar:  # the bundle file itself: the shared layer is one member
        members = tar.getnames()
    assert members.count(bundle_format.member_name(by_digest[base_layer])) == 1   # as it travels (.zst or not)
    assert len(members) == len(set(members))


def test_engine_export_spools_a_shared_layer_once(image_family: list[str], tmp_path: Path) -> None:
    """The engine source exports each image through the SDK's public one-image call and merges the exports:
    the three images built FROM the base share its layer under one name, so the spooled archive has it once."""
    derived = image_family[1:]
    base_layer = json.loads(_inspect(image_family[0], "{{json .RootFS.Layers}}"))[0]
    amd64 = Platform.parse("linux/amd64")
    source = DockerEngineSource(spool_dir=str(tmp_path))
    try:
        got = resolve(derived, [amd64], [source])
        for ref in derived:
            assert got[(ref, amd64)].config.digest == _inspect(ref, "{{.Id}}")
        (spooled,) = Path(source._spool or "").iterdir()  # pylint: disable=protected-access
        copies = 0
        with tarfile.open(spooled) as tar:
            names = tar.getnames()
            for member in tar:
                if member.isfile() and member.size > 512:
                    copies += bundle_format.sha256_digest(tar.extractfile(member).read()) == base_layer  # type: ignore[union-attr]
            manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        assert copies == 1, "the shared base layer is spooled once"
        assert len(names) == len(set(names)) and len(manifest) == 3
    finally:
        source.close()
