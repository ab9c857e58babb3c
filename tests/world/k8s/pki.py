"""Certificates of the test cluster, made on the spot: one CA, a serving cert for the apiserver and a client
cert per component (identity in CN, groups in O, as Kubernetes' x509 authenticator reads them).

ECDSA P-256 keys (fast to make), valid for 30 days (the clusters are throwaway). Written as PEM files
`<name>.crt` / `<name>.key` in one directory; `sa.key`/`sa.pub` sign and verify service-account tokens.
"""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 30

# name -> (CN, O): who each client certificate says it is.
CLIENTS: dict[str, tuple[str, str | None]] = {
    "admin": ("kubernetes-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
    "kube-proxy": ("system:kube-proxy", None),
    "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", "system:masters"),
}


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock differences
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))


def make_pki(out: Path, node_name: str, node_ip: str, service_ip: str) -> None:
    """Write the CA, the apiserver's serving cert, the kubelet's and every component's client cert."""
    out.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = _name("od-world-k8s-ca")
    ca = (_builder(ca_name, ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          # Key identifiers as Go's x509 (kubeadm, k3s) writes them: Python >= 3.13 (a Debian 13 controller) verifies
          # with VERIFY_X509_STRICT and refuses a chain without them.
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (out / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "ca.key", ca_key)

    def issue(name: str, cn: str, org: str | None, server: bool, sans: list[x509.GeneralName]) -> None:
        key = _key()
        usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (_builder(_name(cn, org), ca_name, key.public_key())
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(out / f"{name}.key", key)

    dns = [node_name, "kubernetes", "kubernetes.default", "kubernetes.default.svc",
           "kubernetes.default.svc.cluster.local", "localhost"]
    ips = [node_ip, service_ip, "127.0.0.1"]
    issue("apiserver", "kube-apiserver", None, True,
          [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips])
    issue("kubelet", f"system:node:{node_name}", "system:nodes", False, [])
    issue("kubelet-serving", f"system:node:{node_name}", "system:nodes", True,
          [x509.DNSName(node_name), x509.IPAddress(ipaddress.ip_address(node_ip))])
    for name, (cn, org) in CLIENTS.items():
        issue(name, cn, org, False, [])

    sa_key = _key()
    _write_key(out / "sa.key", sa_key)
    (out / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
