# -*- coding: utf-8 -*-
# Copyright: offline.delivery contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Bundle format v1 and v2: manifest, blob paths, a safe streaming tar reader, verification and split parts.

Standard library only: the same code runs in the builder (as ``offline_delivery_core``) and in modules on
site hosts that may have nothing but python3. Memory stays bounded whatever the bundle size: blobs are
hashed while they are copied in chunks, never read whole.

The tar (``<name>-<version>.bundle``, uncompressed): ``manifest.json`` (canonical JSON), ``manifest.sig``
(absent when built ``--unsigned``), then ``blobs/sha256/<hex>`` for every blob the manifest marks
``bundled``, in manifest order. Regular files only, USTAR headers with mtime 0, uid/gid 0, no owner
names, mode 0644 (a PAX ``size`` record precedes members of 8 GiB or more), then two zero blocks.

Format 2 (MEDIA_TYPE_V2, ``schemaVersion`` 2) differs in one thing: a blob entry may say ``"stored": "zstd"``,
and that blob's member is ``blobs/sha256/<hex>.zst``, one zstd frame of its content (common/zstd.py, the
host's libzstd). Digests and sizes stay those of the uncompressed content; verification decompresses and
hashes the result, bounded by the signed size. A bundle with no compressed blob is written as format 1.

``manifest.json``::

    {"mediaType": MEDIA_TYPE, "schemaVersion": 1, "name": .., "version": ..,
     "builder": {"name": "bundle-builder", "version": ..},
     "platforms": ["linux/amd64", "linux/arm64"],                       # sorted
     "model": {"digest", "size", "mediaType": MODEL_MEDIA_TYPE},         # always bundled
     "images": {component: {"reference": .., "index": <digest of an OCI index blob>,
                            "manifests": {platform: <digest of that platform's image manifest>}}},
     "blobs": [{"digest", "size", "mediaType", "usedBy": [..], "bundled": true|false}, ..],
     "delta": null | {"base": {"name", "version", "manifest": <base manifest digest>}}
                   | {"have": {"digest": <have-file digest>, "file": <its name>, "blobs": <count>}},
     "files": {"<name>/<arch>": {"name", "version", "arch", "digest", "size", "mode": "0755"|"0644"}}}
                                                       # present only when the release carries files

``usedBy`` holds ``model``, ``sbom`` (the release's CycloneDX SBOM, media type SBOM_MEDIA_TYPE, at most one,
always bundled; absent in bundles built before it existed), the component name (its index),
``<component>@<platform>`` (manifest, config, layers), ``packages:<distro>/<arch>[/<profile>]`` or
``files:<name>/<arch>`` (a carried binary). Blobs are listed in first-use order: model, SBOM, then per
component (sorted) its index and per platform its manifest, config and layers. ``manifest.sig``: ``{"alg": "ed25519", "keyid": <hex sha256 of
the raw public key>, "sig": <base64 signature of the manifest.json bytes>}``.

Split sets: ``<file>.part000``, ``.part001``… and ``<file>.parts.json``: ``{"mediaType": PARTS_MEDIA_TYPE,
"file": <bundle name>, "size": <whole size>, "sha256": "sha256:<whole file>", "parts": [{"name", "size",
"sha256": "sha256:<hex>"}, ..]}``. Have-files (``--have``): ``{"mediaType": HAVE_MEDIA_TYPE (optional),
"blobs": ["sha256:<hex>", ..]}``.
"""

from __future__ import annotations

import base64
import binascii
import collections
import concurrent.futures
import hashlib
import json
import os
import re
from typing import Any, BinaryIO, Callable, Iterator

from ..common.digests import CHUNK_SIZE, ContentError, canonical_json, digest_hex, is_digest, sha256_digest, sha256_file
from ..common.files import read_full
from ..common.names import CONTROL_RE, name_problem, version_problem
from ..common.oci import OciError, check_descriptor
from ..common import zstd
from . import ed25519

MEDIA_TYPE = "application/vnd.offline-delivery.manifest.v1+json"
# Format 2: some blobs travel zstd-compressed (their entry says ``"stored": "zstd"``, their member is
# ``blobs/sha256/<hex>.zst``); everything else is format 1. A bundle without a compressed blob is written as
# format 1, byte for byte what builders before format 2 wrote, so older sites import it.
MEDIA_TYPE_V2 = "application/vnd.offline-delivery.manifest.v2+json"
MEDIA_TYPES = {1: MEDIA_TYPE, 2: MEDIA_TYPE_V2}
STORED_ZSTD = "zstd"
ZSTD_SUFFIX = ".zst"
MODEL_MEDIA_TYPE = "application/vnd.offline-delivery.model.v1+json"
PARTS_MEDIA_TYPE = "application/vnd.offline-delivery.parts.v1+json"
HAVE_MEDIA_TYPE = "application/vnd.offline-delivery.have.v1+json"
# The release's SBOM (CycloneDX JSON, IANA's media type): a blob used by "sbom", always bundled. It is found
# through the blob list, not a top-level field, so a site with an older collection still imports the bundle.
SBOM_MEDIA_TYPE = "application/vnd.cyclonedx+json"
SBOM_USED_BY = "sbom"
SIGNATURE_ALG = "ed25519"

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
BLOB_PREFIX = "blobs/sha256/"

MAX_MANIFEST_SIZE = 64 * 1024 * 1024
MAX_SIGNATURE_SIZE = 64 * 1024
MAX_PAX_HEADER_SIZE = 64 * 1024
MAX_PARTS_FILE_SIZE = 16 * 1024 * 1024
BLOCK = 512

_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_BLOB_NAME = re.compile(r"^blobs/sha256/[0-9a-f]{64}(\.zst)?\Z")
_PLATFORM = re.compile(r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?\Z")


class BundleError(ValueError):
    """A bundle (or one of its parts) is malformed, tampered with or not trusted.

    ``member`` names the tar member (or part file) at fault and ``offset`` its byte offset in the bundle
    stream, when known; the message says what is wrong and what to do.
    """

    def __init__(self, message: str, *, member: str | None = None, offset: int | None = None) -> None:
        self.member = member
        self.offset = offset
        where = []
        if member is not None:
            where.append(f"member {member!r}")
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.reason = message


# --------------------------------------------------------------------------------------------------------
# Canonical JSON and digests


def blob_path(digest: str) -> str:
    """Tar member name (and repository path) of a blob: ``blobs/sha256/<hex>``."""
    try:
        return BLOB_PREFIX + digest_hex(digest)
    except ContentError as exc:
        raise BundleError(str(exc)) from None


# --------------------------------------------------------------------------------------------------------
# Manifest


def blob_descriptor(digest: str, size: int, media_type: str, used_by: list[str] | tuple[str, ...],
                    bundled: bool = True, stored: str | None = None) -> dict[str, Any]:
    """A manifest's blob entry. ``stored``: how a bundled blob travels, ``"zstd"`` or None (as it is)."""
    out = {"digest": digest, "size": size, "mediaType": media_type, "usedBy": sorted(set(used_by)),
           "bundled": bundled}
    if stored is not None:
        out["stored"] = stored
    return out


def member_name(desc: dict[str, Any]) -> str:
    """Tar member name of a bundled blob: ``blobs/sha256/<hex>``, with ``.zst`` when it travels compressed."""
    return blob_path(desc["digest"]) + (ZSTD_SUFFIX if desc.get("stored") == STORED_ZSTD else "")


def build_manifest(*, name: str, version: str, builder: dict[str, str], platforms: list[str],
                   model: dict[str, Any], images: dict[str, Any], blobs: list[dict[str, Any]],
                   delta: dict[str, Any] | None, packages: dict[str, Any] | None = None,
                   files: dict[str, Any] | None = None) -> dict[str, Any]:
    """Assemble and validate a manifest (raises BundleError on an inconsistent one). ``files`` is written
    only when there are some, so a release without files keeps the manifest bytes it always had."""
    schema = 2 if any(b.get("stored") for b in blobs) else 1
    manifest: dict[str, Any] = {
        "packages": packages or {},
        "mediaType": MEDIA_TYPES[schema],
        "schemaVersion": schema,
        "name": name,
        "version": version,
        "builder": dict(builder),
        "platforms": list(platforms),
        "model": dict(model),
        "images": images,
        "blobs": blobs,
        "delta": delta,
    }
    if files:
        manifest["files"] = files
    validate_manifest(manifest)
    return manifest


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise BundleError(f"manifest.json: {where}: {what}", member=MANIFEST_NAME)


def _need_type(value: object, kind: type, where: str, what: str) -> Any:
    """``value`` when it is a ``kind``, else the schema error (also tells type checkers what it is)."""
    if not isinstance(value, kind):
        raise BundleError(f"manifest.json: {where}: {what}", member=MANIFEST_NAME)
    return value


def _check_descriptor(d: object, where: str) -> None:
    try:
        check_descriptor(d, where)
    except OciError as exc:
        raise BundleError(f"manifest.json: {exc}", member=MANIFEST_NAME) from None


_BLOB_KEYS = {"digest", "size", "mediaType", "usedBy", "bundled"}
_BLOB_KEYS_V2 = _BLOB_KEYS | {"stored"}
_TOP_KEYS = {"mediaType", "schemaVersion", "name", "version", "builder", "platforms", "model", "images",
             "blobs", "delta", "packages", "files"}
_PACKAGE_SET_KEYS = {"distro", "arch", "profiles", "packages", "index"}
_PACKAGE_KEYS = {"package", "version", "architecture", "filename", "digest", "size", "profiles"}
# A .deb file name as Debian's archive spells it (epoch colon as %3a); never a path.
_DEB_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+~%_-]*\.deb\Z")
_DISTRO_ARCH = re.compile(r"^[a-z0-9][a-z0-9.-]*/[a-z0-9]+\Z")


def _check_blobs(blobs: object, schema: int) -> dict[str, dict[str, Any]]:
    blobs = _need_type(blobs, list, "blobs", "must be a list")
    by_digest: dict[str, dict[str, Any]] = {}
    allowed = _BLOB_KEYS_V2 if schema == 2 else _BLOB_KEYS
    for i, b in enumerate(blobs):
        where = f"blobs[{i}]"
        _check_descriptor(b, where)
        extra = set(b) - allowed
        _need(not extra, where, f"unknown fields {sorted(extra)} (allowed: {sorted(allowed)})")
        if "stored" in b:
            _need(b["stored"] == STORED_ZSTD and b.get("bundled") is True, f"{where}.stored",
                  f"must be {STORED_ZSTD!r} (and only on a bundled blob); a blob stored as it is has no 'stored'")
        _need(isinstance(b.get("usedBy"), list) and all(isinstance(u, str) for u in b["usedBy"]),
              f"{where}.usedBy", "must be a list of strings")
        _need(isinstance(b.get("bundled"), bool), f"{where}.bundled", "must be true or false")
        _need(b["digest"] not in by_digest, where, f"blob {b['digest']} is listed twice")
        by_digest[b["digest"]] = b
    return by_digest


def _check_images(images: object, by_digest: dict[str, dict[str, Any]], platforms: list[str]) -> None:
    images = _need_type(images, dict, "images", "must be an object (component -> image)")
    for comp, img in images.items():
        where = f"images.{comp}"
        problem = name_problem(comp, "component name")
        _need(problem is None, where, problem or "")
        _need(isinstance(img, dict), where, "must be an object")
        _need(isinstance(img.get("reference"), str) and not CONTROL_RE.search(img["reference"]),
              f"{where}.reference", "must be a string without control characters")
        _need(img.get("index") in by_digest, f"{where}.index", "must be the digest of a listed blob")
        mans = img.get("manifests")
        _need(isinstance(mans, dict) and set(mans) == set(platforms), f"{where}.manifests",
              f"must map each platform {platforms} to a manifest digest")
        for plat, dig in mans.items():
            _need(dig in by_digest, f"{where}.manifests.{plat}", "must be the digest of a listed blob")


def _check_delta(delta: object, by_digest: dict[str, dict[str, Any]]) -> None:
    omitted = [d for d, b in by_digest.items() if not b["bundled"]]
    if delta is None:
        _need(not omitted, "delta", f"is null but {len(omitted)} blobs are marked bundled: false")
        return
    delta = _need_type(delta, dict, "delta", "must be null or an object")
    if "base" in delta:
        base = delta["base"]
        _need(isinstance(base, dict) and is_digest(base.get("manifest")), "delta.base",
              "must hold name, version and the base manifest digest")
    elif "have" in delta:
        have = delta["have"]
        _need(isinstance(have, dict) and is_digest(have.get("digest")), "delta.have",
              "must hold the have-file digest")
    else:
        _need(False, "delta", "must hold 'base' or 'have'")


def validate_manifest(manifest: object) -> dict[str, Any]:
    """Schema and consistency checks; returns the manifest or raises BundleError naming the field."""
    manifest = _need_type(manifest, dict, "(top)", "must be a JSON object")
    _need(manifest.get("mediaType") in MEDIA_TYPES.values(), "mediaType",
          f"is {manifest.get('mediaType')!r}, expected one of {sorted(MEDIA_TYPES.values())} (a bundle from "
          "another tool, or a newer format: update the offline.delivery collection)")
    schema = manifest.get("schemaVersion")
    _need(isinstance(schema, int) and not isinstance(schema, bool) and MEDIA_TYPES.get(schema) == manifest["mediaType"],
          "schemaVersion", f"must be the version of its mediaType ({', '.join(f'{k} for {v}' for k, v in MEDIA_TYPES.items())})")
    extra = set(manifest) - _TOP_KEYS
    _need(not extra, "(top)", f"unknown fields {sorted(extra)} (allowed: {sorted(_TOP_KEYS)})")
    # name and version become directories of the site repository: the model's rules, before any path is made
    problem = name_problem(manifest.get("name"), "application name")
    _need(problem is None, "name", problem or "")
    problem = version_problem(manifest.get("version"))
    _need(problem is None, "version", problem or "")
    builder = manifest.get("builder")
    _need(isinstance(builder, dict) and all(isinstance(builder.get(k), str) for k in ("name", "version")),
          "builder", "must hold name and version strings")
    platforms = manifest.get("platforms")
    _need(isinstance(platforms, list) and all(isinstance(p, str) and _PLATFORM.match(p) for p in platforms),
          "platforms", "must be a list like ['linux/amd64', 'linux/arm64']")
    by_digest = _check_blobs(manifest.get("blobs"), schema)
    _check_descriptor(manifest.get("model"), "model")
    model = manifest["model"]
    _need(model["digest"] in by_digest and by_digest[model["digest"]]["bundled"], "model",
          "the model blob must be listed in blobs and bundled")
    _need(by_digest[model["digest"]]["size"] == model["size"], "model.size", "differs from its blobs entry")
    _check_images(manifest.get("images"), by_digest, platforms)
    _check_sbom(by_digest)
    _check_delta(manifest.get("delta"), by_digest)
    _check_packages(manifest.get("packages", {}), by_digest)
    _check_files(manifest.get("files", {}), by_digest, platforms)
    return manifest


def _check_sbom(by_digest: dict[str, dict[str, Any]]) -> None:
    sboms = [b for b in by_digest.values() if SBOM_USED_BY in b["usedBy"]]
    _need(len(sboms) <= 1, "blobs", f"{len(sboms)} blobs are used by {SBOM_USED_BY!r}; a release has one SBOM")
    for b in sboms:
        _need(b["bundled"] and b["mediaType"] == SBOM_MEDIA_TYPE and b["usedBy"] == [SBOM_USED_BY],
              f"blob {b['digest']}", f"the SBOM must be bundled, of media type {SBOM_MEDIA_TYPE} and used by "
              f"{SBOM_USED_BY!r} only")


def sbom_descriptor(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The blob entry of the release's SBOM, or None for a bundle built without one."""
    for b in manifest["blobs"]:
        if SBOM_USED_BY in b["usedBy"]:
            return b
    return None


def _check_packages(packages: object, by_digest: dict[str, dict[str, Any]]) -> None:
    """``{"<distro>/<arch>": {distro, arch, profiles, index, packages: [...]}}``: OS packages per distro
    release and architecture; ``index`` is the digest of their apt ``Packages`` stanzas (a blob)."""
    packages = _need_type(packages, dict, "packages", "must be an object (distro/arch -> package set)")
    for key, pset in packages.items():
        where = f"packages.{key}"
        _need(isinstance(key, str) and bool(_DISTRO_ARCH.match(key)), where, "key must be '<distro>/<arch>'")
        pset = _need_type(pset, dict, where, "must be an object")
        extra = set(pset) - _PACKAGE_SET_KEYS
        _need(not extra, where, f"unknown fields {sorted(extra)} (allowed: {sorted(_PACKAGE_SET_KEYS)})")
        _need(f"{pset.get('distro')}/{pset.get('arch')}" == key, where, "distro and arch must match the key")
        _need(pset.get("index") in by_digest, f"{where}.index", "must be the digest of a listed blob")
        entries = _need_type(pset.get("packages"), list, f"{where}.packages", "must be a list")
        for i, entry in enumerate(entries):
            ew = f"{where}.packages[{i}]"
            entry = _need_type(entry, dict, ew, "must be an object")
            _need(set(entry) == _PACKAGE_KEYS, ew, f"must have exactly the fields {sorted(_PACKAGE_KEYS)}")
            _need(isinstance(entry["filename"], str) and bool(_DEB_FILENAME.match(entry["filename"])),
                  f"{ew}.filename", "must be a plain .deb file name (no directories)")
            desc = by_digest.get(entry["digest"])
            _need(desc is not None and desc["size"] == entry["size"], f"{ew}.digest",
                  "must be the digest of a listed blob of the same size")


FILE_MEDIA_TYPE = "application/vnd.offline-delivery.file.v1"
# A carried file's name: the component-name rule (it is also the file's name on the site, no extension).
FILE_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?\Z")
# Its version: starts alphanumeric (never "." or ".."), no "/" - it is a directory name on the site.
FILE_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_~-]{0,127}\Z")
FILE_MODES = ("0644", "0755")
_FILE_KEYS = {"name", "version", "arch", "digest", "size", "mode"}


def _check_files(files: object, by_digest: dict[str, dict[str, Any]], platforms: list[str]) -> None:
    """``{"<name>/<arch>": {name, version, arch, digest, size, mode}}``: binaries carried for the site's
    file tree, one version per name and architecture; each is a listed blob used by ``files:<name>/<arch>``."""
    files = _need_type(files, dict, "files", "must be an object (<name>/<arch> -> file)")
    arches = sorted({p.split("/")[1] for p in platforms})
    for key, entry in files.items():
        where = f"files.{key}"
        entry = _need_type(entry, dict, where, "must be an object")
        _need(set(entry) == _FILE_KEYS, where, f"must have exactly the fields {sorted(_FILE_KEYS)}")
        name, version, arch = entry["name"], entry["version"], entry["arch"]
        _need(isinstance(name, str) and bool(FILE_NAME_RE.match(name)), f"{where}.name",
              "must be lowercase letters, digits and '-' (max 40), starting and ending alphanumeric")
        _need(isinstance(version, str) and bool(FILE_VERSION_RE.match(version)), f"{where}.version",
              "must start with a letter or digit and hold only letters, digits and . + _ ~ - (max 128)")
        _need(arch in arches, f"{where}.arch", f"must be one of the bundle's architectures {arches}")
        _need(key == f"{name}/{arch}", where, "key must be '<name>/<arch>' of the entry")
        _need(entry["mode"] in FILE_MODES, f"{where}.mode", f"must be one of {list(FILE_MODES)}")
        desc = by_digest.get(entry["digest"]) if isinstance(entry["digest"], str) else None
        size = entry["size"]
        if desc is None or isinstance(size, bool) or not isinstance(size, int) or desc["size"] != size:
            _need(False, f"{where}.digest", "must be the digest of a listed blob of the same size")
        else:
            _need(f"files:{key}" in desc["usedBy"], f"{where}.digest", f"its blob must list 'files:{key}' in usedBy")


def parse_manifest(data: bytes) -> dict[str, Any]:
    """Parse and validate the bytes of manifest.json."""
    try:
        manifest = json.loads(data.decode("utf-8"))
        canonical = canonical_json(manifest) == data
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than Python's
        raise BundleError(f"manifest.json is not valid UTF-8 JSON ({exc}); the bundle is damaged, "
                          "copy it again", member=MANIFEST_NAME) from None
    if not canonical:
        # One byte form per manifest: no duplicate keys or whitespace that two parsers could read differently.
        raise BundleError("manifest.json is not canonical JSON (sorted keys, no spaces, no duplicate keys); "
                          "it was not written by bundle-builder or was edited", member=MANIFEST_NAME)
    return validate_manifest(manifest)


def bundled_blobs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in manifest["blobs"] if b["bundled"]]


def summarize_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a release is, in a few fields (inspect, bundle_info): name, version, platforms, components,
    images (reference, index and per-platform manifest digests), blob counts and bytes, delta."""
    bundled = bundled_blobs(manifest)
    return {
        "name": manifest["name"],
        "version": manifest["version"],
        "builder": dict(manifest["builder"]),
        "platforms": list(manifest["platforms"]),
        "components": sorted(manifest["images"]),
        "images": manifest["images"],
        "blobs": len(manifest["blobs"]),
        "bytes": sum(b["size"] for b in manifest["blobs"]),
        "bundled_blobs": len(bundled),
        "bundled_bytes": sum(b["size"] for b in bundled),
        "omitted_blobs": len(manifest["blobs"]) - len(bundled),
        "omitted_bytes": sum(b["size"] for b in manifest["blobs"]) - sum(b["size"] for b in bundled),
        "delta": manifest["delta"],
        "format": manifest["schemaVersion"],
        "compressed_blobs": sum(1 for b in bundled if b.get("stored")),
        "compressed_blobs_bytes": sum(b["size"] for b in bundled if b.get("stored")),
        "packages": {key: {"profiles": pset["profiles"], "files": len(pset["packages"]),
                           "bytes": sum(p["size"] for p in pset["packages"])}
                     for key, pset in sorted(manifest.get("packages", {}).items())},
        "files": {key: {k: entry[k] for k in ("name", "version", "arch", "digest", "size", "mode")}
                  for key, entry in sorted(manifest.get("files", {}).items())},
        "sbom": _sbom_summary(manifest),
    }


def _sbom_summary(manifest: dict[str, Any]) -> dict[str, Any] | None:
    desc = sbom_descriptor(manifest)
    return None if desc is None else {"digest": desc["digest"], "size": desc["size"], "mediaType": desc["mediaType"]}


# --------------------------------------------------------------------------------------------------------
# Signature


def make_signature_doc(public_key: bytes, signature: bytes) -> bytes:
    return canonical_json({"alg": SIGNATURE_ALG, "keyid": ed25519.public_key_id(public_key),
                           "sig": base64.b64encode(signature).decode("ascii")})


def parse_signature_doc(data: bytes) -> tuple[str, bytes]:
    """(keyid, raw signature) from manifest.sig."""
    try:
        doc = json.loads(data.decode("utf-8"))
        ok = isinstance(doc, dict) and doc.get("alg") == SIGNATURE_ALG
        keyid, sig_b64 = doc.get("keyid"), doc.get("sig")
        ok = ok and isinstance(keyid, str) and bool(_HEX64.match(keyid)) and isinstance(sig_b64, str)
        sig = base64.b64decode(sig_b64, validate=True) if ok else b""
    except (UnicodeDecodeError, ValueError, RecursionError, binascii.Error, AttributeError):
        ok, sig, keyid = False, b"", ""
    if not ok or len(sig) != 64:
        raise BundleError("manifest.sig is not a valid ed25519 signature document "
                          '({"alg": "ed25519", "keyid": <hex>, "sig": <base64 of 64 bytes>}); '
                          "the bundle is damaged or was tampered with", member=SIGNATURE_NAME)
    return keyid, sig


def check_signature(manifest_bytes: bytes, sig_doc: bytes | None, trusted_keys: list[bytes]) -> str:
    """Raise BundleError unless ``sig_doc`` is a signature of ``manifest_bytes`` by a trusted key.

    Returns the key id that signed it.
    """
    if sig_doc is None:
        raise BundleError("the bundle is unsigned (no manifest.sig), but a trusted public key was given; "
                          "rebuild it with --sign-key, or check it without a key if you accept unsigned bundles",
                          member=SIGNATURE_NAME)
    keyid, sig = parse_signature_doc(sig_doc)
    by_id = {ed25519.public_key_id(k): k for k in trusted_keys}
    if keyid not in by_id:
        raise BundleError(f"manifest.sig names key sha256:{keyid}, which is not one of the trusted keys "
                          f"({', '.join('sha256:' + k[:16] + '…' for k in sorted(by_id)) or 'none'}); the bundle "
                          "was signed (or re-signed) by another key — compare that fingerprint with the vendor's "
                          "over a channel you trust before pinning it, or refuse the bundle", member=SIGNATURE_NAME)
    if not ed25519.verify(by_id[keyid], manifest_bytes, sig):
        raise BundleError("the signature does not match manifest.json: the manifest or the signature was "
                          "modified after signing; refuse this bundle and get a fresh copy",
                          member=SIGNATURE_NAME)
    return keyid


# --------------------------------------------------------------------------------------------------------
# Hashing off the main thread


class BackgroundHasher:
    """sha256 updated on a worker thread, so hashing overlaps reading and writing (hashlib releases the GIL
    on buffers over 2 KiB). Updates apply in order; at most one is in flight, so memory stays bounded."""

    def __init__(self, pool: concurrent.futures.Executor) -> None:
        self._hash = hashlib.sha256()
        self._pool = pool
        self._pending: concurrent.futures.Future[None] | None = None

    def update(self, data: bytes) -> None:
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(self._hash.update, data)

    def digest(self) -> str:
        """``sha256:<hex>`` of everything given so far."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        return "sha256:" + self._hash.hexdigest()


def hash_pool(workers: int = 1) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sha256")


MAX_HASH_BACKLOG = 48 * 1024 * 1024


class HashLanes:
    """Hash several blobs at once on a few single-thread lanes (blob i on lane i mod n, its chunks in order).

    The reader never waits for a blob's digest, only for room in a bounded backlog (``max_backlog`` bytes of
    chunks not hashed yet), so while one lane still hashes a big blob the next blob is read and hashed on
    another core. Used where a digest can be checked later: before a build is published, or at the end of
    a verification without a sink.
    """

    def __init__(self, lanes: int | None = None, max_backlog: int = MAX_HASH_BACKLOG) -> None:
        count = lanes or max(1, min(2, os.cpu_count() or 1))
        self._pools = [hash_pool() for dummy in range(count)]
        self._next = 0
        self._queue: collections.deque[tuple[concurrent.futures.Future[None], int]] = collections.deque()
        self._queued = 0
        self._max = max_backlog

    def hasher(self) -> "LaneHasher":
        pool = self._pools[self._next % len(self._pools)]
        self._next += 1
        return LaneHasher(self, pool)

    def submit(self, pool: concurrent.futures.Executor, fn: Callable[[bytes | memoryview], None],
               data: bytes | memoryview) -> concurrent.futures.Future[None]:
        while self._queue and self._queued + len(data) > self._max:
            future, size = self._queue.popleft()
            future.result()
            self._queued -= size
        future = pool.submit(fn, data)
        self._queue.append((future, len(data)))
        self._queued += len(data)
        return future

    def shutdown(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True)


class LaneHasher:
    """The sha256 of one blob on one lane of a HashLanes."""

    def __init__(self, lanes: HashLanes, pool: concurrent.futures.Executor) -> None:
        self._lanes = lanes
        self._pool = pool
        self._hash = hashlib.sha256()
        self._last: concurrent.futures.Future[None] | None = None

    def update(self, data: bytes | memoryview) -> concurrent.futures.Future[None]:
        """Queue ``data``; the returned future is done once it has been hashed (a caller reusing the
        buffer behind ``data`` must wait for it)."""
        self._last = self._lanes.submit(self._pool, self._hash.update, data)
        return self._last

    def done(self) -> bool:
        return self._last is None or self._last.done()

    def digest(self) -> str:
        if self._last is not None:
            self._last.result()  # a lane runs its chunks in order: the last one done means all are
        return "sha256:" + self._hash.hexdigest()


class BufferRing:
    """Read buffers used over and over: a fresh 1 MiB ``bytes`` per chunk costs an allocation and page
    faults on every read. A buffer is handed out again only once the consumer that got its previous
    content (a hash lane) is done with it; buffers are allocated on first use, so a short stream stays small.
    """

    def __init__(self, count: int = 16, size: int = CHUNK_SIZE) -> None:
        self._size = size
        self._buffers: list[bytearray | None] = [None] * count
        self._busy: list[concurrent.futures.Future[None] | None] = [None] * count
        self._next = 0

    def take(self) -> tuple[int, bytearray]:
        """A free buffer (waiting for its last consumer when needed) and its slot for ``hold``."""
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        busy = self._busy[slot]
        if busy is not None:
            busy.result()
            self._busy[slot] = None
        buf = self._buffers[slot]
        if buf is None:
            buf = self._buffers[slot] = bytearray(self._size)
        return slot, buf

    def hold(self, slot: int, until: concurrent.futures.Future[None]) -> None:
        """Keep ``slot`` from being handed out again before ``until`` is done."""
        self._busy[slot] = until


# --------------------------------------------------------------------------------------------------------
# Byte sources: one file, or a split set of parts read as one stream


class PartsReader:
    """Reads the parts listed in ``<file>.parts.json`` as one stream. Each part's size is checked when it is
    opened; its sha256 is not computed on the way: the blob digests under the signed manifest prove every
    byte (parts.json is not signed), so a split bundle is hashed once, like a single file. The part hashes
    name a damaged part once something inside it failed (``check_parts``), or check media on request
    (``check_media``)."""

    def __init__(self, parts_json: str) -> None:
        self.parts_json = parts_json
        self.directory = os.path.dirname(os.path.abspath(parts_json))
        self.doc = load_parts_doc(parts_json)
        self.parts: list[dict[str, Any]] = self.doc["parts"]
        self._index = -1
        self._fh: BinaryIO | None = None
        self._left = 0
        self._offset = 0
        self._starts: list[int] = []
        pos = 0
        for part in self.parts:
            self._starts.append(pos)
            pos += part["size"]
        self._open_next()

    @property
    def current_part(self) -> str | None:
        if 0 <= self._index < len(self.parts):
            return self.parts[self._index]["name"]
        return None

    def _path(self, index: int) -> str:
        return os.path.join(self.directory, self.parts[index]["name"])

    def _open_next(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._index += 1
        if self._index >= len(self.parts):
            return
        part = self.parts[self._index]
        self._left = 0
        try:
            self._fh = open(self._path(self._index), "rb")  # pylint: disable=consider-using-with
        except OSError as exc:
            raise BundleError(f"part {part['name']} ({self._index + 1} of {len(self.parts)}) is missing or "
                              f"unreadable ({exc.strerror}); copy every part next to {os.path.basename(self.parts_json)}",
                              member=part["name"], offset=self._offset) from None
        actual = os.fstat(self._fh.fileno()).st_size
        if actual != part["size"]:
            self._fh.close()
            self._fh = None  # nothing more to read or check in this set
            raise BundleError(f"part {part['name']} is {actual} bytes, parts.json says {part['size']}; "
                              "it is truncated or not part of this set: copy it again",
                              member=part["name"], offset=self._offset)
        self._left = part["size"]

    def _which_part_is_it(self, index: int, digest: str) -> str:
        """Name the other part this content belongs to, when it matches one (parts swapped or renamed)."""
        for i, other in enumerate(self.parts):
            if i != index and other["sha256"] == digest:
                return f" — its content is that of {other['name']} (parts out of order or renamed?)"
        return ""

    def _check_part_hash(self, index: int) -> None:
        """Hash part ``index`` from its file (apart from the stream) and compare it with parts.json."""
        part = self.parts[index]
        try:
            got = "sha256:" + sha256_file(self._path(index))
        except OSError as exc:
            raise BundleError(f"part {part['name']} is unreadable ({exc.strerror}); copy it again",
                              member=part["name"], offset=self._starts[index]) from None
        if got != part["sha256"]:
            hint = self._which_part_is_it(index, got)
            raise BundleError(f"part {part['name']} has sha256 {got}, parts.json says {part['sha256']}{hint}; "
                              "the part is damaged: copy it again", member=part["name"], offset=self._starts[index])

    def _part_at(self, offset: int) -> int:
        index = 0
        while index + 1 < len(self.parts) and self._starts[index + 1] <= offset:
            index += 1
        return index

    def read(self, n: int) -> bytes:
        out = bytearray(n)
        got = self.readinto(memoryview(out))
        del out[got:]
        return bytes(out)

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` from the stream (fewer bytes only at its end)."""
        got = 0
        while got < len(view) and self._fh is not None:
            if self._left == 0:
                self._open_next()
                continue
            n = self._fh.readinto(view[got:got + min(len(view) - got, self._left)])  # type: ignore[attr-defined]
            if not n:  # the file shrank while we read it
                raise BundleError(f"part {self.current_part} ended early", member=self.current_part,
                                  offset=self._offset)
            self._left -= n
            self._offset += n
            got += n
        if self._fh is not None and self._left == 0 and self._index == len(self.parts) - 1:
            self._open_next()
        return got

    def check_parts(self, offset: int | None) -> None:
        """After a failure at stream ``offset`` (None: where the stream is now), hash the parts from the one
        holding that offset up to the current one, and raise naming the first damaged part. The failing
        blob may have been checked after the stream read on, so its part may be behind the current one."""
        # a part that could not be opened (missing, wrong size) has its own error already: check those before it
        last = self._index if self._fh is not None else self._index - 1
        first = last if offset is None else min(self._part_at(offset), last)
        for index in range(max(first, 0), last + 1):
            self._check_part_hash(index)

    def check_media(self) -> None:
        """Explicit media check: every part's size and sha256 against parts.json, in order."""
        for index, part in enumerate(self.parts):
            try:
                size = os.path.getsize(self._path(index))
            except OSError as exc:
                raise BundleError(f"part {part['name']} ({index + 1} of {len(self.parts)}) is missing or unreadable "
                                  f"({exc.strerror})", member=part["name"], offset=self._starts[index]) from None
            if size != part["size"]:
                raise BundleError(f"part {part['name']} is {size} bytes, parts.json says {part['size']}; copy it "
                                  "again", member=part["name"], offset=self._starts[index])
            self._check_part_hash(index)

    def finish(self) -> None:
        """Check that every part was read whole (their sizes add up to the size parts.json gives)."""
        while self._fh is not None:
            if not self.read(CHUNK_SIZE):
                break
        if self._offset != self.doc["size"]:
            raise BundleError(f"the reassembled parts are {self._offset} bytes, parts.json says {self.doc['size']}",
                              member=os.path.basename(self.parts_json))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def load_parts_doc(parts_json: str) -> dict[str, Any]:
    name = os.path.basename(parts_json)
    try:
        if os.path.getsize(parts_json) > MAX_PARTS_FILE_SIZE:
            raise BundleError(f"{name} is larger than {MAX_PARTS_FILE_SIZE} bytes: not a parts list")
        with open(parts_json, "rb") as fh:
            doc = json.loads(fh.read().decode("utf-8"))
    except OSError as exc:
        raise BundleError(f"cannot read {parts_json}: {exc.strerror}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"{name} is not valid JSON ({exc})") from None
    ok = (isinstance(doc, dict) and doc.get("mediaType") == PARTS_MEDIA_TYPE and isinstance(doc.get("parts"), list)
          and bool(doc["parts"]) and isinstance(doc.get("size"), int) and is_digest(doc.get("sha256"))
          and isinstance(doc.get("file"), str) and os.path.basename(doc["file"]) == doc["file"])
    for p in doc.get("parts", []) if ok else []:
        ok = ok and isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("size"), int)
        ok = ok and is_digest(p.get("sha256"))
    if ok:
        # The builder names parts <file>.part000, .part001, ... in order (plain names next to parts.json): a list
        # edited out of order or with a part listed twice is named here, not later by whichever blob straddles
        # the misplaced part.
        for index, part in enumerate(doc["parts"]):
            expected = f"{doc['file']}.part{index:03d}"
            if part.get("name") != expected:
                raise BundleError(f"{name}: entry {index} of 'parts' is {str(part.get('name'))[:120]!r}, but the "
                                  f"parts are {doc['file']}.part000, .part001, ... in order, so it must be "
                                  f"{expected!r}: the list was edited; take it from the original media")
    if not ok:
        raise BundleError(f"{name} is not a valid parts list (mediaType {PARTS_MEDIA_TYPE}, 'parts' with name, "
                          "size, sha256 each, plus the whole file's size and sha256)")
    return doc


class FileReader:
    """A plain bundle file."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fh: BinaryIO = open(path, "rb")  # pylint: disable=consider-using-with
        except OSError as exc:
            raise BundleError(f"cannot open bundle {path}: {exc.strerror}") from None
        self.current_part = None

    def read(self, n: int) -> bytes:
        return self._fh.read(n)

    def readinto(self, view: memoryview) -> int:
        return read_full(self._fh, view)

    def check_parts(self, offset: int | None) -> None:
        return None

    def finish(self) -> None:
        return None

    def close(self) -> None:
        self._fh.close()


_PART_SUFFIX = re.compile(r"^(?P<base>.+)\.part\d{3,}\Z")


def resolve_bundle_path(path: str) -> tuple[str, str]:
    """('file', path) or ('parts', path-of-parts.json) for a bundle file, a ``.parts.json``, the first (or
    any) ``.partNNN`` of a split set, or a directory holding exactly one bundle or parts list."""
    if os.path.isdir(path):
        entries = sorted(os.listdir(path))
        parts = [e for e in entries if e.endswith(".parts.json")]
        bundles = [e for e in entries if e.endswith(".bundle")]
        if len(parts) == 1:
            return "parts", os.path.join(path, parts[0])
        if not parts and len(bundles) == 1:
            return "file", os.path.join(path, bundles[0])
        raise BundleError(f"{path} is a directory with {len(parts)} parts lists and {len(bundles)} bundle files; "
                          "name the bundle file or its .parts.json")
    if path.endswith(".parts.json"):
        return "parts", path
    m = _PART_SUFFIX.match(path)
    if m and os.path.exists(m.group("base") + ".parts.json"):
        return "parts", m.group("base") + ".parts.json"
    if os.path.exists(path + ".parts.json") and not os.path.exists(path):
        return "parts", path + ".parts.json"
    if not os.path.exists(path):
        raise BundleError(f"bundle {path} does not exist (nor {path}.parts.json)")
    return "file", path


def open_bundle(path: str) -> FileReader | PartsReader:
    kind, real = resolve_bundle_path(path)
    return PartsReader(real) if kind == "parts" else FileReader(real)


def check_media(path: str) -> int:
    """Explicit media check of a split bundle: each part's size and sha256 against its parts.json (raises
    BundleError naming the first bad part). Returns the number of parts; 0 for a single file (nothing to do:
    its blob digests are its check)."""
    stream = open_bundle(path)
    try:
        if isinstance(stream, PartsReader):
            stream.check_media()
            return len(stream.parts)
        return 0
    finally:
        stream.close()


# --------------------------------------------------------------------------------------------------------
# Safe streaming tar reader


_TYPE_NAMES = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device",
               b"4": "a block device", b"5": "a directory", b"6": "a FIFO", b"7": "a contiguous file",
               b"g": "a global PAX header", b"L": "a GNU long name", b"K": "a GNU long link name",
               b"S": "a GNU sparse file", b"V": "a volume header"}


class TarMember:
    """One member's header: name, data size, offset of its data and of its header in the stream."""

    __slots__ = ("name", "size", "offset", "header_offset")

    def __init__(self, name: str, size: int, offset: int, header_offset: int) -> None:
        self.name = name
        self.size = size
        self.offset = offset                # offset of the member's data in the stream
        self.header_offset = header_offset

    def __repr__(self) -> str:
        return f"TarMember({self.name!r}, size={self.size}, offset={self.offset})"


def _nts(field_bytes: bytes) -> str:
    return field_bytes.split(b"\0", 1)[0].decode("utf-8", errors="strict")


def _octal(field_bytes: bytes, what: str, offset: int) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # base-256 (GNU) numbers: we never write them
        raise BundleError(f"tar header has a base-256 {what} field (bundles never use one): not a bundle, "
                          "or the header is damaged", offset=offset)
    text = field_bytes.replace(b"\0", b" ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise BundleError(f"tar header has a malformed {what} field {text!r}: not a bundle, or the header is damaged",
                          offset=offset) from None


def parse_pax(data: bytes, offset: int) -> dict[str, str]:
    """The ``<length> <key>=<value>\\n`` records of a PAX extended header's data; BundleError (at ``offset``) when
    one is malformed. Also the SBOM's layer walk (bundle_builder/sbom.py) reads pax headers with it."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        try:
            length = int(data[pos:sp])
            record = data[sp + 1:pos + length - 1].decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise BundleError("malformed PAX extended header", offset=offset) from None
        if length <= 0 or data[pos + length - 1:pos + length] != b"\n" or "=" not in record:
            raise BundleError("malformed PAX extended header", offset=offset)
        key, dummy, value = record.partition("=")
        records[key] = value
        pos += length
    return records


class TarStreamReader:
    """Reads a bundle tar member by member from a stream, refusing anything a bundle never contains.

    Only regular files are allowed (plus PAX extended headers carrying ``path``/``size``); the caller checks
    the names against the manifest. Data is handed out in chunks, never whole.
    """

    def __init__(self, stream: FileReader | PartsReader) -> None:
        self.stream = stream
        self.offset = 0
        self._pending = 0          # unread data bytes of the current member
        self._padding = 0
        self.seen: set[str] = set()

    def _read_exact(self, n: int, what: str, member: str | None) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise BundleError(f"the bundle is truncated: it ends after {self.offset + len(data)} bytes, inside "
                              f"{what}; copy the whole file again", member=member, offset=self.offset + len(data))
        self.offset += n
        return data

    def _skip_rest(self) -> None:
        while self._pending:
            self.read_chunk(CHUNK_SIZE, None)
        if self._padding:
            offset = self.offset
            padding = self._read_exact(self._padding, "padding", None)
            self._padding = 0
            if padding.count(0) != len(padding):
                # Padding is covered by no digest: only zeros, so no byte of a bundle goes unchecked.
                raise BundleError("non-zero bytes in the padding after a member: the bundle was altered",
                                  offset=offset)

    def next_member(self) -> TarMember | None:
        """Header of the next member, or None at the end-of-archive marker."""
        self._skip_rest()
        pax: dict[str, str] = {}
        pax_raw = b""
        while True:
            header_offset = self.offset
            header = self._read_exact(BLOCK, "a tar header", None)
            if header == b"\0" * BLOCK:
                self._read_trailer(header_offset)
                return None
            member = self._parse_header(header, header_offset, pax, pax_raw)
            if member is not None:
                return member
            if pax_raw:
                raise BundleError("two PAX headers in a row: bundle-builder writes at most one, before a member of "
                                  "8 GiB or more; the bundle was altered", offset=header_offset)
            # a PAX header: read its records and loop to the member it describes
            size = _octal(header[124:136], "size", header_offset)
            if size > MAX_PAX_HEADER_SIZE:
                raise BundleError(f"PAX header of {size} bytes is unreasonably large", offset=header_offset)
            data = self._read_exact(size, "a PAX header", None)
            padding = self._read_exact(-size % BLOCK, "padding", None)
            if padding.count(0) != len(padding):
                raise BundleError("non-zero bytes in the padding of a PAX header", offset=self.offset)
            pax = parse_pax(data, header_offset)
            pax_raw = header + data + padding

    def _read_trailer(self, offset: int) -> None:
        second = self._read_exact(BLOCK, "the end-of-archive marker", None)
        if second != b"\0" * BLOCK:
            raise BundleError("a zero block inside the archive is followed by data: damaged tar", offset=offset)
        # Anything after the marker must be zero padding (tar writers pad to a record size).
        while True:
            rest = self.stream.read(CHUNK_SIZE)
            if not rest:
                return
            if rest.count(0) != len(rest):
                raise BundleError("data after the end-of-archive marker: extra content was appended to the bundle",
                                  offset=self.offset)
            self.offset += len(rest)

    def _parse_header(self, header: bytes, offset: int, pax: dict[str, str], pax_raw: bytes) -> TarMember | None:
        stored = _octal(header[148:156], "checksum", offset)
        computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != computed:
            raise BundleError("tar header checksum mismatch: not a bundle, or the header is damaged", offset=offset)
        typeflag = header[156:157]
        try:
            name = _nts(header[0:100])
            prefix = _nts(header[345:500]) if header[257:262] == b"ustar" else ""
        except UnicodeDecodeError:
            raise BundleError("tar member name is not UTF-8", offset=offset) from None
        if prefix:
            name = prefix + "/" + name
        if typeflag == b"x":
            return None
        if typeflag not in (b"0", b"\0"):
            kind = _TYPE_NAMES.get(typeflag, f"an entry of type {typeflag!r}")
            target = _nts(header[157:257])
            extra = f" pointing to {target!r}" if typeflag in (b"1", b"2") else ""
            raise BundleError(f"tar member {name!r} is {kind}{extra}; a bundle holds regular files only: "
                              "refuse this bundle", member=name, offset=offset)
        mode = _octal(header[100:108], "mode", offset)
        if mode & 0o6000:
            raise BundleError(f"tar member {name!r} has the setuid/setgid bit (mode {mode:o}); refuse this bundle",
                              member=name, offset=offset)
        _check_member_name(name, offset)
        size = _pax_size(pax, offset) if "size" in pax else _octal(header[124:136], "size", offset)
        if name in self.seen:
            raise BundleError(f"tar member {name!r} appears twice; refuse this bundle", member=name, offset=offset)
        if pax_raw and (set(pax) != {"size"} or size < 8 ** 11 or pax_raw + header != tar_header(name, size)):
            # The builder writes a PAX header only to carry the size of a member of 8 GiB or more.
            raise BundleError(f"the PAX header before {name!r} is not the one bundle-builder writes (a size record "
                              "only, for members of 8 GiB or more): the bundle was repacked or altered",
                              member=name, offset=offset)
        if not pax_raw and header != tar_header(name, size):
            # One header per (name, size): fields no check reads (owner, mtime, ...) cannot be altered unseen.
            raise BundleError(f"tar header of {name!r} is not the one bundle-builder writes (mode 0644, uid/gid 0, "
                              "no owner names, mtime 0): the bundle was repacked or altered", member=name,
                              offset=offset)
        self.seen.add(name)
        self._pending = size
        self._padding = -size % BLOCK
        return TarMember(name=name, size=size, offset=self.offset, header_offset=offset)

    def read_chunk(self, n: int, member: str | None) -> bytes:
        """Up to ``n`` bytes of the current member's data (b'' at its end)."""
        n = min(n, self._pending)
        if n == 0:
            return b""
        data = self._read_exact(n, f"member {member!r}" if member else "member data", member)
        self._pending -= n
        return data

    def read_view(self, ring: BufferRing, member: str) -> tuple[int, memoryview]:
        """The next chunk of the current member's data, read into a buffer of ``ring`` (no allocation):
        (slot, view), or (-1, empty view) at the member's end. The view is valid until the caller lets
        the ring hand the slot out again (``ring.hold`` for a consumer that is still using it)."""
        n = min(CHUNK_SIZE, self._pending)
        if n == 0:
            return -1, memoryview(b"")
        slot, buf = ring.take()
        view = memoryview(buf)[:n]
        got = self.stream.readinto(view)
        if got != n:
            raise BundleError(f"the bundle is truncated: it ends after {self.offset + got} bytes, inside "
                              f"member {member!r}; copy the whole file again", member=member,
                              offset=self.offset + got)
        self.offset += n
        self._pending -= n
        return slot, view

    def read_member(self, member: TarMember, limit: int) -> bytes:
        """Whole content of a small member (manifest, signature), refused above ``limit`` bytes."""
        if member.size > limit:
            raise BundleError(f"{member.name} is {member.size} bytes, more than the {limit} allowed; "
                              "not a bundle this tool wrote", member=member.name, offset=member.header_offset)
        out = bytearray()
        while len(out) < member.size:
            out += self.read_chunk(CHUNK_SIZE, member.name)
        return bytes(out)


def _pax_size(pax: dict[str, str], offset: int) -> int:
    value = pax["size"]
    if not value.isdigit():
        raise BundleError(f"PAX header has a malformed size {value[:40]!r}", offset=offset)
    return int(value)


def _check_member_name(name: str, offset: int) -> None:
    if name.startswith("/"):
        raise BundleError(f"tar member {name!r} has an absolute path; refuse this bundle", member=name, offset=offset)
    if ".." in name.split("/"):
        raise BundleError(f"tar member {name!r} contains '..' (path traversal); refuse this bundle",
                          member=name, offset=offset)
    if name not in (MANIFEST_NAME, SIGNATURE_NAME) and not _BLOB_NAME.match(name):
        raise BundleError(f"tar member {name!r} is not allowed in a bundle (only {MANIFEST_NAME}, "
                          f"{SIGNATURE_NAME} and {BLOB_PREFIX}<64 hex>); refuse this bundle", member=name, offset=offset)


# --------------------------------------------------------------------------------------------------------
# Verification


class VerifyResult:
    """What a verification checked. (Plain classes here, not dataclasses: importing ``dataclasses`` pulls in
    ``inspect``, ~7 ms of every ``bundle-builder verify`` start.)"""

    def __init__(self, manifest: dict[str, Any], manifest_digest: str, signed: bool, keyid: str | None,
                 signature_checked: bool, members: list[str] | None = None) -> None:
        self.manifest = manifest
        self.manifest_digest = manifest_digest
        self.signed = signed
        self.keyid = keyid
        self.signature_checked = signature_checked
        self.blobs_checked = 0
        self.bytes_checked = 0  # content bytes hashed (decompressed)
        self.bytes_stored = 0   # bytes of the blob members as they travel (compressed or not)
        self.blobs_omitted = 0
        self.bytes_omitted = 0
        self.members: list[str] = list(members or [])


# sink(descriptor, chunks): consumes the chunk iterator (e.g. writes to a temp file). The iterator raises
# BundleError at its end when the blob's digest or size is wrong, so a sink must publish nothing before it
# is exhausted without error. A chunk is a memoryview of a reused read buffer, valid only until the sink
# asks for the next chunk: a sink that keeps data beyond that must copy it (``bytes(chunk)``).
Sink = Callable[[dict[str, Any], Iterator[memoryview]], None]


class BundleHead:
    """The manifest (parsed and as bytes), the signature document and the signing key id of a bundle."""

    def __init__(self, manifest: dict[str, Any], manifest_bytes: bytes, signature: bytes | None,
                 manifest_digest: str, keyid: str | None) -> None:
        self.manifest = manifest
        self.manifest_bytes = manifest_bytes
        self.signature = signature
        self.manifest_digest = manifest_digest
        self.keyid = keyid


def _read_head(tar: TarStreamReader, trusted_keys: list[bytes] | None) -> tuple[BundleHead, TarMember | None]:
    first = tar.next_member()
    if first is None or first.name != MANIFEST_NAME:
        got = "nothing" if first is None else repr(first.name)
        raise BundleError(f"the first member must be {MANIFEST_NAME}, found {got}: not a bundle",
                          member=None if first is None else first.name, offset=0)
    manifest_bytes = tar.read_member(first, MAX_MANIFEST_SIZE)
    second = tar.next_member()
    sig: bytes | None = None
    if second is not None and second.name == SIGNATURE_NAME:
        sig = tar.read_member(second, MAX_SIGNATURE_SIZE)
        second = tar.next_member()
    keyid = None
    if trusted_keys is not None:
        keyid = check_signature(manifest_bytes, sig, trusted_keys)  # before trusting anything in it
    elif sig is not None:
        keyid = parse_signature_doc(sig)[0]
    manifest = parse_manifest(manifest_bytes)
    head = BundleHead(manifest=manifest, manifest_bytes=manifest_bytes, signature=sig,
                      manifest_digest=sha256_digest(manifest_bytes), keyid=keyid)
    return head, second


def read_head(path: str, trusted_keys: list[bytes] | None = None) -> BundleHead:
    """Manifest (and signature) of a bundle without reading its blobs — for inspect, diff and --base."""
    stream = open_bundle(path)
    try:
        return _read_head(TarStreamReader(stream), trusted_keys)[0]
    finally:
        stream.close()


class _Inflater:
    """Decompression state of one reader: a libzstd context and the buffer its input is read into
    (compressed bytes are not hashed: what they decompress to is)."""

    def __init__(self) -> None:
        self._dec: zstd.Decompressor | None = None
        self._in = BufferRing(1)

    def views(self, tar: TarStreamReader, member: TarMember, desc: dict[str, Any],
              ring: BufferRing) -> Iterator[tuple[int, memoryview]]:
        """(slot of ``ring``, view) of the blob's content decompressed from the member's zstd data; refuses
        data that is not zstd, ends inside a frame, or decompresses to more or fewer bytes than the manifest
        says (the output is bounded by the signed size: no decompression bomb gets further)."""
        try:
            if self._dec is None:
                self._dec = zstd.Decompressor()
            else:
                self._dec.reset()
        except zstd.ZstdError as exc:
            raise BundleError(f"blob {desc['digest']} travels zstd-compressed and this host cannot decompress it: "
                              f"{exc}", member=member.name, offset=member.offset) from None
        size, total = desc["size"], 0
        while True:
            dummy, src = tar.read_view(self._in, member.name)
            at_end = not src
            while True:
                slot, buf = ring.take()
                try:
                    used, made = self._dec.decompress_into(src, buf)
                except zstd.ZstdError as exc:
                    raise BundleError(f"blob {desc['digest']}: its compressed data is damaged ({exc}); the blob was "
                                      "damaged or tampered with: refuse this bundle and copy it again",
                                      member=member.name, offset=member.offset) from None
                src = src[used:]
                if not made:
                    if used:
                        continue
                    break
                total += made
                if total > size:
                    raise BundleError(f"blob {desc['digest']} decompresses to more than the {size} bytes the manifest "
                                      "says: the blob was damaged or tampered with; refuse this bundle",
                                      member=member.name, offset=member.offset)
                yield slot, memoryview(buf)[:made]
            if at_end:
                break
        if not self._dec.frame_done or total != size:
            raise BundleError(f"blob {desc['digest']} decompresses to {total} bytes, the manifest says {size}"
                              + ("" if self._dec.frame_done else " (its zstd data ends inside a frame)")
                              + ": the blob was damaged or tampered with; refuse this bundle and copy it again",
                              member=member.name, offset=member.offset)

    def close(self) -> None:
        if self._dec is not None:
            self._dec.release()


def _content_views(tar: TarStreamReader, member: TarMember, desc: dict[str, Any], ring: BufferRing,
                   inflater: _Inflater) -> Iterator[tuple[int, memoryview]]:
    """(slot, view) of a blob's content in reused buffers of ``ring``: the member's data, or what its zstd
    data decompresses to."""
    if desc.get("stored") == STORED_ZSTD:
        yield from inflater.views(tar, member, desc, ring)
        return
    while True:
        slot, view = tar.read_view(ring, member.name)
        if slot < 0:
            return
        yield slot, view


def _blob_chunks(tar: TarStreamReader, member: TarMember, desc: dict[str, Any], counter: list[int],
                 lanes: HashLanes, ring: BufferRing, inflater: _Inflater) -> Iterator[memoryview]:
    """A blob's content as views of reused buffers, hashed on a lane while the consumer uses them; the
    digest is checked (waiting for the lane) when the data is exhausted."""
    hasher = lanes.hasher()
    for slot, view in _content_views(tar, member, desc, ring, inflater):
        ring.hold(slot, hasher.update(view))  # the buffer is reused only once it is hashed
        counter[0] += len(view)
        yield view
    _check_digest(hasher.digest(), desc, member)


def _next_blob(tar: TarStreamReader, member: TarMember | None, desc: dict[str, Any],
               listed: set[str]) -> TarMember:
    expected = member_name(desc)
    if member is None:
        raise BundleError(f"the bundle ends before {expected}, which the manifest lists as bundled: truncated "
                          "or incomplete bundle", member=expected, offset=tar.offset)
    if member.name != expected:
        why = ("is listed in the manifest but out of order" if member.name in listed
               else "is not listed in the manifest as bundled")
        raise BundleError(f"unexpected member {member.name!r}: it {why} (expected {expected})",
                          member=member.name, offset=member.header_offset)
    if member.size != desc["size"] and desc.get("stored") != STORED_ZSTD:
        raise BundleError(f"{member.name} is {member.size} bytes, the manifest says {desc['size']}",
                          member=member.name, offset=member.header_offset)
    return member


def _drain(chunks: Iterator[memoryview]) -> None:
    for dummy in chunks:
        pass


def verify_bundle(path: str, trusted_keys: list[bytes] | None, sink: Sink | None = None,
                  progress: Callable[[int, int], None] | None = None) -> VerifyResult:
    """Check the signature (when ``trusted_keys`` is not None) before trusting the manifest, then stream
    and re-hash every bundled blob. ``sink`` receives (descriptor, chunk iterator) for each blob.

    Raises BundleError naming the member/part and offset at fault.
    """
    stream = open_bundle(path)
    try:
        return _verify_stream(stream, trusted_keys, sink, progress)
    except BundleError as exc:
        # In a split bundle, a damaged part is the better explanation: check the parts the failure lies in.
        stream.check_parts(exc.offset)
        raise
    finally:
        stream.close()


# Read buffers of a verification (1 MiB each). Each is allocated and page-faulted once; 48 (the lanes'
# whole backlog) cost ~0.03 s more CPU per 308 MB than 16 (measured) and read no faster, and 16 MiB in
# flight still spans several blobs, so both lanes stay busy.
VERIFY_RING = 16


def _verify_stream(stream: FileReader | PartsReader, trusted_keys: list[bytes] | None, sink: Sink | None,
                   progress: Callable[[int, int], None] | None) -> VerifyResult:
    tar = TarStreamReader(stream)
    head, member = _read_head(tar, trusted_keys)
    result = VerifyResult(manifest=head.manifest, manifest_digest=head.manifest_digest,
                          signed=head.signature is not None, keyid=head.keyid,
                          signature_checked=trusted_keys is not None,
                          members=[MANIFEST_NAME] + ([SIGNATURE_NAME] if head.signature else []))
    blobs = bundled_blobs(head.manifest)
    listed = {member_name(b) for b in blobs}
    total = sum(b["size"] for b in blobs)
    counter = [0]
    # Without a sink nothing is published per blob, so digests may be checked after reading on: blobs are
    # hashed on parallel lanes while the next ones are read. With a sink each blob is confirmed before its
    # iterator ends (its chunks are hashed on a lane while the sink writes them).
    lanes = HashLanes()
    ring = BufferRing(VERIFY_RING)
    inflater = _Inflater()
    deferred: list[tuple[LaneHasher, dict[str, Any], TarMember]] = []
    try:
        for desc in blobs:
            member = _next_blob(tar, member, desc, listed)
            result.bytes_stored += member.size
            if sink is None:
                deferred.append((_hash_member(tar, member, desc, lanes, ring, inflater, counter), desc, member))
                _check_finished(deferred)
            else:
                chunks = _blob_chunks(tar, member, desc, counter, lanes, ring, inflater)
                sink(desc, chunks)
                _drain(chunks)  # the sink may stop early; the digest is checked all the same
            result.members.append(member.name)
            result.blobs_checked += 1
            if progress is not None:
                progress(counter[0], total)
            member = tar.next_member()
        if member is not None:
            raise BundleError(f"member {member.name!r} follows the last blob the manifest lists: more members "
                              "than the manifest lists; refuse this bundle", member=member.name,
                              offset=member.header_offset)
        stream.finish()
        for hasher, desc, member in deferred:
            _check_digest(hasher.digest(), desc, member)
    finally:
        lanes.shutdown()
        inflater.close()
    result.bytes_checked = counter[0]
    omitted = [b for b in head.manifest["blobs"] if not b["bundled"]]
    result.blobs_omitted = len(omitted)
    result.bytes_omitted = sum(b["size"] for b in omitted)
    return result


def _hash_member(tar: TarStreamReader, member: TarMember, desc: dict[str, Any], lanes: HashLanes,
                 ring: BufferRing, inflater: _Inflater, counter: list[int]) -> LaneHasher:
    hasher = lanes.hasher()
    for slot, view in _content_views(tar, member, desc, ring, inflater):
        ring.hold(slot, hasher.update(view))
        counter[0] += len(view)
    return hasher


def _check_finished(deferred: list[tuple[LaneHasher, dict[str, Any], TarMember]]) -> None:
    """Check (and drop) the digests already computed, so a damaged blob is reported early."""
    while deferred and deferred[0][0].done():
        hasher, desc, member = deferred.pop(0)
        _check_digest(hasher.digest(), desc, member)


def _check_digest(got: str, desc: dict[str, Any], member: TarMember) -> None:
    if got != desc["digest"]:
        raise BundleError(f"blob content hashes to {got}, not {desc['digest']}: the blob was damaged or "
                          "tampered with; refuse this bundle and copy it again", member=member.name,
                          offset=member.offset)


def read_blob(path: str, digest: str, limit: int = MAX_MANIFEST_SIZE) -> bytes:
    """Content of one (small) bundled blob, e.g. the model, checked against its digest. Reads the
    members before it without keeping them."""
    stream = open_bundle(path)
    tar = TarStreamReader(stream)
    try:
        head, member = _read_head(tar, None)
        for desc in bundled_blobs(head.manifest):
            if member is None:
                break
            if member.name == member_name(desc) and desc["digest"] == digest:
                if desc["size"] > limit:
                    raise BundleError(f"blob {digest} is {desc['size']} bytes, over the {limit} allowed here",
                                      member=member.name)
                lanes = HashLanes(1)
                inflater = _Inflater()
                try:
                    # copies: each view is valid only until the next chunk is read
                    out = bytearray()
                    for chunk in _blob_chunks(tar, member, desc, [0], lanes, BufferRing(2), inflater):
                        out += chunk
                    return bytes(out)
                finally:
                    lanes.shutdown()
                    inflater.close()
            member = tar.next_member()
        raise BundleError(f"blob {digest} is not bundled in {path}", member=blob_path(digest))
    finally:
        stream.close()


# --------------------------------------------------------------------------------------------------------
# Writing (used by the builder; kept here so the tar layout is defined in one place)


def tar_header(name: str, size: int) -> bytes:
    """A deterministic USTAR header for a regular file (mtime 0, uid/gid 0, no owner names, mode 0644).

    Sizes over 8 GiB - 1 do not fit USTAR: a PAX ``size`` record is written first for those.
    """
    if len(name.encode("utf-8")) > 100:
        raise ValueError(f"member name too long for a bundle: {name}")
    out = b""
    if size >= 8 ** 11:
        out = _pax_header(name, {"size": str(size)})
    header = bytearray(BLOCK)
    _put(header, 0, name.encode("utf-8"))
    _put(header, 100, b"%07o\0" % 0o644)
    _put(header, 108, b"%07o\0" % 0)
    _put(header, 116, b"%07o\0" % 0)
    _put(header, 124, b"%011o\0" % (size if size < 8 ** 11 else 0))
    _put(header, 136, b"%011o\0" % 0)
    header[156:157] = b"0"
    _put(header, 257, b"ustar\x0000")
    header[148:156] = b" " * 8
    checksum = sum(header)
    _put(header, 148, b"%06o\0 " % checksum)
    return out + bytes(header)


def _pax_header(name: str, records: dict[str, str]) -> bytes:
    body = b""
    for key, value in records.items():
        rec = f" {key}={value}\n".encode("utf-8")
        length = len(rec) + 1
        while len(str(length)) + len(rec) != length:
            length = len(str(length)) + len(rec)
        body += str(length).encode() + rec
    header = bytearray(BLOCK)
    _put(header, 0, ("PaxHeader/" + name)[:99].encode("utf-8"))
    _put(header, 100, b"%07o\0" % 0o644)
    _put(header, 108, b"%07o\0" % 0)
    _put(header, 116, b"%07o\0" % 0)
    _put(header, 124, b"%011o\0" % len(body))
    _put(header, 136, b"%011o\0" % 0)
    header[156:157] = b"x"
    _put(header, 257, b"ustar\x0000")
    header[148:156] = b" " * 8
    _put(header, 148, b"%06o\0 " % sum(header))
    return bytes(header) + body + b"\0" * (-len(body) % BLOCK)


def _put(buf: bytearray, pos: int, data: bytes) -> None:
    buf[pos:pos + len(data)] = data


def tar_padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


TAR_END = b"\0" * (2 * BLOCK)
