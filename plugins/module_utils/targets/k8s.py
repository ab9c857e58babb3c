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
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, TypeVar

T = TypeVar("T")

from ..app.model import ModelError, capabilities_of, effective_env, references, render_config, start_order
from ..app.runtime import JOB_FAILED, JOB_RUNNING, JOB_SUCCEEDED, ComponentSpec, DeployError, Observed, Runtime
from ..app.runtime import fingerprint as keyed_fingerprint
from ..clients.kubernetes import K8sClient, K8sError, wait_for
from ..common.digests import sha256_digest
from ..common.files import ensure_private_dir, write_if_changed
from ..common.oci import OciError, split_reference

MANAGED_BY = "offline-delivery"
FINGERPRINT_ANNOTATION = "offline.delivery/spec-fingerprint"
DESCRIPTION_ANNOTATION = "offline.delivery/description"
RELEASE_ANNOTATION = "offline.delivery/release"
# K8sRuntime only: digest of the site's k8s options the objects were rendered with.
OPTIONS_ANNOTATION = "offline.delivery/k8s-options"
GROUP_LABEL_PREFIX = "offline.delivery/group."
DEFAULT_VOLUME_SIZE = "1Gi"
# The default NodePort range of kube-apiserver (--service-node-port-range).
DEFAULT_NODE_PORT_RANGE = (30000, 32767)
# CPU request = this fraction of the limit: a limit-sized request would make small clusters unschedulable.
CPU_REQUEST_FRACTION = 0.1

# Order of kinds inside one component: what a workload refers to comes first.
KIND_ORDER = ("Namespace", "Secret", "ConfigMap", "Service", "StatefulSet", "Deployment", "Job")

DNS1123_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
DNS1035_LABEL_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?\Z")
DNS1123_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?\Z")
NUMERIC_USER_RE = re.compile(r"^(\d+)(?::(\d+))?\Z")


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
    except OciError as exc:
        raise K8sRenderError("components.%s.image: %s" % (component, exc)) from exc
    if digest and ref_digest and digest != ref_digest:
        raise K8sRenderError("components.%s.image: the reference pins %s but the release's index digest is %s; "
                             "rebuild the bundle or fix the reference" % (component, ref_digest, digest))
    pinned = digest or ref_digest
    if not pinned:
        raise K8sRenderError("components.%s.image: no index digest for %s; give the index digest of each "
                             "component's image in the site registry (the release's images)" % (component, reference))
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


def _security_context(name: str, user: Optional[str], security: Mapping[str, Any]) -> dict:
    """The same containment as every target: the model's capabilities only (drop ALL, add them), no privilege
    escalation unless the model allows it, the runtime's default seccomp profile."""
    ctx: Dict[str, Any] = {
        "allowPrivilegeEscalation": bool(security.get("privilege_escalation")),
        "capabilities": {"drop": ["ALL"], "add": capabilities_of(security)},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if user is None:
        return ctx
    match = NUMERIC_USER_RE.match(user)
    if not match:
        raise K8sRenderError("components.%s.user: %r is a name; Kubernetes needs numeric ids (runAsUser/"
                             "runAsGroup): write it as uid or uid:gid" % (name, user))
    ctx["runAsUser"] = int(match.group(1))
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
    security: Mapping[str, Any] = field(default_factory=dict)   # the model's (app_model.capabilities_of)
    kind: str = "service"                       # or "job": a batch/v1 Job, run to completion


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
    container["securityContext"] = _security_context(inp.name, inp.user, inp.security)
    all_mounts = mounts + [{"name": v["name"], "mountPath": v["path"]} for v in inp.volumes]
    if all_mounts:
        container["volumeMounts"] = sorted(all_mounts, key=lambda m: m["mountPath"])
    return container


def _check_job_input(inp: ComponentInput) -> None:
    """What the model refuses on a job, refused here too (a spec from elsewhere, e.g. a hand-made one)."""
    for what, value in (("ports", inp.ports), ("volumes", inp.volumes), ("health", inp.health)):
        if value:
            raise K8sRenderError("components.%s.%s: a job (kind: job) cannot have %s" % (inp.name, what, what))
    if inp.replicas != 1:
        raise K8sRenderError("components.%s.replicas: a job runs once (replicas 1), got %r" % (inp.name, inp.replicas))


def render_component(inp: ComponentInput, opts: RenderOptions) -> List[dict]:
    """The objects of one component, without release metadata or fingerprint (see ``stamp``).

    A service becomes a Deployment (a StatefulSet with volumes) and its Service(s); a job (``kind: job``) a
    ``batch/v1`` Job with the same pod spec, ``restartPolicy: Never`` and ``backoffLimit: 0`` (a failed run
    fails the deploy, whose rollback decides what happens next), no ``ttlSecondsAfterFinished`` (the
    completed Job is the record that it ran with this fingerprint), and no Service (nothing connects to it).
    """
    is_job = inp.kind == "job"
    if is_job:
        _check_job_input(inp)
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
    if not is_job:
        # Every service gets its name in cluster DNS, as every compose service has: without ports a headless
        # Service (the name resolves to the pods' addresses), so ${host} of a port-less component still resolves.
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
    template = {"metadata": {"labels": dict(sorted(labels.items()))}, "spec": pod_spec}
    if is_job:
        # One pod, never restarted in place; no selector: the Job controller makes its own (controller-uid).
        pod_spec["restartPolicy"] = "Never"
        objects.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(kname, ns, labels),
                        "spec": {"backoffLimit": 0, "completions": 1, "parallelism": 1, "template": template}})
        return sorted(objects, key=lambda o: (KIND_ORDER.index(o["kind"]), o["metadata"]["name"]))
    kind = "StatefulSet" if inp.volumes else "Deployment"
    spec: Dict[str, Any] = {"replicas": inp.replicas, "selector": {"matchLabels": selector_labels(inp.app, inp.name)},
                            "template": template}
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
    spec: Dict[str, Any] = {"type": "ClusterIP",
                            "selector": selector_labels(labels["app.kubernetes.io/part-of"],
                                                        labels["app.kubernetes.io/component"])}
    if ports:
        spec["ports"] = [{"name": p["name"], "port": p["port"], "targetPort": p["name"],
                          "protocol": p["protocol"].upper()} for p in ports]
    else:
        spec["clusterIP"] = "None"   # headless: the API accepts a Service without ports only so
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(kname, namespace, labels), "spec": spec}


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


def fingerprint(objects: Iterable[dict], key: bytes) -> str:
    """HMAC-SHA256 under ``key`` of the canonical JSON of a component's rendered objects (before release-only
    metadata), ``hmac-sha256:<hex>``. The objects hold the Secret's data and the inline env (site overrides), and
    the annotation is readable by anyone who may read the workload, not only by who may read Secrets: keyed,
    it cannot be checked against guessed values."""
    return keyed_fingerprint(list(objects), key)


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
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            obj["spec"]["template"]["metadata"]["annotations"] = {FINGERPRINT_ANNOTATION: digest}


# A Job's name is the value of the job-name label of its pods, so at most 63 characters; in static manifests
# it carries the first characters of its fingerprint.
MAX_JOB_NAME, JOB_NAME_HASH = 63, 10


def job_name(component: str, digest: str) -> str:
    """The name of a job's Job in static manifests: ``<component>-<first 10 hex of its fingerprint>``.

    A Job's pod template cannot be changed, so ``kubectl apply`` of a changed job under the same name fails
    ("field is immutable"). Named by its fingerprint, a changed job is a new Job that ``kubectl apply`` creates
    (and runs), while an unchanged one is the same object and applying it again does nothing
    (docs/kubernetes.md "Jobs")."""
    kname = object_name(component)
    hexdigest = digest.split(":", 1)[-1][:JOB_NAME_HASH]
    return "%s-%s" % (kname[:MAX_JOB_NAME - JOB_NAME_HASH - 1].rstrip("-"), hexdigest)


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
                          security=comp.get("security") or {},
                          description=comp["description"],
                          kind=comp.get("kind") or "service")   # models stored before jobs existed: services


def render_manifests(model: dict, *, namespace: str, secrets: Mapping[str, str],
                     overrides: Optional[Mapping[str, Mapping[str, object]]] = None, registry: str,
                     image_digests: Mapping[str, str], storage_class: Optional[str] = None,
                     labels: Optional[Mapping[str, str]] = None, volume_sizes: Optional[Mapping[str, str]] = None,
                     publish_type: str = "NodePort",
                     node_port_range: Tuple[int, int] = DEFAULT_NODE_PORT_RANGE,
                     include_namespace: bool = False, fingerprint_key: bytes) -> List[dict]:
    """Every Kubernetes object of a release, sorted: components in start order, kinds as ``KIND_ORDER``.

    ``secrets``: the site's generated values; ``overrides``: component -> {ENV: value}; ``image_digests``:
    component -> index digest of its image in the site registry ``registry`` (``host:port``).
    ``volume_sizes``: volume name -> storage request (default 1Gi; the model has no sizes).
    ``fingerprint_key``: the key of the spec fingerprints (``app_state.fingerprint_key`` where the render runs).
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
            digest = fingerprint(objects, fingerprint_key)
            stamp(objects, inp, opts, digest)
            for obj in objects:
                if obj["kind"] == "Job":
                    obj["metadata"]["name"] = job_name(name, digest)
            out.extend(objects)
    return json.loads(json.dumps(out))


def component_of(obj: Mapping[str, Any]) -> Optional[str]:
    return (obj.get("metadata", {}).get("labels") or {}).get("app.kubernetes.io/component")


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
                          r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?\Z")
# A StatefulSet's pods get a controller-revision-hash label "<name>-<10 chars>" that must fit 63.
MAX_STATEFULSET_NAME = 52


def _where(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return "%s %s/%s" % (obj.get("kind"), meta.get("namespace", ""), meta.get("name"))


def _pod_spec(obj: Mapping[str, Any]) -> Optional[dict]:
    if obj.get("kind") in ("Deployment", "StatefulSet", "Job"):
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
        if obj.get("kind") == "Job" and len(name) > MAX_JOB_NAME:
            problems.append("%s: a Job name longer than %d breaks its pods' job-name label"
                            % (_where(obj), MAX_JOB_NAME))
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
        if obj.get("kind") == "Job" and not (obj.get("spec") or {}).get("manualSelector"):
            continue   # the Job controller makes the selector (its controller-uid)
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
        matching = _matching_workloads(svc, objects)
        workloads = [o for o in matching if o.get("kind") != "Job"]
        if not workloads:
            jobs = ", ".join(o["metadata"].get("name", "") for o in matching)
            problems.append("%s: its selector %s selects no pod of these manifests%s"
                            % (_where(svc), (svc.get("spec") or {}).get("selector"),
                               (" but those of Job %s, which run to completion" % jobs) if jobs else ""))
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


def _check_job(obj: dict, pod: dict, problems: List[str]) -> None:
    """What the API server refuses of a Job but a schema does not say."""
    policy = pod.get("restartPolicy", "Always")
    if policy not in ("Never", "OnFailure"):
        problems.append("%s: a Job's pods need restartPolicy Never or OnFailure, not %s" % (_where(obj), policy))


def check_manifests(objects: Iterable[dict]) -> List[str]:
    """Problems across objects, one line each (empty = fine): names and labels, workload selectors vs pod
    labels, Services vs the pods and ports they select, probe port names, env Secret/ConfigMap references,
    volume mounts vs volumes, a Job's restart policy. ``kubernetes-validate --strict`` checks each object's
    schema; this checks the rest."""
    objects = list(objects)
    problems: List[str] = []
    _check_names(objects, problems)
    _check_selectors(objects, problems)
    _check_services(objects, problems)
    for obj in objects:
        pod = _pod_spec(obj)
        if pod is None:
            continue
        if obj.get("kind") == "Job":
            _check_job(obj, pod, problems)
        for container in pod.get("containers") or []:
            _check_probes(obj, container, problems)
            _check_env(objects, obj, container, problems)
        _check_volumes(objects, obj, pod, problems)
    return problems


# ---------------------------------------------------------------------------------------------------
# The runtime: the deploy engine's seam (app_runtime.Runtime) for a cluster
# ---------------------------------------------------------------------------------------------------

WORKLOAD_KINDS = ("StatefulSet", "Deployment")
# What a component runs as: a service's Deployment/StatefulSet or a job's Job (observe lists all three).
RUNNING_KINDS = WORKLOAD_KINDS + ("Job",)
# What uninstall/remove delete, in this order (workloads first so no pod restarts against a deleted Secret).
OWNED_KINDS = ("Job", "Deployment", "StatefulSet", "Service", "ConfigMap", "Secret")


def spec_input(spec: ComponentSpec, *, secret_values: Iterable[str], group: Optional[str] = None,
               description: str = "") -> ComponentInput:
    """A deploy engine ``ComponentSpec`` (env and files already resolved, ``${host}`` = Service names because
    ``K8sRuntime.local_address`` says so) as renderer input; secrets are recognised by value."""
    values = [v for v in secret_values if v]
    files = [dict(f) for f in spec.config_files]
    return ComponentInput(
        name=spec.name, app=spec.app, version=spec.version, image=spec.image, env=dict(spec.env),
        secret_env={k for k, v in spec.env.items() if _holds_secret(v, values)}, files=files,
        secret_files={i for i, f in enumerate(files) if _holds_secret(f["content"], values)},
        ports=list(spec.ports), volumes=list(spec.volumes), health=spec.health, entrypoint=spec.entrypoint,
        command=spec.command, user=spec.user, replicas=spec.replicas, resources=dict(spec.resources or {}),
        group=group, description=description, security=dict(spec.security or {}), kind=spec.kind)


def workload_kind(spec: ComponentSpec) -> str:
    """The kind of object a component runs as on the cluster."""
    if spec.is_job:
        return "Job"
    return "StatefulSet" if spec.volumes else "Deployment"


def job_condition(job: Mapping[str, Any]) -> Tuple[str, str]:
    """(JOB_RUNNING | JOB_SUCCEEDED | JOB_FAILED, the condition's reason and message) from a Job's status.

    ``Failed`` (and ``FailureTarget``, which the controller sets first since 1.31 while it stops the pods) is
    final; ``Complete`` is success (set once the pods are done: ``SuccessCriteriaMet`` alone is not yet)."""
    true = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}
    for kind in ("Failed", "FailureTarget"):
        if kind in true:
            cond = true[kind]
            return JOB_FAILED, ": ".join(t for t in (cond.get("reason"), cond.get("message")) if t) or kind
    if "Complete" in true:
        return JOB_SUCCEEDED, ""
    status = job.get("status") or {}
    return JOB_RUNNING, "%s active, %s succeeded, %s failed pods" % (
        status.get("active", 0), status.get("succeeded", 0), status.get("failed", 0))


def pod_problem(pod: Mapping[str, Any]) -> str:
    """Why a pod is not Ready, from its container statuses and conditions (the first informative reason)."""
    name = pod.get("metadata", {}).get("name", "?")
    status = pod.get("status") or {}
    for cstat in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cstat.get("state") or {}).get("waiting") or {}
        last = (cstat.get("lastState") or {}).get("terminated") or {}
        if waiting.get("reason"):
            text = "pod %s: container %s %s" % (name, cstat.get("name"), waiting["reason"])
            if waiting.get("message"):
                text += ": " + waiting["message"]
            if last:
                text += " (last exit %s %s, restarts %s)" % (
                    last.get("exitCode"), last.get("reason", ""), cstat.get("restartCount", 0))
            return text
        terminated = (cstat.get("state") or {}).get("terminated") or {}
        if terminated:
            return "pod %s: container %s exited %s %s" % (
                name, cstat.get("name"), terminated.get("exitCode"), terminated.get("reason", ""))
        running = "running" in (cstat.get("state") or {})
        if running and not cstat.get("ready"):
            probe = "readiness probe fails" if cstat.get("started") else "health check has not passed yet (startup probe)"
            return "pod %s: container %s is running but not ready: its %s; restarts %s" % (
                name, cstat.get("name"), probe, cstat.get("restartCount", 0))
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True" and (cond.get("reason") or cond.get("message")):
            return "pod %s: %s %s: %s" % (name, cond.get("type"), cond.get("reason", ""), cond.get("message", ""))
    return "pod %s: phase %s" % (name, status.get("phase", "unknown"))


def rollout_problem(workload: Mapping[str, Any]) -> str:
    """"" when the workload's current spec is fully rolled out and available, else what is missing."""
    meta, spec, status = workload.get("metadata") or {}, workload.get("spec") or {}, workload.get("status") or {}
    want = spec.get("replicas", 1)
    if status.get("observedGeneration", 0) < meta.get("generation", 0):
        return "the controller has not seen generation %s yet" % meta.get("generation")
    if workload.get("kind") == "StatefulSet":
        if status.get("updateRevision") and status.get("currentRevision") != status.get("updateRevision"):
            return "%s of %s pods updated to the new revision" % (status.get("updatedReplicas", 0), want)
    elif status.get("updatedReplicas", 0) < want:
        return "%s of %s pods updated" % (status.get("updatedReplicas", 0), want)
    elif status.get("replicas", 0) > want:
        return "%s pods of the previous spec still run beside the %s updated ones (the new ones are not " \
               "ready yet, or the old ones are terminating)" % (status.get("replicas", 0) - want, want)
    if status.get("readyReplicas", 0) < want:
        return "%s of %s pods ready" % (status.get("readyReplicas", 0), want)
    if workload.get("kind") == "Deployment" and status.get("availableReplicas", 0) < want:
        return "%s of %s pods available" % (status.get("availableReplicas", 0), want)
    return ""


class K8sRuntime(Runtime):
    """Runs an app's components as Kubernetes objects in one namespace (the "host" is the cluster).

    ``start`` renders each spec, applies it with server-side apply (dependencies first, as the engine
    orders them) and waits, bounded, until the controller has seen it; ``probe`` is healthy when the
    rollout is complete and every pod is Ready, else names the pod and the reason. ``observe`` reads the
    fingerprint annotation, which holds the engine's ``ComponentSpec.fingerprint``. A job is a Job, created
    anew by each ``start`` (its previous run deleted first) and followed with ``job_state``.
    """

    kind = "k8s"

    def __init__(self, app: str, *, client: K8sClient, options: RenderOptions, secret_values: Iterable[str] = (),
                 groups: Optional[Mapping[str, Optional[str]]] = None, apply_timeout: float = 60.0,
                 remove_timeout: float = 120.0, poll: float = 2.0, apps_dir: str = "", state_dir: str = "",
                 run: Optional[Callable[[List[str]], Tuple[int, str, str]]] = None, health_scale: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(app, apps_dir=apps_dir, state_dir=state_dir, run=run or _no_commands,
                         health_scale=health_scale)
        options.check()
        self.client = client
        self.options = options
        self.namespace = options.namespace
        self.secret_values = list(secret_values)
        self.groups = dict(groups or {})
        self.apply_timeout = apply_timeout
        self.remove_timeout = remove_timeout
        self.poll = poll
        self.clock = clock
        self.sleep = sleep

    def local_address(self, component: str) -> str:
        """``${host}`` of a component: its Service name (same namespace, resolved by cluster DNS)."""
        return object_name(component)

    def host_ports(self, spec: ComponentSpec) -> List[int]:
        """None on the host running the deploy: published ports are NodePorts/LoadBalancers of the cluster."""
        return []

    # -- reading ------------------------------------------------------------------------------------

    def _call(self, what: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return func(*args, **kwargs)
        except K8sError as exc:
            raise DeployError("%s: %s" % (what, exc)) from exc

    def _workloads(self) -> List[dict]:
        out: List[dict] = []
        for kind in RUNNING_KINDS:
            out += self._call("list %ss of %s" % (kind, self.app), self.client.list, kind, self.namespace,
                              label_selector=app_selector(self.app))
        return out

    def _pods(self, component: str) -> List[dict]:
        selector = ",".join("%s=%s" % kv for kv in sorted(selector_labels(self.app, component).items()))
        return self._call("list pods of %s" % component, self.client.list, "Pod", self.namespace,
                          label_selector=selector)

    def observe(self) -> Dict[str, Observed]:
        observed: Dict[str, Observed] = {}
        for workload in self._workloads():
            name = component_of(workload)
            if not name:
                continue
            meta = workload.get("metadata") or {}
            annotations = meta.get("annotations") or {}
            have = annotations.get(FINGERPRINT_ANNOTATION)
            if have and annotations.get(OPTIONS_ANNOTATION) != self.options_digest(name):
                # Same spec, other site options (storage class, publish type, labels, group): re-apply it.
                have += " (rendered with other k8s options)"
            detail = "%s %s" % (workload.get("kind"), meta.get("name"))
            if workload.get("kind") == "Job":
                # A job is "running" for the plan when its run with this definition succeeded: then it is
                # left alone; a failed or unfinished run makes the engine run it again.
                state, why = job_condition(workload)
                observed[name] = Observed(fingerprint=have, running=state == JOB_SUCCEEDED,
                                          started_at=(workload.get("status") or {}).get("startTime"),
                                          detail="%s: %s%s" % (detail, state, (" (%s)" % why) if why else ""))
                continue
            starts = sorted(p.get("status", {}).get("startTime", "") for p in self._pods(name)
                            if p.get("status", {}).get("startTime"))
            observed[name] = Observed(
                fingerprint=have,
                running=(workload.get("spec") or {}).get("replicas", 1) > 0,
                started_at=starts[0] if starts else None,
                detail=detail)
        return observed

    # -- writing ------------------------------------------------------------------------------------

    def options_digest(self, component: str) -> str:
        """What the objects depend on besides the spec: the site's k8s options (and the component's group).
        The engine's spec fingerprint does not cover them, so ``observe`` compares this too."""
        opts = self.options
        data = {"namespace": opts.namespace, "storage_class": opts.storage_class,
                "volume_sizes": dict(opts.volume_sizes), "publish_type": opts.publish_type,
                "node_port_range": list(opts.node_port_range), "labels": dict(opts.labels),
                "group": self.groups.get(component)}
        raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")
        return sha256_digest(raw)

    def objects_for(self, spec: ComponentSpec) -> List[dict]:
        """The objects ``start`` applies for a spec (stamped with the engine's fingerprint)."""
        inp = spec_input(spec, secret_values=self.secret_values, group=self.groups.get(spec.name))
        objects = render_component(inp, self.options)
        stamp(objects, inp, self.options, spec.fingerprint)
        for obj in objects:
            annotations = obj["metadata"]["annotations"]
            annotations[OPTIONS_ANNOTATION] = self.options_digest(spec.name)
            obj["metadata"]["annotations"] = dict(sorted(annotations.items()))
        return json.loads(json.dumps(objects))

    def check(self, specs: Sequence[ComponentSpec]) -> None:
        """Render everything (a render error is a refusal before anything is applied)."""
        for spec in specs:
            try:
                self.objects_for(spec)
            except K8sRenderError as exc:
                raise DeployError("%s: %s" % (spec.name, exc)) from exc

    def prepare(self, specs: Sequence[ComponentSpec]) -> None:
        """Render everything first and make sure the namespace exists."""
        self.check(specs)
        if self._call("read namespace %s" % self.namespace, self.client.get, "Namespace", self.namespace) is None:
            self._call("create namespace %s" % self.namespace, self.client.apply,
                       {"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": self.namespace, "labels": {"app.kubernetes.io/managed-by": MANAGED_BY}}})

    def start(self, specs: Sequence[ComponentSpec], *, all_specs: Sequence[ComponentSpec]) -> None:
        """Apply each spec's objects; a job's Job is created anew (its previous run deleted first), which
        starts it. Waits until the controllers have seen the Deployments/StatefulSets (a Job needs no wait:
        ``job_state`` follows its run)."""
        applied: List[Tuple[str, dict]] = []
        for spec in specs:
            if spec.is_job:
                self._clear_for_job(spec)
            for obj in self.objects_for(spec):
                result = self._call("%s: apply %s %s" % (spec.name, obj["kind"], obj["metadata"]["name"]),
                                    self.client.apply, obj)
                if obj["kind"] in RUNNING_KINDS:
                    self._drop_other_workload(spec.name, obj)
                if obj["kind"] in WORKLOAD_KINDS:
                    applied.append((spec.name, result))
        for name, result in applied:
            self._wait_observed(name, result)

    def _drop_other_workload(self, name: str, obj: Mapping[str, Any]) -> None:
        """A component that gained (or lost) volumes, or became a job or a service, changes kind: delete its
        workload of the other kinds."""
        kname = obj["metadata"]["name"]
        for other in RUNNING_KINDS:
            if other == obj["kind"]:
                continue
            if self._call("read %s %s" % (other, kname), self.client.get, other, kname, self.namespace) is not None:
                self._call("%s: delete %s %s (now a %s)" % (name, other, kname, obj["kind"]), self.client.delete,
                           other, kname, self.namespace)

    def _clear_for_job(self, spec: ComponentSpec) -> None:
        """Before a job's Job is created: its previous Job goes (a Job's pod template cannot be changed, and a
        run that failed or did not finish is run again as a new Job), waiting, bounded, until it and its pods
        are gone (foreground deletion: the Job object goes last); Services of the component when it was a
        service are deleted (a job has none)."""
        kname = object_name(spec.name)
        selector = "%s,app.kubernetes.io/component=%s" % (app_selector(self.app), spec.name)
        self._delete_component_objects(selector, ("Service",))
        if self._call("read Job %s" % kname, self.client.get, "Job", kname, self.namespace) is None:
            return
        self._call("%s: delete Job %s (its previous run)" % (spec.name, kname), self.client.delete, "Job", kname,
                   self.namespace, propagation="Foreground")

        def gone() -> Tuple[bool, str]:
            job = self._call("read Job %s" % kname, self.client.get, "Job", kname, self.namespace)
            return job is None, "Job %s is still there (its pods are being deleted first)" % kname

        try:
            wait_for(gone, timeout=self.remove_timeout, interval=min(self.poll, 1.0),
                     what="the previous run of job %s to be deleted" % spec.name, clock=self.clock, sleep=self.sleep)
        except K8sError as exc:
            raise DeployError("%s: %s" % (spec.name, exc)) from exc

    def _wait_observed(self, name: str, applied: Mapping[str, Any]) -> None:
        """Bounded wait until the controller has seen the applied generation (the rollout has begun)."""
        kind, meta = applied.get("kind", "Deployment"), applied.get("metadata") or {}
        generation = meta.get("generation", 0)

        def seen() -> Tuple[bool, str]:
            current = self._call("read %s %s" % (kind, meta.get("name")), self.client.get, kind,
                                 meta.get("name", ""), self.namespace)
            if current is None:
                return False, "%s %s is gone" % (kind, meta.get("name"))
            got = (current.get("status") or {}).get("observedGeneration", 0)
            return got >= generation, "observedGeneration %s < %s" % (got, generation)

        try:
            wait_for(seen, timeout=self.apply_timeout, interval=min(self.poll, 1.0),
                     what="the %s controller to pick up %s" % (kind, name), clock=self.clock, sleep=self.sleep)
        except K8sError as exc:
            raise DeployError("%s: %s (is kube-controller-manager running?)" % (name, exc)) from exc

    def wait_rollout(self, spec: ComponentSpec, timeout: float) -> None:
        """Bounded wait until ``probe(spec)`` is healthy; DeployError with the last reason otherwise."""
        try:
            wait_for(lambda: self.probe(spec), timeout=timeout, interval=self.poll,
                     what="the rollout of %s" % spec.name, clock=self.clock, sleep=self.sleep)
        except K8sError as exc:
            raise DeployError("%s: %s" % (spec.name, exc)) from exc

    def _delete_component_objects(self, selector: str, kinds: Sequence[str]) -> List[str]:
        removed = []
        for kind in kinds:
            for obj in self._call("list %ss" % kind, self.client.list, kind, self.namespace, label_selector=selector):
                name = obj["metadata"]["name"]
                if self._call("delete %s %s" % (kind, name), self.client.delete, kind, name, self.namespace):
                    removed.append("%s/%s" % (kind, name))
        return removed

    def _wait_pods_gone(self, selector: str, what: str) -> None:
        def gone() -> Tuple[bool, str]:
            pods = self._call("list pods", self.client.list, "Pod", self.namespace, label_selector=selector)
            return not pods, ", ".join(p["metadata"]["name"] for p in pods) + " still there"

        try:
            wait_for(gone, timeout=self.remove_timeout, interval=self.poll, what=what, clock=self.clock,
                     sleep=self.sleep)
        except K8sError as exc:
            raise DeployError(str(exc)) from exc

    def remove(self, names: Sequence[str], *, all_specs: Sequence[ComponentSpec]) -> None:
        """Delete the components' workloads, Services, ConfigMaps and Secrets; their PVCs stay."""
        for name in names:
            selector = "%s,app.kubernetes.io/component=%s" % (app_selector(self.app), name)
            self._delete_component_objects(selector, OWNED_KINDS)
            self._wait_pods_gone(selector, "the pods of %s to stop" % name)

    def _job_pods(self, spec: ComponentSpec, job: Mapping[str, Any]) -> List[dict]:
        """The pods of this Job (owned by its uid), oldest first."""
        uid = (job.get("metadata") or {}).get("uid")
        pods = [p for p in self._pods(spec.name)
                if any(ref.get("uid") == uid for ref in (p.get("metadata") or {}).get("ownerReferences") or [])]
        return sorted(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp", ""))

    def job_state(self, spec: ComponentSpec) -> Tuple[str, str]:
        """Where the job's run is, from its Job's conditions; the detail names its pod's state (exit code and
        reason of a failed run, ``ImagePullBackOff`` of one that cannot start)."""
        kname = object_name(spec.name)
        job = self._call("read Job %s" % kname, self.client.get, "Job", kname, self.namespace)
        if job is None:
            return JOB_FAILED, "Job %s/%s does not exist" % (self.namespace, kname)
        have = ((job.get("metadata") or {}).get("annotations") or {}).get(FINGERPRINT_ANNOTATION)
        if spec.fingerprint and have != spec.fingerprint:
            return JOB_FAILED, "Job %s runs another spec (%s)" % (kname, have)
        state, why = job_condition(job)
        if state == JOB_SUCCEEDED:
            return state, "Job %s completed" % kname
        pods = self._job_pods(spec, job)
        pod = pod_problem(pods[-1]) if pods else "no pod yet"
        if state == JOB_FAILED:
            return state, "Job %s failed (%s); %s" % (kname, why, pod)
        return state, "Job %s: %s; %s" % (kname, why, pod)

    def probe(self, spec: ComponentSpec) -> Tuple[bool, str]:
        if spec.is_job:   # not called by the engine for jobs (it follows job_state); succeeded = healthy
            state, detail = self.job_state(spec)
            return state == JOB_SUCCEEDED, "" if state == JOB_SUCCEEDED else detail
        kname = object_name(spec.name)
        kind = workload_kind(spec)
        workload = self._call("read %s %s" % (kind, kname), self.client.get, kind, kname, self.namespace)
        if workload is None:
            return False, "%s %s/%s does not exist" % (kind, self.namespace, kname)
        have = ((workload.get("metadata") or {}).get("annotations") or {}).get(FINGERPRINT_ANNOTATION)
        if have != spec.fingerprint:
            return False, "%s %s runs another spec (%s)" % (kind, kname, have)
        problem = rollout_problem(workload)
        if not problem:
            return True, ""
        pods = [p for p in self._pods(spec.name)
                if (p.get("metadata", {}).get("annotations") or {}).get(FINGERPRINT_ANNOTATION) == spec.fingerprint]
        reasons = [pod_problem(p) for p in pods if not _pod_ready(p)]
        return False, "%s %s: %s%s" % (kind, kname, problem, ("; " + reasons[0]) if reasons else "")

    def volume_dirs(self, spec: ComponentSpec) -> Dict[str, str]:
        """None: a component's data lives in PersistentVolumeClaims on the cluster, not in host directories
        (snapshots of the k8s target are the storage system's job; see docs/kubernetes.md)."""
        return {}

    def uninstall(self, *, keep_data: bool) -> List[str]:
        selector = app_selector(self.app)
        removed = self._delete_component_objects(selector, OWNED_KINDS)
        self._wait_pods_gone(selector, "the pods of %s to stop" % self.app)
        if not keep_data:
            removed += self._delete_component_objects(selector, ("PersistentVolumeClaim",))
        return removed

    def logs(self, name: str, lines: int = 30) -> str:
        """The output of a not-ready pod of the component (its previous run when it is crash-looping; a job's
        pod that exited: its output)."""
        try:
            pods = sorted(self._pods(name), key=lambda p: (p.get("metadata") or {}).get("creationTimestamp", ""),
                          reverse=True)
            for pod in sorted(pods, key=_pod_ready):
                restarted = any(c.get("restartCount", 0) for c in pod.get("status", {}).get("containerStatuses") or [])
                text = self.client.pod_log(self.namespace, pod["metadata"]["name"], lines=lines, previous=restarted)
                if text:
                    return text
        except (K8sError, DeployError):
            return ""
        return ""


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _no_commands(argv: List[str]) -> Tuple[int, str, str]:
    raise DeployError("the k8s runtime runs no host commands (asked for %s)" % " ".join(argv))


# ---------------------------------------------------------------------------------------------------
# A manifest directory (what `kubectl apply -f DIR` or a GitOps tool reads)
# ---------------------------------------------------------------------------------------------------

MANIFEST_FILE_RE = re.compile(r"^\d{3}-[a-z]+-[a-z0-9.-]+\.json\Z")


def manifest_files(objects: Sequence[dict]) -> List[Tuple[str, bytes]]:
    """(file name, content) per object, numbered in apply order; JSON (which every YAML reader accepts)."""
    return [("%03d-%s-%s.json" % (i, obj["kind"].lower(), obj["metadata"]["name"]),
             (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
            for i, obj in enumerate(objects)]


def write_manifest_dir(objects: Sequence[dict], dest: str, *, check_mode: bool = False) -> Dict[str, List[str]]:
    """Make ``dest`` hold exactly these manifests: files written only when their content differs, files of
    an earlier render that are no longer wanted removed (other files are left alone). The directory is
    0700 and the files 0600: Secrets are in there. Returns {written, removed, unchanged}."""
    result: Dict[str, List[str]] = {"written": [], "removed": [], "unchanged": []}
    wanted = dict(manifest_files(objects))
    existing = sorted(f for f in os.listdir(dest) if MANIFEST_FILE_RE.match(f)) if os.path.isdir(dest) else []
    if not check_mode:
        ensure_private_dir(dest)
    for name, data in wanted.items():
        written = write_if_changed(os.path.join(dest, name), data, 0o600, check_mode=check_mode)
        result["written" if written else "unchanged"].append(name)
    for name in existing:
        if name not in wanted:
            result["removed"].append(name)
            if not check_mode:
                os.unlink(os.path.join(dest, name))
    return result
