"""A simulated air-gapped site: an --internal docker network, a jump host with ansible, N target hosts.

Everything a site creates is labelled `offline-delivery.world=<site>`; `down` removes by that label, so it
cleans up after a failed `up` too. Per-site state (ssh key pair, inventories, site.json) lives under
`state_root()/<site>/`; the jump host sees all sites' state read-only at /root/world.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Sequence

import yaml

from .hostimages import (COLLECTION_MOUNT, TRANSFER_MOUNT, WORLD_MOUNT, HostImage, ensure_host_image,
                         ensure_jump_image)
from .rootfs import DEFAULT_SUITE, NATIVE_ARCH, RootfsRecipe
from .util import LABEL, Result, WorldError, docker, log, repo_root, run, state_root

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?$")
JUMP = "jump"
ARCHES = ("amd64", "arm64")
# TESTWORLD: the VM's bounding set lacks CAP_SYS_RESOURCE, so --privileged fails; this set works. No
# systempaths=unconfined (it would let a container change the machine's global sysctls).
SYSTEMD_RUN_FLAGS: tuple[str, ...] = (
    "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE", "--cap-drop", "SYS_TIME", "--cap-drop", "SYS_MODULE",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--device-cgroup-rule", "a *:* rwm", "--cgroupns", "host",
    "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "--tmpfs", "/run", "--tmpfs", "/run/lock",
)
# systemd under qemu is several times slower to boot than native.
BOOT_TIMEOUT = {"amd64": 90.0, "arm64": 300.0}


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """One target host of a site: its name, CPU architecture and inventory groups."""

    name: str
    arch: str = "amd64"
    groups: tuple[str, ...] = ()
    # Extra `docker run` options for this host only (e.g. a Kubernetes node's `--device /dev/kmsg`).
    run_args: tuple[str, ...] = ()
    # This host's Debian suite when it differs from the site's (e.g. a Debian 13 host in a Debian 12 site).
    suite: str = ""

    def validate(self) -> None:
        if not _NAME_RE.match(self.name) or self.name == JUMP:
            raise WorldError(f"host name {self.name!r}: use [a-z0-9-], at most 20 chars, not {JUMP!r}")
        if self.arch not in ARCHES:
            raise WorldError(f"host {self.name}: arch {self.arch!r} not one of {', '.join(ARCHES)}")
        for group in self.groups:
            if not re.match(r"^[a-z_][a-z0-9_]*$", group):
                raise WorldError(f"host {self.name}: group {group!r} must match [a-z_][a-z0-9_]* (ansible)")

    @classmethod
    def parse(cls, text: str) -> "HostSpec":
        """`name[:arch[:group1+group2]]`, e.g. `arm1:arm64:targets+systemd`."""
        parts = text.split(":")
        if not 1 <= len(parts) <= 3 or not parts[0]:
            raise WorldError(f"host spec {text!r}: expected name[:arch[:group1+group2]]")
        arch = parts[1] if len(parts) > 1 and parts[1] else "amd64"
        groups = tuple(g for g in parts[2].split("+") if g) if len(parts) > 2 else ()
        spec = cls(parts[0], arch, groups)
        spec.validate()
        return spec


DEFAULT_HOSTS: tuple[HostSpec, ...] = (
    HostSpec("repo", "amd64", ("offline_repo",)),
    HostSpec("node1", "amd64", ("targets",)),
    HostSpec("node2", "amd64", ("targets",)),
    HostSpec("arm1", "arm64", ("targets",)),
)


def group_name(site: str) -> str:
    """The inventory group holding every host of a site (ansible group names take no '-')."""
    return "site_" + site.replace("-", "_")


class Site:
    """Handle on one site by name; `up()` creates it, `down()` removes everything labelled with it."""

    def __init__(self, name: str, hosts: Sequence[HostSpec] = DEFAULT_HOSTS, suite: str = DEFAULT_SUITE,
                 jump_suite: str | None = None):
        if not _NAME_RE.match(name):
            raise WorldError(f"site name {name!r}: use [a-z0-9-], at most 20 chars, start/end alphanumeric")
        names = [h.name for h in hosts]
        if len(set(names)) != len(names):
            raise WorldError(f"site {name}: duplicate host names in {names}")
        for host in hosts:
            host.validate()
        self.name = name
        self.hosts = tuple(hosts)
        self.suite = suite
        # The jump host's Debian suite (default: the hosts'); its ansible-core is the newest claimed one that
        # suite's python3 runs (tests/world/hostimages.py), so a Debian 13 jump host runs a newer one.
        self.jump_suite = jump_suite or suite

    @classmethod
    def load(cls, name: str) -> "Site":
        """The site as `up` recorded it in its site.json (host list and suite)."""
        info = cls(name, hosts=()).info()
        hosts = [HostSpec(h["name"], h["arch"], tuple(h["groups"]), tuple(h.get("run_args", ())),
                          h.get("suite", "")) for h in info["hosts"]]
        return cls(name, hosts=hosts, suite=info["suite"], jump_suite=info.get("jump_suite"))

    # ---- names and paths -------------------------------------------------------------------------
    @property
    def network(self) -> str:
        return f"od-{self.name}-net"

    def container(self, host: str) -> str:
        return f"od-{self.name}-{host}"

    @property
    def state_dir(self) -> Path:
        return state_root() / self.name

    @property
    def key_path(self) -> Path:
        return self.state_dir / "id_ed25519"

    @property
    def inventory_path(self) -> Path:
        """Inventory for ansible in the jump host (paths as the jump host sees them)."""
        return self.state_dir / "inventory.yml"

    @property
    def local_inventory_path(self) -> Path:
        """Inventory for ansible on this machine (which can reach the internal network's IPs too)."""
        return self.state_dir / "inventory-local.yml"

    @property
    def transfer_dir(self) -> Path:
        """Drop box shared with the jump host at /srv/transfer: how a bundle is carried into the site."""
        return self.state_dir / "transfer"

    def pin_vendor_key(self, pub: Path, apps: Sequence[str] = ("*",)) -> str:
        """Pin a vendor key in the site's inventory (group_vars beside inventory.yml, read by every playbook run in
        the jump host), as a site's engineer does after comparing its fingerprint with the vendor's out of band.
        Returns the fingerprint. Pinning another key adds to the list."""
        from offline_delivery_core.bundle import ed25519
        from offline_delivery_core.bundle import trust

        fingerprint = trust.fingerprint(ed25519.load_public_key_files([str(pub)])[0])
        path = self.state_dir / "group_vars" / "all" / "vendor_keys.yml"
        path.parent.mkdir(parents=True, exist_ok=True)
        pins = (yaml.safe_load(path.read_text()) or {}).get("offline_delivery_vendor_keys", []) if path.exists() else []
        pins = [p for p in pins if p["fingerprint"] != fingerprint] + [{"fingerprint": fingerprint, "apps": list(apps)}]
        _write_yaml(path, {"offline_delivery_vendor_keys": pins})
        return fingerprint

    def host(self, name: str) -> HostSpec:
        for host in self.hosts:
            if host.name == name:
                return host
        raise WorldError(f"site {self.name} has no host {name!r} (hosts: {', '.join(h.name for h in self.hosts)})")

    # ---- lifecycle --------------------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(_labelled("ps", "-a", site=self.name) or _labelled("network", "ls", site=self.name))

    def up(self, keep_on_failure: bool = False) -> dict:
        """Create the site; on any failure remove what was made (unless asked to keep it for debugging)."""
        if self.exists():
            raise WorldError(f"site {self.name} already exists: `python -m tests.world down {self.name}` first")
        started = time.monotonic()
        try:
            images = self._images()
            self._make_keys()
            self._create_network()
            self._run_hosts(images)
            self._wait_booted()
            info = self._write_state()
        except BaseException:
            if not keep_on_failure:
                log(f"site {self.name}: bring-up failed, removing what was made")
                self.down()
            raise
        log(f"site {self.name} up in {time.monotonic() - started:.0f}s: {self.inventory_path}")
        return info

    def down(self) -> list[str]:
        """Remove the site's containers (with their anonymous volumes), network and state dir."""
        removed: list[str] = []
        ids = _labelled("ps", "-a", site=self.name)
        if ids:
            docker("rm", "-f", "-v", *ids, timeout=180).check(f"removing containers of site {self.name}")
            removed += [f"container {i}" for i in ids]
        for net in _labelled("network", "ls", site=self.name):
            docker("network", "rm", net, timeout=60).check(f"removing network {net} of site {self.name}")
            removed.append(f"network {net}")
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
            removed.append(f"state {self.state_dir}")
        return removed

    # ---- steps of up() ------------------------------------------------------------------------------
    def host_suite(self, host: HostSpec) -> str:
        return host.suite or self.suite

    def _images(self) -> dict[tuple[str, str], str]:
        """Host image tag per (arch, suite) needed, plus the jump image; the slow arm64 build runs alongside."""
        kinds = sorted({(h.arch, self.host_suite(h)) for h in self.hosts} | {("amd64", self.suite)})
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(kinds)) as pool:
            futures = {k: pool.submit(ensure_host_image, RootfsRecipe(arch=k[0], suite=k[1])) for k in kinds}
            amd64: HostImage = (futures[("amd64", self.suite)].result() if self.jump_suite == self.suite
                                else ensure_host_image(RootfsRecipe(arch="amd64", suite=self.jump_suite)))
            jump = ensure_jump_image(amd64)
            tags = {k: f.result().tag for k, f in futures.items()}
        tags[(JUMP, "")] = jump
        return tags

    def _make_keys(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.transfer_dir.mkdir(exist_ok=True)
        if not self.key_path.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"od-world-{self.name}",
                 "-f", str(self.key_path)], timeout=30).check("ssh-keygen for the site key")
        authorized = self.state_dir / "authorized_keys"
        authorized.write_text(self.key_path.with_suffix(".pub").read_text())
        authorized.chmod(0o600)  # sshd's StrictModes refuses group/world-writable key files

    def _create_network(self) -> None:
        docker("network", "create", "--internal", "--label", f"{LABEL}={self.name}", self.network,
               timeout=60).check(f"creating the internal network {self.network}")

    def _common_run_args(self, host: str, arch: str, role: str) -> list[str]:
        return [
            "run", "-d", "--name", self.container(host), "--hostname", host,
            "--network", self.network, "--network-alias", host,
            "--label", f"{LABEL}={self.name}", "--label", f"{LABEL}.host={host}",
            "--label", f"{LABEL}.arch={arch}", "--label", f"{LABEL}.role={role}",
            *SYSTEMD_RUN_FLAGS,
            "-v", f"{self.state_dir / 'authorized_keys'}:/root/.ssh/authorized_keys:ro",
        ]

    def _run_hosts(self, images: dict[tuple[str, str], str]) -> None:
        for host in self.hosts:
            # dockerd inside a target needs a real filesystem under /var/lib/docker for overlay2, and so does the
            # systemd target's layer store (whiteouts and trusted xattrs; a real host has ext4/xfs there too).
            args = self._common_run_args(host.name, host.arch, "target") + [
                "-v", "/var/lib/docker", "-v", "/srv/offline-delivery-apps", *host.run_args,
                images[(host.arch, self.host_suite(host))]]
            docker(*args, timeout=120).check(f"starting host {host.name} of site {self.name}")
        jump_args = self._common_run_args(JUMP, "amd64", JUMP) + [
            "-v", f"{repo_root()}:{COLLECTION_MOUNT}:ro",
            "-v", f"{state_root()}:{WORLD_MOUNT}:ro",
            "-v", f"{self.transfer_dir}:{TRANSFER_MOUNT}:rw",
            "-e", f"ANSIBLE_INVENTORY={WORLD_MOUNT}/{self.name}/inventory.yml",
            "-w", "/root",
            images[(JUMP, "")],
        ]
        docker(*jump_args, timeout=120).check(f"starting the jump host of site {self.name}")

    def _wait_booted(self) -> None:
        machines = [(h.name, h.arch) for h in self.hosts] + [(JUMP, "amd64")]
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(machines)) as pool:
            for fut in [pool.submit(self._wait_one, name, arch) for name, arch in machines]:
                fut.result()

    def _wait_one(self, host: str, arch: str) -> None:
        """Wait (bounded) for systemd to finish booting and sshd to be active on one host."""
        container = self.container(host)
        deadline = time.monotonic() + BOOT_TIMEOUT[arch]
        state = ""
        while time.monotonic() < deadline:
            state = self.exec(host, ["systemctl", "is-system-running"], timeout=30).stdout.strip()
            if state in ("running", "degraded"):
                break
            if not _is_running(container):
                logs = docker("logs", "--tail", "30", container, timeout=30).output
                raise WorldError(f"host {host} of site {self.name} stopped while booting:\n{logs}")
            time.sleep(0.5)
        else:
            jobs = self.exec(host, ["systemctl", "list-jobs", "--no-pager"], timeout=30).output
            raise WorldError(f"host {host} of site {self.name} not booted after {BOOT_TIMEOUT[arch]:.0f}s "
                             f"(systemd state {state!r}); pending jobs:\n{jobs}")
        if self.exec(host, ["systemctl", "is-active", "ssh.service"], timeout=30).stdout.strip() != "active":
            journal = self.exec(host, ["journalctl", "-u", "ssh.service", "--no-pager", "-n", "30"], timeout=30)
            raise WorldError(f"sshd is not active on host {host} of site {self.name}:\n{journal.output}")

    def _write_state(self) -> dict:
        ips = self.ips()
        info = {
            "site": self.name, "suite": self.suite, "jump_suite": self.jump_suite, "network": self.network,
            "subnet": self.subnet(),
            "jump": {"container": self.container(JUMP), "ip": ips[JUMP]},
            "hosts": [{"name": h.name, "arch": h.arch, "groups": list(h.groups), "ip": ips[h.name],
                       "container": self.container(h.name), "run_args": list(h.run_args),
                       "suite": self.host_suite(h)} for h in self.hosts],
        }
        (self.state_dir / "site.json").write_text(json.dumps(info, indent=2) + "\n")
        jump_key = f"{WORLD_MOUNT}/{self.name}/{self.key_path.name}"
        _write_yaml(self.inventory_path, inventory([self], {self.name: jump_key}, prefix_hosts=False))
        _write_yaml(self.local_inventory_path, inventory([self], {self.name: str(self.key_path)}, prefix_hosts=False))
        return info

    # ---- inspection and commands ---------------------------------------------------------------------
    def ips(self) -> dict[str, str]:
        """IP of each host (and the jump host) on the site network."""
        result: dict[str, str] = {}
        for host in [h.name for h in self.hosts] + [JUMP]:
            fmt = "{{(index .NetworkSettings.Networks \"%s\").IPAddress}}" % self.network
            out = docker("inspect", "--format", fmt, self.container(host), timeout=30)
            result[host] = out.check(f"reading the IP of {self.container(host)}").stdout.strip()
        return result

    def subnet(self) -> str:
        out = docker("network", "inspect", "--format", "{{(index .IPAM.Config 0).Subnet}}", self.network, timeout=30)
        return out.check(f"reading the subnet of {self.network}").stdout.strip()

    def info(self) -> dict:
        """The site.json written by up()."""
        path = self.state_dir / "site.json"
        if not path.exists():
            raise WorldError(f"{path} missing: site {self.name} is not up (`python -m tests.world up {self.name}`)")
        return json.loads(path.read_text())

    def exec(self, host: str, command: Sequence[str] | str, timeout: float = 120,
             env: dict[str, str] | None = None) -> Result:
        """Run a command in a host container (the harness's back door; the product goes through ssh)."""
        argv = ["sh", "-c", command] if isinstance(command, str) else list(command)
        env_args = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        # `timeout` inside the host: killing the docker exec client would leave the command running there.
        bounded = ["timeout", "-k", "5", str(max(1, int(timeout))), *argv]
        return run(["docker", "exec", *env_args, self.container(host), *bounded], timeout=timeout + 20)

    def jump(self, command: Sequence[str] | str, timeout: float = 600,
             env: dict[str, str] | None = None) -> Result:
        """Run a command in the jump host as a user would, e.g. `ansible-playbook offline.delivery.install`."""
        return self.exec(JUMP, command, timeout=timeout, env=env)


# Measured 2026-12-06 on the parity site's arm64 host at load 8: poll's python health check (3 s in its compose
# file) took 4.8-5.9 s through the systemd target's probe; the CI machine runs at load 15+. 5 x gives it 15 s.
EMULATED_HEALTH_SCALE = 5


def inventory(sites: Sequence[Site], key_paths: dict[str, str], prefix_hosts: bool) -> dict:
    """An ansible inventory of one or more sites.

    Hosts by IP on their site network; groups from the host specs plus `site_<site>` per site (site-level
    vars such as the ssh key live there). With `prefix_hosts`, host names become `<site>-<host>` so two
    sites' `node1` do not collide in one inventory.
    """
    children: dict[str, dict] = {}
    for site in sites:
        info = site.info()
        members: dict[str, dict] = {}
        for host in info["hosts"]:
            name = f"{site.name}-{host['name']}" if prefix_hosts else host["name"]
            members[name] = {"ansible_host": host["ip"], "od_world_arch": host["arch"]}
            if host["arch"] != NATIVE_ARCH:
                # qemu runs this host several times slower than the hardware the models' health checks were
                # timed for: the site's knob for a slow host (docs/lifecycle.md)
                members[name]["app_health_scale"] = EMULATED_HEALTH_SCALE
            for group in host["groups"]:
                children.setdefault(group, {"hosts": {}})["hosts"][name] = None
        children[group_name(site.name)] = {
            "hosts": members,
            "vars": {"ansible_ssh_private_key_file": key_paths[site.name], "od_world_site": site.name},
        }
    return {"all": {
        "vars": {
            "ansible_user": "root",
            "ansible_python_interpreter": "/usr/bin/python3",
            "ansible_ssh_pipelining": True,
            "ansible_host_key_checking": False,
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        },
        "children": children,
    }}


def sites_present() -> list[str]:
    """Names of all sites that have containers or networks on this engine."""
    names: set[str] = set()
    for kind in (("ps", "-a"), ("network", "ls")):
        out = docker(*kind, "--filter", f"label={LABEL}", "--format", f'{{{{.Label "{LABEL}"}}}}', timeout=60)
        names.update(n for n in out.check("listing world objects").stdout.split() if n)
    return sorted(names)


def status(site: str) -> list[dict]:
    """Each container of a site: host, arch, state, IP and systemd state."""
    out = docker("ps", "-a", "--filter", f"label={LABEL}={site}", "--format", "{{json .}}", timeout=60)
    rows = []
    for line in out.check(f"listing containers of site {site}").stdout.splitlines():
        ps = json.loads(line)
        labels = dict(kv.split("=", 1) for kv in ps.get("Labels", "").split(",") if "=" in kv)
        row = {"container": ps["Names"], "host": labels.get(f"{LABEL}.host", "?"),
               "arch": labels.get(f"{LABEL}.arch", "?"), "state": ps["State"], "systemd": "-"}
        if ps["State"] == "running":
            row["systemd"] = docker("exec", ps["Names"], "systemctl", "is-system-running",
                                    timeout=30).stdout.strip() or "?"
        rows.append(row)
    return sorted(rows, key=lambda r: r["host"])


def _labelled(*kind: str, site: str) -> list[str]:
    out = docker(*kind, "-q", "--filter", f"label={LABEL}={site}", timeout=60)
    return out.check(f"listing objects of site {site}").stdout.split()


def _is_running(container: str) -> bool:
    return docker("inspect", "--format", "{{.State.Running}}", container, timeout=30).stdout.strip() == "true"


def _write_yaml(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
    os.replace(tmp, path)
