"""The shop's whole lifecycle on an air-gapped site, through the playbooks a user runs from the jump host.

One site for the module (`e2e-lc`): a repo host, two compose hosts (node1, node2: amd64), two systemd hosts
(node3: amd64, arm1: arm64 under qemu; containers cannot start there, the systemd target can). Stages, each a
fixture building on the one before, each with its own tests:

  installed   import shop 1.0.0, 1.1.0, 1.2.0; runtime; install --check (changes nothing); install 1.0.0 with a
              site override (SHOP_CURRENCY=CHF); an order placed through each host's gateway
  upgraded    upgrade --check --diff (the plan, nothing touched); upgrade to 1.1.0 without passing overrides
  rolled_back rollback (to 1.0.0)
  broken      upgrade to 1.2.0 (API answers 500 on /healthz): fails naming api, every host rolled back
  rerun       install 1.0.0 again: no change anywhere; status report; uninstall + reinstall of node2 keeps data

Step times are written to the log (and to $OD_LIFECYCLE_TIMES as JSON when set: see docs/benchmarks.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.e2e.conftest import require_world, running_site
from tests.e2e.media import carry, exposure, recap
from tests.world.site import HostSpec, Site
from tests.world.util import Result, docker

pytestmark = pytest.mark.world

HOSTS = (
    HostSpec("repo", "amd64", ("offline_repo",)),
    HostSpec("node1", "amd64", ("compose_hosts",)),
    HostSpec("node2", "amd64", ("compose_hosts",)),
    HostSpec("node3", "amd64", ("systemd_hosts",)),
    HostSpec("arm1", "arm64", ("systemd_hosts",)),
)
TARGETS = ("node1", "node2", "node3", "arm1")
COMPOSE = ("node1", "node2")
OVERRIDE = {"app_overrides": {"api": {"SHOP_CURRENCY": "CHF"}}}
PLAY_TIMEOUT = 1800
TIMES: dict[str, float] = {}
SECRETS_FILE = "/var/lib/offline-delivery/apps/shop/secrets.json"


def play(site: Site, playbook: str, *args: str, step: str = "") -> Result:
    started = time.monotonic()
    res = site.jump(["ansible-playbook", f"offline.delivery.{playbook}", "-e", "app_name=shop", *args],
                    timeout=PLAY_TIMEOUT)
    if step:
        TIMES[step] = round(time.monotonic() - started, 1)
    return res


def ok(res: Result, what: str) -> Result:
    assert res.rc == 0, f"{what} failed (rc {res.rc}):\n{res.output[-6000:]}"
    return res


def http(site: Site, host: str, method: str, path: str, body: dict | None = None) -> Any:
    """A request to the gateway from the host itself (the gateway publishes 8080 on every target)."""
    script = ("import json,sys,urllib.request as u\n"
              "b=sys.argv[3].encode() if sys.argv[3] else None\n"
              "r=u.Request('http://127.0.0.1:8080/api'+sys.argv[2],data=b,method=sys.argv[1],"
              "headers={'Content-Type':'application/json'})\n"
              "print(u.urlopen(r,timeout=20).read().decode())\n")
    res = site.exec(host, ["python3", "-c", script, method, path, json.dumps(body) if body else ""], timeout=60)
    assert res.rc == 0, f"{method} {path} on {host}: {res.output[-2000:]}"
    return json.loads(res.stdout)


def start_times(site: Site, host: str) -> dict[str, str]:
    """Component -> when its container/unit last started."""
    if host in COMPOSE:
        cmd = ("docker ps -q --filter label=io.offline-delivery.app=shop | xargs docker inspect --format "
               "'{{index .Config.Labels \"com.docker.compose.service\"}} {{.State.StartedAt}}'")
    else:
        cmd = ("for c in db redis api gateway; do echo $c $(systemctl show -p ActiveEnterTimestampMonotonic "
               "--value od-shop-$c.service); done")
    res = site.exec(host, cmd, timeout=60)
    assert res.rc == 0, res.output
    return dict(line.split(" ", 1) for line in res.stdout.strip().splitlines())


def sha256_on(site: Site, host: str, path: str) -> tuple[str, str]:
    res = site.exec(host, f"stat -c %a {path} && sha256sum {path}", timeout=30)
    assert res.rc == 0, res.output
    mode, digest = res.stdout.split()[:2]
    return mode, digest


@pytest.fixture(scope="module")
def site(shop_bundles: dict[str, Path]) -> Iterator[Site]:
    require_world(h.arch for h in HOSTS)
    yield from running_site(Site(os.environ.get("OD_E2E_SITE_LC", "e2e-lc"), HOSTS))
    if os.environ.get("OD_LIFECYCLE_TIMES"):
        Path(os.environ["OD_LIFECYCLE_TIMES"]).write_text(json.dumps(TIMES, indent=1) + "\n")


@pytest.fixture(scope="module")
def installed(site: Site, shop_bundles: dict[str, Path]) -> dict[str, Any]:
    carry(site, {name: shop_bundles[name] for name in ("shop-1.0.0", "shop-1.1.0", "shop-1.2.0", "vendor.pub")})
    keys = json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        started = time.monotonic()
        ok(site.jump(["ansible-playbook", "offline.delivery.import", "-e",
                      f"offline_delivery_bundle_src=/srv/transfer/shop-{version}", "-e", keys], timeout=PLAY_TIMEOUT),
           f"import {version}")
        TIMES[f"import {version}"] = round(time.monotonic() - started, 1)
    started = time.monotonic()
    ok(site.jump(["ansible-playbook", "offline.delivery.runtime"], timeout=PLAY_TIMEOUT), "runtime")
    TIMES["runtime"] = round(time.monotonic() - started, 1)
    check = ok(play(site, "install", "-e", "app_version=1.0.0", "--check", step="install --check"), "install --check")
    after_check = {h: site.exec(h, "ls /srv/offline-delivery-apps; docker ps -q 2>/dev/null; "
                                   "ls /etc/systemd/system | grep od-shop || true").stdout for h in TARGETS}
    first = ok(play(site, "install", "-e", "app_version=1.0.0", "-e", json.dumps(OVERRIDE), step="install 1.0.0"),
               "install 1.0.0")
    orders = {h: http(site, h, "POST", "/orders", {"item": f"book-{h}", "quantity": 2}) for h in TARGETS}
    return {"check": check, "after_check": after_check, "first": first, "orders": orders,
            "secrets": sha256_on(site, "repo", SECRETS_FILE), "times": {h: start_times(site, h) for h in TARGETS}}


def test_install_check_mode_changes_nothing(installed: dict[str, Any]) -> None:
    out = installed["check"].stdout
    assert "added db, redis, api, gateway" in out
    for host, listing in installed["after_check"].items():
        assert listing.strip() == "", f"{host} changed in check mode: {listing}"


def test_install_runs_the_shop_on_every_target(site: Site, installed: dict[str, Any]) -> None:
    for host in TARGETS:
        assert recap(installed["first"], host)["failed"] == 0
        listing = http(site, host, "GET", "/orders")
        assert [o["item"] for o in listing["orders"]] == [f"book-{host}"]
        assert listing["currency"] == "CHF", "the site override reaches the API"


def test_systemd_units_are_contained(site: Site, installed: dict[str, Any]) -> None:
    """systemd-analyze security rates every unit of the shop 'OK' (exposure 4.9 or less) on amd64 and arm64; the
    figures go to OD_EXPOSURE_FILE when set (docs/reliability.md, "Containment")."""
    figures = {}
    for host in ("node3", "arm1"):
        for comp in ("db", "redis", "api", "gateway"):
            level, rating = exposure(site, host, f"od-shop-{comp}.service")
            figures[f"{host} {comp}"] = f"{level} {rating}"
            assert level <= 4.9, (host, comp, level, rating)
    if os.environ.get("OD_EXPOSURE_FILE"):
        Path(os.environ["OD_EXPOSURE_FILE"]).write_text(json.dumps(figures, indent=2) + "\n")


SYSTEMD_HOSTS = ("node3", "arm1")
APPS = "/srv/offline-delivery-apps"
IMAGE_LAYERS = ("import glob, json; print(json.dumps({p.split('/')[-2]: json.load(open(p))['layers'] "
                f"for p in glob.glob('{APPS}/shop/images/*/image.json')}}))")


def store_layers(site: Site, host: str) -> set[str]:
    res = site.exec(host, ["ls", f"{APPS}/.layers"], timeout=30)
    assert res.rc == 0, res.output
    return {name for name in res.stdout.split() if not name.startswith(".")}


def image_layers(site: Site, host: str) -> dict[str, list[str]]:
    res = site.exec(host, ["python3", "-c", IMAGE_LAYERS], timeout=30)
    assert res.rc == 0, res.output
    return json.loads(res.stdout)


def test_systemd_roots_are_read_only_overlays_of_shared_layers(site: Site, installed: dict[str, Any]) -> None:
    """Each image's root is a read-only overlay of the host's layer store, each layer stored once (the shop's
    images share their Debian layers); a component writes only to its volumes, /tmp and /run."""
    for host in SYSTEMD_HOSTS:
        images = image_layers(site, host)
        assert len(images) == 4, (host, images)
        unique = {d.split(":", 1)[1] for layers in images.values() for d in layers}
        assert store_layers(site, host) == unique, host
        assert len(unique) < sum(len(layers) for layers in images.values()), f"{host}: no layer is shared"
        mounts = site.exec(host, f"findmnt -rn -o TARGET,FSTYPE,OPTIONS | grep {APPS}/shop/roots/", timeout=30)
        rows = [line.split() for line in mounts.stdout.splitlines()]
        assert len(rows) == 4 and all(r[1] == "overlay" and r[2].startswith("ro,") for r in rows), mounts.output
        # --root: the main process's root, below which paths follow its own mounts (joining its mount namespace
        # fails under qemu-user, docs/systemd-target.md)
        inside = ("cd / && nsenter -t $(systemctl show -p MainPID --value od-shop-db.service) --root sh -c "
                  "'touch /tmp/ok && echo tmp-writable; touch /var/lib/postgresql/data/ok && echo volume-writable "
                  "&& rm /var/lib/postgresql/data/ok; touch /usr/lib/x 2>&1; touch /var/x 2>&1; touch /etc/x 2>&1; true'")
        res = site.exec(host, inside, timeout=60)
        assert "tmp-writable" in res.stdout and "volume-writable" in res.stdout, (host, res.output)
        assert res.stdout.count("Read-only file system") == 3, (host, res.output)


def test_secrets_are_private_on_site(site: Site, installed: dict[str, Any]) -> None:
    mode, _ = installed["secrets"]
    assert mode == "600"
    for host in TARGETS:
        res = site.exec(host, "stat -c '%a %U' /var/lib/offline-delivery/apps/shop/env/db.env "
                              "/var/lib/offline-delivery/apps/shop/state.json", timeout=30)
        assert res.rc == 0 and set(res.stdout.split("\n")[:2]) == {"600 root"}, (host, res.output)
    secrets = json.loads(site.exec("repo", f"cat {SECRETS_FILE}").stdout)
    assert sorted(secrets) == ["db_password", "redis_password"] and all(len(v) == 32 for v in secrets.values())
    for value in secrets.values():
        assert value not in installed["first"].output and value not in installed["check"].output


@pytest.fixture(scope="module")
def upgraded(site: Site, installed: dict[str, Any]) -> dict[str, Any]:
    before = {h: start_times(site, h) for h in TARGETS}
    layers_before = {h: store_layers(site, h) for h in SYSTEMD_HOSTS}
    plan = ok(play(site, "upgrade", "-e", "app_version=1.1.0", "--check", "--diff", step="upgrade --check --diff"),
              "upgrade --check --diff")
    after_plan = {h: start_times(site, h) for h in TARGETS}
    run = ok(play(site, "upgrade", "-e", "app_version=1.1.0", step="upgrade 1.1.0"), "upgrade to 1.1.0")
    return {"before": before, "plan": plan, "after_plan": after_plan, "run": run,
            "after": {h: start_times(site, h) for h in TARGETS}, "layers_before": layers_before,
            "layers_after": {h: store_layers(site, h) for h in SYSTEMD_HOSTS},
            "images_after": {h: image_layers(site, h) for h in SYSTEMD_HOSTS}}


def test_an_upgrade_unpacks_only_the_layers_it_adds(upgraded: dict[str, Any]) -> None:
    """1.1.0 changes the api image's top layer: the layer store gains exactly the layers the host lacked, all
    of them the new api image's; the 1.0.0 layers stay (a rollback needs them)."""
    for host in SYSTEMD_HOSTS:
        added = upgraded["layers_after"][host] - upgraded["layers_before"][host]
        assert upgraded["layers_before"][host] <= upgraded["layers_after"][host], host
        assert 1 <= len(added) <= 2, (host, added)
        images = upgraded["images_after"][host]
        owners = [name for name, layers in images.items() if added <= {d.split(":", 1)[1] for d in layers}]
        assert len(owners) == 1, (host, added, images)


def test_upgrade_plan_shows_only_the_api_and_touches_nothing(upgraded: dict[str, Any]) -> None:
    out = upgraded["plan"].stdout
    assert out.count("shop 1.0.0 -> 1.1.0: added -; changed api; removed -; unchanged db, redis, gateway") == 4
    assert "+api: shop/api:1.1.0" in out and "-api: shop/api:1.0.0" in out
    assert upgraded["after_plan"] == upgraded["before"]


def test_upgrade_restarts_only_the_api_and_keeps_data_override_and_password(
        site: Site, installed: dict[str, Any], upgraded: dict[str, Any]) -> None:
    for host in TARGETS:
        before, after = upgraded["before"][host], upgraded["after"][host]
        assert after["api"] != before["api"], f"{host}: the API was not restarted"
        for name in ("db", "redis", "gateway"):
            assert after[name] == before[name], f"{host}: {name} was restarted by an upgrade that did not change it"
        listing = http(site, host, "GET", "/orders")
        assert [o["item"] for o in listing["orders"]] == [f"book-{host}"], "the order survived the upgrade"
        assert listing["currency"] == "CHF", "the site override was kept"
        assert "by_item" in http(site, host, "GET", "/orders/summary"), "1.1.0's new endpoint answers"
    assert sha256_on(site, "repo", SECRETS_FILE) == installed["secrets"], "the secrets did not change"


@pytest.fixture(scope="module")
def rolled_back(site: Site, upgraded: dict[str, Any]) -> dict[str, Any]:
    before = {h: start_times(site, h) for h in TARGETS}
    run = ok(play(site, "rollback", step="rollback"), "rollback")
    return {"before": before, "run": run, "after": {h: start_times(site, h) for h in TARGETS}}


def test_rollback_returns_to_1_0_0_with_the_data(site: Site, installed: dict[str, Any],
                                                 rolled_back: dict[str, Any]) -> None:
    assert rolled_back["run"].stdout.count("shop 1.1.0 -> 1.0.0: restarted api") == 4
    for host in TARGETS:
        assert rolled_back["after"][host]["db"] == rolled_back["before"][host]["db"]
        listing = http(site, host, "GET", "/orders")
        assert [o["item"] for o in listing["orders"]] == [f"book-{host}"]
        assert listing["currency"] == "CHF"
    assert sha256_on(site, "repo", SECRETS_FILE) == installed["secrets"]


@pytest.fixture(scope="module")
def broken(site: Site, rolled_back: dict[str, Any]) -> dict[str, Any]:
    run = play(site, "upgrade", "-e", "app_version=1.2.0", step="upgrade 1.2.0 (health gate fails, rollback)")
    return {"run": run}


def test_broken_upgrade_fails_naming_the_api_and_rolls_back(site: Site, broken: dict[str, Any]) -> None:
    run = broken["run"]
    assert run.rc != 0, "a failed health gate must fail the playbook"
    for host in TARGETS:
        assert recap(run, host)["failed"] == 1
        line = next(l for l in run.stdout.splitlines() if l.startswith(f"fatal: [{host}]"))
        assert "shop 1.2.0 on %s: component api failed its health check" % host in line
        assert "500" in line and "rolled back to 1.0.0, which is healthy" in line
        listing = http(site, host, "GET", "/orders")
        assert [o["item"] for o in listing["orders"]] == [f"book-{host}"]


@pytest.fixture(scope="module")
def rerun(site: Site, broken: dict[str, Any]) -> dict[str, Any]:
    again = ok(play(site, "install", "-e", "app_version=1.0.0", step="install 1.0.0 again (no change)"), "rerun")
    status = ok(play(site, "status", "-e", "app_report_dir=/srv/transfer/reports", step="status"), "status")
    return {"again": again, "status": status,
            "report": json.loads((site.transfer_dir / "reports" / "shop-status.json").read_text()),
            "markdown": (site.transfer_dir / "reports" / "shop-status.md").read_text()}


def test_second_install_changes_nothing(rerun: dict[str, Any]) -> None:
    for host in TARGETS + ("repo",):
        assert recap(rerun["again"], host)["changed"] == 0, rerun["again"].stdout[-4000:]


def test_status_report_tells_the_story(rerun: dict[str, Any]) -> None:
    report = rerun["report"]
    assert report["healthy"] is True
    for host in TARGETS:
        status = report["hosts"][host]["status"]
        assert status["version"] == "1.0.0" and status["previous_version"] == "1.1.0"
        assert all(c["healthy"] and c["as_deployed"] for c in status["components"].values())
        failed = [e for e in status["history"] if e["result"] == "failed"]
        assert failed[-1]["to"] == "1.2.0" and failed[-1]["component"] == "api"
        assert failed[-1]["rolled_back_to"] == "1.0.0"
    assert re.search(r"\| site \| arm1 \| systemd \| 1\.0\.0 \| 1\.1\.0 \| yes \|", rerun["markdown"])
    assert "failed (api), rolled back to 1.0.0" in rerun["markdown"]


def test_uninstall_keeps_data_and_a_reinstall_finds_it(site: Site, rerun: dict[str, Any]) -> None:
    gone = ok(play(site, "uninstall", "--limit", "node2", step="uninstall node2"), "uninstall")
    assert recap(gone, "node2")["changed"] == 1
    assert site.exec("node2", "docker ps -q --filter label=io.offline-delivery.app=shop").stdout.strip() == ""
    ok(play(site, "install", "--limit", "node2:repo", "-e", "app_version=1.0.0", step="reinstall node2"), "reinstall")
    listing = http(site, "node2", "GET", "/orders")
    assert [o["item"] for o in listing["orders"]] == ["book-node2"], "the data survived uninstall + install"


# What systemd itself makes of the systemd target's quoting (ExecStart arguments, EnvironmentFile values): the
# unit renderer's output is read back by systemd 252 on a world host, not by our own parser.
TRICKY = ["plain", "with space", "100%", "$HOME ${PATH}", 'say "hi" \\o/', "it's", "a\nb\tc", ";", "%i %n"]


def test_systemd_parses_the_systemd_targets_quoting_literally(site: Site) -> None:
    from offline_delivery_core.targets.systemd import quote_arg, render_env_file
    env = {f"V{i}": value for i, value in enumerate(TRICKY)}
    show = ("import json, os, sys; "
            "print(json.dumps([sys.argv[1:], {k: v for k, v in os.environ.items() if k[0] == 'V'}]))")
    unit = "\n".join(["[Service]", "Type=oneshot", "EnvironmentFile=/run/od-quoting.env",
                      "StandardOutput=file:/run/od-quoting.out",
                      "ExecStart=" + " ".join(quote_arg(a) for a in ["/usr/bin/python3", "-c", show, *TRICKY]), ""])
    for path, text in (("/run/od-quoting.env", render_env_file(env)),
                       ("/etc/systemd/system/od-quoting.service", unit)):
        res = docker("exec", "-i", site.container("node3"), "sh", "-c", f"umask 077; cat > {path}", input_text=text)
        assert res.rc == 0, res.output
    try:
        res = site.exec("node3", "systemctl daemon-reload && systemctl start od-quoting.service "
                                 "&& cat /run/od-quoting.out", timeout=60)
        assert res.rc == 0, res.output
        argv, seen = json.loads(res.stdout)
    finally:
        site.exec("node3", "rm -f /etc/systemd/system/od-quoting.service /run/od-quoting.*; systemctl daemon-reload")
    assert argv == TRICKY
    assert seen == env


# Data snapshots on real hosts (one compose, one systemd): an upgrade with app_snapshot copies the volumes of
# the release it leaves; a rollback with app_restore_snapshot puts that copy back, so an order placed after the
# upgrade is gone and the one from before is there. Runs last: it ends on 1.0.0 as `rerun` left it.
SNAPSHOT_HOSTS = ("node1", "node3")


@pytest.fixture(scope="module")
def restored(site: Site, rerun: dict[str, Any]) -> dict[str, Any]:
    limit = ("--limit", ":".join(SNAPSHOT_HOSTS + ("repo",)))
    up = ok(play(site, "upgrade", *limit, "-e", "app_version=1.1.0", "-e", "app_snapshot=true",
                 step="upgrade 1.1.0 with a data snapshot (2 hosts)"), "upgrade with snapshot")
    after_upgrade = {h: http(site, h, "POST", "/orders", {"item": f"late-{h}", "quantity": 1})
                     for h in SNAPSHOT_HOSTS}
    seen = {h: [o["item"] for o in http(site, h, "GET", "/orders")["orders"]] for h in SNAPSHOT_HOSTS}
    back = ok(play(site, "rollback", *limit, "-e", "app_restore_snapshot=true",
                   step="rollback restoring the snapshot (2 hosts)"), "rollback with restore")
    return {"up": up, "after_upgrade": after_upgrade, "seen": seen, "back": back}


def test_rollback_restores_the_data_snapshot_on_compose_and_systemd(site: Site, restored: dict[str, Any]) -> None:
    for host in SNAPSHOT_HOSTS:
        assert sorted(restored["seen"][host]) == [f"book-{host}", f"late-{host}"], "the later order was stored"
        listing = http(site, host, "GET", "/orders")
        assert [o["item"] for o in listing["orders"]] == [f"book-{host}"], (
            f"{host}: the restored snapshot holds the data from before the upgrade, not the later order")
        state = json.loads(site.exec(host, "cat /var/lib/offline-delivery/apps/shop/state.json").stdout)
        assert state["current"]["version"] == "1.0.0"
        upgrade, rollback = state["history"][-2:]
        assert upgrade["action"] == "upgrade" and upgrade["to"] == "1.1.0" and upgrade["snapshot"], upgrade
        assert rollback["action"] == "rollback" and rollback["to"] == "1.0.0", rollback
    snapshots = site.exec("node1", "ls /var/lib/offline-delivery/apps/shop/snapshots/1.0.0", timeout=30)
    assert snapshots.rc == 0 and snapshots.stdout.strip(), "the snapshot is kept where docs/lifecycle.md says"


# Issue #20 item 3: what the controller can know is refused on every host before any host changes. shop 1.3.0
# is 1.1.0 with replicas: 2 for the api: compose hosts could run it, the systemd hosts refuse it (the api has a
# port, which two instances on one host cannot share); no host may install it. Runs after `restored` (every host on 1.0.0).
@pytest.fixture(scope="module")
def refused(site: Site, restored: dict[str, Any], shop_bundles: dict[str, Path],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import yaml

    from tests.e2e.media import bundle_builder
    from tests.world.shop_images import build_shop_images
    from tests.world.util import repo_root

    work = tmp_path_factory.mktemp("refused")
    model = yaml.safe_load((repo_root() / "examples" / "shop" / "app-1.1.0.yml").read_text())
    model["version"] = "1.3.0"
    model["components"]["api"]["replicas"] = 2
    (work / "app.yml").write_text(yaml.safe_dump(model, sort_keys=False))
    bundle_builder("build", str(work / "app.yml"), "-o", str(work / "shop-1.3.0"),
                   "--images-from", f"oci:{build_shop_images(('amd64', 'arm64'))}",
                   "--platform", "linux/amd64,linux/arm64",
                   "--base", str(shop_bundles["shop-1.1.0"] / "shop-1.1.0.bundle"),
                   "--base-pub", str(shop_bundles["vendor.pub"]), "--sign-key", str(shop_bundles["vendor.key"]))
    carry(site, {"shop-1.3.0": work / "shop-1.3.0"})
    keys = json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})
    ok(site.jump(["ansible-playbook", "offline.delivery.import", "-e",
                  "offline_delivery_bundle_src=/srv/transfer/shop-1.3.0", "-e", keys], timeout=PLAY_TIMEOUT),
       "import 1.3.0")
    before = {h: start_times(site, h) for h in TARGETS}
    run = play(site, "install", "-e", "app_version=1.3.0", step="install 1.3.0 (refused by the systemd hosts)")
    return {"before": before, "run": run, "after": {h: start_times(site, h) for h in TARGETS}}


def test_a_release_one_target_refuses_changes_no_host(site: Site, refused: dict[str, Any]) -> None:
    run = refused["run"]
    assert run.rc != 0, "a release a target refuses must fail the playbook"
    for host in ("node3", "arm1"):
        line = next(l for l in run.stdout.splitlines() if l.startswith(f"fatal: [{host}]"))
        assert "component api: replicas 2: on a systemd host every instance would listen on the same host port " \
               "(8000)" in line, line
    for host in TARGETS:
        assert recap(run, host)["changed"] == 0, f"{host} changed:\n{run.stdout[-4000:]}"
        assert refused["after"][host] == refused["before"][host], f"{host}: something restarted"
        state = json.loads(site.exec(host, "cat /var/lib/offline-delivery/apps/shop/state.json").stdout)
        assert state["current"]["version"] == "1.0.0", f"{host} installed {state['current']['version']}"
    assert "Deploy on this host: shop (check pass: nothing changes)" in run.stdout
    assert not re.search(r"TASK \[.*Deploy on this host: shop\]", run.stdout), "no host reached the deploy"
