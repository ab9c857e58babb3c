"""image_rootfs: images from a (tiny, in-process) OCI registry unpacked into root filesystems.

The registry serves manifests and blobs over plain HTTP as Distribution does; tests build layers with
tarfile, including whiteouts, opaque directories, hardlinks, merged-usr symlinks and hostile members.
Ownership checks need root (the product unpacks as root); they are skipped otherwise."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import stat
import tarfile
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from offline_delivery_core.targets.rootfs import (ImageError, ensure_rootfs, load_rootfs, read_in_root,
                                                resolve_in_root, unpack_layer)
from offline_delivery_core.clients.registry import RegistryClient, RegistryError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR = "application/vnd.oci.image.layer.v1.tar"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
ROOT = os.geteuid() == 0
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


def unpack(registry: Tuple[Registry, str], images: Path, manifest: str):
    reg, address = registry
    with RegistryClient(address, timeout=10) as client:
        return ensure_rootfs(client, "shop/app", manifest, str(images))


BASE = layer(
    ("dir", "usr", 0o755), ("dir", "usr/lib", 0o755), ("dir", "usr/bin", 0o755),
    ("symlink", "lib", "usr/lib"), ("symlink", "bin", "/usr/bin"),
    ("exec", "usr/bin/app", b"#!/bin/sh\n"), ("suid", "usr/bin/su", b"su"),
    ("hardlink", "usr/bin/app2", "usr/bin/app"),
    ("dir", "etc", 0o755), ("file", "etc/passwd", b"root:x:0:0::/root:/bin/sh\napp:x:101:102::/:/bin/false\n"),
    ("symlink", "etc/resolv.conf", "../run/systemd/resolve/stub-resolv.conf"),
    ("dir", "var", 0o755), ("dir", "var/cache", 0o755), ("file", "var/cache/a", b"a"), ("file", "var/cache/b", b"b"),
    ("dir", "data", 0o700), ("file", "data/old", b"old"), ("dir", "data/sub", 0o755),
    ("fifo", "run-fifo", None), ("chr", "dev-null", None),
)
TOP = layer(
    ("file", "var/cache/.wh.a", b""),                  # delete a lower file
    ("dir", "data", 0o700), ("file", "data/.wh..wh..opq", b""), ("file", "data/new", b"new"),  # opaque dir
    ("file", "lib/libx.so", b"elf"),                  # through the merged-usr symlink
    ("file", "bin/tool", b"tool"),                    # through an absolute symlink: inside the root
    ("file", ".wh.run-fifo", b""),
)


def test_layers_applied_in_order_with_whiteouts_links_and_modes(registry, tmp_path):
    reg, _ = registry
    manifest = reg.image([(BASE, TAR), (gzip.compress(TOP), TAR_GZIP)],
                         config={"Entrypoint": ["/usr/bin/app"], "Cmd": ["--serve"], "Env": ["PATH=/usr/bin"],
                                 "WorkingDir": "/data", "User": "app", "StopSignal": "SIGQUIT"})
    rootfs = unpack(registry, tmp_path / "images", manifest)
    root = Path(rootfs.path)
    assert rootfs.created and root == tmp_path / "images" / manifest.split(":")[1] / "rootfs"
    assert not (root / "var/cache/a").exists() and (root / "var/cache/b").read_bytes() == b"b"
    assert sorted(os.listdir(root / "data")) == ["new"]           # opaque: lower entries gone, own kept
    assert (root / "usr/lib/libx.so").read_bytes() == b"elf" and os.readlink(root / "lib") == "usr/lib"
    assert (root / "usr/bin/tool").read_bytes() == b"tool" and os.readlink(root / "bin") == "/usr/bin"
    assert os.stat(root / "usr/bin/app").st_ino == os.stat(root / "usr/bin/app2").st_ino
    assert stat.S_IMODE(os.stat(root / "usr/bin/su").st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(root / "data").st_mode) == 0o700
    assert os.stat(root / "usr/bin/app").st_mtime == 1_700_000_000
    assert not (root / "run-fifo").exists() and not (root / "dev-null").exists()
    assert any("dev-null" in note and "skipped" in note for note in rootfs.notes)
    # mount points of the unit: regular files (the resolv.conf symlink replaced), API dirs
    for name in ("etc/hosts", "etc/resolv.conf"):
        assert (root / name).is_file() and not (root / name).is_symlink()
    for name in ("proc", "sys", "dev", "run", "tmp"):
        assert (root / name).is_dir()
    assert stat.S_IMODE(os.stat(root / "tmp").st_mode) == 0o1777
    meta = json.loads((root.parent / "image.json").read_text())
    assert meta["config"] == {"Entrypoint": ["/usr/bin/app"], "Cmd": ["--serve"], "Env": ["PATH=/usr/bin"],
                              "WorkingDir": "/data", "User": "app", "StopSignal": "SIGQUIT"}
    assert read_in_root(str(root), "/etc/passwd").startswith(b"root:")
    # content-addressed: a second call finds the tree and fetches nothing
    reg.requests.clear()
    again = unpack(registry, tmp_path / "images", manifest)
    assert not again.created and again.path == rootfs.path and reg.requests == []
    assert os.listdir(tmp_path / "images") == [manifest.split(":")[1]]


@pytest.mark.skipif(not ROOT, reason="ownership needs root (the product unpacks as root)")
def test_ownership_kept(registry, tmp_path):
    reg, _ = registry
    manifest = reg.image([(layer(("dir", "srv", 0o750), ("file", "srv/x", b"x"), ("symlink", "srv/l", "x"),
                                 uid=4321), TAR)])
    root = Path(unpack(registry, tmp_path / "images", manifest).path)
    for name in ("srv", "srv/x", "srv/l"):
        st = os.lstat(root / name)
        assert (st.st_uid, st.st_gid) == (4321, 4321), name


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd command not installed")
def test_zstd_layer(registry, tmp_path):
    import subprocess
    reg, _ = registry
    plain = layer(("file", "hello", b"zstd"))
    packed = subprocess.run(["zstd", "-q", "-c"], input=plain, capture_output=True, check=True).stdout
    manifest = reg.image([(packed, TAR_ZSTD)], diff_ids=[sha(plain)])
    assert (Path(unpack(registry, tmp_path / "images", manifest).path) / "hello").read_bytes() == b"zstd"


def _no_leftovers(images: Path) -> None:
    assert not images.exists() or os.listdir(images) == [], os.listdir(images)


def test_layer_digest_mismatch_refused_and_nothing_left(registry, tmp_path):
    reg, _ = registry
    bad = layer(("file", "x", b"1"))
    manifest = reg.image([(BASE, TAR), (bad, TAR)])
    reg.tamper[sha(bad)] = layer(("file", "x", b"2"))       # same size, other bytes
    with pytest.raises(ImageError, match=r"do not match the\s+digest"):
        unpack(registry, tmp_path / "images", manifest)
    _no_leftovers(tmp_path / "images")
    assert load_rootfs(str(tmp_path / "images"), manifest) is None


def test_manifest_digest_mismatch_refused(registry, tmp_path):
    reg, _ = registry
    manifest = reg.image([(BASE, TAR)])
    reg.tamper[manifest] = reg.blobs[manifest] + b" "
    with pytest.raises(RegistryError, match="do not match the digest"):
        unpack(registry, tmp_path / "images", manifest)
    _no_leftovers(tmp_path / "images")


def test_diff_id_mismatch_refused(registry, tmp_path):
    reg, _ = registry
    top = layer(("file", "x", b"1"))
    manifest = reg.image([(gzip.compress(top), TAR_GZIP)], diff_ids=[sha(b"other")])
    with pytest.raises(ImageError, match="the image config says"):
        unpack(registry, tmp_path / "images", manifest)
    _no_leftovers(tmp_path / "images")


def test_missing_image_names_it(registry, tmp_path):
    with pytest.raises(RegistryError, match="not published in the site registry"):
        unpack(registry, tmp_path / "images", "sha256:" + "0" * 64)


@pytest.mark.parametrize("entries, fragment", [
    ([("file", "../evil", b"x")], "escapes the root"),
    ([("dir", "a", 0o755), ("file", "a/../../evil", b"x")], "escapes the root"),
    ([("hardlink", "h", "../../etc/passwd")], "escapes the root"),
    ([("hardlink", "h", "missing")], "the target is not in the image"),
    ([("file", "f", b"x"), ("file", "f/g", b"y")], "is not a directory in the image"),
])
def test_escaping_members_refused(registry, tmp_path, entries, fragment):
    reg, _ = registry
    manifest = reg.image([(layer(*entries), TAR)])
    with pytest.raises(ImageError, match=fragment):
        unpack(registry, tmp_path / "images", manifest)
    _no_leftovers(tmp_path / "images")


def test_symlinks_never_lead_out_of_the_root(tmp_path):
    """Absolute and ../ symlinks are resolved inside the root: files land in the root, never on the host."""
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    hostile = layer(("symlink", "abs", str(outside)), ("symlink", "up", "../../../.."),
                    ("file", "abs/x", b"1"), ("file", "up/y", b"2"), ("hardlink", "h", "abs/x"))
    unpack_layer(io.BytesIO(hostile), str(root), [])
    assert os.listdir(outside) == []
    assert (root / str(outside).lstrip("/") / "x").read_bytes() == b"1"
    assert (root / "y").read_bytes() == b"2"
    assert os.stat(root / "h").st_ino == os.stat(root / str(outside).lstrip("/") / "x").st_ino
    assert resolve_in_root(str(root), "up") == str(root)


def test_symlink_loop_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ImageError, match="too many symlinks"):
        unpack_layer(io.BytesIO(layer(("symlink", "a", "b"), ("symlink", "b", "a"), ("file", "a/x", b""))),
                     str(root), [])


def test_whiteout_of_a_directory_and_replacing_types(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    notes: List[str] = []
    unpack_layer(io.BytesIO(layer(("dir", "d", 0o755), ("file", "d/f", b"x"), ("file", "t", b"file"),
                                  ("dir", "u", 0o755), ("file", "u/f", b"x"))), str(root), notes)
    unpack_layer(io.BytesIO(layer(("file", ".wh.d", b""), ("symlink", "t", "d"), ("file", "u", b"now a file"))),
                 str(root), notes)
    assert not (root / "d").exists() and os.readlink(root / "t") == "d"
    assert (root / "u").read_bytes() == b"now a file"


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
        unpack(registry, tmp_path / "images", manifest)
    _no_leftovers(tmp_path / "images")
