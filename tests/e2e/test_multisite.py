"""Two air-gapped sites from one inventory and one controller, installed in waves with a canary site first.

Sites `e2e-ma` (the canary) and `e2e-mb`, each a repo host and one compose host (amd64). Site a's jump host also
joins site b's internal network (tests/world/multisite.py), so one controller reaches both; the merged inventory
names each site (`offline_delivery_site`, `offline_delivery_repo_host` in the site group's vars). Stages:

  prepared   one import run per release into both repo hosts (1.0.0, the broken 1.2.0); runtime on both sites
  installed  ONE install run in waves: site a's host, then site b's (serial [1, "100%"], max_fail_percentage 0);
             each site pulls from its own repo, has its own secrets, answers through its gateway
  canary     upgrade to 1.2.0 in the same waves: site a fails its health gate and rolls back, the rollout stops,
             site b is never touched (same containers, same start times, still 1.0.0)
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.e2e.conftest import require_world, running_site
from tests.e2e.media import carry, recap
from tests.e2e.test_lifecycle import http, ok, start_times
from tests.world.multisite import connect_jump, disconnect_jump, site_label, write_merged_inventory
from tests.world.site import HostSpec, Site
from tests.world.util import Result

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
