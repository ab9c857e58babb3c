"""Site status report (plugins/module_utils/site/status.py): what travels (a whitelist, no env values), the
signature by the have-list's site key, "changed" (collection time and free space do not count, a stale
report is refreshed), and refusal of a tampered or foreign report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from offline_delivery_core.bundle import ed25519
from offline_delivery_core.site import have as site_have
from offline_delivery_core.site import status as site_status
from offline_delivery_core.site.repo import CATALOG_SCHEMA

T0 = 1_790_000_000.0  # a fixed "now"
DIGEST = "sha256:" + "ab" * 32


def app_status(version: str = "1.0.0", healthy: bool = True) -> dict[str, Any]:
    """What offline.delivery.app_status returns (host_status), with the fields that must not travel."""
    return {
        "app": "shop", "target": "compose", "installed": True, "version": version, "installed_at": "2026-11-22T05:00:00Z",
        "by": "ops", "previous_version": None, "overrides": {"api": {"SHOP_CURRENCY": "CHF-SECRET-VALUE"}},
        "kept_releases": [version], "healthy": healthy,
        "components": {"api": {"running": True, "started_at": "x", "as_deployed": True, "healthy": healthy,
                               "reason": "" if healthy else "HTTP 500"},
                       "db": {"running": True, "started_at": "x", "as_deployed": True, "healthy": True, "reason": ""}},
        "history": [{"at": f"2026-11-2{i}T00:00:00Z", "by": "ops", "action": "upgrade", "from": "0.9", "to": version,
                     "result": "ok", "plan": {"changed": ["api"]}, "error": "password=hunter2"} for i in range(8)]
        + [{"at": "2026-11-22T01:00:00Z", "by": "ops", "action": "upgrade", "from": version, "to": "1.2.0",
            "result": "failed", "component": "api", "rolled_back_to": version, "error": "body: token=abc"}],
    }


def host(free: int = 1000, **kw: Any) -> dict[str, Any]:
    return {"apps": {"shop": app_status(**kw)},
            "facts": {"distribution": "Debian", "distribution_version": "12.7", "architecture": "x86_64",
                      "env": {"HOME": "/root"}},
            "free_mib": {"/var/lib/offline-delivery": free}}


@pytest.fixture
def repo(tmp_path: Path) -> str:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "catalog.json").write_text(json.dumps({"schemaVersion": CATALOG_SCHEMA, "releases": [
        {"name": "shop", "version": "1.0.0", "manifestDigest": DIGEST, "importedAt": "2026-11-21T00:00:00Z",
         "importedBy": "ops", "delta": None}]}))
    return str(root)


def export(repo: str, tmp_path: Path, hosts: dict, now: float, **kw: Any) -> site_status.StatusResult:
    return site_status.export_status(repo, "north", hosts, str(tmp_path / "out" / "north.status.json"),
                                     str(tmp_path / "keys"), now=now, **kw)


def site_key(tmp_path: Path) -> bytes:
    return ed25519.load_public_key_pem((tmp_path / "out" / "north.status.pub").read_text())


def test_report_round_trip_and_only_whitelisted_fields(repo: str, tmp_path: Path) -> None:
    res = export(repo, tmp_path, {"node1": host(), "node2": None}, T0)
    assert res.changed and res.key_created and res.not_answering == ["node2"] and res.unhealthy == []
    data = (tmp_path / "out" / "north.status.json").read_bytes()
    doc = site_status.verify_status(data, [site_key(tmp_path)], "north.status.json")
    assert doc["mediaType"] == site_status.STATUS_MEDIA_TYPE and doc["site"] == "north"
    assert doc["collectedAt"] == res.collected_at and site_status.parse_time(doc["collectedAt"]) == T0
    assert doc["releases"] == [{"name": "shop", "version": "1.0.0", "manifestDigest": DIGEST,
                                "importedAt": "2026-11-21T00:00:00Z"}]
    node1 = doc["hosts"]["node1"]
    assert node1["facts"] == {"distribution": "Debian", "distributionVersion": "12.7", "architecture": "x86_64"}
    assert node1["freeMiB"] == {"/var/lib/offline-delivery": 1000}
    shop = node1["apps"]["shop"]
    assert shop["version"] == "1.0.0" and shop["healthy"] and shop["components"]["api"] == {
        "healthy": True, "running": True, "asDeployed": True, "reason": ""}
    assert len(shop["history"]) == site_status.DEFAULT_HISTORY
    assert shop["history"][-1] == {"at": "2026-11-22T01:00:00Z", "by": "ops", "action": "upgrade", "from": "1.0.0",
                                   "to": "1.2.0", "result": "failed", "component": "api", "rolledBackTo": "1.0.0"}
    assert doc["hosts"]["node2"] == {"reachable": False}
    # no env value, override, error text or plan travels
    for secret in ("CHF-SECRET-VALUE", "hunter2", "token=abc", "overrides", "plan", "HOME", "error"):
        assert secret not in data.decode(), secret
    # the same key signs the have-list: one site identity
    assert (tmp_path / "keys" / site_have.PUB_NAME).read_text() == (tmp_path / "out" / "north.status.pub").read_text()


def test_second_run_changes_nothing_until_the_site_changes_or_the_report_is_stale(repo: str, tmp_path: Path) -> None:
    export(repo, tmp_path, {"node1": host()}, T0)
    path = tmp_path / "out" / "north.status.json"
    first = path.read_bytes()
    # a minute later, less free space: the same site state, the file is kept with its time
    res = export(repo, tmp_path, {"node1": host(free=900)}, T0 + 60)
    assert not res.changed and path.read_bytes() == first
    assert res.collected_at == json.loads(first)["collectedAt"]
    # check mode on a changed site says it would write, writes nothing
    res = export(repo, tmp_path, {"node1": host(healthy=False)}, T0 + 120, check_mode=True)
    assert res.changed and res.unhealthy == ["node1/shop"] and path.read_bytes() == first
    res = export(repo, tmp_path, {"node1": host(healthy=False)}, T0 + 120)
    assert res.changed and path.read_bytes() != first
    doc = site_status.verify_status(path.read_bytes(), [site_key(tmp_path)])
    assert doc["hosts"]["node1"]["apps"]["shop"]["components"]["api"]["reason"] == "HTTP 500"
    # unchanged but older than `refresh`: rewritten with the new time
    second = path.read_bytes()
    res = export(repo, tmp_path, {"node1": host(healthy=False)}, T0 + 120 + 3600)
    assert res.changed and path.read_bytes() != second
    assert site_status.parse_time(json.loads(path.read_bytes())["collectedAt"]) == T0 + 120 + 3600
    # refresh 0: every run writes
    assert export(repo, tmp_path, {"node1": host(healthy=False)}, T0 + 3800, refresh=0).changed


def test_a_tampered_kept_report_is_rewritten(repo: str, tmp_path: Path) -> None:
    export(repo, tmp_path, {"node1": host()}, T0)
    path = tmp_path / "out" / "north.status.json"
    path.write_bytes(path.read_bytes().replace(b'"healthy":true', b'"healthy":false', 1))
    assert export(repo, tmp_path, {"node1": host()}, T0 + 10).changed
    site_status.verify_status(path.read_bytes(), [site_key(tmp_path)])


def test_tampered_foreign_and_unsigned_reports_are_refused(repo: str, tmp_path: Path) -> None:
    export(repo, tmp_path, {"node1": host()}, T0)
    data = (tmp_path / "out" / "north.status.json").read_bytes()
    key = site_key(tmp_path)
    with pytest.raises(site_status.StatusError, match="north.status.json: the site signature does not match"):
        site_status.verify_status(data.replace(b'"1.0.0"', b'"1.1.0"'), [key], "north.status.json")
    other = site_have.public_from_seed(bytes(32))
    with pytest.raises(site_status.StatusError, match="north.status.json is signed by key .* not the site key"):
        site_status.verify_status(data, [other], "north.status.json")
    body = {k: v for k, v in json.loads(data).items() if k != "signature"}
    with pytest.raises(site_status.StatusError, match="carries no site signature"):
        site_status.verify_status(json.dumps(body).encode(), [key], "x")
    with pytest.raises(site_status.StatusError, match="x is not JSON"):
        site_status.verify_status((tmp_path / "keys" / site_have.PUB_NAME).read_bytes(), [key], "x")
    with pytest.raises(site_status.StatusError, match="not a status report"):
        site_status.verify_status(b"{}", [key], "x")
    have_like = site_have.signed_bytes({**body, "mediaType": "application/vnd.offline-delivery.have.v1+json"},
                                       bytes(32))
    with pytest.raises(site_status.StatusError, match="not a status report"):
        site_status.verify_status(have_like, [key], "x")


def test_bad_input_is_named(repo: str, tmp_path: Path) -> None:
    with pytest.raises(site_status.StatusError, match="site name"):
        site_status.export_status(repo, "no/such", {}, str(tmp_path / "x.json"), str(tmp_path / "k"))
    with pytest.raises(site_status.StatusError, match="host node1: free space of /srv must be a number"):
        export(repo, tmp_path, {"node1": {"apps": {}, "free_mib": {"/srv": "lots"}}}, T0)
    with pytest.raises(site_status.StatusError, match="host node1: expected a dict"):
        export(repo, tmp_path, {"node1": ["x"]}, T0)
