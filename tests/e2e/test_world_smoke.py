"""Smoke test of the test world: real hosts, really air-gapped, reachable by ansible from the jump host."""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlparse

import pytest
import yaml

from tests.world.hostimages import COLLECTION_MOUNT
from tests.world.rootfs import RootfsRecipe, _mirror_from_deb822, debian_mirror
from tests.world.site import JUMP, HostSpec, Site, status
from tests.world.util import Result, WorldError, repo_root

pytestmark = pytest.mark.world

T = TypeVar("T")
UNAME = {"amd64": "x86_64", "arm64": "aarch64"}
# Steps qemu-user cannot emulate (TESTWORLD.md): on arm64 a unit may fail only at one of these.
QEMU_FAILED_STEPS = ("Failed at step NETWORK", "Failed at step CREDENTIALS")


def on_each_host(site: Site, fn: Callable[[str], T]) -> dict[str, T]:
    """Run `fn(host)` for every target host in parallel (arm64 under qemu is slow)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(site.hosts)) as pool:
        futures = {h.name: pool.submit(fn, h.name) for h in site.hosts}
        return {name: fut.result() for name, fut in futures.items()}


def tcp_probe(site: Site, host: str, ip: str, port: int, timeout: float = 4) -> Result:
    """Try a TCP connection from a host of the site; rc 0 means it connected."""
    code = (f"import socket; socket.create_connection(({ip!r}, {port}), timeout={timeout}).close(); "
            f"print('connected')")
    return site.exec(host, ["python3", "-c", code], timeout=timeout + 30)


def mirror_host_and_ip() -> tuple[str, str, int]:
    url = urlparse(debian_mirror())
    host = url.hostname or "deb.debian.org"
    port = url.port or (443 if url.scheme == "https" else 80)
    return host, socket.gethostbyname(host), port


def test_systemd_running_on_each_target(world_site: Site) -> None:
    def state(host: str) -> tuple[str, str, dict[str, str]]:
        pid1 = world_site.exec(host, ["cat", "/proc/1/comm"], timeout=30).stdout.strip()
        system = world_site.exec(host, ["systemctl", "is-system-running"], timeout=60).stdout.strip()
        failed = world_site.exec(host, ["systemctl", "list-units", "--failed", "--plain", "--no-legend"],
                                 timeout=60).stdout
        units = [line.split()[0] for line in failed.splitlines() if line.strip()]
        journals = {u: world_site.exec(host, ["journalctl", "-b", "-u", u, "--no-pager"], timeout=60).output
                    for u in units}
        return pid1, system, journals

    for host, (pid1, system, journals) in on_each_host(world_site, state).items():
        arch = world_site.host(host).arch
        assert pid1 == "systemd", f"{host}: PID 1 is {pid1!r}, not systemd"
        if arch == "amd64":
            assert system == "running", f"{host}: systemd says {system!r}; failed: {journals}"
        else:
            assert system in ("running", "degraded"), f"{host}: systemd says {system!r}"
            beyond_qemu = {u: j[-500:] for u, j in journals.items() if not any(s in j for s in QEMU_FAILED_STEPS)}
            assert not beyond_qemu, f"{host}: units failed beyond the known qemu limits: {beyond_qemu}"
        active = world_site.exec(host, ["systemctl", "is-active", "ssh.service"], timeout=30).stdout.strip()
        assert active == "active", f"{host}: sshd is {active!r}"


def test_arch_of_each_host(world_site: Site) -> None:
    machines = on_each_host(world_site, lambda h: world_site.exec(h, ["uname", "-m"], timeout=30).stdout.strip())
    assert any(h.arch == "arm64" for h in world_site.hosts), "the default site must include an arm64 host"
    for host, machine in machines.items():
        assert machine == UNAME[world_site.host(host).arch], f"{host}: uname -m says {machine}"


def test_targets_cannot_reach_outside(world_site: Site) -> None:
    mirror = debian_mirror()
    name, ip, port = mirror_host_and_ip()
    # Precondition: this machine itself reaches the mirror, so a failure inside the site means the air gap.
    socket.create_connection((ip, port), timeout=10).close()
    peer = world_site.info()["hosts"][0]  # any host of the site: the inside controls talk to it
    sources = f"deb {mirror} {world_site.suite} main\n"
    apt_update = (
        f"printf '{sources}' > /tmp/od-outside.list && timeout 90 apt-get "
        "-o Dir::Etc::SourceList=/tmp/od-outside.list -o Dir::Etc::SourceParts=/nonexistent "
        "-o Acquire::http::Timeout=5 -o Acquire::https::Timeout=5 -o Acquire::Retries=0 update"
    )

    checks: dict[str, Callable[[str], Result]] = {
        "apt": lambda h: world_site.exec(h, apt_update, timeout=120),
        "dns_outside": lambda h: world_site.exec(h, ["timeout", "10", "getent", "hosts", name], timeout=40),
        "dns_inside": lambda h: world_site.exec(h, ["timeout", "10", "getent", "hosts", peer["name"]], timeout=40),
        "tcp_outside": lambda h: tcp_probe(world_site, h, ip, port),
        "tcp_inside": lambda h: tcp_probe(world_site, h, peer["ip"], 22),
    }
    # Every (host, check) at once: the failing ones each wait for a timeout.
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(checks) * len(world_site.hosts)) as pool:
        futures = {(h.name, c): pool.submit(fn, h.name) for h in world_site.hosts for c, fn in checks.items()}
        results = {key: fut.result() for key, fut in futures.items()}

    for host in [h.name for h in world_site.hosts]:
        r = {check: results[(host, check)] for check in checks}
        apt_out = r["apt"].output
        fetched = re.search(r"^(Hit|Get):", apt_out, re.M)
        assert not fetched and (r["apt"].rc != 0 or "Failed to fetch" in apt_out), \
            f"{host}: apt-get update reached {mirror}:\n{apt_out}"
        assert r["dns_outside"].rc != 0, f"{host}: resolved {name}: {r['dns_outside'].stdout}"
        assert r["tcp_outside"].rc != 0, f"{host}: connected to the mirror {ip}:{port} outside the site"
        # Controls: name resolution and TCP do work inside the site, so the failures above are the air gap.
        assert r["dns_inside"].rc == 0, \
            f"{host}: cannot resolve the site's own host {peer['name']}: {r['dns_inside'].output}"
        assert r["tcp_inside"].rc == 0, \
            f"{host}: cannot reach {peer['name']}:22 inside the site: {r['tcp_inside'].output}"


def test_jump_host_pings_every_target_with_ansible(world_site: Site) -> None:
    result = world_site.jump(["ansible", "all", "-m", "ansible.builtin.ping", "-o"], timeout=300)
    assert result.rc == 0, result.output
    for host in world_site.hosts:
        assert re.search(rf"^{re.escape(host.name)} \| SUCCESS => .*\"pong\"", result.stdout, re.M), \
            f"{host.name} missing from:\n{result.output}"


def test_jump_host_gathers_facts_with_right_arch(world_site: Site) -> None:
    result = world_site.jump(["ansible", "all", "-m", "ansible.builtin.setup", "-a",
                              "filter=ansible_architecture,ansible_distribution*", "-o"], timeout=300)
    assert result.rc == 0, result.output
    facts: dict[str, dict] = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^(\S+) \| SUCCESS => (\{.*\})$", line)
        if match:
            facts[match.group(1)] = json.loads(match.group(2))["ansible_facts"]
    for host in world_site.hosts:
        assert host.name in facts, f"no facts from {host.name}:\n{result.output}"
        assert facts[host.name]["ansible_architecture"] == UNAME[host.arch], facts[host.name]
        assert facts[host.name]["ansible_distribution"] == "Debian"
        assert facts[host.name]["ansible_distribution_major_version"] == "12"


def test_jump_host_runs_the_current_collection_read_only(world_site: Site) -> None:
    galaxy = world_site.jump(["cat", f"{COLLECTION_MOUNT}/galaxy.yml"], timeout=30)
    assert galaxy.stdout == (repo_root() / "galaxy.yml").read_text()
    write = world_site.jump(["touch", f"{COLLECTION_MOUNT}/.od-write-probe"], timeout=30)
    assert write.rc != 0 and "Read-only" in write.output, write.output
    listed = world_site.jump(["ansible-galaxy", "collection", "list", "offline.delivery"], timeout=60)
    assert listed.rc == 0 and "offline.delivery" in listed.stdout, listed.output


def test_inventory_on_the_machine_reaches_the_site(world_site: Site) -> None:
    doc = yaml.safe_load(world_site.local_inventory_path.read_text())
    members = doc["all"]["children"][f"site_{world_site.name.replace('-', '_')}"]["hosts"]
    assert set(members) == {h.name for h in world_site.hosts}
    ansible = Path(sys.executable).with_name("ansible")
    if not ansible.exists():
        pytest.fail(f"{ansible} missing: the venv needs ansible-core (pyproject test extra)")
    done = subprocess.run([str(ansible), "all", "-i", str(world_site.local_inventory_path), "-m",
                           "ansible.builtin.ping", "-o"], capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "False"})
    assert done.returncode == 0, done.stdout + done.stderr


def test_second_site_is_up_and_isolated(world_site: Site, world_site_b: Site) -> None:
    a, b = world_site.info(), world_site_b.info()
    assert a["network"] != b["network"] and a["subnet"] != b["subnet"]
    ping_b = world_site_b.jump(["ansible", "all", "-m", "ansible.builtin.ping", "-o"], timeout=300)
    assert ping_b.rc == 0, ping_b.output
    b_ips = [h["ip"] for h in b["hosts"]] + [b["jump"]["ip"]]
    probes = [(world_site, src, ip) for src in (JUMP, world_site.hosts[0].name) for ip in b_ips]
    probes += [(world_site_b, world_site_b.hosts[0].name, h["ip"]) for h in a["hosts"]]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(probes)) as pool:
        results = list(pool.map(lambda p: tcp_probe(p[0], p[1], p[2], 22, timeout=3), probes))
    for (site, src, ip), result in zip(probes, results, strict=True):
        assert result.rc != 0, f"site {site.name} host {src} reached {ip}:22 of the other site"
    # Control: the same probe inside site A connects, so the failures above are the isolation.
    inside = tcp_probe(world_site, world_site.hosts[0].name, a["hosts"][-1]["ip"], 22, timeout=3)
    assert inside.rc == 0, inside.output


def test_failed_up_removes_what_it_made_and_only_that(world_site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    doomed = Site("e2e-fail", [HostSpec("n1", "amd64", ("targets",))])
    doomed.down()

    def never_boots(self: Site, host: str, arch: str) -> None:
        raise WorldError(f"simulated boot failure of {host}")

    monkeypatch.setattr(Site, "_wait_one", never_boots)
    with pytest.raises(WorldError, match="simulated boot failure"):
        doomed.up()
    assert not doomed.exists(), "a failed up left containers or networks behind"
    assert not doomed.state_dir.exists()
    # The other site is untouched.
    assert world_site.exists()
    assert all(r["state"] == "running" for r in status(world_site.name))


# ---- the harness's own logic (no containers needed) ----------------------------------------------------

def test_mirror_read_from_deb822_sources() -> None:
    text = ("Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
            "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n"
            "Suites: bookworm-security\nComponents: main\n")
    assert _mirror_from_deb822(text, "bookworm") == "http://mirror.example/debian"
    assert _mirror_from_deb822(text, "trixie") == "http://mirror.example/debian"  # same archive, other suite
    assert _mirror_from_deb822("Types: deb\nURIs: http://x/\nSuites: bookworm-security\n", "bookworm") is None


def test_recipe_key_changes_with_the_recipe_only() -> None:
    base = RootfsRecipe(arch="amd64")
    assert base.key() == RootfsRecipe(arch="amd64").key()
    assert base.key() != RootfsRecipe(arch="arm64").key()
    assert base.key() != RootfsRecipe(arch="amd64", suite="trixie").key()
    assert base.key() != RootfsRecipe(arch="amd64", packages=base.packages + ("curl",)).key()


def test_host_spec_parsing_and_validation() -> None:
    assert HostSpec.parse("arm1:arm64:targets+systemd") == HostSpec("arm1", "arm64", ("targets", "systemd"))
    assert HostSpec.parse("n1") == HostSpec("n1", "amd64", ())
    for bad in ("jump", "n1:riscv64", "N1", "n1:amd64:bad-group", ""):
        with pytest.raises(WorldError):
            HostSpec.parse(bad)
