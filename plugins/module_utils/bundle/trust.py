"""Which vendor keys a site trusts, and for which applications.

Trust comes from the site's inventory, set out of band: each vendor key is pinned there by its fingerprint
(``sha256:`` + the hex sha256 of the raw 32-byte Ed25519 key, the key id that manifest.sig names), with the
applications it may sign. A key file that travels with a bundle is only a carrier of the key's bytes: it is used
when its fingerprint is pinned and not revoked, and otherwise refused with its fingerprint printed, so a person
can compare it with the vendor's over a channel they trust. Rotation is a new pin; revocation is a fingerprint in
the revoked list, refused even when it is also pinned.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..common.names import name_problem
from .ed25519 import Ed25519KeyError, load_public_key_files, public_key_id
from .format import SIGNATURE_NAME, BundleError

FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")
ANY_APP = "*"
# A site release (a field fix made on site, site/patch.py): the vendor's version with build metadata site.<n>.
SITE_VERSION_RE = re.compile(r"^(?P<vendor>[^+]+)\+site\.(?P<n>[1-9][0-9]{0,8})\Z")

# The options of every module that checks a vendor signature (bundle_import, bundle_info, repo_sync).
TRUST_OPTIONS = {
    "trusted_keys": {"type": "list", "elements": "path", "default": [], "no_log": False},
    "pinned_keys": {"type": "list", "elements": "dict", "default": [], "no_log": False},  # fingerprints: public
    "revoked_keys": {"type": "list", "elements": "str", "default": [], "no_log": False},
}


class TrustError(ValueError):
    """The site's pins or revocations are malformed; the message names the entry and what it must be."""


def fingerprint(raw_key: bytes) -> str:
    """The fingerprint a site pins: ``sha256:<hex>`` of the raw key (manifest.sig's keyid, with its prefix)."""
    return "sha256:" + public_key_id(raw_key)


def parse_pins(pins: object, revoked: object = ()) -> Tuple[Dict[str, Tuple[str, ...]], frozenset]:
    """``({fingerprint: apps}, revoked fingerprints)`` from the inventory's lists; TrustError names the entry.

    ``pins``: ``[{"fingerprint": "sha256:…", "apps": ["shop", …] or ["*"]}, …]``; ``revoked``: fingerprints."""
    if not isinstance(pins, list):
        raise TrustError("pinned vendor keys must be a list of {fingerprint, apps}")
    allowed: Dict[str, Tuple[str, ...]] = {}
    for i, pin in enumerate(pins):
        where = f"pinned vendor key {i}"
        if not isinstance(pin, Mapping) or set(pin) - {"fingerprint", "apps", "name"}:
            raise TrustError(f"{where}: must be a mapping of fingerprint, apps (and an optional name)")
        fp, apps = pin.get("fingerprint"), pin.get("apps")
        if not isinstance(fp, str) or not FINGERPRINT_RE.match(fp):
            raise TrustError(f"{where}: fingerprint {fp!r} must be 'sha256:' and 64 lowercase hex digits "
                             "(bundle-builder fingerprint KEY.pub prints it)")
        if not isinstance(apps, list) or not apps:
            raise TrustError(f"{where} ({fp}): apps must list the applications the key may sign, or ['*']")
        for app in apps:
            if app != ANY_APP and name_problem(app, "application name"):
                raise TrustError(f"{where} ({fp}): {name_problem(app, 'application name')}")
        allowed[fp] = tuple(sorted(set(allowed.get(fp, ())) | set(apps)))
    if not isinstance(revoked, (list, tuple)) or not all(isinstance(r, str) and FINGERPRINT_RE.match(r)
                                                         for r in revoked):
        raise TrustError("revoked vendor keys must be a list of 'sha256:<64 hex>' fingerprints")
    return allowed, frozenset(revoked)


class Trust:
    """The outcome of checking key files against the site's pins: the usable keys, what each may sign, and
    every file with its fingerprint (``accepted`` and ``refused``, with why) for the module's result."""

    def __init__(self) -> None:
        self.keys: List[bytes] = []
        self.signers: Dict[str, Tuple[str, ...]] = {}
        self.accepted: List[Dict[str, str]] = []
        self.refused: List[Dict[str, str]] = []


def pinned_keys(key_files: Iterable[str], pins: object, revoked: object = ()) -> Trust:
    """The keys of ``key_files`` that the site pins (and did not revoke). A file that is not an Ed25519 public
    key raises Ed25519KeyError naming it; the same key in two files counts once."""
    allowed, revoked_set = parse_pins(pins, revoked)
    trust = Trust()
    for path in key_files:
        raw = load_public_key_files([path])[0]
        fp = fingerprint(raw)
        if fp in revoked_set:
            trust.refused.append({"path": path, "fingerprint": fp, "reason": "revoked by the site"})
        elif fp not in allowed:
            trust.refused.append({"path": path, "fingerprint": fp,
                                  "reason": "not pinned by the site: compare the fingerprint with the vendor's "
                                            "over a channel you trust, then pin it in offline_delivery_vendor_keys"})
        else:
            trust.accepted.append({"path": path, "fingerprint": fp})
            if public_key_id(raw) not in trust.signers:
                trust.keys.append(raw)
                trust.signers[public_key_id(raw)] = allowed[fp]
    return trust


def signer_problem(signers: Optional[Mapping[str, Sequence[str]]], keyid: Optional[str], app: str) -> Optional[str]:
    """Why the key ``keyid`` may not sign application ``app`` at this site, or None. ``signers`` None: the
    caller trusts every given key for every application (the library's own tests, the vendor's own checks)."""
    if signers is None or keyid is None:
        return None
    apps = signers.get(keyid)
    if apps is None:
        return f"key sha256:{keyid} is not pinned by this site"
    if ANY_APP in apps or app in apps:
        return None
    return (f"key sha256:{keyid} is pinned for {', '.join(apps)}, not for {app}: a key trusted for one application "
            "cannot sign another's releases")


def check_signer(signers: Optional[Mapping[str, Sequence[str]]], keyid: Optional[str], app: str) -> None:
    """BundleError (on manifest.sig) when the bundle's signing key may not sign ``app`` here."""
    problem = signer_problem(signers, keyid, app)
    if problem:
        raise BundleError(f"{problem}; the bundle is refused", member=SIGNATURE_NAME)


def site_version(version: str) -> Optional[Tuple[str, int]]:
    """``(vendor version, n)`` of a site release's version ``<vendor version>+site.<n>``, None for any other."""
    match = SITE_VERSION_RE.match(version) if isinstance(version, str) else None
    return (match.group("vendor"), int(match.group("n"))) if match else None


def check_vendor_release(version: str, keyid: Optional[str], site_keyids: Iterable[str] = ()) -> None:
    """BundleError (on manifest.sig) unless a vendor's bundle could be what it says: a vendor never signs a site
    release's version (``+site.<n>`` is the site's alone), and a key that signed this site's own releases (the
    site key, ``site_keyids``) never signs as the vendor, even if someone pinned it as a vendor key."""
    if site_version(version) is not None:
        raise BundleError(f"version {version} is a site release's (+site.<n>), which only the site's own key "
                          "signs, on site (offline.delivery.patch); a vendor bundle cannot carry it: refused",
                          member=SIGNATURE_NAME)
    if keyid is not None and keyid in set(site_keyids):
        raise BundleError(f"key sha256:{keyid} is this site's own key (it signed the site's patches); a site key "
                          "never signs as the vendor: remove it from offline_delivery_vendor_keys. Refused",
                          member=SIGNATURE_NAME)


def module_trust(module: Any) -> Trust:
    """pinned_keys() of a module's TRUST_OPTIONS; fails the module (naming the key or pin) when no given key is
    pinned, so nothing is checked, let alone changed, with a key the site did not choose."""
    p = module.params
    try:
        trust = pinned_keys(p["trusted_keys"], p["pinned_keys"], p["revoked_keys"])
    except (Ed25519KeyError, TrustError) as exc:
        module.fail_json(msg=f"trusted key: {exc}")
    if not p["pinned_keys"]:
        module.fail_json(msg="no vendor key is pinned: set offline_delivery_vendor_keys in the inventory to the "
                             "fingerprints of the keys this site trusts (bundle-builder fingerprint KEY.pub prints "
                             "one; compare it with the vendor's over a channel you trust)",
                         refused_keys=trust.refused)
    if not trust.keys:
        why = refused_summary(trust.refused) if trust.refused else "trusted_keys names no key file"
        module.fail_json(msg="no usable vendor key: " + why, refused_keys=trust.refused)
    return trust


def refused_summary(refused: Sequence[Mapping[str, Any]]) -> str:
    return "; ".join(f"{r['path']} ({r['fingerprint']}): {r['reason']}" for r in refused)
