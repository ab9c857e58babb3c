"""The site CA and the repo host's certificate (plugins/module_utils/site/tls.py): made once and kept, the keys
0600 in a 0700 directory, the server certificate issued again only when its names, its CA or its validity call
for it, nothing written in check mode, and a real TLS handshake that trusts exactly the site CA."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest

from offline_delivery_core.site import tls as site_tls

NAMES = ["repo", "10.0.0.2", "127.0.0.1"]


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (stat.S_IMODE(p.stat().st_mode), p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


def test_made_once_with_private_keys_and_kept(tmp_path: Path) -> None:
    tls_dir = tmp_path / "tls"
    first = site_tls.ensure_site_tls(str(tls_dir), NAMES)
    assert first.changed and first.ca_created and first.cert_issued
    assert first.names == ["10.0.0.2", "127.0.0.1", "repo"]
    assert first.ca_fingerprint.startswith("sha256:") and "BEGIN CERTIFICATE" in first.ca_pem
    modes = {k: m for k, (m, _) in _tree(tls_dir).items()}
    assert modes == {"private": 0o700, "private/server.key": 0o600, "private/site-ca.key": 0o600,
                     "server.crt": 0o644, "site-ca.crt": 0o644}
    assert "PRIVATE KEY" not in first.ca_pem
    before = _tree(tls_dir)
    again = site_tls.ensure_site_tls(str(tls_dir), list(reversed(NAMES)))
    assert not again.changed and not again.ca_created and not again.cert_issued
    assert again.ca_pem == first.ca_pem and _tree(tls_dir) == before


def test_new_names_reissue_the_server_certificate_under_the_same_ca(tmp_path: Path) -> None:
    tls_dir = tmp_path / "tls"
    first = site_tls.ensure_site_tls(str(tls_dir), NAMES)
    ca_key = (tls_dir / "private" / "site-ca.key").read_bytes()
    res = site_tls.ensure_site_tls(str(tls_dir), NAMES + ["repo.site.example"])
    assert res.changed and res.cert_issued and not res.ca_created
    assert res.ca_pem == first.ca_pem and (tls_dir / "private" / "site-ca.key").read_bytes() == ca_key
    assert "repo.site.example" in res.names


def test_renewed_when_it_expires_soon(tmp_path: Path) -> None:
    tls_dir = tmp_path / "tls"
    site_tls.ensure_site_tls(str(tls_dir), NAMES)
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=800)
    res = site_tls.ensure_site_tls(str(tls_dir), NAMES, now=later)
    assert res.cert_issued and not res.ca_created
    assert res.not_after.startswith(str((later + datetime.timedelta(days=825)).year))


def test_a_certificate_from_another_ca_is_replaced(tmp_path: Path) -> None:
    ours, other = tmp_path / "ours", tmp_path / "other"
    site_tls.ensure_site_tls(str(ours), NAMES)
    site_tls.ensure_site_tls(str(other), NAMES)
    (ours / "server.crt").write_bytes((other / "server.crt").read_bytes())
    (ours / "private" / "server.key").write_bytes((other / "private" / "server.key").read_bytes())
    assert site_tls.ensure_site_tls(str(ours), NAMES).cert_issued


def test_check_mode_writes_nothing(tmp_path: Path) -> None:
    tls_dir = tmp_path / "tls"
    res = site_tls.ensure_site_tls(str(tls_dir), NAMES, check_mode=True)
    assert res.changed and res.ca_created and not tls_dir.exists()
    site_tls.ensure_site_tls(str(tls_dir), NAMES)
    before = _tree(tls_dir)
    res = site_tls.ensure_site_tls(str(tls_dir), NAMES + ["other"], check_mode=True)
    assert res.cert_issued and _tree(tls_dir) == before


def test_half_a_ca_or_a_foreign_key_is_refused_with_the_files_named(tmp_path: Path) -> None:
    tls_dir = tmp_path / "tls"
    site_tls.ensure_site_tls(str(tls_dir), NAMES)
    other = tmp_path / "other"
    site_tls.ensure_site_tls(str(other), NAMES)
    key = tls_dir / "private" / "site-ca.key"
    saved = key.read_bytes()
    key.write_bytes((other / "private" / "site-ca.key").read_bytes())
    with pytest.raises(site_tls.TlsError, match=r"site-ca\.key is not the key of .*site-ca\.crt"):
        site_tls.ensure_site_tls(str(tls_dir), NAMES)
    key.unlink()
    with pytest.raises(site_tls.TlsError, match=r"site-ca\.crt is there but .*site-ca\.key is not"):
        site_tls.ensure_site_tls(str(tls_dir), NAMES)
    key.write_bytes(saved)
    os.chmod(key, 0o644)
    with pytest.raises(site_tls.TlsError, match="accessible by group/others; run 'chmod 600"):
        site_tls.ensure_site_tls(str(tls_dir), NAMES)
    with pytest.raises(site_tls.TlsError, match="without scheme or port"):
        site_tls.ensure_site_tls(str(tmp_path / "x"), ["https://repo:5000"])
    with pytest.raises(site_tls.TlsError, match="at least one name"):
        site_tls.ensure_site_tls(str(tmp_path / "x"), [" "])


def _serve_once(ctx: ssl.SSLContext) -> tuple[int, threading.Thread]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)

    def run() -> None:
        conn, _ = sock.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass
        finally:
            sock.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return sock.getsockname()[1], thread


def test_a_client_trusting_the_site_ca_verifies_the_server_and_another_ca_does_not(tmp_path: Path) -> None:
    res = site_tls.ensure_site_tls(str(tmp_path / "tls"), NAMES)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(res.server_cert, res.server_key)
    port, thread = _serve_once(server)
    client = ssl.create_default_context(cafile=res.ca_cert)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            client.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        assert conn.recv(2) == b"ok"
    thread.join(10)
    other = site_tls.ensure_site_tls(str(tmp_path / "other"), NAMES)
    port, thread = _serve_once(server)
    client = ssl.create_default_context(cafile=other.ca_cert)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            pytest.raises(ssl.SSLCertVerificationError):
        client.wrap_socket(raw, server_hostname="127.0.0.1")
    thread.join(10)


def test_the_site_ca_reaches_the_systemd_targets_registry_client_only(tmp_path: Path) -> None:
    """app_deploy's registry_ca goes to the systemd runtime (HTTPS against that CA); compose and k8s trust the CA
    through their engine's configuration, so they take no such argument."""
    from offline_delivery_core.targets.kinds import runtime_for_params

    params = {"target": "systemd", "app": "shop", "apps_dir": str(tmp_path), "state_dir": str(tmp_path),
              "kubeconfig": None, "namespace": None, "registry_ca": "/etc/offline-delivery/tls/site-ca.crt"}
    runtime = runtime_for_params(params, run=lambda argv: (0, "", ""))
    assert runtime.registry_ca == "/etc/offline-delivery/tls/site-ca.crt"
    assert runtime_for_params({**params, "registry_ca": None}, run=lambda argv: (0, "", "")).registry_ca is None
    assert not hasattr(runtime_for_params({**params, "target": "compose"}, run=lambda argv: (0, "", "")),
                       "registry_ca")
