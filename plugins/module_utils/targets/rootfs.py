# Copyright: offline.delivery contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Unpack one platform's image from the site registry into a root filesystem (the systemd target).

``ensure_rootfs`` fetches the image manifest by digest (verified), its config and every layer (streamed
through sha256 into a temporary file, so memory stays bounded and a wrong layer is refused before a byte of
it is unpacked), then applies the layers in order into ``<images_dir>/<manifest hex>/rootfs``.

The tree is content-addressed, so every release using the image shares it and a rollback re-uses it. It is
built under ``<images_dir>/.partial-<hex>-<pid>`` and renamed into place as the last step: a tree at the
final path is always complete; a failure removes the partial tree.

Layer semantics are those of the OCI image spec: ``.wh.<name>`` deletes ``<name>`` of lower layers,
``.wh..wh..opq`` empties its directory of lower layers' entries; hardlinks, symlinks, ownership, modes,
mtimes and ``security.*`` xattrs are kept (unpacking runs as root). A member whose path or hardlink target
escapes the root is refused (the whole image is refused); paths are resolved inside the root, so an
absolute symlink in the image (``/lib -> /usr/lib``) is followed within the root, never on the host.
Device nodes are skipped with a note: the service gets ``/dev`` from systemd (``MountAPIVFS=``).

Standard library only; zstd layers go through the ``zstd`` command (the systemd_host role installs it).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, List, Optional, Set, Tuple

from ..clients.registry import RegistryClient, RegistryError
from ..common.digests import ContentError, digest_hex, json_object
from ..common.oci import (DOCKER_LAYER, DOCKER_LAYER_GZIP, INDEX_TYPES, OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OciError,
                          check_descriptor)

LAYER_TAR = (OCI_LAYER, DOCKER_LAYER)
LAYER_GZIP = (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP)
LAYER_ZSTD = (OCI_LAYER_ZSTD,)
NONDISTRIBUTABLE = "nondistributable"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_SYMLINK_HOPS = 40
COPY_BLOCK = 1024 * 1024
CONFIG_FILE = "image.json"
# Files the unit bind-mounts from the host: they must exist as regular files in every root.
MOUNT_FILES = ("etc/hosts", "etc/resolv.conf")
# Mount points of the API file systems and the per-service /tmp (MountAPIVFS=, PrivateTmp=).
MOUNT_DIRS = (("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run", 0o755), ("tmp", 0o1777))
CONFIG_KEYS = ("Entrypoint", "Cmd", "Env", "WorkingDir", "User", "StopSignal")


class ImageError(RuntimeError):
    """An image cannot be unpacked; the message names the image, the blob or member, and what to do."""


@dataclass
class Rootfs:
    """An unpacked image: its root, what its config says to run, and notes (skipped devices, ...)."""

    path: str                      # the root filesystem
    directory: str                 # <images_dir>/<hex>: rootfs + image.json
    manifest_digest: str
    config: Dict[str, Any]         # Entrypoint, Cmd, Env, WorkingDir, User, StopSignal of the image config
    notes: List[str] = field(default_factory=list)
    created: bool = False          # unpacked now (False: it was there already)


# ----------------------------------------------------------------------------------------------------------
# The image directory


def image_dir(images_dir: str, manifest_digest: str) -> str:
    return os.path.join(images_dir, _hex(manifest_digest))


def load_rootfs(images_dir: str, manifest_digest: str) -> Optional[Rootfs]:
    """The unpacked image when it is there (complete: only a finished tree is ever at that path)."""
    directory = image_dir(images_dir, manifest_digest)
    try:
        with open(os.path.join(directory, CONFIG_FILE), "rb") as fh:
            meta = json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ImageError(f"{directory}/{CONFIG_FILE} cannot be read ({exc}); remove {directory} so the image "
                         "is unpacked again") from None
    return Rootfs(os.path.join(directory, "rootfs"), directory, manifest_digest, meta.get("config") or {},
                  list(meta.get("notes") or []))


def ensure_rootfs(client: RegistryClient, repository: str, manifest_digest: str, images_dir: str, *,
                  zstd: str = "zstd", log: Callable[[str], None] = lambda _msg: None) -> Rootfs:
    """The root filesystem of image manifest ``manifest_digest`` in ``repository``, unpacked if needed."""
    existing = load_rootfs(images_dir, manifest_digest)
    if existing is not None:
        return existing
    os.makedirs(images_dir, mode=0o700, exist_ok=True)
    _remove_abandoned(images_dir, manifest_digest)
    partial = os.path.join(images_dir, f".partial-{_hex(manifest_digest)}-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    os.mkdir(partial, 0o700)
    try:
        rootfs = _build(client, repository, manifest_digest, partial, zstd=zstd, log=log)
        final = image_dir(images_dir, manifest_digest)
        try:
            os.rename(partial, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(partial, ignore_errors=True)   # another run finished the same image first
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    rootfs.path = os.path.join(final, "rootfs")
    rootfs.directory = final
    rootfs.created = True
    return rootfs


def _remove_abandoned(images_dir: str, manifest_digest: str) -> None:
    """Partial trees of this image left by a run that was killed (its pid is gone)."""
    prefix = f".partial-{_hex(manifest_digest)}-"
    for name in os.listdir(images_dir):
        if not name.startswith(prefix):
            continue
        try:
            pid = int(name[len(prefix):])
            os.kill(pid, 0)
            if pid == os.getpid():
                raise ProcessLookupError
        except (ValueError, ProcessLookupError):
            shutil.rmtree(os.path.join(images_dir, name), ignore_errors=True)
        except PermissionError:
            pass  # a live process of another user: not ours to remove


def _hex(digest: str) -> str:
    try:
        return digest_hex(digest)
    except ContentError as exc:
        raise ImageError(str(exc)) from None


# ----------------------------------------------------------------------------------------------------------
# Fetch and verify


def _build(client: RegistryClient, repository: str, manifest_digest: str, partial: str, *, zstd: str,
           log: Callable[[str], None]) -> Rootfs:
    where = f"image {repository}@{manifest_digest}"
    manifest = _json_blob(client.get_manifest(repository, manifest_digest)[0], where, "manifest")
    if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
        raise ImageError(f"{where} is an image index, not a platform's image manifest; give the digest of "
                         "the host's platform (ComponentSpec.manifest_digest)")
    config_desc = _descriptor(manifest.get("config"), where, "config")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ImageError(f"{where}: the manifest has no layers")
    descs = [_descriptor(layer, where, f"layer {i}") for i, layer in enumerate(layers)]
    config_doc = _json_blob(_fetch_small(client, repository, config_desc, where), where, "config")
    diff_ids = (config_doc.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(descs):
        raise ImageError(f"{where}: the config lists {len(diff_ids)} diff_ids for {len(descs)} layers")
    root = os.path.join(partial, "rootfs")
    os.mkdir(root, 0o755)
    notes: List[str] = []
    for index, (desc, diff_id) in enumerate(zip(descs, diff_ids)):
        log(f"{where}: layer {index + 1}/{len(descs)} {desc['digest']} ({desc['size']} bytes)")
        _apply_layer(client, repository, desc, diff_id, root, partial, where, notes, zstd=zstd)
    _make_mount_points(root)
    config = {key: (config_doc.get("config") or {}).get(key) for key in CONFIG_KEYS}
    meta = {"manifest": manifest_digest, "repository": repository, "config_digest": config_desc["digest"],
            "architecture": config_doc.get("architecture"), "os": config_doc.get("os"),
            "config": config, "notes": notes}
    with open(os.path.join(partial, CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1, sort_keys=True)
    os.chmod(partial, 0o755)
    return Rootfs(root, partial, manifest_digest, config, notes)


def _descriptor(desc: object, where: str, role: str) -> Dict[str, Any]:
    try:
        check_descriptor(desc, f"{where}: the {role}")
    except OciError as exc:
        raise ImageError(str(exc)) from None
    return desc  # type: ignore[return-value]  # check_descriptor proved it a dict


def _json_blob(data: bytes, where: str, role: str) -> Dict[str, Any]:
    try:
        return json_object(data, f"{where}: the {role}")
    except ContentError as exc:
        raise ImageError(str(exc)) from None


class _Buffer:
    """A write target collecting a small blob (the config), refusing more than a limit."""

    def __init__(self, limit: int) -> None:
        self.parts: List[bytes] = []
        self.size = 0
        self.limit = limit

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.limit:
            raise ImageError(f"blob larger than {self.limit} bytes where a config was expected")
        self.parts.append(data)
        return len(data)


def _fetch_small(client: RegistryClient, repository: str, desc: Dict[str, Any], where: str) -> bytes:
    buf = _Buffer(4 * 1024 * 1024)
    try:
        client.copy_blob(repository, desc["digest"], buf, size=desc["size"])  # type: ignore[arg-type]
    except RegistryError as exc:
        raise ImageError(f"{where}: config: {exc}") from None
    return b"".join(buf.parts)


def _apply_layer(client: RegistryClient, repository: str, desc: Dict[str, Any], diff_id: str, root: str,
                 partial: str, where: str, notes: List[str], *, zstd: str) -> None:
    media_type = desc["mediaType"]
    what = f"{where}: layer {desc['digest']} ({media_type})"
    if NONDISTRIBUTABLE in media_type or media_type not in LAYER_TAR + LAYER_GZIP + LAYER_ZSTD:
        supported = ", ".join(LAYER_TAR + LAYER_GZIP + LAYER_ZSTD)
        raise ImageError(f"{what}: unsupported layer media type; supported: {supported}")
    blob = os.path.join(partial, "layer.blob")
    try:
        with open(blob, "wb") as out:
            client.copy_blob(repository, desc["digest"], out, size=desc["size"])
    except RegistryError as exc:
        raise ImageError(f"{where}: {exc}") from None
    try:
        with _decompressed(blob, media_type, zstd, what) as stream:
            hashing = _HashingReader(stream)
            unpack_layer(hashing, root, notes, what)
            hashing.drain()
        if hashing.digest() != diff_id:
            raise ImageError(f"{what}: the uncompressed layer is {hashing.digest()}, the image config says "
                             f"{diff_id}; the image is inconsistent: rebuild it")
    finally:
        os.unlink(blob)


class _HashingReader:
    """File-like reader hashing what passes (the layer's diff_id)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.hasher = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.hasher.update(data)
        return data

    def drain(self) -> None:
        """Hash the rest (tar's zero blocks after the end marker are part of the diff_id)."""
        while self.read(COPY_BLOCK):
            pass

    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()


class _ZstdStream:
    """``zstd -dc FILE`` as a readable stream; a failure of the command is an error after the last read."""

    def __init__(self, zstd: str, path: str, what: str) -> None:
        try:
            self.proc = subprocess.Popen([zstd, "-dcq", "--", path], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE)
        except OSError as exc:
            raise ImageError(f"{what}: cannot run {zstd} ({exc}); install zstd (the systemd_host role does)") \
                from None
        self.what = what

    def read(self, size: int = -1) -> bytes:
        return self.proc.stdout.read(size)  # type: ignore[union-attr]  # Popen made with stdout=PIPE

    def close(self) -> None:
        self.proc.stdout.close()  # type: ignore[union-attr]  # stdout and stderr are PIPEs
        err = self.proc.stderr.read(4096).decode("utf-8", "replace").strip()
        rc = self.proc.wait(timeout=60)
        if rc != 0:
            raise ImageError(f"{self.what}: zstd failed (exit {rc}): {err}")


class _decompressed:
    """Context manager: the layer file as an uncompressed tar stream."""

    def __init__(self, path: str, media_type: str, zstd: str, what: str) -> None:
        self.path, self.media_type, self.zstd, self.what = path, media_type, zstd, what
        self.stream: Any = None

    def __enter__(self) -> IO[bytes]:
        if self.media_type in LAYER_ZSTD:
            self.stream = _ZstdStream(self.zstd, self.path, self.what)
        elif self.media_type in LAYER_GZIP:
            self.stream = gzip.open(self.path, "rb")
        else:
            self.stream = open(self.path, "rb")
        return self.stream

    def __exit__(self, exc_type: object, *_rest: object) -> None:
        try:
            self.stream.close()
        except (OSError, EOFError, zlib.error) as exc:
            if exc_type is None:
                raise ImageError(f"{self.what}: {exc}") from None


# ----------------------------------------------------------------------------------------------------------
# Unpacking one layer


def unpack_layer(stream: IO[bytes], root: str, notes: List[str], what: str = "layer") -> None:
    """Apply one uncompressed layer tar (read as a stream) onto ``root``."""
    layer = _Layer(root, notes, what)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                layer.apply(tar, member)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise ImageError(f"{what}: unpacking failed: {exc}") from None
        raise ImageError(f"{what}: not a valid tar stream ({exc}); the blob is damaged or not a layer") from None
    layer.finish()


class _Layer:
    def __init__(self, root: str, notes: List[str], what: str) -> None:
        self.root = root
        self.notes = notes
        self.what = what
        self.created: Set[str] = set()      # paths this layer wrote (whiteouts spare them)
        self.dir_times: List[Tuple[str, float]] = []

    # -- paths ----------------------------------------------------------------------------------------

    def relpath(self, name: str) -> str:
        """The member's path relative to the root; refuses ``..`` and empty names."""
        parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise ImageError(f"{self.what}: member {name!r} escapes the root ('..'); the image is refused")
        return "/".join(parts)

    def resolve_dir(self, rel: str, create: bool = False) -> str:
        """Host path of the directory ``rel`` inside the root, following symlinks within the root."""
        return resolve_in_root(self.root, rel, what=f"{self.what}: {rel!r}", create=create)

    def place(self, rel: str, create: bool = True) -> str:
        """Host path where member ``rel`` goes: its parent resolved inside the root, its name as is."""
        parent, _sep, base = rel.rpartition("/")
        return os.path.join(self.resolve_dir(parent, create=create), base)

    # -- members --------------------------------------------------------------------------------------

    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        rel = self.relpath(member.name)
        if not rel:
            return  # the root itself: its attributes stay those of the first layer's root
        base = rel.rpartition("/")[2]
        if base == OPAQUE:
            self.opaque(rel.rpartition("/")[0])
            return
        if base.startswith(WHITEOUT):
            self.whiteout(rel.rpartition("/")[0], base[len(WHITEOUT):])
            return
        if member.ischr() or member.isblk():
            self.notes.append(f"device node /{rel} skipped (systemd provides /dev)")
            return
        target = self.place(rel)
        if member.isdir():
            self.directory(target, member)
        else:
            _remove(target, keep_dir=False)
            if member.isreg():
                self.regular(tar, member, target)
            elif member.issym():
                os.symlink(member.linkname, target)
            elif member.islnk():
                self.hardlink(member, target)
            elif member.isfifo():
                os.mkfifo(target)
            else:
                self.notes.append(f"/{rel}: tar member type {member.type!r} skipped")
                return
        self.created.add(rel)
        self.attributes(target, member)

    def directory(self, target: str, member: tarfile.TarInfo) -> None:
        if not (os.path.isdir(target) and not os.path.islink(target)):
            _remove(target, keep_dir=False)
            os.mkdir(target, 0o700)
        self.dir_times.append((target, float(member.mtime)))

    def regular(self, tar: tarfile.TarFile, member: tarfile.TarInfo, target: str) -> None:
        source = tar.extractfile(member)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            if source is not None:
                shutil.copyfileobj(source, out, COPY_BLOCK)

    def hardlink(self, member: tarfile.TarInfo, target: str) -> None:
        rel = self.relpath(member.linkname)
        if not rel:
            raise ImageError(f"{self.what}: hardlink {member.name!r} points at the root; the image is refused")
        try:
            source = self.place(rel, create=False)
        except ImageError:
            source = ""
        if not source or not os.path.lexists(source):
            raise ImageError(f"{self.what}: hardlink {member.name!r} -> {member.linkname!r}: the target is not "
                             "in the image")
        os.link(source, target, follow_symlinks=False)

    def attributes(self, target: str, member: tarfile.TarInfo) -> None:
        if member.islnk():
            return  # a hardlink shares the inode's attributes
        os.chown(target, member.uid, member.gid, follow_symlinks=False)
        if member.issym():
            return
        for key, value in (member.pax_headers or {}).items():
            if key.startswith("SCHILY.xattr.security.") or key.startswith("SCHILY.xattr.user."):
                self.xattr(target, key[len("SCHILY.xattr."):], value)
        os.chmod(target, stat.S_IMODE(member.mode))  # after chown, which clears set-id bits
        if not member.isdir():
            os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)

    def xattr(self, target: str, name: str, value: str) -> None:
        try:
            os.setxattr(target, name, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
        except OSError as exc:
            self.notes.append(f"{target}: xattr {name} not kept ({exc.strerror})")

    # -- whiteouts ------------------------------------------------------------------------------------

    def whiteout(self, parent: str, name: str) -> None:
        if not name or name in (".", ".."):
            raise ImageError(f"{self.what}: invalid whiteout {parent}/.wh.{name}; the image is refused")
        rel = f"{parent}/{name}" if parent else name
        if rel in self.created:
            return  # whiteouts hide lower layers only
        try:
            target = self.place(rel, create=False)
        except ImageError:
            return  # the parent does not exist below: nothing to hide
        _remove(target, keep_dir=False)

    def opaque(self, parent: str) -> None:
        directory = self.resolve_dir(parent, create=True)
        prefix = f"{parent}/" if parent else ""
        for name in os.listdir(directory):
            if f"{prefix}{name}" not in self.created:
                _remove(os.path.join(directory, name), keep_dir=False)

    def finish(self) -> None:
        for path, mtime in reversed(self.dir_times):   # children first: their writes touched the parents
            if os.path.isdir(path):
                os.utime(path, (mtime, mtime), follow_symlinks=False)


def _remove(path: str, *, keep_dir: bool) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if not keep_dir:
            shutil.rmtree(path)
    else:
        os.unlink(path)


def resolve_in_root(root: str, rel: str, *, what: str = "path", create: bool = False) -> str:
    """Host path of ``rel`` inside ``root``, every component resolved as the service would see it: symlinks
    are followed, absolute ones from ``root`` and ``..`` never above it. ``create`` makes missing directories
    (0755 root) — a layer may list a file before (or without) its directory."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    resolved: List[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        current = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            if not create:
                raise ImageError(f"{what}: /{'/'.join(resolved + [part])} does not exist in the image") from None
            os.mkdir(current, 0o755)
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise ImageError(f"{what}: too many symlinks (a loop?) resolving it inside the image")
            link = os.readlink(current)
            if link.startswith("/"):
                resolved = []
            parts = [p for p in link.split("/") if p not in ("", ".")] + parts
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise ImageError(f"{what}: /{'/'.join(resolved + [part])} is not a directory in the image")
        resolved.append(part)
    return os.path.join(root, *resolved)


def read_in_root(root: str, rel: str, limit: int = 1024 * 1024) -> Optional[bytes]:
    """A small file of the image (e.g. /etc/passwd) read through ``resolve_in_root``; None when absent."""
    parent, _sep, base = rel.strip("/").rpartition("/")
    try:
        directory = resolve_in_root(root, parent)
    except ImageError:
        return None
    path = os.path.join(directory, base)
    for _hop in range(MAX_SYMLINK_HOPS):
        if not os.path.islink(path):
            break
        link = os.readlink(path)
        target = link if link.startswith("/") else posixpath.join("/" + os.path.relpath(directory, root), link)
        parent, _sep, base = posixpath.normpath(target).strip("/").rpartition("/")
        try:
            directory = resolve_in_root(root, parent)
        except ImageError:
            return None
        path = os.path.join(directory, base)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        return fh.read(limit)


def _make_mount_points(root: str) -> None:
    """Regular files for the bind-mounted /etc/hosts and /etc/resolv.conf (a symlink such as resolv.conf ->
    ../run/systemd/resolve/stub-resolv.conf would send the mount elsewhere), and the API mount points."""
    for rel, mode in MOUNT_DIRS:
        path = os.path.join(root, rel)
        if not os.path.lexists(path):
            os.mkdir(path, mode)
            os.chmod(path, mode)
    etc = resolve_in_root(root, "etc", create=True)
    for rel in MOUNT_FILES:
        path = os.path.join(etc, rel.rpartition("/")[2])
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
            _remove(path, keep_dir=False)
        if not os.path.lexists(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            os.close(fd)
            os.chmod(path, 0o644)
