"""The bundle's SBOM: a CycloneDX 1.5 JSON document of what a release delivers, made at build time.

What it lists (docs/architecture.md, "SBOM"):

- per image and platform, a ``container`` component (purl ``pkg:oci/<name>@sha256:..?arch=..``) and the OS
  packages installed in it: ``var/lib/dpkg/status`` and ``var/lib/dpkg/status.d/*`` (distroless), and
  ``lib/apk/db/installed`` (Alpine), read from the layers in order with OCI whiteouts honoured, in memory
  (only those files are read; nothing is unpacked to disk); its ``operating-system`` from ``os-release``;
- the Debian packages the bundle carries for the site's hosts (the manifest's ``packages``, with the
  ``Source`` of their apt index stanza and the .deb's sha256);
- the binaries it carries (the manifest's ``files``: name, version, arch, sha256);
- dependencies: the release depends on its images, carried packages and files; each image on its OS and
  packages.

A package is one component per purl, shared by every image (and host package set) that has it. The same
inputs give the same bytes: canonical JSON, sorted components, a serial number derived from the content, a
timestamp from the newest image's ``created`` (none without images).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import io
import json
import os
import re
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, Sequence
from urllib.parse import quote

from offline_delivery_core.bundle.format import SBOM_MEDIA_TYPE, BundleError, parse_pax
from offline_delivery_core.common import zstd
from offline_delivery_core.common.digests import canonical_json, digest_hex
from offline_delivery_core.common.files import write_atomic
from offline_delivery_core.common.oci import DOCKER_LAYER_GZIP, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, split_reference

from . import cache_root

SPEC_VERSION = "1.5"
PROPERTY_PREFIX = "offline-delivery:"
DPKG_STATUS = "var/lib/dpkg/status"
DPKG_STATUS_D = "var/lib/dpkg/status.d/"
APK_INSTALLED = "lib/apk/db/installed"
OS_RELEASE = ("etc/os-release", "usr/lib/os-release")
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_TRACKED_FILE = 64 * 1024 * 1024  # a dpkg status of a large image is a few MB
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# The layer scan cache's format: bump it when what a LayerScan holds, or what is tracked, changes.
SCAN_VERSION = 1


class SbomError(ValueError):
    """A layer cannot be read for the SBOM (names the layer and the image)."""


# ----------------------------------------------------------------------------------------------------------
# Package URLs (https://github.com/package-url/purl-spec), canonical form


def _enc(text: str) -> str:
    """Percent-encoding as packageurl-python writes it (':' and '/' stay; names never hold a '/')."""
    return quote(text, safe=":/")


def purl(kind: str, namespace: str | None, name: str, version: str | None,
         qualifiers: Mapping[str, str | None] | None = None) -> str:
    """``pkg:<kind>/<namespace>/<name>@<version>?<k=v sorted>``, each part percent-encoded."""
    out = f"pkg:{kind}/" + (f"{_enc(namespace)}/" if namespace else "") + _enc(name)
    if version:
        out += "@" + _enc(version)
    quals = sorted((k, v) for k, v in (qualifiers or {}).items() if v)
    if quals:
        out += "?" + "&".join(f"{k}={_enc(v)}" for k, v in quals)
    return out


# ----------------------------------------------------------------------------------------------------------
# Package databases


def parse_stanzas(text: str) -> list[dict[str, str]]:
    """RFC 822-style stanzas (dpkg status, apt Packages): ``{Field: value}``, continuation lines joined."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
            current, last = {}, None
        elif line[0] in " \t":
            if last is not None:
                current[last] += "\n" + line.strip()
        elif ":" in line:
            key, _sep, value = line.partition(":")
            last = key.strip()
            current[last] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


@dataclass(frozen=True)
class OsPackage:
    """One installed or carried OS package."""

    kind: str            # "deb" or "apk"
    name: str
    version: str
    arch: str
    source: str = ""     # source package ("glibc", or "glibc@2.36-9" when its version differs)


def dpkg_packages(text: str) -> list[OsPackage]:
    """Installed packages of a dpkg status file (or a status.d entry, which may lack ``Status``)."""
    out = []
    for st in parse_stanzas(text):
        status = st.get("Status", "install ok installed").split()
        if "Package" not in st or "Version" not in st or status[-1:] != ["installed"]:
            continue
        out.append(OsPackage("deb", st["Package"], st["Version"], st.get("Architecture", ""),
                             _deb_source(st.get("Source", ""), st["Version"])))
    return out


def _deb_source(field_value: str, version: str) -> str:
    m = re.fullmatch(r"\s*(\S+)(?:\s*\((\S+)\))?\s*", field_value or "")
    if not m:
        return ""
    name, src_version = m.group(1), m.group(2)
    return f"{name}@{src_version}" if src_version and src_version != version else name


def apk_packages(text: str) -> list[OsPackage]:
    """Installed packages of Alpine's ``lib/apk/db/installed`` (one-letter fields, stanzas)."""
    out = []
    for block in text.split("\n\n"):
        st = dict(line.split(":", 1) for line in block.splitlines() if len(line) > 2 and line[1] == ":")
        if st.get("P") and st.get("V"):
            origin = st.get("o", "")
            out.append(OsPackage("apk", st["P"], st["V"], st.get("A", ""), origin if origin != st["P"] else ""))
    return out


def os_release(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip().strip("\"'")
    return out


# ----------------------------------------------------------------------------------------------------------
# Layers: the few tracked files, whiteouts honoured


def _tracked(path: str) -> bool:
    return (path in (DPKG_STATUS, APK_INSTALLED) or path in OS_RELEASE
            or (path.startswith(DPKG_STATUS_D) and "/" not in path[len(DPKG_STATUS_D):]
                and len(path) > len(DPKG_STATUS_D)))


@dataclass
class LayerScan:
    """What one layer does to the tracked files: whiteouts (paths deleted from lower layers), opaque
    directories (emptied of lower layers' entries), and tracked files it writes (None: something other than
    a regular file now stands there)."""

    whiteouts: list[str] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)
    files: dict[str, bytes | None] = field(default_factory=dict)


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def scan_layer(stream: IO[bytes], seekable: bool = False) -> LayerScan:
    """Read one layer tar (plain, gzip, bzip2 or xz) and keep only what the SBOM needs. A seekable plain tar
    is walked header by header (:func:`_scan_headers`, ~10x faster than ``tarfile``); anything that walk does
    not handle exactly as ``tarfile`` does is read with ``tarfile`` from the start."""
    if seekable:
        start = stream.tell()
        try:
            return _scan_headers(_positional_reader(stream, start))
        except _Unsupported:
            stream.seek(start)
    scan = LayerScan()
    mode = "r:" if seekable else "r|*"
    with tarfile.open(fileobj=stream, mode=mode) as tar:
        for member in tar:
            _record(scan, _norm(member.name), lambda m=member: _member_bytes(tar, m))
    return scan


def _record(scan: LayerScan, path: str, content: Any) -> None:
    """What one tar member means for the SBOM: a whiteout, an opaque directory, or a tracked file
    (``content()`` gives its bytes, None when it is not a regular file)."""
    parent, _sep, base = path.rpartition("/")
    if base == OPAQUE:
        scan.opaque.append(parent)
    elif base.startswith(WHITEOUT):
        scan.whiteouts.append((parent + "/" if parent else "") + base[len(WHITEOUT):])
    elif _tracked(path):
        scan.files[path] = content()


class _Unsupported(Exception):
    """The header walk met something it leaves to ``tarfile`` (read the layer again with it)."""


_BLOCK = 512
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_NO_DATA_TYPES = (tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.DIRTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
                  tarfile.FIFOTYPE)
_NAME_ENCODING = "utf-8"


def _positional_reader(stream: Any, start: int) -> Any:
    """``read_at(pos, n)`` over a seekable stream from ``start``: ``os.pread`` on its file (one system call
    a header, the stream's position untouched), or the stream's own ``read_at`` (a window of a file), else
    seek + read."""
    own = getattr(stream, "read_at", None)
    if own is not None:
        return own
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        fd = None
    if fd is not None:
        return lambda pos, n: os.pread(fd, n, start + pos)

    def read_at(pos: int, n: int) -> bytes:
        stream.seek(start + pos)
        return stream.read(n)
    return read_at


def _scan_headers(read_at: Any) -> LayerScan:
    """The members of a seekable plain tar, 512-byte header by header, seeking over the data: ustar and GNU
    headers, GNU long names and pax ``path``/``size`` records, as ``tarfile`` reads them. Raises
    ``_Unsupported`` for what it leaves to ``tarfile``: a damaged or truncated header (``tarfile`` decides
    whether that ends the archive or is an error), pax global headers, GNU sparse files, and hard links to a
    tracked path (``tarfile`` resolves those)."""
    scan = LayerScan()
    long_name: str | None = None
    pax: dict[str, str] = {}
    pos = 0
    while True:
        buf = read_at(pos, _BLOCK)
        if len(buf) < _BLOCK:
            if not buf and pos and long_name is None and not pax:
                return scan  # a tar without end blocks: tarfile stops here too
            raise _Unsupported  # an empty file is an error to tarfile, a truncated header is its call
        pos += _BLOCK
        if not buf[0] and buf.count(0) == _BLOCK:
            if long_name is not None or pax:
                raise _Unsupported
            return scan
        if _number(buf, 148, 156) != 256 + sum(buf) - sum(buf[148:156]):
            raise _Unsupported  # tarfile also accepts a signed checksum; let it judge
        kind = buf[156:157]
        size = _number(buf, 124, 136)
        data = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if kind == tarfile.GNUTYPE_LONGLINK:  # a long link target: not needed, and the names stay pending
            pos += data
            continue
        if kind in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            if size > MAX_TRACKED_FILE:
                raise _Unsupported
            payload = read_at(pos, data)
            if len(payload) < data:
                raise _Unsupported
            pos += data
            if kind == tarfile.GNUTYPE_LONGNAME:
                long_name = tarfile.nts(payload, _NAME_ENCODING, "surrogateescape")
            else:
                try:
                    pax.update(parse_pax(payload[:size], pos))
                except BundleError:
                    raise _Unsupported from None
            continue
        if kind in (tarfile.GNUTYPE_SPARSE, tarfile.XGLTYPE) or any(k.startswith("GNU.sparse") for k in pax):
            raise _Unsupported
        name = buf[0:100].split(b"\0", 1)[0].decode(_NAME_ENCODING, "surrogateescape")  # tarfile.nts
        if kind == tarfile.AREGTYPE and name.endswith("/"):
            kind = tarfile.DIRTYPE  # an old V7 directory, as tarfile reads it
        if buf[345] and kind not in tarfile.GNU_TYPES:  # a ustar prefix, as tarfile reads it whatever the magic
            name = buf[345:500].split(b"\0", 1)[0].decode(_NAME_ENCODING, "surrogateescape") + "/" + name
        if long_name is not None:
            name, long_name = long_name, None
        if "path" in pax:
            name = pax["path"]
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise _Unsupported from None
            data = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        pax = {}
        path = _norm(name)
        if kind == tarfile.LNKTYPE and _tracked(path):
            raise _Unsupported
        _record(scan, path, lambda k=kind, at=pos, n=size: _header_file_bytes(read_at, k, at, n))
        if kind not in _NO_DATA_TYPES:
            pos += data


def _number(buf: bytes, start: int, end: int) -> int:
    """A numeric header field as ``tarfile.nti`` reads it (octal text, or base-256 when the high bit is
    set); ``_Unsupported`` when it is neither."""
    if buf[start] & 0x80:
        try:
            return tarfile.nti(buf[start:end])
        except tarfile.HeaderError:
            raise _Unsupported from None
    try:
        return int(buf[start:end].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise _Unsupported from None


def _header_file_bytes(read_at: Any, kind: bytes, pos: int, size: int) -> bytes | None:
    """A tracked member's content (as :func:`_member_bytes` gives it)."""
    if kind not in _FILE_TYPES or size > MAX_TRACKED_FILE:
        return None
    content = read_at(pos, size)
    if len(content) < size:
        raise _Unsupported
    return content


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes | None:
    """A tracked file's content; None for anything else (a directory, a symlink such as Debian's
    ``etc/os-release``, a hard link a streamed tar cannot resolve, a file too large to be a package database)."""
    if not (member.isfile() or member.islnk()) or member.size > MAX_TRACKED_FILE:
        return None
    try:
        fh = tar.extractfile(member)
    except (tarfile.TarError, KeyError):
        return None
    return fh.read(MAX_TRACKED_FILE) if fh is not None else None


def default_cache_dir() -> Path:
    """``<cache_root()>/sbom``: the layer scans of the builds on this machine."""
    return cache_root() / "sbom"


class LayerScanCache:
    """Layer scans kept across builds, by layer digest, in ``<directory>/v<SCAN_VERSION>/<hex>.json``: the
    base layers every release shares are read once per machine, not once per build (a gzip layer must be
    inflated whole to be read). ``keep`` only notes a fresh scan; ``save`` writes them, and the builder calls
    it once every digest of the build has been confirmed, so a damaged source never leaves a scan under a
    digest its bytes do not have. An entry that cannot be read is a miss."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory) / f"v{SCAN_VERSION}"
        self._fresh: dict[str, LayerScan] = {}

    def _path(self, digest: str) -> Path:
        return self.directory / f"{digest_hex(digest)}.json"

    def get(self, digest: str) -> LayerScan | None:
        try:
            doc = json.loads(self._path(digest).read_bytes())
            return LayerScan(whiteouts=[str(p) for p in doc["whiteouts"]], opaque=[str(p) for p in doc["opaque"]],
                             files={str(k): None if v is None else base64.b64decode(v, validate=True)
                                    for k, v in doc["files"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            return None

    def keep(self, digest: str, scan: LayerScan) -> None:
        self._fresh[digest] = scan

    def save(self) -> None:
        """Write the scans noted since the last save (best effort: a cache that cannot be written is skipped)."""
        fresh, self._fresh = self._fresh, {}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for digest, scan in fresh.items():
                doc = {"whiteouts": scan.whiteouts, "opaque": scan.opaque,
                       "files": {k: None if v is None else base64.b64encode(v).decode("ascii")
                                 for k, v in scan.files.items()}}
                write_atomic(str(self._path(digest)), canonical_json(doc))
        except OSError:
            pass


def apply_layers(scans: Iterable[LayerScan]) -> dict[str, bytes]:
    """The tracked files of the image the layers make, lowest layer first (OCI image spec, "Whiteouts":
    a layer's whiteouts hide lower layers only, never its own files)."""
    state: dict[str, bytes] = {}
    for scan in scans:
        for gone in scan.whiteouts:
            for path in [p for p in state if p == gone or p.startswith(gone + "/")]:
                del state[path]
        for directory in scan.opaque:
            prefix = directory + "/" if directory else ""
            for path in [p for p in state if p.startswith(prefix)]:
                del state[path]
        for path, data in scan.files.items():
            if data is None:
                state.pop(path, None)
            else:
                state[path] = data
    return state


def _scan_blob(layer: Any, what: str) -> LayerScan:
    """Scan an ``images.Blob`` layer, however it is compressed."""
    with layer.open() as raw:
        try:
            if layer.media_type == OCI_LAYER_ZSTD or _peek(raw) == ZSTD_MAGIC:
                with io.BufferedReader(zstd.ZstdReader(raw)) as reader:  # libzstd, the bundle's own binding
                    return scan_layer(reader)  # type: ignore[arg-type]
            seekable = (layer.media_type not in (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP)
                        and getattr(raw, "seekable", lambda: False)())
            return scan_layer(raw, seekable=seekable)
        except (tarfile.TarError, EOFError, OSError, zstd.ZstdError) as exc:
            raise SbomError(f"{what}: cannot read it as a tar ({exc}); the image source is damaged") from None


def _peek(raw: Any) -> bytes:
    """The first bytes of a seekable stream (b"" otherwise, leaving it where it was)."""
    if not getattr(raw, "seekable", lambda: False)():
        return b""
    head = raw.read(4)
    raw.seek(0)
    return head


# ----------------------------------------------------------------------------------------------------------
# The document


@dataclass
class ImageInput:
    """One image of the release for one platform (from the builder's resolved images)."""

    component: str
    reference: str
    platform: str              # "linux/amd64"
    manifest_digest: str
    layers: Sequence[Any]      # images.Blob, lowest first
    created: str = ""          # the image config's "created"


def _property(name: str, value: str) -> dict[str, str]:
    return {"name": PROPERTY_PREFIX + name, "value": value}


def _os_component(rel: Mapping[str, str]) -> tuple[str, dict[str, Any]] | None:
    os_id, version = rel.get("ID", ""), rel.get("VERSION_ID", "")
    if not os_id:
        return None
    ref = f"os:{os_id}" + (f"@{version}" if version else "")
    comp: dict[str, Any] = {"type": "operating-system", "bom-ref": ref, "name": os_id}
    if version:
        comp["version"] = version
    if rel.get("PRETTY_NAME"):
        comp["description"] = rel["PRETTY_NAME"]
    return ref, comp


def _distro(rel: Mapping[str, str]) -> str:
    """The purl ``distro`` qualifier: ``debian-12``, ``alpine-3.19.1``."""
    os_id, version = rel.get("ID", ""), rel.get("VERSION_ID", "")
    return f"{os_id}-{version}" if os_id and version else os_id


def package_purl(pkg: OsPackage, distro: str, namespace: str) -> str:
    return purl(pkg.kind, namespace, pkg.name, pkg.version,
                {"arch": pkg.arch, "distro": distro, "upstream": pkg.source})


class _Components:
    """Components by bom-ref; a package seen in several places is one component."""

    def __init__(self) -> None:
        self.by_ref: dict[str, dict[str, Any]] = {}

    def package(self, pkg: OsPackage, distro: str, namespace: str) -> str:
        ref = package_purl(pkg, distro, namespace)
        if ref not in self.by_ref:
            comp: dict[str, Any] = {"type": "library", "bom-ref": ref, "name": pkg.name, "version": pkg.version,
                                    "purl": ref}
            props = _source_properties(pkg)
            if props:
                comp["properties"] = props
            self.by_ref[ref] = comp
        return ref

    def add_property(self, ref: str, name: str, value: str) -> None:
        props = self.by_ref[ref].setdefault("properties", [])
        prop = _property(name, value)
        if prop not in props:
            props.append(prop)
            props.sort(key=lambda p: (p["name"], p["value"]))


# Trivy does not read the purl's ``upstream``: it takes a package's source from these properties of its own
# namespace, and without them matches Debian's advisories (filed per source package) against the binary name.
TRIVY_PREFIX = "aquasecurity:trivy:"


def _source_properties(pkg: OsPackage) -> list[dict[str, str]]:
    """The source package for scanners: Trivy's SrcName/SrcVersion/SrcRelease/SrcEpoch (Grype reads the purl's
    ``upstream``). Trivy fills what is missing from the binary package's version."""
    if pkg.kind != "deb" or not pkg.source:
        return []
    name, _sep, version = pkg.source.partition("@")
    props = [{"name": TRIVY_PREFIX + "SrcName", "value": name}]
    if version:
        epoch, colon, rest = version.partition(":")
        if not colon:
            epoch, rest = "", version
        upstream, dash, revision = rest.rpartition("-")
        if not dash:
            upstream, revision = rest, ""
        if epoch and epoch != "0":
            props.append({"name": TRIVY_PREFIX + "SrcEpoch", "value": epoch})
        props.append({"name": TRIVY_PREFIX + "SrcVersion", "value": upstream})
        if revision:
            props.append({"name": TRIVY_PREFIX + "SrcRelease", "value": revision})
    return sorted(props, key=lambda p: p["name"])


def _sha256(digest: str) -> list[dict[str, str]]:
    return [{"alg": "SHA-256", "content": digest_hex(digest)}]


def _timestamp(created: Iterable[str]) -> str | None:
    """The newest ``created`` of the images, as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC), or None."""
    best = None
    for text in created:
        m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d+)?(Z|[+-]\d\d:\d\d)?", text or "")
        if not m:
            continue
        when = datetime.datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(2) in (None, "Z") else m.group(2)))
        when = when.astimezone(datetime.timezone.utc)
        best = when if best is None or when > best else best
    return best.strftime("%Y-%m-%dT%H:%M:%SZ") if best else None


class SbomBuilder:
    """Collects what a release delivers and writes the CycloneDX document. Layer scans are kept by digest,
    so a layer shared by images or platforms is read once."""

    def __init__(self, name: str, version: str, builder: Mapping[str, str],
                 cache: LayerScanCache | None = None) -> None:
        self.name, self.version, self.builder = name, version, dict(builder)
        self.cache = cache
        self.components = _Components()
        self.dependencies: dict[str, set[str]] = {"release": set()}
        self._scans: dict[str, LayerScan] = {}
        self._created: list[str] = []
        self.layers_read = 0

    # -- images --------------------------------------------------------------------------------------------

    def _layer(self, layer: Any, what: str) -> LayerScan:
        scan = self._scans.get(layer.digest)
        if scan is None and self.cache is not None:
            scan = self.cache.get(layer.digest)
        if scan is None:
            scan = _scan_blob(layer, f"layer {layer.digest} of {what}")
            self.layers_read += 1
            if self.cache is not None:
                self.cache.keep(layer.digest, scan)
        self._scans[layer.digest] = scan
        return scan

    def add_image(self, image: ImageInput) -> None:
        what = f"{image.reference} ({image.platform})"
        files = apply_layers(self._layer(layer, what) for layer in image.layers)
        rel = os_release((files.get(OS_RELEASE[0]) or files.get(OS_RELEASE[1]) or b"").decode("utf-8", "replace"))
        packages = []
        if DPKG_STATUS in files:
            packages += dpkg_packages(files[DPKG_STATUS].decode("utf-8", "replace"))
        for path in sorted(p for p in files if p.startswith(DPKG_STATUS_D)):
            if not path.endswith(".md5sums"):
                packages += dpkg_packages(files[path].decode("utf-8", "replace"))
        if APK_INSTALLED in files:
            packages += apk_packages(files[APK_INSTALLED].decode("utf-8", "replace"))
        repository, tag, _digest = split_reference(image.reference)
        arch = image.platform.split("/")[1]
        ref = f"image:{image.component}@{image.platform}"
        props = [_property("component", image.component), _property("platform", image.platform),
                 _property("reference", image.reference)]
        self.components.by_ref[ref] = {
            "type": "container", "bom-ref": ref, "name": repository, "version": tag or image.manifest_digest,
            "purl": purl("oci", None, repository.rsplit("/", 1)[-1], image.manifest_digest,
                         {"arch": arch, "repository_url": repository, "tag": tag}),
            "hashes": _sha256(image.manifest_digest), "properties": props}
        depends = set()
        os_comp = _os_component(rel)
        if os_comp is not None:
            self.components.by_ref.setdefault(*os_comp)
            depends.add(os_comp[0])
        namespace = rel.get("ID") if rel.get("ID") in ("debian", "ubuntu", "alpine") else (
            "alpine" if any(p.kind == "apk" for p in packages) else "debian")
        for pkg in packages:
            depends.add(self.components.package(pkg, _distro(rel), namespace))
        self.dependencies[ref] = depends
        self.dependencies["release"].add(ref)
        if image.created:
            self._created.append(image.created)

    # -- what the bundle carries for the hosts ---------------------------------------------------------------

    def add_host_packages(self, packages_section: Mapping[str, Any], indexes: Mapping[str, bytes]) -> None:
        """The manifest's ``packages`` (``<distro>/<arch>`` -> set) and each set's apt index bytes (for the
        ``Source`` of every .deb)."""
        for key, pset in sorted(packages_section.items()):
            sources = {(st.get("Package"), st.get("Version"), st.get("Architecture")): st.get("Source", "")
                       for st in parse_stanzas(indexes.get(key, b"").decode("utf-8", "replace"))}
            for entry in pset["packages"]:
                triple = (entry["package"], entry["version"], entry["architecture"])
                pkg = OsPackage("deb", *triple, source=_deb_source(sources.get(triple, ""), entry["version"]))
                ref = self.components.package(pkg, pset["distro"], "debian")
                comp = self.components.by_ref[ref]
                comp["hashes"] = _sha256(entry["digest"])
                self.components.add_property(ref, "carried-for", key)
                self.components.add_property(ref, "filename", entry["filename"])
                self.dependencies["release"].add(ref)

    def add_files(self, files_section: Mapping[str, Any]) -> None:
        """The manifest's ``files`` (binaries for the site's file tree)."""
        for key, entry in sorted(files_section.items()):
            ref = f"file:{key}"
            self.components.by_ref[ref] = {
                "type": "application", "bom-ref": ref, "name": entry["name"], "version": entry["version"],
                "purl": purl("generic", None, entry["name"], entry["version"],
                             {"arch": entry["arch"], "checksum": "sha256:" + digest_hex(entry["digest"])}),
                "hashes": _sha256(entry["digest"]),
                "properties": [_property("arch", entry["arch"]), _property("mode", entry["mode"])]}
            self.dependencies["release"].add(ref)

    # -- output ------------------------------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "tools": {"components": [{"type": "application", "name": self.builder["name"],
                                      "version": self.builder["version"]}]},
            "component": {"type": "application", "bom-ref": "release", "name": self.name, "version": self.version},
        }
        stamp = _timestamp(self._created)
        if stamp:
            metadata["timestamp"] = stamp
        doc: dict[str, Any] = {
            "bomFormat": "CycloneDX", "specVersion": SPEC_VERSION, "version": 1, "metadata": metadata,
            "components": [self.components.by_ref[r] for r in sorted(self.components.by_ref)],
            "dependencies": [{"ref": r, "dependsOn": sorted(d)} for r, d in sorted(self.dependencies.items())],
        }
        # Unique per content, the same for the same content: a name-based UUID of the document's digest.
        serial = uuid.uuid5(uuid.NAMESPACE_URL, "sha256:" + hashlib.sha256(canonical_json(doc)).hexdigest())
        doc["serialNumber"] = f"urn:uuid:{serial}"
        return doc

    def to_bytes(self) -> bytes:
        return canonical_json(self.document())


def images_of(model_images: Mapping[str, str], platforms: Sequence[Any],
              resolved: Mapping[tuple[str, Any], Any]) -> Iterator[ImageInput]:
    """ImageInputs from the builder's resolution (component -> reference; (reference, Platform) -> image)."""
    for component, reference in sorted(model_images.items()):
        for platform in platforms:
            image = resolved[(reference, platform)]
            try:
                with image.config.open() as fh:
                    config = json.loads(fh.read())
                created = str(config.get("created") or "") if isinstance(config, dict) else ""
            except ValueError:
                created = ""
            yield ImageInput(component, reference, str(platform), image.manifest.digest, image.layers, created)


__all__ = ["SBOM_MEDIA_TYPE", "SPEC_VERSION", "SbomBuilder", "SbomError", "ImageInput", "LayerScanCache", "images_of",
           "scan_layer", "apply_layers", "dpkg_packages", "apk_packages", "parse_stanzas", "purl"]
