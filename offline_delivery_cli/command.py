"""``offline-delivery``: one command for delivery engineers who do not know Ansible (docs/fleet.md).

    offline-delivery import  -i INVENTORY --bundle /media/usb/shop-1.1.0 --vendor-key /media/usb/vendor.pub
    offline-delivery install -i INVENTORY --app shop [--version 1.1.0]
    offline-delivery upgrade -i INVENTORY --app shop --version 1.1.0 [--check]
    offline-delivery rollback -i INVENTORY --app shop [--version 1.0.0]
    offline-delivery status  -i INVENTORY --app shop
    offline-delivery have    -i INVENTORY [--site north]
    offline-delivery sync    -i INVENTORY --from http://hub-repo:8080 --app shop --version 1.1.0 [--bandwidth 10M]
    offline-delivery site_status -i INVENTORY [--app shop]
    offline-delivery rollout upgrade|install|rollback -i INVENTORY --policy POLICY --app shop [--version 1.2.0]

Each runs the collection's playbook of the same name (``offline.delivery.<command>``) through ansible-runner,
prints one line per task and per failed host, then a per-host summary (ok/changed/failed/unreachable), and
keeps ansible-runner's artifacts (events, stdout, the exact command, the variables) in a run directory of its
own that it prints, for support. ``rollout`` runs the lifecycle playbook once per wave of site groups (a
policy file: the canary wave first), stops at the first failed wave, then runs the status playbook over every
site and prints one row per site (wave, outcome, version(s) running, health); docs/multisite.md.
The playbooks stay the same for plain ``ansible-playbook`` and AWX: this only fills in their variables.

Exit codes: the one contract of both commands (README.md, "Exit codes"), kept by
``offline_delivery_common.exits.run_command``: 0 done; 1 the run failed (a host failed or was unreachable, the
run did not finish, a rollout stopped or finished with a failed site, a tool is missing); 2 bad usage or input
(argparse's own code: bad or missing arguments; an inventory, bundle, vendor key or policy that is missing,
unreadable or does not fit: then no playbook runs); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from offline_delivery_core.bundle import ed25519
from offline_delivery_common.exits import EXIT_FAILED, EXIT_OK, CommandFailed, UsageError, run_command
from offline_delivery_common.fleet_table import SiteRow, format_table
from offline_delivery_common.inputs import read_yaml

COMMANDS = ("import", "install", "upgrade", "rollback", "status", "have", "sync", "site_status")
NEEDS_APP = ("install", "upgrade", "rollback", "status", "sync")
DEFAULT_RUNS_DIR = "offline-delivery-runs"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="offline-delivery", description="Deliver apps to an offline site: runs "
                                "the offline.delivery playbooks through ansible-runner.",
                                epilog="Across sites in waves: offline-delivery rollout --help")
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("-i", "--inventory", required=True, help="the site's inventory (file or directory)")
    p.add_argument("--app", help="app name (install, upgrade, rollback, status)")
    p.add_argument("--version", dest="app_version",
                   help="release (install/upgrade: default the newest imported; rollback: the one to go back to)")
    p.add_argument("--bundle", help="import: the carried bundle (directory or .bundle / .parts.json file)")
    p.add_argument("--vendor-key", action="append", default=[], help="import: the vendor's public key (repeatable)")
    p.add_argument("--site", help="have: the site name recorded in the list (default offline_delivery_site)")
    p.add_argument("--from", dest="sync_from", help="sync: the hub's repository URL, e.g. http://hub-repo:8080")
    p.add_argument("--bandwidth", help="sync: at most this many bytes per second, e.g. 10M")
    p.add_argument("-e", "--extra-var", action="append", default=[], metavar="KEY=VALUE",
                   help="extra playbook variable (repeatable; VALUE is read as JSON when it parses, else as text)")
    p.add_argument("-l", "--limit", help="only these hosts (an Ansible host pattern)")
    p.add_argument("--check", action="store_true", help="dry run: say what would change, change nothing")
    p.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR,
                   help=f"where each run's artifacts are kept (default ./{DEFAULT_RUNS_DIR})")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more Ansible output in the artifacts")
    return p.parse_args(list(argv))


def _extra_var(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not key.strip().replace("_", "").isalnum():
        raise UsageError(f"-e {text!r}: expected KEY=VALUE with KEY a variable name (letters, digits, _)")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def playbook_vars(args: argparse.Namespace, cwd: Path) -> dict[str, Any]:
    """The playbook's variables from the arguments; UsageError names what is missing or misplaced."""
    cmd = args.command
    if cmd in NEEDS_APP and not args.app:
        raise UsageError(f"{cmd} needs --app NAME (the app as imported, e.g. --app shop)")
    if cmd == "import" and not args.bundle:
        raise UsageError("import needs --bundle PATH (the carried bundle) and --vendor-key PUB")
    if cmd == "import" and not args.vendor_key:
        raise UsageError("import needs --vendor-key PUB: the site only imports bundles signed by a key it trusts")
    if cmd == "sync" and not (args.sync_from and args.app_version):
        raise UsageError("sync needs --from URL (the hub's repository) and --version X (the release to sync)")
    for opt, value, allowed in (("--bundle", args.bundle, ("import",)), ("--vendor-key", args.vendor_key, ("import",)),
                                ("--site", args.site, ("have",)), ("--app", args.app, NEEDS_APP + ("site_status",)),
                                ("--version", args.app_version, ("install", "upgrade", "rollback", "sync")),
                                ("--from", args.sync_from, ("sync",)), ("--bandwidth", args.bandwidth, ("sync",))):
        if value and cmd not in allowed:
            raise UsageError(f"{opt} does not apply to {cmd} (only to {', '.join(allowed)})")
    out: dict[str, Any] = {}
    if cmd == "import":
        out["offline_delivery_bundle_src"] = str((cwd / args.bundle).resolve())
        out["offline_delivery_vendor_keys_src"] = [str((cwd / k).resolve()) for k in args.vendor_key]
    if args.app:
        out["app_name"] = args.app
    if args.app_version:
        out["app_rollback_version" if cmd == "rollback" else "app_version"] = args.app_version
    if args.site:
        out["offline_delivery_site"] = args.site
    # Reports and have-lists land where the engineer runs the command, not in the runner's private dir.
    if cmd == "status":
        out["app_report_dir"] = str(cwd / "offline-delivery-reports")
    if cmd == "have":
        out["offline_delivery_have_dest"] = str(cwd / "offline-delivery-have")
    if cmd == "site_status":
        out["offline_delivery_status_dest"] = str(cwd / "offline-delivery-status")
    if cmd == "sync":
        out["offline_delivery_sync_from"] = args.sync_from
        if args.bandwidth:
            out["offline_delivery_sync_bandwidth_limit"] = args.bandwidth
    for text in args.extra_var:
        key, value = _extra_var(text)
        out[key] = value
    return out


@dataclass
class Summary:
    """Per-host counts from ansible-runner's stats."""

    hosts: dict[str, dict[str, int]] = field(default_factory=dict)

    KEYS = (("ok", "ok"), ("changed", "changed"), ("failures", "failed"), ("dark", "unreachable"),
            ("skipped", "skipped"))

    @classmethod
    def from_stats(cls, stats: dict[str, Any] | None) -> "Summary":
        s = cls()
        for key, label in cls.KEYS:
            for host, n in ((stats or {}).get(key) or {}).items():
                s.hosts.setdefault(host, {lbl: 0 for _key, lbl in cls.KEYS})[label] = int(n)
        return s

    def failed_hosts(self) -> list[str]:
        return sorted(h for h, c in self.hosts.items() if c["failed"] or c["unreachable"])

    def lines(self) -> list[str]:
        if not self.hosts:
            return ["no host ran a task (check the inventory and --limit)"]
        width = max(len(h) for h in self.hosts)
        out = [f"{'host':<{width}}  result   ok changed failed unreachable skipped"]
        for host in sorted(self.hosts):
            c = self.hosts[host]
            state = "FAILED" if c["failed"] or c["unreachable"] else ("changed" if c["changed"] else "ok")
            out.append(f"{host:<{width}}  {state:<7} {c['ok']:>4} {c['changed']:>7} {c['failed']:>6} "
                       f"{c['unreachable']:>11} {c['skipped']:>7}")
        return out


def failure_message(event: dict[str, Any]) -> str:
    """The first line of a failed or unreachable task's message (the lifecycle modules put the cause there)."""
    data = event.get("event_data") or {}
    res = data.get("res") or {}
    msg = str(res.get("msg") or res.get("stderr") or "").strip().splitlines()
    return msg[0][:300] if msg else "(no message)"


def progress_handler(write: Callable[[str], None]) -> Callable[[dict[str, Any]], bool]:
    """ansible-runner event handler: a line per play and task, and per host that fails or is unreachable."""
    def handle(event: dict[str, Any]) -> bool:
        kind, data = event.get("event"), event.get("event_data") or {}
        if kind == "playbook_on_play_start":
            write(f"== {data.get('play', '')}")
        elif kind == "playbook_on_task_start":
            write(f"   {data.get('task', '')}")
        elif kind in ("runner_on_failed", "runner_on_unreachable") and not data.get("ignore_errors"):
            what = "UNREACHABLE" if kind == "runner_on_unreachable" else "FAILED"
            write(f"   {what} {data.get('host')}: {failure_message(event)}")
        return True  # keep the event in the artifacts
    return handle


@dataclass
class PlaybookRun:
    """One ansible-runner run: its outcome, per-host counts and the failure message(s) of each failed host."""

    rc: int
    status: str
    summary: Summary
    failures: dict[str, list[str]]
    private: Path
    ident: str

    @property
    def artifacts(self) -> Path:
        return self.private / "artifacts" / self.ident

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.status == "successful" and not self.summary.failed_hosts()


def run_playbook(private: Path, ident: str, playbook: str, *, inventory: Path, extravars: dict[str, Any],
                 limit: str | None, check: bool, verbose: int, write: Callable[[str], None]) -> PlaybookRun:
    """Run one collection playbook in its own private data dir (which must not exist yet)."""
    import ansible_runner  # here: argument errors need no runner installed

    # A fresh private data dir per run: ansible-runner keeps env/extravars there and passes it to every
    # later run in the same dir, so a shared one would leak one run's variables (e.g. a version) into the next.
    private.mkdir(parents=True, exist_ok=False)
    failures: dict[str, list[str]] = {}
    show = progress_handler(write)

    def handle(event: dict[str, Any]) -> bool:
        data = event.get("event_data") or {}
        if event.get("event") in ("runner_on_failed", "runner_on_unreachable") and not data.get("ignore_errors"):
            failures.setdefault(str(data.get("host")), []).append(failure_message(event))
        return show(event)

    r = ansible_runner.run(private_data_dir=str(private), ident=ident, playbook=f"offline.delivery.{playbook}",
                           inventory=str(inventory), extravars=extravars, limit=limit,
                           cmdline="--check" if check else None, verbosity=verbose or None, quiet=True,
                           event_handler=handle)
    return PlaybookRun(int(r.rc if r.rc is not None else -1), str(r.status), Summary.from_stats(r.stats),
                       failures, private, ident)


def check_files(args: argparse.Namespace, cwd: Path) -> Path:
    """The inventory, and import's bundle and vendor keys, as named on the command line: a missing or unusable
    one is a usage error (exit 2) found before any playbook runs, not a failed run. Returns the inventory."""
    inventory = (cwd / args.inventory).resolve()
    if not inventory.exists():
        raise UsageError(f"inventory {inventory} does not exist")
    if args.command == "import":
        bundle = (cwd / args.bundle).resolve()
        if not bundle.exists():
            raise UsageError(f"--bundle {bundle} does not exist: give the carried bundle (its directory, "
                             "<name>-<version>.bundle or .parts.json)")
        for name in args.vendor_key:  # only that each is an Ed25519 public key: the site's pins decide trust
            key = (cwd / name).resolve()
            try:
                ed25519.load_public_key_pem(key.read_text(encoding="ascii", errors="replace"), source=str(key))
            except OSError as exc:
                raise UsageError(f"--vendor-key {key}: cannot read it: {exc.strerror}") from None
            except ed25519.Ed25519KeyError as exc:
                raise UsageError(f"--vendor-key: {exc}") from None
    return inventory


def run(args: argparse.Namespace, *, write: Callable[[str], None], cwd: Path) -> int:
    extravars = playbook_vars(args, cwd)
    inventory = check_files(args, cwd)
    ident = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{args.command}-{os.getpid()}"
    private = (cwd / args.runs_dir).resolve() / ident
    write(f"offline-delivery {args.command}: playbook offline.delivery.{args.command}, inventory {inventory}")
    r = run_playbook(private, ident, args.command, inventory=inventory, extravars=extravars, limit=args.limit,
                     check=args.check, verbose=args.verbose, write=write)
    summary = r.summary
    write("")
    for line in summary.lines():
        write(line)
    artifacts = r.artifacts
    write(f"artifacts (keep for support): {private}")
    failed = summary.failed_hosts()
    if r.rc != 0 or r.status != "successful" or failed:
        write(f"{args.command} FAILED (status {r.status}, rc {r.rc})"
              + (f" on {', '.join(failed)}" if failed else "") + f"; details in {artifacts}/stdout")
        return EXIT_FAILED
    write(f"{args.command} done{' (check mode: nothing changed)' if args.check else ''}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------
# offline-delivery rollout: waves by site group, a canary, a stop on failure, every site's state reported.

ROLLOUT_OPERATIONS = ("install", "upgrade", "rollback")
POLICY_KEYS = ("waves", "max_failed_sites", "target_groups")
WAVE_KEYS = ("site_groups", "canary", "name")
DEFAULT_TARGET_GROUPS = ("compose_hosts", "systemd_hosts", "k8s_clusters")
NOT_STARTED, DONE, FAILED = "not started", "done", "FAILED"


class PolicyError(UsageError):
    """The rollout policy file is wrong: the message names the file, the field and what to write instead."""


@dataclass(frozen=True)
class Wave:
    number: int  # 1-based, as printed
    site_groups: tuple[str, ...]
    canary: bool = False
    name: str = ""

    @property
    def label(self) -> str:
        return f"{self.number}{' canary' if self.canary else ''}"


@dataclass(frozen=True)
class Policy:
    waves: tuple[Wave, ...]
    max_failed_sites: int = 0
    target_groups: tuple[str, ...] = DEFAULT_TARGET_GROUPS


@dataclass
class Inventory:
    """Groups and their hosts (child groups included, inventory order), as `ansible-inventory --list` says."""

    groups: dict[str, list[str]]

    @classmethod
    def from_listing(cls, listing: dict[str, Any]) -> "Inventory":
        def members(group: str, seen: tuple[str, ...] = ()) -> list[str]:
            entry = listing.get(group) or {}
            found = list(entry.get("hosts") or [])
            for child in entry.get("children") or []:
                if child not in seen:
                    found += [h for h in members(child, seen + (group,)) if h not in found]
            return found

        names = [g for g in listing if g != "_meta"]
        return cls({g: members(g) for g in names})

    def hosts(self, group: str) -> list[str]:
        return self.groups.get(group, [])


def read_inventory(path: Path) -> Inventory:
    """The inventory as Ansible reads it (any format, group_vars included) via `ansible-inventory --list`."""
    exe = Path(sys.executable).with_name("ansible-inventory")
    cmd = [str(exe) if exe.exists() else "ansible-inventory", "-i", str(path), "--list"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except FileNotFoundError as exc:
        raise CommandFailed("ansible-inventory not found: install ansible-core in this Python environment") from exc
    if proc.returncode != 0:
        raise UsageError(f"inventory {path}: ansible-inventory failed: {proc.stderr.strip()[-1000:]}")
    return Inventory.from_listing(json.loads(proc.stdout))


def _names(value: Any, where: str, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"{where}: expected a non-empty list of {what} (names as in the inventory), got {value!r}")
    return tuple(value)


def _unknown_keys(doc: dict[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = sorted(str(k) for k in doc if k not in allowed)
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(allowed)})")


def parse_policy(doc: Any, source: str) -> Policy:
    """Check the policy's shape (no inventory needed); PolicyError names `source` and the field."""
    if not isinstance(doc, dict):
        raise PolicyError(f"{source}: expected a mapping with 'waves' (a list of waves), got {type(doc).__name__}")
    _unknown_keys(doc, POLICY_KEYS, source)
    raw_waves = doc.get("waves")
    if not isinstance(raw_waves, list) or not raw_waves:
        raise PolicyError(f"{source}: waves: expected a non-empty list, each wave "
                          "{{site_groups: [GROUP, ...], canary: true|false}}")
    waves = []
    for i, raw in enumerate(raw_waves):
        where = f"{source}: waves[{i}]"
        if not isinstance(raw, dict):
            raise PolicyError(f"{where}: expected a mapping {{site_groups: [GROUP, ...]}}, got {raw!r}")
        _unknown_keys(raw, WAVE_KEYS, where)
        canary = raw.get("canary", False)
        if not isinstance(canary, bool):
            raise PolicyError(f"{where}.canary: expected true or false, got {canary!r}")
        if canary and i:
            raise PolicyError(f"{where}.canary: only the first wave can be the canary")
        name = raw.get("name", "")
        if not isinstance(name, str):
            raise PolicyError(f"{where}.name: expected text, got {name!r}")
        waves.append(Wave(i + 1, _names(raw.get("site_groups"), f"{where}.site_groups", "site groups"), canary, name))
    first: dict[str, str] = {}
    for wave in waves:
        for j, group in enumerate(wave.site_groups):
            where = f"waves[{wave.number - 1}].site_groups[{j}]"
            if group in first:
                raise PolicyError(f"{source}: {where}: site group {group} is already in {first[group]}; "
                                  "a site goes in exactly one wave")
            first[group] = where
    limit = doc.get("max_failed_sites", 0)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise PolicyError(f"{source}: max_failed_sites: expected a whole number >= 0, got {limit!r}")
    targets = _names(doc.get("target_groups", list(DEFAULT_TARGET_GROUPS)), f"{source}: target_groups",
                     "inventory groups of app targets")
    return Policy(tuple(waves), limit, targets)


def load_policy(path: Path) -> Policy:
    return parse_policy(read_yaml(path, f"policy {path}", PolicyError), str(path))


@dataclass(frozen=True)
class SitePlan:
    group: str
    wave: Wave
    targets: tuple[str, ...]  # its app targets, in inventory order
    members: tuple[str, ...]  # every host of the site group (its repo host too)


def plan_sites(policy: Policy, inventory: Inventory, source: str) -> list[SitePlan]:
    """Each site group of the policy with its app targets; PolicyError when the inventory does not match."""
    targets = [h for g in policy.target_groups for h in inventory.hosts(g)]
    if not any(g in inventory.groups for g in policy.target_groups):
        raise PolicyError(f"{source}: target_groups: none of {', '.join(policy.target_groups)} is a group of "
                          "the inventory; name the groups that hold the app's targets")
    sites: list[SitePlan] = []
    owner: dict[str, str] = {}
    for wave in policy.waves:
        for j, group in enumerate(wave.site_groups):
            where = f"{source}: waves[{wave.number - 1}].site_groups[{j}]"
            if group not in inventory.groups or group in ("all", "ungrouped"):
                known = sorted(g for g in inventory.groups if g not in ("all", "ungrouped"))
                raise PolicyError(f"{where}: {group} is not a group of the inventory (its groups: {', '.join(known)})")
            hosts = [h for h in inventory.hosts(group) if h in targets]
            if not hosts:
                raise PolicyError(f"{where}: site group {group} has no host in the target groups "
                                  f"({', '.join(policy.target_groups)}): nothing to roll out there")
            for host in inventory.hosts(group):
                if host in owner and owner[host] != group:
                    raise PolicyError(f"{where}: host {host} is in site group {group} and in {owner[host]}; "
                                      "a site goes in exactly one wave (a host in exactly one site group)")
                owner[host] = group
            sites.append(SitePlan(group, wave, tuple(hosts), tuple(inventory.hosts(group))))
    return sites


def uncovered_targets(policy: Policy, inventory: Inventory, plans: Sequence[SitePlan]) -> list[str]:
    """App targets of the inventory that no site group of the policy holds: the rollout leaves them alone."""
    covered = {h for p in plans for h in p.targets}
    targets = dict.fromkeys(h for g in policy.target_groups for h in inventory.hosts(g))
    return [h for h in targets if h not in covered]


@dataclass
class SiteState:
    """One site's state after the rollout: its wave's outcome, then what the status run found."""

    group: str
    wave: Wave
    outcome: str = NOT_STARTED  # DONE, FAILED or NOT_STARTED
    failure: str = ""  # e.g. "api failed, rolled back to 1.0.0"
    detail: list[str] = field(default_factory=list)  # "host: message" of each failed host
    versions: dict[str, list[str]] = field(default_factory=dict)  # version -> hosts running it
    healthy: int = 0
    components: int = 0
    unhealthy: list[str] = field(default_factory=list)  # "host/component"
    reasons: list[str] = field(default_factory=list)  # "host/component: reason"
    unknown: list[str] = field(default_factory=list)  # hosts the status run could not read

    def row(self, app: str, latest: str | None) -> SiteRow:
        """The site as a row of the fleet table (offline_delivery_common/fleet_table.py): the wave and its
        outcome go into NOTE, the failure into LAST FAILURE, the release rolled out into LATEST (so LAG shows
        who is not on it)."""
        return SiteRow(site=self.group, app=app, versions=self.versions, healthy=self.healthy,
                       components=self.components, failed=self.failure or None, latest=latest,
                       note=f"wave {self.wave.label}: {self.outcome}", unhealthy=tuple(self.unhealthy),
                       unreachable=tuple(self.unknown))


COMPONENT_FAILED = re.compile(r"component (\S+) failed")
ROLLED_BACK = re.compile(r"rolled back to (\S+?), which is healthy")


def site_outcome(site: SitePlan, run_: PlaybookRun) -> tuple[str, str, list[str]]:
    """How the wave's run went for one site: (outcome, failure summary, "host: message" lines)."""
    failed = set(run_.summary.failed_hosts()) | set(run_.failures)
    mine = [h for h in site.members if h in failed]
    details = [f"{host}: {msg}" for host in mine for msg in run_.failures.get(host, ["failed"])]
    if mine:
        text = " ".join(details)
        parts = sorted(set(COMPONENT_FAILED.findall(text)))
        back = sorted(set(ROLLED_BACK.findall(text)))
        summary = f"{', '.join(parts)} failed" if parts else f"{', '.join(mine)} failed"
        return FAILED, summary + (f", rolled back to {', '.join(back)}" if back else ""), details
    if not run_.ok and not run_.summary.failed_hosts():
        return FAILED, "the run did not finish", [
            f"the run did not finish (status {run_.status}, rc {run_.rc}); see {run_.artifacts}/stdout"]
    return DONE, "", []


def apply_status(states: dict[str, SiteState], plans: list[SitePlan], report: dict[str, Any] | None) -> None:
    """Fill each site's running versions and health from the status playbook's <app>-status.json."""
    hosts = (report or {}).get("hosts") or {}
    for plan in plans:
        state = states[plan.group]
        for host in plan.targets:
            st = (hosts.get(host) or {}).get("status")
            if not st:
                state.unknown.append(host)
                continue
            state.versions.setdefault(st.get("version") or "not installed", []).append(host)
            for comp, item in sorted((st.get("components") or {}).items()):
                state.components += 1
                if item.get("healthy"):
                    state.healthy += 1
                else:
                    state.unhealthy.append(f"{host}/{comp}")
                    state.reasons.append(f"{host}/{comp}: {item.get('reason') or 'unhealthy'}")


def report_lines(states: Sequence[SiteState], app: str, latest: str | None) -> list[str]:
    """The rollout report: the fleet table (one row per site), then each failed host's message and each
    unhealthy component's reason."""
    out = format_table([s.row(app, latest) for s in states]).splitlines()
    for s in states:
        out += [f"  {s.group}: {line}" for line in s.detail]
        out += [f"  {s.group}: unhealthy {line}" for line in s.reasons]
        if s.unknown:
            out.append(f"  {s.group}: no status from {', '.join(s.unknown)} "
                       "(unreachable or failed; see the status run)")
    return out


def parse_rollout_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="offline-delivery rollout", description="Roll a release out across sites "
                                "in waves of site groups (canary first), stop at the first failed wave, then "
                                "report every site's state (docs/multisite.md).")
    p.add_argument("operation", choices=ROLLOUT_OPERATIONS)
    p.add_argument("-i", "--inventory", required=True, help="the inventory holding every site")
    p.add_argument("--policy", required=True, help="the rollout policy (YAML: waves of site groups)")
    p.add_argument("--app", required=True, help="app name, e.g. shop")
    p.add_argument("--version", dest="app_version",
                   help="install/upgrade: the release (default the newest imported); rollback: the one to go back to")
    p.add_argument("-e", "--extra-var", action="append", default=[], metavar="KEY=VALUE",
                   help="extra playbook variable (repeatable; VALUE is read as JSON when it parses, else as text)")
    p.add_argument("--check", action="store_true", help="dry run of every wave (no health gate can fail)")
    p.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR,
                   help=f"where the rollout's artifacts are kept (default ./{DEFAULT_RUNS_DIR})")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more Ansible output in the artifacts")
    return p.parse_args(list(argv))


WAVE_VARS = ("offline_delivery_app_hosts", "offline_delivery_serial", "offline_delivery_max_fail_percentage")


def rollout_vars(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"app_name": args.app}
    if args.app_version:
        out["app_rollback_version" if args.operation == "rollback" else "app_version"] = args.app_version
    for text in args.extra_var:
        key, value = _extra_var(text)
        if key in WAVE_VARS:
            raise UsageError(f"-e {key}: the rollout sets it per wave from the policy; change the policy instead")
        out[key] = value
    return out


def wave_vars(base: dict[str, Any], targets: Sequence[str]) -> dict[str, Any]:
    # Exactly this wave's targets, all at once; max_fail_percentage 100 lets every site of the wave finish
    # (each failed host rolls itself back) — the stop decision is taken between waves, per site.
    return {**base, "offline_delivery_app_hosts": ",".join(targets), "offline_delivery_serial": "100%",
            "offline_delivery_max_fail_percentage": 100}


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def rollout(args: argparse.Namespace, *, write: Callable[[str], None], cwd: Path) -> int:
    base = rollout_vars(args)
    inventory = (cwd / args.inventory).resolve()
    if not inventory.exists():
        raise UsageError(f"inventory {inventory} does not exist")
    policy_path = (cwd / args.policy).resolve()
    policy = load_policy(policy_path)
    inv = read_inventory(inventory)
    plans = plan_sites(policy, inv, str(policy_path))
    states = {p.group: SiteState(p.group, p.wave) for p in plans}
    stamp = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-rollout-{args.operation}-{os.getpid()}"
    top = (cwd / args.runs_dir).resolve() / stamp
    write(f"offline-delivery rollout {args.operation}: {len(policy.waves)} wave(s), policy {policy_path}, "
          f"inventory {inventory}")
    outside = uncovered_targets(policy, inv, plans)
    if outside:
        write(f"not in the policy (neither changed nor reported): {', '.join(outside)}")
    stopped = _run_waves(args, policy, plans, states, base, inventory, top, write)
    write("")
    write("== Status of every site")
    groups = [p.group for p in plans]
    status = run_playbook(top / "status", "status", "status", inventory=inventory,
                          extravars={"app_name": args.app, "app_report_dir": str(top / "report"),
                                     "offline_delivery_app_hosts": ",".join(h for p in plans for h in p.targets)},
                          limit=":".join(groups), check=False, verbose=args.verbose, write=write)
    apply_status(states, plans, _read_report(top / "report" / f"{args.app}-status.json"))
    write("")
    # LATEST = the release rolled out, when named: LAG then flags every site not on it
    latest = args.app_version if args.operation != "rollback" else None
    for line in report_lines([states[g] for g in groups], args.app, latest):
        write(line)
    write(f"artifacts (keep for support): {top}")
    if not status.ok:
        write(f"the status run failed (status {status.status}, rc {status.rc}): see {status.artifacts}/stdout")
    failed = [g for g in groups if states[g].outcome == FAILED]
    if stopped:
        write(f"rollout {args.operation} STOPPED: {stopped}")
        return EXIT_FAILED
    if failed:
        write(f"rollout {args.operation} finished with failed site(s): {', '.join(failed)}")
        return EXIT_FAILED
    write(f"rollout {args.operation} done on every site{' (check mode: nothing changed)' if args.check else ''}")
    return EXIT_OK


def _run_waves(args: argparse.Namespace, policy: Policy, plans: list[SitePlan], states: dict[str, SiteState],
               base: dict[str, Any], inventory: Path, top: Path,
               write: Callable[[str], None]) -> str:
    """Run the waves in order; return why the rollout stopped ('' when every wave ran)."""
    failed_sites: list[str] = []
    for wave in policy.waves:
        sites = [p for p in plans if p.wave == wave]
        targets = [h for p in sites for h in p.targets]
        write("")
        named = f" ({wave.name})" if wave.name and wave.name != "canary" else ""
        write(f"== Wave {wave.label}{named}: {', '.join(wave.site_groups)}")
        # --limit keeps the run to this wave's sites (their repo hosts included), nothing of the others.
        result = run_playbook(top / f"wave{wave.number}", f"wave{wave.number}", args.operation,
                              inventory=inventory, extravars=wave_vars(base, targets),
                              limit=":".join(wave.site_groups), check=args.check, verbose=args.verbose, write=write)
        for site in sites:
            state = states[site.group]
            state.outcome, state.failure, state.detail = site_outcome(site, result)
            if state.outcome == FAILED:
                failed_sites.append(site.group)
        wave_failed = [p.group for p in sites if states[p.group].outcome == FAILED]
        if wave.canary and wave_failed:
            return f"the canary wave failed ({', '.join(wave_failed)}); later waves not started"
        if len(failed_sites) > policy.max_failed_sites:
            return (f"{len(failed_sites)} failed site(s) ({', '.join(failed_sites)}), more than max_failed_sites "
                    f"{policy.max_failed_sites}; later waves not started")
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    def write(line: str) -> None:
        print(line, flush=True)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["rollout"]:
        rollout_args = parse_rollout_args(argv[1:])  # exits 2 on bad usage
        return run_command("offline-delivery rollout", lambda: rollout(rollout_args, write=write, cwd=Path.cwd()))
    args = parse_args(argv)  # exits 2 on bad usage
    return run_command(f"offline-delivery {args.command}", lambda: run(args, write=write, cwd=Path.cwd()))


if __name__ == "__main__":
    sys.exit(main())
