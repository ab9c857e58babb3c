"""Cluster add-ons applied after the node is Ready: CoreDNS (cluster DNS for Service names).

CoreDNS runs with hostNetwork: the only resolver that knows the site's host names (`repo`, `node1`) is
Docker's embedded DNS at 127.0.0.11 in the node's own network namespace, which a pod network cannot reach.
The `kube-dns` Service (DNS_IP) forwards pods' queries to it on the node's address.
"""
from __future__ import annotations

import yaml

from .config import CLUSTER_DOMAIN, DNS_IP

COREFILE = f""".:53 {{
    errors
    health :8180
    ready :8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }}
    forward . /etc/resolv.conf
    cache 30
}}
"""


def coredns_manifests(image: str) -> str:
    """The objects of the CoreDNS add-on as one multi-document YAML."""
    labels = {"k8s-app": "kube-dns"}
    ns = "kube-system"
    docs: list[dict] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": ns}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "system:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": ns}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", "namespace": ns},
         "data": {"Corefile": COREFILE}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "coredns", "namespace": ns, "labels": labels},
         "spec": {
             "replicas": 1, "selector": {"matchLabels": labels},
             # hostNetwork port 53: a rolling update cannot run two at once on the one node.
             "strategy": {"type": "Recreate"},
             "template": {"metadata": {"labels": labels}, "spec": {
                 "serviceAccountName": "coredns", "hostNetwork": True, "dnsPolicy": "Default",
                 "priorityClassName": "system-cluster-critical",
                 "containers": [{
                     "name": "coredns", "image": image, "imagePullPolicy": "Never",
                     "command": ["/coredns", "-conf", "/etc/coredns/Corefile"],
                     "ports": [{"containerPort": 53, "protocol": "UDP", "name": "dns"},
                               {"containerPort": 53, "protocol": "TCP", "name": "dns-tcp"}],
                     "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                     "livenessProbe": {"httpGet": {"path": "/health", "port": 8180}, "periodSeconds": 10},
                     "resources": {"requests": {"cpu": "50m", "memory": "40Mi"}, "limits": {"memory": "170Mi"}},
                     "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                 }],
                 "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
             }},
         }},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": ns, "labels": labels},
         "spec": {"clusterIP": DNS_IP, "selector": labels,
                  "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}]}},
    ]
    return yaml.safe_dump_all(docs, sort_keys=False)
