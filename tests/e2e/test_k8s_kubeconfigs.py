"""The kubeconfigs users have, against the test world's real Kubernetes cluster (tests/world/k8s).

The stdlib client (`offline_delivery_core.clients.kubernetes.K8sClient`) and the k8s target through:

- an exec credential plugin (client.authentication.k8s.io/v1) that hands out the cluster admin's client
  certificate: the API server sees kubernetes-admin; the plugin gets KUBERNETES_EXEC_INFO with the cluster
  (provideClusterInfo), its args and env; its credential is re-run when it expires, not before;
- an exec plugin (v1beta1) that hands out a service account's token made with the TokenRequest API: the API
  server sees the service account, RBAC applies to it (403 naming it outside its namespace); a revoked token
  (401) makes the client run the plugin again and retry;
- `proxy-url` (a CONNECT proxy on loopback with basic credentials) together with `tls-server-name`: the
  server URL names a host only the proxy can resolve and the certificate does not carry; the certificate is
  checked against tls-server-name, and a wrong one is refused;
- API discovery for kinds outside the client's table (ServiceAccount, RoleBinding; an unknown group is
  reported by name);
- the k8s target's module (`app_uninstall`) run by ansible on the jump host, where a k8s target's deploy runs
  (connection local, Debian's python3 without the `kubernetes` package), with an exec-plugin kubeconfig.

Skips, naming the reason, only when the cluster cannot be built or run on this machine (CI fails on it).
Run alone with a site name of its own: `OD_E2E_SITE=k8sx .venv/bin/python -m pytest tests/e2e/test_k8s_kubeconfigs.py`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import yaml

from offline_delivery_core.app.runtime import ComponentSpec
from offline_delivery_core.clients.kubernetes import K8sClient, K8sError
from offline_delivery_core.targets.k8s import K8sRuntime, RenderOptions
from tests.e2e.test_k8s_cluster import cluster_problem
from tests.helpers.connect_proxy import ConnectProxy
from tests.world.site import Site

pytestmark = pytest.mark.world

NS_CERT = "od-kx-cert"
NS_SA = "od-kx-sa"
NS_APP = "od-kx-app"
NS_HEADLESS = "od-kx-headless"
SA = "deployer"
PLUGIN_DIR = "kx"        # in the site's drop box: /srv/transfer/kx in the jump host

# The exec plugin: what a site's own credential helper does, in a few lines. It finds its files next to
# itself, so the same script serves this machine and the jump host. It logs each run (without the secret).
PLUGIN = r'''#!/usr/bin/env python3
import datetime, json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
mode = sys.argv[1]
info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
log = os.path.join(here, os.environ.get("OD_PLUGIN_LOG", "runs.log"))
with open(log, "a") as handle:
    handle.write(json.dumps({"args": sys.argv[1:], "info": info, "marker": os.environ.get("OD_MARKER")}) + "\n")
with open(log) as handle:
    runs = sum(1 for _ in handle)
ttl = int(os.environ.get("OD_TTL", "3600"))
expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=ttl)
status = {"expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}
def read(name):
    with open(os.path.join(here, name)) as handle:
        return handle.read()
if mode == "cert":
    status["clientCertificateData"] = read("admin.crt")
    status["clientKeyData"] = read("admin.key")
elif mode == "token":
    status["token"] = read("sa.token").strip()
elif mode == "revoked-then-token":
    status["token"] = "revoked" if runs == 1 else read("sa.token").strip()
else:
    sys.exit("unknown mode " + mode)
print(json.dumps({"apiVersion": info["apiVersion"], "kind": "ExecCredential", "status": status}))
'''


@dataclass
class World:
    site: Site
    admin: K8sClient
    admin_config: Dict[str, Any]
    server: str
    node_ip: str
    plugin_dir: Path       # on this machine; /srv/transfer/kx in the jump host

    def exec_config(self, mode: str, *, api_version: str = "client.authentication.k8s.io/v1", log: str,
                    ttl: int = 3600, plugin: str = "", **cluster: Any) -> Dict[str, Any]:
        """The admin kubeconfig with its user replaced by the exec plugin (no certificate of its own)."""
        config = json.loads(json.dumps(self.admin_config))
        config["clusters"][0]["cluster"].update(cluster)
        config["clusters"][0]["cluster"]["extensions"] = [
            {"name": "client.authentication.k8s.io/exec", "extension": {"audience": "od-kx"}}]
        config["users"][0]["user"] = {"exec": {
            "apiVersion": api_version, "command": plugin or str(self.plugin_dir / "plugin.py"),
            "args": [mode], "env": [{"name": "OD_PLUGIN_LOG", "value": log}, {"name": "OD_TTL", "value": str(ttl)},
                                    {"name": "OD_MARKER", "value": "from-the-kubeconfig"}],
            "provideClusterInfo": True, "interactiveMode": "Never",
            "installHint": "the site's credential helper lives in /srv/transfer/kx"}}
        return config

    def runs(self, log: str) -> List[Dict[str, Any]]:
        path = self.plugin_dir / log
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def whoami(client: K8sClient) -> str:
    """The user the API server authenticated (SelfSubjectReview, GA since Kubernetes 1.28)."""
    status, body = client.request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                                  body={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
                                  what="SelfSubjectReview")
    assert status == 201, body
    return body["status"]["userInfo"]["username"]


def config_map(namespace: str, name: str, **data: str) -> Dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace},
            "data": data}


def namespace(name: str) -> Dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"od-e2e": "kx"}}}


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    from tests.world.k8s.cluster import Cluster
    from tests.world.util import WorldError

    problem = cluster_problem()
    if problem:
        pytest.skip("k8s cluster unavailable on this machine: " + problem)
    site: Site = request.getfixturevalue("world_site")
    cluster = Cluster(site.name)
    info = None
    failures = []
    for _attempt in range(2):   # as test_k8s_apply: a busy machine can miss the node's readiness window once
        try:
            info = cluster.up()
            break
        except WorldError as exc:
            failures.append(str(exc))
            cluster.down()
    if info is None:
        pytest.skip("the test world's Kubernetes cluster did not come up: %s" % " / ".join(failures))
    plugin_dir = site.transfer_dir / PLUGIN_DIR
    try:
        shutil.rmtree(plugin_dir, ignore_errors=True)
        plugin_dir.mkdir(mode=0o700)
        (plugin_dir / "plugin.py").write_text(PLUGIN)
        (plugin_dir / "plugin.py").chmod(0o700)
        for name in ("admin.crt", "admin.key"):
            shutil.copyfile(cluster.state_dir / "pki" / name, plugin_dir / name)
            (plugin_dir / name).chmod(0o600)
        admin_config = yaml.safe_load(Path(info["kubeconfig"]).read_text())
        admin = K8sClient.from_kubeconfig(admin_config)
        node_ip = info["server"].split("//", 1)[1].rsplit(":", 1)[0]
        yield World(site, admin, admin_config, info["server"], node_ip, plugin_dir)
    finally:
        shutil.rmtree(plugin_dir, ignore_errors=True)
        if os.environ.get("OD_WORLD_KEEP") != "1":
            cluster.down()


def test_exec_plugin_v1_client_certificate_and_expiry(world: World) -> None:
    ttl = 14    # the client re-runs 10 s before expiry: the credential is good for about 4 s
    client = K8sClient.from_kubeconfig(world.exec_config("cert", log="cert.log", ttl=ttl))
    assert whoami(client) == "kubernetes-admin"          # the certificate the plugin printed, nothing else
    client.apply(namespace(NS_CERT))
    client.apply(config_map(NS_CERT, "via-exec", source="exec plugin, v1, client certificate"))
    assert client.get("ConfigMap", "via-exec", NS_CERT)["data"]["source"].startswith("exec plugin")
    runs = world.runs("cert.log")
    assert len(runs) == 1 == client.exec_plugin.runs, "one run for several requests while the credential is fresh"
    (run,) = runs
    assert run["args"] == ["cert"] and run["marker"] == "from-the-kubeconfig"
    assert run["info"]["apiVersion"] == "client.authentication.k8s.io/v1"
    assert run["info"]["spec"]["interactive"] is False
    cluster_info = run["info"]["spec"]["cluster"]
    assert cluster_info["server"] == world.server and cluster_info["config"] == {"audience": "od-kx"}
    assert cluster_info["certificate-authority-data"] == world.admin_config["clusters"][0]["cluster"][
        "certificate-authority-data"]
    time.sleep(ttl - 10 + 1)                              # past the refresh point
    assert client.get("ConfigMap", "via-exec", NS_CERT) is not None
    assert len(world.runs("cert.log")) == 2, "an expired credential is fetched again"


def test_exec_plugin_v1beta1_service_account_token_rbac_and_401(world: World) -> None:
    admin = world.admin
    admin.apply(namespace(NS_SA))
    # Kinds outside the client's table: found by API discovery.
    admin.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SA, "namespace": NS_SA}})
    admin.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                 "metadata": {"name": "deployer-edit", "namespace": NS_SA},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
                 "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": NS_SA}]})
    assert [b["metadata"]["name"] for b in admin.list("RoleBinding", NS_SA, api_version="rbac.authorization.k8s.io/v1")
            ] == ["deployer-edit"]
    status, made = admin.request("POST", "/api/v1/namespaces/%s/serviceaccounts/%s/token" % (NS_SA, SA),
                                 body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                       "spec": {"expirationSeconds": 900}}, what="TokenRequest")
    assert status == 201, made
    token_file = world.plugin_dir / "sa.token"
    token_file.write_text(made["status"]["token"])
    token_file.chmod(0o600)

    client = K8sClient.from_kubeconfig(world.exec_config(
        "token", api_version="client.authentication.k8s.io/v1beta1", log="token.log"))
    assert whoami(client) == "system:serviceaccount:%s:%s" % (NS_SA, SA)
    client.apply(config_map(NS_SA, "via-token", source="exec plugin, v1beta1, service account token"))
    assert client.get("ConfigMap", "via-token", NS_SA)["metadata"]["managedFields"][0]["manager"] == "offline-delivery"
    with pytest.raises(K8sError, match=r'HTTP 403 Forbidden: .*"system:serviceaccount:%s:%s" cannot' % (NS_SA, SA)):
        client.apply(config_map("default", "not-allowed"))
    assert len(world.runs("token.log")) == 1

    # A credential the server no longer accepts (401): the plugin runs again and the request is retried.
    client = K8sClient.from_kubeconfig(world.exec_config(
        "revoked-then-token", api_version="client.authentication.k8s.io/v1beta1", log="revoked.log"))
    assert client.get("ConfigMap", "via-token", NS_SA) is not None
    assert len(world.runs("revoked.log")) == 2 == client.exec_plugin.runs

    # A group version the server does not have is named, before anything is sent.
    with pytest.raises(K8sError, match=r"the API server has no API widgets\.example\.com/v1 \(kind Widget\)"):
        admin.apply({"apiVersion": "widgets.example.com/v1", "kind": "Widget",
                     "metadata": {"name": "w", "namespace": NS_SA}})


def test_proxy_url_and_tls_server_name(world: World) -> None:
    # The server is named by a host only the proxy can resolve, which the serving certificate does not carry:
    # the connection works only through the proxy, and only with tls-server-name set to a name it does carry.
    hidden = "https://api.od-kx.invalid:6443"
    with ConnectProxy(credential="site:pa ss@1", hosts={"api.od-kx.invalid": world.node_ip}) as proxy:
        def config(**cluster: Any) -> Dict[str, Any]:
            cfg = json.loads(json.dumps(world.admin_config))
            cfg["clusters"][0]["cluster"].update({"server": hidden, "proxy-url": proxy.url, **cluster})
            return cfg

        client = K8sClient.from_kubeconfig(config(**{"tls-server-name": "kubernetes.default.svc"}))
        assert client.version()["gitVersion"].startswith("v1.")
        assert whoami(client) == "kubernetes-admin"       # the client certificate went through the tunnel
        assert proxy.requests[0]["method"] == "CONNECT" and proxy.requests[0]["target"] == "api.od-kx.invalid:6443"
        assert proxy.requests[0]["proxy-authorization"] == proxy.expected_header()

        with pytest.raises(K8sError, match=r"cannot reach the API server .* through the proxy 127\.0\.0\.1:\d+: .*"
                                           r"(Hostname mismatch|doesn't match|CERTIFICATE_VERIFY_FAILED)"):
            K8sClient.from_kubeconfig(config(**{"tls-server-name": "wrong.od-kx.invalid"})).version()
        with pytest.raises(K8sError, match=r"(Hostname mismatch|doesn't match|CERTIFICATE_VERIFY_FAILED)"):
            K8sClient.from_kubeconfig(config()).version()     # without tls-server-name the URL's host is checked

        # Exec plugin, proxy and tls-server-name together: the plugin is told about the proxy and the name.
        client = K8sClient.from_kubeconfig(world.exec_config(
            "cert", log="proxy.log", server=hidden, **{"proxy-url": proxy.url,
                                                     "tls-server-name": "kubernetes.default.svc"}))
        assert whoami(client) == "kubernetes-admin"
        (run,) = world.runs("proxy.log")
        assert run["info"]["spec"]["cluster"]["tls-server-name"] == "kubernetes.default.svc"
        assert run["info"]["spec"]["cluster"]["proxy-url"] == proxy.url
    with pytest.raises(K8sError, match=r"proxy-url 'socks5://127\.0\.0\.1:1080': only http:// proxies"):
        K8sClient.from_kubeconfig(config(**{"proxy-url": "socks5://127.0.0.1:1080"}))


def test_k8s_target_module_on_the_jump_host_with_an_exec_plugin(world: World) -> None:
    """The deploy host of a k8s target is where ansible runs it (connection local on the jump host here, the
    controller or an AWX execution environment at a site): the module, through AnsiballZ and Debian's
    python3 without the `kubernetes` package, uses the exec plugin there."""
    jump_python = world.site.jump(["/usr/bin/python3", "-c", "import kubernetes"], timeout=60)
    assert jump_python.rc != 0 and "No module named 'kubernetes'" in jump_python.output, jump_python.output

    # A component of app kx, applied through an exec-plugin kubeconfig from this machine with K8sRuntime.
    client = K8sClient.from_kubeconfig(world.exec_config("cert", log="runtime.log"))
    runtime = K8sRuntime("kx", client=client, options=RenderOptions(namespace=NS_APP), poll=1.0)
    spec = ComponentSpec(
        name="web", app="kx", version="1.0.0", image="od-world.local/pause:1.0", reference="pause:1.0",
        index_digest="sha256:" + "1" * 64, manifest_digest="sha256:" + "2" * 64, platform="linux/amd64",
        entrypoint=None, command=None, user=None, env={}, config_files=[], fingerprint="hmac-sha256:" + "a" * 64)
    runtime.prepare([spec])
    runtime.start([spec], all_specs=[spec])
    assert runtime.observe()["web"].fingerprint == spec.fingerprint
    assert client.exec_plugin.runs == 1

    # The module on the jump host, with the same kind of kubeconfig naming the plugin by its path there.
    jump_config = world.exec_config("cert", log="jump.log", plugin="/srv/transfer/%s/plugin.py" % PLUGIN_DIR)
    (world.plugin_dir / "exec.kubeconfig").write_text(yaml.safe_dump(jump_config))
    (world.plugin_dir / "exec.kubeconfig").chmod(0o600)
    (world.plugin_dir / "uninstall.yml").write_text(yaml.safe_dump([{
        "hosts": "localhost", "gather_facts": False, "tasks": [
            {"name": "uninstall kx from the cluster", "register": "out",
             "offline.delivery.app_uninstall": {
                 "app": "kx", "target": "k8s", "namespace": NS_APP, "state_dir": "/tmp/od-kx-state",
                 "kubeconfig": "{{ lookup('ansible.builtin.file', '/srv/transfer/kx/exec.kubeconfig') | from_yaml }}"}},
            {"ansible.builtin.copy": {"content": "{{ out | to_json }}", "dest": "/srv/transfer/kx/out.json"}}]}]))
    res = world.site.jump(["ansible-playbook", "-i", "localhost,", "-c", "local",
                           "-e", "ansible_python_interpreter=/usr/bin/python3", "/srv/transfer/kx/uninstall.yml"],
                          timeout=600)
    assert res.rc == 0, res.output[-4000:]
    out = json.loads((world.plugin_dir / "out.json").read_text())
    assert out["changed"] is True and out["removed"] == ["Deployment/web", "Service/web"], out
    assert world.admin.get("Deployment", "web", NS_APP) is None
    (run,) = world.runs("jump.log")
    assert run["args"] == ["cert"] and run["info"]["spec"]["cluster"]["server"] == world.server


def test_missing_plugin_is_named_with_its_install_hint(world: World) -> None:
    config = world.exec_config("cert", log="missing.log", plugin="kubectl-od-kx-missing-helper")
    with pytest.raises(K8sError, match=r"exec credential plugin 'kubectl-od-kx-missing-helper' is not installed on "
                                       r"the host that runs the deploy \(not found in PATH\): the site's credential "
                                       r"helper lives in /srv/transfer/kx"):
        K8sClient.from_kubeconfig(config).version()


def test_a_port_less_component_gets_a_headless_service_the_api_server_accepts(world: World) -> None:
    """Issue #20 item 4 on the real API server: a component without ports (an internal service, as compose files
    often write them) is rendered with a headless Service so its name resolves in cluster DNS; the server takes
    the Service and the StatefulSet whose serviceName names it, and keeps clusterIP None."""
    from offline_delivery_core.app.model import load_model
    from offline_delivery_core.targets.k8s import render_manifests

    model = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "shop" / "app-1.0.0.yml").read_text())
    model["components"]["db"]["ports"] = []
    model["components"]["db"]["health"] = {"exec": ["true"]}
    digests = {c: "sha256:" + "0f" * 32 for c in model["components"]}
    objects = render_manifests(load_model(model), namespace=NS_HEADLESS, registry="repo:5000", image_digests=digests,
                               secrets={"db_password": "A" * 32, "redis_password": "B" * 32},
                               include_namespace=True, fingerprint_key=b"k" * 32)
    db = [o for o in objects if o["kind"] == "Namespace" or o["metadata"].get("labels", {}).get(
        "app.kubernetes.io/component") == "db"]
    assert {o["kind"] for o in db} >= {"Namespace", "Service", "StatefulSet"}
    for obj in db:
        if obj["kind"] in ("Namespace", "Service"):
            world.admin.apply(obj)
        else:
            world.admin.apply(obj, dry_run=True)    # validated and admitted, not run (its image is a stand-in)
    service = world.admin.get("Service", "db", NS_HEADLESS)
    assert service["spec"]["clusterIP"] == "None" and not service["spec"].get("ports")
