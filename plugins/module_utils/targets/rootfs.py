# Copyright: offline.delivery contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Images from the site registry as read-only root filesystems built from a shared layer store (the systemd
target).

Each layer is unpacked once per host into the layer store ``<apps_dir>/.layers/<diff_id hex>`` and kept as it
is: the store is what overlayfs stacks, so a layer shared by 30 components is on disk once and an upgrade that
changes one top layer unpacks that layer only. ``ensure_rootfs`` fetches the image manifest by digest
(verified), its config and each layer the store lacks (streamed through sha256 into a temporary file, so memory
stays bounded and a wrong layer is refused before a byte of it is unpacked); the uncompressed stream must hash
to ``diff_id``, and only then is the layer renamed from ``.partial-<hex>-<pid>`` into the store:
a layer at its final path is complete and verified. The image itself is ``<images_dir>/<manifest hex>/image.json``
(what its config says to run, and its layers), written last: an image with it is complete. A component's root
is a read-only overlay of its own mount points layer (``make_mount_points``) over its image's layers
(targets/systemd.py mounts it).

Layers are stored the way overlayfs reads them: OCI ``.wh.<name>`` becomes a whiteout (a 0/0 character
device), ``.wh..wh..opq`` the ``trusted.overlay.opaque`` attribute of its directory; hardlinks, symlinks,
ownership, modes, mtimes and ``security.*``/``user.*`` xattrs are kept (unpacking runs as root). A layer is
unpacked as written, never through a symlink: a member whose path has ``..``, goes through a symlink, or
whose hardlink target is not earlier in the same layer refuses the whole image. Device nodes are skipped with
a note: the service gets ``/dev`` from systemd (``PrivateDevices=``). The store must be on a file system that
holds whiteouts and trusted xattrs (ext4, xfs, btrfs; not overlayfs itself): ``LayerStore.check`` says so.

Standard library only; zstd layers are read through libzstd (``common/zstd.py``, ctypes), which every Debian
host has (apt depends on it), so no command is needed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, Optional, Set

from ..clients.registry import RegistryClient, RegistryError
from ..common.digests import ContentError, digest_hex, json_object
from ..common.files import write_atomic
from ..common.locks import flock_within
from ..common.oci import (DOCKER_LAYER, DOCKER_LAYER_GZIP, INDEX_TYPES, OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OciError,
                          check_descriptor)
from ..common.zstd import ZstdError, ZstdReader

LAYER_TAR = (OCI_LAYER, DOCKER_LAYER)
LAYER_GZIP = (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP)
LAYER_ZSTD = (OCI_LAYER_ZSTD,)
NONDISTRIBUTABLE = "nondistributable"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
MAX_SYMLINK_HOPS = 40
COPY_BLOCK = 1024 * 1024
CONFIG_FILE = "image.json"
STORE_DIR = ".layers"
STORE_LOCK = ".lock"
STORE_LOCK_TIMEOUT = 1800.0     # another app unpacking a large image under emulation can take this long
# The kernel takes the mount options in one page; the lowerdir list must fit (about 40 layers), with room
# for the component's mount points layer in front.
MOUNT_OPTIONS_MAX = 4096 - 256
# Files the unit bind-mounts from the host: they must exist as regular files in every root.
MOUNT_FILES = ("hosts", "resolv.conf")
# Mount points of the API file systems and the per-service /tmp (MountAPIVFS=, PrivateTmp=).
MOUNT_DIRS = (("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run", 0o755), ("tmp", 0o1777))
CONFIG_KEYS = ("Entrypoint", "Cmd", "Env", "WorkingDir", "User", "StopSignal")


class ImageError(RuntimeError):
    """An image cannot be unpacked; the message names the image, the blob or member, and what to do."""


@dataclass
class Rootfs:
    """An image on this host: its layers in the store (overlayfs order) and what its config says to run."""

    directory: str                 # <images_dir>/<hex>: image.json
    manifest_digest: str
    config: Dict[str, Any]         # Entrypoint, Cmd, Env, WorkingDir, User, StopSignal of the image config
    lowerdirs: List[str] = field(default_factory=list)   # the layers' directories, top layer first
    notes: List[str] = field(default_factory=list)
    created: bool = False          # a layer was unpacked now (False: every layer was in the store already)


def overlay_options(lowerdirs: Iterable[str]) -> str:
    """Read-only overlay options: no upper directory, so nothing writes to the layers through the mount."""
    return "ro,lowerdir=" + ":".join(lowerdirs)


# ----------------------------------------------------------------------------------------------------------
# The layer store and the image directory


class LayerStore:
    """``<apps_dir>/.layers``: every unpacked layer of the host by its diff_id, root-only, shared by apps."""

    def __init__(self, apps_dir: str) -> None:
        self.root = os.path.join(apps_dir, STORE_DIR)

    def path(self, diff_id: str) -> str:
        return os.path.join(self.root, _hex(diff_id))

    def has(self, diff_id: str) -> bool:
        return os.path.isdir(self.path(diff_id))

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One unpacking or pruning at a time on the host (two apps may share layers)."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.root, STORE_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not flock_within(fd, STORE_LOCK_TIMEOUT):
                raise ImageError(f"the layer store {self.root} stayed locked for {STORE_LOCK_TIMEOUT:.0f}s by "
                                 "another deploy on this host; wait for it and run again")
            yield
        finally:
            os.close(fd)

    def check(self) -> None:
        """Refuse a store on a file system that cannot hold overlayfs whiteouts and opaque directories."""
        probe = os.path.join(self.root, f".probe-{os.getpid()}")
        shutil.rmtree(probe, ignore_errors=True)
        os.mkdir(probe, 0o700)
        try:
            os.mknod(os.path.join(probe, "w"), stat.S_IFCHR | 0o600, os.makedev(0, 0))
            os.setxattr(probe, OPAQUE_XATTR, b"y")
        except OSError as exc:
            raise ImageError(f"the layer store {self.root} cannot hold overlayfs whiteouts or trusted xattrs "
                             f"({exc.strerror}); it must be on a local file system such as ext4, xfs or btrfs "
                             "(not overlayfs or NFS): mount one at that path") from None
        finally:
            shutil.rmtree(probe, ignore_errors=True)

    def prune(self, used: Set[str]) -> List[str]:
        """Remove every layer not in ``used`` (diff_ids) and partial trees of runs that are gone; returns the
        removed paths. The caller holds the lock."""
        removed = []
        wanted = {_hex(d) for d in used}
        for name in sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []:
            path = os.path.join(self.root, name)
            if name.startswith(".partial-") and not _owner_alive(name):
                _remove(path)
                removed.append(path)
            elif not name.startswith(".") and name not in wanted:
                shutil.rmtree(path)
                removed.append(path)
        return removed


def _owner_alive(name: str) -> bool:
    """A ``.partial-<hex>-<pid>[.blob]`` of a live process other than this one."""
    try:
        pid = int(name.rsplit("-", 1)[1].split(".")[0])
        if pid == os.getpid():
            return False
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        pass  # a live process of another user
    return True


def image_dir(images_dir: str, manifest_digest: str) -> str:
    return os.path.join(images_dir, _hex(manifest_digest))


def load_rootfs(images_dir: str, store: LayerStore, manifest_digest: str) -> Optional[Rootfs]:
    """The image when it is complete on this host (its image.json lists its layers and each is in the store);
    None otherwise (never unpacked, a layer pruned, or an image of the earlier one-tree layout)."""
    directory = image_dir(images_dir, manifest_digest)
    try:
        with open(os.path.join(directory, CONFIG_FILE), "rb") as fh:
            meta = json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ImageError(f"{directory}/{CONFIG_FILE} cannot be read ({exc}); remove {directory} so the image "
                         "is unpacked again") from None
    layers = meta.get("layers")
    if not isinstance(layers, list) or not layers or not all(store.has(d) for d in layers):
        return None
    return Rootfs(directory, manifest_digest, meta.get("config") or {}, [store.path(d) for d in reversed(layers)],
                  list(meta.get("notes") or []))


def image_layers(directory: str) -> List[str]:
    """The diff_ids an image directory uses (none for a directory without a readable image.json)."""
    try:
        with open(os.path.join(directory, CONFIG_FILE), "rb") as fh:
            layers = json.loads(fh.read().decode("utf-8")).get("layers")
    except (OSError, ValueError, AttributeError):
        return []
    return [d for d in layers if isinstance(d, str)] if isinstance(layers, list) else []


def ensure_rootfs(client: RegistryClient, repository: str, manifest_digest: str, images_dir: str,
                  store: LayerStore, *, log: Callable[[str], None] = lambda _msg: None) -> Rootfs:
    """Image ``manifest_digest`` of ``repository`` ready to mount: the layers the store lacks fetched,
    verified and unpacked, the image directory written. On failure the image directory is as it was (a layer
    that was completed stays in the store, verified, for the next run or the next prune)."""
    existing = load_rootfs(images_dir, store, manifest_digest)
    if existing is not None:
        return existing
    with store.locked():
        store.check()
        os.makedirs(images_dir, mode=0o700, exist_ok=True)
        directory = image_dir(images_dir, manifest_digest)
        fresh = not os.path.exists(directory)
        try:
            return _build(client, repository, manifest_digest, directory, store, log=log)
        except BaseException:
            if fresh:
                shutil.rmtree(directory, ignore_errors=True)
            raise


def _hex(digest: str) -> str:
    try:
        return digest_hex(digest)
    except ContentError as exc:
        raise ImageError(str(exc)) from None


# ----------------------------------------------------------------------------------------------------------
# Fetch and verify


def _build(client: RegistryClient, repository: str, manifest_digest: str, directory: str, store: LayerStore, *,
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
    if len(diff_ids) != len(descs) or not all(isinstance(d, str) for d in diff_ids):
        raise ImageError(f"{where}: the config lists {len(diff_ids)} diff_ids for {len(descs)} layers")
    notes: List[str] = []
    unpacked = 0
    for index, (desc, diff_id) in enumerate(zip(descs, diff_ids)):
        if store.has(diff_id):
            continue
        log(f"{where}: layer {index + 1}/{len(descs)} {desc['digest']} ({desc['size']} bytes)")
        _add_layer(client, repository, desc, diff_id, store, where, notes)
        unpacked += 1
    os.makedirs(directory, mode=0o755, exist_ok=True)
    config = {key: (config_doc.get("config") or {}).get(key) for key in CONFIG_KEYS}
    meta = {"manifest": manifest_digest, "repository": repository, "config_digest": config_desc["digest"],
            "architecture": config_doc.get("architecture"), "os": config_doc.get("os"),
            "config": config, "layers": list(diff_ids), "notes": notes}
    rootfs = Rootfs(directory, manifest_digest, config, [store.path(d) for d in reversed(diff_ids)], notes,
                    created=unpacked > 0)
    if len(overlay_options(rootfs.lowerdirs)) > MOUNT_OPTIONS_MAX:
        raise ImageError(f"{where}: its {len(diff_ids)} layers do not fit in one overlay mount (the kernel takes "
                         f"{MOUNT_OPTIONS_MAX} bytes of options); squash the image to fewer layers")
    write_atomic(os.path.join(directory, CONFIG_FILE),
                 json.dumps(meta, indent=1, sort_keys=True).encode("utf-8"), 0o644)
    return rootfs


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


def _add_layer(client: RegistryClient, repository: str, desc: Dict[str, Any], diff_id: str, store: LayerStore,
               where: str, notes: List[str]) -> None:
    """Fetch one layer, unpack it beside the store and move it in once its diff_id is proven."""
    media_type = desc["mediaType"]
    what = f"{where}: layer {desc['digest']} ({media_type})"
    if NONDISTRIBUTABLE in media_type or media_type not in LAYER_TAR + LAYER_GZIP + LAYER_ZSTD:
        supported = ", ".join(LAYER_TAR + LAYER_GZIP + LAYER_ZSTD)
        raise ImageError(f"{what}: unsupported layer media type; supported: {supported}")
    final = store.path(diff_id)
    partial = os.path.join(store.root, f".partial-{_hex(diff_id)}-{os.getpid()}")
    blob = partial + ".blob"
    _remove(partial)
    try:
        with open(blob, "wb") as out:
            client.copy_blob(repository, desc["digest"], out, size=desc["size"])
        os.mkdir(partial, 0o755)
        with _decompressed(blob, media_type, what) as stream:
            hashing = _HashingReader(stream)
            unpack_layer(hashing, partial, notes, what)
            hashing.drain()
        if hashing.digest() != diff_id:
            raise ImageError(f"{what}: the uncompressed layer is {hashing.digest()}, the image config says "
                             f"{diff_id}; the image is inconsistent: rebuild it")
        os.rename(partial, final)
    except RegistryError as exc:
        raise ImageError(f"{where}: {exc}") from None
    finally:
        _remove(partial)
        _remove(blob)


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


class _decompressed:
    """Context manager: the layer file as an uncompressed tar stream."""

    def __init__(self, path: str, media_type: str, what: str) -> None:
        self.path, self.media_type, self.what = path, media_type, what
        self.file: Any = None
        self.stream: Any = None

    def __enter__(self) -> IO[bytes]:
        self.file = open(self.path, "rb")
        if self.media_type in LAYER_ZSTD:
            try:
                self.stream = io.BufferedReader(ZstdReader(self.file), COPY_BLOCK)
            except ZstdError as exc:
                self.file.close()
                raise ImageError(f"{self.what}: {exc}") from None
        elif self.media_type in LAYER_GZIP:
            self.stream = gzip.GzipFile(fileobj=self.file, mode="rb")
        else:
            self.stream = self.file
        return self.stream

    def __exit__(self, exc_type: object, *_rest: object) -> None:
        try:
            self.stream.close()
        except (OSError, EOFError, zlib.error, ZstdError) as exc:
            if exc_type is None:
                raise ImageError(f"{self.what}: {exc}") from None
        finally:
            self.file.close()


# ----------------------------------------------------------------------------------------------------------
# Unpacking one layer into its own directory (as overlayfs reads it)


def unpack_layer(stream: IO[bytes], root: str, notes: List[str], what: str = "layer") -> None:
    """Write one uncompressed layer tar (read as a stream) into the empty directory ``root``."""
    layer = _Layer(root, notes, what)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                layer.apply(tar, member)
    except (tarfile.TarError, EOFError, zlib.error, ZstdError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise ImageError(f"{what}: unpacking failed: {exc}") from None
        raise ImageError(f"{what}: not a valid tar stream ({exc}); the blob is damaged or not a layer") from None
    layer.finish()


class _Layer:
    def __init__(self, root: str, notes: List[str], what: str) -> None:
        self.root = root
        self.notes = notes
        self.what = what
        self.opaque_dirs: Set[str] = set()
        self.dir_times: List[tuple] = []

    def relpath(self, name: str) -> str:
        """The member's path relative to the layer; refuses ``..``."""
        parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise ImageError(f"{self.what}: member {name!r} escapes the root ('..'); the image is refused")
        return "/".join(parts)

    def place(self, rel: str, create: bool = True) -> str:
        """Host path of member ``rel``: every parent a real directory of this layer (made when the tar lists
        a file before its directory, if ``create``); a parent that is a symlink, a file or (without
        ``create``) missing refuses the image."""
        path = self.root
        for part in rel.split("/")[:-1]:
            path = os.path.join(path, part)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    raise ImageError(f"{self.what}: member {rel!r}: /{os.path.relpath(path, self.root)} is not "
                                     "in the layer; the image is refused") from None
                os.mkdir(path, 0o755)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise ImageError(f"{self.what}: member {rel!r}: /{os.path.relpath(path, self.root)} is not a "
                                 "directory in the layer (a path through a symlink or file); the image is refused")
        return os.path.join(path, rel.rpartition("/")[2])

    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        rel = self.relpath(member.name)
        if not rel:
            return  # the layer's root: the image's mount points layer gives the root its attributes
        parent, _sep, base = rel.rpartition("/")
        if base == OPAQUE:
            self.opaque(parent)
            return
        if base.startswith(WHITEOUT):
            self.whiteout(parent, base[len(WHITEOUT):])
            return
        if member.ischr() or member.isblk():
            self.notes.append(f"device node /{rel} skipped (systemd provides /dev)")
            return
        target = self.place(rel)
        if member.isdir():
            if not (os.path.isdir(target) and not os.path.islink(target)):
                _remove(target)
                os.mkdir(target, 0o700)
            self.dir_times.append((target, float(member.mtime)))
        else:
            _remove(target)
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
        self.attributes(target, member)

    def regular(self, tar: tarfile.TarFile, member: tarfile.TarInfo, target: str) -> None:
        source = tar.extractfile(member)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            if source is not None:
                shutil.copyfileobj(source, out, COPY_BLOCK)

    def hardlink(self, member: tarfile.TarInfo, target: str) -> None:
        """A hardlink's target is an earlier file of the same layer (the OCI spec), never a path elsewhere."""
        rel = self.relpath(member.linkname)
        source = self.place(rel, create=False) if rel else ""
        if not source or not os.path.lexists(source) or stat.S_ISDIR(os.lstat(source).st_mode):
            raise ImageError(f"{self.what}: hardlink {member.name!r} -> {member.linkname!r}: the target is not "
                             "an earlier file of the layer; the image is refused")
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

    def whiteout(self, parent: str, name: str) -> None:
        """``.wh.<name>`` hides <name> of lower layers: an overlayfs whiteout, unless this layer has the name
        itself (a whiteout applies to lower layers only) or its directory is opaque (all is hidden already,
        and overlayfs would list the redundant whiteout)."""
        if not name or name in (".", "..") or "/" in name:
            raise ImageError(f"{self.what}: invalid whiteout {parent}/.wh.{name}; the image is refused")
        rel = f"{parent}/{name}" if parent else name
        target = self.place(rel)
        if parent in self.opaque_dirs or os.path.lexists(target):
            return
        os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(0, 0))

    def opaque(self, parent: str) -> None:
        """``.wh..wh..opq``: the directory hides every entry of lower layers (overlayfs's opaque attribute)."""
        directory = self.place(parent) if parent else self.root
        if not os.path.lexists(directory):
            os.mkdir(directory, 0o755)
        elif not stat.S_ISDIR(os.lstat(directory).st_mode):
            raise ImageError(f"{self.what}: opaque marker in /{parent}, which is not a directory in the layer; "
                             "the image is refused")
        os.setxattr(directory, OPAQUE_XATTR, b"y")
        self.opaque_dirs.add(parent)
        for name in os.listdir(directory):   # whiteouts written before the marker are redundant now
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                os.unlink(path)

    def finish(self) -> None:
        for path, mtime in reversed(self.dir_times):   # children first: their writes touched the parents
            if os.path.isdir(path):
                os.utime(path, (mtime, mtime), follow_symlinks=False)


def _remove(path: str) -> None:
    """Whatever is at ``path`` (a tree, a file, a link, a whiteout), if anything."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


# ----------------------------------------------------------------------------------------------------------
# A component's mount points layer


def make_mount_points(mounts: str, view: str, dirs: Iterable[str] = (), files: Iterable[str] = ()) -> List[str]:
    """A component's top layer: the API mount points (``proc``, ``sys``, ``dev``, ``run``, ``tmp``), regular files
    for the bind-mounted /etc/hosts and /etc/resolv.conf (a symlink such as resolv.conf ->
    ../run/systemd/resolve/stub-resolv.conf would send the mount elsewhere), and what the image lacks of the
    component's volume directories (``dirs``) and config files (``files``): systemd cannot make a mount point in
    a read-only root. ``view`` is the image mounted read-only: paths are resolved there as the service will see
    them, and each directory this layer must hold keeps the owner and mode the image gives it. Returns the
    entries (``d <path> <mode> <uid> <gid>`` / ``f <path>``), which say when the layer must change."""
    os.mkdir(mounts, 0o755)
    entries: List[str] = []

    def directory(rel: str, mode: int) -> None:
        path = os.path.join(mounts, rel)
        if os.path.isdir(path):
            return
        try:
            st = os.lstat(os.path.join(view, rel))
            mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
            if not stat.S_ISDIR(st.st_mode):
                raise ImageError(f"/{rel} is not a directory in the image; a mount point cannot go below it")
        except FileNotFoundError:
            uid = gid = 0
        os.mkdir(path, mode)
        os.chown(path, uid, gid)
        os.chmod(path, mode)
        entries.append(f"d /{rel} {mode:o} {uid} {gid}")

    def empty_file(rel: str) -> None:
        parents(rel)
        fd = os.open(os.path.join(mounts, rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        os.close(fd)
        os.chmod(os.path.join(mounts, rel), 0o644)
        entries.append(f"f /{rel}")

    def parents(rel: str) -> None:
        parts = rel.split("/")[:-1]
        for index in range(1, len(parts) + 1):
            directory("/".join(parts[:index]), 0o755)

    def inside(path: str) -> str:
        """``path`` as the service will see it, relative to the root: its longest existing parent resolved in
        the image (symlinks followed inside it), the rest as written."""
        parts = path.strip("/").split("/")
        for keep in range(len(parts) - 1, -1, -1):
            try:
                resolved = os.path.relpath(resolve_in_root(view, "/".join(parts[:keep]), what=path), view)
            except ImageError:
                continue
            return "/".join(([] if resolved == "." else [resolved]) + parts[keep:])
        return "/".join(parts)

    for name, mode in MOUNT_DIRS:
        directory(name, mode)
    for rel in ("etc/" + name for name in MOUNT_FILES):
        empty_file(rel)
    for path in sorted(set(dirs)):
        rel = inside(path)
        if not os.path.isdir(os.path.join(view, rel)):
            parents(rel)
            directory(rel, 0o755)
    for path in sorted(set(files)):
        rel = inside(path)
        if not os.path.lexists(os.path.join(view, rel)) and not os.path.lexists(os.path.join(mounts, rel)):
            empty_file(rel)
    return entries


# ----------------------------------------------------------------------------------------------------------
# Reading the mounted image (users, programs, volume seeds)


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
