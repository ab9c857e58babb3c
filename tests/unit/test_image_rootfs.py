"""targets/rootfs: images from a (tiny, in-process) OCI registry unpacked into the host's layer store and
mounted as read-only overlays, as the systemd target's mount units do.

The registry serves manifests and blobs over plain HTTP as Distribution does; tests build layers with
tarfile, including whiteouts, opaque directories, hardlinks, merged-usr symlinks and hostile members. The
merged view is checked through a real overlayfs mount: whiteouts (0/0 devices), trusted xattrs and mounts need
root, as the product does on a host (the test command runs as root)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import stat
import tarfile
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from offline_delivery_core.targets.rootfs import (ImageError, LayerStore, Rootfs, ensure_rootfs, load_rootfs,
                                                  make_mount_points, overlay_options, read_in_root, resolve_in_root,
                                                  unpack_layer)
from offline_delivery_core.clients.registry import RegistryClient, RegistryError
from offline_delivery_core.common.zstd import ZstdWriter

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR = "application/vnd.oci.image.layer.v1.tar"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not ROOT, reason="whiteouts, trusted xattrs and overlay mounts need root")
Entry = Tuple[str, str, object]   # (type, name, data): file bytes / link target / dir mode


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(*entries: Entry, uid: int = 0) -> bytes:
    """A layer tar. Types: dir, file, exec (0755 file), suid, symlink, hardlink, fifo, chr."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, data in entries:
            info = tarfile.TarInfo(name)
            info.uid = info.gid = uid
            info.mtime = 1_700_000_000
            payload = None
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, int(data or 0o755)  # type: ignore[call-overload]
            elif kind in ("file", "exec", "suid"):
                payload = data if isinstance(data, bytes) else str(data).encode()
                info.size = len(payload)
                info.mode = {"file": 0o644, "exec": 0o755, "suid": 0o4755}[kind]
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, str(data)
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return out.getvalue()


class Registry:
    """Blobs and manifests by digest, served at /v2/<repo>/...; ``tamper`` serves other bytes for a digest."""

    def __init__(self) -> None:
        self.blobs: Dict[str, bytes] = {}
        self.tamper: Dict[str, bytes] = {}
        self.requests: List[str] = []

    def add(self, data: bytes) -> str:
        digest = sha(data)
        self.blobs[digest] = data
        return digest

    def image(self, layers: List[Tuple[bytes, str]], config: Optional[dict] = None,
              diff_ids: Optional[List[str]] = None) -> str:
        """Store an image (layer bytes as stored, media type); returns the manifest digest."""
        plain = [gzip.decompress(data) if media == TAR_GZIP else data for data, media in layers]
        cfg = {"architecture": "amd64", "os": "linux",
               "config": config if config is not None else {"Entrypoint": ["/bin/app"], "Env": ["PATH=/bin"]},
               "rootfs": {"type": "layers", "diff_ids": diff_ids or [sha(p) for p in plain]}}
        cfg_bytes = json.dumps(cfg).encode()
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": self.add(cfg_bytes), "size": len(cfg_bytes)},
                    "layers": [{"mediaType": media, "digest": self.add(data), "size": len(data)}
                               for data, media in layers]}
        return self.add(json.dumps(manifest).encode())


@pytest.fixture()
def registry() -> Iterator[Tuple[Registry, str]]:
    reg = Registry()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            reg.requests.append(self.path)
            digest = self.path.rsplit("/", 1)[-1]
            if self.path.startswith("/v2/shop/redirected/blobs/"):   # a storage middleware's redirect
                self.send_response(307)
                self.send_header("Location", f"/storage/{digest}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path.startswith("/storage/"):
                self.path = "/v2/shop/app/blobs/" + digest
            data = reg.tamper.get(digest, reg.blobs.get(digest))
            if not self.path.startswith("/v2/shop/app/") or data is None:
                self.send_response(404)
                body = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}'
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200)
            self.send_header("Content-Type", OCI_MANIFEST if "/manifests/" in self.path else "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield reg, f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def unpack(registry: Tuple[Registry, str], apps: Path, manifest: str) -> Rootfs:
    _reg, address = registry
    with RegistryClient(address, timeout=10) as client:
        return ensure_rootfs(client, "shop/app", manifest, str(apps / "shop" / "images"), LayerStore(str(apps)))


@contextmanager
def mounted(lowerdirs: List[str], at: Path) -> Iterator[Path]:
    """Directories as a read-only overlay, as the systemd target's mount units mount a root (an empty bottom
    layer: overlayfs wants two lower directories)."""
    (at / "root").mkdir(parents=True)
    (at / "empty").mkdir()
    subprocess.run(["env", "LIBMOUNT_FORCE_MOUNT2=always", "mount", "-t", "overlay", "overlay", "-o",
                    overlay_options([*lowerdirs, str(at / "empty")]), str(at / "root")], check=True)
    try:
        yield at / "root"
    finally:
        subprocess.run(["umount", str(at / "root")], check=True)


BASE = layer(
    ("dir", "usr", 0o755), ("dir", "usr/lib", 0o755), ("dir", "usr/bin", 0o755),
    ("symlink", "lib", "usr/lib"), ("symlink", "bin", "/usr/bin"),
    ("exec", "usr/bin/app", b"#!/bin/sh\n"), ("suid", "usr/bin/su", b"su"),
    ("hardlink", "usr/bin/app2", "usr/bin/app"),
    ("dir", "etc", 0o751), ("file", "etc/passwd", b"root:x:0:0::/root:/bin/sh\napp:x:101:102::/:/bin/false\n"),
    ("symlink", "etc/resolv.conf", "../run/systemd/resolve/stub-resolv.conf"),
    ("dir", "var", 0o755), ("dir", "var/cache", 0o755), ("file", "var/cache/a", b"a"), ("file", "var/cache/b", b"b"),
    ("dir", "data", 0o700), ("file", "data/old", b"old"), ("dir", "data/sub", 0o755),
    ("fifo", "run-fifo", None), ("chr", "dev-null", None),
)
TOP = layer(
    ("file", "var/cache/.wh.a", b""),                  # delete a lower file
    ("dir", "data", 0o700), ("file", "data/.wh.old", b""), ("file", "data/.wh..wh..opq", b""),
    ("file", "data/new", b"new"),                     # opaque dir (its redundant whiteout dropped)
    ("file", "usr/lib/libx.so", b"elf"),              # a file beside a lower layer's
    ("file", ".wh.run-fifo", b""),
)
CONFIG = {"Entrypoint": ["/usr/bin/app"], "Cmd": ["--serve"], "Env": ["PATH=/usr/bin"], "WorkingDir": "/data",
          "User": "app", "StopSignal": "SIGQUIT"}


def test_layers_stored_once_and_mounted_read_only_with_whiteouts_links_and_modes(registry, tmp_path):
    reg, _ = registry
    manifest = reg.image([(BASE, TAR), (gzip.compress(TOP), TAR_GZIP)], config=CONFIG)
    rootfs = unpack(registry, tmp_path, manifest)
    image = tmp_path / "shop/images" / manifest.split(":")[1]
    assert rootfs.created and rootfs.directory == str(image)
    assert rootfs.lowerdirs == [str(tmp_path / ".layers" / sha(TOP)[7:]), str(tmp_path / ".layers" / sha(BASE)[7:])]
    top = tmp_path / ".layers" / sha(TOP)[7:]
    assert os.getxattr(top / "data", "trusted.overlay.opaque") == b"y"
    assert os.stat(top / "var/cache/a", follow_symlinks=False).st_rdev == 0 and not (top / "data/old").exists()
    with mounted(rootfs.lowerdirs, tmp_path / "view") as root:
        assert not (root / "var/cache/a").exists() and (root / "var/cache/b").read_bytes() == b"b"
        assert sorted(os.listdir(root / "data")) == ["new"]           # opaque: lower entries gone, own kept
        assert (root / "usr/lib/libx.so").read_bytes() == b"elf" and os.readlink(root / "lib") == "usr/lib"
        assert os.readlink(root / "bin") == "/usr/bin"
        assert os.stat(root / "usr/bin/app").st_ino == os.stat(root / "usr/bin/app2").st_ino
        assert stat.S_IMODE(os.stat(root / "usr/bin/su").st_mode) == 0o4755
        assert stat.S_IMODE(os.stat(root / "data").st_mode) == 0o700
        assert os.stat(root / "usr/bin/app").st_mtime == 1_700_000_000
        assert not (root / "run-fifo").exists() and not (root / "dev-null").exists()
        assert read_in_root(str(root), "/etc/passwd").startswith(b"root:")
        with pytest.raises(OSError, match="Read-only file system"):
            (root / "var/cache/b").write_text("changed")
    assert any("dev-null" in note and "skipped" in note for note in rootfs.notes)
    meta = json.loads((image / "image.json").read_text())
    assert meta["config"] == CONFIG and meta["layers"] == [sha(BASE), sha(TOP)]
    # content-addressed: a second call finds the image and fetches nothing
    reg.requests.clear()
    again = unpack(registry, tmp_path, manifest)
    assert not again.created and again.lowerdirs == rootfs.lowerdirs and reg.requests == []


def test_a_component_root_gets_the_mount_points_the_image_lacks(registry, tmp_path):
    """The component's top layer: API mount points, regular files for the bind-mounted /etc/hosts and
    /etc/resolv.conf (the image's resolv.conf symlink hidden), and the volume and config paths the image lacks,
    resolved as the service sees them (/lib -> usr/lib), their directories with the image's owners and modes."""
    reg, _ = registry
    rootfs = unpack(registry, tmp_path, reg.image([(BASE, TAR), (TOP, TAR)]))
    mounts = tmp_path / "mounts"
    with mounted(rootfs.lowerdirs, tmp_path / "view") as view:
        entries = make_mount_points(str(mounts), str(view), dirs=["/var/cache", "/lib/new/vol", "/opt/x"],
                                    files=["/etc/passwd", "/etc/app/app.conf"])
    assert "d /usr/lib 755 0 0" in entries and "d /usr/lib/new/vol 755 0 0" in entries    # through lib -> usr/lib
    assert "f /etc/app/app.conf" in entries and "f /etc/hosts" in entries and "d /opt/x 755 0 0" in entries
    assert not (mounts / "var/cache").exists() and not (mounts / "etc/passwd").exists()   # the image has them
    with mounted([str(mounts), *rootfs.lowerdirs], tmp_path / "component") as root:
        for name in ("etc/hosts", "etc/resolv.conf", "etc/app/app.conf"):
            assert (root / name).is_file() and not (root / name).is_symlink()
        for name in ("proc", "sys", "dev", "run", "tmp", "usr/lib/new/vol", "opt/x"):
            assert (root / name).is_dir()
        assert stat.S_IMODE(os.stat(root / "tmp").st_mode) == 0o1777
        assert stat.S_IMODE(os.stat(root / "etc").st_mode) == 0o751        # the image's etc, as it was
        assert (root / "usr/lib/libx.so").read_bytes() == b"elf" and (root / "etc/passwd").read_bytes()
        assert sorted(os.listdir(root / "data")) == ["new"]


def test_an_image_sharing_layers_fetches_and_unpacks_only_its_own(registry, tmp_path):
    reg, _ = registry
    first = reg.image([(BASE, TAR), (TOP, TAR)])
    unpack(registry, tmp_path, first)
    other = layer(("file", "usr/bin/other", b"other"))
    second = reg.image([(BASE, TAR), (TOP, TAR), (other, TAR)])
    reg.requests.clear()
    rootfs = unpack(registry, tmp_path, second)
    blobs = [r for r in reg.requests if "/blobs/" in r]
    assert len(blobs) == 2 and blobs[-1].endswith(sha(other))    # the config, then the one new layer
    assert sorted(os.listdir(tmp_path / ".layers")) == sorted([".lock", sha(BASE)[7:], sha(TOP)[7:], sha(other)[7:]])
    with mounted(rootfs.lowerdirs, tmp_path / "view") as root:
        assert (root / "usr/bin/other").read_bytes() == b"other" and (root / "usr/bin/app").exists()


def test_ownership_kept(registry, tmp_path):
    reg, _ = registry
    manifest = reg.image([(layer(("dir", "srv", 0o750), ("file", "srv/x", b"x"), ("symlink", "srv/l", "x"),
                                 uid=4321), TAR)])
    with mounted(unpack(registry, tmp_path, manifest).lowerdirs, tmp_path / "view") as root:
        for name in ("srv", "srv/x", "srv/l"):
            st = os.lstat(root / name)
            assert (st.st_uid, st.st_gid) == (4321, 4321), name


def test_zstd_layer_read_through_libzstd(registry, tmp_path):
    """zstd layers need no command on the host: libzstd (common/zstd.py); a damaged one is refused."""
    reg, _ = registry
    plain = layer(("file", "hello", b"zstd"))
    out = io.BytesIO()
    with ZstdWriter(out, level=3) as writer:
        writer.write(plain)
    manifest = reg.image([(out.getvalue(), TAR_ZSTD)], diff_ids=[sha(plain)])
    with mounted(unpack(registry, tmp_path, manifest).lowerdirs, tmp_path / "view") as root:
        assert (root / "hello").read_bytes() == b"zstd"
    cut = reg.image([(out.getvalue()[:-8], TAR_ZSTD)], diff_ids=[sha(plain + b"x")])
    with pytest.raises(ImageError, match="truncated|not a valid tar stream|the image config says"):
        unpack(registry, tmp_path / "other", cut)


def _no_leftovers(apps: Path) -> None:
    """No image directory, and no partial layer or blob in the store (complete, verified layers may stay)."""
    images = apps / "shop/images"
    assert not images.exists() or os.listdir(images) == [], os.listdir(images)
    store = apps / ".layers"
    assert not store.exists() or not [n for n in os.listdir(store) if n.startswith(".partial")]


def test_layer_digest_mismatch_refused_and_nothing_left(registry, tmp_path):
    reg, _ = registry
    bad = layer(("file", "x", b"1"))
    manifest = reg.image([(BASE, TAR), (bad, TAR)])
    reg.tamper[sha(bad)] = layer(("file", "x", b"2"))       # same size, other bytes
    with pytest.raises(ImageError, match=r"do not match the\s+digest"):
        unpack(registry, tmp_path, manifest)
    _no_leftovers(tmp_path)
    assert not (tmp_path / ".layers" / sha(bad)[7:]).exists()
    assert load_rootfs(str(tmp_path / "shop/images"), LayerStore(str(tmp_path)), manifest) is None


def test_manifest_digest_mismatch_refused(registry, tmp_path):
    reg, _ = registry
    manifest = reg.image([(BASE, TAR)])
    reg.tamper[manifest] = reg.blobs[manifest] + b" "
    with pytest.raises(RegistryError, match="do not match the digest"):
        unpack(registry, tmp_path, manifest)
    _no_leftovers(tmp_path)


def test_diff_id_mismatch_refused(registry, tmp_path):
    reg, _ = registry
    top = layer(("file", "x", b"1"))
    manifest = reg.image([(gzip.compress(top), TAR_GZIP)], diff_ids=[sha(b"other")])
    with pytest.raises(ImageError, match="the image config says"):
        unpack(registry, tmp_path, manifest)
    _no_leftovers(tmp_path)
    assert os.listdir(tmp_path / ".layers") == [".lock"]


def test_missing_image_names_it(registry, tmp_path):
    with pytest.raises(RegistryError, match="not published in the site registry"):
        unpack(registry, tmp_path, "sha256:" + "0" * 64)


@pytest.mark.parametrize("entries, fragment", [
    ([("file", "../evil", b"x")], "escapes the root"),
    ([("dir", "a", 0o755), ("file", "a/../../evil", b"x")], "escapes the root"),
    ([("hardlink", "h", "../../etc/passwd")], "escapes the root"),
    ([("hardlink", "h", "missing")], "not an earlier file of the layer"),
    ([("dir", "d", 0o755), ("hardlink", "h", "d")], "not an earlier file of the layer"),
    ([("file", "f", b"x"), ("file", "f/g", b"y")], "is not a directory in the layer"),
    ([("symlink", "abs", "/etc"), ("file", "abs/passwd", b"x")], "is not a directory in the layer"),
    ([("symlink", "up", "../../.."), ("file", "up/y", b"x")], "is not a directory in the layer"),
    ([("symlink", "l", "/"), ("hardlink", "h", "l/etc/passwd")], "is not a directory in the layer"),
])
def test_escaping_members_refused(registry, tmp_path, entries, fragment):
    reg, _ = registry
    manifest = reg.image([(layer(*entries), TAR)])
    with pytest.raises(ImageError, match=fragment):
        unpack(registry, tmp_path, manifest)
    _no_leftovers(tmp_path)


def test_paths_in_the_view_resolve_inside_the_root(tmp_path):
    """Absolute and ../ symlinks of an image are resolved from its root when the product reads it (users,
    programs, volume seeds), never on the host; a loop is refused."""
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"tool")
    (root / "bin").symlink_to("/usr/bin")
    (root / "up").symlink_to("../../../..")
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    assert resolve_in_root(str(root), "bin") == str(root / "usr/bin")
    assert resolve_in_root(str(root), "up") == str(root)
    assert read_in_root(str(root), "/bin/tool") == b"tool"
    with pytest.raises(ImageError, match="too many symlinks"):
        resolve_in_root(str(root), "a/x")


def test_whiteout_of_a_directory_and_replacing_types(tmp_path):
    store = tmp_path / "store"
    lower, upper = store / "lower", store / "upper"
    for directory in (lower, upper):
        directory.mkdir(parents=True)
    notes: List[str] = []
    unpack_layer(io.BytesIO(layer(("dir", "d", 0o755), ("file", "d/f", b"x"), ("file", "t", b"file"),
                                  ("dir", "u", 0o755), ("file", "u/f", b"x"))), str(lower), notes)
    unpack_layer(io.BytesIO(layer(("file", ".wh.d", b""), ("symlink", "t", "d"), ("file", "u", b"now a file"))),
                 str(upper), notes)
    with mounted([str(upper), str(lower)], tmp_path / "view") as root:
        assert not (root / "d").exists() and os.readlink(root / "t") == "d"
        assert (root / "u").read_bytes() == b"now a file"


def test_store_on_overlayfs_refused_with_the_reason(registry, tmp_path):
    """A store where whiteouts cannot be made (overlayfs itself, as a container's root is) is refused."""
    reg, _ = registry
    for name in ("lower", "upper", "work", "apps"):
        (tmp_path / name).mkdir()
    subprocess.run(["env", "LIBMOUNT_FORCE_MOUNT2=always", "mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,"
                    f"workdir={tmp_path}/work", str(tmp_path / "apps")], check=True)
    try:
        with pytest.raises(ImageError, match="cannot hold overlayfs whiteouts.*ext4, xfs or btrfs"):
            unpack(registry, tmp_path / "apps", reg.image([(BASE, TAR)]))
    finally:
        subprocess.run(["umount", str(tmp_path / "apps")], check=True)


def test_prune_keeps_what_is_used_and_partials_of_live_runs(tmp_path):
    store = LayerStore(str(tmp_path))
    for name in ("a" * 64, "b" * 64, f".partial-{'c' * 64}-999999999", f".partial-{'d' * 64}-{os.getppid()}"):
        os.makedirs(os.path.join(store.root, name))
    removed = store.prune({"sha256:" + "a" * 64})
    assert sorted(os.listdir(store.root)) == [f".partial-{'d' * 64}-{os.getppid()}", "a" * 64]
    assert len(removed) == 2


def test_copy_blob_refuses_a_short_body(registry):
    reg, address = registry
    digest = reg.add(b"0123456789")
    with RegistryClient(address, timeout=10) as client:
        sink = io.BytesIO()
        with pytest.raises(RegistryError, match="do not match"):
            client.copy_blob("shop/app", digest, sink, size=11)
        sink = io.BytesIO()
        assert client.copy_blob("shop/app", digest, sink, size=10) == 10 and sink.getvalue() == b"0123456789"


def test_copy_blob_follows_a_storage_redirect(registry):
    reg, address = registry
    digest = reg.add(b"redirected bytes")
    with RegistryClient(address, timeout=10) as client:
        sink = io.BytesIO()
        assert client.copy_blob("shop/redirected", digest, sink, size=16) == 16
    assert sink.getvalue() == b"redirected bytes"
    assert reg.requests[-2:] == [f"/v2/shop/redirected/blobs/{digest}", f"/storage/{digest}"]


def test_unsupported_layer_media_type_refused(registry, tmp_path):
    reg, _ = registry
    manifest = reg.image([(layer(("file", "x", b"1")), "application/vnd.oci.image.layer.nondistributable.v1.tar")])
    with pytest.raises(ImageError, match="unsupported layer media type"):
        unpack(registry, tmp_path, manifest)
    _no_leftovers(tmp_path)
