"""The runtime playbook in an air-gapped site: targets get Docker (or the systemd target's tools) from the
site repository only, pull the shop images from the site registry, and a second run changes nothing.

One site for the whole module (`world_site`): the `prepared` fixture imports shop 1.0.0 (amd64+arm64,
--packages debian-12) with `ansible-playbook offline.delivery.import`, then runs
`ansible-playbook offline.delivery.runtime` from the jump host three times: `--check` on the fresh amd64
hosts, for real, and again. node1 (amd64) and arm1 (arm64) are compose hosts, node2 (amd64) the systemd host.
arm64 runs under qemu-user: dockerd needs `"iptables": false` there, and containers cannot start, so arm1
installs and pulls only.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.media import carry, recap
from tests.world.site import Site
from tests.world.util import Result

pytestmark = pytest.mark.world

COMPOSE = "node1:arm1"
SYSTEMD = "node2"
FRESH_AMD64 = "node1:node2"
RUNTIME_TIMEOUT = 1500             # arm64 installs Docker under qemu (a few minutes on a busy machine)
IMAGE = "shop/api:1.0.0"
SOURCES_NOW = ("find /etc/apt/sources.list /etc/apt/sources.list.d -maxdepth 1 -type f "
               "\\( -name '*.list' -o -name '*.sources' \\) 2>/dev/null | sort")
# In the test world every arm64 host is emulated; extra vars are templated per host.
IPTABLES = json.dumps({"container_runtime_iptables": "{{ ansible_facts['architecture'] != 'aarch64' }}"})


@dataclass
class Runs:
    site: Site
    repo_ip: str
    check: Result
    after_check: dict[str, str]
    first: Result
    second: Result
    check_converged: Result


def runtime(site: Site, *extra: str) -> Result:
    return site.jump(["ansible-playbook", "offline.delivery.runtime",
                      "-e", f"offline_delivery_compose_group={COMPOSE}",
                      "-e", f"offline_delivery_systemd_group={SYSTEMD}", "-e", IPTABLES, *extra],
                     timeout=RUNTIME_TIMEOUT)


def host_state(site: Site, host: str) -> str:
    """What the runtime roles would change on a host, one line per thing present: active apt sources, site
    key, docker config, the layout, packages installed. A fresh world host gives just its sources.list (its
    apps directory is a volume of the world's, there from the start: the layout shows in its group)."""
    script = (f"{SOURCES_NOW}; ls /etc/apt/keyrings; getent group od-apps; "
              "for p in /etc/docker /var/lib/offline-delivery; do [ -e $p ] && echo $p; done; "
              "[ \"$(stat -c %G /srv/offline-delivery-apps 2>/dev/null)\" = od-apps ] && echo /srv/offline-delivery-apps; "
              "dpkg-query -W -f '${Package} ${db:Status-Status}\\n' docker.io zstd 2>/dev/null | grep ' installed$'; "
              "true")
    res = site.exec(host, ["bash", "-c", script], timeout=60)
    assert res.rc == 0, res.output
    return res.stdout


def import_shop(site: Site, bundles: dict[str, Path]) -> None:
    """Import shop 1.0.0 built with Debian 12 packages (a no-op when test_import already did)."""
    carry(site, {"shop-1.0.0": bundles["shop-1.0.0"], "vendor.pub": bundles["vendor.pub"]})
    res = site.jump(["ansible-playbook", "offline.delivery.import", "-e", "offline_delivery_bundle_src=/srv/transfer/shop-1.0.0",
                     "-e", json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})],
                    timeout=1200)
    assert res.rc == 0, f"import of shop 1.0.0 failed:\n{res.output[-5000:]}"


@pytest.fixture(scope="module")
def prepared(world_site: Site, shop_bundles: dict[str, Path]) -> Iterator[Runs]:
    import_shop(world_site, shop_bundles)
    repo_ip = next(h["ip"] for h in world_site.info()["hosts"] if h["name"] == "repo")
    check = runtime(world_site, "--check", "--limit", FRESH_AMD64)
    after_check = {h: host_state(world_site, h) for h in ("node1", "node2")}
    first = runtime(world_site)
    assert first.rc == 0, f"runtime playbook failed:\n{first.output[-6000:]}"
    second = runtime(world_site)
    check_converged = runtime(world_site, "--check", "--limit", FRESH_AMD64)
    yield Runs(world_site, repo_ip, check, after_check, first, second, check_converged)


def docker_on(runs: Runs, host: str, *args: str, timeout: float = 300) -> Result:
    return runs.site.exec(host, ["docker", *args], timeout=timeout)


def test_check_mode_on_fresh_hosts_succeeds_and_changes_nothing(prepared: Runs) -> None:
    assert prepared.check.rc == 0, prepared.check.output[-6000:]
    assert "Would install docker.io, containerd, runc, docker-compose" in prepared.check.stdout
    for host, state in prepared.after_check.items():
        assert state == "/etc/apt/sources.list\n", f"{host}: check mode changed the host:\n{state}"


def test_site_repo_is_the_only_apt_source(prepared: Runs) -> None:
    for host in ("node1", "arm1", "node2"):
        res = prepared.site.exec(host, ["bash", "-c", f"{SOURCES_NOW}; apt-get update --print-uris"], timeout=120)
        assert res.rc == 0, res.output
        active = [ln for ln in res.stdout.splitlines() if ln.startswith("/etc/apt")]
        assert active == ["/etc/apt/sources.list.d/offline-delivery.list"], f"{host}: {active}"
        uris = re.findall(r"^'([^']+)'", res.stdout, flags=re.M)
        assert uris and all(u.startswith(f"http://{prepared.repo_ip}:8080/apt/debian-12/") for u in uris), uris
        kept = prepared.site.exec(host, ["test", "-f", "/etc/apt/sources.list.offline-delivery.disabled"])
        assert kept.rc == 0, f"{host}: the original sources.list was not kept aside"


def test_docker_installed_from_the_site_repo_and_running(prepared: Runs) -> None:
    for host in ("node1", "arm1"):
        policy = prepared.site.exec(host, ["apt-cache", "policy", "docker.io", "docker-compose"], timeout=120)
        assert re.search(r"\*\*\* 20\.10\S* \d+\n\s+\d+ http://[\d.]+:8080/apt/debian-12 ./ Packages",
                         policy.stdout), f"{host}: {policy.output}"
        info = docker_on(prepared, host, "info", "--format", "{{json .}}", timeout=120)
        assert info.rc == 0, f"{host}: docker info failed: {info.output}"
        facts = json.loads(info.stdout)
        assert f"{prepared.repo_ip}:5000" in json.dumps(facts["RegistryConfig"]["IndexConfigs"]), facts["RegistryConfig"]
        assert facts["Driver"] == "overlay2", f"{host}: storage driver {facts['Driver']}"
        compose = docker_on(prepared, host, "compose", "version", timeout=120)
        assert compose.rc == 0 and re.search(r"version v?2\.", compose.stdout), f"{host}: {compose.output}"
        enabled = prepared.site.exec(host, ["systemctl", "is-enabled", "docker.service"])
        assert enabled.stdout.strip() == "enabled", f"{host}: {enabled.output}"
    daemon = json.loads(prepared.site.exec("arm1", ["cat", "/etc/docker/daemon.json"]).stdout)
    assert daemon["iptables"] is False and daemon["insecure-registries"] == [f"{prepared.repo_ip}:5000"]


def test_amd64_pulls_and_runs_a_shop_image_from_the_site_registry(prepared: Runs) -> None:
    ref = f"{prepared.repo_ip}:5000/{IMAGE}"
    pull = docker_on(prepared, "node1", "pull", ref)
    assert pull.rc == 0, pull.output
    run = docker_on(prepared, "node1", "run", "--rm", "--entrypoint", "python3", ref, "-c",
                    "import platform; print('shop-api-ok', platform.machine())")
    assert run.rc == 0 and "shop-api-ok x86_64" in run.stdout, run.output
    # A Docker Hub name resolves through the site registry as a mirror (there is no route to Docker Hub).
    mirrored = docker_on(prepared, "node1", "pull", IMAGE)
    assert mirrored.rc == 0, mirrored.output


def test_arm64_pulls_the_arm64_image(prepared: Runs) -> None:
    ref = f"{prepared.repo_ip}:5000/{IMAGE}"
    pull = docker_on(prepared, "arm1", "pull", ref, timeout=600)
    assert pull.rc == 0, pull.output
    arch = docker_on(prepared, "arm1", "image", "inspect", "--format", "{{.Architecture}}", ref)
    assert arch.stdout.strip() == "arm64", arch.output


def test_systemd_host_prepared_from_the_site_repo(prepared: Runs) -> None:
    res = prepared.site.exec("node2", ["bash", "-c", "zstd --version && xz --version | head -1 && "
                                                     "stat -c '%a %U %G %n' /var/lib/offline-delivery "
                                                     "/srv/offline-delivery-apps && getent group od-apps"])
    assert res.rc == 0, res.output
    assert "700 root root /var/lib/offline-delivery" in res.stdout
    assert "750 root od-apps /srv/offline-delivery-apps" in res.stdout
    docker = prepared.site.exec("node2", ["sh", "-c", "command -v dockerd"])
    assert docker.rc != 0, "the systemd host must not get a container engine"


def test_second_run_changes_nothing(prepared: Runs) -> None:
    assert prepared.second.rc == 0, prepared.second.output[-6000:]
    for host in ("node1", "arm1", "node2"):
        counts = recap(prepared.second, host)
        assert counts["changed"] == 0 and counts["failed"] == 0, f"{host}: {counts}\n{prepared.second.stdout[-6000:]}"
    assert recap(prepared.first, "node1")["changed"] > 0


def test_check_mode_on_converged_hosts_reports_no_change(prepared: Runs) -> None:
    assert prepared.check_converged.rc == 0, prepared.check_converged.output[-6000:]
    for host in ("node1", "node2"):
        counts = recap(prepared.check_converged, host)
        assert counts["changed"] == 0, f"{host}: {counts}\n{prepared.check_converged.stdout[-6000:]}"


def test_unsupported_distro_fails_naming_it(prepared: Runs) -> None:
    """Facts cannot be faked from outside, so the supported list is narrowed instead: the host's release is
    then unsupported, and the failure names it and the list."""
    res = prepared.site.jump(["ansible-playbook", "offline.delivery.runtime", "--check", "--limit", "node1",
                              "-e", f"offline_delivery_compose_group={COMPOSE}",
                              "-e", f"offline_delivery_systemd_group={SYSTEMD}",
                              "-e", json.dumps({"__repo_client_supported_distros": ["debian-13"]})], timeout=300)
    assert res.rc != 0
    text = " ".join(res.stdout.split())
    assert re.search(r"node1 runs debian-12 on x86_64: repo_client supports the distros debian-13", text), \
        res.stdout[-3000:]


def docker_started_at(runs: Runs, host: str) -> str:
    res = runs.site.exec(host, ["systemctl", "show", "docker.service", "-p", "ExecMainStartTimestampMonotonic"])
    assert res.rc == 0, res.output
    return res.stdout.strip()


def test_daemon_config_change_restarts_dockerd(prepared: Runs) -> None:
    """Last in the file: it changes node1's daemon.json, then puts it back (restarting dockerd twice)."""
    before = docker_started_at(prepared, "node1")
    option = json.dumps({"container_runtime_daemon_options": {"log-level": "warn"}})
    changed = runtime(prepared.site, "--limit", "node1", "-e", option)
    assert changed.rc == 0, changed.output[-6000:]
    assert "RUNNING HANDLER [offline.delivery.container_runtime : Restart dockerd]" in changed.stdout, \
        changed.stdout[-4000:]
    after = docker_started_at(prepared, "node1")
    assert after != before, "dockerd was not restarted after its configuration changed"
    assert docker_on(prepared, "node1", "info").rc == 0, "dockerd did not come back after the restart"
    config = json.loads(prepared.site.exec("node1", ["cat", "/etc/docker/daemon.json"]).stdout)
    assert config["log-level"] == "warn"
    restored = runtime(prepared.site, "--limit", "node1")
    assert restored.rc == 0 and recap(restored, "node1")["changed"] > 0, restored.output[-6000:]
    assert "log-level" not in json.loads(prepared.site.exec("node1", ["cat", "/etc/docker/daemon.json"]).stdout)
