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
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Tuple

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


def _template_secret_keys(model: dict, component: str, overrides: Mapping[str, object]) -> Set[str]:
    """Env keys whose winning value (same precedence as ``effective_env``) references a secret."""
    comps = model["components"]
    templates: Dict[str, str] = {}
    for dep in sorted(comps[component]["depends_on"]):
        templates.update(comps[dep]["exports"])
    templates.update(comps[component]["env"])
    templates.update({k: str(v) for k, v in overrides.items()})
    return {key for key, text in templates.items() if any(kind == "secrets" for kind, _n in references(text))}


def _holds_secret(value: str, secret_values: Iterable[str]) -> bool:
    """A resolved value holding a secret's value (also catches a site override that pastes one in)."""
    return any(secret and secret in value for secret in secret_values)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _config_key(index: int, path: str) -> str:
    """A ConfigMap/Secret key for a config file: ``f<index>-<basename>``, unique by index."""
    base = re.sub(r"[^-._a-zA-Z0-9]", "_", path.rsplit("/", 1)[-1]) or "file"
    return ("f%d-%s" % (index, base))[:253]


def _cpu_request(cpus: str) -> str:
    millis = max(1, math.ceil(float(cpus) * 1000 * CPU_REQUEST_FRACTION))
    return "%dm" % millis


def _resources(resources: Mapping[str, Any]) -> dict:
    limits: Dict[str, str] = {}
    requests: Dict[str, str] = {}
    if resources.get("cpus") is not None:
        limits["cpu"] = str(resources["cpus"])
        requests["cpu"] = _cpu_request(str(resources["cpus"]))
    if resources.get("memory") is not None:
        limits["memory"] = str(resources["memory"])
        requests["memory"] = str(resources["memory"])
    if not limits:
        return {}
    return {"limits": limits, "requests": requests}


def _probe_action(comp: Mapping[str, Any]) -> dict:
    health = comp["health"]
    port_names = {p["port"]: p["name"] for p in comp["ports"] if p["protocol"] == "tcp"}
    if health.get("http"):
        http = health["http"]
        return {"httpGet": {"path": http.get("path") or "/", "port": port_names[http["port"]], "scheme": "HTTP"}}
    if health.get("tcp"):
        return {"tcpSocket": {"port": port_names[health["tcp"]["port"]]}}
    return {"exec": {"command": [str(a) for a in health["exec"]]}}


def _probes(comp: Mapping[str, Any]) -> dict:
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


def _security_context(name: str, user: Optional[str]) -> dict:
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


@dataclass(frozen=True)
class RenderOptions:
    """Site choices for the k8s target (docs/kubernetes.md)."""

    namespace: str
    registry: str = ""
    storage_class: Optional[str] = None
    volume_sizes: Mapping[str, str] = field(default_factory=dict)   # volume name -> storage request
    publish_type: str = "NodePort"                                  # or LoadBalancer
    node_port_range: Tuple[int, int] = DEFAULT_NODE_PORT_RANGE
    labels: Mapping[str, str] = field(default_factory=dict)         # extra labels on every object

    def check(self) -> None:
        if not DNS1123_LABEL_RE.match(self.namespace) or len(self.namespace) > 63:
            raise K8sRenderError("namespace %r is not a DNS-1123 label (lowercase letters, digits, '-', at most "
                                 "63)" % self.namespace)
        if self.publish_type not in ("NodePort", "LoadBalancer"):
            raise K8sRenderError("publish_type %r: use NodePort or LoadBalancer" % self.publish_type)
        for key, value in self.labels.items():
            if key.startswith("app.kubernetes.io/"):
                raise K8sRenderError("labels: %s is set by the renderer; use another key" % key)
            if not LABEL_VALUE_RE.match(str(value)) or len(str(value)) > 63:
                raise K8sRenderError("labels.%s: %r is not a valid label value" % (key, value))


@dataclass
class ComponentInput:
    """One component with everything resolved: what both the model path and the deploy engine's
    ``ComponentSpec`` path hand to the renderer."""

    name: str
    app: str
    version: str
    image: str                                  # <registry>/<repository>[:tag]@<digest>
    env: Dict[str, str]                         # resolved; may hold secrets
    secret_env: Set[str]                        # keys that go to the component's Secret
    files: List[Dict[str, str]]                 # [{path, mode, content}], resolved
    secret_files: Set[int]                      # indexes of files that go to a Secret
    ports: List[dict]
    volumes: List[dict]
    health: Optional[dict]
    entrypoint: Optional[List[str]] = None
    command: Optional[List[str]] = None
    user: Optional[str] = None
    replicas: int = 1
    resources: Mapping[str, Any] = field(default_factory=dict)
    group: Optional[str] = None
    description: str = ""


def _env_list(inp: ComponentInput, kname: str) -> List[dict]:
    out = []
    for key in sorted(inp.env):
        if key in inp.secret_env:
            out.append({"name": key, "valueFrom": {"secretKeyRef": {"name": kname + "-env", "key": key}}})
        else:
            out.append({"name": key, "value": inp.env[key]})
    return out


def _file_objects(inp: ComponentInput, kname: str, namespace: str, labels: Mapping[str, str]
                  ) -> Tuple[List[dict], List[dict], List[dict]]:
    """ConfigMap/Secret holding the config files, the pod volumes and the read-only subPath mounts."""
    objects: List[dict] = []
    volumes: List[dict] = []
    mounts: List[dict] = []
    plain = [i for i in range(len(inp.files)) if i not in inp.secret_files]
    hidden = [i for i in range(len(inp.files)) if i in inp.secret_files]
    for kind, obj_name, vol_name, group in (("ConfigMap", kname + "-config", "config-files", plain),
                                            ("Secret", kname + "-files", "secret-files", hidden)):
        if not group:
            continue
        if any(v["name"] == vol_name for v in inp.volumes):
            raise K8sRenderError("components.%s.volumes: the name %s is used by the k8s target for the "
                                 "component's config files; rename the volume" % (inp.name, vol_name))
        keys = {i: _config_key(i, inp.files[i]["path"]) for i in group}
        obj: Dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": _meta(obj_name, namespace, labels)}
        if kind == "Secret":
            obj["type"] = "Opaque"
            obj["data"] = {keys[i]: _b64(inp.files[i]["content"]) for i in sorted(group, key=keys.get)}
        else:
            obj["data"] = {keys[i]: inp.files[i]["content"] for i in sorted(group, key=keys.get)}
        objects.append(obj)
        items = [{"key": keys[i], "path": keys[i], "mode": int(inp.files[i]["mode"], 8)} for i in group]
        volumes.append({"name": vol_name, "configMap": {"name": obj_name, "items": items}} if kind == "ConfigMap"
                       else {"name": vol_name, "secret": {"secretName": obj_name, "items": items}})
        mounts.extend({"name": vol_name, "mountPath": inp.files[i]["path"], "subPath": keys[i], "readOnly": True}
                      for i in group)
    return objects, volumes, mounts


def _container(inp: ComponentInput, kname: str, mounts: List[dict]) -> dict:
    container: Dict[str, Any] = {"name": kname, "image": inp.image, "imagePullPolicy": "IfNotPresent"}
    if inp.entrypoint is not None:
        container["command"] = [str(a) for a in inp.entrypoint]
    if inp.command is not None:
        container["args"] = [str(a) for a in inp.command]
    env = _env_list(inp, kname)
    if env:
        container["env"] = env
    if inp.ports:
        container["ports"] = [{"name": p["name"], "containerPort": p["port"], "protocol": p["protocol"].upper()}
                              for p in inp.ports]
    container.update(_probes({"health": inp.health, "ports": inp.ports}))
    resources = _resources(inp.resources)
    if resources:
        container["resources"] = resources
    security = _security_context(inp.name, inp.user)
    if security:
        container["securityContext"] = security
    all_mounts = mounts + [{"name": v["name"], "mountPath": v["path"]} for v in inp.volumes]
    if all_mounts:
        container["volumeMounts"] = sorted(all_mounts, key=lambda m: m["mountPath"])
    return container


def render_component(inp: ComponentInput, opts: RenderOptions) -> List[dict]:
    """The objects of one component, without release metadata or fingerprint (see ``stamp``)."""
    kname = object_name(inp.name)
    labels = pod_labels(inp.app, inp.name)
    ns = opts.namespace
    objects: List[dict] = []
    secret_env = {k: inp.env[k] for k in sorted(inp.secret_env) if k in inp.env}
    if secret_env:
        objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": _meta(kname + "-env", ns, labels),
                        "type": "Opaque", "data": {k: _b64(v) for k, v in secret_env.items()}})
    file_objects, volumes, mounts = _file_objects(inp, kname, ns, labels)
    objects.extend(file_objects)
    if inp.ports:
        objects.append(_service(kname, ns, labels, inp.ports))
    published = [p for p in inp.ports if p.get("publish") is not None]
    if published:
        objects.append(_published_service(kname, ns, labels, published, opts.publish_type, opts.node_port_range))
    pod_spec: Dict[str, Any] = {
        # Service links would inject API_PORT=tcp://... style variables that clash with exports.
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "containers": [_container(inp, kname, mounts)],
    }
    if volumes:
        pod_spec["volumes"] = volumes
    if inp.group:
        pod_spec["nodeSelector"] = {GROUP_LABEL_PREFIX + inp.group: "true"}
    kind = "StatefulSet" if inp.volumes else "Deployment"
    spec: Dict[str, Any] = {"replicas": inp.replicas, "selector": {"matchLabels": selector_labels(inp.app, inp.name)},
                            "template": {"metadata": {"labels": dict(sorted(labels.items()))}, "spec": pod_spec}}
    if kind == "StatefulSet":
        spec["serviceName"] = kname
        spec["volumeClaimTemplates"] = [
            _claim(v["name"], labels, opts.storage_class, opts.volume_sizes.get(v["name"], DEFAULT_VOLUME_SIZE))
            for v in inp.volumes]
    objects.append({"apiVersion": "apps/v1", "kind": kind, "metadata": _meta(kname, ns, labels), "spec": spec})
    return sorted(objects, key=lambda o: (KIND_ORDER.index(o["kind"]), o["metadata"]["name"]))


def _meta(name: str, namespace: str, labels: Mapping[str, str]) -> dict:
    return {"name": name, "namespace": namespace, "labels": dict(sorted(labels.items()))}


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
    """sha256 of the canonical JSON of a component's rendered objects (before release-only metadata).
    Secret values go in hashed, which reveals nothing of a random 8+ character value."""
    text = json.dumps(list(objects), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def stamp(objects: List[dict], inp: ComponentInput, opts: RenderOptions, digest: str) -> None:
    """Add release-only metadata (version label, release and description annotations) and the fingerprint.
    Only the fingerprint goes on the pod template, so a pod rolls exactly when the component's spec changes."""
    for obj in objects:
        meta = obj["metadata"]
        meta["labels"] = dict(sorted(object_labels(inp.app, inp.version, inp.name, opts.labels).items()))
        annotations = {FINGERPRINT_ANNOTATION: digest, RELEASE_ANNOTATION: "%s-%s" % (inp.app, inp.version)}
        if inp.description:
            annotations[DESCRIPTION_ANNOTATION] = inp.description
        meta["annotations"] = dict(sorted(annotations.items()))
        if obj["kind"] in ("Deployment", "StatefulSet"):
            obj["spec"]["template"]["metadata"]["annotations"] = {FINGERPRINT_ANNOTATION: digest}


def model_input(model: dict, name: str, *, secrets: Mapping[str, str], overrides: Mapping[str, object],
                image: str) -> ComponentInput:
    """A component of a normalised model, resolved: ``${host}`` of a dependency = its Service name."""
    comp = model["components"][name]
    hosts = {other: object_name(other) for other in model["components"]}
    try:
        env = effective_env(model, name, secrets=secrets, hosts=hosts, overrides=overrides)
        files = [{"path": f["path"], "mode": f["mode"], "content": render_config(model, name, i, env=env, secrets=secrets)}
                 for i, f in enumerate(comp["config_files"])]
    except ModelError as exc:
        raise K8sRenderError(str(exc)) from exc
    values = list(secrets.values())
    secret_env = _template_secret_keys(model, name, overrides) | {k for k, v in env.items() if _holds_secret(v, values)}
    secret_files = {i for i, f in enumerate(comp["config_files"])
                    if any(kind == "secrets" for kind, _n in references(f["content"]))
                    or _holds_secret(files[i]["content"], values)}
    return ComponentInput(name=name, app=model["name"], version=model["version"], image=image, env=env,
                          secret_env=secret_env, files=files, secret_files=secret_files, ports=comp["ports"],
                          volumes=comp["volumes"], health=comp["health"], entrypoint=comp["entrypoint"],
                          command=comp["command"], user=comp["user"], replicas=comp["replicas"],
                          resources=comp["resources"], group=comp["placement"]["group"],
                          description=comp["description"])


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
    opts = RenderOptions(namespace=namespace, registry=registry, storage_class=storage_class,
                         volume_sizes=dict(volume_sizes or {}), publish_type=publish_type,
                         node_port_range=node_port_range, labels=dict(labels or {}))
    opts.check()
    unknown = sorted(set(overrides) - set(model["components"]))
    if unknown:
        raise K8sRenderError("overrides: no component %s in %s %s" % (", ".join(unknown), model["name"], model["version"]))
    out: List[dict] = []
    if include_namespace:
        out.append({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": namespace, "labels": {"app.kubernetes.io/managed-by": MANAGED_BY}}})
    for level in start_order(model):
        for name in level:
            image = image_for(name, model["components"][name]["image"], registry=registry,
                              digest=image_digests.get(name))
            inp = model_input(model, name, secrets=secrets, overrides=overrides.get(name) or {}, image=image)
            objects = render_component(inp, opts)
            stamp(objects, inp, opts, fingerprint(objects))
            out.extend(objects)
    return json.loads(json.dumps(out))


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


# ---------------------------------------------------------------------------------------------------
# Cross-object checks: what a per-object JSON schema (kubernetes-validate) cannot see
# ---------------------------------------------------------------------------------------------------

LABEL_KEY_RE = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                          r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# A StatefulSet's pods get a controller-revision-hash label "<name>-<10 chars>" that must fit 63.
MAX_STATEFULSET_NAME = 52


def _where(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return "%s %s/%s" % (obj.get("kind"), meta.get("namespace", ""), meta.get("name"))


def _pod_spec(obj: Mapping[str, Any]) -> Optional[dict]:
    if obj.get("kind") in ("Deployment", "StatefulSet"):
        return ((obj.get("spec") or {}).get("template") or {}).get("spec")
    return None


def _template_labels(obj: Mapping[str, Any]) -> Dict[str, str]:
    return (((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}


def _check_names(objects: List[dict], problems: List[str]) -> None:
    seen: Set[Tuple[str, str, str]] = set()
    for obj in objects:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name", ""))
        key = (str(obj.get("kind")), str(meta.get("namespace", "")), name)
        if key in seen:
            problems.append("%s: defined twice" % _where(obj))
        seen.add(key)
        if not DNS1123_SUBDOMAIN_RE.match(name) or len(name) > 253:
            problems.append("%s: name %r is not a DNS-1123 subdomain" % (_where(obj), name))
        if obj.get("kind") == "Service" and (not DNS1035_LABEL_RE.match(name) or len(name) > 63):
            problems.append("%s: a Service name must be a DNS-1035 label (start with a letter, at most 63)"
                            % _where(obj))
        if obj.get("kind") == "StatefulSet" and len(name) > MAX_STATEFULSET_NAME:
            problems.append("%s: a StatefulSet name longer than %d breaks its pods' controller-revision-hash "
                            "label" % (_where(obj), MAX_STATEFULSET_NAME))
        for where, labels in (("labels", meta.get("labels") or {}), ("pod labels", _template_labels(obj))):
            for lkey, value in labels.items():
                if not LABEL_KEY_RE.match(lkey) or len(lkey.rsplit("/", 1)[-1]) > 63:
                    problems.append("%s: %s key %r is not a valid label key" % (_where(obj), where, lkey))
                if not isinstance(value, str) or not LABEL_VALUE_RE.match(value) or len(value) > 63:
                    problems.append("%s: %s %s=%r is not a valid label value" % (_where(obj), where, lkey, value))


def _check_selectors(objects: List[dict], problems: List[str]) -> None:
    for obj in objects:
        if _pod_spec(obj) is None:
            continue
        selector = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        labels = _template_labels(obj)
        if not selector:
            problems.append("%s: empty selector (it would adopt every pod in the namespace)" % _where(obj))
        for key, value in selector.items():
            if labels.get(key) != value:
                problems.append("%s: selector %s=%s does not match the pod template (%s=%s)"
                                % (_where(obj), key, value, key, labels.get(key)))


def _matching_workloads(service: dict, objects: List[dict]) -> List[dict]:
    selector = (service.get("spec") or {}).get("selector") or {}
    namespace = service.get("metadata", {}).get("namespace")
    return [o for o in objects if _pod_spec(o) is not None and o.get("metadata", {}).get("namespace") == namespace
            and selector and all(_template_labels(o).get(k) == v for k, v in selector.items())]


def _check_services(objects: List[dict], problems: List[str]) -> None:
    for svc in (o for o in objects if o.get("kind") == "Service"):
        workloads = _matching_workloads(svc, objects)
        if not workloads:
            problems.append("%s: its selector %s selects no pod of these manifests"
                            % (_where(svc), (svc.get("spec") or {}).get("selector")))
            continue
        container_ports = [p for w in workloads for c in _pod_spec(w)["containers"] for p in c.get("ports") or []]
        for port in (svc.get("spec") or {}).get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            protocol = port.get("protocol", "TCP")
            found = [p for p in container_ports if (p.get("name") == target if isinstance(target, str)
                                                    else p.get("containerPort") == target)]
            if not found:
                problems.append("%s: port %s targets %r, which no selected container declares (container ports: %s)"
                                % (_where(svc), port.get("name"), target,
                                   ", ".join("%s=%s" % (p.get("name"), p.get("containerPort")) for p in container_ports)
                                   or "none"))
            elif all(p.get("protocol", "TCP") != protocol for p in found):
                problems.append("%s: port %s is %s but the container port %r is %s"
                                % (_where(svc), port.get("name"), protocol, target, found[0].get("protocol", "TCP")))
    for sts in (o for o in objects if o.get("kind") == "StatefulSet"):
        name = (sts.get("spec") or {}).get("serviceName")
        if name and not any(o.get("kind") == "Service" and o["metadata"].get("name") == name for o in objects):
            problems.append("%s: serviceName %s names no Service of these manifests" % (_where(sts), name))


def _check_probes(obj: dict, container: dict, problems: List[str]) -> None:
    names = [p.get("name") for p in container.get("ports") or [] if p.get("name")]
    if len(names) != len(set(names)):
        problems.append("%s: container %s declares a port name twice" % (_where(obj), container.get("name")))
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(probe_name) or {}
        for action in ("httpGet", "tcpSocket"):
            port = (probe.get(action) or {}).get("port")
            if isinstance(port, str) and port not in names:
                problems.append("%s: container %s %s.%s.port %r is not one of its port names (%s)"
                                % (_where(obj), container.get("name"), probe_name, action, port,
                                   ", ".join(names) or "none"))


def _data_keys(objects: List[dict], kind: str, namespace: str, name: str) -> Optional[Set[str]]:
    for obj in objects:
        meta = obj.get("metadata") or {}
        if obj.get("kind") == kind and meta.get("name") == name and meta.get("namespace") == namespace:
            return set(obj.get("data") or {}) | set(obj.get("stringData") or {})
    return None


def _check_ref(objects: List[dict], obj: dict, kind: str, name: str, key: Optional[str], what: str,
               problems: List[str]) -> None:
    keys = _data_keys(objects, kind, obj["metadata"].get("namespace", ""), name)
    if keys is None:
        problems.append("%s: %s names %s %s, which is not in these manifests" % (_where(obj), what, kind, name))
    elif key is not None and key not in keys:
        problems.append("%s: %s names key %s of %s %s, which has only: %s"
                        % (_where(obj), what, key, kind, name, ", ".join(sorted(keys)) or "no keys"))


def _check_env(objects: List[dict], obj: dict, container: dict, problems: List[str]) -> None:
    for env in container.get("env") or []:
        source = env.get("valueFrom") or {}
        for ref_key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
            ref = source.get(ref_key)
            if ref and not ref.get("optional"):
                _check_ref(objects, obj, kind, ref.get("name", ""), ref.get("key"), "env %s" % env.get("name"), problems)
    for env_from in container.get("envFrom") or []:
        for ref_key, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
            ref = env_from.get(ref_key)
            if ref and not ref.get("optional"):
                _check_ref(objects, obj, kind, ref.get("name", ""), None, "envFrom", problems)


def _check_volumes(objects: List[dict], obj: dict, pod: dict, problems: List[str]) -> None:
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    if len(volumes) != len(pod.get("volumes") or []):
        problems.append("%s: a pod volume name is used twice" % _where(obj))
    claims = {c.get("metadata", {}).get("name") for c in (obj.get("spec") or {}).get("volumeClaimTemplates") or []}
    for name in set(volumes) & claims:
        problems.append("%s: %s is both a pod volume and a volumeClaimTemplate" % (_where(obj), name))
    for vol in volumes.values():
        for src_key, kind, name_key in (("configMap", "ConfigMap", "name"), ("secret", "Secret", "secretName")):
            src = vol.get(src_key)
            if src is None or src.get("optional"):
                continue
            for item in src.get("items") or [None]:
                _check_ref(objects, obj, kind, src.get(name_key, ""), item and item.get("key"),
                           "volume %s" % vol.get("name"), problems)
    for container in pod.get("containers") or []:
        for mount in container.get("volumeMounts") or []:
            name = mount.get("name")
            if name not in volumes and name not in claims:
                problems.append("%s: container %s mounts %r, which is neither a pod volume nor a "
                                "volumeClaimTemplate (have: %s)" % (_where(obj), container.get("name"), name,
                                                                    ", ".join(sorted(set(volumes) | claims)) or "none"))
                continue
            vol = volumes.get(name) or {}
            src = vol.get("configMap") or vol.get("secret") or {}
            paths = [item.get("path") for item in src.get("items") or []]
            if mount.get("subPath") and paths and mount["subPath"] not in paths:
                problems.append("%s: container %s mounts subPath %r of volume %s, which projects only: %s"
                                % (_where(obj), container.get("name"), mount["subPath"], name, ", ".join(paths)))


def check_manifests(objects: Iterable[dict]) -> List[str]:
    """Problems across objects, one line each (empty = fine): names and labels, workload selectors vs pod
    labels, Services vs the pods and ports they select, probe port names, env Secret/ConfigMap references,
    volume mounts vs volumes. ``kubernetes-validate --strict`` checks each object's schema; this checks the
    rest."""
    objects = list(objects)
    problems: List[str] = []
    _check_names(objects, problems)
    _check_selectors(objects, problems)
    _check_services(objects, problems)
    for obj in objects:
        pod = _pod_spec(obj)
        if pod is None:
            continue
        for container in pod.get("containers") or []:
            _check_probes(obj, container, problems)
            _check_env(objects, obj, container, problems)
        _check_volumes(objects, obj, pod, problems)
    return problems
