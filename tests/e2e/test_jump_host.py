"""The jump host from the media: bare hosts (python3 only, no ansible) install the jump-host kit
(`bundle-builder jumpkit`, docs/jump-host.md) with its one command, then run the shop's import → runtime → install
from it:
- `bare13` (Debian 13, amd64: Python 3.13, ansible-core 2.21) runs the flow first, installing the shop on node1;
- `bare` (Debian 12, amd64: Python 3.11, ansible-core 2.19) runs the same three playbooks after it: nothing
  changes on the site (a second jump host of the other release sees the state the first one left);
- `barea` (Debian 12, arm64, under qemu, ~7× slower) runs `offline-delivery status` and `offline-delivery import`
  (ansible-runner, the collection, the site's hosts); its whole flow was run once by hand (docs/jump-host.md).

The site (OD_E2E_SITE_KIT, default e2e-kit) has the usual jump host too, but nothing here uses it: the kit, the
bundle, the site's inventory and ssh key are put on the bare hosts with `docker cp`, as an engineer carries media
and copies the site's inventory. The kit is built once per set of inputs into ${OD_CACHE}/jumpkit/<key>.
"""
from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.e2e.conftest import require_world, running_site
from tests.e2e.media import bundle_builder, recap
from tests.world.ansible_cores import newest_for
from tests.world.site import ARCHES, HostSpec, Site, group_name, inventory
from tests.world.util import Result, cache_dir, docker, repo_root

pytestmark = pytest.mark.world

HOSTS = (
    HostSpec("repo", "amd64", ("offline_repo",)),
    HostSpec("node1", "amd64", ("systemd_hosts",)),
    HostSpec("bare", "amd64"),
    HostSpec("bare13", "amd64", suite="trixie"),
    HostSpec("barea", "arm64"),
)
JUMPS = ("bare", "bare13", "barea")
SUITES = {"bookworm": "3.11", "trixie": "3.13"}   # each Debian release's python3: the kit's --python
KIT = "/media/kit"
SITE_DIR = "/root/site"   # the site's inventory, group_vars and ssh key, as the engineer copies them
VENV = "/opt/offline-delivery"
PLAY_TIMEOUT = 1800


def _kit_inputs() -> list[Path]:
    """What the kit is made of: every file of the checkout but the tests (collection, package, installer)."""
    root = repo_root()
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout.decode()
    return sorted(root / p for p in out.split("\0") if p and not p.startswith("tests/") and (root / p).is_file())


def kit_args() -> list[str]:
    """The kit's targets: every Python of SUITES for every arch of ARCHES (the world's Debian 12 and 13 hosts)."""
    return [arg for py in SUITES.values() for arg in ("--python", py)] + \
           [arg for arch in ARCHES for arg in ("--arch", arch)]


def cached_kit(vendor_key: Path) -> Path:
    """`bundle-builder jumpkit` of kit_args(), cached under a hash of its inputs, targets and the signing key."""
    digest = hashlib.sha256(vendor_key.with_suffix(".pub").read_bytes() + " ".join(kit_args()).encode())
    for path in _kit_inputs():
        digest.update(str(path.relative_to(repo_root())).encode() + b"\0" + path.read_bytes() + b"\0")
    base = cache_dir() / "jumpkit"
    dest = base / digest.hexdigest()[:24]
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "kit.sig").exists():
            work = base / f".tmp-{os.getpid()}"
            shutil.rmtree(work, ignore_errors=True)
            bundle_builder("jumpkit", str(work), *kit_args(), "--key", str(vendor_key))
            shutil.rmtree(dest, ignore_errors=True)
            work.rename(dest)
            for old in base.iterdir():  # one kit is enough: drop kits of older inputs
                if old.is_dir() and old != dest:
                    shutil.rmtree(old, ignore_errors=True)
    return dest


def pin_of(kit: Path) -> str:
    from offline_delivery_core.bundle import ed25519, trust
    return trust.fingerprint(ed25519.load_public_key_pem((kit / "vendor.pub").read_bytes()))


def put(site: Site, host: str, src: Path, dest: str) -> None:
    docker("cp", str(src), f"{site.container(host)}:{dest}", timeout=300).check(f"docker cp {src} to {host}:{dest}")


def as_user(site: Site, host: str, command: str, timeout: float = PLAY_TIMEOUT) -> Result:
    """A login shell on the jump host, after the activation the installer printed."""
    return site.exec(host, ["bash", "-c", f". {VENV}/bin/activate && cd {SITE_DIR} && {command}"], timeout=timeout)


def ok(res: Result, what: str) -> Result:
    assert res.rc == 0, f"{what} failed (rc {res.rc}):\n{res.output[-6000:]}"
    return res


@pytest.fixture(scope="module")
def site(shop_bundles: dict[str, Path]) -> Iterator[Site]:
    require_world(h.arch for h in HOSTS)
    yield from running_site(Site(os.environ.get("OD_E2E_SITE_KIT", "e2e-kit"), HOSTS))


@pytest.fixture(scope="module")
def kit(shop_bundles: dict[str, Path]) -> Path:
    return cached_kit(shop_bundles["vendor.key"])


def _install(site: Site, host: str, pin: str) -> dict[str, Result]:
    assert site.exec(host, "command -v ansible-playbook || ls /usr/lib/python3/dist-packages/ansible").rc != 0, \
        f"{host} is not bare: it has ansible"
    started = time.monotonic()
    runs = {"unpinned": site.exec(host, ["python3", f"{KIT}/install.py"], timeout=300),
            "unpinned_left": site.exec(host, f"ls -d {VENV} /usr/share/ansible 2>&1; true"),
            "first": site.exec(host, ["python3", f"{KIT}/install.py", "--pin", pin], timeout=1200),
            "second": site.exec(host, ["python3", f"{KIT}/install.py", "--pin", pin], timeout=600)}
    print(f"{host}: the kit's three runs took {time.monotonic() - started:.0f} s")
    return runs


@pytest.fixture(scope="module")
def installs(site: Site, kit: Path) -> dict[str, dict[str, Result]]:
    """On each bare host at once: the kit carried in, then install.py without a pin, with it, and again."""
    for host in JUMPS:
        put(site, host, kit, KIT)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(JUMPS)) as pool:
        futures = {host: pool.submit(_install, site, host, pin_of(kit)) for host in JUMPS}
        return {host: future.result() for host, future in futures.items()}


@pytest.mark.parametrize("host", JUMPS)
def test_an_unpinned_kit_is_refused_with_its_fingerprint(installs: dict[str, dict[str, Result]], kit: Path,
                                                          host: str) -> None:
    run = installs[host]["unpinned"]
    assert run.rc == 1 and f"--pin {pin_of(kit)}" in run.stderr, run.output
    left = installs[host]["unpinned_left"]
    assert left.stdout.count("No such file") == 2, f"the refused run left something behind: {left.output}"


@pytest.mark.parametrize("host", JUMPS)
def test_the_kit_installs_on_a_bare_host_and_a_second_run_changes_nothing(
        site: Site, installs: dict[str, dict[str, Result]], host: str) -> None:
    first, second = installs[host]["first"], installs[host]["second"]
    core = newest_for(site.host_suite(site.host(host))).series   # what the kit carries for this host's Python
    assert first.rc == 0 and "installed: kit" in first.stdout and f"ansible-core {core}." in first.stdout, \
        first.output
    assert f". {VENV}/bin/activate" in first.stdout and "offline.delivery.import" in first.stdout
    assert second.rc == 0 and second.stdout.startswith("nothing to do:"), second.output
    versions = ok(site.exec(host, f"{VENV}/bin/ansible-galaxy collection list offline.delivery && "
                                  f"{VENV}/bin/ansible --version && {VENV}/bin/offline-delivery --help"),
                  "the installed commands")
    assert "offline.delivery 0.2.0" in versions.stdout and "usage: offline-delivery" in versions.stdout
    assert f"[core {core}." in versions.stdout, versions.output


def test_a_tampered_kit_is_refused_naming_the_file_and_nothing_changes(site: Site, installs: dict) -> None:
    before = ok(site.exec("bare", f"sha256sum {VENV}/offline-delivery-kit.json"), "stamp").stdout
    wheel = ok(site.exec("bare", f"cp -a {KIT} /tmp/bad && ls /tmp/bad/wheels/py3.11-amd64/ansible_core-*.whl"),
               "copy").stdout.strip()
    ok(site.exec("bare", f"printf 'X' | dd of={wheel} bs=1 seek=4096 conv=notrunc status=none"), "flip a byte")
    pin = json.loads(site.exec("bare", f"cat {VENV}/offline-delivery-kit.json").stdout)["pin"]
    res = site.exec("bare", ["python3", "/tmp/bad/install.py", "--pin", pin, "--prefix", "/opt/other"], timeout=300)
    assert res.rc == 1 and wheel in res.stderr and "tampered" in res.stderr, res.output
    assert site.exec("bare", "test -e /opt/other").rc != 0
    assert ok(site.exec("bare", f"sha256sum {VENV}/offline-delivery-kit.json"), "stamp").stdout == before


@pytest.fixture(scope="module")
def site_on_jumps(site: Site, installs: dict, shop_bundles: dict[str, Path], tmp_path_factory) -> None:
    """The site's inventory (without the bare hosts), its vendor-key pin, ssh key and the carried shop bundle and
    vendor key on each bare jump host."""
    fingerprint = site.pin_vendor_key(shop_bundles["vendor.pub"])
    inv = inventory([site], {site.name: f"{SITE_DIR}/id_ed25519"}, prefix_hosts=False)
    for host in JUMPS:
        del inv["all"]["children"][group_name(site.name)]["hosts"][host]
    local = tmp_path_factory.mktemp("site")
    (local / "inventory.yml").write_text(yaml.safe_dump(inv))
    (local / "group_vars" / "all").mkdir(parents=True)
    (local / "group_vars" / "all" / "vendor_keys.yml").write_text(
        yaml.safe_dump({"offline_delivery_vendor_keys": [{"fingerprint": fingerprint, "apps": ["*"]}]}))
    shutil.copyfile(site.key_path, local / "id_ed25519")
    for host in JUMPS:
        put(site, host, local, SITE_DIR)
        ok(site.exec(host, f"chmod 600 {SITE_DIR}/id_ed25519 && mkdir -p /srv/transfer"), "key mode")
        put(site, host, shop_bundles["shop-1.0.0"], "/srv/transfer/shop-1.0.0")
        put(site, host, shop_bundles["vendor.pub"], "/srv/transfer/vendor.pub")


KEYS = json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})
FLOW = {"import": "ansible-playbook -i inventory.yml offline.delivery.import "
                  f"-e offline_delivery_bundle_src=/srv/transfer/shop-1.0.0 -e '{KEYS}'",
        "runtime": "ansible-playbook -i inventory.yml offline.delivery.runtime",
        "install": "ansible-playbook -i inventory.yml offline.delivery.install -e app_name=shop -e app_version=1.0.0"}
STEP_HOSTS = {"import": ("repo",), "runtime": ("repo", "node1"), "install": ("repo", "node1")}  # each one's plays


def run_flow(site: Site, host: str) -> dict[str, Result]:
    runs: dict[str, Result] = {}
    for step, command in FLOW.items():
        started = time.monotonic()
        runs[step] = ok(as_user(site, host, command), f"{step} from the kit on {host}")
        print(f"{host}: {step} took {time.monotonic() - started:.0f} s")
    return runs


@pytest.fixture(scope="module")
def flows(site: Site, site_on_jumps: None) -> dict[str, dict[str, Result]]:
    """The flow from the Debian 13 kit, then the same playbooks from the Debian 12 kit."""
    return {host: run_flow(site, host) for host in ("bare13", "bare")}


def test_the_shop_flow_runs_from_the_debian_13_kit(site: Site, flows: dict[str, dict[str, Result]]) -> None:
    flow = flows["bare13"]
    for step, res in flow.items():
        for host in STEP_HOSTS[step]:
            assert recap(res, host)["failed"] == 0, (step, host, res.output[-3000:])
    assert recap(flow["import"], "repo")["changed"] > 0 and recap(flow["install"], "node1")["changed"] > 0
    units = ok(site.exec("node1", "systemctl list-units --no-legend --state=active 'od-shop*' | wc -l"), "units")
    assert int(units.stdout.strip()) > 0, units.output


def test_the_debian_12_kit_runs_the_same_flow_and_nothing_changes(flows: dict[str, dict[str, Result]]) -> None:
    for step, res in flows["bare"].items():
        for host in STEP_HOSTS[step]:
            counts = recap(res, host)
            assert counts["failed"] == 0 and counts["changed"] == 0, (step, host, res.output[-3000:])


def test_the_arm64_kit_runs_the_offline_delivery_command_against_the_site(
        site: Site, flows: dict[str, dict[str, Result]]) -> None:
    """The arm64 kit's ansible-runner, collection and ssh against the site: the status of what the flow installed.
    (Its whole flow under qemu takes about 10 min: run once by hand, docs/jump-host.md.)"""
    started = time.monotonic()
    status = ok(as_user(site, "barea", "offline-delivery -i inventory.yml status --app shop"), "status on barea")
    print(f"barea: offline-delivery status took {time.monotonic() - started:.0f} s")
    assert "status done" in status.stdout, status.output[-3000:]
    report = json.loads(ok(site.exec("barea", f"cat {SITE_DIR}/offline-delivery-reports/shop-status.json"),
                           "the status report").stdout)
    assert report["healthy"] is True and report["hosts"]["node1"]["reachable"] is True, report
