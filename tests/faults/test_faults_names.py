"""Names that become paths, and inputs that would crash or fool the checks (issue 16, items 2-4 and 8).

Each case is refused with an error naming the input, and the site is byte for byte as it was; each would have
been taken on the code before these checks (a manifest named ``../../../../victim`` removed a directory outside
the repository, ``app=../../../../usr`` made /usr mode 0700, deep JSON crashed with RecursionError, the neutral
point as a public key 'verified' any message).
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from bundle_builder import signing
from offline_delivery_core.app import state as app_state
from offline_delivery_core.bundle import ed25519
from offline_delivery_core.app.state import AppState, StateError
from offline_delivery_core.bundle.format import BundleError, canonical_json
from offline_delivery_core.site.repo import SiteRepo
from tests.faults.conftest import Vendor, refused_import, run_module, site_state
from tests.helpers.bundles import member_data, rewrite


def resigned(vendor: Vendor, out: Path, **changes: object) -> Path:
    """tiny 1.0.0 with its manifest fields changed and signed again by the vendor's own (trusted) key: what a
    stolen or careless signing step could produce, so only the checks after the signature can stop it."""
    manifest = json.loads(member_data(vendor.tiny, "manifest.json"))
    manifest.update(changes)
    data = canonical_json(manifest)
    return rewrite(vendor.tiny, out, replace={"manifest.json": data,
                                              "manifest.sig": signing.sign(signing.load_private_key(vendor.key), data)})


@pytest.mark.parametrize("name", ["../../../../victim", "Tiny", "a/b", ".", "x" * 41])
def test_a_signed_manifest_name_that_is_no_app_name_is_refused(vendor: Vendor, site: SiteRepo, tmp_path: Path,
                                                               name: str) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("data outside the repository")
    bundle = resigned(vendor, tmp_path / "named.bundle", name=name)
    err = refused_import(site, bundle, vendor.keys)
    assert "manifest.json: name: invalid application name" in str(err), err
    assert (victim / "keep").read_text() == "data outside the repository"


@pytest.mark.parametrize("version", ["../../x", "1.0", "1.0.0/../../x", "1.0.0\n"])
def test_a_signed_manifest_version_that_is_no_semver_is_refused(vendor: Vendor, site: SiteRepo, tmp_path: Path,
                                                                version: str) -> None:
    err = refused_import(site, resigned(vendor, tmp_path / "v.bundle", version=version), vendor.keys)
    assert "manifest.json: version: invalid version" in str(err), err


def test_a_manifest_that_relabels_its_model_is_refused(vendor: Vendor, site: SiteRepo, tmp_path: Path) -> None:
    # a valid name, but not the model's: the release would become another app's newest and get its secrets
    err = refused_import(site, resigned(vendor, tmp_path / "relabel.bundle", name="payroll"), vendor.keys)
    assert "name 'payroll' differs from its model's 'tiny'" in str(err), err


def test_an_image_reference_with_a_control_character_is_refused(vendor: Vendor, site: SiteRepo,
                                                                tmp_path: Path) -> None:
    manifest = json.loads(member_data(vendor.tiny, "manifest.json"))
    images = manifest["images"]
    images["app"]["reference"] = "tiny/app:1.0.0\rExecStartPre=+/bin/sh -c id"
    err = refused_import(site, resigned(vendor, tmp_path / "cr.bundle", images=images), vendor.keys)
    assert "images.app.reference: must be a string without control characters" in str(err), err


def test_deeply_nested_json_is_a_clean_refusal(vendor: Vendor, site: SiteRepo, tmp_path: Path) -> None:
    deep = b"[" * 200_000
    signed_deep = signing.sign(signing.load_private_key(vendor.key), deep)  # so the parser is reached
    for member, replace in (("manifest.sig", {"manifest.sig": b"[" * 60_000}),
                            ("manifest.json", {"manifest.json": deep, "manifest.sig": signed_deep})):
        bundle = rewrite(vendor.tiny, tmp_path / f"deep-{member}.bundle", replace=replace)
        err = refused_import(site, bundle, vendor.keys)
        assert isinstance(err, BundleError) and err.member == member, err
        assert not list(Path(site.staging_dir).iterdir()), "staging left behind"


def test_small_order_public_keys_are_refused_when_loaded(tmp_path: Path) -> None:
    spki_prefix = bytes.fromhex("302a300506032b6570032100")
    for raw in ((1).to_bytes(32, "little"),                         # the neutral point
                bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")):  # order 2
        pem = ("-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(spki_prefix + raw).decode()
               + "\n-----END PUBLIC KEY-----\n")
        with pytest.raises(ed25519.Ed25519KeyError, match="small-order point"):
            ed25519.load_public_key_pem(pem, "weak.pub")
        # and the verifier alone: the neutral key with R = neutral, S = 0 'signed' any message before
        assert not ed25519.verify(raw, b"any message at all", raw + bytes(32))


@pytest.mark.parametrize("app", ["../../../../usr", "shop/../../etc", "", "Shop"])
def test_an_app_name_that_is_no_name_makes_no_path(tmp_path: Path, app: str) -> None:
    state_dir = tmp_path / "state"
    (tmp_path / "usr").mkdir(mode=0o755)
    before = site_state(tmp_path)
    with pytest.raises(StateError, match="invalid app name"):
        AppState(str(state_dir), app)
    with pytest.raises(StateError, match="invalid app name"):
        with app_state.app_lock(str(state_dir), app, "host", 1):
            pass
    assert site_state(tmp_path) == before
    assert os.stat(tmp_path / "usr").st_mode & 0o777 == 0o755


def test_the_secrets_module_refuses_a_bad_app_name(collections_path: Path, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    rc, result = run_module(collections_path, "app_secrets",
                            {"app": "../../../../tmp", "specs": {"db_password": {}}, "state_dir": str(state_dir)})
    assert rc != 0, result
    assert "invalid app name '../../../../tmp'" in result["msg"], result
    assert not state_dir.exists()
