# -*- coding: utf-8 -*-
# Copyright: offline.delivery contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The site CA and the repo host's server certificate (the TLS option, ``offline_delivery_tls``).

Made on the repo host, with ``cryptography`` (python3-cryptography, installed there from the bundle's repo
profile, as for the site signatures of have.py). Layout under ``tls_dir`` (default ``/etc/offline-delivery/tls``)::

    site-ca.crt          0644  the site CA's certificate: the one thing every client of the site trusts
    server.crt           0644  the repo host's certificate, signed by the CA, naming every address clients use
    private/site-ca.key  0600  the CA's private key (ECDSA P-256), in a 0700 directory: never leaves the host
    private/server.key   0600  nginx's key

The CA is made once and kept: a run that finds it uses it (a CA certificate and key that do not belong together
is an error naming both files). The server certificate is issued again only when it is missing, not signed by
the CA, its names differ from the wanted ones, its key is not its own, or it expires within ``renew_days``.
Nothing is written when nothing has to change, so a second run reports no change.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from dataclasses import asdict, dataclass
from typing import Any, List, Optional, Sequence

from ..common.files import ensure_private_dir, file_bytes, write_if_changed, write_private

__all__ = ["TlsError", "TlsResult", "ensure_site_tls", "DEFAULT_TLS_DIR"]

DEFAULT_TLS_DIR = "/etc/offline-delivery/tls"
CA_CERT = "site-ca.crt"
SERVER_CERT = "server.crt"
PRIVATE_DIR = "private"
CA_KEY = "site-ca.key"
SERVER_KEY = "server.key"


class TlsError(ValueError):
    """The site CA or the server certificate cannot be made or used: names the file and what to do."""


@dataclass
class TlsResult:
    changed: bool
    ca_created: bool
    cert_issued: bool
    ca_pem: str                    # the CA certificate (public): what the clients get
    ca_fingerprint: str            # sha256:<hex> of the CA certificate's DER
    names: List[str]
    not_after: str                 # the server certificate's end of validity (ISO 8601, UTC); "" before one exists
    ca_cert: str
    server_cert: str
    server_key: str

    def as_dict(self) -> dict:
        return asdict(self)


def _crypto() -> Any:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise TlsError("python3-cryptography is missing on this host: the site CA is made with it; it comes with "
                       "the repo profile of a bundle (offline.delivery.import installs it)") from None
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _utc(value: datetime.datetime) -> datetime.datetime:
    return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)


def _not_after(cert: Any) -> datetime.datetime:
    return _utc(getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after)


def _san_entries(names: Sequence[str]) -> List[Any]:
    x509 = _crypto()[0]
    entries = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _check_names(names: Sequence[str]) -> List[str]:
    """The server certificate's names, deduplicated and sorted; refuses empty names and URLs or ports."""
    wanted = sorted({str(n).strip().lower() for n in names if str(n).strip()})
    if not wanted:
        raise TlsError("the server certificate needs at least one name: the address the site's hosts reach the "
                       "repo host at (offline_delivery_repo_host or the repo host's ansible_host)")
    for name in wanted:
        if any(c in name for c in "/: ") and not _is_ip(name):
            raise TlsError(f"certificate name {name!r}: give a host name or an IP address, without scheme or port")
    return wanted


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _load_pem_cert(path: str, data: bytes) -> Any:
    x509 = _crypto()[0]
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise TlsError(f"{path} is not a PEM certificate ({exc}); move it away to have it made again") from None


def _load_pem_key(path: str, data: bytes) -> Any:
    serialization = _crypto()[2]
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsError(f"{path} is not an unencrypted PEM private key ({exc}); move it away (with the "
                       "certificate beside it) to have both made again") from None


def _public_der(key: Any) -> bytes:
    serialization = _crypto()[2]
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_pem(key: Any) -> bytes:
    serialization = _crypto()[2]
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: Any) -> bytes:
    return cert.public_bytes(_crypto()[2].Encoding.PEM)


def _fingerprint(cert: Any) -> str:
    return "sha256:" + hashlib.sha256(cert.public_bytes(_crypto()[2].Encoding.DER)).hexdigest()


def _new_key() -> Any:
    ec = _crypto()[3]
    return ec.generate_private_key(ec.SECP256R1())


def _make_ca(common_name: str, days: int, now: datetime.datetime) -> tuple:
    x509, hashes, _ser, _ec, _eku, NameOID = _crypto()
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _issue(ca_key: Any, ca_cert: Any, names: Sequence[str], days: int, now: datetime.datetime) -> tuple:
    x509, hashes, _ser, _ec, ExtendedKeyUsageOID, NameOID = _crypto()
    key = _new_key()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _cert_names(cert: Any) -> List[str]:
    x509 = _crypto()[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return sorted([str(v).lower() for v in san.get_values_for_type(x509.DNSName)]
                  + [str(v) for v in san.get_values_for_type(x509.IPAddress)])


def _signed_by(cert: Any, ca_cert: Any) -> bool:
    ec = _crypto()[3]
    if cert.issuer != ca_cert.subject:
        return False
    try:
        ca_cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                                    ec.ECDSA(cert.signature_hash_algorithm))
    except Exception:  # InvalidSignature, or a key of another type: either way not signed by this CA
        return False
    return True


def _server_reason(cert: Any, key: Any, ca_cert: Any, names: Sequence[str], renew_before: datetime.datetime
                   ) -> Optional[str]:
    """Why the server certificate must be issued again, or None when it is good."""
    if not _signed_by(cert, ca_cert):
        return "not signed by the site CA"
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        return "its key is not the certificate's"
    if _cert_names(cert) != list(names):
        return f"names {', '.join(_cert_names(cert)) or 'none'} instead of {', '.join(names)}"
    if _not_after(cert) <= renew_before:
        return f"expires {_not_after(cert).isoformat()}"
    return None


def ensure_site_tls(tls_dir: str, names: Sequence[str], *, common_name: str = "offline.delivery site CA",
                    ca_days: int = 7300, cert_days: int = 825, renew_days: int = 30, check_mode: bool = False,
                    now: Optional[datetime.datetime] = None) -> TlsResult:
    """Make the site CA once (kept afterwards) and a server certificate for ``names`` signed by it."""
    wanted = _check_names(names)
    if cert_days <= renew_days:
        raise TlsError(f"cert_days ({cert_days}) must be more than renew_days ({renew_days}), or every run "
                       "would issue a new certificate")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    ca_cert_path = os.path.join(tls_dir, CA_CERT)
    ca_key_path = os.path.join(tls_dir, PRIVATE_DIR, CA_KEY)
    cert_path = os.path.join(tls_dir, SERVER_CERT)
    key_path = os.path.join(tls_dir, PRIVATE_DIR, SERVER_KEY)
    ca_cert_bytes, ca_key_bytes = file_bytes(ca_cert_path), file_bytes(ca_key_path)
    ca_created = False
    if ca_cert_bytes is None and ca_key_bytes is None:
        ca_key, ca_cert = _make_ca(common_name, ca_days, now)
        ca_created = True
    elif ca_cert_bytes is None or ca_key_bytes is None:
        present, missing = (ca_key_path, ca_cert_path) if ca_cert_bytes is None else (ca_cert_path, ca_key_path)
        raise TlsError(f"site CA: {present} is there but {missing} is not; put the missing file back from the "
                       f"backup, or move {present} away to make a new CA (every client then needs "
                       "offline.delivery.runtime again)")
    else:
        ca_cert = _load_pem_cert(ca_cert_path, ca_cert_bytes)
        ca_key = _load_pem_key(ca_key_path, ca_key_bytes)
        if _public_der(ca_cert.public_key()) != _public_der(ca_key.public_key()):
            raise TlsError(f"site CA: {ca_key_path} is not the key of {ca_cert_path}; put the matching pair back, "
                           "or move both away to make a new CA")
        if os.stat(ca_key_path).st_mode & 0o077:
            raise TlsError(f"site CA key {ca_key_path} is accessible by group/others; run 'chmod 600 {ca_key_path}'")
    cert_bytes, key_bytes = file_bytes(cert_path), file_bytes(key_path)
    server_cert = _load_pem_cert(cert_path, cert_bytes) if cert_bytes is not None else None
    server_key = None
    if key_bytes is not None:
        try:
            server_key = _load_pem_key(key_path, key_bytes)
        except TlsError:
            server_key = None  # nginx's key is ours to replace: issue a new pair
    renew_before = now + datetime.timedelta(days=renew_days)
    issue = (ca_created or server_cert is None or server_key is None
             or _server_reason(server_cert, server_key, ca_cert, wanted, renew_before) is not None)
    if issue:
        server_key, server_cert = _issue(ca_key, ca_cert, wanted, cert_days, now)
    changed = ca_created or issue
    if not check_mode:
        ensure_private_dir(os.path.join(tls_dir, PRIVATE_DIR))
        if ca_created:
            write_private(ca_key_path, _key_pem(ca_key))
            write_if_changed(ca_cert_path, _cert_pem(ca_cert), 0o644)
        if issue:
            # the key first: nginx never sees a certificate without its key
            write_private(key_path, _key_pem(server_key))
            write_if_changed(cert_path, _cert_pem(server_cert), 0o644)
    return TlsResult(changed=changed, ca_created=ca_created, cert_issued=issue,
                     ca_pem=(ca_cert_bytes or _cert_pem(ca_cert)).decode("ascii"), ca_fingerprint=_fingerprint(ca_cert),
                     names=wanted, not_after="" if server_cert is None else _not_after(server_cert).isoformat(),
                     ca_cert=ca_cert_path, server_cert=cert_path, server_key=key_path)
