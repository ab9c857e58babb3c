"""The pure parts of the lifecycle benchmark: the synthetic app's shape and model, the health server each
component runs, and the parsing of what the playbooks and the hosts report (no I/O here; unit-tested).

The app: N components `c00..cNN` on 3 base images, in dependency levels (each component of a level depends
on one or two of the level before, so the engine's level-by-level start and health gates matter). Every
component runs the same tiny HTTP server (in its base image's layer) that, at start, checks that each of its
dependencies answers `/healthz` and exits naming the one that does not: a wrong start order fails loudly.
Release 1.1.0 changes exactly one component (`CHANGED`): a new top layer (its image tag) and one env value.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

APP = "odlc"
REPO = "odlc"
V1, V2 = "1.0.0", "1.1.0"
BASES = 3
PORT0 = 9100
# Level sizes as a share of the components: a few core services, then wider levels that use them.
LEVEL_SHARES = (0.1, 0.2, 0.3, 0.4)


@dataclass(frozen=True)
class Component:
    name: str
    index: int
    level: int
    base: int
    deps: tuple[str, ...]

    @property
    def port(self) -> int:
        return PORT0 + self.index

    @property
    def env_prefix(self) -> str:
        return self.name.upper()

    def ref(self, version: str) -> str:
        return f"{REPO}/{self.name}:{version}"


def level_sizes(count: int) -> list[int]:
    """How many components each level holds (every level at least one; they add up to ``count``)."""
    if count < len(LEVEL_SHARES):
        raise ValueError(f"--components {count}: at least {len(LEVEL_SHARES)} (one per dependency level)")
    sizes = [max(1, round(count * share)) for share in LEVEL_SHARES]
    sizes[-1] += count - sum(sizes)
    while sizes[-1] < 1:  # rounding gave the earlier levels too many
        biggest = max(range(len(sizes) - 1), key=lambda i: sizes[i])
        sizes[biggest] -= 1
        sizes[-1] += 1
    return sizes


def components(count: int) -> list[Component]:
    """The app's components in dependency order, deterministic for a given count."""
    out: list[Component] = []
    previous: list[str] = []
    index = 0
    for level, size in enumerate(level_sizes(count)):
        names = []
        for k in range(size):
            name = f"c{index:02d}"
            if previous:
                first = previous[k % len(previous)]
                second = previous[(k + 1) % len(previous)]
                deps: tuple[str, ...] = (first,) if k % 2 == 0 or second == first else (first, second)
            else:
                deps = ()
            out.append(Component(name, index, level, index % BASES, deps))
            names.append(name)
            index += 1
        previous = names
    return out


def changed_component(comps: list[Component]) -> Component:
    """The one component 1.1.0 changes: the first of the middle level that others depend on, so the check
    shows that its dependents (whose own specs did not change) keep running."""
    depended = {d for c in comps for d in c.deps}
    middle = max(1, max(c.level for c in comps) - 1)
    for comp in comps:
        if comp.level == middle and comp.name in depended:
            return comp
    return next(c for c in comps if c.name in depended)


def image_ref(comp: Component, changed: Component, version: str) -> str:
    """Only the changed component gets a 1.1.0 image; every other one keeps its 1.0.0 image in 1.1.0."""
    return comp.ref(V2 if version == V2 and comp.name == changed.name else V1)


def app_model(count: int, version: str) -> dict[str, Any]:
    """The app.yml of ``version`` (validated by the caller with offline_delivery_core.app.model.load_model)."""
    comps = components(count)
    changed = changed_component(comps)
    out: dict[str, Any] = {}
    for comp in comps:
        spec: dict[str, Any] = {
            "image": image_ref(comp, changed, version),
            "ports": [{"name": "http", "port": comp.port, "protocol": "tcp"}],
            "env": {"ODLC_PORT": str(comp.port), "ODLC_DEPS": " ".join(comp.deps),
                    "ODLC_MODE": "v2" if version == V2 and comp.name == changed.name else "v1"},
            "health": {"http": {"port": comp.port, "path": "/healthz"}, "interval": "1s", "timeout": "1s",
                       "retries": 20, "start_period": "1s"},
            "resources": {"cpus": "0.1", "memory": "32Mi"},
            "exports": {f"{comp.env_prefix}_HOST": "${host}", f"{comp.env_prefix}_PORT": str(comp.port)},
        }
        if comp.deps:
            spec["depends_on"] = {d: {"condition": "healthy"} for d in comp.deps}
        out[comp.name] = spec
    return {"apiVersion": "offline.delivery/v1", "kind": "Application", "name": APP, "version": version,
            "description": f"Synthetic lifecycle benchmark app: {count} components on {BASES} base images, "
                           f"release {V2} changes only {changed.name}.",
            "components": out}


# The process every component runs (python3 of the image, stdlib only). Kept small: its start-up time is
# part of every health gate. No proxies from the environment (urllib would honour them).
SERVER = r'''"""odlc component: check the dependencies once, then answer /healthz with who and what it is."""
import json
import os
import signal
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# As PID 1 of a container, a process without a SIGTERM handler ignores it: `docker stop` would wait its
# whole timeout (10 s) before SIGKILL on every restart.
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))

CONF = json.load(open("/opt/odlc/component.json"))
PORT = int(os.environ["ODLC_PORT"])
DEPS = os.environ.get("ODLC_DEPS", "").split()
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def dep_ok(dep):
    url = "http://%s:%s/healthz" % (os.environ[dep.upper() + "_HOST"], os.environ[dep.upper() + "_PORT"])
    try:
        return OPENER.open(url, timeout=2).status == 200, url
    except (OSError, ValueError) as exc:
        return False, "%s: %s" % (url, exc)


for dep in DEPS:
    for attempt in range(10):
        ok, where = dep_ok(dep)
        if ok:
            break
        time.sleep(0.5)
    else:
        sys.exit("%s: dependency %s is not healthy (%s): started before it?" % (CONF["name"], dep, where))

BODY = json.dumps({"name": CONF["name"], "version": CONF["version"], "mode": os.environ.get("ODLC_MODE"),
                   "deps": DEPS}).encode()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path in ("/", "/healthz") else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


print("%s %s listening on %d (deps: %s)" % (CONF["name"], CONF["version"], PORT, " ".join(DEPS) or "-"),
      flush=True)
ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
'''


# ---------------------------------------------------------------------------------------- parsing results

_RECAP = re.compile(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", re.M)


def recap(stdout: str) -> dict[str, dict[str, int]]:
    """host -> {ok, changed, failed, ...} from ansible-playbook's PLAY RECAP."""
    tail = stdout.rsplit("PLAY RECAP", 1)
    if len(tail) != 2:
        raise ValueError("no PLAY RECAP in the playbook's output (did it run at all?)")
    return {m.group(1): {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
            for m in _RECAP.finditer(tail[1])}


_PLAN = re.compile(r"(?<![\w.-])([A-Za-z0-9][\w.-]*) (\S+) -> (\S+?): "
                   r"added ([^;]*); changed ([^;]*); removed ([^;]*); unchanged ([^\"'\n]*)")


def _names(text: str) -> list[str]:
    text = text.strip().rstrip(".,")
    return [] if text in ("", "-") else [n.strip() for n in text.split(",") if n.strip()]


def plan_lines(stdout: str, app: str = APP) -> list[dict[str, Any]]:
    """The engine's one-line summaries (`odlc 1.0.0 -> 1.1.0: added -; changed c10; removed -; unchanged
    ...`), one per host that deployed, as dicts of name lists."""
    out = []
    for m in _PLAN.finditer(stdout):
        if m.group(1) != app:
            continue
        out.append({"from": m.group(2), "to": m.group(3), "added": _names(m.group(4)),
                    "changed": _names(m.group(5)), "removed": _names(m.group(6)), "unchanged": _names(m.group(7))})
    return out


def parse_identities(stdout: str) -> dict[str, str]:
    """`<component> <identity...>` lines (container id + start time, or unit PID + start timestamp)."""
    out: dict[str, str] = {}
    for line in stdout.strip().splitlines():
        name, _, ident = line.strip().partition(" ")
        if not name or not ident.strip():
            raise ValueError(f"unexpected line {line!r}: expected '<component> <identity>'")
        if name in out:
            raise ValueError(f"component {name} listed twice (two containers/units?): {out[name]!r}, {ident!r}")
        out[name] = ident.strip()
    return out


def restarted(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Components whose identity changed (or that appeared or vanished) between two observations."""
    return sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))


def restart_problem(before: Mapping[str, str], after: Mapping[str, str], expected: list[str],
                    host: str) -> str | None:
    """Why an upgrade did not restart exactly ``expected`` on ``host``, or None."""
    missing = sorted(set(before) ^ set(after))
    if missing:
        return f"{host}: components not running before and after alike: {', '.join(missing)}"
    got = restarted(before, after)
    if got != sorted(expected):
        extra = sorted(set(got) - set(expected))
        absent = sorted(set(expected) - set(got))
        parts = []
        if extra:
            parts.append(f"restarted although unchanged: {', '.join(extra)}")
        if absent:
            parts.append(f"not restarted although changed: {', '.join(absent)}")
        return f"{host}: the upgrade restarted {len(got)} component(s), expected exactly {len(expected)} " \
               f"({'; '.join(parts)})"
    return None


def format_table(rows: list[tuple[str, str, str]]) -> str:
    """A plain text table of (step, time, note)."""
    head = ("step", "wall time", "what it did")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def expected_answers(count: int, version: str) -> dict[str, dict[str, str]]:
    """What each component's /healthz must say once ``version`` runs: its image's version and its mode."""
    comps = components(count)
    changed = changed_component(comps)
    out = {}
    for comp in comps:
        new = version == V2 and comp.name == changed.name
        out[comp.name] = {"version": V2 if new else V1, "mode": "v2" if new else "v1"}
    return out


def answers_problem(seen: Mapping[str, Mapping[str, Any]], expected: Mapping[str, Mapping[str, str]],
                    host: str) -> str | None:
    """Why the components' answers on ``host`` are not what the release should give, or None."""
    wrong = []
    for name, want in sorted(expected.items()):
        got = seen.get(name)
        if got is None:
            wrong.append(f"{name} did not answer")
        elif any(got.get(k) != v for k, v in want.items()):
            wrong.append(f"{name} says {dict((k, got.get(k)) for k in want)}, expected {dict(want)}")
    extra = sorted(set(seen) - set(expected))
    if extra:
        wrong.append(f"not in the release: {', '.join(extra)}")
    return f"{host}: " + "; ".join(wrong) if wrong else None


def start_clock(kind: str, identity: str) -> float:
    """When a component last started, in seconds, from its identity line: compose gives the container's
    StartedAt (wall clock, UTC), systemd the unit's ActiveEnterTimestampMonotonic (CLOCK_MONOTONIC, µs;
    containers share the kernel's clock, so it compares with this process's time.monotonic())."""
    fields = identity.split()
    if kind == "compose":
        if len(fields) != 2:
            raise ValueError(f"compose identity {identity!r}: expected '<container id> <StartedAt>'")
        return datetime.fromisoformat(fields[1]).timestamp()
    if len(fields) != 2 or not fields[1].isdigit():
        raise ValueError(f"systemd identity {identity!r}: expected '<MainPID> <ActiveEnterTimestampMonotonic>'")
    return int(fields[1]) / 1e6


def level_timeline(starts: Mapping[str, float], count: int, t0: float) -> list[dict[str, Any]]:
    """Per dependency level: how many components started and when the first and the last of them started,
    in seconds after ``t0`` (the playbook's start, same clock as ``starts``)."""
    out = []
    for level in range(len(level_sizes(count))):
        names = [c.name for c in components(count) if c.level == level and c.name in starts]
        if names:
            times = [starts[n] - t0 for n in names]
            out.append({"level": level, "started": len(names), "first_s": round(min(times), 1),
                        "last_s": round(max(times), 1)})
    return out


def pull_span(stdout: str, t0: float) -> dict[str, Any]:
    """Image pulls of a step from `docker events --format '{{.TimeNano}} ...'` lines: how many, and when the
    first and the last finished, in seconds after ``t0`` (wall clock)."""
    times = []
    for line in stdout.split("\n"):
        field = line.split(" ", 1)[0]
        if field:
            if not field.isdigit():
                raise ValueError(f"docker events line {line!r}: expected '<TimeNano> ...'")
            times.append(int(field) / 1e9 - t0)
    if not times:
        return {"pulls": 0}
    return {"pulls": len(times), "first_done_s": round(min(times), 1), "last_done_s": round(max(times), 1)}
