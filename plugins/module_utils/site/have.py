# -*- coding: utf-8 -*-
# Copyright: offline.delivery contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A site's have-list: what its repository holds, signed by the site, to be carried back to the vendor.

The file is the have-file ``bundle-builder build --have`` reads, extended with ``site``, ``releases`` and an
embedded ``signature`` (docs/fleet.md)::

    {"mediaType": "application/vnd.offline-delivery.have.v1+json", "site": "north",
     "releases": [{"name", "version", "manifestDigest"}], "blobs": ["sha256:…"],
     "signature": {"alg": "ed25519", "keyid": "<hex>", "sig": "<base64>"}}

The signature covers the canonical JSON of the document without ``signature``. It is made here, on the repo
host, with a site key created on first use (``site-have.key``, PKCS8 PEM, 0600, in a 0700 directory), by
``cryptography`` (python3-cryptography, installed on the repo host from the bundle's repo profile). Only the vendor's
pinned copy of ``site-have.pub`` makes the signature mean anything (docs/fleet.md "Trust").

No timestamps: the same repository gives the same bytes, so a second export changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Any

from ..bundle import ed25519
from ..bundle.format import HAVE_MEDIA_TYPE, SIGNATURE_ALG
from ..common.digests import canonical_json, is_digest
from ..common.files import file_differs, write_if_changed
from .repo import RepoError, SiteRepo

__all__ = ["HaveError", "HaveResult", "build_have", "export_have", "verify_have", "verify_signed", "sign",
           "signed_bytes", "public_from_seed", "public_key_pem", "load_or_create_key", "DEFAULT_KEY_DIR",
           "KEY_NAME", "PUB_NAME"]

DEFAULT_KEY_DIR = "/etc/offline-delivery/have-signing"
KEY_NAME = "site-have.key"
PUB_NAME = "site-have.pub"
SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")

# DER prefixes of an Ed25519 PKCS8 private key and SubjectPublicKeyInfo (RFC 8410): fixed, then the 32 bytes.
_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


class HaveError(ValueError):
    """A have-list that cannot be made or trusted: names the file, field or key and what to do."""


# --------------------------------------------------------------------------------------------------------
# Signing: with `cryptography` (constant time, OpenSSL's Ed25519), as the vendor's builder signs. The repo host
# gets python3-cryptography from the bundle's repo profile with its other tools (docs/packages.md); only the
# signature check stays stdlib-only (ed25519.py), since that runs before anything is installed.


def _private_key(seed: bytes) -> Any:
    if len(seed) != 32:
        raise HaveError("an Ed25519 private key is 32 bytes")
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError:
        raise HaveError("python3-cryptography is missing on this host: the site key signs with it; it comes with "
                        "the repo profile of a bundle (offline.delivery.import installs it)") from None
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_from_seed(seed: bytes) -> bytes:
    key = _private_key(seed)
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign(seed: bytes, message: bytes) -> bytes:
    """Ed25519 signature of ``message`` by the 32-byte private ``seed``."""
    return _private_key(seed).sign(message)


def _pem(label: str, der: bytes) -> bytes:
    b64 = base64.b64encode(der).decode("ascii")
    return f"-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n".encode("ascii")


def public_key_pem(public: bytes) -> bytes:
    return _pem("PUBLIC KEY", _SPKI_PREFIX + public)


def _read_seed(path: str) -> bytes:
    with open(path, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        data = fh.read(4096)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise HaveError(f"site key {path} is accessible by group/others (mode {stat.S_IMODE(mode):04o}); "
                        f"run 'chmod 600 {path}'")
    text = data.decode("ascii", errors="replace")
    m = re.search(r"-----BEGIN PRIVATE KEY-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END PRIVATE KEY-----", text)
    try:
        der = base64.b64decode("".join(m.group(1).split()), validate=True) if m else b""
    except binascii.Error:
        der = b""
    if len(der) != 48 or not der.startswith(_PKCS8_PREFIX):
        raise HaveError(f"site key {path} is not an unencrypted Ed25519 PKCS8 PEM key; move it away and run "
                        "the export again to make a new one (then give the vendor the new site-have.pub)")
    return der[len(_PKCS8_PREFIX):]


def load_or_create_key(key_dir: str, *, create: bool = True) -> tuple[bytes | None, bool]:
    """(seed, created) of the site key in ``key_dir``; made on first use unless ``create`` is false
    (check mode), then (None, True) says one would be made. The public half is (re)written beside it."""
    key_path = os.path.join(key_dir, KEY_NAME)
    if os.path.exists(key_path):
        seed, created = _read_seed(key_path), False
    elif not create:
        return None, True
    else:
        os.makedirs(key_dir, mode=0o700, exist_ok=True)
        os.chmod(key_dir, 0o700)
        seed, created = os.urandom(32), True
        # O_EXCL + 0600 at creation: never readable by others, not even briefly.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(_pem("PRIVATE KEY", _PKCS8_PREFIX + seed))
            fh.flush()
            os.fsync(fh.fileno())
    write_if_changed(os.path.join(key_dir, PUB_NAME), public_key_pem(public_from_seed(seed)), 0o644)
    return seed, created


# --------------------------------------------------------------------------------------------------------
# The list


def build_have(repo_root: str, site: str) -> tuple[dict[str, Any], int]:
    """The unsigned have-document of the repository, and how many blobs its releases name but it lacks.

    Only blobs a release names and that are present with the size its manifest gives are listed: a blob the
    vendor leaves out must be one the import can really use (a truncated one would fail that delta)."""
    if not SITE_RE.match(site or ""):
        raise HaveError(f"site name {site!r} must be 1-63 letters, digits, '.', '_' or '-' (starting with a "
                        "letter or digit)")
    repo = SiteRepo(repo_root)
    if not repo.exists():
        raise HaveError(f"{repo.root} is not a site repository (no blobs/sha256 or catalog.json); import a "
                        "bundle first, or give the right repo_root")
    releases, blobs, missing = [], set(), set()
    for rel in repo.catalog()["releases"]:
        name, version = rel["name"], rel["version"]
        releases.append({"name": name, "version": version, "manifestDigest": rel["manifestDigest"]})
        try:
            manifest = repo.manifest_of(rel)
        except RepoError as exc:
            raise HaveError(str(exc)) from None
        for desc in manifest["blobs"]:
            (blobs if repo.has_blob(desc["digest"], desc["size"]) else missing).add(desc["digest"])
    releases.sort(key=lambda r: (r["name"], r["version"]))
    doc = {"mediaType": HAVE_MEDIA_TYPE, "site": site, "releases": releases, "blobs": sorted(blobs)}
    return doc, len(missing - blobs)


def signed_bytes(doc: dict[str, Any], seed: bytes) -> bytes:
    """Canonical JSON of ``doc`` with an embedded ``signature`` by the site key: one way of signing every
    document a site carries back (have-list, status report)."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    public = public_from_seed(seed)
    sig = {"alg": SIGNATURE_ALG, "keyid": ed25519.public_key_id(public),
           "sig": base64.b64encode(sign(seed, canonical_json(body))).decode("ascii")}
    return canonical_json({**body, "signature": sig}) + b"\n"


@dataclass
class HaveResult:
    changed: bool
    path: str
    pub_path: str
    keyid: str | None
    key_created: bool
    site: str
    releases: list[dict[str, str]]
    blobs: int
    missing: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def export_have(repo_root: str, site: str, dest: str, key_dir: str = DEFAULT_KEY_DIR, *,
                check_mode: bool = False) -> HaveResult:
    """Write the signed have-list to ``dest`` (and the site's public key to ``dest``'s ``.pub``) unless the
    same bytes are there already."""
    try:
        doc, missing = build_have(repo_root, site)
    except RepoError as exc:
        raise HaveError(str(exc)) from None
    seed, key_created = load_or_create_key(key_dir, create=not check_mode)
    pub_path = signed_pub_path(dest)
    if seed is None:  # check mode without a key yet: the export would make one and write the list
        return HaveResult(True, dest, pub_path, None, True, site, doc["releases"], len(doc["blobs"]), missing)
    data = signed_bytes(doc, seed)
    public = public_from_seed(seed)
    changed = file_differs(dest, data, 0o644) or file_differs(pub_path, public_key_pem(public), 0o644)
    if changed and not check_mode:
        write_if_changed(dest, data, 0o644)
        write_if_changed(pub_path, public_key_pem(public), 0o644)
    return HaveResult(changed or key_created, dest, pub_path, ed25519.public_key_id(public), key_created, site,
                      doc["releases"], len(doc["blobs"]), missing)


def signed_pub_path(dest: str, kind: str = "have") -> str:
    """Where the site's public key goes beside a signed file: ``north.have.json`` -> ``north.have.pub``."""
    suffix = f".{kind}.json"
    base = dest[:-len(suffix)] if dest.endswith(suffix) else os.path.splitext(dest)[0]
    return f"{base}.{kind}.pub"


# --------------------------------------------------------------------------------------------------------
# Vendor side


def verify_signed(data: bytes, trusted_keys: list[bytes], source: str, *, media_type: str, what: str,
                  again: str, error: type[ValueError] = HaveError) -> dict[str, Any]:
    """A site-signed JSON document (have-list, status report) when its embedded signature is by one of
    ``trusted_keys`` (raw Ed25519 keys); ``error`` names ``source`` and what is wrong otherwise. ``again`` says
    how to get a fresh one ("export it again with ...")."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise error(f"{source} is not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("mediaType") != media_type:
        raise error(f"{source}: not a {what} (mediaType {media_type})")
    sig = doc.get("signature")
    if not isinstance(sig, dict) or sig.get("alg") != SIGNATURE_ALG or not isinstance(sig.get("sig"), str) \
            or not isinstance(sig.get("keyid"), str):
        raise error(f"{source} carries no site signature (field 'signature'); {again}")
    by_id = {ed25519.public_key_id(k): k for k in trusted_keys}
    key = by_id.get(sig["keyid"])
    if key is None:
        raise error(f"{source} is signed by key {sig['keyid'][:16]}…, which is not the site key given "
                    f"({', '.join(k[:16] + '…' for k in sorted(by_id)) or 'none'}); the site's key changed "
                    "or the file is not from that site: confirm the new site-have.pub with the site")
    try:
        raw = base64.b64decode(sig["sig"], validate=True)
    except binascii.Error:
        raw = b""
    body = canonical_json({k: v for k, v in doc.items() if k != "signature"})
    if not ed25519.verify(key, body, raw):
        raise error(f"{source}: the site signature does not match the contents: the {what} was modified "
                    "after the site signed it; get a fresh one from the site")
    return doc


def parse_have(data: bytes, source: str = "have-file") -> dict[str, Any]:
    """The have-document in ``data``, signed or not (the signature is not checked: ``verify_have`` does): the one
    reader of a have-file, for ``bundle-builder build --have`` and the ``bundle_export`` module alike.

    ``{"mediaType": "application/vnd.offline-delivery.have.v1+json", "blobs": ["sha256:<hex>", ...]}``;
    ``mediaType`` may be absent (a hand-made list), other fields (``site``, ``releases``) are kept as they are.
    HaveError names ``source`` and what is wrong."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise HaveError(f"{source} is not JSON ({exc})") from None
    return _have_document(doc, source)


def _have_document(doc: Any, source: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or not isinstance(doc.get("blobs"), list):
        raise HaveError(f'{source}: expected {{"blobs": ["sha256:<hex>", ...]}}')
    if doc.get("mediaType", HAVE_MEDIA_TYPE) != HAVE_MEDIA_TYPE:
        raise HaveError(f"{source}: mediaType {doc.get('mediaType')!r} is not {HAVE_MEDIA_TYPE}")
    for i, digest in enumerate(doc["blobs"]):
        if not is_digest(digest):
            raise HaveError(f"{source}: blobs[{i}] = {digest!r} is not a 'sha256:<64 hex>' digest")
    return doc


def verify_have(data: bytes, trusted_keys: list[bytes], source: str = "have-file") -> dict[str, Any]:
    """The have-document when its embedded signature is by one of ``trusted_keys`` (raw Ed25519 keys) and its
    content is a have-list (``parse_have``'s checks); HaveError names the file and what is wrong otherwise."""
    doc = verify_signed(data, trusted_keys, source, media_type=HAVE_MEDIA_TYPE, what="have-list",
                        again="export it again with the offline.delivery.have playbook, or build without "
                              "--have-pub if you accept it unsigned")
    return _have_document(doc, source)
