"""The fleet table: many sites' signed status reports, verified, as one row per site and app.

Both commands use it - ``bundle-builder fleet`` (the vendor reads the status files sites carry back) and the
``offline-delivery rollout`` report (one row per site of the rollout) - so it lives in offline_delivery_common,
which neither command's package owns. Public API:

- ``SiteRow``: one site and app - versions running (version -> hosts), n/m components healthy, the last failed
  change, the newest version known, the report's age. ``lagging`` and ``mixed`` say what the table flags.
- ``format_table(rows)``: the text table; ``rows_to_json(rows)``: the same as JSON-ready dicts.
- ``load_site_keys(directory)``, ``read_status_file(path, keys)``, ``site_rows(doc, ...)``, ``fleet(paths, keys)``:
  reading and checking status files (offline.delivery.site_status playbook, docs/status.md).
"""

from __future__ import annotations

import calendar
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from offline_delivery_core.bundle import ed25519
from offline_delivery_core.site.release import semver_key
from offline_delivery_core.site.status import StatusError, verify_status

__all__ = ["SiteRow", "FleetError", "FleetReport", "format_table", "rows_to_json", "format_age", "load_site_keys",
           "read_status_file", "site_rows", "newest_versions", "parse_latest", "fleet"]

# Changes that decide what a host runs; the last of them failing is what the table reports.
_CHANGES = ("install", "upgrade", "rollback", "reconfigure")


class FleetError(ValueError):
    """A status file or site key that cannot be used: names the file and what to do."""


@dataclass(frozen=True)
class SiteRow:
    """One app on one site ("" when the site runs no app)."""

    site: str
    app: str
    versions: Mapping[str, Sequence[str]]  # version -> hosts running it
    healthy: int  # components healthy, over every host of the site
    components: int
    failed: str | None = None  # the last change that failed, per host, e.g. "node1: upgrade 1.0.0->1.2.0 failed (api)"
    latest: str | None = None  # the newest version known for the app
    age_s: float | None = None  # seconds since the report was collected
    source: str = ""  # the status file
    note: str = ""
    unhealthy: Sequence[str] = field(default_factory=tuple)  # "host/component"
    unreachable: Sequence[str] = field(default_factory=tuple)  # hosts that did not answer

    @property
    def mixed(self) -> bool:
        return len(self.versions) > 1

    @property
    def lagging(self) -> bool:
        """Some host runs an older version than ``latest``."""
        if not self.latest:
            return False
        newest = semver_key(self.latest)
        return any(semver_key(v) < newest for v in self.versions)

    def as_dict(self) -> dict[str, Any]:
        return {"site": self.site, "app": self.app, "versions": {v: list(h) for v, h in self.versions.items()},
                "healthy": self.healthy, "components": self.components, "failed": self.failed,
                "latest": self.latest, "lagging": self.lagging, "mixed": self.mixed, "age_s": self.age_s,
                "source": self.source, "note": self.note, "unhealthy": list(self.unhealthy),
                "unreachable": list(self.unreachable)}


# --------------------------------------------------------------------------------------------------------
# Rendering


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0:
        return "future?"  # the site's clock is ahead of ours
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return "<1m"


def _versions_text(row: SiteRow) -> str:
    if not row.versions:
        return "not installed" if row.app else "-"
    ordered = sorted(row.versions, key=semver_key)
    if not row.mixed:
        return ordered[0]
    return "MIXED " + ", ".join(f"{v} ({','.join(sorted(row.versions[v]))})" for v in ordered)


def _health_text(row: SiteRow) -> str:
    if not row.components:
        return "-"
    text = f"{row.healthy}/{row.components}"
    return text + (f" (not: {', '.join(row.unhealthy)})" if row.unhealthy else "")


def _note_text(row: SiteRow) -> str:
    parts = [f"unreachable: {', '.join(row.unreachable)}"] if row.unreachable else []
    return "; ".join(parts + ([row.note] if row.note else [])) or "-"


HEADER = ("SITE", "APP", "VERSION", "HEALTH", "LAST FAILURE", "LAG", "AGE", "NOTE")


def _cells(row: SiteRow) -> tuple[str, ...]:
    lag = f"behind {row.latest}" if row.lagging else "-"
    return (row.site, row.app or "-", _versions_text(row), _health_text(row), row.failed or "-", lag,
            format_age(row.age_s), _note_text(row))


def format_table(rows: Sequence[SiteRow]) -> str:
    """A plain-text table, one line per row, columns padded (the last one not)."""
    lines = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER) - 1)]
    return "".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] + "\n" for line in lines)


def rows_to_json(rows: Sequence[SiteRow]) -> list[dict[str, Any]]:
    return [r.as_dict() for r in rows]


# --------------------------------------------------------------------------------------------------------
# Reading and checking


def load_site_keys(directory: str) -> dict[str, list[bytes]]:
    """Pinned site public keys: ``<site>.pub``, ``<site>.have.pub`` or ``<site>.status.pub`` (PEM) in
    ``directory``; the site is the file name up to the first dot."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".pub"))
    except OSError as exc:
        raise FleetError(f"site key directory {directory}: {exc.strerror}") from None
    if not names:
        raise FleetError(f"site key directory {directory} holds no <site>.pub file; put there the public key "
                         "each site gave you (its <site>.have.pub or <site>.status.pub, checked with the site)")
    keys: dict[str, list[bytes]] = {}
    for name in names:
        path = os.path.join(directory, name)
        try:
            key = ed25519.load_public_key_pem(Path(path).read_bytes(), source=path)
        except OSError as exc:
            raise FleetError(f"site key {path}: {exc.strerror}") from None
        except ed25519.Ed25519KeyError as exc:
            raise FleetError(str(exc)) from None
        keys.setdefault(name.split(".", 1)[0], []).append(key)
    return keys


def read_status_file(path: str, site_keys: Mapping[str, Sequence[bytes]]) -> dict[str, Any]:
    """The report at ``path`` when it is signed by a key pinned for the site it names; FleetError otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise FleetError(f"status file {path}: {exc.strerror}") from None
    every = [k for keys in site_keys.values() for k in keys]
    try:
        doc = verify_status(data, every, source=f"status file {path}")
    except StatusError as exc:
        raise FleetError(str(exc)) from None
    keyid = doc["signature"]["keyid"]
    pinned_for = sorted(s for s, keys in site_keys.items() if any(ed25519.public_key_id(k) == keyid for k in keys))
    if doc["site"] not in pinned_for:
        raise FleetError(f"status file {path} says it is from site {doc['site']!r} but is signed by the key "
                         f"pinned for {', '.join(pinned_for)}: one site cannot report for another; check where "
                         "the file came from")
    return doc


def _parse_time(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


def newest_versions(docs: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """App -> the newest version any report names (running on a host or held in a repository)."""
    seen: dict[str, set[str]] = {}
    for doc in docs:
        for rel in doc.get("releases", []):
            seen.setdefault(rel["name"], set()).add(rel["version"])
        for entry in doc["hosts"].values():
            for app, st in (entry.get("apps") or {}).items():
                if st.get("installed") and st.get("version"):
                    seen.setdefault(app, set()).add(st["version"])
    return {app: max(versions, key=semver_key) for app, versions in seen.items()}


def parse_latest(values: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """``--latest VERSION`` (every app) and ``--latest APP=VERSION``: (for every app, per app)."""
    every: str | None = None
    per_app: dict[str, str] = {}
    for value in values:
        app, sep, version = value.partition("=")
        if not sep:
            every = value
        elif app and version:
            per_app[app] = version
        else:
            raise FleetError(f"--latest {value!r}: give VERSION or APP=VERSION")
    return every, per_app


def _last_failure(host: str, history: Sequence[Mapping[str, Any]]) -> str | None:
    changes = [e for e in history if e.get("action") in _CHANGES]
    if not changes or changes[-1].get("result") != "failed":
        return None
    e = changes[-1]
    text = f"{host}: {e.get('action')} {e.get('from') or '-'}->{e.get('to') or '-'} failed"
    if e.get("component"):
        text += f" ({e['component']})"
    if "rolledBackTo" in e:
        text += f", rolled back to {e['rolledBackTo'] or 'nothing'}"
    return text + (f" at {e['at']}" if e.get("at") else "")


def site_rows(doc: Mapping[str, Any], source: str = "", *, now: float | None = None,
              latest: Mapping[str, str] | None = None) -> list[SiteRow]:
    """One row per app of a verified report (one row with app "" when the site runs none)."""
    now = time.time() if now is None else now
    age = now - _parse_time(doc["collectedAt"])
    hosts = doc["hosts"]
    unreachable = tuple(sorted(h for h, e in hosts.items() if not e.get("reachable", True)))
    apps = sorted({a for e in hosts.values() for a in (e.get("apps") or {})})
    rows = []
    for app in apps:
        versions: dict[str, list[str]] = {}
        healthy = total = 0
        unhealthy, failures = [], []
        for host, entry in sorted(hosts.items()):
            st = (entry.get("apps") or {}).get(app)
            if not st:
                continue
            failure = _last_failure(host, st.get("history") or [])
            if failure:
                failures.append(failure)
            if not st.get("installed"):
                continue
            versions.setdefault(str(st.get("version")), []).append(host)
            for name, comp in sorted((st.get("components") or {}).items()):
                total += 1
                healthy += bool(comp.get("healthy"))
                if not comp.get("healthy"):
                    unhealthy.append(f"{host}/{name}")
        rows.append(SiteRow(doc["site"], app, versions, healthy, total, "; ".join(failures) or None,
                            (latest or {}).get(app), age, source, "", tuple(unhealthy), unreachable))
    if not rows:
        held = ", ".join(f"{r['name']} {r['version']}" for r in doc.get("releases", []))
        rows.append(SiteRow(doc["site"], "", {}, 0, 0, None, None, age, source,
                            f"runs no app; holds {held}" if held else "runs no app, holds no release",
                            (), unreachable))
    return rows


@dataclass
class FleetReport:
    rows: list[SiteRow]
    refused: list[tuple[str, str]]  # (file, why)
    latest: dict[str, str]
    superseded: list[tuple[str, str]] = field(default_factory=list)  # (file, the newer file of the same site)

    def as_dict(self) -> dict[str, Any]:
        return {"sites": rows_to_json(self.rows), "latest": self.latest,
                "refused": [{"file": f, "error": e} for f, e in self.refused],
                "superseded": [{"file": f, "by": b} for f, b in self.superseded]}


def fleet(paths: Sequence[str], site_keys: Mapping[str, Sequence[bytes]], *, now: float | None = None,
          latest: Sequence[str] = ()) -> FleetReport:
    """Verify every file (a refused one is listed with why, never shown as a site), keep the newest report of
    each site, and make the rows; the newest version of each app is ``--latest`` or the newest any file names."""
    every, per_app = parse_latest(latest)
    refused: list[tuple[str, str]] = []
    by_site: dict[str, tuple[str, dict[str, Any]]] = {}
    superseded: list[tuple[str, str]] = []
    for path in paths:
        try:
            doc = read_status_file(path, site_keys)
        except FleetError as exc:
            refused.append((path, str(exc)))
            continue
        kept = by_site.get(doc["site"])
        if kept is None or _parse_time(doc["collectedAt"]) > _parse_time(kept[1]["collectedAt"]):
            if kept is not None:
                superseded.append((kept[0], path))
            by_site[doc["site"]] = (path, doc)
        else:
            superseded.append((path, kept[0]))
    docs = [entry[1] for entry in by_site.values()]
    newest = newest_versions(docs)
    if every:
        newest = {app: every for app in newest}
    newest.update(per_app)
    rows = []
    for site in sorted(by_site):
        path, doc = by_site[site]
        rows.extend(site_rows(doc, path, now=now, latest=newest))
    return FleetReport(rows, refused, newest, superseded)
