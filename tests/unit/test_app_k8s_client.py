"""The stdlib Kubernetes client and K8sRuntime: request formation and TLS against a small local HTTPS
server, and the status interpretation on status documents shaped like the API server's.

Only what a real cluster cannot show is tested here (exact headers and query, client-certificate loading,
error texts, timeouts); applying the shop for real is tests/e2e/test_k8s_apply.py."""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import ssl
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from offline_delivery_core.targets.k8s import (
    FINGERPRINT_ANNOTATION,
    K8sRuntime,
    RenderOptions,
    pod_problem,
    rollout_problem,
)
from offline_delivery_core.app.runtime import ComponentSpec, DeployError
from offline_delivery_core.clients.kubernetes import K8sClient, K8sError, resource_path, wait_for

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402


# -- a tiny PKI and a recording HTTPS server ----------------------------------------------------------------

def _cert(subject: str, key: Any, issuer: Tuple[str, Any] | None, *, ca: bool = False, ip: str | None = None,
          usage: Any = None) -> bytes:
    import ipaddress
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                        critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class PKI:
    def __init__(self, root: Path) -> None:
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = _cert("test-ca", self.ca_key, None, ca=True)
        server_key = ec.generate_private_key(ec.SECP256R1())
        self.server_cert = root / "server.pem"
        self.server_key = root / "server.key"
        self.server_cert.write_bytes(_cert("apiserver", server_key, ("test-ca", self.ca_key), ip="127.0.0.1",
                                           usage=ExtendedKeyUsageOID.SERVER_AUTH))
        self.server_key.write_bytes(_key_pem(server_key))
        self.ca_file = root / "ca.pem"
        self.ca_file.write_bytes(self.ca)
        client_key = ec.generate_private_key(ec.SECP256R1())
        self.client_cert = _cert("admin", client_key, ("test-ca", self.ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        self.client_key = _key_pem(client_key)


class Recorder(http.server.BaseHTTPRequestHandler):
    """Records every request; answers from ``self.server.answer(method, path, body)``."""

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        peer = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        self.server.requests.append({  # type: ignore[attr-defined]
            "method": self.command, "path": self.path, "headers": dict(self.headers), "body": body, "peer": peer})
        status, reply = self.server.answer(self.command, self.path, body)  # type: ignore[attr-defined]
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PATCH = do_DELETE = do_POST = _handle

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def server(pki: PKI) -> Iterator[http.server.ThreadingHTTPServer]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    context.load_verify_locations(cafile=str(pki.ca_file))
    context.verify_mode = ssl.CERT_OPTIONAL   # a token-only client is allowed too; the peer cert is recorded
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    srv.requests = []  # type: ignore[attr-defined]
    srv.answer = lambda method, path, body: (200, {})  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def kubeconfig(url: str, pki: PKI, **user: Any) -> dict:
    return {"apiVersion": "v1", "kind": "Config", "current-context": "test",
            "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}],
            "clusters": [{"name": "c", "cluster": {"server": url,
                                                    "certificate-authority-data": base64.b64encode(pki.ca).decode()}}],
            "users": [{"name": "u", "user": user}]}


def url_of(srv: http.server.ThreadingHTTPServer) -> str:
    return "https://127.0.0.1:%d" % srv.server_address[1]


# -- client --------------------------------------------------------------------------------------------

def test_server_side_apply_request(server: Any, pki: PKI) -> None:
    client = K8sClient.from_kubeconfig(kubeconfig(url_of(server), pki, token="t0ken"))
    obj = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "api", "namespace": "shop"},
           "spec": {"replicas": 1}}
    server.answer = lambda m, p, b: (200, dict(json.loads(b), status={}))
    result = client.apply(obj)
    (req,) = server.requests
    assert req["method"] == "PATCH"
    assert req["path"] == "/apis/apps/v1/namespaces/shop/deployments/api?fieldManager=offline-delivery&force=true"
    assert req["headers"]["Content-Type"] == "application/apply-patch+yaml"
    assert req["headers"]["Authorization"] == "Bearer t0ken"
    assert json.loads(req["body"]) == obj      # JSON is YAML: the apply body is the object as JSON
    assert result["spec"] == {"replicas": 1}


def test_client_certificate_is_presented(server: Any, pki: PKI) -> None:
    config = kubeconfig(url_of(server), pki, **{"client-certificate-data": base64.b64encode(pki.client_cert).decode(),
                                                "client-key-data": base64.b64encode(pki.client_key).decode()})
    K8sClient.from_kubeconfig(config).version()
    peer = server.requests[0]["peer"]
    assert dict(x[0] for x in peer["subject"])["commonName"] == "admin"
    assert "Authorization" not in server.requests[0]["headers"]


def test_wrong_ca_is_refused(server: Any, pki: PKI, tmp_path: Path) -> None:
    other = PKI(tmp_path)
    config = kubeconfig(url_of(server), other, token="x")
    with pytest.raises(K8sError, match="cannot reach the API server .*CERTIFICATE_VERIFY_FAILED"):
        K8sClient.from_kubeconfig(config).version()


def test_files_in_kubeconfig_are_read_from_absolute_paths(server: Any, pki: PKI, tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(pki.ca)
    (tmp_path / "token").write_text("from-file\n")
    config = kubeconfig(url_of(server), pki, tokenFile=str(tmp_path / "token"))
    del config["clusters"][0]["cluster"]["certificate-authority-data"]
    config["clusters"][0]["cluster"]["certificate-authority"] = str(tmp_path / "ca.crt")
    K8sClient.from_kubeconfig(config).version()
    assert server.requests[0]["headers"]["Authorization"] == "Bearer from-file"


@pytest.mark.parametrize("field", ["certificate-authority", "tokenFile"])
def test_relative_file_paths_are_refused_not_read_from_the_working_directory(
        pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field: str) -> None:
    # The modules get the parsed kubeconfig, so nothing says what a relative path is relative to: the file in
    # the module's working directory is not the one meant, and must not be read.
    (tmp_path / "ca.crt").write_bytes(pki.ca)
    (tmp_path / "token").write_text("from-the-working-directory\n")
    monkeypatch.chdir(tmp_path)
    config = kubeconfig("https://127.0.0.1:9", pki, token="t")
    if field == "tokenFile":
        del config["users"][0]["user"]["token"]
        config["users"][0]["user"]["tokenFile"] = "token"
    else:
        del config["clusters"][0]["cluster"]["certificate-authority-data"]
        config["clusters"][0]["cluster"]["certificate-authority"] = "ca.crt"
    with pytest.raises(K8sError, match=r"path '(ca\.crt|token)' is relative; .* give an absolute path or embed"):
        K8sClient.from_kubeconfig(config)


def test_get_list_delete_requests(server: Any, pki: PKI) -> None:
    client = K8sClient.from_kubeconfig(kubeconfig(url_of(server), pki, token="t"))
    server.answer = lambda m, p, b: ((404, {"kind": "Status", "reason": "NotFound"}) if m != "GET" or "pods?" not in p
                                     else (200, {"items": [{"metadata": {"name": "b"}}, {"metadata": {"name": "a"}}]}))
    assert client.get("Service", "db", "shop") is None
    pods = client.list("Pod", "shop", label_selector="app.kubernetes.io/instance=shop,x=y")
    assert [p["metadata"]["name"] for p in pods] == ["a", "b"] and pods[0]["kind"] == "Pod"
    assert client.delete("ConfigMap", "gone", "shop") is False
    paths = [r["path"] for r in server.requests]
    assert paths == ["/api/v1/namespaces/shop/services/db",
                     "/api/v1/namespaces/shop/pods?labelSelector=app.kubernetes.io%2Finstance%3Dshop%2Cx%3Dy",
                     "/api/v1/namespaces/shop/configmaps/gone"]
    assert json.loads(server.requests[2]["body"])["propagationPolicy"] == "Background"


def test_api_error_names_the_object_and_the_server_message(server: Any, pki: PKI) -> None:
    client = K8sClient.from_kubeconfig(kubeconfig(url_of(server), pki, token="t"))
    server.answer = lambda m, p, b: (422, {"kind": "Status", "reason": "Invalid",
                                           "message": "Deployment.apps \"api\" is invalid: spec.selector: immutable"})
    with pytest.raises(K8sError, match=r"apply Deployment shop/api: HTTP 422 Invalid: .*immutable") as info:
        client.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "api", "namespace": "shop"}})
    assert info.value.status == 422


def test_unreachable_server_and_bad_kubeconfig(pki: PKI) -> None:
    with pytest.raises(K8sError, match="cannot reach the API server https://127.0.0.1:9"):
        K8sClient("https://127.0.0.1:9", timeout=2).version()
    with pytest.raises(K8sError, match="no context named 'nope'"):
        K8sClient.from_kubeconfig(kubeconfig("https://x", pki), context="nope")
    config = kubeconfig("https://x", pki)
    config["clusters"][0]["cluster"]["certificate-authority-data"] = "%%%"
    with pytest.raises(K8sError, match="certificate-authority-data is not base64"):
        K8sClient.from_kubeconfig(config)
    with pytest.raises(K8sError, match="must be an https"):
        K8sClient("ftp://x")
    with pytest.raises(K8sError, match="not one the k8s target manages"):
        resource_path("CronJob", namespace="x")


def test_wait_for_is_bounded() -> None:
    now = [0.0]
    calls: List[float] = []

    def check() -> Tuple[bool, str]:
        calls.append(now[0])
        return False, "1 of 2 pods ready"

    with pytest.raises(K8sError, match=r"timed out after 10s waiting for the rollout of api: 1 of 2 pods ready"):
        wait_for(check, timeout=10, interval=2, what="the rollout of api", clock=lambda: now[0],
                 sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert calls == [0, 2, 4, 6, 8, 10]   # the last check at the deadline, never after it
    assert wait_for(lambda: (True, "v"), timeout=0, interval=1, what="x") == "v"


# -- status interpretation ------------------------------------------------------------------------------

def test_rollout_problem() -> None:
    base = {"kind": "Deployment", "metadata": {"generation": 3}, "spec": {"replicas": 2}}
    assert "not seen generation 3" in rollout_problem(dict(base, status={"observedGeneration": 2}))
    assert rollout_problem(dict(base, status={"observedGeneration": 3, "updatedReplicas": 1})) == "1 of 2 pods updated"
    assert "1 pods of the previous spec still run" in rollout_problem(dict(base, status={
        "observedGeneration": 3, "updatedReplicas": 2, "replicas": 3, "readyReplicas": 2}))
    assert rollout_problem(dict(base, status={"observedGeneration": 3, "updatedReplicas": 2, "replicas": 2,
                                              "readyReplicas": 2, "availableReplicas": 2})) == ""
    sts = {"kind": "StatefulSet", "metadata": {"generation": 1}, "spec": {"replicas": 1},
           "status": {"observedGeneration": 1, "currentRevision": "db-1", "updateRevision": "db-2"}}
    assert "updated to the new revision" in rollout_problem(sts)
    sts["status"].update(currentRevision="db-2", readyReplicas=1)
    assert rollout_problem(sts) == ""


def test_pod_problem_reasons() -> None:
    crash = {"metadata": {"name": "api-1"}, "status": {"containerStatuses": [{
        "name": "api", "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}}
    assert pod_problem(crash) == "pod api-1: container api CrashLoopBackOff: back-off (last exit 1 Error, restarts 3)"
    unready = {"metadata": {"name": "api-2"}, "status": {"containerStatuses": [
        {"name": "api", "started": True, "ready": False, "restartCount": 0, "state": {"running": {}}}]}}
    assert pod_problem(unready) == "pod api-2: container api is running but not ready: its readiness probe fails; restarts 0"
    # As the API server reports the broken shop 1.2.0 API while its startup probe keeps failing.
    starting = {"metadata": {"name": "api-3"}, "status": {
        "conditions": [{"type": "Ready", "status": "False", "reason": "ContainersNotReady",
                        "message": "containers with unready status: [api]"}],
        "containerStatuses": [{"name": "api", "started": False, "ready": False, "restartCount": 1,
                               "state": {"running": {"startedAt": "2026-11-22T02:59:00Z"}}}]}}
    assert pod_problem(starting) == ("pod api-3: container api is running but not ready: its health check has not "
                                     "passed yet (startup probe); restarts 1")
    pending = {"metadata": {"name": "db-0"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/1 nodes are available: 1 Insufficient cpu."}]}}
    assert pod_problem(pending) == "pod db-0: PodScheduled Unschedulable: 0/1 nodes are available: 1 Insufficient cpu."


# -- runtime requests -------------------------------------------------------------------------------------

def spec(**kw: Any) -> ComponentSpec:
    base: Dict[str, Any] = dict(
        name="api", app="shop", version="1.0.0", image="repo:5000/shop/api:1.0.0@sha256:" + "1" * 64,
        reference="shop/api:1.0.0", index_digest="sha256:" + "1" * 64, manifest_digest="sha256:" + "2" * 64,
        platform="linux/amd64", entrypoint=None, command=None, user=None,
        env={"DB_PASSWORD": "S3cr3tS3cr3t", "DB_HOST": "db"}, config_files=[],
        ports=[{"name": "http", "port": 8000, "protocol": "tcp", "publish": None}],
        health={"http": {"port": 8000, "path": "/healthz"}, "interval": 5, "timeout": 3, "retries": 3,
                "start_period": 0}, fingerprint="sha256:" + "f" * 64)
    base.update(kw)
    return ComponentSpec(**base)


def test_runtime_start_applies_secret_first_and_stamps_the_engine_fingerprint(server: Any, pki: PKI) -> None:
    def answer(method: str, path: str, body: bytes) -> Tuple[int, Any]:
        if method == "PATCH":
            obj = json.loads(body)
            obj["metadata"]["generation"] = 1
            return 200, obj
        if "/statefulsets/" in path:
            return 404, {"kind": "Status", "reason": "NotFound"}
        return 200, {"kind": "Deployment", "metadata": {"generation": 1}, "status": {"observedGeneration": 1}}

    server.answer = answer
    client = K8sClient.from_kubeconfig(kubeconfig(url_of(server), pki, token="t"))
    runtime = K8sRuntime("shop", client=client, options=RenderOptions(namespace="shop"),
                         secret_values=["S3cr3tS3cr3t"])
    runtime.start([spec()], all_specs=[spec()])
    patches = [r for r in server.requests if r["method"] == "PATCH"]
    assert [json.loads(r["body"])["kind"] for r in patches] == ["Secret", "Service", "Deployment"]
    deployment = json.loads(patches[-1]["body"])
    assert deployment["metadata"]["annotations"][FINGERPRINT_ANNOTATION] == "sha256:" + "f" * 64
    assert deployment["spec"]["template"]["metadata"]["annotations"][FINGERPRINT_ANNOTATION] == "sha256:" + "f" * 64
    assert b"S3cr3tS3cr3t" not in patches[-1]["body"]
    assert server.requests[-1]["method"] == "GET"   # waited for observedGeneration
    assert not [r for r in server.requests if r["method"] == "DELETE"]


def test_runtime_replaces_a_workload_of_the_other_kind(server: Any, pki: PKI) -> None:
    """A component that gained a volume becomes a StatefulSet: its old Deployment is deleted."""
    def answer(method: str, path: str, body: bytes) -> Tuple[int, Any]:
        if method == "PATCH":
            return 200, dict(json.loads(body), status={})
        return 200, {"kind": "Deployment", "metadata": {"generation": 0}, "status": {}}

    server.answer = answer
    client = K8sClient.from_kubeconfig(kubeconfig(url_of(server), pki, token="t"))
    runtime = K8sRuntime("shop", client=client, options=RenderOptions(namespace="shop"))
    runtime.start([spec(env={}, volumes=[{"name": "data", "path": "/data"}])], all_specs=[])
    deletes = [r["path"] for r in server.requests if r["method"] == "DELETE"]
    assert deletes == ["/apis/apps/v1/namespaces/shop/deployments/api"]


def test_runtime_errors_are_deploy_errors_naming_the_component(server: Any, pki: PKI) -> None:
    server.answer = lambda m, p, b: (403, {"kind": "Status", "reason": "Forbidden", "message": "user cannot patch"})
    client = K8sClient.from_kubeconfig(kubeconfig(url_of(server), pki, token="t"))
    runtime = K8sRuntime("shop", client=client, options=RenderOptions(namespace="shop"))
    with pytest.raises(DeployError, match="api: apply Service api: .*HTTP 403 Forbidden: user cannot patch"):
        runtime.start([spec(env={})], all_specs=[])


def test_observe_reads_the_fingerprint_and_notices_changed_site_options(server: Any, pki: PKI) -> None:
    """observe() gives the engine's fingerprint back while the site's k8s options are the same; a changed
    option (here the storage class) makes the component look changed, so it is applied again."""
    applied: Dict[str, Any] = {}

    def answer(method: str, path: str, body: bytes) -> Tuple[int, Any]:
        if method == "PATCH":
            obj = json.loads(body)
            applied[obj["kind"]] = obj
            return 200, dict(obj, status={})
        if path.startswith("/apis/apps/v1/namespaces/shop/deployments?"):
            items = [applied["Deployment"]] if "Deployment" in applied else []
            return 200, {"items": [dict(o, spec=dict(o["spec"], replicas=1)) for o in items]}
        if "/pods?" in path:
            return 200, {"items": [{"metadata": {"name": "api-1"}, "status": {"startTime": "2026-01-01T00:00:00Z"}}]}
        if "?" in path:
            return 200, {"items": []}
        if "/statefulsets/" in path:
            return 404, {"kind": "Status", "reason": "NotFound"}
        return 200, {"metadata": {"generation": 0}, "status": {}}

    server.answer = answer
    client = K8sClient.from_kubeconfig(kubeconfig(url_of(server), pki, token="t"))
    runtime = K8sRuntime("shop", client=client, options=RenderOptions(namespace="shop", storage_class="a"))
    assert runtime.observe() == {}
    runtime.start([spec(env={})], all_specs=[])
    (seen,) = runtime.observe().values()
    assert seen.fingerprint == "sha256:" + "f" * 64 and seen.running and seen.started_at == "2026-01-01T00:00:00Z"
    other = K8sRuntime("shop", client=client, options=RenderOptions(namespace="shop", storage_class="b"))
    assert other.observe()["api"].fingerprint != "sha256:" + "f" * 64
    assert "?labelSelector=app.kubernetes.io%2Fmanaged-by%3Doffline-delivery%2Capp.kubernetes.io%2Finstance%3Dshop" \
        in [r["path"] for r in server.requests if "deployments?" in r["path"]][0]
