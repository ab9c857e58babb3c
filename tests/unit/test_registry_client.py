"""The registry client's pure parts (references, URLs, error bodies, plans) and its HTTP behaviour where a
real registry cannot be made to misbehave: a small in-process HTTP(S) server answers with relative or
absolute upload locations, authentication demands, rewritten digests, or not at all.

The push of real releases to a real registry is in tests/integration/test_registry_publish.py."""

from __future__ import annotations

import datetime
import hashlib
import http.server
import ipaddress
import json
import shutil
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from offline_delivery_core.clients.registry import RegistryClient, RegistryError, check_registry, registry_error_text, upload_url
from offline_delivery_core.common.oci import OciError, split_reference
from offline_delivery_core.site.publish import ImagePlan, check_tag_conflicts, parse_release, plan_release, publish_releases
from offline_delivery_core.site.repo import SiteRepo, import_bundle
from tests.unit.test_site_repo import vendor  # noqa: F401  (module-scoped signed bundles)


# ----------------------------------------------------------------------------------------------------------
# References and small helpers


@pytest.mark.parametrize("ref, want", [
    ("shop/api:1.0.0", ("shop/api", "1.0.0", None)),
    ("redis:7.2", ("redis", "7.2", None)),
    ("ghcr.io/acme/shop/api:2", ("acme/shop/api", "2", None)),
    ("localhost:5000/api:1", ("api", "1", None)),
    ("repo.site:5000/shop/api:1.0.0", ("shop/api", "1.0.0", None)),
    ("shop/api@sha256:" + "a" * 64, ("shop/api", None, "sha256:" + "a" * 64)),
    ("shop/api:1.0@sha256:" + "b" * 64, ("shop/api", "1.0", "sha256:" + "b" * 64)),
    ("my-org/my_app__x:v1-rc.1", ("my-org/my_app__x", "v1-rc.1", None)),
])
def test_split_reference(ref, want):
    assert split_reference(ref) == want


@pytest.mark.parametrize("ref, fragment", [
    ("shop/api", "has no tag or digest"),
    ("Shop/api:1", "lowercase path"),
    ("shop//api:1", "lowercase path"),
    ("shop/api:-bad", "invalid image reference"),
    ("shop/api@sha256:abc", "invalid image reference"),
    ("shop/api@sha512:" + "a" * 128, "must be sha256"),
])
def test_split_reference_refuses_with_the_reason(ref, fragment):
    with pytest.raises(OciError, match=fragment):
        split_reference(ref)


def test_check_registry():
    assert check_registry("repo.site:5000") == "repo.site:5000"
    assert check_registry("[::1]:5000") == "[::1]:5000"
    assert check_registry("10.0.0.5") == "10.0.0.5"
    for bad in ("http://repo:5000", "repo:5000/v2", "repo:5000:1", ""):
        with pytest.raises(RegistryError, match="give host:port"):
            check_registry(bad)


def test_upload_url_keeps_the_session_query_and_quotes_the_digest():
    digest = "sha256:" + "c" * 64
    quoted = "sha256%3A" + "c" * 64
    assert upload_url("/v2/a/blobs/uploads/u1", digest) == f"/v2/a/blobs/uploads/u1?digest={quoted}"
    assert upload_url("http://r:5000/v2/a/blobs/uploads/u1?_state=xy%3D", digest) == \
        f"http://r:5000/v2/a/blobs/uploads/u1?_state=xy%3D&digest={quoted}"


def test_registry_error_text():
    body = json.dumps({"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown to registry",
                                   "detail": "sha256:abc"}]}).encode()
    assert registry_error_text(body) == 'BLOB_UNKNOWN: blob unknown to registry ("sha256:abc")'
    assert registry_error_text(b"<html>bad gateway</html>") == "<html>bad gateway</html>"
    assert registry_error_text(b"") == "(empty body)"


def test_parse_release():
    assert parse_release("shop:1.0.0") == ("shop", "1.0.0")
    for bad in ("shop", ":1.0", "shop:"):
        with pytest.raises(RegistryError, match="name:version"):
            parse_release(bad)


def _plan(release: str, component: str, ref: str, index: str) -> ImagePlan:
    repository, tag, _ = split_reference(ref)
    return ImagePlan(release, component, ref, repository, tag, index, "application/vnd.oci.image.index.v1+json",
                     b"{}", [])


def test_one_tag_cannot_name_two_indexes():
    a, b = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    check_tag_conflicts([_plan("shop:1.0.0", "api", "shop/api:1", a), _plan("shop:1.1.0", "api", "shop/api:1", a)])
    with pytest.raises(RegistryError, match=r"shop/api:1 is sha256:1+ in release shop:1.0.0 .* release shop:1.1.0"):
        check_tag_conflicts([_plan("shop:1.0.0", "api", "shop/api:1", a),
                             _plan("shop:1.1.0", "api", "shop/api:1", b)])


# ----------------------------------------------------------------------------------------------------------
# Plans read from a real site repository


@pytest.fixture
def site(vendor, tmp_path) -> SiteRepo:  # noqa: F811
    repo = SiteRepo(str(tmp_path / "repo"))
    import_bundle(repo, str(vendor["full"]), [vendor["pub"]])
    return repo


def test_plan_release_lists_every_blob_of_every_image(site):
    manifest = json.loads((Path(site.root) / "releases/mini/1.0.0/manifest.json").read_text())
    plans = plan_release(site, "mini", "1.0.0")
    assert [(p.component, p.repository, p.tag) for p in plans] == [("cache", "mini/cache", "1.0.0"),
                                                                  ("web", "mini/web", "1.0.0")]
    for plan in plans:
        assert plan.index_digest == manifest["images"][plan.component]["index"]
        assert "sha256:" + hashlib.sha256(plan.index_data).hexdigest() == plan.index_digest
        assert {m.digest for m in plan.manifests} == set(manifest["images"][plan.component]["manifests"].values())
        for m in plan.manifests:
            assert m.blobs[0].role == "config" and all(b.role == "layer" for b in m.blobs[1:])


def test_plan_refuses_a_damaged_or_missing_blob_naming_it(site):
    plan = plan_release(site, "mini", "1.0.0")[1]
    manifest = plan.manifests[0]
    Path(site.blob_file(manifest.digest)).write_bytes(manifest.data + b" ")
    with pytest.raises(RegistryError, match=f"blob {manifest.digest} .* does not match its digest"):
        plan_release(site, "mini", "1.0.0")
    Path(site.blob_file(manifest.digest)).write_bytes(manifest.data)
    layer = manifest.blobs[-1]
    Path(layer.path).unlink()
    with pytest.raises(RegistryError, match=f"component web manifest linux/.*: layer blob {layer.digest} is missing"):
        plan_release(site, "mini", "1.0.0")


def test_unknown_release_names_the_releases_there(site):
    with pytest.raises(RegistryError, match=r"mini:2.0.0 is not in the catalog .*\(releases there: mini:1.0.0\)"):
        plan_release(site, "mini", "2.0.0")


# ----------------------------------------------------------------------------------------------------------
# HTTP behaviour against a scripted server


Handler = Callable[[http.server.BaseHTTPRequestHandler, bytes], tuple[int, dict[str, str], bytes]]


class ScriptedServer:
    """Answers each request with ``handler(request, body)``; records (method, path, headers, body)."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        outer = self

        class _H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.requests.append((self.command, self.path, dict(self.headers), body))
                status, headers, payload = handler(self, body)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_HEAD = do_POST = do_PUT = _any

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _H)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def serve() -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(handler: Handler, tls: ssl.SSLContext | None = None) -> ScriptedServer:
        servers.append(ScriptedServer(handler, tls))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.mark.parametrize("absolute", [False, True])
def test_upload_follows_the_location_and_streams_the_file(serve, tmp_path, absolute):
    data = bytes(range(256)) * 5000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = tmp_path / "blob"
    path.write_bytes(data)

    def handler(req, body):
        if req.command == "POST":
            loc = "/v2/x/y/blobs/uploads/session-1?_state=s1"
            return 202, {"Location": f"http://127.0.0.1:{srv.port}{loc}" if absolute else loc}, b""
        got = "sha256:" + hashlib.sha256(body).hexdigest()
        return (201, {"Docker-Content-Digest": got}, b"") if got == digest else (400, {}, b"bad digest")

    srv = serve(handler)
    with RegistryClient(f"127.0.0.1:{srv.port}") as client:
        client.upload_blob("x/y", digest, str(path), len(data))
    (post, put) = srv.requests
    assert post[0] == "POST" and post[1] == "/v2/x/y/blobs/uploads/"
    assert put[0] == "PUT" and put[1] == f"/v2/x/y/blobs/uploads/session-1?_state=s1&digest=sha256%3A{digest[7:]}"
    assert put[2]["Content-Length"] == str(len(data)) and "Transfer-Encoding" not in put[2]
    assert put[3] == data


def test_upload_refuses_a_file_of_the_wrong_size_before_sending(serve, tmp_path):
    srv = serve(lambda req, body: (202, {"Location": "/v2/x/blobs/uploads/u"}, b""))
    path = tmp_path / "blob"
    path.write_bytes(b"12345")
    with RegistryClient(f"127.0.0.1:{srv.port}") as client, \
            pytest.raises(RegistryError, match=r"blob sha256:0+ \(9 bytes\) to x .* is 5 bytes, the release says 9"):
        client.upload_blob("x", "sha256:" + "0" * 64, str(path), 9)
    assert [r[0] for r in srv.requests] == ["POST"]


def test_authentication_demand_is_explained(serve):
    body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}).encode()
    srv = serve(lambda req, b: (401, {"WWW-Authenticate": 'Basic realm="x"'}, body))
    with RegistryClient(f"127.0.0.1:{srv.port}") as client:
        with pytest.raises(RegistryError, match=r"GET /v2/\): HTTP 401: UNAUTHORIZED: authentication required; "
                                                r".*without authentication"):
            client.ping()
        with pytest.raises(RegistryError, match=r"blob sha256:a+ in shop/api: HTTP 401: .*without authentication"):
            client.blob_exists("shop/api", "sha256:" + "a" * 64)  # HEAD: no body to quote


def test_manifest_put_is_exact_bytes_and_a_rewritten_digest_is_refused(serve):
    data = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}'
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    answers = iter([digest, "sha256:" + "f" * 64])
    srv = serve(lambda req, body: (201, {"Docker-Content-Digest": next(answers)}, b""))
    with RegistryClient(f"127.0.0.1:{srv.port}") as client:
        assert client.put_manifest("a/b", "1.0", data, "application/vnd.oci.image.index.v1+json") == digest
        with pytest.raises(RegistryError, match="rewrote the manifest"):
            client.put_manifest("a/b", "1.0", data, "application/vnd.oci.image.index.v1+json")
    put = srv.requests[0]
    assert put[1] == "/v2/a/b/manifests/1.0" and put[3] == data
    assert put[2]["Content-Type"] == "application/vnd.oci.image.index.v1+json"


def test_manifest_digest_asks_for_every_manifest_type(serve):
    digest = "sha256:" + "d" * 64
    srv = serve(lambda req, body: (200, {"Docker-Content-Digest": digest}, b"") if "1.0" in req.path
                else (404, {}, b""))
    with RegistryClient(f"127.0.0.1:{srv.port}") as client:
        assert client.manifest_digest("a", "1.0") == digest
        assert client.manifest_digest("a", "2.0") is None
    accept = srv.requests[0][2]["Accept"]
    for media_type in ("application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
                       "application/vnd.docker.distribution.manifest.list.v2+json",
                       "application/vnd.docker.distribution.manifest.v2+json"):
        assert media_type in accept


def test_a_registry_that_never_answers_fails_within_the_timeout():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts connections (kernel backlog), never answers
        port = listener.getsockname()[1]
        started = time.monotonic()
        with RegistryClient(f"127.0.0.1:{port}", timeout=1) as client, \
                pytest.raises(RegistryError, match=r"no answer within 1s"):
            client.ping()
        assert time.monotonic() - started < 10


def _tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context with a certificate for 127.0.0.1 and the CA file that verifies it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site registry test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = tmp_path / "cert.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = tmp_path / "key.pem"
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_pem, key_pem)
    return ctx, cert_pem


def test_https_with_the_site_ca_file(serve, tmp_path):
    server_ctx, ca_file = _tls_contexts(tmp_path)
    srv = serve(lambda req, body: (200, {"Docker-Distribution-Api-Version": "registry/2.0"}, b"{}"), tls=server_ctx)
    with RegistryClient(f"127.0.0.1:{srv.port}", insecure=False, ca_file=str(ca_file)) as client:
        client.ping()
    with RegistryClient(f"127.0.0.1:{srv.port}", insecure=False) as client, \
            pytest.raises(RegistryError, match="TLS failed .* give the site CA with ca_file"):
        client.ping()
    with pytest.raises(RegistryError, match="CA file .*missing.pem .* cannot be loaded"):
        RegistryClient("127.0.0.1:1", insecure=False, ca_file=str(tmp_path / "missing.pem"))


def test_blobs_shared_between_repositories_are_mounted_not_uploaded(site, serve):
    """A scripted registry that stores what it is given: the second repository gets shared blobs by mount."""
    blobs: dict[str, set[str]] = {}
    manifests: dict[tuple[str, str], str] = {}

    def handler(req, body):
        path, _, query = req.path.partition("?")
        parts = path.split("/")
        if path == "/v2/":
            return 200, {}, b"{}"
        if "/blobs/uploads/" in path and req.command == "POST":
            repo = "/".join(parts[2:-3])
            q = dict(p.split("=", 1) for p in query.split("&") if p)
            src = q.get("from", "").replace("%2F", "/")
            digest = q.get("mount", "").replace("%3A", ":")
            if src and src in blobs.get(digest, set()):
                blobs[digest].add(repo)
                return 201, {}, b""
            return 202, {"Location": f"/v2/{repo}/blobs/uploads/u"}, b""
        if "/blobs/uploads/" in path and req.command == "PUT":
            repo = "/".join(parts[2:-3])
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            blobs.setdefault(digest, set()).add(repo)
            return 201, {"Docker-Content-Digest": digest}, b""
        if "/blobs/" in path:
            repo = "/".join(parts[2:-2])
            return (200, {}, b"") if repo in blobs.get(parts[-1], set()) else (404, {}, b"")
        repo, ref = "/".join(parts[2:-2]), parts[-1]
        if req.command == "PUT":
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            manifests[(repo, ref)] = manifests[(repo, digest)] = digest
            return 201, {"Docker-Content-Digest": digest}, b""
        got = manifests.get((repo, ref))
        return (200, {"Docker-Content-Digest": got}, b"") if got else (404, {}, b"")

    srv = serve(handler)
    with RegistryClient(f"127.0.0.1:{srv.port}") as client:
        preview = publish_releases(site, client, None, check_mode=True)
        assert not blobs and not manifests
        results = publish_releases(site, client, None)
        again = publish_releases(site, client, [("mini", "1.0.0")])
    cache, web = results
    # the two images share their base layer per arch: cache uploads it, web mounts it
    assert cache.blobs_mounted == 0 and web.blobs_mounted == 2
    assert [(r.blobs_pushed, r.blobs_mounted, r.bytes_pushed) for r in preview] == \
        [(r.blobs_pushed, r.blobs_mounted, r.bytes_pushed) for r in results]
    assert manifests[("mini/web", "1.0.0")] == web.index and manifests[("mini/cache", "1.0.0")] == cache.index
    assert not any(r.changed for r in again)
    mounts = [r for r in srv.requests if r[0] == "POST" and "mount=" in r[1]]
    assert len(mounts) == 2 and all("from=mini%2Fcache" in r[1] for r in mounts)


def test_nothing_to_publish_makes_no_request(tmp_path):
    repo = SiteRepo(str(tmp_path / "empty"))
    repo.ensure_layout()
    with RegistryClient("127.0.0.1:1", timeout=1) as client:  # nothing listens there
        assert publish_releases(repo, client, None) == []
    shutil.rmtree(tmp_path / "empty")
