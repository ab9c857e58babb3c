"""Who may sign what a site installs (issue 16, item 1): trust comes from fingerprints the site pins in its
inventory, never from a key file that travels with the bundle. Each case runs the bundle_import / bundle_info
module as the playbooks do and checks the refusal names the key (by the fingerprint a person compares over the
phone) and leaves the site exactly as it was. On the code before pinning, every key file given was trusted for
every application, so the intruder's bundle below was imported.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from offline_delivery_core.bundle import ed25519
from offline_delivery_core.bundle import trust
from offline_delivery_core.site.repo import SiteRepo
from tests.faults.conftest import Vendor, run_module, site_state


def fp(pub: Path) -> str:
    return trust.fingerprint(ed25519.load_public_key_files([str(pub)])[0])


def intruder(vendor: Vendor) -> Path:
    return vendor.root / "intruder.pub"


def _import(collections: Path, site: SiteRepo, bundle: Path, keys: list[Path], pins: list[dict],
            revoked: list[str] | None = None) -> tuple[int, dict]:
    return run_module(collections, "bundle_import", {
        "path": str(bundle), "repo_root": site.root, "trusted_keys": [str(k) for k in keys],
        "pinned_keys": pins, "revoked_keys": revoked or []})


def test_a_key_that_travels_with_a_bundle_is_not_trusted(vendor: Vendor, site: SiteRepo,
                                                         collections_path: Path) -> None:
    # the intruder signs their own bundle and puts their key on the media, named like the vendor's
    before = site_state(Path(site.root))
    rc, res = _import(collections_path, site, vendor.foreign, [intruder(vendor), vendor.pub],
                      [{"fingerprint": fp(vendor.pub), "apps": ["tiny"]}])
    assert rc != 0, res
    assert f"sha256:{fp(intruder(vendor)).split(':')[1]}" in res["msg"], res["msg"]  # the full fingerprint
    assert {r["fingerprint"] for r in res["refused_keys"]} == {fp(intruder(vendor))}
    assert site_state(Path(site.root)) == before


def test_no_pin_no_trust(vendor: Vendor, site: SiteRepo, collections_path: Path) -> None:
    before = site_state(Path(site.root))
    rc, res = _import(collections_path, site, vendor.tiny, [vendor.pub], [])
    assert rc != 0 and "no vendor key is pinned" in res["msg"], res
    assert site_state(Path(site.root)) == before


def test_a_key_pinned_for_one_app_cannot_sign_another(vendor: Vendor, site: SiteRepo,
                                                       collections_path: Path) -> None:
    before = site_state(Path(site.root))
    rc, res = _import(collections_path, site, vendor.tiny, [vendor.pub],
                      [{"fingerprint": fp(vendor.pub), "apps": ["payroll"]}])
    assert rc != 0, res
    assert "is pinned for payroll, not for tiny" in res["msg"], res["msg"]
    assert site_state(Path(site.root)) == before
    rc, res = _import(collections_path, site, vendor.tiny, [vendor.pub],
                      [{"fingerprint": fp(vendor.pub), "apps": ["payroll", "tiny"]}])
    assert rc == 0 and res["changed"], res


def test_a_revoked_key_is_refused_even_when_pinned(vendor: Vendor, site: SiteRepo, collections_path: Path) -> None:
    before = site_state(Path(site.root))
    rc, res = _import(collections_path, site, vendor.tiny, [vendor.pub],
                      [{"fingerprint": fp(vendor.pub), "apps": ["*"]}], revoked=[fp(vendor.pub)])
    assert rc != 0 and "revoked by the site" in res["msg"], res
    assert site_state(Path(site.root)) == before


def test_rotation_is_a_new_pin(vendor: Vendor, site: SiteRepo, collections_path: Path) -> None:
    """The vendor's new key (here the other key pair) is accepted once the site pins it beside the old one;
    revoking the old one afterwards refuses the old signatures and keeps the new."""
    pins = [{"fingerprint": fp(vendor.pub), "apps": ["tiny"]}]
    rc, res = _import(collections_path, site, vendor.foreign, [vendor.pub, intruder(vendor)], pins)
    assert rc != 0, res                                                   # not pinned yet
    pins.append({"fingerprint": fp(intruder(vendor)), "apps": ["tiny"], "name": "vendor-2027"})
    rc, res = _import(collections_path, site, vendor.foreign, [vendor.pub, intruder(vendor)], pins)
    assert rc == 0 and res["changed"], res                                # pinned: the new key signs
    assert {k["fingerprint"] for k in res["pinned_key_files"]} == {fp(vendor.pub), fp(intruder(vendor))}
    rc, res = _import(collections_path, site, vendor.tiny_next, [vendor.pub, intruder(vendor)], pins,
                      revoked=[fp(vendor.pub)])
    assert rc != 0 and "not one of the trusted keys" in res["msg"], res  # the old key, revoked


@pytest.mark.parametrize("pins, message", [
    ([{"fingerprint": "abc", "apps": ["*"]}], "must be 'sha256:' and 64 lowercase hex digits"),
    ([{"fingerprint": "sha256:" + "0" * 64}], "apps must list the applications"),
    ([{"fingerprint": "sha256:" + "0" * 64, "apps": ["../x"]}], "invalid application name"),
    ("sha256:" + "0" * 64, "pinned_keys"),  # ansible's own argument check
])
def test_a_malformed_pin_is_named(vendor: Vendor, site: SiteRepo, collections_path: Path, pins: object,
                                  message: str) -> None:
    rc, res = run_module(collections_path, "bundle_info", {"path": str(vendor.tiny), "trusted_keys": [str(vendor.pub)],
                                                           "pinned_keys": pins})
    assert rc != 0 and message in res["msg"], res


def test_a_security_officer_checks_the_signature_with_openssl(vendor: Vendor, tmp_path: Path) -> None:
    """docs/site-repo.md: manifest.json and manifest.sig out of the bundle with tar, the signature from its
    base64, then `openssl pkeyutl -verify -rawin` with the vendor's public key: no code of ours involved."""
    script = r'''
set -eu
tar -xf "$1" -C "$2" manifest.json manifest.sig
sed -n 's/.*"sig":"\([^"]*\)".*/\1/p' "$2/manifest.sig" | base64 -d > "$2/manifest.sig.raw"
openssl pkeyutl -verify -pubin -inkey "$3" -rawin -in "$2/manifest.json" -sigfile "$2/manifest.sig.raw"
'''
    ok = subprocess.run(["sh", "-c", script, "check", str(vendor.tiny), str(tmp_path), str(vendor.pub)],
                        capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0 and "Signature Verified Successfully" in ok.stdout, ok.stdout + ok.stderr
    other = tmp_path / "other"
    other.mkdir()
    bad = subprocess.run(["sh", "-c", script, "check", str(vendor.foreign), str(other), str(vendor.pub)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0, bad.stdout
    # the fingerprint a site pins, from the key file with openssl alone
    der = subprocess.run(["sh", "-c", 'openssl pkey -pubin -in "$1" -outform DER | tail -c 32 | sha256sum', "fp",
                          str(vendor.pub)], capture_output=True, text=True, timeout=60, check=True)
    assert "sha256:" + der.stdout.split()[0] == fp(vendor.pub)
