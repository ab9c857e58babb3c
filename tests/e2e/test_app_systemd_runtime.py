"""The systemd target for real: the shop's four components as systemd services over image root filesystems
unpacked from the site registry, on an amd64 host (node2) and an arm64 host under qemu (arm1).

A small site of its own (`s2s-sysd`: repo, node2, arm1, jump): shop 1.0.0 is imported with `--packages
debian-12` (images published into the site registry), the runtime playbook runs the systemd_host role on
node2 and arm1, then a small driver (DRIVER below, run with the host's python3 next to a copy of
plugins/module_utils) drives `SystemdRuntime` with specs built here by `app_runtime.desired_specs`:
prepare (unpack), start level by level with the health gate, observe, probe, and a second deploy with the
same specs, which must restart nothing.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from offline_delivery_core.app_model import load_model
from offline_delivery_core.app_runtime import desired_specs
from offline_delivery_core.app_systemd import quote_arg, render_env_file
from offline_delivery_core.bundle_format import read_head
from tests.e2e.conftest import require_world, running_site
from tests.e2e.media import carry, recap
from tests.e2e.test_runtime import import_shop
from tests.world.site import HostSpec, Site
from tests.world.util import docker, repo_root

pytestmark = pytest.mark.world

SITE = os.environ.get("OD_S2S_SITE", "s2s-sysd")
HOSTS = (HostSpec("repo", "amd64", ("offline_repo",)), HostSpec("node2", "amd64", ("targets",)),
         HostSpec("arm1", "arm64", ("targets",)))
PLATFORMS = {"node2": "linux/amd64", "arm1": "linux/arm64"}
REMOTE = "/opt/od-s2s"
APPS_DIR = "/srv/offline-delivery-apps"
STATE_DIR = "/var/lib/offline-delivery"
# qemu makes arm64 several times slower: unpacking four images and PostgreSQL's initdb take minutes there.
STEP_TIMEOUT = {"node2": 900, "arm1": 2400}
HEALTH_CAP = {"node2": 180, "arm1": 900}

# Runs on the host: python3 driver.py REQUEST.json -> one JSON document on stdout (log lines on stderr).
DRIVER = r'''
import json, subprocess, sys, time
sys.path.insert(0, "%(remote)s")
from odcore.app_runtime import ComponentSpec, DeployError, wait_healthy
from odcore.app_systemd import SystemdRuntime

def run(argv):
    p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr

req = json.load(open(sys.argv[1]))
rt = SystemdRuntime("shop", apps_dir="%(apps)s", state_dir="%(state)s", run=run,
                    log=lambda m: print(m, file=sys.stderr, flush=True))
specs = [ComponentSpec(**s) for s in req.get("specs", [])]
out = {"seconds": {}}
try:
    for action in req["actions"]:
        t = time.monotonic()
        if action == "prepare":
            rt.prepare(specs)
        elif action == "deploy":   # what the engine does: start what differs, level by level, health-gated
            seen = rt.observe()
            todo = [s.name for s in specs if s.name not in seen or seen[s.name].fingerprint != s.fingerprint
                    or not seen[s.name].running]
            out["started"] = todo
            for spec in specs:
                if spec.name in todo:
                    rt.start([spec], all_specs=specs)
                ok, reason = wait_healthy(rt, spec, cap=req["health_cap"])
                if not ok:
                    raise DeployError("%%s: not healthy: %%s\n%%s" %% (spec.name, reason, rt.logs(spec.name)))
        elif action == "observe":
            out["observe"] = {k: vars(v) for k, v in rt.observe().items()}
        elif action == "probe":
            out["probe"] = {s.name: rt.probe(s) for s in specs}
        elif action == "volumes":
            out["volumes"] = {s.name: rt.volume_dirs(s) for s in specs}
        elif action == "logs":
            out["logs"] = {s.name: rt.logs(s.name, 5) for s in specs}
        elif action == "uninstall":
            out["removed"] = rt.uninstall(keep_data=True)
        out["seconds"][action] = round(time.monotonic() - t, 1)
except DeployError as exc:
    out["error"] = str(exc)
print(json.dumps(out))
''' % {"remote": REMOTE, "apps": APPS_DIR, "state": STATE_DIR}


@pytest.fixture(scope="module")
def site(shop_bundles: dict[str, Path]) -> Iterator[Site]:
    require_world(h.arch for h in HOSTS)
    for world_site in running_site(Site(SITE, HOSTS)):
        import_shop(world_site, shop_bundles)
        res = world_site.jump(["ansible-playbook", "offline.delivery.runtime",
                               "-e", "offline_delivery_compose_group=no_compose_hosts",
                               "-e", "offline_delivery_systemd_group=node2:arm1"], timeout=1500)
        assert res.rc == 0, f"runtime playbook (systemd_host) failed:\n{res.output[-5000:]}"
        for host in PLATFORMS:
            install_driver(world_site, host)
        yield world_site


def install_driver(site: Site, host: str) -> None:
    """plugins/module_utils as package `odcore` plus the driver, copied into the host."""
    container = site.container(host)
    assert site.exec(host, ["mkdir", "-p", REMOTE]).rc == 0
    res = docker("cp", str(repo_root() / "plugins" / "module_utils"), f"{container}:{REMOTE}/odcore")
    assert res.rc == 0, res.output
    put_file(site, host, f"{REMOTE}/driver.py", DRIVER)


def put_file(site: Site, host: str, path: str, text: str) -> None:
    res = docker("exec", "-i", site.container(host), "sh", "-c", f"umask 077; cat > {shlex.quote(path)}",
                 input_text=text)
    assert res.rc == 0, res.output


def repo_ip(site: Site) -> str:
    return next(h["ip"] for h in site.info()["hosts"] if h["name"] == "repo")


@pytest.fixture(scope="module")
def release(shop_bundles: dict[str, Path]) -> dict[str, Any]:
    bundle = shop_bundles["shop-1.0.0"] / "shop-1.0.0.bundle"
    model = load_model(yaml.safe_load((repo_root() / "examples/shop/app-1.0.0.yml").read_text()), "app-1.0.0.yml")
    return {"model": model, "images": read_head(str(bundle)).manifest["images"],
            "secrets": {"db_password": secrets.token_hex(16), "redis_password": secrets.token_hex(16)}}


def specs_for(site: Site, release: dict[str, Any], host: str) -> list[dict[str, Any]]:
    model = release["model"]
    placement = {name: [host] for name in model["components"]}
    specs = desired_specs(model, release["images"], host=host, platform=PLATFORMS[host], placement=placement,
                          addresses={}, secrets=release["secrets"], overrides={}, registry=f"{repo_ip(site)}:5000")
    return [asdict(s) for s in specs]


def drive(site: Site, host: str, actions: list[str], specs: list[dict[str, Any]]) -> dict[str, Any]:
    request = {"actions": actions, "specs": specs, "health_cap": HEALTH_CAP[host]}
    put_file(site, host, f"{REMOTE}/request.json", json.dumps(request))
    res = site.exec(host, ["python3", f"{REMOTE}/driver.py", f"{REMOTE}/request.json"], timeout=STEP_TIMEOUT[host])
    assert res.rc == 0 and res.stdout.strip(), f"{host}: driver failed (rc {res.rc}):\n{res.output[-6000:]}"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "error" not in out, f"{host}: {out['error']}\n--- log ---\n{res.stderr[-4000:]}"
    print(f"{host}: {actions}: {out['seconds']}")
    return out


def host_sh(site: Site, host: str, script: str, timeout: float = 120) -> str:
    res = site.exec(host, ["sh", "-c", script], timeout=timeout)
    assert res.rc == 0, f"{host}: {script}: {res.output}"
    return res.stdout


@pytest.mark.parametrize("host", list(PLATFORMS))
def test_shop_runs_as_systemd_services(site: Site, release: dict[str, Any], host: str) -> None:
    specs = specs_for(site, release, host)
    assert [s["name"] for s in specs] == ["db", "redis", "api", "gateway"]
    first = drive(site, host, ["prepare", "deploy", "observe", "probe", "volumes"], specs)
    assert first["started"] == ["db", "redis", "api", "gateway"]

    # the gateway answers through the API, which reads PostgreSQL and Redis
    fetch = ("import json, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8080/api/orders', "
             "timeout=20); print(r.status, json.dumps(json.load(r)))")
    status, body = host_sh(site, host, f"python3 -c {shlex.quote(fetch)}").split(" ", 1)
    assert status == "200" and json.loads(body)["currency"] == "EUR", body
    place = ("import urllib.request; r = urllib.request.urlopen(urllib.request.Request("
             "'http://127.0.0.1:8080/api/orders', data=b'{\"item\": \"tea\", \"quantity\": 2}', "
             "headers={'Content-Type': 'application/json'}), timeout=20); print(r.status)")
    assert host_sh(site, host, f"python3 -c {shlex.quote(place)}").strip() in ("200", "201")

    # every component healthy by its own probe (db: pg_isready through systemd-run in its root)
    assert all(ok for ok, _reason in first["probe"].values()), first["probe"]
    fingerprints = {s["name"]: s["fingerprint"] for s in specs}
    assert {k: v["fingerprint"] for k, v in first["observe"].items()} == fingerprints
    assert all(v["running"] and v["started_at"] for v in first["observe"].values()), first["observe"]

    # db data in the volume dir, owned by the image's postgres user; secrets file 0600 root
    pgdata = first["volumes"]["db"]["pgdata"]
    assert pgdata == f"{APPS_DIR}/shop/volumes/pgdata"
    owner = host_sh(site, host, f"stat -c '%u %a' {pgdata}/PG_VERSION")
    assert owner.split()[1] == "600" and owner.split()[0] != "0", owner   # the image's postgres uid
    env = host_sh(site, host, f"stat -c '%a %U %G' {STATE_DIR}/apps/shop/env/db.env {STATE_DIR}/apps/shop/env")
    assert env.split("\n")[:2] == ["600 root root", "700 root root"], env
    unit = host_sh(site, host, "cat /etc/systemd/system/od-shop-api.service")
    assert f"# offline-delivery fingerprint: {fingerprints['api']}" in unit
    assert "User=65534\nGroup=65534" in unit and "After=network-online.target od-shop-db.service" in unit
    assert release["secrets"]["db_password"] not in unit

    # a second deploy with the same specs restarts nothing
    again = drive(site, host, ["deploy", "observe"], specs)
    assert again["started"] == []
    assert {k: v["started_at"] for k, v in again["observe"].items()} == \
        {k: v["started_at"] for k, v in first["observe"].items()}
    assert host_sh(site, host, f"python3 -c {shlex.quote(fetch)}").startswith("200 ")

    # uninstall keeping data: units gone, the volume stays
    gone = drive(site, host, ["uninstall", "observe"], specs)
    assert "od-shop-gateway.service" in gone["removed"] and gone["observe"] == {}
    assert host_sh(site, host, f"ls {pgdata}/PG_VERSION && ls /etc/systemd/system | grep -c od-shop- || true") \
        .splitlines() == [f"{pgdata}/PG_VERSION", "0"]


TRICKY = ["plain", "with space", "100%", "$HOME ${PATH}", 'say "hi" \\o/', "it's", "a\nb\tc", ";", "%i %n"]


def test_systemd_parses_quoted_arguments_and_env_values_literally(site: Site) -> None:
    """The quoting of ExecStart arguments and EnvironmentFile values, read back from systemd 252 itself."""
    env = {f"V{i}": value for i, value in enumerate(TRICKY)}
    show = ("import json, os, sys; "
            "print(json.dumps([sys.argv[1:], {k: v for k, v in os.environ.items() if k[0] == 'V'}]))")
    unit = "\n".join([
        "[Service]", "Type=oneshot", f"EnvironmentFile={REMOTE}/quoting.env",
        f"StandardOutput=file:{REMOTE}/quoting.out",
        "ExecStart=" + " ".join(quote_arg(a) for a in ["/usr/bin/python3", "-c", show, *TRICKY]), ""])
    put_file(site, "node2", f"{REMOTE}/quoting.env", render_env_file(env))
    put_file(site, "node2", "/etc/systemd/system/od-s2s-quoting.service", unit)
    try:
        host_sh(site, "node2", "systemctl daemon-reload && systemctl start od-s2s-quoting.service", timeout=60)
        argv, seen = json.loads(host_sh(site, "node2", f"cat {REMOTE}/quoting.out"))
    finally:
        site.exec("node2", ["sh", "-c", "rm -f /etc/systemd/system/od-s2s-quoting.service; systemctl daemon-reload"])
    assert argv == TRICKY
    assert seen == env


INSTALL = ["ansible-playbook", "offline.delivery.install", "-e", "app_name=shop",
           "-e", "offline_delivery_compose_group=no_compose_hosts", "-e", "offline_delivery_systemd_group=node2:arm1"]


@pytest.mark.timeout(4800)
def test_install_playbook_runs_the_shop_on_systemd_hosts(site: Site) -> None:
    """The same through the product: `offline.delivery.install` (app role, app_deploy, SystemdRuntime) on
    both systemd hosts (after the driver's uninstall above, which kept the data); a second run changes nothing."""
    first = site.jump(INSTALL, timeout=3000)
    assert first.rc == 0, f"install failed:\n{first.output[-6000:]}"
    fetch = ("import json, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8080/api/orders', "
             "timeout=20); print(r.status, json.dumps(json.load(r)))")
    for host in PLATFORMS:
        status, body = host_sh(site, host, f"python3 -c {shlex.quote(fetch)}").split(" ", 1)
        assert status == "200" and any(o["item"] == "tea" for o in json.loads(body)["orders"]), f"{host}: {body}"
    second = site.jump(INSTALL, timeout=1500)
    assert second.rc == 0, second.output[-6000:]
    for host in PLATFORMS:
        assert recap(second, host)["changed"] == 0, f"{host}: {second.stdout[-4000:]}"


GROUPS = ["-e", "offline_delivery_compose_group=no_compose_hosts", "-e", "offline_delivery_systemd_group=node2:arm1"]
UNITS = [f"od-shop-{c}.service" for c in ("db", "redis", "api", "gateway")]


def unit_starts(site: Site, host: str) -> dict[str, str]:
    """Unit -> when it last became active (monotonic microseconds: a restart always changes it)."""
    out = host_sh(site, host, "for u in %s; do echo $u $(systemctl show -p ActiveEnterTimestampMonotonic --value $u);"
                              " done" % " ".join(UNITS))
    starts = dict(line.split(" ", 1) for line in out.splitlines())
    assert all(v.strip() not in ("", "0") for v in starts.values()), f"{host}: a unit is not running: {starts}"
    return starts


def image_dirs(site: Site, host: str) -> set[str]:
    return set(host_sh(site, host, f"ls {APPS_DIR}/shop/images").split())


@pytest.mark.timeout(3600)
def test_upgrade_restarts_only_the_api_and_rollback_reuses_its_images(site: Site,
                                                                      shop_bundles: dict[str, Path]) -> None:
    """After the install above: 1.1.0 changes only the API (image and an env default), so only its unit
    restarts and one image is added; the rollback to 1.0.0 unpacks nothing (the 1.0.0 tree is still there)."""
    carry(site, {"shop-1.1.0": shop_bundles["shop-1.1.0"], "vendor.pub": shop_bundles["vendor.pub"]})
    res = site.jump(["ansible-playbook", "offline.delivery.import", "-e",
                     "offline_delivery_bundle_src=/srv/transfer/shop-1.1.0",
                     "-e", json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})],
                    timeout=1200)
    assert res.rc == 0, f"import of shop 1.1.0 failed:\n{res.output[-5000:]}"
    before = {h: unit_starts(site, h) for h in PLATFORMS}
    images = {h: image_dirs(site, h) for h in PLATFORMS}
    up = site.jump(["ansible-playbook", "offline.delivery.upgrade", "-e", "app_name=shop", "-e", "app_version=1.1.0",
                    *GROUPS], timeout=2400)
    assert up.rc == 0, f"upgrade failed:\n{up.output[-6000:]}"
    for host in PLATFORMS:
        after = unit_starts(site, host)
        changed = sorted(u for u in UNITS if after[u] != before[host][u])
        assert changed == ["od-shop-api.service"], f"{host}: restarted {changed}"
        assert len(image_dirs(site, host) - images[host]) == 1, f"{host}: {image_dirs(site, host)}"
        assert "SHOP_PAGE_SIZE='50'" in host_sh(site, host, f"cat {STATE_DIR}/apps/shop/env/api.env")
    upgraded = {h: (unit_starts(site, h), image_dirs(site, h)) for h in PLATFORMS}
    back = site.jump(["ansible-playbook", "offline.delivery.rollback", "-e", "app_name=shop", *GROUPS], timeout=2400)
    assert back.rc == 0, f"rollback failed:\n{back.output[-6000:]}"
    fetch = ("import json, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8080/api/orders', "
             "timeout=20); print(json.dumps(json.load(r)))")
    for host in PLATFORMS:
        starts, dirs = upgraded[host]
        after = unit_starts(site, host)
        assert sorted(u for u in UNITS if after[u] != starts[u]) == ["od-shop-api.service"], host
        assert image_dirs(site, host) == dirs, f"{host}: the rollback unpacked an image again"
        assert "SHOP_PAGE_SIZE='20'" in host_sh(site, host, f"cat {STATE_DIR}/apps/shop/env/api.env")
        orders = json.loads(host_sh(site, host, f"python3 -c {shlex.quote(fetch)}"))["orders"]
        assert any(o["item"] == "tea" for o in orders), f"{host}: {orders}"
