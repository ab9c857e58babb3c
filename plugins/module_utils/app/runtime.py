# Copyright: offline.delivery contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""What one host runs of a release, and the seam every target kind implements.

``desired_specs`` turns a release (normalised model + image digests) plus the site's secrets, overrides and
placement into one ``ComponentSpec`` per component this host runs, each with a fingerprint. A ``Runtime``
(compose, systemd, k8s) makes a host match those specs; the deploy engine (``app_deploy.py``) decides what
changed by comparing fingerprints, so an unchanged component is never touched.

A fingerprint covers the resolved spec, secrets and site overrides included, and is written where others can
read it (unit files, container labels, k8s annotations, module results). So it is an HMAC keyed with the
deploying host's own random key (``app_state.fingerprint_key``), never a plain hash: a plain hash of a spec
whose only unknown is a weak value (an override password) can be matched offline by hashing candidates.

Standard library only (ships inside Ansible modules).
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import json
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from ..common.oci import site_reference
from .model import ModelError, component_kind, effective_env, render_config, start_order

LOCAL_ADDRESS = "127.0.0.1"
# Where a job's current run is (Runtime.job_state).
JOB_RUNNING, JOB_SUCCEEDED, JOB_FAILED = "running", "succeeded", "failed"


class DeployError(RuntimeError):
    """A runtime step failed; the message names the component and what to check."""


@dataclass(frozen=True)
class ComponentSpec:
    """Everything a runtime needs to run one component on this host; ``fingerprint`` identifies it."""

    name: str
    app: str
    version: str
    image: str                     # what a container runtime pulls: <registry>/<reference>@<index digest>
    reference: str                 # the model's reference, e.g. shop/api:1.0.0
    index_digest: str              # OCI index of the component (all platforms)
    manifest_digest: str           # the image manifest for this host's platform
    platform: str                  # linux/amd64
    entrypoint: Optional[List[str]]
    command: Optional[List[str]]
    user: Optional[str]
    env: Dict[str, str] = field(repr=False)          # resolved, may hold secrets: never log
    config_files: List[Dict[str, str]] = field(repr=False)   # [{path, content, mode}], resolved
    volumes: List[Dict[str, str]] = field(default_factory=list)
    ports: List[Dict[str, Any]] = field(default_factory=list)
    health: Optional[Dict[str, Any]] = None
    depends_on: Dict[str, Dict[str, str]] = field(default_factory=dict)   # all dependencies
    local_deps: List[str] = field(default_factory=list)                 # those running on this host
    replicas: int = 1
    resources: Dict[str, Any] = field(default_factory=dict)
    security: Dict[str, Any] = field(default_factory=dict)       # the model's, normalised: app_model.capabilities_of
    kind: str = "service"          # or "job": runs to completion, its dependents wait for it
    fingerprint: str = ""

    @property
    def is_job(self) -> bool:
        return self.kind == "job"

    def public(self) -> Dict[str, Any]:
        """The spec without env values and file contents (those may hold secrets)."""
        data = asdict(self)
        data["env"] = sorted(self.env)
        data["config_files"] = [{"path": f["path"], "mode": f["mode"]} for f in self.config_files]
        return data


@dataclass
class Observed:
    """What a runtime sees of one component on this host now. For a job, ``running`` means its last run with
    that fingerprint succeeded (so the plan leaves it alone); a failed or unfinished run is run again."""

    fingerprint: Optional[str]
    running: bool
    started_at: Optional[str] = None      # ISO 8601 from the runtime, to prove "not restarted"
    detail: str = ""


FINGERPRINT_PREFIX = "hmac-sha256:"
MIN_FINGERPRINT_KEY = 32


def fingerprint(data: Any, key: bytes) -> str:
    """``hmac-sha256:<hex>``: HMAC-SHA256 under ``key`` (the host's fingerprint key) of the canonical JSON of
    ``data``. The same data under the same key gives the same fingerprint; without the key, nothing of the
    data (secrets, override values) can be checked against it."""
    if not isinstance(key, (bytes, bytearray)) or len(key) < MIN_FINGERPRINT_KEY:
        raise ValueError("a fingerprint key is at least %d random bytes (app_state.fingerprint_key)"
                         % MIN_FINGERPRINT_KEY)
    raw = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return FINGERPRINT_PREFIX + hmac.new(bytes(key), raw, hashlib.sha256).hexdigest()


def components_on(placement: Mapping[str, Sequence[str]], host: str) -> List[str]:
    return sorted(name for name, hosts in placement.items() if host in hosts)


def dependency_addresses(model: dict, placement: Mapping[str, Sequence[str]], host: str,
                         addresses: Mapping[str, str], *, local_address: str | Callable[[str], str]) -> Dict[str, str]:
    """``${host}`` of every component as seen from ``host``.

    A dependency on the same host is reached locally (``local_address``: 127.0.0.1 on a systemd host, the
    service name in a compose project); otherwise at the address of the first host that runs it.
    """
    result: Dict[str, str] = {}
    for name in model["components"]:
        hosts = list(placement.get(name, ()))
        if host in hosts:
            result[name] = local_address(name) if callable(local_address) else local_address
        elif hosts:
            result[name] = addresses.get(hosts[0], hosts[0])
    return result


def desired_specs(model: dict, images: Mapping[str, Mapping[str, Any]], *, host: str, platform: str,
                  placement: Mapping[str, Sequence[str]], addresses: Mapping[str, str],
                  secrets: Mapping[str, str], overrides: Mapping[str, Mapping[str, object]],
                  registry: str, fingerprint_key: bytes,
                  local_address: str | Callable[[str], str] = LOCAL_ADDRESS) -> List[ComponentSpec]:
    """The specs of the components ``host`` runs, in start order (dependencies first); their fingerprints
    are keyed with ``fingerprint_key`` (``app_state.fingerprint_key`` of the state directory)."""
    mine = set(components_on(placement, host))
    unknown = sorted(set(overrides) - set(model["components"]))
    if unknown:
        raise ModelError([("overrides", "no component %s in %s %s; components: %s"
                           % (", ".join(unknown), model["name"], model["version"],
                              ", ".join(sorted(model["components"]))))])
    hosts = dependency_addresses(model, placement, host, addresses, local_address=local_address)
    specs = []
    for level in start_order(model):
        for name in level:
            if name in mine:
                specs.append(_spec(model, name, images, platform=platform, secrets=secrets, hosts=hosts,
                                   overrides=overrides.get(name) or {}, registry=registry, mine=mine,
                                   fingerprint_key=fingerprint_key))
    return specs


def _spec(model: dict, name: str, images: Mapping[str, Mapping[str, Any]], *, platform: str,
          secrets: Mapping[str, str], hosts: Mapping[str, str], overrides: Mapping[str, object],
          registry: str, mine: set, fingerprint_key: bytes) -> ComponentSpec:
    comp = model["components"][name]
    image = images.get(name)
    if not image:
        raise ModelError([("images.%s" % name, "the release lists no image for component %s" % name)])
    manifest = (image.get("manifests") or {}).get(platform)
    if not manifest:
        raise ModelError([("images.%s" % name, "image %s has no %s manifest (platforms: %s); build the bundle "
                           "with --platform %s" % (image["reference"], platform,
                                                   ", ".join(sorted(image.get("manifests") or {})) or "none",
                                                   platform))])
    env = effective_env(model, name, secrets=secrets, hosts=hosts, overrides=overrides)
    files = [{"path": f["path"], "mode": f["mode"],
              "content": render_config(model, name, i, env=env, secrets=secrets)}
             for i, f in enumerate(comp["config_files"])]
    reference = image["reference"]
    spec = ComponentSpec(
        name=name, app=model["name"], version=model["version"],
        image="%s/%s@%s" % (registry, site_reference(reference), image["index"]),
        reference=reference, index_digest=image["index"], manifest_digest=manifest, platform=platform,
        entrypoint=comp.get("entrypoint"), command=comp.get("command"), user=comp.get("user"),
        env=env, config_files=files, volumes=list(comp["volumes"]), ports=list(comp["ports"]),
        health=comp.get("health"), depends_on=dict(comp["depends_on"]),
        local_deps=sorted(d for d in comp["depends_on"] if d in mine),
        replicas=comp.get("replicas") or 1, resources=dict(comp.get("resources") or {}),
        security=dict(comp.get("security") or {}), kind=component_kind(comp),
    )
    data = asdict(spec)
    # The version alone does not restart a component: only what it runs does. A service's kind is left out
    # so that components deployed before jobs existed keep their fingerprints.
    for key in ("version", "fingerprint") + (("kind",) if spec.kind == "service" else ()):
        data.pop(key)
    return ComponentSpec(**{**asdict(spec), "fingerprint": fingerprint(data, fingerprint_key)})


def probe_spec(model: dict, name: str) -> ComponentSpec:
    """Enough of a spec to probe a running component's health (no env, no secrets needed)."""
    comp = model["components"][name]
    return ComponentSpec(name=name, app=model["name"], version=model["version"], image="", reference=comp["image"],
                         index_digest="", manifest_digest="", platform="", entrypoint=None, command=None, user=None,
                         env={}, config_files=[], volumes=list(comp["volumes"]), ports=list(comp["ports"]),
                         health=comp.get("health"), kind=component_kind(comp))


class Runtime(abc.ABC):
    """Runs components on one host. Every method is bounded in time and raises DeployError on failure.

    ``run`` executes an argv and returns (rc, stdout, stderr) — the module's run_command, so tests and the
    module share one path. Runtimes never log env values or config file contents.

    ``health_scale`` says how much slower this host is than the one the vendor's health timings were made
    for (a small ARM board, an emulated host): each health budget and each check's time limit is that many
    times the model's.
    """

    kind = ""

    def __init__(self, app: str, *, apps_dir: str, state_dir: str,
                 run: Callable[[List[str]], Tuple[int, str, str]], health_scale: float = 1.0) -> None:
        self.app = app
        self.apps_dir = apps_dir
        self.state_dir = state_dir
        self.run = run
        self.health_scale = health_scale

    def check_timeout(self, spec: ComponentSpec) -> float:
        """Seconds one run of the component's health check may take on this host."""
        return float((spec.health or {}).get("timeout") or 3) * self.health_scale

    def local_address(self, component: str) -> str:
        """How a component reaches a dependency on the same host."""
        return LOCAL_ADDRESS

    def host_ports(self, spec: ComponentSpec) -> List[int]:
        """TCP ports the component takes on the host itself (compose: the published ones)."""
        return sorted(p["publish"] for p in spec.ports if p.get("publish") and p["protocol"] == "tcp")

    @abc.abstractmethod
    def observe(self) -> Dict[str, Observed]:
        """Components of this app present on this host, running or not."""

    def check(self, specs: Sequence[ComponentSpec]) -> None:
        """Refuse what this target cannot run (the model against the target), reading nothing and changing
        nothing, so a multi-host deploy can check every host before any host changes (check mode does this
        too). Raises DeployError naming the component; the default finds nothing to refuse."""

    @abc.abstractmethod
    def prepare(self, specs: Sequence[ComponentSpec]) -> None:
        """Fetch what ``specs`` need (images, root filesystems) without stopping anything: a failure here
        leaves the host as it was."""

    @abc.abstractmethod
    def start(self, specs: Sequence[ComponentSpec], *, all_specs: Sequence[ComponentSpec]) -> None:
        """Create or replace, then start, the components ``specs`` (one start-order level). ``all_specs`` is
        everything this host runs after the step (compose renders the whole project from it)."""

    @abc.abstractmethod
    def remove(self, names: Sequence[str], *, all_specs: Sequence[ComponentSpec]) -> None:
        """Stop and remove components; their volumes stay."""

    @abc.abstractmethod
    def probe(self, spec: ComponentSpec) -> Tuple[bool, str]:
        """One health check now: (healthy, reason when not). No health in the model = running."""

    def job_state(self, spec: ComponentSpec) -> Tuple[str, str]:
        """Where the job's current run is: (JOB_RUNNING | JOB_SUCCEEDED | JOB_FAILED, what to say about it)."""
        raise DeployError("component %s is a job, which the %s target cannot run yet" % (spec.name, self.kind))

    def ready(self, spec: ComponentSpec) -> Tuple[bool, str]:
        """Healthy now (a service) or completed successfully (a job): what a dependent waits for."""
        if spec.is_job:
            state, detail = self.job_state(spec)
            return state == JOB_SUCCEEDED, detail
        return self.probe(spec)

    def prune(self, keep: Set[str]) -> List[str]:
        """After a deploy: remove what the host keeps for releases it no longer keeps (``keep``: the image
        manifest digests of the kept releases); returns what was removed. The default keeps everything."""
        return []

    @abc.abstractmethod
    def volume_dirs(self, spec: ComponentSpec) -> Dict[str, str]:
        """Volume name -> the host directory holding its data (for snapshots)."""

    @abc.abstractmethod
    def uninstall(self, *, keep_data: bool) -> List[str]:
        """Remove every component of the app from this host; returns what was removed."""

    def logs(self, name: str, lines: int = 30) -> str:
        """The component's recent output, for error messages (may be empty)."""
        return ""


# -- probes shared by the host-level runtimes ---------------------------------------------------------


def tcp_probe(address: str, port: int, timeout: float) -> Tuple[bool, str]:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True, ""
    except OSError as exc:
        return False, "TCP %s:%d: %s" % (address, port, exc.strerror or exc)


def http_probe(address: str, port: int, path: str, timeout: float) -> Tuple[bool, str]:
    """GET with a plain socket (no proxies from the environment); healthy on a 2xx/3xx status line."""
    request = ("GET %s HTTP/1.0\r\nHost: %s:%d\r\nUser-Agent: offline-delivery-health\r\n\r\n"
               % (path, address, port)).encode("ascii")
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(request)
            head = sock.recv(256).split(b"\r\n", 1)[0].decode("latin-1")
    except OSError as exc:
        return False, "HTTP GET http://%s:%d%s: %s" % (address, port, path, exc.strerror or exc)
    parts = head.split()
    if len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400:
        return True, ""
    return False, "HTTP GET http://%s:%d%s answered %r" % (address, port, path, head or "nothing")


def listening_tcp_ports(proc: str = "/proc/net") -> set:
    """Ports something listens on (any address), from the kernel's socket tables."""
    ports = set()
    for name in ("tcp", "tcp6"):
        try:
            with open("%s/%s" % (proc, name)) as fh:
                next(fh, None)
                for line in fh:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except FileNotFoundError:
            continue
    return ports


def health_budget(health: Optional[Mapping[str, Any]], cap: float, scale: float = 1.0) -> float:
    """Seconds to wait for a component to become healthy: its start period plus every retry, times ``scale`` (a
    host slower than the one the vendor's timings were made for), at most ``cap``."""
    if not health:
        return min(10.0 * scale, cap)
    budget = health["start_period"] + health["retries"] * (health["interval"] + health["timeout"])
    return float(min(max(budget, 5) * scale, cap))


def wait_healthy(runtime: Runtime, spec: ComponentSpec, *, cap: float,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep
                 ) -> Tuple[bool, str]:
    """Probe until healthy or the budget (``health_budget`` at the runtime's ``health_scale``) is spent;
    returns the last reason when it never became healthy. A job is waited for until it exits (at most
    ``cap``): a failed run ends the wait at once."""
    if spec.is_job:
        return _wait_job(runtime, spec, cap=cap, clock=clock, sleep=sleep)
    deadline = clock() + health_budget(spec.health, cap, runtime.health_scale)
    step = min(2.0, float((spec.health or {}).get("interval", 1)) or 1.0)
    reason = "not probed"
    while True:
        ok, reason = runtime.probe(spec)
        if ok:
            return True, ""
        if clock() + step > deadline:
            return False, reason
        sleep(step)


def _wait_job(runtime: Runtime, spec: ComponentSpec, *, cap: float, clock: Callable[[], float],
              sleep: Callable[[float], None]) -> Tuple[bool, str]:
    deadline = clock() + cap
    while True:
        state, detail = runtime.job_state(spec)
        if state == JOB_SUCCEEDED:
            return True, ""
        if state == JOB_FAILED:
            return False, "the job failed: %s" % detail
        if clock() + 1.0 > deadline:
            return False, "the job did not finish within %ds (%s)" % (cap, detail)
        sleep(1.0)
