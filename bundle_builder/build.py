"""Bundle writer: app model + images (+ OS packages, + carried files) -> one signed, content-addressed tar
(or split parts).

Every blob is stored once (dedup by digest), copied in chunks while its sha256 is checked against the digest
the manifest claims, and the output appears atomically (temp file, then rename). The same inputs give the
same bytes: fixed tar header fields, blobs in manifest order, canonical JSON, no timestamps anywhere.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import re
import stat
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

import yaml

from offline_delivery_core.app import model as app_model
from offline_delivery_core.bundle import format as bundle_format
from offline_delivery_core.bundle.format import (FILE_MEDIA_TYPE, FILE_NAME_RE, FILE_VERSION_RE, BackgroundHasher,
                                                 MODEL_MEDIA_TYPE, PARTS_MEDIA_TYPE, BundleError, blob_path)
from offline_delivery_core.common import zstd
from offline_delivery_core.common.digests import canonical_json, sha256_digest, sha256_file
from offline_delivery_core.common.oci import DOCKER_LAYER_GZIP, OCI_INDEX_MEDIA_TYPE, OCI_LAYER_GZIP, OCI_LAYER_ZSTD
from offline_delivery_core.site import have as site_have

from . import __version__
from . import images as img
from . import packages as pkgs
from . import sbom as sbom_mod
from . import signing

# libyaml's safe loader when PyYAML was built with it (the wheels are): same results, ten times faster.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
BUILDER_NAME = "bundle-builder"
APT_INDEX_MEDIA_TYPE = "application/vnd.offline-delivery.apt-packages.v1"


BUILDER_VERSION = __version__
CHUNK = 1024 * 1024
REF_ANNOTATION = "org.opencontainers.image.ref.name"
MIN_VOLUME_SIZE = 1024

# progress(done_bytes, total_bytes, message)
Progress = Callable[[int, int, str], None]

COMPRESS_METHODS = ("zstd", "none")
# Blobs that are compressed already travel as they are, without looking at them: gzip/zstd layers, .deb files.
STORED_AS_IS_TYPES = frozenset({OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER_GZIP, pkgs.DEB_MEDIA_TYPE,
                                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                                "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"})
# Any other blob: a sample of SAMPLE bytes (SAMPLE_SLICES slices spread over the blob when its source can
# seek, else its start) is compressed at the build's level; the blob travels compressed when the sample
# shrinks to at most SHRINK_RATIO (a gzip layer with an unusual media type, a compressed binary do not). One
# slice from the start misjudges a layer whose first file is a binary: measured on the bench's layers, the
# first 256 KiB said 0.99 where the whole layer gives 0.80; four slices of 64 KiB said 0.44-0.88 (all < 0.95).
# Blobs under MIN_COMPRESS_SIZE gain nothing: a tar member takes whole 512-byte blocks anyway.
SAMPLE = 256 * 1024
SAMPLE_SLICES = 4
SHRINK_RATIO = 0.95
MIN_COMPRESS_SIZE = 1024
# A compressed member is spooled before it is written (its tar header holds its size): in memory up to
# this size, then in a temporary file next to the bundle.
SPOOL_IN_MEMORY = 8 * 1024 * 1024
# Written straight into a one-file bundle when even zstd's worst case (incompressible input grows by under
# 1 %) keeps the frame's size within a plain USTAR header (one 512-byte block, no PAX record before it).
DIRECT_MAX = 8 ** 11 * 99 // 100


@dataclass(frozen=True)
class Compression:
    """How blobs travel: ``method`` zstd (per blob, when it shrinks) or none; libzstd ``level`` and worker
    ``threads`` (0: one per CPU; the bytes are the same for any count)."""
    method: str = "zstd"
    level: int = zstd.DEFAULT_LEVEL
    threads: int = 0

    def check(self) -> None:
        if self.method not in COMPRESS_METHODS:
            raise BuildError(f"--compress {self.method!r}: use one of {', '.join(COMPRESS_METHODS)}")
        if not zstd.MIN_LEVEL <= self.level <= zstd.MAX_LEVEL:
            raise BuildError(f"--compress-level {self.level}: use {zstd.MIN_LEVEL}-{zstd.MAX_LEVEL} (3 is zstd's "
                             "default; higher is smaller and slower)")
        if self.threads < 0:
            raise BuildError(f"--compress-threads {self.threads}: use 0 (one per CPU) or a positive count")
        if self.method == "zstd":
            try:
                zstd.version()
            except zstd.ZstdError as exc:
                raise BuildError(f"{exc}") from None


class BuildError(ValueError):
    """The bundle cannot be built: names the input (model, image, key, base, have-file) and what to do."""


@dataclass
class BuildResult:
    path: Path                      # the bundle file, or its .parts.json when split
    files: list[Path]               # every file written (parts then parts.json, or the bundle)
    name: str
    version: str
    manifest_digest: str
    signed_keyid: str | None
    platforms: list[str]
    blobs_total: int                # blobs of the release (bundled or not)
    blobs_bundled: int
    bytes_total: int                # sum of all blob sizes of the release
    bytes_bundled: int              # sum of the sizes of the blobs carried in this bundle
    size: int                       # bytes of the bundle file (all parts together)
    omitted: list[str] = field(default_factory=list)
    omitted_bytes: int = 0
    parts: int = 0
    compression: dict[str, Any] = field(default_factory=dict)  # method, level, blobs and bytes compressed

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["files"] = [str(f) for f in self.files]
        return out


# ----------------------------------------------------------------------------------------------------------
# Inputs


def load_app_model(model_path: str | Path) -> dict[str, Any]:
    """Parse app.yml with PyYAML and validate/normalise it with the shared model code."""
    path = Path(model_path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except OSError as exc:
        raise BuildError(f"cannot read the app model {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise BuildError(f"{path} is not valid YAML: {exc}") from None
    try:
        return app_model.dump_model(app_model.load_model(data, source=str(path)))
    except app_model.ModelError as exc:
        raise BuildError(str(exc)) from None


def parse_size(text: str) -> int:
    """``4G``, ``500M``, ``64K``, ``4GiB`` or a byte count -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise BuildError(f"bad volume size {text!r}: use a number with K, M, G or T (e.g. 4G, 700M)")
    size = int(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper())
    if size < MIN_VOLUME_SIZE:
        raise BuildError(f"volume size {text!r} is smaller than {MIN_VOLUME_SIZE} bytes")
    return size


def load_have_file(path: str | Path, have_pub: list[bytes] | None = None) -> tuple[set[str], str]:
    """Digests a site already holds, and the have-file's own digest. The file is read by the one have-file
    reader (``site.have.parse_have``); with ``have_pub`` (raw Ed25519 site keys, pinned by the vendor) it must
    also carry a valid signature by one of them (``site.have.verify_have``), else BuildError names the key
    found or says the list was modified."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BuildError(f"cannot read have-file {path}: {exc.strerror}") from None
    source = f"have-file {path}"
    try:
        doc = site_have.verify_have(raw, have_pub, source) if have_pub else site_have.parse_have(raw, source)
    except site_have.HaveError as exc:
        raise BuildError(str(exc)) from None
    return set(doc["blobs"]), sha256_digest(raw)


@dataclass(frozen=True)
class FileInput:
    """One ``--file NAME[@VERSION]/ARCH=PATH``: a binary carried for the site's file tree."""
    spec: str
    name: str
    version: str
    arch: str
    path: Path

    @property
    def key(self) -> str:
        return f"{self.name}/{self.arch}"


FILE_SYNTAX = "NAME[@VERSION]/ARCH=PATH (e.g. k3s@v1.30.2+k3s1/amd64=./k3s)"


def parse_file_spec(spec: str, arches: list[str], default_version: str) -> FileInput:
    """Parse and check one ``--file`` value. ``arches``: the architectures of ``--platform``;
    ``default_version``: the release's version, used when the spec names none."""
    def bad(what: str) -> BuildError:
        return BuildError(f"--file {spec!r}: {what}")

    target, sep, path_text = spec.partition("=")
    if not sep or not path_text:
        raise bad(f"expected {FILE_SYNTAX}")
    ident, slash, arch = target.rpartition("/")
    if not slash:
        raise bad(f"no architecture: expected {FILE_SYNTAX}")
    name, at, version = ident.partition("@")
    if not FILE_NAME_RE.match(name):
        raise bad(f"name {name!r} must be lowercase letters, digits and '-' (max 40), starting and ending with "
                  "a letter or digit (the component-name rule)")
    if at and not FILE_VERSION_RE.match(version):
        raise bad(f"version {version!r} must start with a letter or digit and hold only letters, digits and "
                  ". + _ ~ - (max 128)")
    if arch not in arches:
        raise bad(f"architecture {arch!r} is not one of the --platform architectures ({', '.join(arches)}); "
                  "add its platform or fix the architecture")
    path = Path(path_text)
    try:
        st = path.stat()
    except OSError as exc:
        raise bad(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise bad(f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise bad(f"{path} is not readable by this user")
    return FileInput(spec=spec, name=name, version=version if at else default_version, arch=arch, path=path)


def parse_file_specs(specs: list[str], arches: list[str], default_version: str) -> list[FileInput]:
    """Every ``--file``, sorted by ``<name>/<arch>``; one version per name and architecture."""
    seen: dict[str, FileInput] = {}
    for spec in specs:
        f = parse_file_spec(spec, arches, default_version)
        if f.key in seen:
            raise BuildError(f"--file {spec!r} and --file {seen[f.key].spec!r} both give {f.key}: a bundle "
                             "carries one version of a file per architecture")
        seen[f.key] = f
    return [seen[k] for k in sorted(seen)]


def _base_delta(base: str | Path, base_pub: list[bytes] | None) -> tuple[set[str], dict[str, Any]]:
    try:
        head = bundle_format.read_head(str(base), trusted_keys=base_pub)
    except BundleError as exc:
        raise BuildError(f"base bundle {base}: {exc}") from None
    m = head.manifest
    return ({b["digest"] for b in m["blobs"]},
            {"base": {"name": m["name"], "version": m["version"], "manifest": head.manifest_digest}})


# ----------------------------------------------------------------------------------------------------------
# Planning: which blobs, in which order


@dataclass
class _Planned:
    blob: img.Blob
    used_by: set[str]


class _Plan:
    def __init__(self) -> None:
        self.blobs: dict[str, _Planned] = {}

    def add(self, blob: img.Blob, used_by: str) -> None:
        planned = self.blobs.get(blob.digest)
        if planned is None:
            self.blobs[blob.digest] = _Planned(blob, {used_by})
        else:
            if planned.blob.size != blob.size:
                raise BuildError(f"blob {blob.digest} is {planned.blob.size} bytes in one source and {blob.size} "
                                 "in another: a source is damaged")
            planned.used_by.add(used_by)


def _image_index(reference: str, manifests: list[tuple[img.Platform, img.Blob]]) -> img.Blob:
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX_MEDIA_TYPE,
             "manifests": [{"mediaType": blob.media_type, "digest": blob.digest, "size": blob.size,
                            "platform": platform.descriptor()} for platform, blob in manifests],
             "annotations": {REF_ANNOTATION: reference}}
    return img.small_blob(canonical_json(index), OCI_INDEX_MEDIA_TYPE)


def _plan(model: dict[str, Any], platforms: list[img.Platform],
          resolved: dict[tuple[str, img.Platform], img.ResolvedImage]) -> tuple[_Plan, img.Blob, dict[str, Any]]:
    plan = _Plan()
    model_blob = img.small_blob(canonical_json(model), MODEL_MEDIA_TYPE)
    plan.add(model_blob, "model")
    images: dict[str, Any] = {}
    for component, reference in sorted(app_model.image_refs(model).items()):
        per_platform = [(p, resolved[(reference, p)]) for p in platforms]
        index = _image_index(reference, [(p, r.manifest) for p, r in per_platform])
        plan.add(index, component)
        for platform, image in per_platform:
            for blob in image.blobs():
                plan.add(blob, f"{component}@{platform}")
        images[component] = {"reference": reference, "index": index.digest,
                             "manifests": {str(p): r.manifest.digest for p, r in per_platform}}
    return plan, model_blob, images


# ----------------------------------------------------------------------------------------------------------
# Output: one file, or parts of at most volume_size bytes


class _Output:
    """Writes the bundle stream to a temp file (or temp parts) and publishes it with renames."""

    def __init__(self, final: Path, volume_size: int | None, pool: concurrent.futures.Executor) -> None:
        self.final = final
        self.volume_size = volume_size
        self.tag = f".tmp-{os.getpid()}"
        self.parts: list[dict[str, Any]] = []
        self.temp_files: list[Path] = []
        self.written = 0
        self._pool = pool
        self._fh: IO[bytes] | None = None
        self._part_left = 0
        self._part_hash = BackgroundHasher(pool)
        self._whole = BackgroundHasher(pool) if volume_size else None
        if not volume_size:
            self._open(self._temp(final.name))

    def _temp(self, name: str) -> Path:
        path = self.final.parent / f".{name}{self.tag}"
        self.temp_files.append(path)
        return path

    def _open(self, path: Path) -> None:
        self._fh = open(path, "wb")  # pylint: disable=consider-using-with

    def _next_part(self) -> None:
        self._close_part()
        name = f"{self.final.name}.part{len(self.parts):03d}"
        self._open(self._temp(name))
        self.parts.append({"name": name, "size": 0, "sha256": ""})
        self._part_left = self.volume_size or 0
        self._part_hash = BackgroundHasher(self._pool)

    def _close_part(self) -> None:
        # No fsync: it would tie build speed to the disk's write-back for no safety gain — the rename keeps
        # readers from ever seeing a partial file, and every import re-hashes every byte anyway.
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            if self.parts:
                self.parts[-1]["sha256"] = self._part_hash.digest()

    def write(self, data: bytes | memoryview) -> None:
        self.written += len(data)
        if not self.volume_size:
            assert self._fh is not None
            self._fh.write(data)
            return
        # The part and whole-file hashes run later on the pool: they must own their bytes (the caller
        # reuses its read buffers).
        data = bytes(data)
        assert self._whole is not None
        self._whole.update(data)
        pos = 0
        while pos < len(data):
            if self._part_left == 0:
                self._next_part()
            n = min(self._part_left, len(data) - pos)
            piece = data if pos == 0 and n == len(data) else data[pos:pos + n]
            assert self._fh is not None
            self._part_hash.update(piece)
            self._fh.write(piece)
            self.parts[-1]["size"] += n
            self._part_left -= n
            pos += n

    @property
    def patchable(self) -> bool:
        """One output file (not parts): a header can be written after the member it heads."""
        return not self.volume_size

    def placeholder(self, size: int) -> int:
        """Write ``size`` zero bytes where :meth:`patch` writes later; returns their offset."""
        at = self.written
        self.write(bytes(size))
        return at

    def patch(self, at: int, data: bytes) -> None:
        """Overwrite bytes written at offset ``at`` (by :meth:`placeholder`) of the one output file."""
        assert self._fh is not None and self.patchable
        self._fh.flush()
        os.pwrite(self._fh.fileno(), data, at)

    def commit(self) -> tuple[Path, list[Path]]:
        self._close_part()
        directory = self.final.parent
        parts_json = directory / f"{self.final.name}.parts.json"
        # Drop what an earlier build of the same release left, so one form (file or parts) remains.
        for stale in [parts_json, self.final, *sorted(directory.glob(f"{glob_escape(self.final.name)}.part[0-9]*"))]:
            if stale not in self.temp_files:
                stale.unlink(missing_ok=True)
        if not self.volume_size:
            os.replace(self.temp_files[0], self.final)
            return self.final, [self.final]
        files = []
        for part, temp in zip(self.parts, self.temp_files):
            os.replace(temp, directory / part["name"])
            files.append(directory / part["name"])
        assert self._whole is not None
        doc = {"mediaType": PARTS_MEDIA_TYPE, "file": self.final.name, "size": self.written,
               "sha256": self._whole.digest(), "parts": self.parts}
        temp = self._temp(parts_json.name)
        temp.write_bytes(canonical_json(doc) + b"\n")
        os.replace(temp, parts_json)  # last: a reader sees the set only once every part is in place
        return parts_json, files + [parts_json]

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for temp in self.temp_files:
            temp.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _stored(blob: img.Blob, compression: Compression, sampler: zstd.ZstdWriter | None) -> str | None:
    """How ``blob`` travels: ``"zstd"`` when a sample of it shrinks, None (as it is) otherwise. No blob is
    compressed whole to decide: known compressed media types are not even opened."""
    if sampler is None or blob.size < MIN_COMPRESS_SIZE or blob.media_type in STORED_AS_IS_TYPES:
        return None
    if blob.data is not None:
        head = blob.data[:SAMPLE]
    else:
        with blob.open() as src:
            if blob.size > SAMPLE and getattr(src, "seekable", lambda: False)():
                piece = SAMPLE // SAMPLE_SLICES
                parts = []
                for i in range(SAMPLE_SLICES):
                    src.seek(i * (blob.size - piece) // (SAMPLE_SLICES - 1))
                    parts.append(src.read(piece))
                head = b"".join(parts)
            else:
                head = src.read(SAMPLE)
    packed = io.BytesIO()
    sampler.restart(packed)
    sampler.write(head)
    sampler.close()
    return bundle_format.STORED_ZSTD if packed.tell() <= SHRINK_RATIO * len(head) else None


def _storage(bundled: list[_Planned], compression: Compression) -> dict[str, str]:
    """digest -> ``"zstd"`` for each bundled blob that travels compressed."""
    if compression.method == "none":
        return {}
    sampler = zstd.ZstdWriter(io.BytesIO(), compression.level, threads=1)
    try:
        decided = {p.blob.digest: _stored(p.blob, compression, sampler) for p in bundled}
    finally:
        sampler.release()
    return {d: how for d, how in decided.items() if how}


def _copy_blob(out: _Output, planned: _Planned, report: Callable[[int], None],
               lanes: bundle_format.HashLanes, ring: bundle_format.BufferRing) -> Callable[[], None]:
    """Stream one blob into the bundle as it is (header, data, padding)."""
    out.write(bundle_format.tar_header(blob_path(planned.blob.digest), planned.blob.size))
    check = _stream_blob(planned, out.write, report, lanes, ring)
    out.write(bundle_format.tar_padding(planned.blob.size))
    return check


def _copy_compressed(out: _Output, planned: _Planned, report: Callable[[int], None], lanes: bundle_format.HashLanes,
                     ring: bundle_format.BufferRing, writer: zstd.ZstdWriter) -> Callable[[], None]:
    """Stream one blob into the bundle as a zstd frame (member ``blobs/sha256/<hex>.zst``). Its tar header
    holds the frame's size, known only at its end: into one output file the frame goes straight after a
    placeholder header, which is then written in place; into parts (whose hashes run as they are written)
    the frame is spooled first, in memory when small, else in a temporary file next to the bundle."""
    name = blob_path(planned.blob.digest) + bundle_format.ZSTD_SUFFIX
    if out.patchable and planned.blob.size < DIRECT_MAX:
        at = out.placeholder(bundle_format.BLOCK)
        writer.restart(out)  # type: ignore[arg-type]
        check = _stream_blob(planned, writer.write, report, lanes, ring)
        writer.close()
        out.patch(at, bundle_format.tar_header(name, writer.written))
        out.write(bundle_format.tar_padding(writer.written))
        return check
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, dir=out.final.parent,
                                       prefix=f".{out.final.name}.zst-") as spool:
        writer.restart(spool)  # type: ignore[arg-type]
        check = _stream_blob(planned, writer.write, report, lanes, ring)
        writer.close()
        size = writer.written
        spool.seek(0)
        out.write(bundle_format.tar_header(name, size))
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = spool.readinto(buf)  # type: ignore[attr-defined]
            if not n:
                break
            out.write(view[:n])
        out.write(bundle_format.tar_padding(size))
    return check


def _stream_blob(planned: _Planned, sink: Callable[[bytes | memoryview], Any], report: Callable[[int], None],
                 lanes: bundle_format.HashLanes, ring: bundle_format.BufferRing) -> Callable[[], None]:
    """Read one blob into ``sink``. Its size is checked now; its sha256 runs on a hash lane while the next
    blobs are copied. Returns the digest check, to run before the bundle is published."""
    blob = planned.blob
    hasher = lanes.hasher()
    size = 0
    with blob.open() as src:
        readinto = getattr(src, "readinto", None)
        while True:
            if readinto is not None:
                slot, buf = ring.take()
                n = readinto(buf)
                chunk: bytes | memoryview = memoryview(buf)[:n]
            else:
                chunk = src.read(CHUNK)
                n = len(chunk)
            if not n:
                break
            done = hasher.update(chunk)
            if readinto is not None:
                ring.hold(slot, done)
            sink(chunk)
            size += n
            report(n)
    if size != blob.size:
        raise BuildError(f"blob {blob.digest} ({', '.join(sorted(planned.used_by))}) read as {size} bytes, "
                         f"its source said {blob.size}: the image source is damaged or changed during the build")

    def check() -> None:
        got = hasher.digest()
        if got != blob.digest:
            raise BuildError(f"blob {blob.digest} ({', '.join(sorted(planned.used_by))}) hashes to {got}: "
                             "the image source is damaged or changed during the build")
    return check


def _write_member(out: _Output, name: str, data: bytes) -> None:
    out.write(bundle_format.tar_header(name, len(data)))
    out.write(data)
    out.write(bundle_format.tar_padding(len(data)))


# ----------------------------------------------------------------------------------------------------------
# The build


def build_bundle(model_path: str | Path, out_dir: str | Path, *, image_sources: list[str | img.ImageSource],
                 platforms: list[str], sign_key: str | Path | Any | None, base: str | Path | None = None,
                 have: str | Path | None = None, volume_size: int | str | None = None,
                 progress: Progress | None = None, base_pub: list[bytes] | None = None,
                 packages: list[str] | None = None, package_profiles: list[str] | None = None,
                 package_cache: str | Path | None = None, files: list[str] | None = None,
                 have_pub: list[bytes] | None = None, compression: Compression | None = None,
                 scan_cache: str | Path | None = None) -> BuildResult:
    """Build ``<out_dir>/<name>-<version>.bundle`` (or its parts). ``sign_key`` is a private key path or an
    Ed25519PrivateKey; None builds an unsigned bundle. ``base_pub``: trusted keys to check ``base`` with;
    ``have_pub``: site keys (raw Ed25519) one of which must have signed ``have`` (None: not checked).
    ``packages``: distro releases (e.g. ``debian-12``) whose OS package closures to carry for every
    platform's architecture (``package_profiles``: which profiles; None: all of the distro's). ``files``:
    ``--file`` specs (``NAME[@VERSION]/ARCH=PATH``) carried for the site's file tree. ``compression``: how
    blobs travel (default: zstd level 3 for the blobs that shrink). ``scan_cache``: a directory keeping the
    SBOM's layer scans across builds (``sbom.default_cache_dir()`` for the CLI and the module; None: every
    layer is read)."""
    if base is not None and have is not None:
        raise BuildError("give either a base bundle or a have-file, not both")
    if have_pub and have is None:
        raise BuildError("--have-pub checks the site signature of a --have file; give --have too")
    compression = compression or Compression()
    compression.check()
    model = load_app_model(model_path)
    key = signing.load_private_key(sign_key) if isinstance(sign_key, (str, Path)) else sign_key
    wanted = sorted({img.Platform.parse(p) for p in platforms}, key=str)
    if not wanted:
        raise BuildError("no platform given: use --platform linux/amd64[,linux/arm64]")
    vsize = parse_size(volume_size) if isinstance(volume_size, str) else volume_size
    out = Path(out_dir)
    if not out.is_dir():
        raise BuildError(f"output directory {out} does not exist")
    file_inputs = parse_file_specs(files or [], sorted({p.architecture for p in wanted}), model["version"])
    omit, delta = _delta(base, have, base_pub, have_pub)  # a bad base or have-file is refused before any image is read

    sources: list[img.ImageSource] = []
    try:
        for spec in image_sources:
            sources.append(img.open_source(spec))
        if not sources and app_model.image_refs(model):
            raise BuildError("no image source: add --images-from docker|archive:PATH|oci:PATH")
        resolved = img.resolve(list(app_model.image_refs(model).values()), wanted, sources)
        plan, model_blob, images_section = _plan(model, wanted, resolved)
        packages_section = _plan_packages(plan, packages or [], package_profiles, wanted, package_cache, progress)
        files_section = _plan_files(plan, file_inputs)
        scans = sbom_mod.LayerScanCache(scan_cache) if scan_cache is not None else None
        sbom_blob = _plan_sbom(plan, model, model_blob, wanted, resolved, packages_section, files_section,
                               scans, progress)
        omit.discard(model_blob.digest)  # the model always travels: inspect/diff need it from any bundle
        omit.discard(sbom_blob.digest)   # so does the SBOM: it describes the whole release, delta or not
        result = _write(model, plan, model_blob, images_section, packages_section, files_section, wanted, omit,
                        delta, key, out, vsize, progress, compression)
        if scans is not None:
            scans.save()  # only now: every digest the scans were filed under has been confirmed
        return result
    except (img.ImageError, signing.SigningError, pkgs.PackageError, pkgs.DistroError, sbom_mod.SbomError) as exc:
        raise BuildError(str(exc)) from None
    finally:
        for source in sources:
            source.close()


def _delta(base: str | Path | None, have: str | Path | None, base_pub: list[bytes] | None,
           have_pub: list[bytes] | None) -> tuple[set[str], dict[str, Any] | None]:
    if base is not None:
        return _base_delta(base, base_pub)
    if have is not None:
        digests, have_digest = load_have_file(have, have_pub)
        return digests, {"have": {"digest": have_digest, "file": Path(have).name, "blobs": len(digests)}}
    return set(), None


def _plan_packages(plan: _Plan, distros: list[str], profiles: list[str] | None, platforms: list[img.Platform],
                   cache: str | Path | None, progress: Progress | None) -> dict[str, Any]:
    """Add the OS package closures (one blob per .deb, one apt index blob per distro/arch) to the plan."""
    if not distros:
        return {}

    def say(message: str) -> None:
        if progress is not None:
            progress(0, 0, message)

    files = pkgs.resolve_all(distros, sorted({p.architecture for p in platforms}), profiles,
                             cache_dir=Path(cache) if cache else pkgs.default_cache_dir(), progress=say)
    for f in files:
        plan.add(img.Blob(f.digest, f.size, f.media_type, opener=lambda path=f.path: open(path, "rb")),
                 f.used_by[0])
        for used_by in f.used_by[1:]:
            plan.blobs[f.digest].used_by.add(used_by)
    section = pkgs.package_index(files)
    for key, pset in section.items():
        members = [f for f in files if f"{f.distro}/{f.target_arch}" == key]
        index = img.small_blob(pkgs.apt_index(members), APT_INDEX_MEDIA_TYPE)
        plan.add(index, f"packages:{key}")
        pset["index"] = index.digest
    return section


def _plan_files(plan: _Plan, inputs: list[FileInput]) -> dict[str, Any]:
    """Add each ``--file`` as a blob (hashed now; the copy re-checks it) and return the manifest's ``files``."""
    section: dict[str, Any] = {}
    for f in inputs:
        try:
            digest = "sha256:" + sha256_file(f.path)
            st = f.path.stat()
        except OSError as exc:
            raise BuildError(f"--file {f.spec!r}: cannot read {f.path}: {exc.strerror}") from None
        # Only the executable bit travels: the same bytes give the same manifest whoever built them.
        mode = "0755" if st.st_mode & 0o111 else "0644"
        plan.add(img.Blob(digest, st.st_size, FILE_MEDIA_TYPE, opener=lambda path=f.path: open(path, "rb")),
                 f"files:{f.key}")
        section[f.key] = {"name": f.name, "version": f.version, "arch": f.arch, "digest": digest,
                          "size": st.st_size, "mode": mode}
    return section


def _plan_sbom(plan: _Plan, model: dict[str, Any], model_blob: img.Blob, platforms: list[img.Platform],
               resolved: dict[tuple[str, img.Platform], img.ResolvedImage], packages_section: dict[str, Any],
               files_section: dict[str, Any], scans: sbom_mod.LayerScanCache | None,
               progress: Progress | None) -> img.Blob:
    """The release's CycloneDX SBOM (bundle_builder/sbom.py) as a blob, listed right after the model."""
    if progress is not None:
        progress(0, 0, "SBOM: reading the package databases of the image layers")
    builder = sbom_mod.SbomBuilder(model["name"], model["version"], {"name": BUILDER_NAME, "version": BUILDER_VERSION},
                                   scans)
    for image in sbom_mod.images_of(app_model.image_refs(model), platforms, resolved):
        builder.add_image(image)
    indexes = {key: plan.blobs[pset["index"]].blob.data or b"" for key, pset in packages_section.items()}
    builder.add_host_packages(packages_section, indexes)
    builder.add_files(files_section)
    blob = img.small_blob(builder.to_bytes(), bundle_format.SBOM_MEDIA_TYPE)
    rest = plan.blobs
    plan.blobs = {model_blob.digest: rest.pop(model_blob.digest)}
    plan.add(blob, bundle_format.SBOM_USED_BY)
    plan.blobs.update(rest)
    return blob


def _write(model: dict[str, Any], plan: _Plan, model_blob: img.Blob, images_section: dict[str, Any],
           packages_section: dict[str, Any], files_section: dict[str, Any], platforms: list[img.Platform], omit: set[str],
           delta: dict[str, Any] | None, key: Any, out: Path, volume_size: int | None,
           progress: Progress | None, compression: Compression) -> BuildResult:
    if progress is not None and compression.method != "none":
        progress(0, 0, "sampling blobs: which travel compressed")
    stored = _storage([p for d, p in plan.blobs.items() if d not in omit], compression)
    descriptors = [bundle_format.blob_descriptor(d, p.blob.size, p.blob.media_type, sorted(p.used_by),
                                                 bundled=d not in omit, stored=stored.get(d))
                   for d, p in plan.blobs.items()]
    manifest = bundle_format.build_manifest(
        name=model["name"], version=model["version"],
        builder={"name": BUILDER_NAME, "version": BUILDER_VERSION},
        platforms=[str(p) for p in platforms],
        model={"digest": model_blob.digest, "size": model_blob.size, "mediaType": model_blob.media_type},
        images=images_section, blobs=descriptors, delta=delta, packages=packages_section, files=files_section)
    manifest_bytes = canonical_json(manifest)
    final = out / f"{model['name']}-{model['version']}.bundle"
    bundled = [plan.blobs[d["digest"]] for d in descriptors if d["bundled"]]
    total = sum(p.blob.size for p in bundled)
    done = [0]

    def report(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total, "writing blobs")

    pool = bundle_format.hash_pool(2)  # part and whole-file hashes of a split bundle
    lanes = bundle_format.HashLanes()
    ring = bundle_format.BufferRing()
    output = _Output(final, volume_size, pool)
    writer = zstd.ZstdWriter(io.BytesIO(), compression.level, compression.threads) if stored else None
    try:
        _write_member(output, bundle_format.MANIFEST_NAME, manifest_bytes)
        keyid = None
        if key is not None:
            sig = signing.sign(key, manifest_bytes)
            keyid = json.loads(sig)["keyid"]
            _write_member(output, bundle_format.SIGNATURE_NAME, sig)
        checks = []
        for planned in bundled:
            if writer is not None and planned.blob.digest in stored:
                checks.append(_copy_compressed(output, planned, report, lanes, ring, writer))
            else:
                checks.append(_copy_blob(output, planned, report, lanes, ring))
        output.write(bundle_format.TAR_END)
        for check in checks:  # every digest confirmed before anything is published
            check()
        path, files = output.commit()
    except BaseException:
        output.abort()
        raise
    finally:
        lanes.shutdown()
        pool.shutdown(wait=True)
        if writer is not None:
            writer.release()
    if progress is not None:
        progress(total, total, "done")
    omitted = [d for d in descriptors if not d["bundled"]]
    return BuildResult(path=path, files=files, name=model["name"], version=model["version"],
                       manifest_digest=bundle_format.sha256_digest(manifest_bytes), signed_keyid=keyid,
                       platforms=[str(p) for p in platforms], blobs_total=len(descriptors),
                       blobs_bundled=len(bundled), bytes_total=sum(d["size"] for d in descriptors),
                       bytes_bundled=total, size=output.written, omitted=[d["digest"] for d in omitted],
                       omitted_bytes=sum(d["size"] for d in omitted), parts=len(output.parts),
                       compression={"method": compression.method, "level": compression.level,
                                    "blobs": len(stored), "bytes": sum(plan.blobs[d].blob.size for d in stored)})
