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
import urllib.parse
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from offline_delivery_core.targets.k8s import (
    FINGERPRINT_ANNOTATION,
    K8sRuntime,
    RenderOptions,
    job_condition,
    pod_problem,
    rollout_problem,
)
from offline_delivery_core.app.runtime import ComponentSpec, DeployError
from offline_delivery_core.clients.kubernetes import K8sClient, K8sError, wait_for

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
    # Key usage and key identifiers as real cluster PKIs (Go's x509) have them: Python >= 3.13 verifies with
    # VERIFY_X509_STRICT, which refuses a chain without them.
    if ca:
        builder = (builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False, encipher_only=False,
                                                decipher_only=False), critical=True))
    if issuer:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                        critical=False)
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


def _serving(srv: http.server.ThreadingHTTPServer, context: ssl.SSLContext) -> Iterator[http.server.ThreadingHTTPServer]:
    """Serve ``srv`` over TLS on a thread for one test (answers 200 {} until a test sets ``answer``)."""
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    srv.requests = []  # type: ignore[attr-defined]
    srv.answer = lambda method, path, body: (200, {})  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


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
    yield from _serving(srv, context)


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
    with pytest.raises(K8sError, match="kind CronJob is not in the client's table .*give its apiVersion"):
        K8sClient("https://x").path("CronJob", namespace="x")


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
        if "/statefulsets/" in path or "/jobs/" in path:
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
        if "/jobs/" in path:
            return 404, {"kind": "Status", "reason": "NotFound"}
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
        if "/statefulsets/" in path or "/jobs/" in path:
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


# -- kubeconfigs users have: exec credential plugins, proxy-url, tls-server-name, discovery ------------------

PLUGIN = r'''#!%(python)s
import json, os, sys
with open(os.environ["OD_LOG"], "a") as handle:
    handle.write(json.dumps({"args": sys.argv[1:], "info": json.loads(os.environ["KUBERNETES_EXEC_INFO"]),
                             "marker": os.environ.get("OD_MARKER")}) + "\n")
sys.stderr.write(os.environ.get("OD_STDERR", ""))
sys.stdout.write(os.environ.get("OD_REPLY", ""))
sys.exit(int(os.environ.get("OD_EXIT", "0")))
'''


class Plugin:
    """A real exec plugin (a script run as a separate process): replies with what the test sets."""

    def __init__(self, root: Path) -> None:
        import sys
        self.path = root / "od-test-plugin"
        self.path.write_text(PLUGIN % {"python": sys.executable})
        self.path.chmod(0o700)
        self.log = root / "plugin.log"

    def runs(self) -> List[Dict[str, Any]]:
        return [json.loads(x) for x in self.log.read_text().splitlines()] if self.log.exists() else []

    def user(self, reply: Any, *, api_version: str = "client.authentication.k8s.io/v1", exit_code: int = 0,
             stderr: str = "", **extra: Any) -> Dict[str, Any]:
        text = reply if isinstance(reply, str) else json.dumps(reply)
        spec = {"apiVersion": api_version, "command": str(self.path), "args": ["get-token", "--cluster=c"],
                "env": [{"name": "OD_LOG", "value": str(self.log)}, {"name": "OD_REPLY", "value": text},
                        {"name": "OD_EXIT", "value": str(exit_code)}, {"name": "OD_STDERR", "value": stderr},
                        {"name": "OD_MARKER", "value": "m"}],
                "interactiveMode": "Never"}
        spec.update(extra)
        return {"exec": spec}


def credential(status: Dict[str, Any], api_version: str = "client.authentication.k8s.io/v1") -> Dict[str, Any]:
    return {"apiVersion": api_version, "kind": "ExecCredential", "status": status}


@pytest.fixture
def plugin(tmp_path: Path) -> Plugin:
    return Plugin(tmp_path)


@pytest.mark.parametrize("api_version", ["client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1"])
def test_exec_plugin_token(server: Any, pki: PKI, plugin: Plugin, api_version: str) -> None:
    config = kubeconfig(url_of(server), pki, **plugin.user(credential({"token": "exec-t0ken"}, api_version),
                                                            api_version=api_version, provideClusterInfo=True))
    config["clusters"][0]["cluster"]["extensions"] = [
        {"name": "client.authentication.k8s.io/exec", "extension": {"audience": "x"}}]
    client = K8sClient.from_kubeconfig(config)
    client.version()
    client.get("Service", "db", "shop")
    assert [r["headers"]["Authorization"] for r in server.requests] == ["Bearer exec-t0ken"] * 2
    (run,) = plugin.runs()                            # no expiry: one run for the client's life
    assert run["args"] == ["get-token", "--cluster=c"] and run["marker"] == "m"
    assert run["info"] == {"apiVersion": api_version, "kind": "ExecCredential", "spec": {
        "interactive": False, "cluster": {"server": url_of(server), "config": {"audience": "x"},
                                          "certificate-authority-data": base64.b64encode(pki.ca).decode()}}}


def test_exec_plugin_without_provide_cluster_info_gets_no_cluster(server: Any, pki: PKI, plugin: Plugin) -> None:
    K8sClient.from_kubeconfig(kubeconfig(url_of(server), pki, **plugin.user(credential({"token": "t"})))).version()
    assert plugin.runs()[0]["info"]["spec"] == {"interactive": False}


def test_exec_plugin_client_certificate(server: Any, pki: PKI, plugin: Plugin) -> None:
    reply = credential({"clientCertificateData": pki.client_cert.decode(), "clientKeyData": pki.client_key.decode()})
    K8sClient.from_kubeconfig(kubeconfig(url_of(server), pki, **plugin.user(reply))).version()
    (req,) = server.requests
    assert dict(x[0] for x in req["peer"]["subject"])["commonName"] == "admin"
    assert "Authorization" not in req["headers"]


def test_exec_credential_is_kept_until_it_expires() -> None:
    from offline_delivery_core.clients.kubernetes import EXEC_REFRESH_MARGIN, ExecPlugin
    now = [1_000_000_000.0]   # 2001-09-09T01:46:40Z
    calls: List[Dict[str, str]] = []

    def run(argv: List[str], **kwargs: Any) -> Any:
        calls.append(kwargs["env"])
        expiry = datetime.datetime.fromtimestamp(now[0] + 60, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        out = json.dumps(credential({"token": "t%d" % len(calls), "expirationTimestamp": expiry})).encode()
        return type("Done", (), {"returncode": 0, "stdout": out, "stderr": b""})()

    plugin = ExecPlugin("u", {"apiVersion": "client.authentication.k8s.io/v1", "command": "helper",
                              "env": [{"name": "A", "value": "1"}]}, run=run, clock=lambda: now[0])
    assert plugin.credential().token == "t1"
    now[0] += 60 - EXEC_REFRESH_MARGIN - 1
    assert plugin.credential().token == "t1"           # still fresh
    now[0] += 2
    assert plugin.credential().token == "t2"           # within the margin of its expiry: run again
    assert calls[0]["A"] == "1" and json.loads(calls[0]["KUBERNETES_EXEC_INFO"])["spec"]["interactive"] is False
    plugin.invalidate()
    assert plugin.credential().token == "t3"
    assert "t3" not in repr(plugin.credential()) and "t3" not in repr(plugin)


def test_401_runs_the_plugin_again_and_retries_once(server: Any, pki: PKI, plugin: Plugin) -> None:
    server.answer = lambda m, p, b: (401, {"kind": "Status", "reason": "Unauthorized", "message": "Unauthorized"})
    client = K8sClient.from_kubeconfig(kubeconfig(url_of(server), pki, **plugin.user(credential({"token": "t"}))))
    with pytest.raises(K8sError, match="HTTP 401 Unauthorized") as info:
        client.version()
    assert info.value.status == 401
    assert len(server.requests) == 2 and len(plugin.runs()) == 2      # one retry with a fresh credential, no loop
    server.answer = lambda m, p, b: (401, {}) if len(server.requests) == 3 else (200, {"gitVersion": "v1.34.4"})
    assert client.version() == {"gitVersion": "v1.34.4"}   # the kept credential, refused; a fresh one, accepted
    assert len(plugin.runs()) == 3 and len(server.requests) == 4


@pytest.mark.parametrize("reply, exit_code, stderr, problem", [
    ("", 1, "error: you must be logged in to the server\n",
     r"failed \(exit status 1\): error: you must be logged in to the server"),
    ("", 3, "", r"failed \(exit status 3\): no message on stderr"),
    ("token=SECRET-VALUE\n", 0, "", r"printed no JSON ExecCredential on stdout \(19 bytes\)"),
    ({"kind": "Status", "token": "SECRET-VALUE"}, 0, "", r"printed JSON that is not an ExecCredential \(kind 'Status'\)"),
    (credential({"token": "SECRET-VALUE"}, "client.authentication.k8s.io/v1beta1"), 0, "",
     r"answered with apiVersion 'client.authentication.k8s.io/v1beta1', but the kubeconfig asks for "
     r"'client.authentication.k8s.io/v1'"),
    ({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential"}, 0, "", "without status"),
    (credential({}), 0, "", "neither a token nor clientCertificateData and clientKeyData"),
    (credential({"clientCertificateData": "SECRET-VALUE"}), 0, "", "clientCertificateData without clientKeyData"),
    (credential({"token": "SECRET-VALUE", "expirationTimestamp": "tomorrow"}), 0, "", "bad expirationTimestamp"),
])
def test_exec_plugin_failures_name_the_command_never_the_secret(server: Any, pki: PKI, plugin: Plugin, reply: Any,
                                                                exit_code: int, stderr: str, problem: str) -> None:
    client = K8sClient.from_kubeconfig(kubeconfig(url_of(server), pki, **plugin.user(reply, exit_code=exit_code,
                                                                                      stderr=stderr)))
    with pytest.raises(K8sError, match=r"kubeconfig user 'u': the exec credential plugin '[^']*od-test-plugin' .*"
                                       + problem) as info:
        client.version()
    assert "SECRET-VALUE" not in str(info.value)
    assert not server.requests


def test_exec_plugin_certificate_that_does_not_load(server: Any, pki: PKI, plugin: Plugin) -> None:
    reply = credential({"clientCertificateData": pki.client_cert.decode(), "clientKeyData": "not a key"})
    with pytest.raises(K8sError, match=r"the exec credential plugin '.*od-test-plugin': the client certificate and "
                                       r"key do not load"):
        K8sClient.from_kubeconfig(kubeconfig(url_of(server), pki, **plugin.user(reply))).version()


def test_exec_plugin_missing_and_hanging(pki: PKI, tmp_path: Path) -> None:
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "od-no-such-helper",
                     "installHint": "install kubelogin from the site repository", "interactiveMode": "Never"}}
    with pytest.raises(K8sError, match=r"'od-no-such-helper' is not installed on the host that runs the deploy "
                                       r"\(not found in PATH\): install kubelogin from the site repository"):
        K8sClient.from_kubeconfig(kubeconfig("https://127.0.0.1:9", pki, **user)).version()
    user["exec"]["command"] = str(tmp_path / "gone")
    with pytest.raises(K8sError, match=r"is not installed on the host that runs the deploy \(not found\)"):
        K8sClient.from_kubeconfig(kubeconfig("https://127.0.0.1:9", pki, **user)).version()
    import sys
    hang = tmp_path / "hang"
    hang.write_text("#!%s\nimport time\ntime.sleep(30)\n" % sys.executable)
    hang.chmod(0o700)
    user["exec"]["command"] = str(hang)
    import time as _time
    started = _time.monotonic()
    with pytest.raises(K8sError, match=r"did not finish within 1s \(a plugin must not wait for input"):
        K8sClient.from_kubeconfig(kubeconfig("https://127.0.0.1:9", pki, **user), exec_timeout=1).version()
    assert _time.monotonic() - started < 10


@pytest.mark.parametrize("exec_spec, problem", [
    ({"apiVersion": "client.authentication.k8s.io/v1alpha1", "command": "x"}, "v1alpha1 was removed in Kubernetes 1.24"),
    ({"apiVersion": "v1", "command": "x"}, "apiVersion 'v1' is not one of"),
    ({"apiVersion": "client.authentication.k8s.io/v1"}, "command is required"),
    ({"apiVersion": "client.authentication.k8s.io/v1", "command": "bin/helper"}, "the command path 'bin/helper' is relative"),
    ({"apiVersion": "client.authentication.k8s.io/v1", "command": "x", "args": "--a"}, "args must be a list of strings"),
    ({"apiVersion": "client.authentication.k8s.io/v1", "command": "x", "env": [{"name": "A"}]}, "needs a name and a value"),
    ({"apiVersion": "client.authentication.k8s.io/v1", "command": "x", "interactiveMode": "Always"},
     "interactiveMode Always needs a person at a terminal"),
])
def test_exec_config_errors(pki: PKI, exec_spec: Dict[str, Any], problem: str) -> None:
    with pytest.raises(K8sError, match=r"kubeconfig: user 'u': exec.*" + problem.replace("(", r"\(")):
        K8sClient.from_kubeconfig(kubeconfig("https://x", pki, exec=exec_spec))


@pytest.mark.parametrize("user, problem", [
    ({"auth-provider": {"name": "oidc", "config": {"id-token": "x"}}},
     r"auth-provider 'oidc', which the k8s target does not support .* use an exec credential plugin instead, e\.g\. "
     r"for OIDC kubelogin"),
    ({"auth-provider": {"name": "gcp"}}, r"auth-provider 'gcp'.*gke-gcloud-auth-plugin"),
    ({"username": "admin", "password": "pw"}, r"username/password \(basic auth\), which Kubernetes removed in 1\.19"),
    ({"token": "t", "as": "someone"}, r"impersonates \(as\)"),
])
def test_unsupported_user_kinds_are_refused_naming_what_to_use(pki: PKI, user: Dict[str, Any], problem: str) -> None:
    with pytest.raises(K8sError, match=r"kubeconfig: user 'u' (uses|impersonates) .*" if "as" in user else problem):
        K8sClient.from_kubeconfig(kubeconfig("https://x", pki, **user))
    with pytest.raises(K8sError, match=problem):
        K8sClient.from_kubeconfig(kubeconfig("https://x", pki, **user))


def test_rfc3339() -> None:
    from offline_delivery_core.clients.kubernetes import parse_rfc3339
    assert parse_rfc3339("2001-09-09T01:46:40Z") == 1_000_000_000
    assert parse_rfc3339("2001-09-09T03:46:40+02:00") == 1_000_000_000
    assert parse_rfc3339("2001-09-08T17:46:40.250-08:00") == 1_000_000_000.25
    assert parse_rfc3339("2001-09-09T01:46:40.123456789Z") == pytest.approx(1_000_000_000.123456789)
    for bad in ("2001-09-09", "2001-09-09T01:46:40", "yesterday", 5):
        with pytest.raises(ValueError):
            parse_rfc3339(bad)  # type: ignore[arg-type]


# tls-server-name: a server whose certificate names only a DNS name, reached by its IP address.

@pytest.fixture
def named_server(pki: PKI, tmp_path: Path) -> Iterator[http.server.ThreadingHTTPServer]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "apiserver")]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("api.cluster.internal")]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.ca_key.public_key()), critical=False)
            .sign(pki.ca_key, hashes.SHA256()))
    (tmp_path / "named.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "named.key").write_bytes(_key_pem(key))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(tmp_path / "named.pem"), str(tmp_path / "named.key"))
    sni: List[Any] = []
    context.sni_callback = lambda sock, name, ctx: sni.append(name)
    srv.sni = sni  # type: ignore[attr-defined]
    yield from _serving(srv, context)


def test_tls_server_name(named_server: Any, pki: PKI) -> None:
    config = kubeconfig(url_of(named_server), pki, token="t")
    with pytest.raises(K8sError, match="CERTIFICATE_VERIFY_FAILED|match"):
        K8sClient.from_kubeconfig(config).version()       # the IP is not in the certificate
    config["clusters"][0]["cluster"]["tls-server-name"] = "api.cluster.internal"
    K8sClient.from_kubeconfig(config).version()
    assert named_server.sni[-1] == "api.cluster.internal"   # sent as SNI too, as client-go does
    config["clusters"][0]["cluster"]["tls-server-name"] = "other.cluster.internal"
    with pytest.raises(K8sError, match="CERTIFICATE_VERIFY_FAILED|match"):
        K8sClient.from_kubeconfig(config).version()


def test_proxy_url_connect_with_credentials(server: Any, pki: PKI) -> None:
    from tests.helpers.connect_proxy import ConnectProxy
    with ConnectProxy(credential="od user:p@ss:word", hosts={"api.via-proxy.invalid": "127.0.0.1"}) as proxy:
        config = kubeconfig("https://api.via-proxy.invalid:%d" % server.server_address[1], pki, token="t")
        config["clusters"][0]["cluster"].update({"proxy-url": proxy.url, "tls-server-name": "127.0.0.1"})
        K8sClient.from_kubeconfig(config).get("Service", "db", "shop")
        assert proxy.requests == [{"method": "CONNECT", "target": "api.via-proxy.invalid:%d" % server.server_address[1],
                                   "proxy-authorization": proxy.expected_header()}]
        assert server.requests[0]["path"] == "/api/v1/namespaces/shop/services/db"
        assert server.requests[0]["headers"]["Authorization"] == "Bearer t"   # inside the tunnel only
        config["clusters"][0]["cluster"]["proxy-url"] = proxy.url.replace("p%40ss", "wrong")
        with pytest.raises(K8sError, match=r"through the proxy 127\.0\.0\.1:\d+: .*407") as info:
            K8sClient.from_kubeconfig(config).version()
        assert "wrong" not in str(info.value)


def test_proxy_url_for_a_plain_http_server_and_refused_schemes(pki: PKI) -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)   # stands in for a forwarding proxy
    srv.requests = []  # type: ignore[attr-defined]
    srv.answer = lambda method, path, body: (200, {})  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        K8sClient("http://api.local:8080", proxy_url="http://u:pw@127.0.0.1:%d" % srv.server_address[1]).version()
        (req,) = srv.requests
        assert req["path"] == "http://api.local:8080/version"
        assert req["headers"]["Proxy-Authorization"] == "Basic " + base64.b64encode(b"u:pw").decode()
    finally:
        srv.shutdown()
        srv.server_close()
    for url in ("socks5://127.0.0.1:1080", "https://proxy:3128"):
        with pytest.raises(K8sError, match=r"proxy-url '%s': only http:// proxies are supported" % url):
            K8sClient("https://x", proxy_url=url)
    with pytest.raises(K8sError, match=r"proxy-url 'https://u:\*\*\*@proxy:3128'"):
        K8sClient("https://x", proxy_url="https://u:secret@proxy:3128")


def test_discovery_for_kinds_outside_the_table(server: Any, pki: PKI) -> None:
    resources = {"kind": "APIResourceList", "groupVersion": "example.com/v1", "resources": [
        {"name": "widgets", "kind": "Widget", "namespaced": True},
        {"name": "widgets/status", "kind": "Widget", "namespaced": True},
        {"name": "gadgets", "kind": "Gadget", "namespaced": False}]}

    def answer(method: str, path: str, body: bytes) -> Tuple[int, Any]:
        if path == "/apis/example.com/v1":
            return 200, resources
        if path in ("/apis/example.com/v2", "/api/v1"):
            return 404, {"kind": "Status", "reason": "NotFound", "message": "the server could not find the resource"}
        return 200, dict(json.loads(body), status={}) if body else {"items": []}

    server.answer = answer
    client = K8sClient.from_kubeconfig(kubeconfig(url_of(server), pki, token="t"))
    client.apply({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": "x"}})
    client.apply({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g", "namespace": "x"}})
    client.list("Widget", "x", api_version="example.com/v1")
    client.delete("Widget", "w", "x", api_version="example.com/v1")
    assert [(r["method"], r["path"].split("?")[0]) for r in server.requests] == [
        ("GET", "/apis/example.com/v1"),                       # once per group version
        ("PATCH", "/apis/example.com/v1/namespaces/x/widgets/w"),
        ("PATCH", "/apis/example.com/v1/gadgets/g"),           # cluster-scoped: no namespace in the path
        ("GET", "/apis/example.com/v1/namespaces/x/widgets"),
        ("DELETE", "/apis/example.com/v1/namespaces/x/widgets/w")]
    with pytest.raises(K8sError, match=r"the API server's example.com/v1 has no kind Sprocket \(it has: Gadget, Widget\)"):
        client.get("Sprocket", "s", "x", api_version="example.com/v1")
    with pytest.raises(K8sError, match=r"the API server has no API example.com/v2 \(kind Widget\): is the "
                                       r"CustomResourceDefinition"):
        client.get("Widget", "w", "x", api_version="example.com/v2")
    with pytest.raises(K8sError, match=r"kind Widget is not in the client's table .*give its apiVersion"):
        client.get("Widget", "w", "x")
    assert client.path("Deployment", namespace="a", name="b", api_version="apps/v1") == "/apis/apps/v1/namespaces/a/deployments/b"


# -- jobs (issue #20 item 6): the runtime against a small in-memory API server ---------------------------------

class FakeApi:
    """Enough of an API server for a job's life: server-side apply creates or updates (a Job's template cannot
    change: 422, as the real one answers), get/list (label selectors)/delete (a Job's pods go with it;
    foreground deletion finishes one read later, as the garbage collector does), pod logs. ``controller``
    plays the Job controller on every new Job: it returns the Job's status and its pod."""

    PLURALS = ("jobs", "deployments", "statefulsets", "services", "configmaps", "secrets", "pods",
               "persistentvolumeclaims")

    def __init__(self) -> None:
        self.objects: Dict[str, Dict[str, Any]] = {}
        self.uids = 0
        self.deletes: List[Tuple[str, str]] = []
        self.controller = succeed
        self.logs: Dict[str, str] = {}

    def put(self, path: str, obj: Dict[str, Any]) -> Dict[str, Any]:
        self.uids += 1
        obj.setdefault("metadata", {}).update(uid="uid-%d" % self.uids, generation=1,
                                              creationTimestamp="2026-01-01T00:00:%02dZ" % self.uids)
        self.objects[path] = obj
        return obj

    def __call__(self, method: str, path: str, body: bytes) -> Tuple[int, Any]:
        base, _, query = path.partition("?")
        params = dict(urllib.parse.parse_qsl(query))
        if method == "PATCH":
            obj = json.loads(body)
            current = self.objects.get(base)
            if current is not None:
                if obj["kind"] == "Job" and obj["spec"]["template"] != current["spec"]["template"]:
                    return 422, {"kind": "Status", "reason": "Invalid",
                                 "message": "Job.batch is invalid: spec.template: field is immutable"}
                current.update(obj)
                return 200, current
            obj = self.put(base, obj)
            if obj["kind"] == "Job":
                obj["status"], pod = self.controller(obj)
                if pod is not None:
                    self.put("/api/v1/namespaces/shop/pods/" + pod["metadata"]["name"], pod)
            else:
                obj["status"] = {"observedGeneration": 1}
            return 200, obj
        if method == "DELETE":
            obj = self.objects.get(base)
            if obj is None:
                return 404, {"kind": "Status", "reason": "NotFound"}
            policy = json.loads(body).get("propagationPolicy")
            self.deletes.append((base, policy))
            uid = obj["metadata"]["uid"]
            for other_path, other in list(self.objects.items()):
                if any(ref.get("uid") == uid for ref in other["metadata"].get("ownerReferences") or []):
                    del self.objects[other_path]
            if policy == "Foreground":
                obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
            else:
                del self.objects[base]
            return 200, {"kind": "Status", "status": "Success"}
        if base.endswith("/log"):
            return 200, self.logs.get(base.rsplit("/", 2)[-2], "").encode()
        obj = self.objects.get(base)
        if obj is not None:
            if obj["metadata"].get("deletionTimestamp"):   # the garbage collector finishes the deletion
                del self.objects[base]
            return 200, obj
        if base.rsplit("/", 1)[-1] not in self.PLURALS:
            return 404, {"kind": "Status", "reason": "NotFound"}
        wanted = dict(kv.split("=", 1) for kv in params.get("labelSelector", "").split(",") if kv)
        return 200, {"items": [o for p, o in self.objects.items() if p.rsplit("/", 1)[0] == base
                               and all(o["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())]}

    def names(self, plural: str) -> List[str]:
        return sorted(p.rsplit("/", 1)[1] for p in self.objects if p.rsplit("/", 2)[-2] == plural)


def job_pod(job: Dict[str, Any], state: Dict[str, Any], *, phase: str) -> Dict[str, Any]:
    meta = job["metadata"]
    return {"kind": "Pod", "metadata": {
        "name": "%s-%s" % (meta["name"], meta["uid"]), "labels": dict(job["spec"]["template"]["metadata"]["labels"]),
        "annotations": dict(job["spec"]["template"]["metadata"]["annotations"]),
        "ownerReferences": [{"kind": "Job", "name": meta["name"], "uid": meta["uid"]}]},
        "status": {"phase": phase, "containerStatuses": [{"name": meta["name"], "state": state, "ready": False}]}}


def succeed(job: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    return ({"startTime": "2026-01-01T00:00:00Z", "succeeded": 1,
             "conditions": [{"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]},
            job_pod(job, {"terminated": {"exitCode": 0, "reason": "Completed"}}, phase="Succeeded"))


def fail(job: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    return ({"startTime": "2026-01-01T00:00:00Z", "failed": 1,
             "conditions": [{"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"},
                            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                             "message": "Job has reached the specified backoff limit"}]},
            job_pod(job, {"terminated": {"exitCode": 3, "reason": "Error"}}, phase="Failed"))


def pull_fails(job: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    return ({"startTime": "2026-01-01T00:00:00Z", "active": 1},
            job_pod(job, {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}},
                    phase="Pending"))


def job_spec(fp: str = "a", **kw: Any) -> ComponentSpec:
    base: Dict[str, Any] = dict(name="migrate", kind="job", ports=[], health=None, env={"DB_HOST": "db"},
                                command=["python3", "-c", "print(1)"], fingerprint="hmac-sha256:" + fp * 64)
    base.update(kw)
    return spec(**base)


@pytest.fixture
def fake(server: Any, pki: PKI) -> Iterator[Tuple[FakeApi, K8sRuntime]]:
    api = FakeApi()
    server.answer = api
    client = K8sClient.from_kubeconfig(kubeconfig(url_of(server), pki, token="t"))
    yield api, K8sRuntime("shop", client=client, options=RenderOptions(namespace="shop"), poll=0.01)


def test_a_job_runs_as_a_new_job_and_is_left_alone_once_it_succeeded(fake: Tuple[FakeApi, K8sRuntime]) -> None:
    api, runtime = fake
    assert runtime.observe() == {}
    runtime.start([job_spec()], all_specs=[job_spec()])
    assert api.names("jobs") == ["migrate"] and api.names("services") == []
    job = api.objects["/apis/batch/v1/namespaces/shop/jobs/migrate"]
    assert job["metadata"]["annotations"][FINGERPRINT_ANNOTATION] == job_spec().fingerprint
    assert job["spec"]["template"]["metadata"]["annotations"][FINGERPRINT_ANNOTATION] == job_spec().fingerprint
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    # Succeeded with this fingerprint: the plan sees it "running" (done) and leaves it alone.
    seen = runtime.observe()["migrate"]
    assert (seen.fingerprint, seen.running, seen.started_at) == (job_spec().fingerprint, True, "2026-01-01T00:00:00Z")
    assert runtime.job_state(job_spec()) == ("succeeded", "Job migrate completed")
    assert runtime.probe(job_spec()) == (True, "")
    # The engine starts it again (changed, or its last run failed): the previous Job goes first (foreground,
    # waited for), as a Job's template cannot change in place, and a new one runs.
    uid = job["metadata"]["uid"]
    runtime.start([job_spec("b")], all_specs=[job_spec("b")])
    assert ("/apis/batch/v1/namespaces/shop/jobs/migrate", "Foreground") in api.deletes
    job = api.objects["/apis/batch/v1/namespaces/shop/jobs/migrate"]
    assert job["metadata"]["uid"] != uid and job["metadata"]["annotations"][FINGERPRINT_ANNOTATION] == job_spec("b").fingerprint
    assert runtime.observe()["migrate"].fingerprint == job_spec("b").fingerprint
    # No wait for an observedGeneration a Job does not have; its old pod went with it.
    assert api.names("pods") == ["migrate-" + job["metadata"]["uid"]]


def test_a_failed_job_names_its_exit_code_and_runs_again(fake: Tuple[FakeApi, K8sRuntime]) -> None:
    api, runtime = fake
    api.controller = fail
    runtime.start([job_spec()], all_specs=[])
    state, detail = runtime.job_state(job_spec())
    assert state == "failed", detail
    assert "Job migrate failed (BackoffLimitExceeded: Job has reached the specified backoff limit)" in detail
    assert "container migrate exited 3 Error" in detail
    seen = runtime.observe()["migrate"]
    assert not seen.running and "failed" in seen.detail and seen.fingerprint == job_spec().fingerprint
    assert runtime.probe(job_spec()) == (False, detail)
    pod = api.names("pods")[0]
    api.logs[pod] = "Traceback: no such table\n"
    assert runtime.logs("migrate") == "Traceback: no such table\n"
    # Same definition, started again (the plan's "restarted"): a new run.
    api.controller = succeed
    runtime.start([job_spec()], all_specs=[])
    assert runtime.job_state(job_spec())[0] == "succeeded" and runtime.observe()["migrate"].running


def test_job_state_while_it_runs_and_when_it_is_not_this_spec(fake: Tuple[FakeApi, K8sRuntime]) -> None:
    api, runtime = fake
    assert runtime.job_state(job_spec()) == ("failed", "Job shop/migrate does not exist")
    api.controller = pull_fails
    runtime.start([job_spec()], all_specs=[])
    state, detail = runtime.job_state(job_spec())
    assert state == "running" and "container migrate ImagePullBackOff: Back-off pulling image" in detail, detail
    assert not runtime.observe()["migrate"].running
    state, detail = runtime.job_state(job_spec("c"))
    assert state == "failed" and "runs another spec (hmac-sha256:aaaa" in detail
    # Status (probe_spec) carries no fingerprint: the Job's own state counts.
    assert runtime.job_state(job_spec(fingerprint=""))[0] == "running"


def test_a_service_that_becomes_a_job_and_back(fake: Tuple[FakeApi, K8sRuntime]) -> None:
    """A compose "migrate" service turned into a job: its Deployment and Service go; back to a service, the Job
    goes."""
    api, runtime = fake
    service = spec(name="migrate", env={}, fingerprint="hmac-sha256:" + "9" * 64)
    runtime.start([service], all_specs=[])
    assert api.names("deployments") == ["migrate"] and api.names("services") == ["migrate"]
    runtime.start([job_spec()], all_specs=[])
    assert api.names("deployments") == [] and api.names("services") == [] and api.names("jobs") == ["migrate"]
    runtime.start([service], all_specs=[])
    assert api.names("jobs") == [] and api.names("deployments") == ["migrate"]


def test_remove_and_uninstall_delete_jobs_and_their_pods(fake: Tuple[FakeApi, K8sRuntime]) -> None:
    api, runtime = fake
    runtime.start([job_spec()], all_specs=[])
    runtime.remove(["migrate"], all_specs=[])
    assert api.names("jobs") == [] and api.names("pods") == [] and api.names("configmaps") == []
    runtime.start([job_spec()], all_specs=[])
    assert "Job/migrate" in runtime.uninstall(keep_data=True)
    assert api.names("jobs") == [] and api.names("pods") == []
    assert ("/apis/batch/v1/namespaces/shop/jobs/migrate", "Background") in api.deletes


def test_job_condition() -> None:
    def job(*conditions: str) -> Dict[str, Any]:
        return {"status": {"active": 1, "conditions": [{"type": c, "status": "True"} for c in conditions]
                           + [{"type": "Failed", "status": "False"}]}}
    assert job_condition(job()) == ("running", "1 active, 0 succeeded, 0 failed pods")
    assert job_condition(job("SuccessCriteriaMet"))[0] == "running"     # pods still finishing
    assert job_condition(job("SuccessCriteriaMet", "Complete")) == ("succeeded", "")
    assert job_condition(job("FailureTarget")) == ("failed", "FailureTarget")
