# Copyright: offline.delivery contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The compose target: an app as a Docker Compose project, one service per component.

The project lives in ``<apps_dir>/<app>/compose.yaml`` (project name ``od-<app>``), so on-site staff can run
``docker compose ps`` / ``logs`` there. The file holds no secret: each service reads its env from
``<state_dir>/apps/<app>/env/<component>.env`` (0600) and its config files are bind-mounted read-only from
``<state_dir>/apps/<app>/config/<component>/`` (0700 directory). Each container carries the component's
fingerprint as a label (keyed with the host's fingerprint key: a label anyone with docker access reads
reveals nothing of the env it covers); the engine starts only the services whose fingerprint changed, one level
at a time, with ``--no-deps`` so nothing else is recreated. Health is the model's probe run from the host against the
container's address on the project network (no probe tool is needed in the image). Standard library only.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import shutil
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from ..app.model import capabilities_of, parse_memory
from ..app.runtime import (JOB_FAILED, JOB_RUNNING, JOB_SUCCEEDED, ComponentSpec, DeployError, Observed, Runtime,
                           http_probe, tcp_probe)
from ..app.state import app_dir
from ..common.files import ensure_private_dir, write_if_changed, write_private

LABEL_FINGERPRINT = "io.offline-delivery.fingerprint"
LABEL_APP = "io.offline-delivery.app"
LABEL_KIND = "io.offline-delivery.kind"   # set on jobs only
# Image pulls run side by side, at most this many at once. Each `docker pull` already fetches up to 3 layers
# of its image at a time (dockerd's max-concurrent-downloads), so 4 pulls keep up to 12 layer downloads going
# from the site registry on the LAN: enough to overlap one image's manifest round trips and unpacking with the
# others' downloads, few enough not to thrash one disk or the registry when a host runs 30 components.
PULL_WORKERS = 4
# How a dependent waits for a dependency when someone runs `docker compose up` by hand (the engine orders and
# gates the start itself).
COMPOSE_CONDITIONS = {"started": "service_started", "healthy": "service_started",
                      "completed": "service_completed_successfully"}


def env_file_text(env: Dict[str, str], component: str = "") -> str:
    """An env file as Compose reads it: every value single-quoted, which Compose takes literally (unquoted it
    would expand ``$``, drop `` #...`` and strip quotes and spaces).

    Compose's parser has no escape inside single quotes (a ``\\'`` keeps its backslash, edge quotes are
    trimmed), so a value holding ``'`` — or ending in a backslash — cannot pass unaltered: it is refused,
    naming the variable. The model refuses newlines in resolved values, so a line can never be split."""
    bad = sorted(k for k, v in env.items() if "'" in v or v.endswith("\\"))
    if bad:
        raise DeployError("component %s: the value of %s holds a single quote or ends in a backslash, which a "
                          "Compose env file cannot carry unaltered; change the value (site override) or run the "
                          "component on a systemd host" % (component or "?", ", ".join(bad)))
    return "".join("%s='%s'\n" % (key, env[key]) for key in sorted(env))


def compose_literal(text: str) -> str:
    """A string Compose must not interpolate: ``$`` doubled (compose.yaml interpolation)."""
    return text.replace("$", "$$")


class ComposeRuntime(Runtime):
    kind = "compose"

    def __init__(self, app: str, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.project = "od-%s" % app
        self.project_dir = os.path.join(self.apps_dir, app)
        self.compose_file = os.path.join(self.project_dir, "compose.yaml")
        self.private_dir = app_dir(self.state_dir, app)

    def local_address(self, component: str) -> str:
        return component  # the service name on the project network

    # -- docker ------------------------------------------------------------------------------------------

    def _docker(self, args: List[str], what: str) -> str:
        rc, out, err = self.run(["docker"] + args)
        if rc != 0:
            raise DeployError("%s: docker %s failed (rc %d): %s" % (what, " ".join(args[:3]), rc,
                                                                    (err or out).strip()[-2000:]))
        return out

    def _compose(self, args: List[str], what: str) -> str:
        return self._docker(["compose", "-p", self.project, "-f", self.compose_file,
                             "--project-directory", self.project_dir] + args, what)

    def _containers(self) -> List[Dict[str, Any]]:
        ids = self._docker(["ps", "-aq", "--no-trunc", "--filter", "label=%s=%s" % (LABEL_APP, self.app)],
                           "listing the containers of %s" % self.app).split()
        if not ids:
            return []
        return json.loads(self._docker(["inspect"] + ids, "inspecting the containers of %s" % self.app))

    # -- Runtime -----------------------------------------------------------------------------------------

    def observe(self) -> Dict[str, Observed]:
        seen: Dict[str, Observed] = {}
        for info in self._containers():
            labels = info["Config"].get("Labels") or {}
            name = labels.get("com.docker.compose.service")
            if not name:
                continue
            state = info["State"]
            done = labels.get(LABEL_KIND) == "job" and _job_state(state)[0] == JOB_SUCCEEDED
            item = Observed(fingerprint=labels.get(LABEL_FINGERPRINT), running=bool(state.get("Running")) or done,
                            started_at=state.get("StartedAt"), detail=state.get("Status", ""))
            # Replicas: the component runs only if every container does, and all carry one fingerprint.
            if name in seen:
                prev = seen[name]
                item.running = item.running and prev.running
                if prev.fingerprint != item.fingerprint:
                    item.fingerprint = None
                item.started_at = min(filter(None, [prev.started_at, item.started_at]), default=None)
            seen[name] = item
        return seen

    def prepare(self, specs: Sequence[ComponentSpec]) -> None:
        """Pull the images the host lacks, up to PULL_WORKERS at a time (one pull per image, however many
        components run it). Every pull is waited for; failures are reported together, in the order of
        ``specs`` (the engine's plan order), each naming its components and image. Nothing is started here."""
        users: Dict[str, List[ComponentSpec]] = {}
        for spec in specs:
            users.setdefault(spec.image, []).append(spec)
        if not users:
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(PULL_WORKERS, len(users)),
                                                   thread_name_prefix="pull") as pool:
            problems = list(pool.map(self._fetch_image, users))   # map keeps the order of ``users``
        failed = ["%s (%s, %s): %s" % (", ".join(s.name for s in users[image]),
                                       ", ".join(sorted({s.reference for s in users[image]})), image, problem)
                  for image, problem in zip(users, problems) if problem]
        if failed:
            raise DeployError("pulling from the site registry failed for %d of %d images: %s"
                              % (len(failed), len(users), "; ".join(failed)))

    def _fetch_image(self, image: str) -> str:
        """Pull ``image`` unless the engine has it: what went wrong, or "" (one worker of ``prepare``)."""
        rc, dummy, dummy2 = self.run(["docker", "image", "inspect", "--format", "{{.Id}}", image])
        if rc == 0:
            return ""
        rc, out, err = self.run(["docker", "pull", "--quiet", image])
        return "docker pull exited %d: %s" % (rc, (err or out).strip()[-2000:]) if rc != 0 else ""

    def start(self, specs: Sequence[ComponentSpec], *, all_specs: Sequence[ComponentSpec]) -> None:
        self._write_project(all_specs)
        names = [s.name for s in specs]
        self._compose(["up", "--detach", "--no-deps", "--force-recreate", "--no-build", "--pull", "never"] + names,
                      "starting %s" % ", ".join(names))

    def remove(self, names: Sequence[str], *, all_specs: Sequence[ComponentSpec]) -> None:
        doomed = [c["Id"] for c in self._containers()
                  if (c["Config"].get("Labels") or {}).get("com.docker.compose.service") in names]
        if doomed:
            self._docker(["rm", "--force", "--volumes=false"] + doomed, "removing %s" % ", ".join(names))
        for name in names:
            for sub in ("config", "env"):
                path = os.path.join(self.private_dir, sub, name + (".env" if sub == "env" else ""))
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.unlink(path)
        self._write_project(all_specs)

    def _service_containers(self, name: str) -> List[Dict[str, Any]]:
        return [c for c in self._containers() if (c["Config"].get("Labels") or {}).get("com.docker.compose.service")
                == name]

    def job_state(self, spec: ComponentSpec) -> Tuple[str, str]:
        containers = self._service_containers(spec.name)
        if not containers:
            return JOB_FAILED, "no container"
        return _job_state(containers[0]["State"])

    def probe(self, spec: ComponentSpec) -> Tuple[bool, str]:
        if spec.is_job:
            return self.ready(spec)
        containers = self._service_containers(spec.name)
        if not containers:
            return False, "no container"
        for info in containers:
            if not info["State"].get("Running"):
                return False, "container %s is %s (exit code %s)" % (info["Name"].lstrip("/"),
                                                                     info["State"].get("Status"),
                                                                     info["State"].get("ExitCode"))
            health = spec.health
            if not health:
                continue
            timeout = self.check_timeout(spec)
            if "exec" in health:
                rc, out, err = self.run(["timeout", str(math.ceil(timeout) + 1), "docker", "exec", info["Id"]]
                                        + list(health["exec"]))
                ok, reason = rc == 0, ("%s did not finish within %.0fs" % (health["exec"][0], timeout) if rc == 124
                                       else "%s exited %d: %s" % (health["exec"][0], rc, (err or out).strip()[-300:]))
            else:
                address = self._address(info)
                if not address:
                    return False, "container %s has no address on the project network" % info["Name"].lstrip("/")
                if "http" in health:
                    ok, reason = http_probe(address, health["http"]["port"], health["http"]["path"], timeout)
                else:
                    ok, reason = tcp_probe(address, health["tcp"]["port"], timeout)
            if not ok:
                return False, reason
        return True, ""

    @staticmethod
    def _address(info: Dict[str, Any]) -> str:
        for net in sorted((info.get("NetworkSettings") or {}).get("Networks", {}).values(),
                          key=lambda n: n.get("IPAddress") or ""):
            if net.get("IPAddress"):
                return net["IPAddress"]
        return ""

    def volume_dirs(self, spec: ComponentSpec) -> Dict[str, str]:
        dirs = {}
        for vol in spec.volumes:
            out = self._docker(["volume", "inspect", "--format", "{{.Mountpoint}}", self._volume(vol["name"])],
                               "finding the data of volume %s" % vol["name"])
            dirs[vol["name"]] = out.strip()
        return dirs

    def uninstall(self, *, keep_data: bool) -> List[str]:
        removed = sorted(self.observe())
        if os.path.exists(self.compose_file):
            self._compose(["down", "--remove-orphans"] + ([] if keep_data else ["--volumes"]),
                          "removing %s" % self.app)
        elif removed:
            self.remove(removed, all_specs=[])
        for sub in ("config", "env"):
            shutil.rmtree(os.path.join(self.private_dir, sub), ignore_errors=True)
        if os.path.isdir(self.project_dir):
            shutil.rmtree(self.project_dir)
        return removed

    def logs(self, name: str, lines: int = 30) -> str:
        ids = [c["Id"] for c in self._service_containers(name)]
        if not ids:
            return ""
        rc, out, err = self.run(["docker", "logs", "--tail", str(lines), ids[0]])
        return (out + err).strip()[-3000:]

    # -- the project files -------------------------------------------------------------------------------

    def _volume(self, name: str) -> str:
        return "%s_%s" % (self.project, name)

    def _write_project(self, specs: Sequence[ComponentSpec]) -> None:
        os.makedirs(self.project_dir, mode=0o755, exist_ok=True)
        ensure_private_dir(self.private_dir)
        services = {}
        volumes = {}
        for spec in specs:
            services[spec.name] = self._service(spec)
            for vol in spec.volumes:
                volumes[vol["name"]] = {"name": self._volume(vol["name"])}
        project = {"name": self.project, "services": services}
        if volumes:
            project["volumes"] = volumes
        text = ("# Written by offline.delivery from the app model; changes here are overwritten by the next "
                "deploy.\n# JSON is YAML: docker compose reads it as is.\n"
                + json.dumps(project, indent=2, sort_keys=True) + "\n")
        write_if_changed(self.compose_file, text.encode("utf-8"))

    def _service(self, spec: ComponentSpec) -> Dict[str, Any]:
        env_path = os.path.join(self.private_dir, "env", spec.name + ".env")
        write_private(env_path, env_file_text(spec.env, spec.name).encode("utf-8"))
        service: Dict[str, Any] = {
            "image": spec.image,
            "env_file": [env_path],
            "restart": "unless-stopped",
            "labels": {LABEL_APP: spec.app, LABEL_FINGERPRINT: spec.fingerprint},
            "pull_policy": "never",
        }
        if spec.is_job:   # runs once to its end; the engine starts it again only when its fingerprint changes
            service["restart"] = "no"
            service["labels"][LABEL_KIND] = "job"
        if spec.entrypoint is not None:
            service["entrypoint"] = [compose_literal(a) for a in spec.entrypoint]
        if spec.command is not None:
            service["command"] = [compose_literal(a) for a in spec.command]
        if spec.user:
            service["user"] = spec.user
        # The same containment as every target: the model's capabilities only, no new privileges unless allowed.
        service["cap_drop"] = ["ALL"]
        service["cap_add"] = capabilities_of(spec.security)
        if not spec.security.get("privilege_escalation"):
            service["security_opt"] = ["no-new-privileges:true"]
        mounts = [{"type": "volume", "source": vol["name"], "target": vol["path"]} for vol in spec.volumes]
        for index, cfg in enumerate(spec.config_files):
            host_path = os.path.join(self.private_dir, "config", spec.name,
                                     "%d-%s" % (index, os.path.basename(cfg["path"])))
            write_config(host_path, cfg["content"].encode("utf-8"), int(cfg["mode"], 8))
            mounts.append({"type": "bind", "source": host_path, "target": cfg["path"], "read_only": True})
        if mounts:
            service["volumes"] = mounts
        published = [{"target": p["port"], "published": str(p["publish"]), "protocol": p["protocol"]}
                     for p in spec.ports if p.get("publish")]
        if published:
            service["ports"] = published
        if spec.local_deps:
            # The engine orders and health-gates the start itself; this keeps a manual `docker compose up` sane.
            service["depends_on"] = {d: {"condition": COMPOSE_CONDITIONS[spec.depends_on[d]["condition"]]}
                                     for d in spec.local_deps}
        limits = {}
        if spec.resources.get("cpus"):
            limits["cpus"] = spec.resources["cpus"]
        if spec.resources.get("memory"):
            limits["memory"] = str(parse_memory(spec.resources["memory"]))
        if limits or spec.replicas != 1:
            service["deploy"] = {"replicas": spec.replicas}
            if limits:
                service["deploy"]["resources"] = {"limits": limits}
        return service


def _job_state(state: Mapping[str, Any]) -> Tuple[str, str]:
    """A job container's docker state as a job state."""
    status = state.get("Status", "")
    if status in ("created", "running", "restarting"):
        return JOB_RUNNING, status
    if status == "exited" and state.get("ExitCode") == 0:
        return JOB_SUCCEEDED, "exited 0 at %s" % state.get("FinishedAt", "?")
    error = (": " + state["Error"]) if state.get("Error") else ""
    return JOB_FAILED, "container %s, exit code %s%s" % (status, state.get("ExitCode"), error)


def write_config(path: str, data: bytes, mode: int) -> bool:
    """A rendered config file: may hold secrets, so it lives in a 0700 directory; its own mode is the model's
    (the process in the container reads it as its own user)."""
    ensure_private_dir(os.path.dirname(path))
    return write_if_changed(path, data, mode)
