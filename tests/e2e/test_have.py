"""What a site has, end to end: a site holding shop 1.0.0 exports its signed have-list with
`ansible-playbook offline.delivery.have` (fetched to the controller), the vendor builds 1.1.0 with
`bundle-builder build --have --have-pub` against it, the bundle carries only the blobs the site lacks, and it
imports cleanly there through `offline.delivery.import`.

Its own tiny site (`h-have`: a repo host and the jump host), up for this module only.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from offline_delivery_core.bundle import ed25519
from offline_delivery_core.site import have as site_have
from offline_delivery_core.bundle.format import read_head
from tests.e2e.conftest import require_world, running_site
from tests.e2e.media import bundle_builder, carry, recap
from tests.world.shop_images import build_shop_images
from tests.world.site import HostSpec, Site
from tests.world.util import repo_root

pytestmark = pytest.mark.world

SITE = os.environ.get("OD_E2E_SITE_H", "h-have")
HOSTS = (HostSpec("repo", "amd64", ("offline_repo",)),)
TIMEOUT = 900
HAVE_DIR = "offline-delivery-have"  # the playbook's default destination, relative to where it runs


@pytest.fixture(scope="module")
def site(shop_bundles: dict[str, Path]) -> Iterator[Site]:
    require_world(h.arch for h in HOSTS)
    yield from running_site(Site(SITE, HOSTS))


def playbook(site: Site, name: str, *extra: str) -> tuple[int, dict[str, int], str]:
    # from the drop box, so the default destination lands where this machine can read it
    cmd = " ".join(["cd /srv/transfer &&", "ansible-playbook", f"offline.delivery.{name}", *extra])
    res = site.jump(cmd, timeout=TIMEOUT)
    return res.rc, (recap(res) if res.rc == 0 else {}), res.output


def import_media(site: Site, media: str) -> None:
    keys = json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})
    rc, counts, out = playbook(site, "import", "-e", f"offline_delivery_bundle_src=/srv/transfer/{media}",
                               "-e", f"'{keys}'")
    assert rc == 0 and counts["failed"] == 0, f"import of {media} failed:\n{out[-5000:]}"


def catalog(site: Site) -> dict:
    res = site.exec("repo", ["cat", "/srv/offline-delivery/catalog.json"])
    assert res.rc == 0, res.output
    return json.loads(res.stdout)


def test_have_list_then_delta_built_against_it_imports(site: Site, shop_bundles: dict[str, Path],
                                                        tmp_path: Path) -> None:
    carry(site, shop_bundles)
    import_media(site, "shop-1.0.0")

    # check mode: says it would write (and make the site key), writes and fetches nothing
    rc, counts, out = playbook(site, "have", "--check", "-e", f"offline_delivery_site={SITE}")
    assert rc == 0 and counts["changed"] == 1 and counts["failed"] == 0 and "would write" in out, out[-5000:]
    assert not (site.transfer_dir / HAVE_DIR).exists()
    assert site.exec("repo", ["test", "-e", "/etc/offline-delivery/have-signing"]).rc == 1

    rc, counts, out = playbook(site, "have", "-e", f"offline_delivery_site={SITE}")
    assert rc == 0 and counts["failed"] == 0 and counts["changed"] >= 1, out[-5000:]
    have_file = site.transfer_dir / HAVE_DIR / f"{SITE}.have.json"
    pub_file = site.transfer_dir / HAVE_DIR / f"{SITE}.have.pub"
    pub = ed25519.load_public_key_pem(pub_file.read_text(), source=str(pub_file))
    doc = site_have.verify_have(have_file.read_bytes(), [pub], str(have_file))
    v1 = read_head(str(shop_bundles["shop-1.0.0"] / "shop-1.0.0.bundle")).manifest
    assert doc["site"] == SITE
    assert [(r["name"], r["version"]) for r in doc["releases"]] == [("shop", "1.0.0")]
    assert set(doc["blobs"]) == {b["digest"] for b in v1["blobs"]}
    # the site key stays on the repo host, private
    res = site.exec("repo", ["stat", "-c", "%a", f"/etc/offline-delivery/have-signing/{site_have.KEY_NAME}"])
    assert res.rc == 0 and res.stdout.strip() == "600", res.output

    before = have_file.read_bytes()
    rc, counts, out = playbook(site, "have", "-e", f"offline_delivery_site={SITE}")
    assert rc == 0 and counts["changed"] == 0, f"a second export changed something:\n{out[-3000:]}"
    assert have_file.read_bytes() == before

    # The vendor side: build 1.1.0 against the carried list, its signature checked with the pinned key.
    oci = build_shop_images(("amd64", "arm64"))
    out_dir = tmp_path / "h-shop-1.1.0"
    bundle_builder("build", str(repo_root() / "examples" / "shop" / "app-1.1.0.yml"), "-o", str(out_dir),
                   "--images-from", f"oci:{oci}", "--platform", "linux/amd64,linux/arm64",
                   "--packages", "debian-12", "--sign-key", str(shop_bundles["vendor.key"]),
                   "--have", str(have_file), "--have-pub", str(pub_file))
    v11 = read_head(str(out_dir / "shop-1.1.0.bundle")).manifest
    bundled = {b["digest"] for b in v11["blobs"] if b["bundled"]}
    assert bundled == {b["digest"] for b in v11["blobs"]} - set(doc["blobs"])
    assert bundled and len(bundled) < len(v11["blobs"])
    assert v11["delta"]["have"]["blobs"] == len(doc["blobs"])
    # the same blobs as the delta built from the 1.0.0 bundle itself: the site held exactly 1.0.0
    by_base = read_head(str(shop_bundles["shop-1.1.0"] / "shop-1.1.0.bundle")).manifest
    assert bundled == {b["digest"] for b in by_base["blobs"] if b["bundled"]}

    carry(site, {"h-shop-1.1.0": out_dir})
    import_media(site, "h-shop-1.1.0")
    releases = {(r["name"], r["version"]): r for r in catalog(site)["releases"]}
    assert ("shop", "1.1.0") in releases
    assert releases[("shop", "1.1.0")]["delta"]["have"]["digest"] == v11["delta"]["have"]["digest"]

    rc, counts, out = playbook(site, "have", "-e", f"offline_delivery_site={SITE}")
    assert rc == 0 and counts["changed"] >= 1, out[-3000:]
    doc2 = site_have.verify_have(have_file.read_bytes(), [pub], str(have_file))
    assert [r["version"] for r in doc2["releases"]] == ["1.0.0", "1.1.0"]
    assert set(doc2["blobs"]) == set(doc["blobs"]) | {b["digest"] for b in v11["blobs"]}


def _offline_delivery(site: Site, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The `offline-delivery` command on this machine, with the site's local inventory and the checkout as
    the collection (runner runs ansible-playbook from the venv)."""
    collections = cwd / "collections"
    (collections / "ansible_collections" / "offline").mkdir(parents=True, exist_ok=True)
    link = collections / "ansible_collections" / "offline" / "delivery"
    if not link.exists():
        link.symlink_to(repo_root())
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(collections),
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    return subprocess.run([sys.executable, "-m", "offline_delivery_cli", *args, "-i", str(site.local_inventory_path)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def test_offline_delivery_command_runs_the_playbook_through_runner(site: Site, tmp_path: Path) -> None:
    proc = _offline_delivery(site, tmp_path, "have", "--site", SITE)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "== Export the site's signed have-list and fetch it to the controller" in out
    assert "   Write the signed have-list on the repo host" in out
    row = next(ln for ln in out.splitlines() if ln.startswith("repo ")).split()
    # the list on the repo host was current; only the fetch into this new directory changed something
    assert row[:2] == ["repo", "changed"] and row[3:7] == ["1", "0", "0", "0"], out
    run_dir = Path(re.search(r"^artifacts \(keep for support\): (.+)$", out, re.M).group(1))  # type: ignore[union-attr]
    assert run_dir.parent == tmp_path / "offline-delivery-runs"
    artifacts = run_dir / "artifacts" / run_dir.name
    assert (artifacts / "stdout").is_file() and any((artifacts / "job_events").iterdir())
    fetched = tmp_path / "offline-delivery-have" / f"{SITE}.have.json"
    assert fetched.read_bytes() == (site.transfer_dir / HAVE_DIR / f"{SITE}.have.json").read_bytes()
    proc = _offline_delivery(site, tmp_path, "have", "--site", SITE)
    assert proc.returncode == 0 and re.search(r"^repo\s+ok\s+\d+\s+0\s+0\s+0\s", proc.stdout, re.M), proc.stdout
    proc = _offline_delivery(site, tmp_path, "have", "--site", SITE, "--check")
    assert proc.returncode == 0 and "have done (check mode: nothing changed)" in proc.stdout, proc.stdout

    proc = _offline_delivery(site, tmp_path, "have", "--site", "no/such")
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert "FAILED repo: have-list of site no/such" in proc.stdout and "must be 1-63 letters" in proc.stdout
    assert re.search(r"^repo\s+FAILED\s", proc.stdout, re.M) and "have FAILED" in proc.stdout

    # every run has its own directory: no run sees another's variables (the failed run's 'no/such' site)
    commands = [json.loads(p.read_text())["command"]
                for p in (tmp_path / "offline-delivery-runs").glob("*/artifacts/*/command")]
    assert len(commands) == 4 and sum("--check" in c for c in commands) == 1
    extravars = [p.read_text() for p in (tmp_path / "offline-delivery-runs").glob("*/env/extravars")]
    assert len(extravars) == 4 and sum("no/such" in text for text in extravars) == 1
