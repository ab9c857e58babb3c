"""A one-node Kubernetes cluster in a site of the test world.

`Cluster(site).up()` adds a node container `od-<site>-k8s` (host name `k8s`) to an existing site: the amd64
world host image (systemd as PID 1, same run flags as every host) plus containerd, runc, the CNI plugins
(Debian), etcd and the Kubernetes binaries built from Go modules. It sits on the site's --internal network,
so it has no route out; containerd pulls from the site registry `repo:5000` over plain HTTP. Certificates
are made on the spot; the admin kubeconfig is written to the site's drop box (/srv/transfer/kubeconfig in
the jump host, `.world/<site>/transfer/kubeconfig` here) with the node's address, which both the jump host
and this machine reach. The node carries the site's label, so `python -m tests.world down SITE` removes it
too; `Cluster(site).down()` removes only the cluster.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from ..hostimages import _lock_path, ensure_host_image, image_exists
from ..rootfs import RootfsRecipe
from ..site import SYSTEMD_RUN_FLAGS, Site
from ..util import IMAGE_REPO, LABEL, Result, WorldError, docker, file_lock, log, run
from .addons import coredns_manifests
from .build import KUBE_COMMANDS, coredns_build, ensure_etcd, ensure_go_build, kubernetes_build
from .config import API_PORT, SERVICE_IP, TUNABLES_DIR, Node, kubeconfig, node_files
from .images import coredns_image, ensure_image_archives
from .pki import make_pki

NODE_HOST = "k8s"
ROLE = "k8s-node"
APT_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "conntrack", "ethtool", "socat")
IMAGES_DIR = "/opt/od-k8s/images"
UNITS = ("od-etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy")
READY_TIMEOUT = 240.0      # apiserver up, node Ready (a busy 2-core machine: usually 30-60 s)
DNS_TIMEOUT = 180.0
BOOT_TIMEOUT = 90.0
KUBECONFIG_NAME = "kubeconfig"


@dataclasses.dataclass(frozen=True)
class Artifacts:
    """Everything built on this machine that goes into the node image."""

    kube_dir: Path
    coredns_dir: Path
    etcd: Path
    archives: dict[str, Path]

    def key(self) -> str:
        return "|".join([self.kube_dir.name, self.coredns_dir.name, self.etcd.parent.name])


def ensure_artifacts() -> Artifacts:
    kube = ensure_go_build(kubernetes_build())
    dns = ensure_go_build(coredns_build())
    return Artifacts(kube, dns, ensure_etcd(), ensure_image_archives())


def _node_dockerfile(base: str) -> str:
    return f"""\
FROM {base}
RUN set -eux; export DEBIAN_FRONTEND=noninteractive; \\
    apt-get update -q; apt-get install -y -q --no-install-recommends {' '.join(APT_PACKAGES)}; \\
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb; \\
    mkdir -p /var/lib/apt/lists/partial
COPY bin/ /usr/local/bin/
COPY images/ {IMAGES_DIR}/
LABEL offline-delivery.world.role={ROLE}
"""


def ensure_node_image(art: Artifacts, suite: str) -> str:
    """Build (or reuse) the node image; its tag hashes the Dockerfile and the artefacts' cache keys."""
    base = ensure_host_image(RootfsRecipe(arch="amd64", suite=suite)).tag
    dockerfile = _node_dockerfile(base)
    key = hashlib.sha256((dockerfile + art.key()).encode()).hexdigest()[:16]
    tag = f"{IMAGE_REPO}/k8s-node:{suite}-amd64-{key}"
    with file_lock(_lock_path(tag)):
        if image_exists(tag):
            return tag
        log(f"building node image {tag} (apt: {', '.join(APT_PACKAGES)})")
        with tempfile.TemporaryDirectory(prefix="od-world-k8s-") as ctx:
            root = Path(ctx)
            (root / "Dockerfile").write_text(dockerfile)
            (root / "bin").mkdir()
            (root / "images").mkdir()
            for name in KUBE_COMMANDS:
                _link_or_copy(art.kube_dir / name, root / "bin" / name)
            _link_or_copy(art.etcd, root / "bin" / "etcd")
            for archive in art.archives.values():
                _link_or_copy(archive, root / "images" / archive.name)
            result = run(["docker", "build", "--network", "bridge", "-t", tag, str(root)],
                         timeout=1200, env={"DOCKER_BUILDKIT": "0"})
        result.check(f"building the k8s node image {tag} (needs apt reachable from a build container)")
    return tag


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


class Cluster:
    """The cluster of one site, by site name."""

    def __init__(self, site: str):
        self.site = Site.load(site)

    # ---- names and paths -------------------------------------------------------------------------
    @property
    def container(self) -> str:
        return self.site.container(NODE_HOST)

    @property
    def state_dir(self) -> Path:
        return self.site.state_dir / "k8s"

    @property
    def kubeconfig_path(self) -> Path:
        """The admin kubeconfig on this machine (same content as the jump host's /srv/transfer/kubeconfig)."""
        return self.state_dir / KUBECONFIG_NAME

    @property
    def jump_kubeconfig(self) -> str:
        return f"/srv/transfer/{KUBECONFIG_NAME}"

    # ---- lifecycle --------------------------------------------------------------------------------
    def up(self, keep_on_failure: bool = False) -> dict:
        """Bring the cluster up (idempotent: a healthy cluster is left as it is). On failure the units'
        journals are logged and the node is removed, unless `keep_on_failure` (to look inside)."""
        started = time.monotonic()
        art = ensure_artifacts()
        if self._running() and self._healthy():
            log(f"cluster of site {self.site.name} already up")
            info = self._publish()
            self._apply(coredns_manifests(coredns_image()))  # server-side apply: no change when present
            self._wait_dns()
            return info
        self._remove_node()
        image = ensure_node_image(art, self.site.suite)
        try:
            self._run_node(image)
            self._wait_booted()
            node = self._node()
            make_pki(self.state_dir / "pki", node.name, node.ip, SERVICE_IP)
            self._copy_in(node_files(node, self.state_dir / "pki"))
            self._setup(node)
            info = self._publish()
            self._wait_ready()
            self._apply(coredns_manifests(coredns_image()))
            self._wait_dns()
        except BaseException:
            self._diagnose()
            if not keep_on_failure:
                self._remove_node()
            raise
        log(f"cluster of site {self.site.name} up in {time.monotonic() - started:.0f}s; kubeconfig "
            f"{self.kubeconfig_path} (jump host: {self.jump_kubeconfig})")
        return info

    def down(self) -> list[str]:
        """Remove the node container (its volumes with it) and the cluster's state and kubeconfigs."""
        removed = self._remove_node()
        path = self.site.transfer_dir / KUBECONFIG_NAME
        if path.exists():
            path.unlink()
            removed.append(str(path))
            # The copy made for tools reading ~/.kube/config (a missing jump host has nothing to clean).
            self.site.jump("rm -f /root/.kube/config", timeout=30)
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
            removed.append(str(self.state_dir))
        return removed

    def kubectl(self, *args: str, timeout: float = 60, input_text: str | None = None) -> Result:
        """kubectl (the one built with the cluster) on this machine, as the cluster admin."""
        binary = kubernetes_build().out_dir() / "kubectl"
        return run([str(binary), f"--kubeconfig={self.kubeconfig_path}", f"--request-timeout={int(timeout)}s",
                    *args], timeout=timeout + 10, input_text=input_text)

    def info(self) -> dict:
        path = self.state_dir / "cluster.json"
        if not path.exists():
            raise WorldError(f"{path} missing: no cluster in site {self.site.name} "
                             f"(`python -m tests.world.k8s up {self.site.name}`)")
        return json.loads(path.read_text())

    # ---- steps --------------------------------------------------------------------------------------
    def _running(self) -> bool:
        out = docker("inspect", "--format", "{{.State.Running}}", self.container, timeout=30)
        return out.rc == 0 and out.stdout.strip() == "true"

    def _healthy(self) -> bool:
        if not self.kubeconfig_path.exists():
            return False
        ready = self.kubectl("get", "node", NODE_HOST, "-o",
                             "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}", timeout=20)
        return ready.rc == 0 and ready.stdout.strip() == "True"

    def _remove_node(self) -> list[str]:
        found = docker("inspect", "--format", "{{.Id}}", self.container, timeout=30)
        if found.rc != 0:
            return []
        docker("rm", "-f", "-v", self.container, timeout=180).check(f"removing the k8s node {self.container}")
        _remove_cgroups(found.stdout.strip())
        return [f"container {self.container}"]

    def _run_node(self, image: str) -> None:
        log(f"starting k8s node {self.container} on {self.site.network}")
        args = [
            "run", "-d", "--name", self.container, "--hostname", NODE_HOST,
            "--network", self.site.network, "--network-alias", NODE_HOST,
            "--label", f"{LABEL}={self.site.name}", "--label", f"{LABEL}.host={NODE_HOST}",
            "--label", f"{LABEL}.arch=amd64", "--label", f"{LABEL}.role={ROLE}",
            *SYSTEMD_RUN_FLAGS,
            # The kubelet's OOM watcher reads the kernel log; containerd's snapshots and etcd want a real
            # filesystem (overlayfs cannot sit on the container's own overlay root).
            "--device", "/dev/kmsg",
            "-v", "/var/lib/containerd", "-v", "/var/lib/kubelet", "-v", "/var/lib/etcd",
            image,
        ]
        docker(*args, timeout=120).check(f"starting the k8s node of site {self.site.name}")

    def exec(self, command: str, timeout: float = 120) -> Result:
        return run(["docker", "exec", self.container, "timeout", "-k", "5", str(int(timeout)), "bash", "-c",
                    command], timeout=timeout + 20)

    def _wait_booted(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            state = self.exec("systemctl is-system-running || true", timeout=30).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.5)
        raise WorldError(f"k8s node {self.container}: systemd not booted after {BOOT_TIMEOUT:.0f}s (state {state!r})")

    def _node(self) -> Node:
        fmt = "{{(index .NetworkSettings.Networks \"%s\").IPAddress}} {{.Id}}" % self.site.network
        out = docker("inspect", "--format", fmt, self.container, timeout=30).check(f"inspecting {self.container}")
        ip, cid = out.stdout.split()
        repo = next((h["name"] for h in self.site.info()["hosts"] if "offline_repo" in h["groups"]), "repo")
        # Under the node container's own cgroup: Docker removes it (with everything below) with the node.
        return Node(name=NODE_HOST, ip=ip, registry=repo, cgroup_root=f"/docker/{cid}/od-k8s")

    def _copy_in(self, files: dict[str, tuple[str | bytes, int]]) -> None:
        """All config files into the node as one tar through `docker cp -` (modes preserved)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            dirs: set[str] = set()
            for path, (content, mode) in sorted(files.items()):
                parts = path.strip("/").split("/")
                for i in range(1, len(parts)):
                    d = "/".join(parts[:i])
                    if d not in dirs:
                        info = tarfile.TarInfo(d)
                        info.type, info.mode = tarfile.DIRTYPE, 0o755
                        tar.addfile(info)
                        dirs.add(d)
                data = content.encode() if isinstance(content, str) else content
                info = tarfile.TarInfo(path.strip("/"))
                info.size, info.mode, info.mtime = len(data), mode, int(time.time())
                tar.addfile(info, io.BytesIO(data))
        proc = run_bytes(["docker", "cp", "-", f"{self.container}:/"], buf.getvalue(), timeout=120)
        if proc.rc != 0:
            raise WorldError(f"copying the cluster config into {self.container} failed: {proc.output[-2000:]}")

    def _setup(self, node: Node) -> None:
        """cgroup root, shared mounts, containerd with our config and images, then the cluster's units."""
        script = f"""set -euo pipefail
cg={node.cgroup_root}
for d in /sys/fs/cgroup/*; do
  mountpoint -q "$d" || continue    # only real hierarchies (not links or empty dirs such as cpu,cpuacct)
  mkdir -p "$d$cg"                  # also where Docker left the node in the root cgroup (hugetlb, ...)
done
for d in memory cpu cpuacct cpuset pids; do
  [ -d /sys/fs/cgroup/$d$cg ] || {{ echo "cgroup /sys/fs/cgroup/$d$(dirname $cg) of the node missing: Docker must use the cgroupfs driver on cgroup v1" >&2; exit 3; }}
done
# A new cgroup v1 cpuset has no CPUs or memory nodes: nothing could join it.
for f in cpuset.cpus cpuset.mems; do
  c=/sys/fs/cgroup/cpuset$cg
  [ -n "$(cat $c/$f)" ] || cat "$(dirname $c)/$f" > "$c/$f"
done
mount --make-rshared /
for f in {TUNABLES_DIR}/*; do                  # what the kubelet expects to read (config.KUBELET_TUNABLES)
  target=/proc/sys/$(basename "$f" | tr . /)
  mountpoint -q "$target" || mount --bind -o ro "$f" "$target"
done
systemctl daemon-reload
systemctl restart containerd
for i in $(seq 1 60); do ctr version >/dev/null 2>&1 && break; sleep 0.5; done
for t in {IMAGES_DIR}/*.tar; do ctr -n k8s.io images import "$t" >/dev/null; done
mkdir -p /root/.kube && cp /etc/kubernetes/admin.kubeconfig /root/.kube/config
systemctl enable --now {' '.join(UNITS)}
"""
        self.exec(script, timeout=240).check(f"setting up the cluster in {self.container}")

    def _publish(self) -> dict:
        """The admin kubeconfig for this machine and the jump host, and cluster.json."""
        node = self._node()
        server = f"https://{node.ip}:{API_PORT}"
        text = kubeconfig(self.state_dir / "pki", "admin", server)
        for path in (self.kubeconfig_path, self.site.transfer_dir / KUBECONFIG_NAME):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.chmod(0o600)
            os.replace(tmp, path)
        # Also the default location, for tools in the jump host that read ~/.kube/config.
        self.site.jump("mkdir -p /root/.kube && cp /srv/transfer/kubeconfig /root/.kube/config", timeout=30).check(
            f"copying the kubeconfig to /root/.kube/config in the jump host of site {self.site.name}")
        info = {"site": self.site.name, "node": node.name, "container": self.container, "server": server,
                "kubeconfig": str(self.kubeconfig_path), "jump_kubeconfig": self.jump_kubeconfig,
                "version": kubernetes_build().version, "registry": f"{node.registry}:5000"}
        (self.state_dir / "cluster.json").write_text(json.dumps(info, indent=2) + "\n")
        return info

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            if not self._running():
                raise WorldError(f"k8s node {self.container} stopped")
            ready = self.kubectl("get", "node", NODE_HOST, "-o",
                                 "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}", timeout=15)
            last = ready.output.strip()
            if ready.rc == 0 and last == "True":
                return
            time.sleep(2)
        raise WorldError(f"node {NODE_HOST} of site {self.site.name} not Ready after {READY_TIMEOUT:.0f}s "
                         f"(last answer: {last[-500:]!r})")

    def _apply(self, manifests: str) -> None:
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input_text=manifests,
                     timeout=60).check("applying the CoreDNS add-on")

    def _wait_dns(self) -> None:
        self.kubectl("-n", "kube-system", "rollout", "status", "deployment/coredns",
                     f"--timeout={int(DNS_TIMEOUT)}s", timeout=DNS_TIMEOUT + 10).check(
            "waiting for CoreDNS (kube-system/coredns) to be available")

    def _diagnose(self) -> None:
        """Log the last lines of each unit's journal: the failure message alone rarely says why."""
        if not self._running():
            return
        for unit in ("containerd", *UNITS):
            res = self.exec(f"journalctl -u {unit} --no-pager -n 15 -o cat 2>&1 | cut -c1-400", timeout=30)
            log(f"--- journal of {unit} in {self.container}:\n{res.stdout.strip()}")


def _remove_cgroups(container_id: str) -> None:
    """Docker removes the node's cgroups where it made them; the pods' cgroups in the hierarchies where it
    did not (hugetlb, perf_event, ...) are empty once the node is gone: remove them, deepest first."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / "docker" / container_id
        if hierarchy.is_symlink() or not top.is_dir():
            continue
        for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            _rmdir_quietly(path)
        _rmdir_quietly(top)


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # busy or already gone: an empty cgroup left behind costs nothing


def run_bytes(args: list[str], data: bytes, timeout: float) -> Result:
    """Like util.run, with binary stdin (a tar stream)."""
    try:
        proc = subprocess.run(args, input=data, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return Result(tuple(args), 124, "", f"timed out after {timeout:.0f}s")
    return Result(tuple(args), proc.returncode, proc.stdout.decode(errors="replace"),
                  proc.stderr.decode(errors="replace"))
