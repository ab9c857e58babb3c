"""Vendor's fleet table (offline_delivery_common/fleet_table.py, `bundle-builder fleet`): signed status files of several
sites are verified against pinned keys (a tampered, unknown or other site's file is refused by name, never
shown), and the table shows versions (mixed ones visible), health, the last failure, lag and age; --json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bundle_builder import cli
from offline_delivery_common import fleet_table
from offline_delivery_common.fleet_table import SiteRow
from offline_delivery_core.site import have as site_have
from offline_delivery_core.site import status as site_status

NOW = 1_790_000_000.0


def app(version: str | None, *, healthy: bool = True, failed: str | None = None, installed: bool = True) -> dict:
    history = [{"at": "2026-11-20T00:00:00Z", "action": "install", "from": None, "to": "1.0.0", "result": "ok"}]
    if failed:
        history.append({"at": "2026-11-22T01:00:00Z", "action": "upgrade", "from": version, "to": failed,
                        "result": "failed", "component": "api", "rolled_back_to": version})
    return {"target": "compose", "installed": installed, "version": version if installed else None,
            "healthy": healthy and installed, "history": history,
            "components": {} if not installed else {
                "api": {"healthy": healthy, "running": True, "as_deployed": True, "reason": "" if healthy else "HTTP 500"},
                "db": {"healthy": True, "running": True, "as_deployed": True, "reason": ""}}}


def write_site(tmp_path: Path, site: str, hosts: dict[str, Any], *, age: float = 60, seed: bytes | None = None,
               releases: tuple[str, ...] = ("1.0.0",)) -> Path:
    """A report signed by the site's key (seed derived from the name unless given); its .pub pinned."""
    seed = seed or site.encode().ljust(32, b"\0")[:32]
    doc = site_status.build_status(str(tmp_path / "no-repo"), site, {}, "2000-01-01T00:00:00Z")
    doc["collectedAt"] = site_status.time.strftime(site_status.TIME_FORMAT, site_status.time.gmtime(NOW - age))
    doc["releases"] = [{"name": "shop", "version": v, "manifestDigest": "sha256:" + "0" * 64, "importedAt": None}
                       for v in releases]
    doc["hosts"] = {h: site_status.host_report(None if apps is None else {"shop": apps} if apps else {},
                                               {"distribution": "Debian"}, {"/srv": 10})
                    for h, apps in hosts.items()}
    path = tmp_path / f"{site}.status.json"
    path.write_bytes(site_have.signed_bytes(doc, seed))
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)
    (keys / f"{site}.pub").write_bytes(site_have.public_key_pem(site_have.public_from_seed(seed)))
    return path


@pytest.fixture
def fleet_files(tmp_path: Path) -> list[Path]:
    return [
        write_site(tmp_path, "north", {"node1": app("1.1.0"), "node2": app("1.1.0")}, releases=("1.0.0", "1.1.0")),
        write_site(tmp_path, "south", {"node1": app("1.0.0"), "node2": app("1.1.0", healthy=False)}, age=3 * 3600),
        write_site(tmp_path, "east", {"node1": app("1.0.0", failed="1.2.0"), "node2": None}, age=2 * 86400),
        write_site(tmp_path, "west", {"node1": {}}),
    ]


def rows_by_site(report: fleet_table.FleetReport) -> dict[str, SiteRow]:
    return {r.site: r for r in report.rows}


def test_rows_flag_lagging_mixed_failed_and_unhealthy(tmp_path: Path, fleet_files: list[Path]) -> None:
    keys = fleet_table.load_site_keys(str(tmp_path / "keys"))
    report = fleet_table.fleet([str(p) for p in fleet_files], keys, now=NOW)
    assert report.refused == [] and report.latest == {"shop": "1.1.0"}
    rows = rows_by_site(report)
    north, south, east, west = rows["north"], rows["south"], rows["east"], rows["west"]
    assert north.versions == {"1.1.0": ["node1", "node2"]} and not north.lagging and not north.mixed
    assert (north.healthy, north.components, north.failed) == (4, 4, None)
    assert south.mixed and south.lagging and (south.healthy, south.components) == (3, 4)
    assert south.unhealthy == ("node2/api",)
    assert east.lagging and east.unreachable == ("node2",) and east.versions == {"1.0.0": ["node1"]}
    assert east.failed == "node1: upgrade 1.0.0->1.2.0 failed (api), rolled back to 1.0.0 at 2026-11-22T01:00:00Z"
    assert west.app == "" and west.versions == {} and "runs no app; holds shop 1.0.0" in west.note
    assert east.age_s == 2 * 86400

    lines = fleet_table.format_table(report.rows).splitlines()
    assert lines[0].split()[:3] == ["SITE", "APP", "VERSION"] and len(lines) == 5
    text = {ln.split()[0]: ln for ln in lines[1:]}
    assert "MIXED 1.0.0 (node1), 1.1.0 (node2)" in text["south"] and "3/4 (not: node2/api)" in text["south"]
    assert "behind 1.1.0" in text["south"] and "3h" in text["south"]
    assert "failed (api)" in text["east"] and "unreachable: node2" in text["east"] and "2d" in text["east"]
    assert "4/4" in text["north"] and "behind" not in text["north"] and "1m" in text["north"]


def test_latest_given_makes_everyone_lag(tmp_path: Path, fleet_files: list[Path]) -> None:
    keys = fleet_table.load_site_keys(str(tmp_path / "keys"))
    report = fleet_table.fleet([str(fleet_files[0])], keys, now=NOW, latest=["shop=1.2.0"])
    assert rows_by_site(report)["north"].lagging and report.latest == {"shop": "1.2.0"}
    report = fleet_table.fleet([str(fleet_files[0])], keys, now=NOW, latest=["1.1.0"])
    assert not rows_by_site(report)["north"].lagging
    with pytest.raises(fleet_table.FleetError, match="give VERSION or APP=VERSION"):
        fleet_table.fleet([], keys, latest=["=1"])


def test_tampered_unknown_and_impersonating_files_are_refused(tmp_path: Path, fleet_files: list[Path]) -> None:
    north = fleet_files[0]
    tampered = tmp_path / "tampered.status.json"
    tampered.write_bytes(north.read_bytes().replace(b'"1.1.0"', b'"1.2.0"'))
    (tmp_path / "elsewhere").mkdir()  # its key is not pinned in tmp_path/keys
    unknown = write_site(tmp_path / "elsewhere", "rogue", {"node1": app("1.0.0")})
    # south's key signs a report that claims to be north's
    doc = json.loads(north.read_bytes())
    impostor = tmp_path / "impostor.status.json"
    impostor.write_bytes(site_have.signed_bytes(doc, b"south".ljust(32, b"\0")))
    keys = fleet_table.load_site_keys(str(tmp_path / "keys"))
    report = fleet_table.fleet([str(p) for p in (north, tampered, unknown, impostor)], keys, now=NOW)
    assert [r.site for r in report.rows] == ["north"]
    refused = dict(report.refused)
    assert "signature does not match the contents" in refused[str(tampered)] and str(tampered) in refused[str(tampered)]
    assert "which is not the site key given" in refused[str(unknown)]
    assert "says it is from site 'north' but is signed by the key pinned for south" in refused[str(impostor)]


def test_an_older_report_of_a_site_is_superseded(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    old = write_site(tmp_path / "a", "north", {"node1": app("1.0.0")}, age=7200)
    new = write_site(tmp_path, "north", {"node1": app("1.1.0")}, age=60)
    report = fleet_table.fleet([str(new), str(old)], fleet_table.load_site_keys(str(tmp_path / "keys")), now=NOW)
    assert [r.versions for r in report.rows] == [{"1.1.0": ["node1"]}]
    assert report.superseded == [(str(old), str(new))]


def test_site_keys_directory_problems_are_named(tmp_path: Path) -> None:
    with pytest.raises(fleet_table.FleetError, match="holds no <site>.pub"):
        fleet_table.load_site_keys(str(tmp_path))
    (tmp_path / "north.pub").write_text("not a key")
    with pytest.raises(fleet_table.FleetError, match="north.pub"):
        fleet_table.load_site_keys(str(tmp_path))


def test_cli_table_json_and_exit_status(tmp_path: Path, fleet_files: list[Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    files = [str(p) for p in fleet_files]
    assert cli.main(["fleet", *files, "--site-keys", str(tmp_path / "keys")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("SITE") and "behind 1.1.0" in out

    assert cli.main(["fleet", *files, "--site-keys", str(tmp_path / "keys"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    south = next(r for r in doc["sites"] if r["site"] == "south")
    assert south["mixed"] and south["lagging"] and south["versions"] == {"1.0.0": ["node1"], "1.1.0": ["node2"]}
    assert (south["healthy"], south["components"]) == (3, 4) and doc["refused"] == []

    bad = tmp_path / "bad.status.json"
    bad.write_bytes(fleet_files[0].read_bytes().replace(b"node1", b"nodeX"))
    assert cli.main(["fleet", *files, str(bad), "--site-keys", str(tmp_path / "keys"), "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["refused"][0]["file"] == str(bad)
    assert f"REFUSED {bad}: " in captured.err
    assert cli.main(["fleet", *files, "--site-keys", str(tmp_path / "nokeys")]) == 2
    assert "site key directory" in capsys.readouterr().err
