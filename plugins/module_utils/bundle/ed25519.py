# -*- coding: utf-8 -*-
# Copyright: offline.delivery contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ed25519 signature *verification* (RFC 8032), pure Python, standard library only.

A repository host on an air-gapped site may have nothing but python3, so the bundle signature is checked
here rather than with ``cryptography``. Verifying needs no secret and is not timing-sensitive. Signing stays
on the build host (``bundle_builder.signing``).

The check is the cofactorless equation ``[S]B == R + [k]A`` done by re-encoding ``[S]B - [k]A`` and
comparing with the ``R`` bytes of the signature, as OpenSSL does; ``S >= L`` (non-canonical) is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat

__all__ = ["verify", "load_public_key_pem", "public_key_id", "Ed25519KeyError"]

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = (-121665 * pow(121666, _P - 2, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)

# Extended homogeneous coordinates (X, Y, Z, T) with x = X/Z, y = Y/Z, x*y = T/Z.
_Point = tuple[int, int, int, int]


def _inv(x: int) -> int:
    return pow(x, _P - 2, _P)


def _add(p: _Point, q: _Point) -> _Point:
    # RFC 8032 section 5.1.4, "add-2008-hwcd-3".
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _double(p: _Point) -> _Point:
    a = p[0] * p[0] % _P
    b = p[1] * p[1] % _P
    c = 2 * p[2] * p[2] % _P
    h = a + b
    e = h - (p[0] + p[1]) * (p[0] + p[1])
    g = a - b
    f = c + g
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _mul(scalar: int, point: _Point) -> _Point:
    acc: _Point = (0, 1, 1, 0)  # neutral element
    while scalar > 0:
        if scalar & 1:
            acc = _add(acc, point)
        point = _double(point)
        scalar >>= 1
    return acc


def _recover_x(y: int, sign: int) -> int | None:
    if y >= _P:
        return None
    x2 = (y * y - 1) * _inv(_D * y * y + 1) % _P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P != 0:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


def _decode_point(data: bytes) -> _Point | None:
    y = int.from_bytes(data, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    if x is None:
        return None
    return (x, y, 1, x * y % _P)


def _encode_point(p: _Point) -> bytes:
    zinv = _inv(p[2])
    x = p[0] * zinv % _P
    y = p[1] * zinv % _P
    return int.to_bytes(y | ((x & 1) << 255), 32, "little")


def _base_point() -> _Point:
    y = 4 * _inv(5) % _P
    x = _recover_x(y, 0)
    if x is None:  # cannot happen for the standard base point
        raise ValueError("ed25519 base point")
    return (x, y, 1, x * y % _P)


_BASE = _base_point()
_IDENTITY = (1).to_bytes(32, "little")  # the encoding of the neutral point (x=0, y=1)


def _weak_key_problem(public_key: bytes) -> str | None:
    """Why ``public_key`` must not be trusted, or None: not a curve point, or of small order (eight points;
    the neutral one 'verifies' a forged signature of any message)."""
    point = _decode_point(public_key)
    if point is None:
        return "is not a point on the Ed25519 curve"
    if _encode_point(_mul(8, point)) == _IDENTITY:
        return "is a small-order point (a weak key under which forged signatures verify)"
    return None


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message`` by the raw 32-byte ``public_key``."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    a = _decode_point(public_key)
    if a is None or _encode_point(_mul(8, a)) == _IDENTITY:
        return False
    r_bytes = signature[:32]
    s = int.from_bytes(signature[32:], "little")
    if s >= _L:  # non-canonical S would make signatures malleable
        return False
    k = int.from_bytes(hashlib.sha512(r_bytes + public_key + message).digest(), "little") % _L
    # R' = [S]B - [k]A ; negating A negates its x (and t) coordinate.
    neg_a: _Point = ((-a[0]) % _P, a[1], a[2], (-a[3]) % _P)
    r_check = _add(_mul(s, _BASE), _mul(k, neg_a))
    return _encode_point(r_check) == r_bytes


class Ed25519KeyError(ValueError):
    """A key file that is not an Ed25519 public key (wrong type, damaged PEM, private key given)."""


def load_public_key_files(paths: list[str]) -> list[bytes]:
    """Raw keys from SPKI PEM files; Ed25519KeyError names the file that cannot be read or holds no
    Ed25519 public key."""
    keys = []
    for path in paths:
        try:
            with open(path, encoding="ascii", errors="replace") as fh:
                # fstat the open file (not the path): the checked file is the one read, even if the path
                # is swapped between the check and the read.
                _refuse_writable_key(path, os.fstat(fh.fileno()).st_mode)
                text = fh.read()
        except OSError as exc:
            raise Ed25519KeyError(f"cannot read public key {path}: {exc.strerror}") from None
        keys.append(load_public_key_pem(text, source=str(path)))
    return keys


def _refuse_writable_key(path: str, mode: int) -> None:
    """Whoever can write a trusted-key file can make the site trust their own key: refuse a key file that
    is writable by its group or by everyone."""
    if stat.S_IMODE(mode) & 0o022:
        raise Ed25519KeyError(
            f"trusted public key {path} is writable by {'everyone' if mode & 0o002 else 'its group'} "
            f"(mode {stat.S_IMODE(mode):04o}): anyone who can write it could make this site trust their key; "
            f"check its content, then run: chmod 644 {path}")


# Algorithm OIDs (DER content bytes) we can name in an error message.
_OID_NAMES = {
    bytes.fromhex("2b6570"): "Ed25519",
    bytes.fromhex("2b6571"): "Ed448",
    bytes.fromhex("2b656e"): "X25519",
    bytes.fromhex("2b656f"): "X448",
    bytes.fromhex("2a864886f70d010101"): "RSA",
    bytes.fromhex("2a8648ce3d0201"): "EC (ECDSA)",
    bytes.fromhex("2a8648ce380401"): "DSA",
}
_ED25519_OID = bytes.fromhex("2b6570")


def _der_read(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """Read one DER TLV at ``pos``: (tag, content, next position)."""
    if pos + 2 > len(data):
        raise Ed25519KeyError("truncated DER structure")
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise Ed25519KeyError("bad DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise Ed25519KeyError("truncated DER structure")
    return tag, data[pos:pos + length], pos + length


def _pem_body(text: str, source: str) -> tuple[str, bytes]:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) < 3 or not lines[0].startswith("-----BEGIN ") or not lines[-1].startswith("-----END "):
        raise Ed25519KeyError(f"{source}: not a PEM file (expected '-----BEGIN PUBLIC KEY-----')")
    label = lines[0][len("-----BEGIN "):].rstrip("-").strip()
    try:
        body = base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Ed25519KeyError(f"{source}: damaged PEM base64 ({exc})") from None
    return label, body


def load_public_key_pem(text: str | bytes, source: str = "public key") -> bytes:
    """Raw 32-byte Ed25519 public key from a SubjectPublicKeyInfo PEM ('-----BEGIN PUBLIC KEY-----').

    Raises ``Ed25519KeyError`` naming the key type found when it is not Ed25519, or saying that a
    private key was given where the public one (``<prefix>.pub``) is expected.
    """
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    label, der = _pem_body(text, source)
    if "PRIVATE" in label:
        raise Ed25519KeyError(f"{source}: this is a private key ({label}); pass the public key "
                              "(the .pub file written by 'bundle-builder keygen')")
    if label != "PUBLIC KEY":
        raise Ed25519KeyError(f"{source}: PEM holds a '{label}', expected 'PUBLIC KEY' (SubjectPublicKeyInfo)")
    try:
        tag, spki, dummy = _der_read(der, 0)
        if tag != 0x30:
            raise Ed25519KeyError("SubjectPublicKeyInfo is not a SEQUENCE")
        tag, alg, pos = _der_read(spki, 0)
        if tag != 0x30:
            raise Ed25519KeyError("AlgorithmIdentifier is not a SEQUENCE")
        tag, oid, dummy = _der_read(alg, 0)
        if tag != 0x06:
            raise Ed25519KeyError("algorithm is not an OID")
        tag, bits, dummy = _der_read(spki, pos)
    except Ed25519KeyError as exc:
        raise Ed25519KeyError(f"{source}: damaged public key ({exc})") from None
    if oid != _ED25519_OID:
        kind = _OID_NAMES.get(oid, "OID " + oid.hex())
        raise Ed25519KeyError(f"{source}: key type is {kind}, but bundles are signed with Ed25519; "
                              "make a key pair with 'bundle-builder keygen'")
    if tag != 0x03 or len(bits) != 33 or bits[0] != 0:
        raise Ed25519KeyError(f"{source}: damaged Ed25519 public key (expected a 32-byte BIT STRING)")
    problem = _weak_key_problem(bits[1:])
    if problem:
        raise Ed25519KeyError(f"{source}: the Ed25519 public key {problem}; it is refused")
    return bits[1:]


def public_key_id(public_key: bytes) -> str:
    """Key id written in manifest.sig: hex sha256 of the raw 32-byte public key."""
    return hashlib.sha256(public_key).hexdigest()
