"""A field fix of one component made on site (issue 17 item 2), through the playbooks a user runs on the jump host.

One small site for the module (`he-patch`, OD_E2E_SITE_PATCH): a repo host, a compose host (node1) and a systemd
host (node3), both amd64. Stages, each a fixture building on the one before:

  installed  import shop 1.0.0 and 1.1.0; runtime; install 1.0.0
  patched    a new shop_api.py from the jump host (VERSION "1.0.0-fieldfix" and GET /fix) and a removed file
             (/etc/debian_version) as the site release 1.0.0+site.1 (the api's image gets one layer, built on the
             repo host); the same patch again: no change
  deployed   upgrade --check --diff (only the api), upgrade to 1.0.0+site.1: the new behaviour over HTTP, the
             removed file gone from the api's root (container or read-only overlay root)
  rolled     rollback: back to the vendor's 1.0.0, the file back
  replaced   upgrade to 1.0.0+site.1 again, then to the vendor's 1.1.0: its plan says the patch is replaced; the
             site status report names the patch
  broken     a patch of 1.1.0's api that fails its health check (1.2.0's shop_api.py): the upgrade to 1.1.0+site.1
             fails naming the api and every host is rolled back to 1.1.0
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.e2e.conftest import require_world, running_site
from tests.e2e.media import carry, recap
from tests.e2e.test_lifecycle import PLAY_TIMEOUT, http, ok, start_times
from tests.world.site import HostSpec, Site
from tests.world.util import repo_root

pytestmark = pytest.mark.world

HOSTS = (
    HostSpec("repo", "amd64", ("offline_repo",)),
    HostSpec("node1", "amd64", ("compose_hosts",)),
    HostSpec("node3", "amd64", ("systemd_hosts",)),
)
TARGETS = ("node1", "node3")
FIX = {"patch_component": "api", "patch_author": "alice", "patch_note": "field fix: GET /fix",
       "patch_files": [{"src": "/srv/transfer/fix/shop_api.py", "path": "/opt/shop-api/shop_api.py"}],
       "patch_remove": ["/etc/debian_version"]}
APPS = "/srv/offline-delivery-apps"


def play(site: Site, playbook: str, *args: str) -> Any:
    return site.jump(["ansible-playbook", f"offline.delivery.{playbook}", "-e", "app_name=shop", *args],
                     timeout=PLAY_TIMEOUT)


def fixed_api() -> str:
    source = (repo_root() / "examples" / "shop" / "api" / "1.0.0" / "shop_api.py").read_text()
    source = source.replace('VERSION = "1.0.0"', 'VERSION = "1.0.0-fieldfix"')
    source = source.replace("ROUTES = {", 'def fix(h: JsonHandler) -> tuple[int, Any]:\n    return 200, {"fixed": True}\n\n\n'
                                          'ROUTES = {\n    ("GET", "/fix"): fix,')
    assert "1.0.0-fieldfix" in source and '"/fix"' in source
    return source


def in_api_root(site: Site, host: str, path: str) -> bool:
    """Whether `path` exists in the running api's root filesystem: inside its container on a compose host, under
    its mounted overlay root on a systemd host."""
    if host == "node1":
        cmd = ("docker exec $(docker ps -q --filter label=io.offline-delivery.app=shop "
               f"--filter label=com.docker.compose.service=api) test -e {path}")
    else:
        cmd = f"findmnt {APPS}/shop/roots/api/root >/dev/null && test -e {APPS}/shop/roots/api/root{path}"
    res = site.exec(host, cmd, timeout=60)
    assert res.rc in (0, 1), res.output
    return res.rc == 0


def state(site: Site, host: str) -> dict:
    return json.loads(site.exec(host, "cat /var/lib/offline-delivery/apps/shop/state.json").stdout)


@pytest.fixture(scope="module")
def site(shop_bundles: dict[str, Path]) -> Iterator[Site]:
    require_world(h.arch for h in HOSTS)
    yield from running_site(Site(os.environ.get("OD_E2E_SITE_PATCH", "he-patch"), HOSTS))


@pytest.fixture(scope="module")
def installed(site: Site, shop_bundles: dict[str, Path]) -> None:
    carry(site, {name: shop_bundles[name] for name in ("shop-1.0.0", "shop-1.1.0", "vendor.pub")})
    keys = json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})
    for version in ("1.0.0", "1.1.0"):
        ok(site.jump(["ansible-playbook", "offline.delivery.import", "-e",
                      f"offline_delivery_bundle_src=/srv/transfer/shop-{version}", "-e", keys], timeout=PLAY_TIMEOUT),
           f"import {version}")
    ok(site.jump(["ansible-playbook", "offline.delivery.runtime"], timeout=PLAY_TIMEOUT), "runtime")
    ok(play(site, "install", "-e", "app_version=1.0.0"), "install 1.0.0")
    for host in TARGETS:
        http(site, host, "POST", "/orders", {"item": f"book-{host}", "quantity": 1})


@pytest.fixture(scope="module")
def patched(site: Site, installed: None) -> dict[str, Any]:
    (site.transfer_dir / "fix").mkdir(exist_ok=True)
    (site.transfer_dir / "fix" / "shop_api.py").write_text(fixed_api())
    first = ok(play(site, "patch", "-e", json.dumps(FIX)), "patch")
    again = ok(play(site, "patch", "-e", json.dumps(FIX)), "the same patch again")
    record = json.loads(site.exec("repo", "cat '/srv/offline-delivery/releases/shop/1.0.0+site.1/release.json'").stdout)
    return {"first": first, "again": again, "record": record}


def test_the_patch_is_a_site_release_signed_by_the_site_key(site: Site, patched: dict[str, Any]) -> None:
    assert "shop 1.0.0+site.1: api as shop/api:1.0.0-site.1" in patched["first"].stdout
    record = patched["record"]
    assert record["origin"] == "site" and record["patch"]["by"] == "alice"
    assert record["patch"]["base"]["version"] == "1.0.0"
    digest = "sha256:" + __import__("hashlib").sha256(fixed_api().encode()).hexdigest()
    assert record["patch"]["files"] == [{"path": "/opt/shop-api/shop_api.py", "mode": "0644",
                                         "size": len(fixed_api().encode()), "sha256": digest}]
    assert record["patch"]["removed"] == ["/etc/debian_version"]
    site_key = site.exec("repo", "python3 -c \"import hashlib,base64,sys;"
                                 "d=open('/etc/offline-delivery/have-signing/site-have.pub').read().split('-----')[2];"
                                 "print(hashlib.sha256(base64.b64decode(''.join(d.split()))[-32:]).hexdigest())\"")
    assert record["keyid"] == site_key.stdout.strip(), "signed by the site key"
    # the site registry serves the patched image
    tags = site.exec("repo", "python3 -c \"import urllib.request as u;"
                             "print(u.urlopen('http://127.0.0.1:5001/v2/shop/api/tags/list').read().decode())\"")
    assert "1.0.0-site.1" in tags.stdout, tags.output
    assert recap(patched["again"], "repo")["changed"] == 0, patched["again"].stdout[-3000:]


@pytest.fixture(scope="module")
def deployed(site: Site, patched: dict[str, Any]) -> dict[str, Any]:
    before = {h: start_times(site, h) for h in TARGETS}
    plan = ok(play(site, "upgrade", "-e", "app_version=1.0.0+site.1", "--check", "--diff"), "plan")
    run = ok(play(site, "upgrade", "-e", "app_version=1.0.0+site.1"), "upgrade to the site release")
    return {"before": before, "plan": plan, "run": run, "after": {h: start_times(site, h) for h in TARGETS}}


def test_the_site_release_changes_only_the_api_and_its_behaviour(site: Site, deployed: dict[str, Any]) -> None:
    assert deployed["plan"].stdout.count(
        "shop 1.0.0 -> 1.0.0+site.1: added -; changed api; removed -; unchanged db, redis, gateway") == 2
    for host in TARGETS:
        for name in ("db", "redis", "gateway"):
            assert deployed["after"][host][name] == deployed["before"][host][name], (host, name)
        assert deployed["after"][host]["api"] != deployed["before"][host]["api"]
        assert http(site, host, "GET", "/version")["version"] == "1.0.0-fieldfix"
        assert http(site, host, "GET", "/fix") == {"fixed": True}
        assert not in_api_root(site, host, "/etc/debian_version") and in_api_root(site, host, "/etc/os-release")
        assert [o["item"] for o in http(site, host, "GET", "/orders")["orders"]] == [f"book-{host}"]
        last = state(site, host)["history"][-1]
        assert last["to"] == "1.0.0+site.1" and last["result"] == "ok"
        assert last["patch"]["component"] == "api" and last["patch"]["by"] == "alice", last
        assert last["patch"]["files"][0]["path"] == "/opt/shop-api/shop_api.py"


@pytest.fixture(scope="module")
def rolled(site: Site, deployed: dict[str, Any]) -> Any:
    return ok(play(site, "rollback"), "rollback")


def test_rollback_returns_to_the_vendors_release(site: Site, rolled: Any) -> None:
    assert rolled.stdout.count("shop 1.0.0+site.1 -> 1.0.0: restarted api") == 2
    for host in TARGETS:
        assert http(site, host, "GET", "/version")["version"] == "1.0.0"
        assert state(site, host)["current"]["version"] == "1.0.0"
        assert in_api_root(site, host, "/etc/debian_version")


@pytest.fixture(scope="module")
def replaced(site: Site, rolled: Any) -> dict[str, Any]:
    ok(play(site, "upgrade", "-e", "app_version=1.0.0+site.1"), "the site release again")
    plan = ok(play(site, "upgrade", "-e", "app_version=1.1.0", "--check", "--diff"), "plan of 1.1.0")
    run = ok(play(site, "upgrade", "-e", "app_version=1.1.0"), "upgrade to 1.1.0")
    status = ok(site.jump(["ansible-playbook", "offline.delivery.site_status", "-e", "offline_delivery_site=he",
                           "-e", "offline_delivery_status_dest=/srv/transfer/status"], timeout=PLAY_TIMEOUT),
                "site status")
    return {"plan": plan, "run": run, "status": status}


def test_the_vendors_next_release_replaces_the_patch(site: Site, replaced: dict[str, Any]) -> None:
    out = replaced["plan"].stdout
    assert out.count("shop 1.0.0+site.1 -> 1.1.0: added -; changed api; removed -; unchanged db, redis, gateway") == 2
    assert out.count("replaces the site release 1.0.0+site.1 (its field fix is not in 1.1.0)") == 2
    for host in TARGETS:
        assert http(site, host, "GET", "/version")["version"] == "1.1.0"
        assert [o["item"] for o in http(site, host, "GET", "/orders")["orders"]] == [f"book-{host}"]


def test_the_site_status_report_names_the_patch(site: Site, replaced: dict[str, Any]) -> None:
    doc = json.loads((site.transfer_dir / "status" / "he.status.json").read_text())
    rel = next(r for r in doc["releases"] if r["version"] == "1.0.0+site.1")
    assert rel["patch"]["component"] == "api" and rel["patch"]["by"] == "alice"
    assert rel["patch"]["files"][0]["path"] == "/opt/shop-api/shop_api.py"
    for host in TARGETS:
        events = [e for e in doc["hosts"][host]["apps"]["shop"]["history"] if e.get("to") == "1.0.0+site.1"]
        assert events and all(e["patch"]["component"] == "api" for e in events), doc["hosts"][host]
    assert re.search(r"1\.0\.0\+site\.1", json.dumps(doc))


@pytest.fixture(scope="module")
def broken(site: Site, replaced: dict[str, Any]) -> dict[str, Any]:
    source = (repo_root() / "examples" / "shop" / "api" / "1.2.0" / "shop_api.py").read_text()
    (site.transfer_dir / "fix" / "broken_api.py").write_text(source)
    fix = dict(FIX, patch_note="fails its health check on purpose",
               patch_files=[{"src": "/srv/transfer/fix/broken_api.py", "path": "/opt/shop-api/shop_api.py"}])
    made = ok(play(site, "patch", "-e", json.dumps(fix)), "a broken patch")
    return {"made": made, "run": play(site, "upgrade", "-e", "app_version=1.1.0+site.1")}


def test_a_broken_patch_fails_its_health_gate_and_every_host_rolls_back(site: Site, broken: dict[str, Any]) -> None:
    assert "shop 1.1.0+site.1: api as shop/api:1.1.0-site.1" in broken["made"].stdout
    run = broken["run"]
    assert run.rc != 0, "a failed health gate fails the playbook"
    for host in TARGETS:
        line = next(l for l in run.stdout.splitlines() if l.startswith(f"fatal: [{host}]"))
        assert f"shop 1.1.0+site.1 on {host}: component api failed its health check" in line, line
        assert "rolled back to 1.1.0, which is healthy" in line, line
        assert http(site, host, "GET", "/version")["version"] == "1.1.0"
        assert [o["item"] for o in http(site, host, "GET", "/orders")["orders"]] == [f"book-{host}"]
        failed = state(site, host)["history"][-1]
        assert failed["to"] == "1.1.0+site.1" and failed["result"] == "failed" and failed["component"] == "api"
