"""Two air-gapped sites from one inventory and one controller, installed in waves with a canary site first.

Sites `e2e-ma` (the canary) and `e2e-mb`, each a repo host and one compose host (amd64). Site a's jump host also
joins site b's internal network (tests/world/multisite.py), so one controller reaches both; the merged inventory
names each site (`offline_delivery_site`, `offline_delivery_repo_host` in the site group's vars). Stages:

  prepared   one import run per release into both repo hosts (1.0.0, the broken 1.2.0); runtime on both sites
  installed  ONE install run in waves: site a's host, then site b's (serial [1, "100%"], max_fail_percentage 0);
             each site pulls from its own repo, has its own secrets, answers through its gateway
  canary     upgrade to 1.2.0 in the same waves: site a fails its health gate and rolls back, the rollout stops,
             site b is never touched (same containers, same start times, still 1.0.0)
  rollouts   the same through `offline-delivery rollout` and a policy file (wave 1 = site a, the canary;
             wave 2 = site b), run from this machine: (1) upgrade to the broken 1.2.0: the canary fails, site b
             is not started; (2) upgrade to 1.1.0 with a site override on site b only that keeps its API from
             starting: site a keeps 1.1.0, site b fails its gate, is back on 1.0.0 and serving; each time the
             printed table names every site's state
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.e2e.conftest import require_world, running_site
from tests.e2e.media import carry, recap
from tests.e2e.test_lifecycle import http, ok, start_times
from tests.world.multisite import connect_jump, disconnect_jump, merged_inventory, site_label, write_merged_inventory
from tests.world.site import HostSpec, Site
from tests.world.util import Result, repo_root

pytestmark = pytest.mark.world

HOSTS = (
    HostSpec("repo", "amd64", ("offline_repo",)),
    HostSpec("node1", "amd64", ("compose_hosts",)),
)
PLAY_TIMEOUT = 1800
DEPLOY_PLAY = "PLAY [Deploy the release on the targets]"
SECRETS_FILE = "/var/lib/offline-delivery/apps/shop/secrets.json"
COMPOSE_FILE = "/srv/offline-delivery-apps/shop/compose.yaml"
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def sites(shop_bundles: dict[str, Path]) -> Iterator[tuple[Site, Site]]:
    """Both sites up, site a's jump host on both networks; detached again before either goes down."""
    require_world(h.arch for h in HOSTS)
    a = Site(os.environ.get("OD_E2E_SITE_MA", "e2e-ma"), HOSTS)
    b = Site(os.environ.get("OD_E2E_SITE_MB", "e2e-mb"), HOSTS)
    up = contextlib.contextmanager(running_site)
    with up(a), up(b):
        try:
            connect_jump(a, [b])
            yield a, b
        finally:
            disconnect_jump(a, [b])
    if os.environ.get("OD_MULTISITE_TIMES"):
        Path(os.environ["OD_MULTISITE_TIMES"]).write_text(json.dumps(TIMES, indent=1) + "\n")


def waves(a: Site, b: Site) -> dict[str, Any]:
    """The rollout policy: site a's targets first as a one-host canary wave, then everything else."""
    return {"offline_delivery_app_hosts": f"{site_label(a)}:{site_label(b)}:&compose_hosts",
            "offline_delivery_serial": [1, "100%"],
            "offline_delivery_max_fail_percentage": 0}


def host(site: Site, name: str) -> str:
    """A host's name in the merged inventory."""
    return f"{site.name}-{name}"


def run(controller: Site, inventory: str, playbook: str, *args: str, step: str) -> Result:
    started = time.monotonic()
    res = controller.jump(["ansible-playbook", "-i", inventory, f"offline.delivery.{playbook}", *args],
                          timeout=PLAY_TIMEOUT)
    TIMES[step] = round(time.monotonic() - started, 1)
    return res


def deploy_batches(result: Result) -> list[str]:
    """The output of each serial batch of the deploy play (Ansible prints the play header once per batch)."""
    return result.stdout.split(DEPLOY_PLAY)[1:]


def images(site: Site) -> set[str]:
    res = site.exec("node1", "docker ps --filter label=io.offline-delivery.app=shop --format '{{.Image}}'")
    assert res.rc == 0, res.output
    return set(res.stdout.split())


@pytest.fixture(scope="module")
def prepared(sites: tuple[Site, Site], shop_bundles: dict[str, Path]) -> str:
    """Both repo hosts hold shop 1.0.0 and 1.2.0 (one import run each, both sites at once); runtimes ready."""
    a, b = sites
    inventory = write_merged_inventory(a, [a, b])
    carry(a, {name: shop_bundles[name] for name in ("shop-1.0.0", "shop-1.2.0", "vendor.pub")})
    keys = json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})
    for version in ("1.0.0", "1.2.0"):
        res = ok(run(a, inventory, "import", "-e", f"offline_delivery_bundle_src=/srv/transfer/shop-{version}",
                     "-e", keys, step=f"import {version} (both sites)"), f"import {version}")
        for site in (a, b):
            assert recap(res, host(site, "repo"))["failed"] == 0
    ok(run(a, inventory, "runtime", step="runtime (both sites)"), "runtime")
    return inventory


@pytest.fixture(scope="module")
def installed(sites: tuple[Site, Site], prepared: str) -> dict[str, Any]:
    a, b = sites
    res = ok(run(a, prepared, "install", "-e", "app_name=shop", "-e", "app_version=1.0.0",
                 "-e", json.dumps(waves(a, b)), step="install 1.0.0 in waves"), "install in waves")
    orders = {s.name: http(s, "node1", "POST", "/orders", {"item": f"book-{s.name}", "quantity": 1}) for s in sites}
    return {"run": res, "orders": orders}


def test_one_run_installs_both_sites_canary_first(sites: tuple[Site, Site], installed: dict[str, Any]) -> None:
    a, b = sites
    batches = deploy_batches(installed["run"])
    assert len(batches) == 2, f"expected two waves, got {len(batches)}:\n{installed['run'].stdout[-4000:]}"
    assert f"[{host(a, 'node1')}]" in batches[0] and f"[{host(b, 'node1')}]" not in batches[0]
    assert f"[{host(b, 'node1')}]" in batches[1] and f"[{host(a, 'node1')}]" not in batches[1]
    for site in sites:
        assert recap(installed["run"], host(site, "node1"))["failed"] == 0
        listing = http(site, "node1", "GET", "/orders")
        assert [o["item"] for o in listing["orders"]] == [f"book-{site.name}"]


def test_each_site_pulls_from_its_own_repo(sites: tuple[Site, Site], installed: dict[str, Any]) -> None:
    for site in sites:
        repo_ip = site.ips()["repo"]
        running = images(site)
        assert running and all(i.startswith(f"{repo_ip}:5000/shop/") for i in running), (site.name, running)
        compose = yaml.safe_load(site.exec("node1", f"cat {COMPOSE_FILE}").stdout)  # YAML or JSON
        refs = [service["image"] for service in compose["services"].values()]
        assert refs and all(r.startswith(f"{repo_ip}:5000/") for r in refs), (site.name, refs)


def test_each_site_has_its_own_secrets(sites: tuple[Site, Site], installed: dict[str, Any]) -> None:
    found = [json.loads(s.exec("repo", f"cat {SECRETS_FILE}").stdout) for s in sites]
    assert found[0].keys() == found[1].keys() and found[0]["db_password"] != found[1]["db_password"]
    for secrets in found:
        assert all(value not in installed["run"].output for value in secrets.values())


@pytest.fixture(scope="module")
def canary(sites: tuple[Site, Site], prepared: str, installed: dict[str, Any]) -> dict[str, Any]:
    a, b = sites
    before = {s.name: (start_times(s, "node1"), images(s)) for s in sites}
    res = run(a, prepared, "upgrade", "-e", "app_name=shop", "-e", "app_version=1.2.0",
              "-e", json.dumps(waves(a, b)), step="upgrade 1.2.0 in waves (canary fails, rollout stops)")
    return {"run": res, "before": before, "after": {s.name: (start_times(s, "node1"), images(s)) for s in sites}}


def test_a_failing_canary_stops_the_rollout_before_site_b(sites: tuple[Site, Site], canary: dict[str, Any]) -> None:
    a, b = sites
    run_ = canary["run"]
    assert run_.rc != 0, "a canary failing its health gate must fail the rollout"
    assert recap(run_, host(a, "node1"))["failed"] == 1
    fatal = next(line for line in run_.stdout.splitlines() if line.startswith(f"fatal: [{host(a, 'node1')}]"))
    assert "component api failed its health check" in fatal and "rolled back to 1.0.0" in fatal
    batches = deploy_batches(run_)
    assert len(batches) == 1, "the second wave must not start"
    assert f"[{host(b, 'node1')}]" not in batches[0]
    assert recap(run_, host(b, "node1"))["changed"] == 0
    assert canary["after"][b.name] == canary["before"][b.name], "site b's containers were touched"


def test_the_canary_site_serves_its_previous_release(sites: tuple[Site, Site], canary: dict[str, Any]) -> None:
    for site in sites:
        assert all(i.endswith(":1.0.0") for i in canary["after"][site.name][1]), canary["after"][site.name]
        listing = http(site, "node1", "GET", "/orders")
        assert [o["item"] for o in listing["orders"]] == [f"book-{site.name}"], "the data survived"


# ------------------------------------------------------------------------------------------------------------
# offline-delivery rollout: the policy's waves by site group, a stop, every site's state in one table


# Makes the API exit at start on the site that gets it (int("not-a-number")): its health gate fails.
BREAK_API = {"api": {"SHOP_PAGE_SIZE": "not-a-number"}}


def offline_delivery(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The `offline-delivery` command on this machine (it reaches both sites' networks), the checkout as the
    collection."""
    link = work / "collections" / "ansible_collections" / "offline" / "delivery"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(repo_root())
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(work / "collections"),
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    return subprocess.run([sys.executable, "-m", "offline_delivery_cli", *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=2 * PLAY_TIMEOUT, check=False)


def rollout_table(out: str) -> dict[str, list[str]]:
    """The report's rows by site group (the fleet table: APP VERSION HEALTH LAST-FAILURE LAG AGE NOTE)."""
    lines = out.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("SITE "))
    rows = {}
    for line in lines[start + 1:]:
        if not line.startswith("site_"):
            break
        cells = re.split(r"\s{2,}", line)
        rows[cells[0]] = cells[1:]
    return rows


def api_image(site: Site) -> str:
    return next(i for i in images(site) if "/shop/api:" in i)


@pytest.fixture(scope="module")
def rollouts(sites: tuple[Site, Site], prepared: str, canary: dict[str, Any], shop_bundles: dict[str, Path],
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two rollouts through the command (after the plain-playbook canary test: both sites on 1.0.0)."""
    a, b = sites
    carry(a, {"shop-1.1.0": shop_bundles["shop-1.1.0"]})
    keys = json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})
    ok(run(a, prepared, "import", "-e", "offline_delivery_bundle_src=/srv/transfer/shop-1.1.0", "-e", keys,
           step="import 1.1.0 (both sites)"), "import 1.1.0")
    work = tmp_path_factory.mktemp("rollout")
    (work / "policy.yml").write_text(yaml.safe_dump({
        "waves": [{"name": "canary", "canary": True, "site_groups": [site_label(a)]},
                  {"site_groups": [site_label(b)]}],
        "max_failed_sites": 0, "target_groups": ["compose_hosts"]}))
    inventory = merged_inventory([a, b], local=True)
    (work / "inventory.yml").write_text(yaml.safe_dump(inventory, sort_keys=False))
    inventory["all"]["children"][site_label(b)]["vars"]["app_overrides"] = BREAK_API
    (work / "inventory-b-broken.yml").write_text(yaml.safe_dump(inventory, sort_keys=False))
    out: dict[str, Any] = {}
    for name, inv, version in (("canary-fails", "inventory.yml", "1.2.0"), ("wave2-fails", "inventory-b-broken.yml",
                                                                              "1.1.0")):
        before = {s.name: (start_times(s, "node1"), images(s)) for s in sites}
        started = time.monotonic()
        proc = offline_delivery(work, "rollout", "upgrade", "-i", inv, "--policy", "policy.yml", "--app", "shop",
                                "--version", version, "--runs-dir", f"runs-{name}")
        TIMES[f"rollout upgrade {version} ({name}, incl. status)"] = round(time.monotonic() - started, 1)
        (work / f"{name}.out").write_text(proc.stdout + proc.stderr)  # the printed report, kept with the runs
        out[name] = {"proc": proc, "before": before, "runs": work / f"runs-{name}",
                     "after": {s.name: (start_times(s, "node1"), images(s)) for s in sites}}
    return out


def test_rollout_canary_fails_later_wave_not_started(sites: tuple[Site, Site], rollouts: dict[str, Any]) -> None:
    a, b = sites
    r = rollouts["canary-fails"]
    proc = r["proc"]
    assert proc.returncode == 1, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert rollout_table(proc.stdout) == {
        site_label(a): ["shop", "1.0.0", "4/4", "api failed, rolled back to 1.0.0", "behind 1.2.0", "-",
                        "wave 1 canary: FAILED"],
        site_label(b): ["shop", "1.0.0", "4/4", "-", "behind 1.2.0", "-", "wave 2: not started"]}, proc.stdout[-5000:]
    assert f"  {site_label(a)}: {host(a, 'node1')}: shop 1.2.0 on {host(a, 'node1')}: component api failed its " \
           "health check" in proc.stdout
    assert proc.stdout.rstrip().endswith(f"rollout upgrade STOPPED: the canary wave failed ({site_label(a)}); "
                                         "later waves not started")
    assert r["after"][b.name] == r["before"][b.name], "site b's containers were touched"
    (top,) = r["runs"].iterdir()
    assert sorted(p.name for p in top.iterdir()) == ["report", "status", "wave1"]
    assert f"artifacts (keep for support): {top}" in proc.stdout


def test_rollout_later_wave_fails_earlier_keeps_new_release(sites: tuple[Site, Site],
                                                            rollouts: dict[str, Any]) -> None:
    a, b = sites
    r = rollouts["wave2-fails"]
    proc = r["proc"]
    assert proc.returncode == 1, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert rollout_table(proc.stdout) == {
        site_label(a): ["shop", "1.1.0", "4/4", "-", "-", "-", "wave 1 canary: done"],
        site_label(b): ["shop", "1.0.0", "4/4", "api failed, rolled back to 1.0.0", "behind 1.1.0", "-",
                        "wave 2: FAILED"]}, proc.stdout[-5000:]
    assert proc.stdout.rstrip().endswith(f"rollout upgrade STOPPED: 1 failed site(s) ({site_label(b)}), more than "
                                         "max_failed_sites 0; later waves not started")
    assert api_image(a).endswith("/shop/api:1.1.0")
    assert all(i.endswith(":1.0.0") for i in r["after"][b.name][1]), r["after"][b.name]
    for site in sites:  # both serve, with the orders placed at install
        listing = http(site, "node1", "GET", "/orders")
        assert [o["item"] for o in listing["orders"]] == [f"book-{site.name}"]
    assert http(b, "node1", "GET", "/version")["version"] == "1.0.0"
    (top,) = r["runs"].iterdir()
    wave2 = top / "wave2" / "artifacts" / "wave2"
    events = [json.loads(p.read_text()) for p in (wave2 / "job_events").glob("*.json")]
    assert {e["event_data"]["host"] for e in events if e.get("event") == "runner_on_failed"} == {host(b, "node1")}
