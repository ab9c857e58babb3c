# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The k8s target: render an application model to Kubernetes objects, check them, and apply them.

Standard library only. ``render_manifests`` is pure (model + site values in, sorted list of dicts out);
``check_manifests`` finds the cross-object mistakes a JSON schema cannot see; ``K8sRuntime`` applies a
release through ``k8s_client.K8sClient`` (server-side apply) and reports per component health.
See docs/kubernetes.md for every mapping decision.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from .app_model import ModelError, effective_env, references, render_config, start_order
from .registry_client import RegistryError, split_reference

MANAGED_BY = "offline-delivery"
FINGERPRINT_ANNOTATION = "offline.delivery/spec-fingerprint"
DESCRIPTION_ANNOTATION = "offline.delivery/description"
RELEASE_ANNOTATION = "offline.delivery/release"
GROUP_LABEL_PREFIX = "offline.delivery/group."
DEFAULT_VOLUME_SIZE = "1Gi"
# The default NodePort range of kube-apiserver (--service-node-port-range).
DEFAULT_NODE_PORT_RANGE = (30000, 32767)
# CPU request = this fraction of the limit: a limit-sized request would make small clusters unschedulable.
CPU_REQUEST_FRACTION = 0.1

# Order of kinds inside one component: what a workload refers to comes first.
KIND_ORDER = ("Namespace", "Secret", "ConfigMap", "Service", "StatefulSet", "Deployment")

DNS1123_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
CONFIG_KEY_RE = re.compile(r"^[-._a-zA-Z0-9]+$")
NUMERIC_USER_RE = re.compile(r"^(\d+)(?::(\d+))?$")


class K8sRenderError(ValueError):
    """The model cannot be rendered for Kubernetes; the message names the component/field and the fix."""


# ---------------------------------------------------------------------------------------------------
# Names and labels
# ---------------------------------------------------------------------------------------------------

def object_name(component: str) -> str:
    """The Kubernetes name of every object of a component (and its Service: what ``${host}`` resolves to).

    Component names are DNS-1123 labels already; a Service name must also start with a letter (DNS-1035),
    so a component starting with a digit gets a ``c-`` prefix.
    """
    return component if DNS1035_LABEL_RE.match(component) else "c-" + component


def label_value(text: str) -> str:
    """``text`` as a valid label value (``1.0.0+build.5`` -> ``1.0.0_build.5``), at most 63 characters."""
    value = re.sub(r"[^-A-Za-z0-9_.]", "_", text)[:63]
    return value.strip("-_.")


def selector_labels(app: str, component: str) -> Dict[str, str]:
    """The immutable selector of a component's pods (never includes the release version)."""
    return {"app.kubernetes.io/instance": app, "app.kubernetes.io/component": component}


def pod_labels(app: str, component: str) -> Dict[str, str]:
    """Labels of a component's pods: no release version, so a release that leaves it alone does not roll it."""
    labels = selector_labels(app, component)
    labels.update({"app.kubernetes.io/name": component, "app.kubernetes.io/part-of": app,
                   "app.kubernetes.io/managed-by": MANAGED_BY})
    return labels


def object_labels(app: str, version: str, component: str, extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    labels = dict(extra or {})
    labels.update(pod_labels(app, component))
    labels["app.kubernetes.io/version"] = label_value(version)
    return labels


def app_selector(app: str) -> str:
    """Label selector of every object the delivery manages for an app (used to find what to prune)."""
    return "app.kubernetes.io/managed-by=%s,app.kubernetes.io/instance=%s" % (MANAGED_BY, app)


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------

def image_for(component: str, reference: str, *, registry: str, digest: Optional[str]) -> str:
    """``<registry>/<repository>[:tag]@<index digest>``: the tag for people, the digest for the runtime."""
    try:
        repository, tag, ref_digest = split_reference(reference)
    except RegistryError as exc:
        raise K8sRenderError("components.%s.image: %s" % (component, exc)) from exc
    if digest and ref_digest and digest != ref_digest:
        raise K8sRenderError("components.%s.image: the reference pins %s but the release's index digest is %s; "
                             "rebuild the bundle or fix the reference" % (component, ref_digest, digest))
    pinned = digest or ref_digest
    if not pinned:
        raise K8sRenderError("components.%s.image: no index digest for %s; "
                             "digests of the release from the site repo" % (component, reference, "?"))
    return "%s/%s%s@%s" % (registry.rstrip("/"), repository, ":" + tag if tag else "", pinned)


def _secret_env_keys(model: dict, component: str, overrides: Mapping[str, object]) -> set:
    """Env keys whose winning value (same precedence as ``effective_env``) references a secret."""
    comps = model["components"]
    templates: Dict[str, str] = {}
    for dep in sorted(comps[component]["depends_on"]):
        templates.update(comps[dep]["exports"])
    templates.update(comps[component]["env"])
    templates.update({k: str(v) for k, v in overrides.items()})
    return {key for key, text in templates.items() if any(kind == "secrets" for kind, _n in references(text))}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _config_key(index: int, path: str) -> str:
    """A ConfigMap/Secret key for a config file: ``f<index>-<basename>``, unique by index."""
    base = re.sub(r"[^-._a-zA-Z0-9]", "_", path.rsplit("/", 1)[-1]) or "file"
    return ("f%d-%s" % (index, base))[:253]


def _cpu_request(cpus: str) -> str:
    millis = max(1, math.ceil(float(cpus) * 1000 * CPU_REQUEST_FRACTION))
    return "%dm" % millis


def _resources(comp: dict) -> dict:
    limits: Dict[str, str] = {}
    requests: Dict[str, str] = {}
    if comp["resources"]["cpus"] is not None:
        limits["cpu"] = comp["resources"]["cpus"]
        requests["cpu"] = _cpu_request(comp["resources"]["cpus"])
    if comp["resources"]["memory"] is not None:
        limits["memory"] = comp["resources"]["memory"]
        requests["memory"] = comp["resources"]["memory"]
    out: Dict[str, dict] = {}
    if limits:
        out["limits"] = limits
        out["requests"] = requests
    return out


def _probe_action(comp: dict) -> dict:
    health = comp["health"]
    port_names = {p["port"]: p["name"] for p in comp["ports"] if p["protocol"] == "tcp"}
    if health.get("http"):
        http = health["http"]
        return {"httpGet": {"path": http.get("path") or "/", "port": port_names[http["port"]], "scheme": "HTTP"}}
    if health.get("tcp"):
        return {"tcpSocket": {"port": port_names[health["tcp"]["port"]]}}
    return {"exec": {"command": list(health["exec"])}}


def _probes(comp: dict) -> dict:
    """startup/readiness/liveness from the model's health; start_period is covered by the startup probe."""
    health = comp["health"]
    if not health:
        return {}
    action = _probe_action(comp)
    timing = {"periodSeconds": health["interval"], "timeoutSeconds": health["timeout"],
              "failureThreshold": health["retries"], "successThreshold": 1}
    # Docker ignores failures during start_period; kubelet's equivalent is a startup probe that allows
    # start_period worth of extra failures before liveness/readiness take over.
    startup = dict(action, **timing)
    startup["failureThreshold"] = health["retries"] + math.ceil(health["start_period"] / max(1, health["interval"]))
    probes = {"startupProbe": startup, "readinessProbe": dict(action, **timing), "livenessProbe": dict(action, **timing)}
    return json.loads(json.dumps(probes))  # no shared sub-objects between the three probes


def _security_context(name: str, comp: dict) -> dict:
    user = comp["user"]
    if user is None:
        return {}
    match = NUMERIC_USER_RE.match(user)
    if not match:
        raise K8sRenderError("components.%s.user: %r is a name; Kubernetes needs numeric ids (runAsUser/"
                             "runAsGroup): write it as uid or uid:gid" % (name, user))
    ctx = {"runAsUser": int(match.group(1))}
    if match.group(2) is not None:
        ctx["runAsGroup"] = int(match.group(2))
    return ctx


class _Component:
    """Everything rendered for one component (kept together so its fingerprint covers all of it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.objects: List[dict] = []


def _meta(name: str, namespace: str, labels: Mapping[str, str]) -> dict:
    return {"name": name, "namespace": namespace, "labels": dict(sorted(labels.items()))}


def _render_component(model: dict, name: str, *, namespace: str, secrets: Mapping[str, str],
                      overrides: Mapping[str, object], hosts: Mapping[str, str], image: str,
                      storage_class: Optional[str], volume_sizes: Mapping[str, str],
                      publish_type: str, node_port_range: Tuple[int, int]) -> List[dict]:
    comp = model["components"][name]
    app = model["name"]
    kname = object_name(name)
    labels = pod_labels(app, name)
    try:
        env = effective_env(model, name, secrets=secrets, hosts=hosts, overrides=overrides)
        files = [render_config(model, name, i, env=env, secrets=secrets) for i in range(len(comp["config_files"]))]
    except ModelError as exc:
        raise K8sRenderError(str(exc)) from exc
    secret_keys = _secret_env_keys(model, name, overrides)
    objects: List[dict] = []

    env_secret = {k: env[k] for k in sorted(secret_keys) if k in env}
    if env_secret:
        objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": _meta(kname + "-env", namespace, labels),
                        "type": "Opaque", "data": {k: _b64(v) for k, v in env_secret.items()}})
    container_env = []
    for key in sorted(env):
        if key in env_secret:
            container_env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": kname + "-env", "key": key}}})
        else:
            container_env.append({"name": key, "value": env[key]})

    volumes: List[dict] = []
    mounts: List[dict] = []
    plain = [(i, f) for i, f in enumerate(comp["config_files"])
             if not any(kind == "secrets" for kind, _n in references(f["content"]))]
    secret_files = [(i, f) for i, f in enumerate(comp["config_files"]) if (i, f) not in plain]
    for kind, suffix, vol_name, group in (("ConfigMap", "-config", "config-files", plain),
                                          ("Secret", "-files", "secret-files", secret_files)):
        if not group:
            continue
        if any(v["name"] == vol_name for v in comp["volumes"]):
            raise K8sRenderError("components.%s.volumes: the name %s is used by the k8s target for the "
                                 "component's config files; rename the volume" % (name, vol_name))
        obj_name = kname + suffix
        data = {_config_key(i, f["path"]): files[i] for i, f in group}
        obj: Dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": _meta(obj_name, namespace, labels)}
        if kind == "Secret":
            obj["type"] = "Opaque"
            obj["data"] = {k: _b64(v) for k, v in sorted(data.items())}
        else:
            obj["data"] = dict(sorted(data.items()))
        objects.append(obj)
        items = [{"key": _config_key(i, f["path"]), "path": _config_key(i, f["path"]), "mode": int(f["mode"], 8)}
                 for i, f in group]
        source = ({"configMap": {"name": obj_name, "items": items}} if kind == "ConfigMap"
                  else {"secret": {"secretName": obj_name, "items": items}})
        volumes.append(dict({"name": vol_name}, **source))
        for i, f in group:
            mounts.append({"name": vol_name, "mountPath": f["path"], "subPath": _config_key(i, f["path"]),
                           "readOnly": True})
    for vol in comp["volumes"]:
        mounts.append({"name": vol["name"], "mountPath": vol["path"]})

    if comp["ports"]:
        objects.append(_service(kname, namespace, labels, comp["ports"]))
    published = [p for p in comp["ports"] if p["publish"] is not None]
    if published:
        objects.append(_published_service(kname, namespace, labels, published, publish_type, node_port_range))

    container: Dict[str, Any] = {"name": kname, "image": image, "imagePullPolicy": "IfNotPresent"}
    if comp["entrypoint"] is not None:
        container["command"] = list(comp["entrypoint"])
    if comp["command"] is not None:
        container["args"] = list(comp["command"])
    if container_env:
        container["env"] = container_env
    if comp["ports"]:
        container["ports"] = [{"name": p["name"], "containerPort": p["port"], "protocol": p["protocol"].upper()}
                              for p in comp["ports"]]
    container.update(_probes(comp))
    resources = _resources(comp)
    if resources:
        container["resources"] = resources
    security = _security_context(name, comp)
    if security:
        container["securityContext"] = security
    if mounts:
        container["volumeMounts"] = sorted(mounts, key=lambda m: m["mountPath"])

    pod_spec: Dict[str, Any] = {
        # Service links would inject API_PORT=tcp://... style variables that clash with exports.
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "containers": [container],
    }
    if volumes:
        pod_spec["volumes"] = volumes
    if comp["placement"]["group"]:
        pod_spec["nodeSelector"] = {GROUP_LABEL_PREFIX + comp["placement"]["group"]: "true"}
    template = {"metadata": {"labels": dict(sorted(labels.items()))}, "spec": pod_spec}
    kind = "StatefulSet" if comp["volumes"] else "Deployment"
    workload: Dict[str, Any] = {"apiVersion": "apps/v1", "kind": kind, "metadata": _meta(kname, namespace, labels),
                                "spec": {"replicas": comp["replicas"],
                                         "selector": {"matchLabels": selector_labels(app, name)},
                                         "template": template}}
    if kind == "StatefulSet":
        workload["spec"]["serviceName"] = kname
        workload["spec"]["volumeClaimTemplates"] = [
            _claim(vol["name"], labels, storage_class, volume_sizes.get(vol["name"], DEFAULT_VOLUME_SIZE))
            for vol in comp["volumes"]]
    objects.append(workload)
    return objects


def _service(kname: str, namespace: str, labels: Mapping[str, str], ports: List[dict]) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(kname, namespace, labels),
            "spec": {"type": "ClusterIP",
                     "selector": selector_labels(labels["app.kubernetes.io/part-of"],
                                                 labels["app.kubernetes.io/component"]),
                     "ports": [{"name": p["name"], "port": p["port"], "targetPort": p["name"],
                                "protocol": p["protocol"].upper()} for p in ports]}}


def _published_service(kname: str, namespace: str, labels: Mapping[str, str], ports: List[dict],
                       publish_type: str, node_port_range: Tuple[int, int]) -> dict:
    """``publish: N``: a NodePort Service (nodePort N when the cluster's range allows it) or a LoadBalancer."""
    svc = _service(kname + "-published", namespace, labels, ports)
    svc["spec"]["type"] = publish_type
    for port, spec in zip(ports, svc["spec"]["ports"]):
        spec["port"] = port["publish"]
        if publish_type == "NodePort" and node_port_range[0] <= port["publish"] <= node_port_range[1]:
            spec["nodePort"] = port["publish"]
    return svc


def _claim(name: str, labels: Mapping[str, str], storage_class: Optional[str], size: str) -> dict:
    spec: Dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "labels": dict(sorted(labels.items()))}, "spec": spec}


def fingerprint(objects: Iterable[dict]) -> str:
    """sha256 of the canonical JSON of a component's rendered objects (before release-only metadata)."""
    text = json.dumps(list(objects), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _stamp(objects: List[dict], *, app: str, version: str, component: str, description: str,
           extra_labels: Mapping[str, str], digest: str) -> None:
    """Add release-only metadata (version label, description) and the fingerprint; none of it rolls pods
    except the fingerprint on the pod template, which changes exactly when the component's spec does."""
    for obj in objects:
        meta = obj["metadata"]
        meta["labels"] = dict(sorted(object_labels(app, version, component, extra_labels).items()))
        annotations = {FINGERPRINT_ANNOTATION: digest, RELEASE_ANNOTATION: "%s-%s" % (app, version)}
        if description:
            annotations[DESCRIPTION_ANNOTATION] = description
        meta["annotations"] = dict(sorted(annotations.items()))
        if obj["kind"] in ("Deployment", "StatefulSet"):
            obj["spec"]["template"]["metadata"]["annotations"] = {FINGERPRINT_ANNOTATION: digest}


def _check_options(model: dict, namespace: str, publish_type: str, extra_labels: Mapping[str, str]) -> None:
    if not DNS1123_LABEL_RE.match(namespace) or len(namespace) > 63:
        raise K8sRenderError("namespace %r is not a DNS-1123 label (lowercase letters, digits, '-', at most 63)"
                             % namespace)
    if publish_type not in ("NodePort", "LoadBalancer"):
        raise K8sRenderError("publish_type %r: use NodePort or LoadBalancer" % publish_type)
    for key, value in extra_labels.items():
        if key.startswith("app.kubernetes.io/"):
            raise K8sRenderError("labels: %s is set by the renderer; use another key" % key)
        if not LABEL_VALUE_RE.match(str(value)) or len(str(value)) > 63:
            raise K8sRenderError("labels.%s: %r is not a valid label value" % (key, value))


def render_manifests(model: dict, *, namespace: str, secrets: Mapping[str, str],
                     overrides: Optional[Mapping[str, Mapping[str, object]]] = None, registry: str,
                     image_digests: Mapping[str, str], storage_class: Optional[str] = None,
                     labels: Optional[Mapping[str, str]] = None, volume_sizes: Optional[Mapping[str, str]] = None,
                     publish_type: str = "NodePort",
                     node_port_range: Tuple[int, int] = DEFAULT_NODE_PORT_RANGE,
                     include_namespace: bool = False) -> List[dict]:
    """Every Kubernetes object of a release, sorted: components in start order, kinds as ``KIND_ORDER``.

    ``secrets``: the site's generated values; ``overrides``: component -> {ENV: value}; ``image_digests``:
    component -> index digest of its image in the site registry ``registry`` (``host:port``).
    ``volume_sizes``: volume name -> storage request (default 1Gi; the model has no sizes).
    """
    overrides = overrides or {}
    extra = dict(labels or {})
    _check_options(model, namespace, publish_type, extra)
    unknown = sorted(set(overrides) - set(model["components"]))
    if unknown:
        raise K8sRenderError("overrides: no component %s in %s %s" % (", ".join(unknown), model["name"], model["version"]))
    hosts = {name: object_name(name) for name in model["components"]}
    out: List[dict] = []
    if include_namespace:
        out.append({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": namespace, "labels": {"app.kubernetes.io/managed-by": MANAGED_BY}}})
    for level in start_order(model):
        for name in level:
            comp = model["components"][name]
            image = image_for(name, comp["image"], registry=registry, digest=image_digests.get(name))
            objects = _render_component(model, name, namespace=namespace, secrets=secrets,
                                        overrides=overrides.get(name, {}), hosts=hosts, image=image,
                                        storage_class=storage_class, volume_sizes=volume_sizes or {},
                                        publish_type=publish_type, node_port_range=node_port_range)
            _stamp(objects, app=model["name"], version=model["version"], component=name,
                   description=comp["description"], extra_labels=extra, digest=fingerprint(objects))
            out.extend(sorted(objects, key=lambda o: (KIND_ORDER.index(o["kind"]), o["metadata"]["name"])))
    return out


def component_of(obj: Mapping[str, Any]) -> Optional[str]:
    return (obj.get("metadata", {}).get("labels") or {}).get("app.kubernetes.io/component")


def workload_of(objects: Iterable[dict], component: str) -> Optional[dict]:
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet") and component_of(obj) == component:
            return obj
    return None


def redact(objects: Iterable[dict]) -> List[dict]:
    """A copy safe to log or return from a module: Secret values replaced by the length of the value."""
    out = []
    for obj in objects:
        if obj.get("kind") == "Secret":
            obj = json.loads(json.dumps(obj))
            obj["data"] = {k: "<redacted: %d bytes>" % len(base64.b64decode(v)) for k, v in obj.get("data", {}).items()}
        out.append(obj)
    return out
