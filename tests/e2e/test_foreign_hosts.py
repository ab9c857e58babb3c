"""Hosts that are not Debian (#17 item 3) and parallel pulls on a compose host (#19 item 5), on one world site.

Site `e2e-foreign` (OD_E2E_SITE_FOREIGN): a repo host, a compose host (node1, amd64, Debian 12), two systemd
hosts made foreign after they boot (fx1 amd64, fxa arm64 under qemu): apt, dpkg and their state removed,
os-release of openEuler 22.03 (ID_LIKE "rhel fedora"), and a Debian 12 systemd host beside them (deb1, amd64:
the unpack tools still come from the site repository there). Through the playbooks from the jump host: import shop
1.0.0, runtime (the foreign hosts get nothing installed and their package sources are left alone; what the
systemd target needs is checked), install (preflight says per host which targets it takes; the shop runs on all
three, an order through each host's gateway), a foreign host asked to be a compose host is refused naming what it
lacks. Last, the compose host's pull step of the shop's 4 images, one at a time against side by side
(`ComposeRuntime.prepare` with PULL_WORKERS 1 and 4, alternating; $OD_PULL_TIMES gets the figures as JSON).
"""
from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.e2e.conftest import require_world, running_site
from tests.e2e.media import carry
from tests.world.foreign import make_foreign
from tests.world.site import HostSpec, Site
from tests.world.util import docker, repo_root

pytestmark = pytest.mark.world

HOSTS = (
    HostSpec("repo", "amd64", ("offline_repo",)),
    HostSpec("node1", "amd64", ("compose_hosts",)),
    HostSpec("fx1", "amd64", ("systemd_hosts",)),
    HostSpec("fxa", "arm64", ("systemd_hosts",)),
    HostSpec("deb1", "amd64", ("systemd_hosts",)),
)
FOREIGN = ("fx1", "fxa")
TARGETS = ("node1", "fx1", "fxa", "deb1")
PLAY_TIMEOUT = 1800
# In the test world every arm64 host is emulated (dockerd needs iptables off there; no arm64 compose host here).
PULL_ROUNDS = 3


def ok(res: Any, what: str) -> Any:
    assert res.rc == 0, f"{what} failed (rc {res.rc}):\n{res.output[-6000:]}"
    return res


def flat(text: str) -> str:
    return " ".join(text.split())


def order(site: Site, host: str) -> Any:
    script = ("import json,urllib.request as u\n"
              "r=u.Request('http://127.0.0.1:8080/api/orders',data=json.dumps({'item':'pen','quantity':1}).encode(),"
              "method='POST',headers={'Content-Type':'application/json'})\n"
              "print(u.urlopen(r,timeout=20).read().decode())\n")
    res = site.exec(host, ["python3", "-c", script], timeout=60)
    assert res.rc == 0, f"an order on {host}: {res.output[-2000:]}"
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def site(shop_bundles: dict[str, Path]) -> Iterator[Site]:
    require_world(h.arch for h in HOSTS)
    yield from running_site(Site(os.environ.get("OD_E2E_SITE_FOREIGN", "e2e-foreign"), HOSTS))


@pytest.fixture(scope="module")
def installed(site: Site, shop_bundles: dict[str, Path]) -> dict[str, Any]:
    for host in FOREIGN:
        make_foreign(site, host)
    carry(site, {"shop-1.0.0": shop_bundles["shop-1.0.0"], "vendor.pub": shop_bundles["vendor.pub"]})
    keys = json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})
    ok(site.jump(["ansible-playbook", "offline.delivery.import", "-e", "offline_delivery_bundle_src=/srv/transfer/shop-1.0.0",
                  "-e", keys], timeout=PLAY_TIMEOUT), "import 1.0.0")
    runtime = ok(site.jump(["ansible-playbook", "offline.delivery.runtime"], timeout=PLAY_TIMEOUT), "runtime")
    install = ok(site.jump(["ansible-playbook", "offline.delivery.install", "-e", "app_name=shop",
                            "-e", "app_version=1.0.0"], timeout=PLAY_TIMEOUT), "install 1.0.0")
    return {"runtime": runtime, "install": install, "orders": {h: order(site, h) for h in TARGETS}}


def test_foreign_hosts_have_no_package_manager_and_another_family(site: Site, installed: dict[str, Any]) -> None:
    facts = ok(site.jump(["ansible", "fx1:fxa", "-m", "ansible.builtin.setup", "-a",
                          "filter=ansible_distribution*,ansible_os_family,ansible_pkg_mgr"]), "setup")
    text = flat(facts.stdout)
    for host in FOREIGN:
        assert site.exec(host, "command -v apt-get || command -v dpkg || test -e /var/lib/dpkg").rc != 0
    assert text.count('"ansible_distribution": "openEuler"') == 2, facts.stdout[-3000:]
    assert text.count('"ansible_pkg_mgr": "apt"') == 0


def test_runtime_installs_nothing_on_a_foreign_host_and_checks_it(site: Site, installed: dict[str, Any]) -> None:
    out = flat(installed["runtime"].stdout)
    for host in FOREIGN:
        assert re.search(rf"{host} runs openeuler-22\S* \(RedHat family, package manager \w+\): the site repository "
                         r"carries packages for debian-12 only, so nothing is installed here", out), out[-4000:]
        assert re.search(rf"{host} runs openeuler-22\S*: the site repository carries packages for debian-12 only, so "
                         r"this host's package sources are left as they are", out), out[-4000:]
        res = site.exec(host, "getent group od-apps && stat -c %a /var/lib/offline-delivery /srv/offline-delivery-apps")
        assert res.rc == 0 and res.stdout.split()[-2:] == ["700", "750"], res.output
    # the Debian hosts got their packages from the site repository as before
    assert site.exec("node1", "docker compose version").rc == 0
    res = site.exec("deb1", "dpkg-query -W -f '${db:Status-Status}\\n' zstd xz-utils; "
                            "cat /etc/apt/sources.list.d/offline-delivery.list")
    assert res.stdout.split()[:2] == ["installed", "installed"] and "deb " in res.stdout, res.output
    assert not re.search(r"deb1 runs debian-12 .*nothing is installed", out)


def test_preflight_says_which_targets_each_host_takes(installed: dict[str, Any]) -> None:
    out = flat(installed["install"].stdout)
    for host in FOREIGN:
        assert re.search(rf"{host} \(openEuler-22\.03, (x86_64|aarch64), python 3\.\d+\.\d+, systemd \d+\): compose no "
                         r"\(the Docker engine and Compose v2 [^)]*\)\), systemd yes, k8s yes", out), out[-5000:]
    assert re.search(r"node1 \(debian-12, x86_64, python 3\.\d+\.\d+, systemd \d+\): compose yes, systemd yes, "
                     r"k8s yes", out), out[-5000:]
    assert re.search(r"deb1 \(debian-12, x86_64, python 3\.\d+\.\d+, systemd \d+\): compose no \(the Docker engine "
                     r"[^)]*\)\), systemd yes, k8s yes", out), out[-5000:]


def test_the_shop_runs_on_the_foreign_hosts(installed: dict[str, Any], site: Site) -> None:
    for host in TARGETS:
        assert installed["orders"][host]["item"] == "pen", installed["orders"][host]
    for host in FOREIGN + ("deb1",):
        res = site.exec(host, "systemctl is-active od-shop-db od-shop-redis od-shop-api od-shop-gateway")
        assert res.stdout.split() == ["active"] * 4, res.output


def test_a_foreign_host_is_refused_as_a_compose_host_naming_what_it_lacks(site: Site,
                                                                          installed: dict[str, Any]) -> None:
    res = site.jump(["ansible-playbook", "offline.delivery.install", "--check", "--limit", "repo:fx1",
                     "-e", "app_name=shop", "-e", "offline_delivery_target=compose"], timeout=PLAY_TIMEOUT)
    assert res.rc != 0
    assert re.search(r"fx1 \(openEuler-22\.03 on x86_64\) cannot take the compose target: it lacks the Docker engine "
                     r"and Compose v2", flat(res.stdout)), res.stdout[-3000:]


def test_pull_step_side_by_side_against_one_at_a_time(site: Site, installed: dict[str, Any]) -> None:
    """The compose host's prepare() for the shop's 4 images, from the site registry, with the images removed
    before each round: PULL_WORKERS 1 (one after another, as before #19 item 5) and 4, alternating."""
    project = site.exec("node1", "cat /srv/offline-delivery-apps/shop/compose.yaml")   # what prepare() was given
    services = json.loads(project.stdout.split("\n", 2)[2])["services"]
    images = {name: service["image"] for name, service in services.items()}
    assert len(set(images.values())) == 4, project.output
    ok(site.exec("node1", "docker rm -f $(docker ps -aq --filter label=io.offline-delivery.app=shop)"), "rm")
    # the collection's own compose target code, as the module ships it (package "od")
    ok(site.exec("node1", "rm -rf /tmp/od-pull /tmp/od-copy"), "clean")
    ok(docker("cp", str(repo_root() / "plugins" / "module_utils"), f"{site.container('node1')}:/tmp/od-copy"), "copy")
    driver = ("import json,subprocess,sys,time,types\nsys.path.insert(0,'/tmp/od-pull')\n"
              "from od.targets import compose\n"
              "def run(a):\n p=subprocess.run(a,capture_output=True,text=True); return p.returncode,p.stdout,p.stderr\n"
              "compose.PULL_WORKERS=int(sys.argv[2])\n"
              "rt=compose.ComposeRuntime('pullbench',apps_dir='/tmp/od-pull/apps',state_dir='/tmp/od-pull/s',run=run)\n"
              "specs=[types.SimpleNamespace(name=n,image=i,reference=i) for n,i in json.loads(sys.argv[1]).items()]\n"
              "t=time.monotonic(); rt.prepare(specs); print(round(time.monotonic()-t,3))\n")
    ok(site.exec("node1", "mkdir -p /tmp/od-pull && mv /tmp/od-copy /tmp/od-pull/od"), "mv")
    times: dict[str, list[float]] = {"1": [], "4": []}
    for _ in range(PULL_ROUNDS):
        for workers in ("1", "4"):
            ok(site.exec("node1", "docker rmi " + " ".join(sorted(set(images.values())))
                         + " && docker image prune -f >/dev/null"), "rmi")
            res = ok(site.exec("node1", ["python3", "-c", driver, json.dumps(images), workers], timeout=600), "pull")
            times[workers].append(float(res.stdout.strip().splitlines()[-1]))
    present = site.exec("node1", "docker image inspect " + " ".join(sorted(set(images.values()))))
    assert present.rc == 0, present.output
    figures = {"rounds": PULL_ROUNDS, "one_at_a_time_s": times["1"], "side_by_side_s": times["4"],
               "median_one_at_a_time_s": statistics.median(times["1"]),
               "median_side_by_side_s": statistics.median(times["4"])}
    print("pull step of the shop's 4 images on node1:", json.dumps(figures))
    if os.environ.get("OD_PULL_TIMES"):
        Path(os.environ["OD_PULL_TIMES"]).write_text(json.dumps(figures, indent=1) + "\n")
