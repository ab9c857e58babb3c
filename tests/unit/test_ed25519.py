"""The pure-Python Ed25519 verifier against RFC 8032 vectors and against ``cryptography``."""

from __future__ import annotations

import os
import random

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from offline_delivery_core.bundle import ed25519

L = 2**252 + 27742317777372353535851937790883648493

# RFC 8032 section 7.1, tests 1-3 and "SHA(abc)" (secret key, public key, message, signature).
RFC8032 = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
]


def _raw(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@pytest.mark.parametrize("secret,public,message,signature", RFC8032)
def test_rfc8032_vectors(secret: str, public: str, message: str, signature: str) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secret))
    assert _raw(key.public_key()).hex() == public  # the vector itself is right
    assert key.sign(bytes.fromhex(message)).hex() == signature
    assert ed25519.verify(bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature))


def test_agrees_with_cryptography_on_random_keys_and_messages() -> None:
    rng = random.Random(8032)
    for i in range(40):
        key = Ed25519PrivateKey.generate()
        pub = _raw(key.public_key())
        message = os.urandom(rng.randrange(0, 300))
        sig = key.sign(message)
        assert ed25519.verify(pub, message, sig), i
        bad = bytearray(sig)
        bad[rng.randrange(64)] ^= 1 << rng.randrange(8)
        try:
            key.public_key().verify(bytes(bad), message)
            expected = True
        except InvalidSignature:
            expected = False
        assert ed25519.verify(pub, message, bytes(bad)) is expected is False


def test_rejects_tampered_message_key_and_signature() -> None:
    key = Ed25519PrivateKey.generate()
    pub = _raw(key.public_key())
    sig = key.sign(b"manifest bytes")
    assert ed25519.verify(pub, b"manifest bytes", sig)
    assert not ed25519.verify(pub, b"manifest bytez", sig)
    assert not ed25519.verify(_raw(Ed25519PrivateKey.generate().public_key()), b"manifest bytes", sig)
    assert not ed25519.verify(pub, b"manifest bytes", sig[:32] + bytes(32))
    assert not ed25519.verify(pub, b"manifest bytes", sig[:63])
    assert not ed25519.verify(pub[:31], b"manifest bytes", sig)


def test_rejects_non_canonical_s() -> None:
    key = Ed25519PrivateKey.generate()
    pub = _raw(key.public_key())
    sig = key.sign(b"hello")
    s = int.from_bytes(sig[32:], "little")
    malleated = sig[:32] + (s + L).to_bytes(32, "little")  # same group element, non-canonical encoding
    with pytest.raises(InvalidSignature):
        key.public_key().verify(malleated, b"hello")
    assert not ed25519.verify(pub, b"hello", malleated)


def test_rejects_public_key_not_on_curve() -> None:
    key = Ed25519PrivateKey.generate()
    sig = key.sign(b"x")
    # y = 2 has no x on the curve (x^2 is not a square)
    assert not ed25519.verify((2).to_bytes(32, "little"), b"x", sig)


def _pem(pub: object) -> str:
    return pub.public_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_load_public_key_pem_roundtrip() -> None:
    key = Ed25519PrivateKey.generate()
    assert ed25519.load_public_key_pem(_pem(key.public_key())) == _raw(key.public_key())


@pytest.mark.parametrize("make,kind", [
    (lambda: rsa.generate_private_key(65537, 2048).public_key(), "RSA"),
    (lambda: ec.generate_private_key(ec.SECP256R1()).public_key(), "EC"),
    (lambda: x25519.X25519PrivateKey.generate().public_key(), "X25519"),
    (lambda: ed448.Ed448PrivateKey.generate().public_key(), "Ed448"),
])
def test_load_public_key_pem_refuses_other_key_types(make, kind: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ed25519.Ed25519KeyError, match=f"vendor.pub: key type is {kind}.*Ed25519"):
        ed25519.load_public_key_pem(_pem(make()), source="vendor.pub")


def test_load_public_key_pem_refuses_private_key_and_garbage() -> None:
    private_pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    with pytest.raises(ed25519.Ed25519KeyError, match="private key.*pass the public key"):
        ed25519.load_public_key_pem(private_pem)
    with pytest.raises(ed25519.Ed25519KeyError, match="not a PEM file"):
        ed25519.load_public_key_pem("hello")
    with pytest.raises(ed25519.Ed25519KeyError, match="damaged"):
        ed25519.load_public_key_pem("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n")
