# -*- coding: utf-8 -*-
# Copyright: offline.delivery contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A site's status report: what its repository holds and how every target runs each app, signed by the site.

One file per site, carried back to the vendor (docs/status.md)::

    {"mediaType": "application/vnd.offline-delivery.site-status.v1+json", "site": "north",
     "collectedAt": "2026-11-22T06:00:00Z",
     "releases": [{"name", "version", "manifestDigest", "importedAt", "sbom" (when the release has one),
                   "patch" (a site release: {component, base, files, removed, image, by, at, note})}],
     "hosts": {"node1": {"reachable": true, "facts": {"distribution", "distributionVersion", "architecture"},
                         "freeMiB": {"/var/lib/offline-delivery": 1234, ...},
                         "apps": {"shop": {"target", "installed", "version", "previousVersion", "installedAt",
                                           "healthy", "components": {"api": {"healthy", "running",
                                                                             "asDeployed", "reason"}},
                                           "history": [{"at", "by", "action", "from", "to", "result",
                                                        "component", "rolledBackTo", "patch"}]}}}},
     "signature": {"alg": "ed25519", "keyid": "<hex>", "sig": "<base64>"}}

Signed on the repo host with the site key of the have-list (site_have.signed_bytes): one site identity.

Only named fields of the per-host status are copied (a whitelist): no site overrides, no env values, no error
texts, no plans; nothing the status report does not already show.

"Changed": ``collectedAt`` and ``freeMiB`` move on every run, so they do not count. The file is rewritten
when anything else differs from the file already there, or when that file was collected more than
``refresh`` seconds ago; otherwise it is kept as it is (with its older time) and the run reports no change.
"""

from __future__ import annotations

import calendar
import copy
import time
from dataclasses import dataclass
from typing import Any, Mapping

from ..bundle import ed25519
from ..common.files import file_differs, write_if_changed
from .have import (DEFAULT_KEY_DIR, SITE_RE, HaveError, load_or_create_key, public_from_seed, public_key_pem,
                   signed_bytes, signed_pub_path, verify_signed)
from .repo import SITE_ORIGIN, RepoError, SiteRepo

__all__ = ["STATUS_MEDIA_TYPE", "StatusError", "StatusResult", "build_status", "export_status", "verify_status",
           "host_report", "app_report", "stable_part", "patch_summary", "DEFAULT_REFRESH", "DEFAULT_HISTORY", "DEFAULT_KEY_DIR"]

STATUS_MEDIA_TYPE = "application/vnd.offline-delivery.site-status.v1+json"
DEFAULT_REFRESH = 3600
DEFAULT_HISTORY = 5
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

# What of a history entry travels: the same columns as the status report's Markdown (roles/app/templates).
_HISTORY_FIELDS = {"at": "at", "by": "by", "action": "action", "from": "from", "to": "to", "result": "result",
                   "component": "component", "rolled_back_to": "rolledBackTo"}
_FACT_FIELDS = {"distribution": "distribution", "distribution_version": "distributionVersion",
                "distribution_release": "distributionRelease", "architecture": "architecture"}


class StatusError(ValueError):
    """A status report that cannot be made or trusted: names the file, host or field and what to do."""


# --------------------------------------------------------------------------------------------------------
# The document


def app_report(status: Mapping[str, Any], history: int = DEFAULT_HISTORY) -> dict[str, Any]:
    """The part of app_status's ``status`` that travels (a whitelist; see the module doc)."""
    if not isinstance(status, Mapping):
        raise StatusError(f"an app status must be a dict (app_status's 'status'), not {type(status).__name__}")
    components = {}
    for name, comp in sorted((status.get("components") or {}).items()):
        comp = comp if isinstance(comp, Mapping) else {}
        components[str(name)] = {"healthy": bool(comp.get("healthy")), "running": bool(comp.get("running")),
                                 "asDeployed": bool(comp.get("as_deployed")),
                                 "reason": str(comp.get("reason") or "")}
    entries = [e for e in (status.get("history") or []) if isinstance(e, Mapping)]
    return {
        "target": status.get("target"), "installed": bool(status.get("installed")),
        "version": status.get("version"), "previousVersion": status.get("previous_version"),
        "installedAt": status.get("installed_at"), "healthy": bool(status.get("healthy")),
        "components": components,
        "history": [{out: e[key] for key, out in _HISTORY_FIELDS.items() if key in e}
                    for e in entries[-history:]] if history > 0 else [],
    }


def host_report(apps: Mapping[str, Any] | None, facts: Mapping[str, Any] | None = None,
                free_mib: Mapping[str, Any] | None = None, history: int = DEFAULT_HISTORY) -> dict[str, Any]:
    """One target's entry; ``apps`` None means the host did not answer (unreachable or its status failed)."""
    if apps is None:
        return {"reachable": False}
    facts = facts or {}
    disk = {}
    for path, mib in sorted((free_mib or {}).items()):
        try:
            disk[str(path)] = int(mib)
        except (TypeError, ValueError):
            raise StatusError(f"free space of {path} must be a number of MiB, not {mib!r}") from None
    return {"reachable": True,
            "facts": {out: str(facts[key]) for key, out in _FACT_FIELDS.items() if facts.get(key) is not None},
            "freeMiB": disk,
            "apps": {str(app): app_report(st, history) for app, st in sorted(apps.items())}}


def build_status(repo_root: str, site: str, hosts: Mapping[str, Mapping[str, Any] | None],
                 collected_at: str, history: int = DEFAULT_HISTORY) -> dict[str, Any]:
    """The unsigned report. ``hosts``: host -> {"apps": {app: status}, "facts": {...}, "free_mib": {...}},
    or None for a host that did not answer."""
    if not SITE_RE.match(site or ""):
        raise StatusError(f"site name {site!r} must be 1-63 letters, digits, '.', '_' or '-' (starting with a "
                          "letter or digit)")
    repo = SiteRepo(repo_root)
    try:
        catalog = repo.catalog()["releases"]
    except RepoError as exc:
        raise StatusError(str(exc)) from None
    # "sbom": the digest of the release's SBOM (releases/<name>/<version>/sbom.cdx.json on the repo host), so
    # the vendor can tell which of its SBOMs describes what a site holds; the document itself stays there.
    # "patch": a site release's field fix (site/patch.py), so the vendor can fold it into its next release.
    patches = {(r["name"], r["version"]): patch_summary(r["patch"]) for r in catalog
               if r.get("origin") == SITE_ORIGIN and isinstance(r.get("patch"), Mapping)}
    releases = sorted(({"name": r["name"], "version": r["version"], "manifestDigest": r["manifestDigest"],
                        "importedAt": r.get("importedAt"), **({"sbom": r["sbom"]} if r.get("sbom") else {}),
                        **({"patch": patches[r["name"], r["version"]]} if (r["name"], r["version"]) in patches
                           else {})}
                       for r in catalog),
                      key=lambda r: (r["name"], r["version"]))
    out_hosts = {}
    for host, entry in sorted(hosts.items()):
        if entry is not None and not isinstance(entry, Mapping):
            raise StatusError(f"host {host}: expected a dict with 'apps', 'facts', 'free_mib' (or null)")
        try:
            out_hosts[str(host)] = host_report(None if entry is None else entry.get("apps") or {},
                                               None if entry is None else entry.get("facts"),
                                               None if entry is None else entry.get("free_mib"), history)
        except StatusError as exc:
            raise StatusError(f"host {host}: {exc}") from None
        for app, report in out_hosts[str(host)].get("apps", {}).items():
            for event in report["history"]:  # a change to a site release names its patch
                if (app, event.get("to")) in patches:
                    event["patch"] = patches[app, event["to"]]
    return {"mediaType": STATUS_MEDIA_TYPE, "site": site, "collectedAt": collected_at, "releases": releases,
            "hosts": out_hosts}


def patch_summary(patch: Mapping[str, Any]) -> dict[str, Any]:
    """What a status report says of a site release's patch: component, base release, files with their sha256,
    the patched image, who, when and why."""
    return {"component": patch.get("component"), "base": (patch.get("base") or {}).get("version"),
            "files": [{k: f.get(k) for k in ("path", "sha256", "size", "mode")} for f in patch.get("files") or []],
            "removed": list(patch.get("removed") or []),
            "image": (patch.get("image") or {}).get("reference"), "by": patch.get("by"), "at": patch.get("at"),
            "note": patch.get("note")}


def stable_part(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The report without what moves on every run (collection time, free space, signature): what "changed"
    compares."""
    body = copy.deepcopy({k: v for k, v in doc.items() if k not in ("signature", "collectedAt")})
    for entry in (body.get("hosts") or {}).values():
        if isinstance(entry, dict):
            entry.pop("freeMiB", None)
    return body


def parse_time(text: Any) -> float | None:
    """Seconds since the epoch of a ``YYYY-MM-DDTHH:MM:SSZ`` time, None when it is not one."""
    try:
        return float(calendar.timegm(time.strptime(str(text), TIME_FORMAT)))
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------------
# On the repo host


@dataclass
class StatusResult:
    changed: bool
    path: str
    pub_path: str
    keyid: str | None
    key_created: bool
    site: str
    collected_at: str
    hosts: int
    not_answering: list[str]
    unhealthy: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def export_status(repo_root: str, site: str, hosts: Mapping[str, Mapping[str, Any] | None], dest: str,
                  key_dir: str = DEFAULT_KEY_DIR, *, refresh: int = DEFAULT_REFRESH, history: int = DEFAULT_HISTORY,
                  now: float | None = None, check_mode: bool = False) -> StatusResult:
    """Write the signed report to ``dest`` (and the site's public key beside it, ``<site>.status.pub``) unless
    the one there says the same and is fresh (module doc: "Changed")."""
    now = time.time() if now is None else now
    doc = build_status(repo_root, site, hosts, time.strftime(TIME_FORMAT, time.gmtime(now)), history)
    try:
        seed, key_created = load_or_create_key(key_dir, create=not check_mode)
    except HaveError as exc:
        raise StatusError(str(exc)) from None
    pub_path = signed_pub_path(dest, "status")
    not_answering = sorted(h for h, e in doc["hosts"].items() if not e["reachable"])
    unhealthy = sorted(f"{h}/{app}" for h, e in doc["hosts"].items() for app, st in e.get("apps", {}).items()
                       if st["installed"] and not st["healthy"])
    res = StatusResult(True, dest, pub_path, None, key_created, site, doc["collectedAt"], len(doc["hosts"]),
                       not_answering, unhealthy)
    if seed is None:  # check mode before the site key exists: it would be made and the report written
        return res
    public = public_from_seed(seed)
    res.keyid = ed25519.public_key_id(public)
    kept = _current_report(dest, public, doc, now, refresh)
    if kept is not None:
        res.collected_at = kept["collectedAt"]
        res.changed = file_differs(pub_path, public_key_pem(public), 0o644) or key_created
        if res.changed and not check_mode:
            write_if_changed(pub_path, public_key_pem(public))
        return res
    if not check_mode:
        write_if_changed(dest, signed_bytes(doc, seed))
        write_if_changed(pub_path, public_key_pem(public))
    return res


def _current_report(dest: str, public: bytes, doc: Mapping[str, Any], now: float,
                    refresh: int) -> dict[str, Any] | None:
    """The report at ``dest`` when it is ours, says what ``doc`` says and is fresh enough to keep; else None."""
    try:
        with open(dest, "rb") as fh:
            old = verify_signed(fh.read(), [public], dest, media_type=STATUS_MEDIA_TYPE, what="status report",
                                again="it is rewritten", error=StatusError)
    except (OSError, StatusError):
        return None  # missing, unreadable, foreign or tampered: write a fresh one
    collected = parse_time(old.get("collectedAt"))
    if collected is None or refresh <= 0 or now - collected >= refresh or now < collected:
        return None
    return old if stable_part(old) == stable_part(doc) else None


# --------------------------------------------------------------------------------------------------------
# Vendor side


def verify_status(data: bytes, trusted_keys: list[bytes], source: str = "status file") -> dict[str, Any]:
    """The report when its embedded signature is by one of ``trusted_keys``; StatusError names ``source`` and
    what is wrong otherwise (also a report whose shape is not a status report's)."""
    doc = verify_signed(data, trusted_keys, source, media_type=STATUS_MEDIA_TYPE, what="status report",
                        again="collect it again with the offline.delivery.site_status playbook",
                        error=StatusError)
    if not isinstance(doc.get("site"), str) or not SITE_RE.match(doc["site"]):
        raise StatusError(f"{source}: field 'site' must be a site name")
    if parse_time(doc.get("collectedAt")) is None:
        raise StatusError(f"{source}: field 'collectedAt' must be a UTC time {TIME_FORMAT}")
    if not isinstance(doc.get("releases"), list) or not isinstance(doc.get("hosts"), dict):
        raise StatusError(f"{source}: fields 'releases' (list) and 'hosts' (dict) are required")
    for host, entry in doc["hosts"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("apps", {}), dict):
            raise StatusError(f"{source}: host {host} must be a dict with 'apps' (dict)")
    return doc
