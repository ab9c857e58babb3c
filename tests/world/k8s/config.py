"""Configuration files of the one-node cluster: systemd units, component configs, kubeconfigs, CNI, containerd.

`node_files()` returns {absolute path in the node: (content, mode)}; cluster.py copies them in as one tar.
Every choice that differs from a stock node says why: most are what a kubelet needs when its "machine" is a
container sharing the kernel of this VM (cgroup v1, /proc/sys read-only, no CAP_SYS_RESOURCE).
"""
from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import yaml

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"       # the `kubernetes` Service: first address of SERVICE_CIDR
DNS_IP = "10.96.0.10"
POD_CIDR = "10.244.0.0/24"     # one node: a static bridge + host-local range, no CIDR allocator needed
CLUSTER_DOMAIN = "cluster.local"
API_PORT = 6443
PKI = "/etc/kubernetes/pki"
BIN = "/usr/local/bin"
PAUSE_IMAGE = "od-world.local/pause:1.0"
REGISTRY_PORT = 5000

# Kernel tunables the kubelet insists on (it writes them when they differ and dies when it cannot). They are
# global to the VM, and the node container's /proc/sys is read-only: the node's mount namespace sees these
# values through read-only bind mounts instead (docs/kubernetes-cluster.md, "What differs from a real node").
# Not in a private namespace of the kubelet unit: the kubelet's volume mounts must reach containerd.
KUBELET_TUNABLES = {
    "vm/overcommit_memory": "1", "vm/panic_on_oom": "0", "kernel/panic": "10", "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000", "kernel/keys/root_maxbytes": "25000000",
}
TUNABLES_DIR = "/etc/kubernetes/kernel"


@dataclasses.dataclass(frozen=True)
class Node:
    """What the configs need to know about the node and its site."""

    name: str           # node name = hostname = the kubelet cert's CN suffix
    ip: str             # on the site network; the apiserver's advertised address
    registry: str       # the site registry host name (`repo`), pulled from over plain HTTP
    cgroup_root: str    # a cgroup of our own per site, so two clusters never share /kubepods


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def kubeconfig(pki: Path, user: str, server: str) -> str:
    """A kubeconfig with the CA and the client cert/key of `user` embedded (a self-contained file)."""
    doc = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "od-world", "cluster": {"server": server,
                                                       "certificate-authority-data": _b64(pki / "ca.crt")}}],
        "users": [{"name": user, "user": {"client-certificate-data": _b64(pki / f"{user}.crt"),
                                          "client-key-data": _b64(pki / f"{user}.key")}}],
        "contexts": [{"name": f"{user}@od-world", "context": {"cluster": "od-world", "user": user}}],
        "current-context": f"{user}@od-world",
    }
    return yaml.safe_dump(doc, sort_keys=False)


def _unit(description: str, exec_start: list[str], after: str) -> str:
    cmd = " \\\n    ".join(exec_start)
    return f"""[Unit]
Description={description} (offline-delivery test cluster)
After={after}
Wants={after}

[Service]
ExecStart={cmd}
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


def units(node: Node) -> dict[str, str]:
    apiserver = [
        f"{BIN}/kube-apiserver", f"--advertise-address={node.ip}", "--bind-address=0.0.0.0",
        f"--secure-port={API_PORT}", "--etcd-servers=http://127.0.0.1:2379",
        f"--client-ca-file={PKI}/ca.crt", f"--tls-cert-file={PKI}/apiserver.crt",
        f"--tls-private-key-file={PKI}/apiserver.key",
        f"--kubelet-client-certificate={PKI}/apiserver-kubelet-client.crt",
        f"--kubelet-client-key={PKI}/apiserver-kubelet-client.key",
        "--kubelet-preferred-address-types=InternalIP",
        f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
        f"--service-account-key-file={PKI}/sa.pub", f"--service-account-signing-key-file={PKI}/sa.key",
        f"--service-cluster-ip-range={SERVICE_CIDR}", "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction", "--allow-privileged=true",
    ]
    controller_manager = [
        f"{BIN}/kube-controller-manager", "--kubeconfig=/etc/kubernetes/controller-manager.kubeconfig",
        "--authentication-kubeconfig=/etc/kubernetes/controller-manager.kubeconfig",
        "--authorization-kubeconfig=/etc/kubernetes/controller-manager.kubeconfig",
        f"--service-account-private-key-file={PKI}/sa.key", f"--root-ca-file={PKI}/ca.crt",
        f"--cluster-signing-cert-file={PKI}/ca.crt", f"--cluster-signing-key-file={PKI}/ca.key",
        "--use-service-account-credentials=true", "--leader-elect=false", "--bind-address=127.0.0.1",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
    ]
    scheduler = [
        f"{BIN}/kube-scheduler", "--kubeconfig=/etc/kubernetes/scheduler.kubeconfig",
        "--authentication-kubeconfig=/etc/kubernetes/scheduler.kubeconfig",
        "--authorization-kubeconfig=/etc/kubernetes/scheduler.kubeconfig",
        "--leader-elect=false", "--bind-address=127.0.0.1",
    ]
    etcd = [
        f"{BIN}/etcd", f"--name={node.name}", "--data-dir=/var/lib/etcd",
        "--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
        "--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
        f"--initial-cluster={node.name}=http://127.0.0.1:2380",
    ]
    kubelet = [
        f"{BIN}/kubelet", "--config=/etc/kubernetes/kubelet.yaml", "--kubeconfig=/etc/kubernetes/kubelet.kubeconfig",
        f"--node-ip={node.ip}", f"--hostname-override={node.name}",
    ]
    proxy = [f"{BIN}/kube-proxy", "--config=/etc/kubernetes/kube-proxy.yaml", f"--hostname-override={node.name}"]
    return {
        "od-etcd.service": _unit("etcd", etcd, "network-online.target"),
        "kube-apiserver.service": _unit("Kubernetes API server", apiserver, "od-etcd.service"),
        "kube-controller-manager.service": _unit("Kubernetes controller manager", controller_manager,
                                                 "kube-apiserver.service"),
        "kube-scheduler.service": _unit("Kubernetes scheduler", scheduler, "kube-apiserver.service"),
        "kubelet.service": _unit("Kubernetes node agent", kubelet, "containerd.service"),
        "kube-proxy.service": _unit("Kubernetes service proxy", proxy, "kubelet.service"),
    }


def kubelet_config(node: Node) -> str:
    doc = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": f"{PKI}/ca.crt"}},
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "cgroupDriver": "cgroupfs",   # systemd inside a container does not own the cgroup tree
        "cgroupRoot": node.cgroup_root,
        "failCgroupV1": False,        # this machine mounts cgroup v1 (1.35+ refuses it by default)
        "failSwapOn": False,
        "clusterDNS": [DNS_IP], "clusterDomain": CLUSTER_DOMAIN,
        "tlsCertFile": f"{PKI}/kubelet-serving.crt", "tlsPrivateKeyFile": f"{PKI}/kubelet-serving.key",
        # The disk is shared by every engineer's containers: evict only when it is really full, and never
        # garbage-collect images (the locally imported pause and CoreDNS images cannot be pulled back).
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "2%", "imagefs.available": "2%",
                         "nodefs.inodesFree": "2%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "podPidsLimit": 4096,
        "maxPods": 60,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def kube_proxy_config() -> str:
    doc = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": "/etc/kubernetes/kube-proxy.kubeconfig"},
        "mode": "iptables", "clusterCIDR": POD_CIDR,
        # conntrack limits/timeouts and route_localnet are global or read-only in a container: leave them
        # as the kernel has them (kind does the same for its nodes).
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"localhostNodePorts": False},
    }
    return yaml.safe_dump(doc, sort_keys=False)


def cni_config() -> str:
    return json.dumps({
        "cniVersion": "0.4.0", "name": "od-pods",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }, indent=2) + "\n"


def containerd_config() -> str:
    # Debian's containerd 1.6: CRI v1, plugin config v2. restrict_oom_score_adj: without CAP_SYS_RESOURCE a
    # container cannot get a lower oom_score_adj than containerd's, so clamp instead of failing the pod.
    return f"""version = 2
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "/etc/containerd/certs.d"
"""


def registry_hosts(node: Node) -> dict[str, str]:
    """hosts.toml per registry name: the site registry over plain HTTP, and docker.io mirrored to it (so a
    manifest saying `shop/api:1.0.0` pulls from the site, never from the internet)."""
    site = f"http://{node.registry}:{REGISTRY_PORT}"
    host = f'[host."{site}"]\n  capabilities = ["pull", "resolve"]\n  skip_verify = true\n'
    return {
        f"{node.registry}:{REGISTRY_PORT}": f'server = "{site}"\n\n{host}',
        "docker.io": f'server = "{site}"\n\n{host}',
    }


def node_files(node: Node, pki: Path) -> dict[str, tuple[str | bytes, int]]:
    """Every file the node needs, by absolute path."""
    server = f"https://{node.ip}:{API_PORT}"
    files: dict[str, tuple[str | bytes, int]] = {}
    for name in sorted(p.name for p in pki.iterdir()):
        files[f"{PKI}/{name}"] = ((pki / name).read_bytes(), 0o600 if name.endswith(".key") else 0o644)
    for user, file in (("controller-manager", "controller-manager"), ("scheduler", "scheduler"),
                       ("kubelet", "kubelet"), ("kube-proxy", "kube-proxy"), ("admin", "admin")):
        files[f"/etc/kubernetes/{file}.kubeconfig"] = (kubeconfig(pki, user, server), 0o600)
    for unit, text in units(node).items():
        files[f"/etc/systemd/system/{unit}"] = (text, 0o644)
    files["/etc/kubernetes/kubelet.yaml"] = (kubelet_config(node), 0o644)
    files["/etc/kubernetes/kube-proxy.yaml"] = (kube_proxy_config(), 0o644)
    for key, value in KUBELET_TUNABLES.items():
        files[f"{TUNABLES_DIR}/{key.replace('/', '.')}"] = (value + "\n", 0o444)
    files["/etc/cni/net.d/10-od-pods.conflist"] = (cni_config(), 0o644)
    files["/etc/containerd/config.toml"] = (containerd_config(), 0o644)
    for registry, text in registry_hosts(node).items():
        files[f"/etc/containerd/certs.d/{registry}/hosts.toml"] = (text, 0o644)
    return files
