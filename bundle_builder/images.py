"""Image sources: a Docker engine, ``docker save`` archives and OCI image layouts, all seen as OCI blobs.

Each source finds the images of a reference (one per platform it has); the resolver picks, for every
(reference, requested platform), the first source in command-line order that has it. Layers are never held
in memory: a blob is an ``open()`` callable streaming its bytes. Configs and manifests are small and kept.
"""

from __future__ import annotations

import abc
import concurrent.futures
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from offline_delivery_core.common.digests import sha256_digest
from offline_delivery_core.common.files import read_full
from offline_delivery_core.common.oci import (INDEX_TYPES, MANIFEST_TYPES, OCI_CONFIG_MEDIA_TYPE,
                                              OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OCI_MANIFEST_MEDIA_TYPE)
REF_ANNOTATIONS = ("org.opencontainers.image.ref.name", "io.containerd.image.name")
MAX_SMALL_BLOB = 16 * 1024 * 1024  # configs, manifests, indexes
CHUNK = 1024 * 1024


class ImageError(ValueError):
    """An image cannot be resolved or read: names the reference, platform and source."""


# ----------------------------------------------------------------------------------------------------------
# Platforms and references


@dataclass(frozen=True, order=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9_]+", p) for p in parts):
            raise ImageError(f"bad platform {text!r}: expected os/arch[/variant], e.g. linux/amd64 or linux/arm64")
        return cls.make(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def make(cls, os_: str, arch: str, variant: str | None = "") -> "Platform":
        variant = variant or ""
        if arch == "arm64" and variant == "v8":  # the default arm64 variant: linux/arm64 == linux/arm64/v8
            variant = ""
        return cls(os_, arch, variant)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Platform":
        return cls.make(str(config.get("os", "")), str(config.get("architecture", "")), config.get("variant"))

    @classmethod
    def from_descriptor(cls, platform: dict[str, Any]) -> "Platform":
        return cls.make(str(platform.get("os", "")), str(platform.get("architecture", "")), platform.get("variant"))

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    def descriptor(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        elif self.architecture == "arm64":
            out["variant"] = "v8"
        return out


def normalize_ref(ref: str) -> str:
    """Docker's short form: ``nginx`` == ``nginx:latest`` == ``docker.io/library/nginx:latest``."""
    ref = ref.strip()
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/", "index.docker.io/"):
        if ref.startswith(prefix):
            ref = ref[len(prefix):]
            break
    name = ref.split("@", 1)[0]
    if "@" not in ref and ":" not in name.rsplit("/", 1)[-1]:
        ref += ":latest"
    return ref


# ----------------------------------------------------------------------------------------------------------
# Blobs and images


Opener = Callable[[], IO[bytes]]


@dataclass
class Blob:
    digest: str
    size: int
    media_type: str
    opener: Opener | None = None     # streams the bytes (layers)
    data: bytes | None = None        # small blobs kept in memory (configs, manifests)

    def open(self) -> IO[bytes]:
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.opener is not None
        return self.opener()


def small_blob(data: bytes, media_type: str) -> Blob:
    return Blob(sha256_digest(data), len(data), media_type, data=data)


@dataclass
class ResolvedImage:
    """One image for one platform: its OCI manifest (bytes kept exactly), config and layers."""

    reference: str
    platform: Platform
    source: str
    manifest: Blob
    config: Blob
    layers: list[Blob]

    def blobs(self) -> list[Blob]:
        return [self.manifest, self.config, *self.layers]


@dataclass
class Found:
    """A candidate seen by a source: its platform now, the image itself on ``load()`` (may be costly)."""

    reference: str
    platform: Platform
    source: str
    load: Callable[[], ResolvedImage]


class ImageSource(abc.ABC):
    """Where images come from: the engine, a docker-save archive, an OCI layout."""

    label = "source"

    @abc.abstractmethod
    def find(self, reference: str) -> list[Found]:
        """Every candidate this source holds for ``reference`` (any platform)."""

    def prepare(self, chosen: list[Found]) -> None:
        """Told once, before the first ``load``, every candidate of this source the build will load: a
        source that must export images (the Docker engine) exports them all at once."""
        return None

    def close(self) -> None:
        return None


# ----------------------------------------------------------------------------------------------------------
# Reading members of a tar archive in place (no extraction)


class _Section:
    """A read-only window [offset, offset+size) of a file."""

    def __init__(self, path: str, offset: int, size: int) -> None:
        self._fh = open(path, "rb")  # pylint: disable=consider-using-with
        self._fh.seek(offset)
        self._start = offset
        self._size = size
        self._left = size

    def seekable(self) -> bool:
        """Seekable within the window: the SBOM's layer scan skips file contents instead of reading them."""
        return True

    def tell(self) -> int:
        return self._size - self._left

    def seek(self, pos: int, whence: int = 0) -> int:
        base = (0, self.tell(), self._size)[whence]
        new = min(max(base + pos, 0), self._size)
        self._fh.seek(self._start + new)
        self._left = self._size - new
        return new

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        data = self._fh.read(n)
        self._left -= len(data)
        return data

    def read_at(self, pos: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``pos`` of the window, without moving its position (``os.pread``): the SBOM's
        layer scan reads each tar header with one system call."""
        n = max(0, min(n, self._size - pos))
        return os.pread(self._fh.fileno(), n, self._start + pos) if n else b""

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Fill ``buf`` from the window (fewer bytes only at its end): the builder's reused buffers, no
        fresh ``bytes`` per chunk."""
        got = read_full(self._fh, memoryview(buf)[:min(len(buf), self._left)])
        self._left -= got
        return got

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "_Section":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _layer_media_type(head: bytes, compressed_types: tuple[str, str, str] = (OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD)) -> str:
    if head[:2] == b"\x1f\x8b":
        return compressed_types[1]
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return compressed_types[2]
    return compressed_types[0]


def _hash_stream(fh: IO[bytes]) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    for chunk in iter(lambda: fh.read(CHUNK), b""):
        h.update(chunk)
        size += len(chunk)
    return "sha256:" + h.hexdigest(), size


class DockerArchiveSource(ImageSource):
    """A ``docker save`` archive (one or more images/tags); Docker 20.10 and 25+ layouts."""

    def __init__(self, path: str | Path, label: str | None = None) -> None:
        self.path = str(path)
        self.label = label or f"archive:{path}"
        if not os.path.isfile(self.path):
            raise ImageError(f"{self.label}: no such file (a 'docker save' tar was expected)")
        self._members = self._index()
        self._entries = self._read_manifest()

    def _index(self) -> dict[str, tarfile.TarInfo]:
        try:
            with tarfile.open(self.path, "r:") as tar:
                return {(m.name[2:] if m.name.startswith("./") else m.name): m for m in tar.getmembers()}
        except (tarfile.TarError, OSError) as exc:
            raise ImageError(f"{self.label}: not a readable tar archive ({exc})") from None

    def _member(self, name: str, depth: int = 0) -> tarfile.TarInfo:
        info = self._members.get(name)
        if info is None:
            raise ImageError(f"{self.label}: member {name!r} named by manifest.json is missing: damaged archive")
        if (info.issym() or info.islnk()) and depth < 8:
            # dockerd writes a repeated layer as a symlink to its first copy; follow it inside the archive
            target = info.linkname if info.islnk() else os.path.normpath(os.path.join(os.path.dirname(name), info.linkname))
            if target.startswith("../") or target.startswith("/"):
                raise ImageError(f"{self.label}: member {name!r} links outside the archive ({info.linkname})")
            return self._member(target, depth + 1)
        if not info.isfile():
            raise ImageError(f"{self.label}: member {name!r} is not a regular file")
        return info

    def _open_member(self, name: str) -> _Section:
        info = self._member(name)
        return _Section(self.path, info.offset_data, info.size)

    def _read_small(self, name: str) -> bytes:
        info = self._member(name)
        if info.size > MAX_SMALL_BLOB:
            raise ImageError(f"{self.label}: {name} is {info.size} bytes, too large for an image config")
        with self._open_member(name) as fh:
            return fh.read()

    def _read_manifest(self) -> list[dict[str, Any]]:
        if "manifest.json" not in self._members:
            raise ImageError(f"{self.label}: no manifest.json: not a 'docker save' archive")
        try:
            entries = json.loads(self._read_small("manifest.json"))
        except ValueError as exc:
            raise ImageError(f"{self.label}: manifest.json is not JSON ({exc})") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "Config" in e and "Layers" in e
                                                    for e in entries):
            raise ImageError(f"{self.label}: manifest.json is not a docker save manifest (list of Config/Layers)")
        return entries

    def tags(self) -> list[str]:
        return sorted({t for e in self._entries for t in (e.get("RepoTags") or [])})

    def find(self, reference: str) -> list[Found]:
        want = normalize_ref(reference)
        found = []
        for entry in self._entries:
            if want in {normalize_ref(t) for t in entry.get("RepoTags") or []}:
                image = self.load_entry(entry, reference)
                found.append(Found(reference, image.platform, self.label, lambda image=image: image))
        return found

    def find_config(self, config_digest: str, reference: str) -> ResolvedImage | None:
        for entry in self._entries:
            data = self._read_small(entry["Config"])
            if sha256_digest(data) == config_digest:
                return self.load_entry(entry, reference)
        return None

    def load_entry(self, entry: dict[str, Any], reference: str) -> ResolvedImage:
        config_bytes = self._read_small(entry["Config"])
        try:
            config = json.loads(config_bytes)
        except ValueError:
            raise ImageError(f"{self.label}: config {entry['Config']} of {reference} is not JSON") from None
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        if len(diff_ids) != len(entry["Layers"]):
            raise ImageError(f"{self.label}: {reference} lists {len(entry['Layers'])} layers but its config has "
                             f"{len(diff_ids)} diff_ids: damaged archive")
        layers = [self._layer(path, diff_id) for path, diff_id in zip(entry["Layers"], diff_ids)]
        config_blob = small_blob(config_bytes, OCI_CONFIG_MEDIA_TYPE)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST_MEDIA_TYPE,
                    "config": {"mediaType": config_blob.media_type, "digest": config_blob.digest,
                               "size": config_blob.size},
                    "layers": [{"mediaType": b.media_type, "digest": b.digest, "size": b.size} for b in layers]}
        manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        return ResolvedImage(reference=reference, platform=Platform.from_config(config), source=self.label,
                             manifest=small_blob(manifest_bytes, OCI_MANIFEST_MEDIA_TYPE), config=config_blob,
                             layers=layers)

    def _layer(self, path: str, diff_id: str) -> Blob:
        info = self._member(path)
        with self._open_member(path) as fh:
            head = fh.read(4)
        media_type = _layer_media_type(head)
        m = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", path)
        if m:  # Docker 25+ archives are content addressed already
            digest = "sha256:" + m.group(1)
        elif media_type == OCI_LAYER:
            digest = diff_id  # an uncompressed layer's digest is its diff_id (checked while copying)
        else:
            with self._open_member(path) as fh:
                digest = _hash_stream(fh)[0]
        return Blob(digest, info.size, media_type, opener=lambda p=path: self._open_member(p))


class OciLayoutSource(ImageSource):
    """An OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``)."""

    def __init__(self, path: str | Path, label: str | None = None) -> None:
        self.root = Path(path)
        self.label = label or f"oci:{path}"
        if not (self.root / "index.json").is_file():
            raise ImageError(f"{self.label}: no index.json: not an OCI image layout directory")
        self.index = self._json_file(self.root / "index.json", "index.json")

    def _json_file(self, path: Path, what: str) -> dict[str, Any]:
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ImageError(f"{self.label}: cannot read {what} ({exc})") from None
        if not isinstance(data, dict):
            raise ImageError(f"{self.label}: {what} is not a JSON object")
        return data

    def _blob_path(self, digest: str) -> Path:
        m = re.fullmatch(r"sha256:([0-9a-f]{64})", str(digest))
        if not m:
            raise ImageError(f"{self.label}: unsupported or malformed digest {digest!r}")
        return self.root / "blobs" / "sha256" / m.group(1)

    def _small(self, desc: dict[str, Any]) -> bytes:
        path = self._blob_path(desc.get("digest", ""))
        try:
            size = path.stat().st_size
            if size > MAX_SMALL_BLOB:
                raise ImageError(f"{self.label}: blob {desc['digest']} is {size} bytes, too large for metadata")
            data = path.read_bytes()
        except OSError:
            raise ImageError(f"{self.label}: blob {desc.get('digest')} is missing from blobs/sha256") from None
        if sha256_digest(data) != desc["digest"]:
            raise ImageError(f"{self.label}: blob {desc['digest']} does not match its digest: damaged layout")
        return data

    def _blob(self, desc: dict[str, Any], what: str) -> Blob:
        path = self._blob_path(desc.get("digest", ""))
        try:
            size = path.stat().st_size
        except OSError:
            raise ImageError(f"{self.label}: {what} blob {desc.get('digest')} is missing from blobs/sha256") from None
        if size != desc.get("size"):
            raise ImageError(f"{self.label}: {what} blob {desc['digest']} is {size} bytes, its descriptor says "
                             f"{desc.get('size')}: damaged layout")
        return Blob(desc["digest"], size, str(desc.get("mediaType", OCI_LAYER)), opener=lambda: open(path, "rb"))

    @staticmethod
    def _refs_of(desc: dict[str, Any]) -> set[str]:
        """Full references a descriptor is annotated with (buildx puts a bare tag in ref.name and the full
        name in io.containerd.image.name: either may match)."""
        ann = desc.get("annotations") or {}
        return {normalize_ref(str(ann[key])) for key in REF_ANNOTATIONS if key in ann}

    def tags(self) -> list[str]:
        return sorted({r for d in self.index.get("manifests", []) for r in self._refs_of(d)})

    def find(self, reference: str) -> list[Found]:
        want = normalize_ref(reference)
        found: list[Found] = []
        for desc in self.index.get("manifests", []):
            if want in self._refs_of(desc):
                found.extend(self._walk(desc, reference, claimed=None, depth=0))
        return found

    def _walk(self, desc: dict[str, Any], reference: str, claimed: Platform | None, depth: int) -> list[Found]:
        media_type = desc.get("mediaType")
        if media_type in INDEX_TYPES:
            if depth > 4:
                raise ImageError(f"{self.label}: {reference}: image indexes nested too deep")
            index = json.loads(self._small(desc))
            out: list[Found] = []
            for sub in index.get("manifests", []):
                plat = sub.get("platform")
                if (sub.get("annotations") or {}).get("vnd.docker.reference.type") == "attestation-manifest":
                    continue  # buildx provenance, not an image
                out.extend(self._walk(sub, reference, Platform.from_descriptor(plat) if plat else None, depth + 1))
            return out
        if media_type in MANIFEST_TYPES:
            if claimed is None and desc.get("platform"):
                claimed = Platform.from_descriptor(desc["platform"])
            image = self._load_manifest(desc, reference, claimed)
            return [Found(reference, image.platform, self.label, lambda: image)]
        raise ImageError(f"{self.label}: {reference}: unsupported descriptor media type {media_type!r}")

    def _load_manifest(self, desc: dict[str, Any], reference: str, claimed: Platform | None) -> ResolvedImage:
        manifest_bytes = self._small(desc)
        manifest = json.loads(manifest_bytes)
        config_desc = manifest.get("config") or {}
        config_bytes = self._small(config_desc)
        config = json.loads(config_bytes)
        actual = Platform.from_config(config)
        if claimed is not None and claimed != actual:
            raise ImageError(f"{self.label}: {reference}: the index lists manifest {desc['digest']} as {claimed}, "
                             f"but its config says {actual}; the image claims another platform than its index — "
                             "rebuild or re-tag the image for the right platform")
        layers = [self._blob(layer, f"{reference} ({actual}) layer") for layer in manifest.get("layers", [])]
        return ResolvedImage(reference=reference, platform=actual, source=self.label,
                             manifest=Blob(desc["digest"], len(manifest_bytes),
                                           str(desc.get("mediaType") or manifest.get("mediaType")),
                                           data=manifest_bytes),
                             config=Blob(config_desc["digest"], len(config_bytes),
                                         str(config_desc.get("mediaType", OCI_CONFIG_MEDIA_TYPE)), data=config_bytes),
                             layers=layers)


class _ChunkReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks (the SDK's export stream), for ``tarfile`` "r|"."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._view = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        while not self._view:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._view = memoryview(chunk)
        n = min(len(buf), len(self._view))
        buf[:n] = self._view[:n]
        self._view = self._view[n:]
        return n


# Per-image export files that describe that one export; the merged archive gets one manifest.json of its own.
_EXPORT_INDEX_FILES = {"manifest.json", "repositories", "index.json", "oci-layout"}
# Exports asked of the engine at once: the engine prepares the next ones (Docker 20.10 writes an image's
# whole export before its first byte) while the current one streams in. Measured on the bench's 10 images:
# 7.6-8.1 s one after the other, 4.6-4.9 s with 3 at once; more did not help on 2 cores.
EXPORTS_AT_ONCE = 3


class DockerEngineSource(ImageSource):
    """The local Docker engine, through the docker SDK's public API: every image the build needs (only those
    whose platform is wanted) exported and merged into one ``docker save``-style archive spooled to a temp
    file, then read like a ``docker save`` archive. A layer shared by N images is spooled once."""

    label = "docker"

    def __init__(self, client: Any = None, spool_dir: str | None = None) -> None:
        self._client = client
        self._spool_parent = spool_dir
        self._spool: str | None = None
        self._archives: list[DockerArchiveSource] = []
        self._images: dict[str, Any] = {}          # reference -> docker image, as find() saw it
        self._wanted: list[str] = []                # image ids prepare() was told the build loads
        self._shared: DockerArchiveSource | None = None
        self._shared_error: ImageError | None = None

    def _docker(self) -> Any:
        if self._client is None:
            import docker  # imported here: only this source needs the SDK
            try:
                self._client = docker.from_env()
                self._client.ping()
            except Exception as exc:  # docker raises many types; say what failed
                raise ImageError(f"docker: cannot reach the Docker engine ({exc}); start it or use "
                                 "--images-from archive:PATH / oci:PATH") from None
        return self._client

    def find(self, reference: str) -> list[Found]:
        import docker.errors
        try:
            image = self._docker().images.get(reference)
        except docker.errors.ImageNotFound:
            return []
        except docker.errors.APIError as exc:
            raise ImageError(f"docker: looking up {reference} failed: {exc}") from None
        attrs = image.attrs
        platform = Platform.make(attrs.get("Os", ""), attrs.get("Architecture", ""), attrs.get("Variant"))
        self._images[reference] = image
        return [Found(reference, platform, self.label, lambda: self._save(image, reference))]

    def prepare(self, chosen: list[Found]) -> None:
        ids = [self._images[f.reference].id for f in chosen if f.source == self.label and f.reference in self._images]
        self._wanted = list(dict.fromkeys(ids))

    def _spool_path(self) -> str:
        if self._spool is None:
            self._spool = tempfile.mkdtemp(prefix="bundle-builder-docker-", dir=self._spool_parent)
        return os.path.join(self._spool, f"images-{len(self._archives)}.tar")

    def _export(self, ids: list[str], path: str) -> None:
        """``docker save`` of the images ``ids`` into one archive at ``path``, each member once.

        The SDK's public API exports one image per call (``APIClient.get_image``: ``GET /images/{name}/get``);
        the Engine's several-names form has no public SDK call, and the docker CLI would be a second way to
        the engine (another dependency, maybe another engine: CLI contexts). So each image is exported on its
        own and its stream copied into one archive as it arrives (no extraction, bounded memory): members
        already written by an earlier image's export are skipped. Those are the same bytes under the same
        name: Docker 25+ names every blob by its digest, Docker 20.10 names a layer by its chain (a shared
        base is one name; only a layer that is one image's top and another's lower layer is spooled twice,
        and stored once in the bundle all the same). The per-image ``manifest.json`` entries are merged."""
        import docker.errors
        api = self._docker().api
        written: set[str] = set()
        entries: list[Any] = []
        asked: dict[int, concurrent.futures.Future[Any]] = {}
        pool = concurrent.futures.ThreadPoolExecutor(EXPORTS_AT_ONCE, thread_name_prefix="docker-export")

        def ask(i: int) -> None:
            if i < len(ids):  # get_image returns once the engine answers; the body streams on iteration
                asked[i] = pool.submit(api.get_image, ids[i], chunk_size=CHUNK)

        try:
            with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, copybufsize=CHUNK) as out:
                for i in range(EXPORTS_AT_ONCE):
                    ask(i)
                for i, image_id in enumerate(ids):
                    stream = None
                    try:
                        stream = asked.pop(i).result()
                        self._merge_export(stream, out, written, entries)
                    except (docker.errors.DockerException, tarfile.TarError, OSError, ValueError) as exc:
                        # OSError covers requests' errors (a connection lost mid-stream) and a full spool disk
                        refs = ", ".join(r for r, image in self._images.items() if image.id == image_id) or "?"
                        raise ImageError(f"docker: exporting image {refs} ({image_id[:19]}) from the engine "
                                         f"failed: {exc}") from None
                    finally:
                        if hasattr(stream, "close"):
                            stream.close()  # type: ignore[union-attr]
                    ask(i + EXPORTS_AT_ONCE)
                data = json.dumps(entries).encode()
                info = tarfile.TarInfo("manifest.json")
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for left in asked.values():  # after a failure: the exports asked for ahead, never read
                if left.done() and not left.cancelled() and left.exception() is None:
                    left.result().close()

    @staticmethod
    def _merge_export(stream: Any, out: tarfile.TarFile, written: set[str], entries: list[Any]) -> None:
        """Copy one image's export stream into the merged archive ``out``: members not written yet, and its
        ``manifest.json`` entries into ``entries``."""
        reader = _ChunkReader(iter(stream))
        with tarfile.open(fileobj=reader, mode="r|", bufsize=CHUNK) as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                name = name.rstrip("/")
                if name == "manifest.json":
                    if member.size > MAX_SMALL_BLOB:
                        raise ImageError(f"its manifest.json is {member.size} bytes: not a docker save")
                    manifest = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                    if not isinstance(manifest, list):
                        raise ImageError("its manifest.json is not a list: not a docker save")
                    entries.extend(manifest)
                elif name not in _EXPORT_INDEX_FILES and name not in written:
                    written.add(name)
                    out.addfile(member, tar.extractfile(member) if member.isfile() else None)
        while reader.read(CHUNK):  # the end-of-archive padding: read the response to its end
            pass

    def _archive_for(self, image: Any, reference: str) -> DockerArchiveSource:
        """The shared export when prepare() listed this image (made on first use), else one of its own."""
        if image.id in self._wanted:
            if self._shared_error is not None:  # one failed export fails every image of it: not tried again
                raise self._shared_error
            if self._shared is None:
                path = self._spool_path()
                try:
                    self._export(self._wanted, path)
                except ImageError as exc:
                    self._shared_error = exc
                    raise
                self._shared = DockerArchiveSource(path, label=f"docker ({len(self._wanted)} images)")
                self._archives.append(self._shared)
            return self._shared
        path = self._spool_path()
        self._export([image.id], path)
        archive = DockerArchiveSource(path, label=f"docker ({reference})")
        self._archives.append(archive)
        return archive

    def _save(self, image: Any, reference: str) -> ResolvedImage:
        archive = self._archive_for(image, reference)
        resolved = archive.find_config(image.id, reference)
        if resolved is None:
            raise ImageError(f"docker: the saved archive of {reference} does not hold image {image.id}")
        resolved.source = self.label
        return resolved

    def close(self) -> None:
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None


def open_source(spec: str | ImageSource) -> ImageSource:
    """``docker``, ``archive:PATH`` or ``oci:PATH`` (or an ImageSource already made)."""
    if isinstance(spec, ImageSource):
        return spec
    if spec == "docker":
        return DockerEngineSource()
    kind, sep, path = spec.partition(":")
    if sep and path and kind == "archive":
        return DockerArchiveSource(path)
    if sep and path and kind == "oci":
        return OciLayoutSource(path)
    raise ImageError(f"bad image source {spec!r}: use docker, archive:PATH (a docker save tar) or oci:PATH "
                     "(an OCI image layout directory)")


# ----------------------------------------------------------------------------------------------------------
# Resolution


@dataclass
class Resolution:
    images: dict[tuple[str, Platform], ResolvedImage] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def resolve(references: list[str], platforms: list[Platform], sources: list[ImageSource]) -> dict[tuple[str, Platform], ResolvedImage]:
    """For each (reference, platform), the image from the first source that has it. Raises one ImageError
    listing every reference/platform that could not be resolved and why."""
    result = Resolution()
    found_by_ref: dict[str, list[Found]] = {}
    for reference in sorted(set(references)):
        found: list[Found] = []
        found_by_ref[reference] = found
        for source in sources:
            try:
                found.extend(source.find(reference))
            except ImageError as exc:
                result.errors.append(str(exc))
    # Every candidate that will be loaded, first: a source that exports (the engine) does it once for all.
    picks = (_first(found, platform) for found in found_by_ref.values() for platform in platforms)
    chosen = [cand for cand in picks if cand is not None]
    for source in sources:
        source.prepare(chosen)
    for reference, found in found_by_ref.items():
        for platform in platforms:
            _pick(reference, platform, found, sources, result)
    if result.errors:
        raise ImageError("\n".join(dict.fromkeys(result.errors)))  # once each: one failed export fails many
    return result.images


def _first(found: list[Found], platform: Platform) -> Found | None:
    """The candidate ``_pick`` takes: sources were searched in order, so the first match wins."""
    return next((cand for cand in found if cand.platform == platform), None)


def _pick(reference: str, platform: Platform, found: list[Found], sources: list[ImageSource],
          result: Resolution) -> None:
    for cand in found:  # sources were searched in order, so the first match wins
        if cand.platform == platform:
            try:
                result.images[(reference, platform)] = cand.load()
            except ImageError as exc:
                result.errors.append(str(exc))
            return
    if not found:
        tried = ", ".join(s.label for s in sources) or "none"
        result.errors.append(f"image {reference} not found in any source (tried: {tried}); build or load it, "
                             "or add --images-from for where it is")
        return
    have = ", ".join(sorted({f"{c.platform} (in {c.source})" for c in found}))
    result.errors.append(f"image {reference} has no {platform} variant; platforms found: {have}. Build it for "
                         f"{platform} or drop that --platform")
