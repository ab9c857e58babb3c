"""Build a bundle from images in the running Docker engine (``--images-from docker``)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
import yaml

from bundle_builder.cli import main
from offline_delivery_core import bundle_format
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
