"""Key generation, key loading refusals, and signature checks of built bundles."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bundle_builder import build, signing
from offline_delivery_core.bundle import format as bundle_format
from offline_delivery_core.bundle.format import BundleError
from offline_delivery_core.bundle.ed25519 import load_public_key_files
from tests.helpers.bundles import member_data, rewrite


def test_keygen_writes_0600_private_and_spki_public(tmp_path: Path) -> None:
    key_path, pub_path = signing.keygen(tmp_path / "k")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    key = signing.load_private_key(key_path)
    assert load_public_key_files([str(pub_path)])[0] == signing.raw_public_key(key)
    with pytest.raises(signing.SigningError, match="already exists"):
        signing.keygen(tmp_path / "k")


def test_load_private_key_refuses_group_readable_file(tmp_path: Path) -> None:
    key_path, _ = signing.keygen(tmp_path / "k")
    os.chmod(key_path, 0o640)
    with pytest.raises(signing.SigningError, match=r"accessible by group/others \(mode 0640\).*chmod 600"):
        signing.load_private_key(key_path)


@pytest.mark.parametrize("make,kind", [
    (lambda: rsa.generate_private_key(65537, 2048), r"an RSA \(2048 bits\) key"),
    (lambda: ec.generate_private_key(ec.SECP256R1()), r"an EC \(secp256r1\) key"),
])
def test_load_private_key_refuses_wrong_key_type(tmp_path: Path, make, kind: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "wrong.key"
    path.write_bytes(make().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    os.chmod(path, 0o600)
    with pytest.raises(signing.SigningError, match=f"{kind}.*Ed25519.*keygen"):
        signing.load_private_key(path)


def test_load_private_key_refuses_public_key(keypair: tuple[Path, Path], tmp_path: Path) -> None:
    pub = tmp_path / "x.pub"
    pub.write_bytes(keypair[1].read_bytes())
    os.chmod(pub, 0o600)
    with pytest.raises(signing.SigningError, match="is a public key"):
        signing.load_private_key(pub)


def test_build_with_wrong_key_type_is_refused(sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "rsa.key"
    path.write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.chmod(path, 0o600)
    with pytest.raises(signing.SigningError, match="RSA.*Ed25519"):
        build.build_bundle(sample_world.write_model(), tmp_path, image_sources=sample_world.archives,
                           platforms=["linux/amd64"], sign_key=path)


@pytest.fixture
def signed_bundle(sample_world, keypair, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    out.mkdir()
    return build.build_bundle(sample_world.write_model(), out, image_sources=sample_world.archives,
                              platforms=["linux/amd64", "linux/arm64"], sign_key=keypair[0]).path


def test_signed_bundle_verifies_with_its_key(signed_bundle: Path, keypair) -> None:  # type: ignore[no-untyped-def]
    pub = load_public_key_files([str(keypair[1])])[0]
    result = bundle_format.verify_bundle(str(signed_bundle), [pub])
    assert result.signed and result.signature_checked
    assert result.keyid == bundle_format.ed25519.public_key_id(pub)
    assert result.blobs_checked == len(result.manifest["blobs"])


def test_other_key_is_not_trusted(signed_bundle: Path, other_keypair) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BundleError, match="not one of the trusted keys") as err:
        bundle_format.verify_bundle(str(signed_bundle), [load_public_key_files([str(other_keypair[1])])[0]])
    assert err.value.member == "manifest.sig"


def test_any_trusted_key_may_sign(signed_bundle: Path, keypair, other_keypair) -> None:  # type: ignore[no-untyped-def]
    keys = [load_public_key_files([str(other_keypair[1])])[0], load_public_key_files([str(keypair[1])])[0]]
    assert bundle_format.verify_bundle(str(signed_bundle), keys).blobs_checked > 0


def test_resigned_bundle_is_refused(signed_bundle: Path, other_keypair, keypair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manifest = member_data(signed_bundle, "manifest.json")
    forged = signing.sign(signing.load_private_key(other_keypair[0]), manifest)
    resigned = rewrite(signed_bundle, tmp_path / "resigned.bundle", replace={"manifest.sig": forged})
    # consistent on its own (the intruder's key verifies it) ...
    assert bundle_format.verify_bundle(str(resigned), [load_public_key_files([str(other_keypair[1])])[0]])
    # ... but not trusted by the vendor's key
    with pytest.raises(BundleError, match="signed \\(or re-signed\\) by another key"):
        bundle_format.verify_bundle(str(resigned), [load_public_key_files([str(keypair[1])])[0]])


def test_signature_of_other_manifest_is_refused(signed_bundle: Path, keypair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A real signature by the trusted key, but over different bytes: a manifest edited after signing.
    other_sig = signing.sign(signing.load_private_key(keypair[0]), b'{"another":"manifest"}')
    bad = rewrite(signed_bundle, tmp_path / "swapped.bundle", replace={"manifest.sig": other_sig})
    with pytest.raises(BundleError, match="does not match manifest.json"):
        bundle_format.verify_bundle(str(bad), [load_public_key_files([str(keypair[1])])[0]])


def test_unsigned_bundle(sample_world, keypair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = build.build_bundle(sample_world.write_model(), tmp_path, image_sources=sample_world.archives,
                                platforms=["linux/amd64"], sign_key=None)
    assert result.signed_keyid is None
    with pytest.raises(BundleError, match="unsigned.*rebuild it with --sign-key"):
        bundle_format.verify_bundle(str(result.path), [load_public_key_files([str(keypair[1])])[0]])
    unchecked = bundle_format.verify_bundle(str(result.path), None)
    assert not unchecked.signed and not unchecked.signature_checked


def test_signature_stripped_from_signed_bundle_is_refused(signed_bundle: Path, keypair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stripped = rewrite(signed_bundle, tmp_path / "stripped.bundle", drop={"manifest.sig"})
    with pytest.raises(BundleError, match="unsigned"):
        bundle_format.verify_bundle(str(stripped), [load_public_key_files([str(keypair[1])])[0]])
