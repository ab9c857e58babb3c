"""``offline-delivery``: one command for delivery engineers who do not know Ansible (docs/fleet.md).

    offline-delivery import  -i INVENTORY --bundle /media/usb/shop-1.1.0 --vendor-key /media/usb/vendor.pub
    offline-delivery install -i INVENTORY --app shop [--version 1.1.0]
    offline-delivery upgrade -i INVENTORY --app shop --version 1.1.0 [--check]
    offline-delivery rollback -i INVENTORY --app shop [--version 1.0.0]
    offline-delivery status  -i INVENTORY --app shop
    offline-delivery have    -i INVENTORY [--site north]

Each runs the collection's playbook of the same name (``offline.delivery.<command>``) through ansible-runner,
prints one line per task and per failed host, then a per-host summary (ok/changed/failed/unreachable), and
keeps ansible-runner's artifacts (events, stdout, the exact command, the variables) in a run directory of its
own that it prints, for support.
The playbooks stay the same for plain ``ansible-playbook`` and AWX: this only fills in their variables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

COMMANDS = ("import", "install", "upgrade", "rollback", "status", "have")
NEEDS_APP = ("install", "upgrade", "rollback", "status")
DEFAULT_RUNS_DIR = "offline-delivery-runs"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 2, 64


class UsageError(ValueError):
    """Bad arguments: the message says which and what to give instead."""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="offline-delivery", description="Deliver apps to an offline site: runs "
                                "the offline.delivery playbooks through ansible-runner.")
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("-i", "--inventory", required=True, help="the site's inventory (file or directory)")
    p.add_argument("--app", help="app name (install, upgrade, rollback, status)")
    p.add_argument("--version", dest="app_version",
                   help="release (install/upgrade: default the newest imported; rollback: the one to go back to)")
    p.add_argument("--bundle", help="import: the carried bundle (directory or .bundle / .parts.json file)")
    p.add_argument("--vendor-key", action="append", default=[], help="import: the vendor's public key (repeatable)")
    p.add_argument("--site", help="have: the site name recorded in the list (default offline_delivery_site)")
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
    for opt, value, allowed in (("--bundle", args.bundle, ("import",)), ("--vendor-key", args.vendor_key, ("import",)),
                                ("--site", args.site, ("have",)), ("--app", args.app, NEEDS_APP),
                                ("--version", args.app_version, ("install", "upgrade", "rollback"))):
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


def progress_handler(write: Callable[[str], None]) -> Callable[[dict[str, Any]], bool]:
    """ansible-runner event handler: a line per play and task, and per host that fails or is unreachable."""
    def handle(event: dict[str, Any]) -> bool:
        kind, data = event.get("event"), event.get("event_data") or {}
        if kind == "playbook_on_play_start":
            write(f"== {data.get('play', '')}")
        elif kind == "playbook_on_task_start":
            write(f"   {data.get('task', '')}")
        elif kind in ("runner_on_failed", "runner_on_unreachable") and not data.get("ignore_errors"):
            res = data.get("res") or {}
            msg = str(res.get("msg") or res.get("stderr") or "").strip().splitlines()
            what = "UNREACHABLE" if kind == "runner_on_unreachable" else "FAILED"
            write(f"   {what} {data.get('host')}: {msg[0][:300] if msg else '(no message)'}")
        return True  # keep the event in the artifacts
    return handle


def run(args: argparse.Namespace, *, write: Callable[[str], None], cwd: Path) -> int:
    extravars = playbook_vars(args, cwd)
    inventory = (cwd / args.inventory).resolve()
    if not inventory.exists():
        raise UsageError(f"inventory {inventory} does not exist")
    import ansible_runner  # here: argument errors need no runner installed

    ident = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{args.command}-{os.getpid()}"
    # A fresh private data dir per run: ansible-runner keeps env/extravars there and passes it to every
    # later run in the same dir, so a shared one would leak one run's variables (e.g. a version) into the next.
    private = (cwd / args.runs_dir).resolve() / ident
    private.mkdir(parents=True, exist_ok=False)
    cmdline = " ".join(["--check"] * args.check)
    write(f"offline-delivery {args.command}: playbook offline.delivery.{args.command}, inventory {inventory}")
    r = ansible_runner.run(private_data_dir=str(private), ident=ident, playbook=f"offline.delivery.{args.command}",
                           inventory=str(inventory), extravars=extravars, limit=args.limit,
                           cmdline=cmdline or None, verbosity=args.verbose or None, quiet=True,
                           event_handler=progress_handler(write))
    summary = Summary.from_stats(r.stats)
    write("")
    for line in summary.lines():
        write(line)
    artifacts = private / "artifacts" / ident
    write(f"artifacts (keep for support): {private}")
    failed = summary.failed_hosts()
    if r.rc != 0 or r.status != "successful" or failed:
        write(f"{args.command} FAILED (status {r.status}, rc {r.rc})"
              + (f" on {', '.join(failed)}" if failed else "") + f"; details in {artifacts}/stdout")
        return EXIT_FAILED
    write(f"{args.command} done{' (check mode: nothing changed)' if args.check else ''}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    def write(line: str) -> None:
        print(line, flush=True)

    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        return run(args, write=write, cwd=Path.cwd())
    except UsageError as exc:
        print(f"offline-delivery: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
