"""Ed25519 key pairs and manifest signing (build host only: needs ``cryptography``).

Signatures are checked by the stdlib-only verifier in ``offline_delivery_core.bundle.ed25519`` so that a site host
with nothing but python3 can check them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from offline_delivery_core.bundle import format as bundle_format


class SigningError(ValueError):
    """A key that cannot be used for signing (wrong type, unsafe permissions, unreadable)."""


def keygen(out_prefix: str | Path) -> tuple[Path, Path]:
    """Write ``<prefix>.key`` (PKCS8 PEM, mode 0600) and ``<prefix>.pub`` (SPKI PEM); refuse to overwrite."""
    key_path = Path(f"{out_prefix}.key")
    pub_path = Path(f"{out_prefix}.pub")
    for p in (key_path, pub_path):
        if p.exists():
            raise SigningError(f"{p} already exists; remove it or choose another prefix (keys are never overwritten)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # O_EXCL + 0600 at creation: the private key is never readable by others, not even briefly.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(key_path, 0o600)  # in case the umask removed owner bits
    pub_path.write_bytes(public_key_pem(key.public_key()))
    return key_path, pub_path


def public_key_pem(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def raw_public_key(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Load an unencrypted PKCS8 Ed25519 private key, refusing files readable by group or others."""
    path = Path(path)
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read signing key {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SigningError(f"signing key {path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
                           f"run 'chmod 600 {path}'")
    if b"PUBLIC KEY" in data and b"PRIVATE KEY" not in data:
        raise SigningError(f"{path} is a public key; --sign-key needs the private key (<prefix>.key)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningError(f"signing key {path} is encrypted; use an unencrypted key from 'bundle-builder keygen'") from None
    except ValueError as exc:
        raise SigningError(f"{path} is not a PEM private key ({exc}); make one with 'bundle-builder keygen'") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"signing key {path} is an {_key_kind(key)} key, but bundles are signed "
                           "with Ed25519; make a key pair with 'bundle-builder keygen'")
    return key


def _key_kind(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA ({key.key_size} bits)"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"EC ({key.curve.name})"
    if isinstance(key, dsa.DSAPrivateKey):
        return "DSA"
    if isinstance(key, ed448.Ed448PrivateKey):
        return "Ed448"
    if isinstance(key, x25519.X25519PrivateKey):
        return "X25519"
    return type(key).__name__


def sign(key: Ed25519PrivateKey, manifest_bytes: bytes) -> bytes:
    """The ``manifest.sig`` document for ``manifest_bytes``."""
    return bundle_format.make_signature_doc(raw_public_key(key), key.sign(manifest_bytes))
