"""Hub -> site sync, end to end on two world sites joined by a network of their own (tests/world/link.py).

`y-hub` imports shop 1.0.0 and 1.1.0 and serves its repository (offline_repo_serve_repository=true); `y-city`
imports 1.0.0. Only the two repo hosts share the link. From the city's jump host, `ansible-playbook
offline.delivery.sync` pulls 1.1.0: check mode says what would be sent and writes nothing; a partial file
pre-seeded in the city's staging area (what an interrupted transfer leaves) is continued with a Range request;
exactly the blobs the city lacked travel; the city's catalog and registry then have 1.1.0; a rerun changes
nothing. The hub serves the catalog, release records and blobs only. Last, the hub turns its TLS option on (with
the import of 1.2.0) and the city syncs 1.2.0 over HTTPS, trusting the hub's site CA alone, carried as a file.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from offline_delivery_core.bundle.format import digest_hex, read_head
from tests.e2e.conftest import require_world, running_site
from tests.e2e.media import carry, recap
from tests.world.link import Link
from tests.world.site import HostSpec, Site
from tests.world.util import docker

pytestmark = pytest.mark.world

HUB = os.environ.get("OD_E2E_SITE_HUB", "y-hub")
CITY = os.environ.get("OD_E2E_SITE_CITY", "y-city")
HOSTS = (HostSpec("repo", "amd64", ("offline_repo",)),)
TIMEOUT = 900
REPO = "/srv/offline-delivery"
KEYS = json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})


def playbook(site: Site, name: str, *extra: str) -> tuple[int, dict[str, int], str]:
    cmd = " ".join(["ansible-playbook", f"offline.delivery.{name}", *extra])
    res = site.jump(cmd, timeout=TIMEOUT)
    return res.rc, (recap(res) if res.rc == 0 else {}), res.output


def import_media(site: Site, *media: str, serve: bool = False, options: tuple[str, ...] = ()) -> None:
    for name in media:
        extra = [*(["-e", "offline_repo_serve_repository=true"] if serve else []), *options]
        rc, counts, out = playbook(site, "import", "-e", f"offline_delivery_bundle_src=/srv/transfer/{name}",
                                   "-e", f"'{KEYS}'", *extra)
        assert rc == 0 and counts["failed"] == 0, f"import of {name} into {site.name} failed:\n{out[-5000:]}"


def catalog(site: Site) -> dict[tuple[str, str], dict]:
    res = site.exec("repo", ["cat", f"{REPO}/catalog.json"])
    assert res.rc == 0, res.output
    return {(r["name"], r["version"]): r for r in json.loads(res.stdout)["releases"]}


def http_status(site: Site, url: str) -> int:
    code = ("import sys, urllib.request as u, urllib.error as e\n"
            "try: print(u.urlopen(sys.argv[1], timeout=10).status)\n"
            "except e.HTTPError as x: print(x.code)")
    res = site.exec("repo", ["python3", "-c", code, url], timeout=60)
    assert res.rc == 0, res.output
    return int(res.stdout.strip())


@pytest.fixture(scope="module")
def linked(shop_bundles: dict[str, Path]) -> Iterator[tuple[Site, Site, str, str]]:
    """Both sites up with their imports done, their repo hosts on the link; (hub, city, their link IPs)."""
    require_world(h.arch for h in HOSTS)
    hub_up = running_site(Site(HUB, HOSTS))
    hub = next(hub_up)
    try:
        city_up = running_site(Site(CITY, HOSTS))
        city = next(city_up)
        try:
            media = {k: shop_bundles[k] for k in ("shop-1.0.0", "shop-1.1.0", "vendor.pub")}
            carry(hub, media)
            carry(city, media)
            with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
                jobs = [pool.submit(import_media, hub, "shop-1.0.0", "shop-1.1.0", serve=True),
                        pool.submit(import_media, city, "shop-1.0.0")]
                for job in jobs:
                    job.result()
            link = Link("y-hubcity", [(hub, "repo"), (city, "repo")])
            ips = link.up()
            try:
                yield hub, city, ips[f"{HUB}-repo"], ips[f"{CITY}-repo"]
            finally:
                link.remove()
        finally:
            city_up.close()
    finally:
        hub_up.close()


def sync(city: Site, hub_ip: str, *extra: str, url: str = "", version: str = "1.1.0") -> tuple[int, dict[str, int], str]:
    """The sync playbook on the city's jump host: from http://<hub_ip>:8080 unless `url` names the hub."""
    return playbook(city, "sync", "-e", f"offline_delivery_sync_from={url or f'http://{hub_ip}:8080'}",
                    "-e", "app_name=shop", "-e", f"app_version={version}", *extra)


def sent(out: str, version: str = "1.1.0") -> dict[str, Any]:
    m = re.search(rf"shop {re.escape(version)} synced from (\S+): (\d+) blobs, (\d+) bytes sent"
                  r"(?:, (\d+) bytes resumed from an earlier run)?", out)
    assert m, f"no sync report in the output:\n{out[-5000:]}"
    return {"hub": m.group(1), "blobs": int(m.group(2)), "bytes": int(m.group(3)), "resumed": int(m.group(4) or 0)}


def test_sync_sends_only_what_the_city_lacks_resumes_and_publishes(linked: tuple[Site, Site, str, str],
                                                                   shop_bundles: dict[str, Path]) -> None:
    hub, city, hub_ip, dummy = linked
    v10 = read_head(str(shop_bundles["shop-1.0.0"] / "shop-1.0.0.bundle")).manifest
    head = read_head(str(shop_bundles["shop-1.1.0"] / "shop-1.1.0.bundle"))
    have = {b["digest"] for b in v10["blobs"]}
    lacking = [b for b in head.manifest["blobs"] if b["digest"] not in have]
    lacking_bytes = sum(b["size"] for b in lacking)
    assert lacking and len(lacking) < len(head.manifest["blobs"])
    assert catalog(hub)[("shop", "1.1.0")]["manifestDigest"] == head.manifest_digest
    assert ("shop", "1.1.0") not in catalog(city)

    # check mode: what would be sent, nothing written on the city
    rc, counts, out = sync(city, hub_ip, "--check")
    assert rc == 0 and counts["failed"] == 0 and counts["changed"] >= 1, out[-5000:]
    assert f"{len(lacking)} of {len(head.manifest['blobs'])} blobs, {lacking_bytes} bytes to send" in out, out[-5000:]
    assert ("shop", "1.1.0") not in catalog(city)
    assert city.exec("repo", ["sh", "-c", f"ls -A {REPO}/staging"]).stdout.strip() == ""

    # what an interrupted transfer leaves: the first part of the biggest blob in the city's staging area
    big = max(lacking, key=lambda b: b["size"])
    part = big["size"] // 3
    stage = f"{REPO}/staging/sync-{digest_hex(head.manifest_digest)}"
    _copy_partial(hub, city, big, part, stage)

    rc, counts, out = sync(city, hub_ip, "-e", "offline_delivery_sync_bandwidth_limit=20M")
    assert rc == 0 and counts["failed"] == 0 and counts["changed"] >= 1, out[-5000:]
    report = sent(out)
    assert report["hub"] == f"http://{hub_ip}:8080/repo/"
    assert report["blobs"] == len(lacking), report
    assert report["resumed"] == part and report["bytes"] == lacking_bytes - part, report

    rel = catalog(city)[("shop", "1.1.0")]
    assert rel["manifestDigest"] == head.manifest_digest and "via sync from" in rel["importedBy"]
    assert city.exec("repo", ["sh", "-c", f"ls -A {REPO}/staging"]).stdout.strip() == ""
    for b in lacking:
        size = city.exec("repo", ["stat", "-c", "%s", f"{REPO}/blobs/sha256/{digest_hex(b['digest'])}"])
        assert size.rc == 0 and int(size.stdout) == b["size"], (b["digest"], size.output)

    # the city's registry serves 1.1.0's images, e.g. the api index the signed manifest names
    api = head.manifest["images"]["api"]
    code = ("import sys, urllib.request as u; r = u.Request('http://127.0.0.1:5000/v2/shop/api/manifests/1.1.0', "
            "headers={'Accept': sys.argv[1]}); print(u.urlopen(r, timeout=10).headers['Docker-Content-Digest'])")
    media_types = ",".join(["application/vnd.oci.image.index.v1+json",
                            "application/vnd.docker.distribution.manifest.list.v2+json"])
    res = city.exec("repo", ["python3", "-c", code, media_types], timeout=60)
    assert res.rc == 0 and res.stdout.strip() == api["index"], res.output

    # again: nothing to send, nothing changed
    rc, counts, out = sync(city, hub_ip)
    assert rc == 0 and counts["changed"] == 0, out[-5000:]
    assert "already in this repository (same manifest); nothing to send" in out


def _copy_partial(hub: Site, city: Site, big: dict, part: int, stage: str) -> None:
    """Put the first `part` bytes of the hub's copy of blob `big` into the city's stage as its partial file."""
    name = f"{stage}/{digest_hex(big['digest'])}.partial"
    src = f"{REPO}/blobs/sha256/{digest_hex(big['digest'])}"
    tmp = Path(city.state_dir) / "seed.partial"
    docker("cp", f"{hub.container('repo')}:{src}", str(tmp), timeout=120).check("copying a blob out of the hub")
    with open(tmp, "r+b") as fh:
        fh.truncate(part)
    assert city.exec("repo", ["mkdir", "-m", "700", "-p", stage]).rc == 0
    docker("cp", str(tmp), f"{city.container('repo')}:{name}", timeout=120).check("seeding the partial file")
    tmp.unlink()
    res = city.exec("repo", ["stat", "-c", "%s", name])
    assert res.rc == 0 and int(res.stdout) == part, res.output


def test_hub_serves_only_catalog_releases_and_blobs(linked: tuple[Site, Site, str, str]) -> None:
    hub, city, hub_ip, city_ip = linked
    base = f"http://{hub_ip}:8080/repo/"
    assert http_status(city, base + "catalog.json") == 200
    assert http_status(city, base + "releases/shop/1.1.0/manifest.sig") == 200
    for path in ("", "staging/", "registry/", "www/", "releases/", "blobs/sha256/", "../etc/passwd",
                 "releases/.tmp-shop-9.9.9/manifest.json"):
        assert http_status(city, base + path) in (403, 404), path
    # a site that is not a hub serves no repository
    assert http_status(hub, f"http://{city_ip}:8080/repo/catalog.json") == 404


def test_sync_from_a_hub_with_tls_trusts_the_carried_hub_ca_alone(linked: tuple[Site, Site, str, str],
                                                                   shop_bundles: dict[str, Path]) -> None:
    """Runs last: the hub's nginx speaks only TLS afterwards. The engineer carries the hub's site-ca.crt to the
    city's jump host like the vendor key; plain HTTP, and HTTPS against the machine's CAs, are refused with the
    city's repository unchanged."""
    hub, city, hub_ip, dummy = linked
    carry(hub, {"shop-1.2.0": shop_bundles["shop-1.2.0"]})
    tls = json.dumps({"offline_delivery_tls": True, "offline_repo_tls_names": [hub_ip]})
    import_media(hub, "shop-1.2.0", serve=True, options=("-e", f"'{tls}'"))
    ca = hub.exec("repo", ["cat", "/etc/offline-delivery/tls/site-ca.crt"])
    assert ca.rc == 0 and "BEGIN CERTIFICATE" in ca.stdout, ca.output
    (city.transfer_dir / "hub-ca.crt").write_text(ca.stdout)
    before = city.exec("repo", ["sh", "-c", f"cat {REPO}/catalog.json; ls -A {REPO}/staging"]).stdout
    https = f"https://{hub_ip}:8080"

    rc, dummy_counts, out = sync(city, hub_ip, version="1.2.0")
    assert rc != 0 and "answered 400" in out and "use https://" in out, out[-3000:]
    rc, dummy_counts, out = sync(city, hub_ip, url=https, version="1.2.0")   # the machine's CAs
    assert rc != 0 and "presented a certificate this site does not trust" in out, out[-3000:]
    assert city.exec("repo", ["sh", "-c", f"cat {REPO}/catalog.json; ls -A {REPO}/staging"]).stdout == before

    rc, counts, out = sync(city, hub_ip, "-e", "offline_delivery_sync_hub_ca=/srv/transfer/hub-ca.crt", url=https,
                           version="1.2.0")
    assert rc == 0 and counts["failed"] == 0 and counts["changed"] >= 1, out[-5000:]
    report = sent(out, "1.2.0")
    assert report["hub"] == f"{https}/repo/" and report["blobs"] > 0, report
    head = read_head(str(shop_bundles["shop-1.2.0"] / "shop-1.2.0.bundle"))
    assert catalog(city)[("shop", "1.2.0")]["manifestDigest"] == head.manifest_digest
