"""Items 5 (lifecycle faults) and 6 (secrets never shown) of the fault suite, on one small world site.

Site `f2` (OD_FAULTS_SITE): repo, node1 (compose, amd64), node3 (systemd, amd64); the shop bundles of the e2e
suite. Every playbook runs from the jump host with -vvv; each output is kept for the secrets check. Stages, each
a fixture on the one before, each test asserting the error AND the state before/after (state.json, running
containers/units and their start times, the orders in the database):

  installed     import 1.0.0, 1.1.0, 1.2.0; runtime; install 1.0.0; an order per host
  interrupted   upgrade to 1.1.0, ansible-playbook killed (-9) on the jump host once node3 rewrote the api
                unit; a rerun completes; one container/unit per component
  rolled_back   rollback to 1.0.0 (the normal path, so the next stage is an upgrade again)
  host_away     upgrade to 1.1.0 with node3 frozen (docker pause) mid-deploy and its connection dropped:
                node1 finishes, the play names node3; each state says what happened; unpaused, a rerun completes
  broken        upgrade to 1.2.0 (api /healthz answers 500): fails naming api, rolled back, data intact
  pruned        1.0.0's api image deleted from the registry storage and from both hosts, then rollback:
                a clear error naming the image before anything is stopped (start times unchanged)
  secrets       status -vvv; no generated secret in any output, report, compose file, unit file, state.json
                or journal; the secret files are 0600 root
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.e2e.conftest import require_world, running_site, shop_bundles  # noqa: F401  (fixture re-export)
from tests.e2e.media import carry, recap
from tests.e2e.test_lifecycle import SECRETS_FILE, http, ok, play, start_times  # noqa: F401
from tests.world.site import HostSpec, Site
from tests.world.util import Result, docker

pytestmark = [pytest.mark.world, pytest.mark.timeout(1800)]

HOSTS = (
    HostSpec("repo", "amd64", ("offline_repo",)),
    HostSpec("node1", "amd64", ("compose_hosts",)),   # compose (test_lifecycle.COMPOSE names node1)
    HostSpec("node3", "amd64", ("systemd_hosts",)),
)
TARGETS = ("node1", "node3")
COMPONENTS = ("api", "db", "gateway", "redis")
STATE = "/var/lib/offline-delivery/apps/shop/state.json"
APPS = "/srv/offline-delivery-apps/shop"
API_UNIT = "/etc/systemd/system/od-shop-api.service"
OUTPUTS: dict[str, Result] = {}     # every playbook run of the module, for the secrets check
WAIT = 600                          # bound on any wait for a mid-run trigger (s)
LOG_DIR = os.environ.get("OD_FAULTS_LOG_DIR", "")


def run(site: Site, name: str, playbook: str, *args: str) -> Result:
    res = play(site, playbook, "-vvv", *args)
    OUTPUTS[name] = res
    if LOG_DIR:  # the -vvv outputs are long: keep them for reading (dev loops)
        Path(LOG_DIR).mkdir(parents=True, exist_ok=True)
        (Path(LOG_DIR) / (name.replace(" ", "_").replace("/", "-") + ".log")).write_text(res.output)
    return res


def fatal(res: Result, what: str) -> Result:
    """Like ok(), but shows the fatal lines and the recap (a -vvv output's tail is only noise)."""
    lines = [x for x in res.stdout.splitlines() if x.startswith(("fatal:", "failed:")) or " : ok=" in x]
    assert res.rc == 0, f"{what} failed (rc {res.rc}):\n" + "\n".join(x[:3000] for x in lines)
    return res


def fatal_msg(res: Result, host: str) -> str:
    """The msg of the first failure reported for ``host`` (-vvv prints the result as multi-line JSON)."""
    lines = res.stdout.splitlines()
    start = next((i for i, x in enumerate(lines) if x.startswith(f"fatal: [{host}]")), None)
    assert start is not None, f"no failure reported for {host}"
    first = lines[start]
    if '"msg":' in first:
        return first
    msg = next((x for x in lines[start + 1:start + 400] if x.lstrip().startswith('"msg":')), "")
    assert msg, f"no msg in the failure of {host}: {lines[start:start + 40]}"
    return json.loads("{" + msg.strip().rstrip(",") + "}")["msg"]


def state(site: Site, host: str) -> dict[str, Any]:
    res = site.exec(host, ["cat", STATE], timeout=30)
    assert res.rc == 0, f"{host}: {res.output}"
    return json.loads(res.stdout)


def current(site: Site, host: str) -> str:
    return (state(site, host)["current"] or {}).get("version", "")


def orders(site: Site, host: str) -> list[str]:
    return [o["item"] for o in http(site, host, "GET", "/orders")["orders"]]


def snapshot(site: Site) -> dict[str, Any]:
    """What each target runs and holds: versions, start times, orders."""
    return {h: {"state": state(site, h), "times": start_times(site, h), "orders": orders(site, h)} for h in TARGETS}


def running_per_component(site: Site, host: str) -> dict[str, int]:
    """How many containers/units run each component (a rerun must not leave two)."""
    if host == "node1":
        cmd = ("docker ps --filter label=io.offline-delivery.app=shop --format "
               "'{{.Label \"com.docker.compose.service\"}}'")
    else:
        cmd = "systemctl list-units --no-legend --plain --state=active 'od-shop-*' | awk '{print $1}'"
    res = site.exec(host, cmd, timeout=60)
    assert res.rc == 0, res.output
    counts: dict[str, int] = {}
    for line in res.stdout.split():
        name = line.removeprefix("od-shop-").removesuffix(".service")
        counts[name] = counts.get(name, 0) + 1
    return counts


def api_unit_mark(site: Site) -> str:
    return site.exec("node3", f"head -n1 {API_UNIT}", timeout=30).stdout.strip()


def in_background(site: Site, name: str, playbook: str, *args: str) -> tuple[threading.Thread, dict[str, Result]]:
    box: dict[str, Result] = {}

    def target() -> None:
        box["res"] = run(site, name, playbook, *args)
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def wait_for(what: str, check: Callable[[], bool], thread: threading.Thread, timeout: float = WAIT) -> None:
    """Poll ``check`` (bounded) while the playbook runs; fail if the playbook ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not thread.is_alive():
            raise AssertionError(f"the playbook ended before {what}")
        time.sleep(0.5)
    raise AssertionError(f"no {what} within {timeout}s")


def jump_pids(site: Site, pattern: str) -> list[int]:
    """PIDs in the jump host whose command line contains ``pattern`` (processes this module started)."""
    res = site.jump(["ps", "-eo", "pid=,args="], timeout=30)
    return [int(line.split(None, 1)[0]) for line in res.stdout.splitlines()
            if pattern in line and "ps -eo" not in line]


# --------------------------------------------------------------------------------------------------------
# Stages


@pytest.fixture(scope="module")
def site(shop_bundles: dict[str, Path]) -> Iterator[Site]:  # noqa: F811
    require_world(h.arch for h in HOSTS)
    name = os.environ.get("OD_FAULTS_SITE", "f2")
    if os.environ.get("OD_FAULTS_REUSE") == "1" and Site(name, HOSTS).exists():
        yield Site.load(name)  # dev loops: a site an earlier OD_WORLD_KEEP=1 run left up, reused as it is
        return
    yield from running_site(Site(name, HOSTS))


@pytest.fixture(scope="module")
def installed(site: Site, shop_bundles: dict[str, Path]) -> dict[str, Any]:  # noqa: F811
    carry(site, {n: shop_bundles[n] for n in ("shop-1.0.0", "shop-1.1.0", "shop-1.2.0", "vendor.pub")})
    keys = json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})
    for version in ("1.0.0", "1.1.0", "1.2.0"):  # a no-op when already imported (reused site)
        ok(site.jump(["ansible-playbook", "offline.delivery.import", "-e",
                      f"offline_delivery_bundle_src=/srv/transfer/shop-{version}", "-e", keys], timeout=1800),
           f"import {version}")
    ok(site.jump(["ansible-playbook", "offline.delivery.runtime"], timeout=1800), "runtime")
    fatal(run(site, "install 1.0.0", "install", "-e", "app_version=1.0.0"), "install 1.0.0")
    for host in TARGETS:
        if f"order-{host}" not in orders(site, host):
            http(site, host, "POST", "/orders", {"item": f"order-{host}", "quantity": 1})
    secrets = json.loads(site.exec("repo", ["cat", SECRETS_FILE]).stdout)
    return {"secrets": secrets, "after": snapshot(site)}


@pytest.fixture(scope="module")
def interrupted(site: Site, installed: dict[str, Any]) -> dict[str, Any]:
    before = snapshot(site)
    mark = api_unit_mark(site)
    thread, box = in_background(site, "upgrade 1.1.0 (killed)", "upgrade", "-e", "app_version=1.1.0")
    wait_for("rewrite of node3's api unit", lambda: api_unit_mark(site) != mark, thread)
    killed = jump_pids(site, "ansible-playbook offline.delivery.upgrade")
    assert killed, "no ansible-playbook process found in the jump host"
    site.jump(["kill", "-9", *map(str, killed)], timeout=30)
    thread.join(120)
    assert not thread.is_alive(), "the killed playbook did not end"
    middle = {h: state(site, h) for h in TARGETS}
    # The deploy modules already started on the hosts outlive the controller: the rerun's modules wait for them
    # on the per-app lock of each host (app_state.app_lock) instead of racing them.
    rerun = run(site, "upgrade 1.1.0 (rerun after kill)", "upgrade", "-e", "app_version=1.1.0")
    return {"before": before, "killed": box.get("res"), "middle": middle, "rerun": rerun, "after": snapshot(site)}


def test_an_upgrade_killed_mid_run_completes_when_run_again(site: Site, interrupted: dict[str, Any]) -> None:
    assert interrupted["killed"] is not None and interrupted["killed"].rc != 0, "the killed run must not succeed"
    for host in TARGETS:
        middle = interrupted["middle"][host]
        assert (middle["current"] or {}).get("version") in ("1.0.0", "1.1.0"), (host, middle["current"])
    fatal(interrupted["rerun"], "rerun of the killed upgrade")
    for host in TARGETS:
        after = interrupted["after"][host]
        assert after["state"]["current"]["version"] == "1.1.0"
        assert after["orders"] == interrupted["before"][host]["orders"], f"{host}: the orders survived"
        assert running_per_component(site, host) == {c: 1 for c in COMPONENTS}, f"{host}: duplicate components"
        for name in ("db", "redis"):
            assert after["times"][name] == interrupted["before"][host]["times"][name], \
                f"{host}: {name} restarted by an upgrade that does not change it"
        upgrades = [e for e in after["state"]["history"] if e.get("to") == "1.1.0" and e.get("result") == "ok"]
        assert upgrades, f"{host}: no successful upgrade in the history: {after['state']['history'][-3:]}"


@pytest.fixture(scope="module")
def rolled_back(site: Site, interrupted: dict[str, Any]) -> dict[str, Any]:
    res = fatal(run(site, "rollback to 1.0.0", "rollback"), "rollback")
    return {"run": res, "after": snapshot(site)}


def test_a_rollback_after_the_rerun_returns_to_1_0_0(rolled_back: dict[str, Any]) -> None:
    for host in TARGETS:
        assert rolled_back["after"][host]["state"]["current"]["version"] == "1.0.0"
        assert f"order-{host}" in rolled_back["after"][host]["orders"]


@pytest.fixture(scope="module")
def host_away(site: Site, rolled_back: dict[str, Any]) -> Iterator[dict[str, Any]]:
    before = snapshot(site)
    mark = api_unit_mark(site)
    node3 = site.container("node3")
    thread, box = in_background(site, "upgrade 1.1.0 (node3 away)", "upgrade", "-e", "app_version=1.1.0")
    paused = False
    try:
        wait_for("rewrite of node3's api unit", lambda: api_unit_mark(site) != mark, thread)
        docker("pause", node3, timeout=60).check("docker pause node3")
        paused = True
        wait_for("node1 at 1.1.0", lambda: current(site, "node1") == "1.1.0", thread)
        node1_done = state(site, "node1")
        # The host is gone: its ssh connections break (what ansible sees when a host vanishes from the network).
        ip = site.ips()["node3"]
        for pid in jump_pids(site, f"@{ip}") + jump_pids(site, f" {ip} "):
            site.jump(["kill", str(pid)], timeout=30)
        thread.join(300)
        assert not thread.is_alive(), "the playbook did not end after node3's connection dropped"
        docker("unpause", node3, timeout=60).check("docker unpause node3")
        paused = False
        time.sleep(5)  # let node3's interrupted module see its closed connection
        middle = {h: state(site, h) for h in TARGETS}
        rerun = run(site, "upgrade 1.1.0 (rerun after node3 came back)", "upgrade", "-e", "app_version=1.1.0")
        yield {"before": before, "run": box.get("res"), "node1_done": node1_done, "middle": middle, "rerun": rerun,
               "after": snapshot(site)}
    finally:
        if paused:
            docker("unpause", node3, timeout=60)


def test_a_host_gone_mid_upgrade_leaves_the_other_finished_and_a_rerun_completes(
        site: Site, host_away: dict[str, Any]) -> None:
    res = host_away["run"]
    assert res is not None and res.rc != 0, "a host that vanished must fail the play"
    assert recap(res, "node1")["failed"] == 0, res.stdout[-3000:]
    node3 = recap(res, "node3")
    assert node3.get("unreachable", 0) + node3.get("failed", 0) >= 1, res.stdout[-3000:]
    done = host_away["node1_done"]
    assert done["current"]["version"] == "1.1.0" and done["history"][-1]["result"] == "ok"
    away = host_away["middle"]["node3"]
    assert away["current"]["version"] in ("1.0.0", "1.1.0"), away["current"]
    fatal(host_away["rerun"], "rerun after node3 came back")
    for host in TARGETS:
        after = host_away["after"][host]
        assert after["state"]["current"]["version"] == "1.1.0"
        assert after["orders"] == host_away["before"][host]["orders"]
        assert running_per_component(site, host) == {c: 1 for c in COMPONENTS}
        assert after["times"]["db"] == host_away["before"][host]["times"]["db"], f"{host}: db restarted"
    assert "by_item" in http(site, "node3", "GET", "/orders/summary"), "1.1.0's endpoint answers on node3"


@pytest.fixture(scope="module")
def broken(site: Site, host_away: dict[str, Any]) -> dict[str, Any]:
    before = snapshot(site)
    res = run(site, "upgrade 1.2.0 (health fails)", "upgrade", "-e", "app_version=1.2.0")
    return {"before": before, "run": res, "after": snapshot(site)}


def test_a_failed_health_check_rolls_back_with_the_data(broken: dict[str, Any]) -> None:
    res = broken["run"]
    assert res.rc != 0
    for host in TARGETS:
        assert recap(res, host)["failed"] == 1
        line = fatal_msg(res, host)
        assert f"shop 1.2.0 on {host}: component api failed its health check" in line, line[:2000]
        assert "rolled back to 1.1.0, which is healthy" in line, line[:2000]
        before, after = broken["before"][host], broken["after"][host]
        assert after["state"]["current"]["version"] == "1.1.0"
        assert after["state"]["current"]["fingerprints"] == before["state"]["current"]["fingerprints"]
        event = after["state"]["history"][-1]
        assert (event["to"], event["result"], event["component"], event["rolled_back_to"]) == \
            ("1.2.0", "failed", "api", "1.1.0"), event
        assert after["orders"] == before["orders"] and f"order-{host}" in after["orders"], "data intact"
        for name in ("db", "redis", "gateway"):
            assert after["times"][name] == before["times"][name], f"{host}: {name} restarted"


def _prune_api_1_0_0(site: Site, release: dict[str, Any]) -> str:
    """Delete shop/api 1.0.0 from the registry storage and both hosts; returns the index digest."""
    image = release["images"]["api"]   # {"reference", "index", "manifests": {platform: digest}}
    index = image["index"]
    hexes = [d.split(":", 1)[1] for d in [index, *image["manifests"].values()]]
    script = ("set -e; base=$(find / -xdev -type d -path '*/docker/registry/v2/repositories/shop/api' 2>/dev/null "
              "| head -n1); test -n \"$base\"; rm -rf \"$base/_manifests/tags/1.0.0\"; "
              + "".join(f"rm -rf \"$base/_manifests/revisions/sha256/{h}\"; " for h in hexes)
              + "systemctl restart docker-registry; echo $base")
    res = site.exec("repo", script, timeout=120)
    assert res.rc == 0, res.output
    res = site.exec("node1", "docker image ls --digests --format '{{.Repository}}@{{.Digest}} {{.ID}}' | "
                             f"awk '$1 ~ /{index}/ {{print $2}}' | xargs -r docker rmi -f", timeout=120)
    assert res.rc == 0, res.output
    res = site.exec("node3", f"ls {APPS}/images", timeout=30)
    for entry in res.stdout.split():
        if any(h in entry for h in hexes):
            assert site.exec("node3", ["rm", "-rf", f"{APPS}/images/{entry}"], timeout=120).rc == 0
    return index


@pytest.fixture(scope="module")
def pruned(site: Site, broken: dict[str, Any]) -> dict[str, Any]:
    release = state(site, "node1")["releases"]["1.0.0"]
    index = _prune_api_1_0_0(site, release)
    before = snapshot(site)
    res = run(site, "rollback (images pruned)", "rollback")
    return {"index": index, "release": release, "before": before, "run": res, "after": snapshot(site)}


def test_a_rollback_to_pruned_images_fails_before_any_change(pruned: dict[str, Any]) -> None:
    res = pruned["run"]
    assert res.rc != 0, "a rollback whose images are gone must fail"
    for host in TARGETS:
        line = fatal_msg(res, host)
        assert "shop/api:1.0.0" in line or pruned["index"] in line, line[:2000]
        assert "nothing was changed" in line and "rolled back" not in line, line[:2000]
        before, after = pruned["before"][host], pruned["after"][host]
        assert after["times"] == before["times"], f"{host}: a component was restarted before the error"
        assert after["state"]["current"] == before["state"]["current"], f"{host}: the state moved"
        assert after["orders"] == before["orders"]


@pytest.fixture(scope="module")
def secrets_seen(site: Site, installed: dict[str, Any], pruned: dict[str, Any]) -> dict[str, Any]:
    status = fatal(run(site, "status", "status", "-e", "app_report_dir=/srv/transfer/reports"), "status")
    files = {}
    for host in TARGETS:
        listing = (f"cat {STATE}; cat {APPS}/compose.yaml 2>/dev/null; cat /etc/systemd/system/od-shop-*.service "
                   "2>/dev/null; journalctl --no-pager -o cat 2>/dev/null | tail -n 20000")
        files[host] = site.exec(host, listing, timeout=120).stdout
        modes = site.exec(host, "stat -c '%a %U %n' /var/lib/offline-delivery/apps/shop/env/*.env", timeout=30)
        files[f"{host} modes"] = modes.stdout
    reports = site.transfer_dir / "reports"
    files["reports"] = "".join(p.read_text() for p in sorted(reports.iterdir()))
    files["repo secrets mode"] = site.exec("repo", f"stat -c '%a %U' {SECRETS_FILE}", timeout=30).stdout
    return {"status": status, "files": files}


def test_no_secret_appears_anywhere(installed: dict[str, Any], secrets_seen: dict[str, Any]) -> None:
    values = list(installed["secrets"].values())
    assert values and all(len(v) >= 16 for v in values)
    assert {"install 1.0.0", "rollback to 1.0.0", "upgrade 1.2.0 (health fails)", "status"} <= set(OUTPUTS)
    for name, res in OUTPUTS.items():
        assert "<ESTABLISH SSH CONNECTION" in res.output or "ESTABLISH" in res.output, f"{name} was not -vvv"
        for value in values:
            assert value not in res.output, f"a generated secret appears in the -vvv output of {name}"
    for where, text in secrets_seen["files"].items():
        for value in values:
            assert value not in text, f"a generated secret appears in {where}"
    assert secrets_seen["files"]["repo secrets mode"].split() == ["600", "root"]
    for host in TARGETS:
        lines = secrets_seen["files"][f"{host} modes"].splitlines()
        assert len(lines) == len(COMPONENTS) and all(l.startswith("600 root ") for l in lines), lines
