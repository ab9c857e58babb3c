"""Status carried back, end to end: a site running shop 1.0.0 collects its signed status report with
`ansible-playbook offline.delivery.site_status` (fetched to the controller), the vendor's `bundle-builder
fleet` verifies it with the pinned site key and shows the site healthy on 1.0.0, and a second run changes
nothing.

Its own small site (`t-status`: a repo host, one compose target and the jump host), up for this module only.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from offline_delivery_core.bundle import ed25519
from offline_delivery_core.bundle.format import read_head, sbom_descriptor
from offline_delivery_core.site import have as site_have
from offline_delivery_core.site import status as site_status
from tests.e2e.conftest import require_world, running_site
from tests.e2e.media import carry, recap
from tests.world.site import HostSpec, Site
from tests.world.util import Result

pytestmark = pytest.mark.world

SITE = os.environ.get("OD_E2E_SITE_T", "t-status")
HOSTS = (HostSpec("repo", "amd64", ("offline_repo",)), HostSpec("node1", "amd64", ("compose_hosts",)))
TIMEOUT = 1200
OVERRIDE = {"app_overrides": {"api": {"SHOP_CURRENCY": "XTS-OVERRIDE"}}}  # an env value: must not travel
STATUS_DIR = "offline-delivery-status"  # the playbook's default destination, relative to where it runs


@pytest.fixture(scope="module")
def site(shop_bundles: dict[str, Path]) -> Iterator[Site]:
    require_world(h.arch for h in HOSTS)
    yield from running_site(Site(SITE, HOSTS))


def playbook(site: Site, name: str, *extra: str) -> Result:
    # from the drop box, so the default destination lands where this machine can read it
    res = site.jump(" ".join(["cd /srv/transfer &&", "ansible-playbook", f"offline.delivery.{name}", *extra]),
                    timeout=TIMEOUT)
    assert res.rc == 0, f"{name} failed (rc {res.rc}):\n{res.output[-5000:]}"
    return res


@pytest.fixture(scope="module")
def installed(site: Site, shop_bundles: dict[str, Path]) -> Site:
    carry(site, {name: shop_bundles[name] for name in ("shop-1.0.0", "vendor.pub")})
    keys = json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})
    playbook(site, "import", "-e", "offline_delivery_bundle_src=/srv/transfer/shop-1.0.0", "-e", f"'{keys}'")
    playbook(site, "runtime")
    playbook(site, "install", "-e", "app_name=shop", "-e", "app_version=1.0.0", "-e", f"'{json.dumps(OVERRIDE)}'")
    return site


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bundle_builder.cli", "fleet", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_status_report_signed_on_site_read_by_the_fleet_command(installed: Site, tmp_path: Path,
                                                                 shop_bundles: dict[str, Path]) -> None:
    site = installed
    first = playbook(site, "site_status", "-e", f"offline_delivery_site={SITE}")
    assert recap(first)["changed"] >= 1 and f"wrote /var/lib/offline-delivery/status/{SITE}.status.json" in first.stdout
    report = site.transfer_dir / STATUS_DIR / f"{SITE}.status.json"
    pub = site.transfer_dir / STATUS_DIR / f"{SITE}.status.pub"
    data = report.read_bytes()

    # one site identity: the report's key is the have-list's key on the repo host
    res = site.exec("repo", ["cat", f"/etc/offline-delivery/have-signing/{site_have.PUB_NAME}"])
    assert res.rc == 0 and res.stdout == pub.read_text(), res.output
    doc = site_status.verify_status(data, [ed25519.load_public_key_pem(pub.read_text())], str(report))
    assert doc["site"] == SITE and [(r["name"], r["version"]) for r in doc["releases"]] == [("shop", "1.0.0")]
    # the release's SBOM: imported beside the release on the repo host, named by its digest in the report
    sbom = sbom_descriptor(read_head(str(shop_bundles["shop-1.0.0"] / "shop-1.0.0.bundle")).manifest)
    assert sbom is not None and doc["releases"][0]["sbom"] == sbom["digest"]
    res = site.exec("repo", ["sha256sum", "/srv/offline-delivery/releases/shop/1.0.0/sbom.cdx.json"])
    assert res.rc == 0 and "sha256:" + res.stdout.split()[0] == sbom["digest"], res.output
    node1 = doc["hosts"]["node1"]
    assert node1["reachable"] and node1["facts"]["distribution"] == "Debian" and node1["facts"]["architecture"]
    assert node1["freeMiB"]["/var/lib/offline-delivery"] > 0
    shop = node1["apps"]["shop"]
    assert shop["version"] == "1.0.0" and shop["healthy"] and shop["target"] == "compose"
    assert sorted(shop["components"]) == ["api", "db", "gateway", "redis"]
    assert [(e["action"], e["to"], e["result"]) for e in shop["history"]] == [("install", "1.0.0", "ok")]
    # neither the app's secrets (generated on the repo host) nor the site's env values are in the report
    secrets = json.loads(site.exec("repo", ["cat", "/var/lib/offline-delivery/apps/shop/secrets.json"]).stdout)
    assert secrets and not [name for name, value in secrets.items() if value in data.decode()]
    assert "XTS-OVERRIDE" not in data.decode() and "SHOP_CURRENCY" not in data.decode()

    # the vendor: pinned key in a directory of site keys
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(pub, keys / f"{SITE}.pub")
    proc = fleet(str(report), "--site-keys", str(keys), "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)["sites"]
    assert (row["site"], row["app"], row["versions"]) == (SITE, "shop", {"1.0.0": ["node1"]})
    assert (row["healthy"], row["components"], row["failed"], row["lagging"]) == (4, 4, None, False)
    proc = fleet(str(report), "--site-keys", str(keys))
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(SITE))
    assert proc.returncode == 0 and "1.0.0" in line and "4/4" in line, proc.stdout
    proc = fleet(str(report), "--site-keys", str(keys), "--latest", "shop=1.1.0")
    assert "behind 1.1.0" in proc.stdout

    # a copy changed by hand is refused, naming the file
    forged = tmp_path / f"{SITE}.status.json"
    forged.write_bytes(data.replace(b'"healthy":true', b'"healthy":false'))
    proc = fleet(str(forged), "--site-keys", str(keys))
    assert proc.returncode == 1 and f"REFUSED {forged}" in proc.stderr and "does not match" in proc.stderr

    # a second run: nothing changes, on the site or on the controller
    again = playbook(site, "site_status", "-e", f"offline_delivery_site={SITE}")
    for host in ("repo", "node1"):
        assert recap(again, host)["changed"] == 0, again.stdout[-3000:]
    assert "unchanged since" in again.stdout and report.read_bytes() == data
