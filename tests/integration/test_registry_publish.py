"""registry_publish against a real registry (Debian's docker-registry, Distribution 2.8) started here on
127.0.0.1, and real clients: docker pulls and runs what was published, skopeo reads the multi-platform index.

The images are made from scratch: a tiny static program per arch (hand-assembled ELF, no toolchain), a
shared base layer, built into a signed bundle by the builder and imported with ``site_repo.import_bundle``
— the same path a site takes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from bundle_builder import signing
from bundle_builder.build import build_bundle
from offline_delivery_core.bundle import ed25519
from offline_delivery_core.clients.registry import RegistryClient, RegistryError
from offline_delivery_core.site.publish import publish_releases
from offline_delivery_core.site.repo import SiteRepo, import_bundle
from tests.helpers.images import TestImage, rootfs_layer, tar_bytes, write_oci_layout

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
PLATFORMS = ["linux/amd64", "linux/arm64"]
PREFIX = "wc-registry-test"
REGISTRY_BIN = shutil.which("docker-registry")

APP = """\
apiVersion: offline.delivery/v1
kind: Application
name: hello
version: {version}
components:
  hello:
    image: wc/hello:{version}
  greet:
    image: wc/greet:1.0.0
"""


def tiny_elf(arch: str, message: bytes) -> bytes:
    """A static Linux executable that writes ``message`` to stdout and exits 0."""
    if arch == "amd64":
        code = (b"\xb8\x01\x00\x00\x00"                         # mov eax, 1 (write)
                b"\xbf\x01\x00\x00\x00"                         # mov edi, 1 (stdout)
                b"\x48\x8d\x35\x10\x00\x00\x00"                 # lea rsi, [rip+16]: the message after the code
                + b"\xba" + struct.pack("<I", len(message))     # mov edx, len
                + b"\x0f\x05"                                   # syscall
                b"\xb8\x3c\x00\x00\x00"                         # mov eax, 60 (exit)
                b"\x31\xff"                                     # xor edi, edi
                b"\x0f\x05")                                    # syscall
        machine = 0x3E
    else:
        words = [0xD2800020,                                    # mov x0, #1
                 0x100000E1,                                    # adr x1, .+28: the message after the code
                 0xD2800002 | (len(message) << 5),              # mov x2, #len
                 0xD2800808,                                    # mov x8, #64 (write)
                 0xD4000001,                                    # svc #0
                 0xD2800000,                                    # mov x0, #0
                 0xD2800BA8,                                    # mov x8, #93 (exit)
                 0xD4000001]                                    # svc #0
        code = b"".join(struct.pack("<I", w) for w in words)
        machine = 0xB7
    base, headers = 0x400000, 64 + 56
    body = code + message
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7, 2, machine, 1,
                       base + headers, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, headers + len(body), headers + len(body), 0x1000)
    return ehdr + phdr + body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Distribution registry on 127.0.0.1:<free port>, storage in tmp, no auth; stopped by PID."""
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    d = tmp_path_factory.mktemp("registry")
    port = _free_port()
    config = d / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {d}/storage\n"
                      f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n")
    log = open(d / "registry.log", "wb")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"registry did not start: {(d / 'registry.log').read_text()}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Releases 1.0.0 and 1.1.0 of a two-component app for amd64+arm64. Both components share one base
    layer per arch; 1.1.0 changes only wc/hello (new tag, new program layer)."""
    d = tmp_path_factory.mktemp("vendor")
    key, pub = signing.keygen(d / "vendor")
    images = []
    for arch in ("amd64", "arm64"):
        base = rootfs_layer({"etc/motd": b"wc registry test\n"}, arch=arch, size=300_000)
        for ref, text in (("wc/hello:1.0.0", "hello 1.0.0"), ("wc/hello:1.1.0", "hello 1.1.0"),
                          ("wc/greet:1.0.0", "greetings")):
            program = tar_bytes({"hello": tiny_elf(arch, f"{text} from {arch}\n".encode())}, mode=0o755)
            images.append(TestImage(ref, arch, [base, program], cmd=["/hello"]).for_arch(arch))
    layout = write_oci_layout(d / "oci", images)
    bundles = {}
    for version in ("1.0.0", "1.1.0"):
        (d / f"app-{version}.yml").write_text(APP.format(version=version))
        out = d / f"out-{version}"
        out.mkdir()
        bundles[version] = Path(build_bundle(d / f"app-{version}.yml", out, image_sources=[f"oci:{layout}"],
                                             platforms=PLATFORMS, sign_key=key).path)
    return {"dir": d, "pub": ed25519.load_public_key_pem(pub.read_text()), "bundles": bundles}


def _import(root: Path, vendor: dict, *versions: str) -> SiteRepo:
    repo = SiteRepo(str(root))
    for version in versions:
        import_bundle(repo, str(vendor["bundles"][version]), [vendor["pub"]])
    return repo


def _release_manifest(repo: SiteRepo, version: str) -> dict:
    return json.loads((Path(repo.root) / "releases" / "hello" / version / "manifest.json").read_text())


@pytest.fixture(scope="module")
def collections_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("collections")
    (root / "ansible_collections" / "offline").mkdir(parents=True)
    (root / "ansible_collections" / "offline" / "delivery").symlink_to(REPO_ROOT)
    return root


def run_module(collections: Path, args: dict, *extra: str) -> tuple[int, dict]:
    """``offline.delivery.registry_publish`` on localhost through the ansible command; rc and result."""
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(collections), ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="false", ANSIBLE_PYTHON_INTERPRETER=sys.executable,
               ANSIBLE_LOAD_CALLBACK_PLUGINS="1")
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible"), "localhost", "-i", "localhost,", "-c",
                           "local", "-o", "-m", "offline.delivery.registry_publish", "-a", json.dumps(args),
                           *extra], env=env, capture_output=True, text=True, timeout=300, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("localhost | ")), None)
    if line is None or "=> " not in line:
        raise AssertionError(f"no result from ansible (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.returncode, json.loads(line.split("=> ", 1)[1])


def _run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _catalog(registry: str) -> list[str]:
    with urllib.request.urlopen(f"http://{registry}/v2/_catalog", timeout=10) as resp:
        return json.loads(resp.read())["repositories"]


@pytest.fixture(scope="module")
def published(registry: str, vendor: dict, collections_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Release 1.0.0 imported and published through the module, check mode first."""
    repo = _import(tmp_path_factory.mktemp("site") / "repo", vendor, "1.0.0")
    args = {"repo_root": repo.root, "registry": registry}
    rc, check = run_module(collections_path, args, "--check")
    assert rc == 0 and check["changed"], check
    check_catalog = _catalog(registry)
    rc, first = run_module(collections_path, args)
    assert rc == 0, first
    return {"repo": repo, "args": args, "check": check, "check_catalog": check_catalog, "first": first}


def test_check_mode_reports_and_pushes_nothing(published):
    assert published["check_catalog"] == []
    images = {i["component"]: i for i in published["check"]["images"]}
    assert set(images) == {"hello", "greet"} and all(i["changed"] for i in images.values())
    assert "would push" in published["check"]["msg"]
    # what check mode promised is what the real run did
    first = {i["component"]: i for i in published["first"]["images"]}
    for comp, img in images.items():
        for key in ("blobs_pushed", "blobs_mounted", "manifests_pushed", "bytes_pushed"):
            assert img[key] == first[comp][key], (comp, key)


def test_publish_pushes_blobs_manifests_and_index_by_tag(published, registry):
    repo = published["repo"]
    manifest = _release_manifest(repo, "1.0.0")
    res = published["first"]
    assert res["changed"] and sorted(_catalog(registry)) == ["wc/greet", "wc/hello"]
    images = {i["component"]: i for i in res["images"]}
    with RegistryClient(registry) as client:
        for comp, img in images.items():
            want = manifest["images"][comp]
            assert img["index"] == want["index"] and img["index_pushed"] and img["manifests_pushed"] == 2
            assert client.manifest_digest(img["repository"], img["tag"]) == want["index"]
            for digest in want["manifests"].values():
                assert client.manifest_digest(img["repository"], digest) == digest
    # greet (first in order) uploads the base layers; hello mounts them from wc/greet instead
    assert images["greet"]["blobs_pushed"] == 6 and images["greet"]["blobs_mounted"] == 0
    assert images["hello"]["blobs_mounted"] == 2 and images["hello"]["blobs_pushed"] == 4
    # every config and layer of the release went up exactly once (mounts move no bytes)
    content = [b for b in manifest["blobs"] if "config" in b["mediaType"] or ".layer." in b["mediaType"]]
    assert res["bytes_pushed"] == sum(i["bytes_pushed"] for i in images.values()) == sum(b["size"] for b in content)
    assert res["bytes_pushed"] > 600_000


def test_second_publish_changes_nothing(published, collections_path):
    rc, again = run_module(collections_path, published["args"])
    assert rc == 0 and not again["changed"], again
    assert all(not i["changed"] and not i["pushed"] and "already" in i["msg"] for i in again["images"])
    assert again["bytes_pushed"] == 0


def test_skopeo_sees_the_multi_platform_index_byte_for_byte(published, registry):
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    want = _release_manifest(published["repo"], "1.0.0")["images"]["hello"]
    proc = _run("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry}/wc/hello:1.0.0")
    assert proc.returncode == 0, proc.stderr
    raw = proc.stdout.encode()
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == want["index"]
    index = json.loads(raw)
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    platforms = {(m["platform"]["os"], m["platform"]["architecture"]): m["digest"] for m in index["manifests"]}
    assert platforms == {("linux", "amd64"): want["manifests"]["linux/amd64"],
                         ("linux", "arm64"): want["manifests"]["linux/arm64"]}


@pytest.fixture
def docker_images(registry: str) -> Iterator[list[str]]:
    """Image references this test pulls; removed from the engine afterwards."""
    if shutil.which("docker") is None or _run("docker", "info").returncode != 0:
        pytest.skip("no Docker engine")
    refs: list[str] = []
    yield refs
    for ref in refs:
        _run("docker", "rmi", "-f", ref)


def test_docker_pulls_and_runs_the_published_image(published, registry, docker_images):
    ref = f"{registry}/wc/hello:1.0.0"
    docker_images.append(ref)
    pull = _run("docker", "pull", ref, timeout=300)
    assert pull.returncode == 0, pull.stderr
    want = _release_manifest(published["repo"], "1.0.0")["images"]["hello"]["index"]
    assert f"Digest: {want}" in pull.stdout
    run = _run("docker", "run", "--rm", "--name", f"{PREFIX}-amd64", "--platform", "linux/amd64", ref)
    assert run.returncode == 0 and run.stdout == "hello 1.0.0 from amd64\n", run.stderr


def test_docker_runs_the_arm64_image_under_emulation(published, registry, docker_images):
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        pytest.skip("no qemu-aarch64 binfmt handler: arm64 programs cannot run on this host")
    ref = f"{registry}/wc/greet:1.0.0"
    docker_images.append(ref)
    pull = _run("docker", "pull", "--platform", "linux/arm64", ref, timeout=300)
    assert pull.returncode == 0, pull.stderr
    run = _run("docker", "run", "--rm", "--name", f"{PREFIX}-arm64", "--platform", "linux/arm64", ref)
    assert run.returncode == 0 and run.stdout == "greetings from arm64\n", run.stderr


def test_blob_missing_from_the_repo_is_named_and_nothing_is_pushed(registry, vendor, collections_path, tmp_path):
    repo = _import(tmp_path / "repo", vendor, "1.0.0", "1.1.0")
    new = _release_manifest(repo, "1.1.0")
    layer = next(b for b in new["blobs"] if "hello@linux/arm64" in b["usedBy"] and
                 b["mediaType"].startswith("application/vnd.oci.image.layer") and
                 b["digest"] not in {x["digest"] for x in _release_manifest(repo, "1.0.0")["blobs"]})
    os.unlink(repo.blob_file(layer["digest"]))
    # runs before 1.1.0 is published (file order): a partial push would show
    with RegistryClient(registry) as client:
        assert client.manifest_digest("wc/hello", "1.1.0") is None
        rc, res = run_module(collections_path, {"repo_root": repo.root, "registry": registry,
                                                "releases": ["hello:1.1.0"]})
        assert rc != 0 and layer["digest"] in res["msg"] and "is missing in the site repository" in res["msg"]
        assert "import the release again" in res["msg"] and "component hello" in res["msg"]
        assert client.manifest_digest("wc/hello", "1.1.0") is None
        new_config = [b["digest"] for b in new["blobs"] if b["usedBy"] == ["hello@linux/amd64"]
                      and "config" in b["mediaType"]]
        assert new_config and not client.blob_exists("wc/hello", new_config[0])


def test_next_release_pushes_only_what_is_new(published, registry, vendor, tmp_path):
    repo = _import(tmp_path / "repo", vendor, "1.0.0", "1.1.0")
    old = _release_manifest(repo, "1.0.0")
    new = _release_manifest(repo, "1.1.0")
    new_blobs = {b["digest"] for b in new["blobs"]} - {b["digest"] for b in old["blobs"]}
    with RegistryClient(registry) as client:
        results = publish_releases(repo, client, [("hello", "1.1.0")])
        by_comp = {r.component: r for r in results}
        assert not by_comp["greet"].changed  # wc/greet:1.0.0 is the same image as in 1.0.0
        hello = by_comp["hello"]
        assert hello.changed and hello.tag == "1.1.0"
        pushed = {p.split()[1] for p in hello.pushed if p.startswith("blob ")}
        # the two new program layers and configs; the base layers were in wc/hello already
        assert pushed and pushed <= new_blobs and hello.blobs_present == 2
        assert client.manifest_digest("wc/hello", "1.1.0") == new["images"]["hello"]["index"]
        assert client.manifest_digest("wc/hello", "1.0.0") == old["images"]["hello"]["index"]
        # default selection = every release in the catalog, all published now
        assert not any(r.changed for r in publish_releases(repo, client, None))


def test_unknown_release_and_unreachable_registry_are_clear_errors(vendor, collections_path, tmp_path):
    repo = _import(tmp_path / "repo", vendor, "1.0.0")
    rc, res = run_module(collections_path, {"repo_root": repo.root, "registry": "127.0.0.1:1",
                                            "releases": ["hello:9.9.9"]})
    assert rc != 0 and "hello:9.9.9 is not in the catalog" in res["msg"] and "hello:1.0.0" in res["msg"]
    port = _free_port()  # nothing listens there
    rc, res = run_module(collections_path, {"repo_root": repo.root, "registry": f"127.0.0.1:{port}",
                                            "timeout": 5})
    assert rc != 0 and f"127.0.0.1:{port}" in res["msg"] and "is the registry running" in res["msg"]
    with pytest.raises(RegistryError, match="without a scheme"):
        RegistryClient("http://127.0.0.1:5000")


def test_gzip_layers_from_an_oci_layout_are_pushed_as_they_are(registry, docker_images, tmp_path):
    """Layers an OCI layout had compressed stay compressed (same digests) and still pull and run."""
    key, pub = signing.keygen(tmp_path / "vendor")
    images = [TestImage("wc/gz:1.0.0", arch, [tar_bytes({"hello": tiny_elf(arch, f"gz {arch}\n".encode())},
                                                        mode=0o755)], cmd=["/hello"]).for_arch(arch)
              for arch in ("amd64", "arm64")]
    layout = write_oci_layout(tmp_path / "oci", images, gzip_layers=True)
    (tmp_path / "app.yml").write_text("apiVersion: offline.delivery/v1\nkind: Application\nname: gz\n"
                                      "version: 1.0.0\ncomponents:\n  gz:\n    image: wc/gz:1.0.0\n")
    (tmp_path / "out").mkdir()
    bundle = build_bundle(tmp_path / "app.yml", tmp_path / "out", image_sources=[f"oci:{layout}"],
                          platforms=PLATFORMS, sign_key=key).path
    repo = SiteRepo(str(tmp_path / "repo"))
    import_bundle(repo, str(bundle), [ed25519.load_public_key_pem(pub.read_text())])
    manifest = json.loads((Path(repo.root) / "releases/gz/1.0.0/manifest.json").read_text())
    assert any(b["mediaType"].endswith("tar+gzip") for b in manifest["blobs"])
    with RegistryClient(registry) as client:
        (res,) = publish_releases(repo, client, [("gz", "1.0.0")])
    assert res.changed and res.blobs_pushed == 4
    ref = f"{registry}/wc/gz:1.0.0"
    docker_images.append(ref)
    pull = _run("docker", "pull", ref, timeout=300)
    assert pull.returncode == 0 and f"Digest: {manifest['images']['gz']['index']}" in pull.stdout, pull.stderr
    run = _run("docker", "run", "--rm", "--name", f"{PREFIX}-gz", ref)
    assert run.returncode == 0 and run.stdout == "gz amd64\n", run.stderr
