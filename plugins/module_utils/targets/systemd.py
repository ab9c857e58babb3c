# Copyright: offline.delivery contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The systemd target: each component is a systemd service over its image's unpacked root filesystem.

No container runtime on the host. Per component ``<c>`` of app ``<a>``:

- root filesystem ``<apps_dir>/<a>/roots/<c>/root``: a read-only overlay of the component's mount points
  layer (``roots/<c>/mounts``) over its image's layers from the host's layer store (targets/rootfs.py),
  mounted by a mount unit; nothing a component writes outside its volumes, /tmp and /run outlives its run;
- unit ``/etc/systemd/system/od-<a>-<c>.service`` with ``RootDirectory=`` that root (which makes systemd mount
  it first), ``MountAPIVFS=yes``,
  ``PrivateTmp=yes`` (a fresh /tmp per start, as a container has), the host's /etc/hosts and
  /etc/resolv.conf bind-mounted read-only, each config file rendered to ``<apps_dir>/<a>/config/<c>/<path>``
  and bind-mounted read-only, each volume ``<apps_dir>/<a>/volumes/<volume>`` bind-mounted read-write
  (seeded from the image on first use, as Docker does for a fresh named volume);
- environment ``<state_dir>/apps/<a>/env/<c>.env`` (0600 root; image Env, then the spec's env).

The spec's fingerprint is a comment line of the unit (``# offline-delivery fingerprint: hmac-sha256:...``,
keyed with the host's fingerprint key, so the 0644 unit reveals nothing of the env it covers): systemd
ignores it, ``observe`` reads it back. A unit file is written only by ``start``, which then restarts
that unit, so the fingerprint in the file is what runs once the unit is active.

Standard library only.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

from ..app.model import capabilities_of, parse_memory
from ..app.runtime import (JOB_FAILED, JOB_RUNNING, JOB_SUCCEEDED, LOCAL_ADDRESS, ComponentSpec, DeployError,
                           Observed, Runtime, http_probe, tcp_probe)
from ..clients.registry import RegistryClient, RegistryError
from ..common.files import file_bytes, remove, write_atomic
from ..common.names import CONTROL_RE
from ..common.oci import OciError, split_reference
from .rootfs import (ImageError, LayerStore, Rootfs, ensure_rootfs, image_layers, load_rootfs, make_mount_points,
                     overlay_options, read_in_root, resolve_in_root)

UNIT_DIR = "/etc/systemd/system"
UNIT_PREFIX = "od-"
MARK = "# offline-delivery"
FINGERPRINT_MARK = MARK + " fingerprint: "
APP_MARK = MARK + " app: "
COMPONENT_MARK = MARK + " component: "
INSTANCES_MARK = MARK + " instances: "
KIND_MARK = MARK + " kind: "
IMAGE_MARK = MARK + " image: "
ROOTS = "roots"                 # <app_dir>/roots/<component>/{mounts,root,mounts.json}
FORCE_MOUNT2 = "LIBMOUNT_FORCE_MOUNT2=always"   # see render_mount_unit
FORMAT_MARK = MARK + " unit format: "
# 2: the root is a read-only overlay (roots/<c>/root). A unit of an older format is restarted by the next deploy
# (observe reports no fingerprint for it), so no component keeps running from a writable root.
UNIT_FORMAT = "2"
SYSTEMCTL_TIMEOUT = 120         # a restart waits for the old process to stop (TimeoutStopSec below)
STOP_TIMEOUT = 30
START_SETTLE = 2.0              # seconds to see a unit that dies at once (bad ExecStart, missing binary)
SHOW_PROPERTIES = "ActiveState,SubState,ActiveEnterTimestamp,NeedDaemonReload,Result,ExecMainStatus,LoadState,MainPID"
NSENTER = "/usr/bin/nsenter"  # util-linux: on every Debian host
# What taking a component's root (ptrace access to its main process, chroot) and dropping to its user takes;
# nothing else reaches the probe.
PROBE_CAPABILITIES = ("CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SETUID", "CAP_SETGID")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_PLAIN_PATH = re.compile(r"^/[A-Za-z0-9._+@/-]*\Z")   # what a path in a unit may hold unquoted


class SystemdRuntime(Runtime):
    """Runs an app's components as systemd services. ``registry`` (host:port) defaults to the one in each
    spec's ``image``."""

    kind = "systemd"

    def __init__(self, app: str, *, apps_dir: str, state_dir: str,
                 run: Callable[[List[str]], Tuple[int, str, str]], registry: Optional[str] = None,
                 registry_ca: Optional[str] = None, unit_dir: str = UNIT_DIR, registry_timeout: float = 120.0,
                 log: Callable[[str], None] = lambda _msg: None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 health_scale: float = 1.0) -> None:
        super().__init__(app, apps_dir=apps_dir, state_dir=state_dir, run=run, health_scale=health_scale)
        self.registry = registry
        self.registry_ca = registry_ca  # the site CA (TLS): HTTPS verified against it; None: plain HTTP
        self.unit_dir = unit_dir
        self.registry_timeout = registry_timeout
        self.log = log
        self.sleep = sleep
        self.clock = clock
        self.store = LayerStore(apps_dir)

    # -- layout ---------------------------------------------------------------------------------------

    @property
    def app_dir(self) -> str:
        return os.path.join(self.apps_dir, self.app)

    @property
    def images_dir(self) -> str:
        return os.path.join(self.app_dir, "images")

    def unit_name(self, component: str, replicas: int = 1) -> str:
        """The unit file's name: ``od-<a>-<c>.service``, or the template ``od-<a>-<c>@.service`` of a component
        running several instances."""
        return f"{UNIT_PREFIX}{self.app}-{component}{'@' if replicas > 1 else ''}.service"

    def unit_path(self, component: str, replicas: int = 1) -> str:
        return os.path.join(self.unit_dir, self.unit_name(component, replicas))

    def units(self, component: str, replicas: int = 1) -> List[str]:
        """The units that run the component: one, or one instance per replica (``od-<a>-<c>@1.service``...)."""
        return instance_units(self.unit_name(component, replicas), replicas)

    def deployed_units(self, component: str) -> List[str]:
        """The units of the component as its unit file on this host says (empty when there is none)."""
        path = self._app_units().get(component)
        return file_units(path) if path else []

    def root_dir(self, component: str) -> str:
        """``roots/<c>``: the component's mount points layer, the mount point of its root, what they hold."""
        return os.path.join(self.app_dir, ROOTS, component)

    def env_path(self, component: str) -> str:
        return os.path.join(self.state_dir, "apps", self.app, "env", f"{component}.env")

    def config_dir(self, component: str) -> str:
        return os.path.join(self.app_dir, "config", component)

    def host_ports(self, spec: ComponentSpec) -> List[int]:
        """Every TCP port of the component: services share the host's network and listen on their own port
        (``publish`` is a compose mapping; nothing is mapped here)."""
        return sorted({int(p["port"]) for p in spec.ports if p.get("protocol", "tcp") == "tcp"})

    def volume_dirs(self, spec: ComponentSpec) -> Dict[str, str]:
        return {v["name"]: os.path.join(self.app_dir, "volumes", v["name"]) for v in spec.volumes}

    # -- observe --------------------------------------------------------------------------------------

    def observe(self) -> Dict[str, Observed]:
        found: Dict[str, Observed] = {}
        for component, path in self._app_units().items():
            marks = read_marks(path)
            running, details, started = True, [], []
            for unit in file_units(path, marks):
                props = self._show(unit)
                if marks.get("kind") == "job":
                    running = running and _job_state(props)[0] == JOB_SUCCEEDED
                else:
                    running = running and props.get("ActiveState") == "active"
                detail = "%s/%s" % (props.get("ActiveState", "?"), props.get("SubState", "?"))
                if props.get("NeedDaemonReload") == "yes":
                    detail += "; the unit file changed since systemd loaded it"
                details.append(detail)
                started.append(iso_time(props.get("ActiveEnterTimestamp", "")))
            current = marks.get("unit format") == UNIT_FORMAT
            found[component] = Observed(fingerprint=marks.get("fingerprint") if current else None, running=running,
                                        started_at=min(filter(None, started), default=None),
                                        detail=", ".join(details))
        return found

    def _app_units(self) -> Dict[str, str]:
        """Component -> unit file of this app (by the marks in the file, not just the name)."""
        prefix = f"{UNIT_PREFIX}{self.app}-"
        units: Dict[str, str] = {}
        try:
            names = sorted(os.listdir(self.unit_dir))
        except FileNotFoundError:
            return units
        for name in names:
            if not (name.startswith(prefix) and name.endswith(".service")):
                continue
            path = os.path.join(self.unit_dir, name)
            marks = read_marks(path)
            if marks.get("app") == self.app and marks.get("component"):
                units[marks["component"]] = path
        return units

    def _show(self, unit: str) -> Dict[str, str]:
        command = ["systemctl", "show", unit, "--timestamp=unix", "--property", SHOW_PROPERTIES]
        rc, out, err = self.run(command)
        if rc != 0 and "timestamp" in err:   # systemd older than 251: local time as text
            rc, out, err = self.run(command[:3] + command[4:])
        if rc != 0:
            raise DeployError(f"systemctl show {unit} failed (rc {rc}): {err.strip() or out.strip()}; is systemd "
                              "running on this host?")
        props: Dict[str, str] = {}
        for line in out.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                props[key] = value
        return props

    # -- prepare --------------------------------------------------------------------------------------

    def check(self, specs: Sequence[ComponentSpec]) -> None:
        for spec in specs:
            self._check_spec(spec)

    def prepare(self, specs: Sequence[ComponentSpec]) -> None:
        self.check(specs)
        done: Dict[str, Rootfs] = {}
        for spec in specs:
            if spec.manifest_digest not in done:
                done[spec.manifest_digest] = self.rootfs(spec)

    def _check_spec(self, spec: ComponentSpec) -> None:
        if spec.replicas != 1 and spec.ports:
            raise DeployError(f"component {spec.name}: replicas {spec.replicas}: on a systemd host every instance "
                              f"would listen on the same host port ({', '.join(str(p['port']) for p in spec.ports)}); "
                              "components with ports run one instance per host: set replicas: 1 and place it on "
                              "more hosts")
        if spec.replicas != 1 and spec.volumes:
            raise DeployError(f"component {spec.name}: replicas {spec.replicas}: its instances would share the "
                              "directory of volume " + ", ".join(v["name"] for v in spec.volumes) + " on this host; "
                              "a component with volumes runs one instance per host")
        for volume in spec.volumes:
            unit_path(volume["path"], f"component {spec.name}: volume {volume['name']} path")
        for item in spec.config_files:
            unit_path(item["path"], f"component {spec.name}: config file path")

    def rootfs(self, spec: ComponentSpec) -> Rootfs:
        """The component's unpacked image (fetched from the site registry the first time)."""
        existing = load_rootfs(self.images_dir, self.store, spec.manifest_digest)
        if existing is not None:
            return existing
        registry = self.registry or spec.image.split("/", 1)[0]
        try:
            repository = split_reference(spec.reference)[0]
            with RegistryClient(registry, insecure=not self.registry_ca, ca_file=self.registry_ca,
                                timeout=self.registry_timeout) as client:
                os.makedirs(self.app_dir, mode=0o750, exist_ok=True)
                started = time.monotonic()
                rootfs = ensure_rootfs(client, repository, spec.manifest_digest, self.images_dir, self.store,
                                       log=self.log)
                self.log(f"component {spec.name}: unpacked {spec.reference} ({spec.platform}) in "
                         f"{time.monotonic() - started:.1f}s")
                return rootfs
        except (ImageError, OciError, RegistryError) as exc:
            raise DeployError(f"component {spec.name}: image {spec.reference} ({spec.platform}, "
                              f"{spec.manifest_digest}): {exc}") from None
        except OSError as exc:
            raise DeployError(f"component {spec.name}: unpacking {spec.reference} into {self.images_dir} failed: "
                              f"{exc}; check free disk space there") from None

    # -- start ----------------------------------------------------------------------------------------

    def start(self, specs: Sequence[ComponentSpec], *, all_specs: Sequence[ComponentSpec]) -> None:
        for spec in specs:
            self._check_spec(spec)
            self._check_owner(spec.name, spec.replicas)
        replicas = {s.name: s.replicas for s in all_specs}
        jobs = {s.name for s in all_specs if s.is_job}
        for spec in specs:
            self._retire(spec)
            self.write_component(spec, dep_units=lambda d: self.units(d, replicas.get(d, 1)), jobs=jobs)
        self._systemctl(["daemon-reload"], "reload the unit files")
        services = [s for s in specs if not s.is_job]
        units = [u for s in services for u in self.units(s.name, s.replicas)]
        if units:
            self._systemctl(["enable", "--quiet", *units], "enable " + ", ".join(units))
        for spec in specs:
            if spec.is_job:
                self._run_job(spec)
            else:
                self._systemctl(["restart", *self.units(spec.name, spec.replicas)], f"start component {spec.name}",
                                component=spec.name)
        if services:
            self.sleep(START_SETTLE)
        for spec in services:
            for unit in self.units(spec.name, spec.replicas):
                props = self._show(unit)
                if props.get("ActiveState") not in ("active", "activating", "reloading"):
                    raise DeployError(
                        f"component {spec.name}: unit {unit} is {props.get('ActiveState')}/{props.get('SubState')} "
                        f"(result {props.get('Result')}, exit status {props.get('ExecMainStatus')}) right after the "
                        f"start; see journalctl -u {unit}. Last lines:\n{self.logs(spec.name, 15)}")

    def _run_job(self, spec: ComponentSpec) -> None:
        """Run a job to its end (a oneshot's start returns when it exits). Its outcome is read by ``job_state``:
        a failed run is the engine's to report and roll back; one still running after the systemctl time limit
        goes on, and the engine waits for it."""
        unit = self.unit_name(spec.name)
        rc, out, err = self.run(["timeout", "-k", "5", str(SYSTEMCTL_TIMEOUT), "systemctl", "restart", unit])
        if rc not in (0, 124) and self._show(unit).get("LoadState") != "loaded":
            raise DeployError(f"component {spec.name}: systemctl restart {unit} failed: {err.strip() or out.strip()}")

    def _retire(self, spec: ComponentSpec) -> None:
        """Stop the units of the component that the new spec does not keep: instances beyond its replicas, or
        the single unit it replaces with a template (and the other way round)."""
        keep = set(self.units(spec.name, spec.replicas))
        old_path = self._app_units().get(spec.name)
        doomed = [u for u in (file_units(old_path) if old_path else []) if u not in keep]
        if doomed:
            self._systemctl(["disable", "--quiet", "--now", *doomed], f"stop {', '.join(doomed)}",
                            component=spec.name)
            self.run(["systemctl", "reset-failed", *doomed])
        if old_path and old_path != self.unit_path(spec.name, spec.replicas):
            os.unlink(old_path)

    def _check_owner(self, component: str, replicas: int) -> None:
        """Refuse to overwrite a unit of the same name that another app wrote (od-<a>-<b-c> = od-<a-b>-<c>)."""
        path = self.unit_path(component, replicas)
        if not os.path.exists(path):
            return
        marks = read_marks(path)
        if marks.get("app") != self.app or marks.get("component") != component:
            raise DeployError(f"component {component}: {path} exists and belongs to app {marks.get('app')!r} "
                              f"component {marks.get('component')!r}; rename the app or component so the unit "
                              "names differ, or remove that unit")

    def write_component(self, spec: ComponentSpec, *, dep_units: Callable[[str], List[str]],
                        jobs: Set[str]) -> None:
        """Every file the unit needs: config files, volumes, the component's root, env file, then the unit
        itself. ``dep_units`` names the units of a dependency, ``jobs`` the components that are jobs."""
        rootfs = self.rootfs(spec)
        configs = self._write_configs(spec)
        with self._image_view(spec, rootfs) as view:
            volumes = self._ensure_volumes(spec, view)
            root = self._mount_root(spec, rootfs, view)
            after = [u for d in spec.local_deps for u in dep_units(d)]
            wants = [u for d in spec.local_deps if d not in jobs for u in dep_units(d)]
            text = render_unit(spec, rootfs.config, root=root, view=view, app=self.app,
                               env_file=self.env_path(spec.name), configs=configs, volumes=volumes, after=after,
                               wants=wants)
        self._write_env(spec, rootfs)
        write_atomic(self.unit_path(spec.name, spec.replicas), text.encode("utf-8"), 0o644)

    @contextmanager
    def _image_view(self, spec: ComponentSpec, rootfs: Rootfs) -> Iterator[str]:
        """The image mounted read-only for a moment, to read it as the service will (users, programs, volume
        seeds, mount points); an empty bottom layer, because overlayfs wants two lower directories."""
        os.makedirs(self.app_dir, mode=0o750, exist_ok=True)
        base = tempfile.mkdtemp(prefix=".view-", dir=self.app_dir)
        view, empty = os.path.join(base, "root"), os.path.join(base, "empty")
        os.mkdir(view)
        os.mkdir(empty)
        try:
            rc, out, err = self.run(["env", FORCE_MOUNT2, "mount", "-t", "overlay", "overlay", "-o",
                                     overlay_options(rootfs.lowerdirs + [empty]), view])
            if rc != 0:
                raise DeployError(f"component {spec.name}: mounting image {spec.reference} ({spec.manifest_digest}) "
                                  f"read-only failed: {err.strip() or out.strip()}; does the kernel have overlayfs?")
            try:
                yield view
            finally:
                self.run(["umount", "--lazy", view])   # lazy: a busy view is never left mounted below base
        finally:
            shutil.rmtree(base, ignore_errors=True)

    def _mount_root(self, spec: ComponentSpec, rootfs: Rootfs, view: str) -> str:
        """The component's root: the mount unit of a read-only overlay of its mount points layer over the
        image's layers. The start's one daemon-reload loads it and the unit's restart mounts it (RootDirectory=
        requires it). When the image or the mount points change, the component's units (restarted by this start
        anyway) and the old mount stop first."""
        base = self.root_dir(spec.name)
        root, mounts = os.path.join(base, "root"), os.path.join(base, "mounts")
        os.makedirs(root, mode=0o755, exist_ok=True)
        new = mounts + f".new-{os.getpid()}"
        shutil.rmtree(new, ignore_errors=True)
        try:
            entries = make_mount_points(new, view, [v["path"] for v in spec.volumes],
                                        [f["path"] for f in spec.config_files])
        except ImageError as exc:
            shutil.rmtree(new, ignore_errors=True)
            raise DeployError(f"component {spec.name}: {exc}") from None
        name = mount_unit_name(unit_path(root, "component root"))
        text = render_mount_unit(root, [mounts] + rootfs.lowerdirs, app=self.app, component=spec.name,
                                 image=spec.manifest_digest)
        meta = json.dumps({"image": spec.manifest_digest, "entries": entries}, indent=1, sort_keys=True)
        unit_file = os.path.join(self.unit_dir, name)
        same = (file_bytes(os.path.join(base, "mounts.json")) == meta.encode("utf-8")
                and file_bytes(unit_file) == text.encode("utf-8") and os.path.isdir(mounts))
        if same:
            shutil.rmtree(new)
        else:
            running = self.deployed_units(spec.name)
            if running:
                self._systemctl(["stop", *running], f"stop component {spec.name} to change its root",
                                component=spec.name)
            if os.path.exists(unit_file):
                self._systemctl(["stop", name], f"unmount the root of component {spec.name}")
            shutil.rmtree(mounts, ignore_errors=True)
            os.rename(new, mounts)
            write_atomic(os.path.join(base, "mounts.json"), meta.encode("utf-8"), 0o644)
            write_atomic(unit_file, text.encode("utf-8"), 0o644)
        return root

    def _write_configs(self, spec: ComponentSpec) -> List[Tuple[str, str]]:
        """Rendered config files (host path, path in the root). The directory is root-only: files may hold
        secrets; the service sees them through the bind mount with the model's mode."""
        base = self.config_dir(spec.name)
        if os.path.isdir(base):
            shutil.rmtree(base)  # files the model no longer lists must go
        os.makedirs(base, mode=0o700)
        os.chmod(base, 0o700)
        mounts = []
        for item in spec.config_files:
            rel = item["path"].lstrip("/")
            host = os.path.join(base, rel)
            os.makedirs(os.path.dirname(host), mode=0o700, exist_ok=True)
            write_atomic(host, item["content"].encode("utf-8"), int(item["mode"], 8))
            mounts.append((host, item["path"]))
        return mounts

    def _ensure_volumes(self, spec: ComponentSpec, view: str) -> List[Tuple[str, str]]:
        mounts = []
        dirs = self.volume_dirs(spec)
        for volume in spec.volumes:
            host = dirs[volume["name"]]
            if not os.path.isdir(host):
                self._seed_volume(spec, volume, host, view)
            mounts.append((host, volume["path"]))
        return mounts

    def _seed_volume(self, spec: ComponentSpec, volume: Mapping[str, str], host: str, view: str) -> None:
        """A fresh volume gets the image's content at its path, owners and modes kept (as Docker does);
        built beside and renamed, so a half-copied volume is never used."""
        parent = os.path.dirname(host)
        os.makedirs(parent, mode=0o750, exist_ok=True)
        seed = host + ".seeding"
        shutil.rmtree(seed, ignore_errors=True)
        try:
            source = resolve_in_root(view, volume["path"])
        except ImageError:
            source = ""
        if source:
            rc, out, err = self.run(["cp", "-a", "--", source, seed])
            if rc != 0:
                shutil.rmtree(seed, ignore_errors=True)
                raise DeployError(f"component {spec.name}: seeding volume {volume['name']} from the image's "
                                  f"{volume['path']} into {seed} failed: {err.strip() or out.strip()}")
        else:
            os.mkdir(seed, 0o755)
        os.rename(seed, host)

    def _write_env(self, spec: ComponentSpec, rootfs: Rootfs) -> None:
        env: Dict[str, str] = {}
        for item in rootfs.config.get("Env") or []:
            key, sep, value = str(item).partition("=")
            if sep:
                env[key] = value
        env.setdefault("PATH", DEFAULT_PATH)
        env.update(spec.env)
        path = self.env_path(spec.name)
        for directory in (os.path.join(self.state_dir, "apps"), os.path.join(self.state_dir, "apps", self.app),
                          os.path.dirname(path)):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
        try:
            text = render_env_file(env)
        except ValueError as exc:
            raise DeployError(f"component {spec.name}: {exc}") from None
        write_atomic(path, text.encode("utf-8"), 0o600)

    # -- remove / uninstall ---------------------------------------------------------------------------

    def remove(self, names: Sequence[str], *, all_specs: Sequence[ComponentSpec]) -> None:
        units = self._app_units()
        instances = {n: file_units(units[n]) for n in names if n in units}
        present = stop_order(sorted(instances), units, instances.__getitem__)
        for name in present:
            self._systemctl(["disable", "--quiet", "--now", *instances[name]], f"stop component {name}",
                            component=name)
        stopped = [u for n in present for u in instances[n]]
        for name in present:
            os.unlink(units[name])
            remove(self.env_path(name))
            shutil.rmtree(self.config_dir(name), ignore_errors=True)
        self._remove_roots(present)
        if present:
            self._systemctl(["daemon-reload"], "reload the unit files")
            self.run(["systemctl", "reset-failed", *stopped])

    def _remove_roots(self, names: Sequence[str]) -> None:
        """Unmount the roots of these (stopped) components and delete their mount units and directories."""
        units = {n: mount_unit_name(os.path.join(self.root_dir(n), "root")) for n in names}
        mounted = [u for u in units.values() if os.path.exists(os.path.join(self.unit_dir, u))]
        if mounted:
            self._systemctl(["stop", *mounted], "unmount " + ", ".join(mounted))
        for name, unit in units.items():
            remove(os.path.join(self.unit_dir, unit))
            shutil.rmtree(self.root_dir(name), ignore_errors=True)

    def prune(self, keep: Set[str]) -> List[str]:
        """Remove the app's images that no component runs from and no kept release (``keep``: manifest
        digests) uses, then the layers no image of any app on the host lists."""
        try:
            return self._prune(keep)
        except (ImageError, OSError) as exc:
            raise DeployError(f"pruning {self.images_dir} and the layer store {self.store.root}: {exc}") from None

    def _prune(self, keep: Set[str]) -> List[str]:
        legacy_roots = {unit_settings(path).get("RootDirectory", "") for path in self._app_units().values()}
        running = set()
        roots = os.path.join(self.app_dir, ROOTS)
        for name in os.listdir(roots) if os.path.isdir(roots) else []:
            try:
                running.add(json.loads(file_bytes(os.path.join(roots, name, "mounts.json")) or b"")["image"])
            except (ValueError, KeyError, TypeError):
                continue
        doomed = []
        for name in sorted(os.listdir(self.images_dir)) if os.path.isdir(self.images_dir) else []:
            directory = os.path.join(self.images_dir, name)
            legacy = os.path.join(directory, "rootfs")    # the one-tree layout before the layer store
            if os.path.isdir(legacy) and legacy not in legacy_roots:
                shutil.rmtree(legacy)
            if f"sha256:{name}" not in keep | running and legacy not in legacy_roots:
                shutil.rmtree(directory)
                doomed.append(directory)
        return doomed + self._prune_layers()

    def _prune_layers(self) -> List[str]:
        """Layers of the host's store that no image directory of any app lists."""
        if not os.path.isdir(self.store.root):
            return []
        with self.store.locked():
            used: Set[str] = set()
            for app in os.listdir(self.apps_dir):
                images = os.path.join(self.apps_dir, app, "images")
                for name in os.listdir(images) if not app.startswith(".") and os.path.isdir(images) else []:
                    used.update(image_layers(os.path.join(images, name)))
            return self.store.prune(used)

    def uninstall(self, *, keep_data: bool) -> List[str]:
        units = self._app_units()
        removed = [os.path.basename(units[n]) for n in sorted(units)]
        self.remove(sorted(units), all_specs=[])
        roots = os.path.join(self.app_dir, ROOTS)
        if os.path.isdir(roots):
            self._remove_roots(sorted(os.listdir(roots)))
            shutil.rmtree(roots)
        if os.path.isdir(self.images_dir):
            shutil.rmtree(self.images_dir)
            removed.append(self.images_dir)
        removed += self._prune_layers()
        for path in (os.path.join(self.app_dir, "config"), os.path.join(self.state_dir, "apps", self.app, "env")):
            if os.path.exists(path):
                shutil.rmtree(path)
                removed.append(path)
        volumes = os.path.join(self.app_dir, "volumes")
        if not keep_data and os.path.exists(volumes):
            shutil.rmtree(volumes)
            removed.append(volumes)
        if os.path.isdir(self.app_dir) and not os.listdir(self.app_dir):
            os.rmdir(self.app_dir)
            removed.append(self.app_dir)
        return removed

    # -- probe / logs ---------------------------------------------------------------------------------

    def job_state(self, spec: ComponentSpec) -> Tuple[str, str]:
        unit = self.unit_name(spec.name)
        state, detail = _job_state(self._show(unit))
        return state, f"unit {unit}: {detail}" + ("; see journalctl -u " + unit if state == JOB_FAILED else "")

    def probe(self, spec: ComponentSpec) -> Tuple[bool, str]:
        if spec.is_job:
            return self.ready(spec)
        for unit in self.units(spec.name, spec.replicas):
            ok, reason = self._probe_unit(spec, unit)
            if not ok:
                return False, reason
        return True, ""

    def _probe_unit(self, spec: ComponentSpec, unit: str) -> Tuple[bool, str]:
        props = self._show(unit)
        if props.get("ActiveState") != "active":
            return False, (f"unit {unit} is {props.get('ActiveState')}/{props.get('SubState')} (result "
                           f"{props.get('Result')}); see journalctl -u {unit}")
        health = spec.health
        if not health:
            return True, ""
        timeout = self.check_timeout(spec)
        if "http" in health:
            return http_probe(LOCAL_ADDRESS, int(health["http"]["port"]), health["http"].get("path", "/"), timeout)
        if "tcp" in health:
            return tcp_probe(LOCAL_ADDRESS, int(health["tcp"]["port"]), timeout)
        return self._exec_probe(spec, list(health["exec"]), timeout, props.get("MainPID", ""), unit)

    def _exec_probe(self, spec: ComponentSpec, argv: List[str], timeout: float, main_pid: str,
                    unit: str) -> Tuple[bool, str]:
        """The health command in the running component's own view of the file system: its root with its /run
        and private /tmp (a unix socket or pid file there is what checks like ``pg_isready`` look at) and its
        read-only system, as its user, with its environment file, bounded in time. ``nsenter --root`` takes the
        main process's root (``/proc/<pid>/root``: path lookups below it follow the component's own mounts),
        then drops to the unit's uid/gid; the transient unit keeps only the capabilities that step needs, and
        no new privileges. Not ``setns``: a mount namespace cannot be joined by a multi-threaded process (qemu
        user emulation makes every process one) and needs CAP_SYS_ADMIN. Root, user and environment come from
        the unit as written (what runs)."""
        unit_file = self.unit_path(spec.name, spec.replicas)
        settings = unit_settings(unit_file)
        if "RootDirectory" not in settings:
            return False, f"{unit_file} has no RootDirectory=: not a unit this runtime wrote"
        if not main_pid.isdigit() or main_pid == "0":
            return False, f"unit {unit} has no main process to probe"
        limit = max(1, math.ceil(timeout))
        props = ["RuntimeMaxSec=%d" % limit, "NoNewPrivileges=yes",
                 "CapabilityBoundingSet=" + " ".join(PROBE_CAPABILITIES)]
        if "EnvironmentFile" in settings:
            props.append(f"EnvironmentFile={settings['EnvironmentFile']}")
        # No --wd: the process's cwd may be a directory only its user may open (postgres' data dir); the check
        # starts in the root, as an exec in a container does without a WorkingDir.
        enter = [NSENTER, f"--target={main_pid}", "--root"]
        if "User" in settings:
            enter += [f"--setuid={settings['User']}", f"--setgid={settings.get('Group', settings['User'])}"]
        command = ["timeout", "-k", "2", str(limit + 5), "systemd-run", "--wait", "--pipe", "--quiet",
                   "--collect", "--service-type=exec"]
        for prop in props:
            command += ["-p", prop]
        started = self.clock()
        rc, out, err = self.run(command + ["--", *enter, "--", *argv])
        if rc == 0:
            return True, ""
        # systemd-run --wait says 1 both for a check that exited 1 and for one RuntimeMaxSec= stopped: the
        # time it took tells them apart.
        if rc == 124 or self.clock() - started >= limit:
            return False, f"exec {' '.join(argv)} did not finish within {limit}s"
        text = (err.strip() or out.strip())[-300:]
        return False, f"exec {' '.join(argv)} exited {rc}" + (f": {text}" if text else "")

    def logs(self, name: str, lines: int = 30) -> str:
        units = self.deployed_units(name) or [self.unit_name(name)]
        rc, out, err = self.run(["journalctl", *[a for u in units for a in ("-u", u)], "-n", str(int(lines)),
                                 "--no-pager", "-o", "short-iso"])
        return out.strip() if rc == 0 else f"(journalctl failed: {err.strip()})"

    # -- helpers --------------------------------------------------------------------------------------

    def _systemctl(self, args: List[str], what: str, component: Optional[str] = None) -> None:
        rc, out, err = self.run(["timeout", "-k", "5", str(SYSTEMCTL_TIMEOUT), "systemctl", *args])
        if rc == 0:
            return
        where = f"component {component}: " if component else ""
        unit = " ".join(self.deployed_units(component) or [self.unit_name(component)]) if component else \
            "the app's units"
        tail = f"\n{self.logs(component, 15)}" if component else ""
        late = f" (no answer within {SYSTEMCTL_TIMEOUT}s)" if rc == 124 else ""
        raise DeployError(f"{where}systemctl {' '.join(args)} failed to {what}{late}: "
                          f"{err.strip() or out.strip()}; see systemctl status {unit} and journalctl -u {unit}"
                          + tail)


# ----------------------------------------------------------------------------------------------------------
# Rendering (pure functions)


def render_unit(spec: ComponentSpec, config: Mapping[str, Any], *, root: str, view: str, app: str,
                env_file: str, configs: Sequence[Tuple[str, str]], volumes: Sequence[Tuple[str, str]],
                after: Sequence[str] = (), wants: Sequence[str] = ()) -> str:
    """The unit file of one component (a template when it runs several instances): ``config`` is the image's,
    ``root`` the component's root (``RootDirectory=``), ``view`` the image as it can be read now. ``after`` are
    the units of its dependencies on this host, ``wants`` those that a start of this unit also starts: not jobs,
    which run when a deploy says so, not at every boot."""
    argv = exec_argv(spec, config, view)
    lines = [
        f"{FINGERPRINT_MARK}{spec.fingerprint}",
        f"{APP_MARK}{app}",
        f"{COMPONENT_MARK}{spec.name}",
        f"{FORMAT_MARK}{UNIT_FORMAT}",
    ]
    if spec.is_job:
        lines.append(f"{KIND_MARK}job")
    if spec.replicas > 1:
        lines.append(f"{INSTANCES_MARK}{spec.replicas}")
    instance = " instance %i" if spec.replicas > 1 else ""
    lines += [
        "# Written by offline.delivery (systemd target); changed by the next deploy, not by hand.",
        "[Unit]",
        f"Description={escape_specifiers(f'{app} {spec.version}: {spec.name} ({spec.reference})')}{instance}",
        " ".join(["After=network-online.target", *after]),
        " ".join(["Wants=network-online.target", *wants]),
        "",
        "[Service]",
        # A job runs to its end once per deploy that changes it: a oneshot, not restarted, not started at boot.
        "Type=oneshot" if spec.is_job else "Type=exec",
        f"RootDirectory={unit_path(root, 'root filesystem')}",
        "MountAPIVFS=yes",
        "PrivateTmp=yes",
        "BindReadOnlyPaths=/etc/hosts /etc/resolv.conf",
    ]
    for host, inside in configs:
        lines.append(f"BindReadOnlyPaths={unit_path(host, 'config file')}:{unit_path(inside, 'config file')}")
    for host, inside in volumes:
        lines.append(f"BindPaths={unit_path(host, 'volume')}:{unit_path(inside, 'volume')}")
    lines.append(f"EnvironmentFile={unit_path(env_file, 'environment file')}")
    workdir = config.get("WorkingDir") or "/"
    lines.append(f"WorkingDirectory={unit_path(workdir, 'image WorkingDir')}")
    lines.append("ExecStart=" + " ".join(quote_arg(a) for a in argv))
    user = resolve_user(spec.user or config.get("User") or "", view)
    if user:
        lines += [f"User={user[0]}", f"Group={user[1]}"]
    lines.append(f"KillSignal={kill_signal(config.get('StopSignal'))}")
    if not spec.is_job:
        lines += ["Restart=on-failure", "RestartSec=2s"]
    lines.append(f"TimeoutStopSec={STOP_TIMEOUT}s")
    lines += hardening_lines(spec.security)
    lines += resource_lines(spec.resources)
    if not spec.is_job:
        lines += ["", "[Install]", "WantedBy=multi-user.target"]
    return "\n".join(lines + [""])


def render_mount_unit(where: str, lowerdirs: Sequence[str], *, app: str, component: str, image: str) -> str:
    """The mount unit of a component's read-only root: overlayfs over its layers, no upper directory."""
    for directory in lowerdirs:
        unit_path(directory, "image layer")
    return "\n".join([
        f"{APP_MARK}{app}",
        f"# offline-delivery root of: {component}",
        f"{IMAGE_MARK}{image}",
        "# Written by offline.delivery (systemd target): a component's read-only root, its mount points over its "
        "image's layers.",
        "[Unit]",
        f"Description={app}: read-only root of {component}",
        "",
        "[Mount]",
        # util-linux 2.39+ (Debian 13) mounts through fsconfig(2), which takes at most 256 bytes per option:
        # a few layers' lowerdir is longer. mount(2) takes a page.
        f"Environment={FORCE_MOUNT2}",
        "What=overlay",
        f"Where={unit_path(where, 'component root')}",
        "Type=overlay",
        "Options=" + overlay_options(lowerdirs),
        "",
    ])


def mount_unit_name(path: str) -> str:
    """systemd's name for the mount unit of ``path`` (``systemd-escape --path --suffix=mount``)."""
    parts = []
    for part in [p for p in path.split("/") if p]:
        parts.append("".join(ch if (ch.isascii() and ch.isalnum()) or ch in ":_." else "\\x%02x" % ord(ch)
                             for ch in part))
    name = "-".join(parts) or "-"
    if name.startswith("."):
        name = "\\x2e" + name[1:]
    return name + ".mount"


def hardening_lines(security: Mapping[str, Any]) -> List[str]:
    """What contains a component beyond its root directory (docs/systemd-target.md, "Containment"): the model's
    capabilities only, no new privileges (unless the model allows escalation), no devices but the basic ones,
    kernel, cgroups, clock and hostname protected, the whole root read-only (it is a read-only overlay too), setuid/setgid
    files refused, namespaces and realtime refused, the native system-call set of a service. systemd-analyze
    security rates the shop's units 'OK' (docs/reliability.md)."""
    return [
        "CapabilityBoundingSet=" + " ".join("CAP_" + c for c in capabilities_of(security)),
        f"NoNewPrivileges={'no' if security.get('privilege_escalation') else 'yes'}",
        "PrivateDevices=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictSUIDSGID=yes",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "LockPersonality=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallErrorNumber=EPERM",
    ]


def exec_argv(spec: ComponentSpec, config: Mapping[str, Any], root: str) -> List[str]:
    """Docker's rule: the model's entrypoint replaces the image's (and drops the image's Cmd); the model's
    command replaces the Cmd. A bare program name is looked up in the image's PATH inside the root."""
    if spec.entrypoint is not None:
        argv = list(spec.entrypoint) + list(spec.command or [])
    else:
        argv = list(config.get("Entrypoint") or []) + list(
            spec.command if spec.command is not None else (config.get("Cmd") or []))
    if not argv:
        raise DeployError(f"component {spec.name}: neither the model nor the image {spec.reference} says what to "
                          "run (no entrypoint or command); set entrypoint in the model")
    if not argv[0].startswith("/"):
        argv[0] = find_program(argv[0], config, root, spec.name)
    return argv


def find_program(name: str, config: Mapping[str, Any], root: str, component: str) -> str:
    path = DEFAULT_PATH
    for item in config.get("Env") or []:
        if str(item).startswith("PATH="):
            path = str(item)[5:]
    for directory in path.split(":"):
        if not directory.startswith("/"):
            continue
        candidate = f"{directory.rstrip('/')}/{name}"
        parent, _sep, base = candidate.strip("/").rpartition("/")
        try:
            host = os.path.join(resolve_in_root(root, parent), base)
        except ImageError:
            continue
        if os.path.exists(host) or os.path.islink(host):
            return candidate
    raise DeployError(f"component {component}: program {name!r} is not in the image's PATH ({path}); give an "
                      "absolute path in the model's entrypoint")


def quote_arg(arg: str) -> str:
    """One ExecStart argument: double-quoted with C escapes, ``%`` and ``$`` doubled so systemd expands
    neither specifiers nor variables."""
    if "\x00" in arg:
        raise DeployError(f"argument {arg!r} holds a NUL byte")
    out = []
    for ch in arg:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "%":
            out.append("%%")
        elif ch == "$":
            out.append("$$")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\x%02x" % ord(ch))
        else:
            out.append(ch)
    return '"%s"' % "".join(out)


def escape_specifiers(text: str) -> str:
    """Text for a one-line unit setting: % specifiers escaped, every control character (a lone CR ends a line
    for systemd too) replaced by a space."""
    return CONTROL_RE.sub(" ", text.replace("%", "%%"))


def unit_path(path: str, what: str) -> str:
    """A path as a unit setting holds it; refuses what would need quoting there (spaces, ':', quotes, ...)."""
    if not _PLAIN_PATH.match(path) or "/../" in path + "/":
        raise DeployError(f"{what} {path!r}: a path in a systemd unit must be absolute and use only letters, "
                          "digits and ._+@/- (no spaces, ':' or quotes)")
    return path


def render_env_file(env: Mapping[str, str]) -> str:
    """An EnvironmentFile: each value single-quoted (systemd takes it literally: no escapes, no ``$``
    expansion); a value holding a ``'`` is double-quoted with ``\\``, ``"``, ``$`` and backquote escaped."""
    lines = []
    for key, value in env.items():
        if not _ENV_NAME.match(key):
            raise ValueError(f"environment variable name {key!r} is not [A-Za-z_][A-Za-z0-9_]*")
        if "\x00" in value:
            raise ValueError(f"environment variable {key} holds a NUL byte")
        if "'" not in value:
            lines.append(f"{key}='{value}'")
        else:
            escaped = "".join("\\" + ch if ch in '"\\`$' else ch for ch in value)
            lines.append(f'{key}="{escaped}"')
    return "".join(line + "\n" for line in lines)


def kill_signal(stop_signal: Optional[str]) -> str:
    """The image's StopSignal as systemd's KillSignal= (``SIGQUIT``, ``3`` or ``QUIT``); SIGTERM by default."""
    if not stop_signal:
        return "SIGTERM"
    text = str(stop_signal).strip().upper()
    if text.isdigit():
        try:
            return signal.Signals(int(text)).name
        except ValueError:
            raise DeployError(f"image StopSignal {stop_signal!r} is not a signal number") from None
    name = text if text.startswith("SIG") else "SIG" + text
    if name.startswith("SIGRTMIN") or name.startswith("SIGRTMAX") or name in signal.Signals.__members__:
        return name
    raise DeployError(f"image StopSignal {stop_signal!r} is not a signal name")


def resource_lines(resources: Mapping[str, Any]) -> List[str]:
    lines = []
    if resources.get("cpus"):
        lines.append("CPUQuota=%d%%" % round(float(resources["cpus"]) * 100))
    if resources.get("memory"):
        lines.append("MemoryMax=%d" % parse_memory(str(resources["memory"])))
    return lines


def resolve_user(user: str, root: str) -> Optional[Tuple[int, int]]:
    """``uid[:gid]`` or ``name[:group]`` -> numbers, names looked up in the image's /etc/passwd and /etc/group
    (the host's would not know the image's users). None when no user is set (the service runs as root)."""
    if not user:
        return None
    name, _sep, group = user.partition(":")
    passwd = _db(read_in_root(root, "etc/passwd"))
    if name.isdigit():
        uid = int(name)
        gid = next((int(f[3]) for f in passwd.values() if f[2] == name), 0)
    elif name in passwd:
        uid, gid = int(passwd[name][2]), int(passwd[name][3])
    else:
        raise DeployError(f"user {name!r} is not in the image's /etc/passwd; give a numeric uid in the model")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            groups = _db(read_in_root(root, "etc/group"))
            if group not in groups:
                raise DeployError(f"group {group!r} is not in the image's /etc/group; give a numeric gid")
            gid = int(groups[group][2])
    return uid, gid


def _db(data: Optional[bytes]) -> Dict[str, List[str]]:
    entries: Dict[str, List[str]] = {}
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] and fields[2].isdigit():
            entries.setdefault(fields[0], fields)
    return entries


def read_marks(path: str) -> Dict[str, str]:
    """The offline-delivery comment lines at the top of a unit file."""
    marks: Dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.startswith(MARK):
                    break
                key, sep, value = line[len(MARK):].strip().partition(": ")
                if sep:
                    marks[key] = value.strip()
    except FileNotFoundError:
        pass
    return marks


def iso_time(value: str) -> Optional[str]:
    """systemd's ``@<unix seconds>`` as ISO 8601 UTC (the other text as it is; empty/``n/a``: None)."""
    value = value.strip()
    if not value or value == "n/a":
        return None
    if value.startswith("@") and value[1:].isdigit():
        return datetime.datetime.fromtimestamp(int(value[1:]), datetime.timezone.utc).isoformat()
    return value


def stop_order(names: Sequence[str], units: Mapping[str, str], units_of: Callable[[str], List[str]]) -> List[str]:
    """``names`` with dependents first (a unit is stopped before the units its ``After=`` names)."""
    after = {n: set(unit_settings(units[n], "[Unit]").get("After", "").split()) for n in names}
    remaining = sorted(names)
    ordered: List[str] = []
    while remaining:
        free = [n for n in remaining
                if not any(set(units_of(n)) & after[m] for m in remaining if m != n)]
        pick = free[0] if free else remaining[0]   # a cycle cannot be written by start(); stop it anyway
        ordered.append(pick)
        remaining.remove(pick)
    return ordered


def unit_settings(path: str, section_name: str = "[Service]") -> Dict[str, str]:
    """``key -> value`` of a section of a unit file this runtime wrote (one value per key)."""
    settings: Dict[str, str] = {}
    section = ""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if line.startswith("["):
                    section = line
                elif section == section_name and "=" in line and not line.startswith("#"):
                    key, _sep, value = line.partition("=")
                    settings.setdefault(key, value)
    except FileNotFoundError:
        pass
    return settings


def file_units(path: str, marks: Optional[Mapping[str, str]] = None) -> List[str]:
    """The units a unit file this runtime wrote runs (its instances when it is a template)."""
    marks = read_marks(path) if marks is None else marks
    return instance_units(os.path.basename(path), int(marks.get("instances") or 1))


def instance_units(unit_file: str, replicas: int) -> List[str]:
    """``od-a-c.service`` -> itself; the template ``od-a-c@.service`` -> ``od-a-c@1.service`` .. ``@<replicas>``."""
    if not unit_file.endswith("@.service"):
        return [unit_file]
    base = unit_file[:-len(".service")]
    return [f"{base}{index}.service" for index in range(1, replicas + 1)]


def _job_state(props: Mapping[str, str]) -> Tuple[str, str]:
    """A oneshot unit's state (systemctl show) as a job state."""
    active, sub, result = props.get("ActiveState", "?"), props.get("SubState", "?"), props.get("Result", "?")
    if props.get("LoadState", "loaded") != "loaded":
        return JOB_FAILED, f"not loaded ({props.get('LoadState')})"
    if active in ("activating", "deactivating", "reloading"):
        return JOB_RUNNING, f"{active}/{sub}"
    if active == "failed" or result != "success":
        return JOB_FAILED, f"{active}/{sub}, result {result}, exit status {props.get('ExecMainStatus', '?')}"
    return JOB_SUCCEEDED, f"exited 0 ({active}/{sub})"
