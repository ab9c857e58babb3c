"""Lifecycle benchmark: install and upgrade a 30-component app on a test-world site, as a user does.

    python -m bench.lifecycle [--components 30] [--target compose|systemd|both] [--site b-lc] [--keep-site]

Builds (or takes from the cache) the synthetic app's images and bundles (bench/lifecycle_images.py: no
download when the shop's Debian layers and packages are cached), brings up a world site (a repo host and
one target host per target kind), carries the bundles in, and times each playbook run from the jump host:
import 1.0.0, import 1.1.0 (delta), runtime, install 1.0.0, upgrade to 1.1.0, upgrade to 1.1.0 again.
Checks, failing the run loudly (exit 1, no result written): after the install every component answers with
1.0.0; the upgrade restarted exactly the one changed component on each target (container id + start time,
or unit main PID + start timestamp, of the other N-1 unchanged) and the engine's plan said so; the second
upgrade changed nothing. With both targets it also measures the layer-store goals (issue 19 item 3): the
systemd host's install against the compose host's in the same run (when each host's last component started),
the systemd host's disk for the images against their unique layer bytes, and the layers the upgrade unpacked.
Appends the result to bench/results/<date>-lifecycle.json and prints a table.
The site is removed at the end, also on failure or Ctrl-C (unless --keep-site).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from bench.lifecycle_app import (APP, V1, V2, answers_problem, components, expected_answers, format_table,
                                 level_timeline, parse_identities, plan_lines, pull_span, recap, restart_problem,
                                 restarted, start_clock)
from bench.lifecycle_images import Media, MediaError, prepare
from bench.measure import code_state, machine_info
from bench.report import append_result
from tests.world.site import HostSpec, Site
from tests.world.util import WorldError, repo_root

PLAY_TIMEOUT = 1800
TARGET_HOSTS = {"compose": HostSpec("node1", "amd64", ("compose_hosts",)),
                "systemd": HostSpec("node2", "amd64", ("systemd_hosts",))}
REPO_HOST = HostSpec("repo", "amd64", ("offline_repo",))
TRANSFER = "/srv/transfer"
APPS_DIR = "/srv/offline-delivery-apps"  # roles/app default app_apps_dir

# Each component's answer, read on the host itself: compose containers at their project-network address,
# systemd units at 127.0.0.1 (host network). argv: kind, app, {component: port}.
ANSWERS_SCRIPT = r"""
import json, subprocess, sys, urllib.request
kind, app, ports = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
addr = {}
if kind == "compose":
    ids = subprocess.run(["docker", "ps", "-q", "--filter", "label=io.offline-delivery.app=" + app],
                         capture_output=True, text=True, check=True).stdout.split()
    for info in json.loads(subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True,
                                          check=True).stdout) if ids else []:
        nets = info["NetworkSettings"]["Networks"].values()
        addr[info["Config"]["Labels"]["com.docker.compose.service"]] = next(n["IPAddress"] for n in nets)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
out = {}
for name, port in ports.items():
    try:
        out[name] = json.load(opener.open("http://%s:%d/healthz" % (addr.get(name, "127.0.0.1"), port), timeout=5))
    except (OSError, ValueError, KeyError):
        pass
print(json.dumps(out))
"""


class RunFailed(RuntimeError):
    """A step or check of the benchmark failed; the message names it and shows the evidence."""


def identities_command(kind: str, names: list[str]) -> str:
    """Shell for `<component> <identity>` lines: what changes exactly when a component restarts."""
    if kind == "compose":
        return (f"docker ps -q --filter label=io.offline-delivery.app={APP} | xargs -r docker inspect --format "
                "'{{index .Config.Labels \"com.docker.compose.service\"}} {{.Id}} {{.State.StartedAt}}'")
    return (f"for c in {' '.join(names)}; do echo $c $(systemctl show -p MainPID -p ActiveEnterTimestampMonotonic "
            f"--value od-{APP}-$c.service | tr '\\n' ' '); done")


class Bench:
    """One run on an up site: the timed playbook steps, the checks, and what they observed on the hosts."""

    def __init__(self, site: Site, media: Media, count: int, kinds: list[str], log: Callable[[str], None]):
        self.site, self.media, self.count, self.kinds, self.log = site, media, count, kinds, log
        self.targets = {kind: TARGET_HOSTS[kind].name for kind in kinds}
        self.names = [c.name for c in components(count)]
        self.ports = {c.name: c.port for c in components(count)}
        self.times: dict[str, float] = {}
        self.clock0: dict[str, tuple[float, float]] = {}  # step -> (wall clock, monotonic) at its start
        self.restarted: dict[str, list[str]] = {}
        self.timelines: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.pulls: dict[str, dict[str, dict[str, Any]]] = {}
        self.disk: dict[str, int] = {}
        self.store_added: list[str] = []     # layers the upgrade added to the systemd host's store
        self.exposure: dict[str, float] = {}  # systemd unit -> systemd-analyze security's exposure level

    def play(self, step: str, playbook: str, *args: str) -> str:
        """Run a playbook from the jump host, timed; its stdout, or RunFailed with the output's tail."""
        self.log(f"{step} ...")
        self.clock0[step] = (time.time(), time.monotonic())
        started = time.monotonic()
        res = self.site.jump(["ansible-playbook", f"offline.delivery.{playbook}", *args], timeout=PLAY_TIMEOUT)
        self.times[step] = round(time.monotonic() - started, 1)
        self.log(f"{step}: {self.times[step]} s (rc {res.rc})")
        if res.rc != 0:
            raise RunFailed(f"{step} failed (ansible-playbook offline.delivery.{playbook} {' '.join(args)}, "
                            f"rc {res.rc}):\n{res.output[-6000:]}")
        return res.stdout

    def app_play(self, step: str, playbook: str, version: str) -> str:
        return self.play(step, playbook, "-e", f"app_name={APP}", "-e", f"app_version={version}")

    def identities(self) -> dict[str, dict[str, str]]:
        out = {}
        for kind, host in self.targets.items():
            res = self.site.exec(host, identities_command(kind, self.names), timeout=120)
            if res.rc != 0:
                raise RunFailed(f"{host}: reading the components' start times failed: {res.output[-2000:]}")
            out[host] = parse_identities(res.stdout)
        return out

    def timeline(self, step: str, seen: dict[str, dict[str, str]], only: dict[str, list[str]] | None = None) -> None:
        """When each level's components started during ``step``, per target (from their identities)."""
        out = {}
        for kind, host in self.targets.items():
            names = only[host] if only is not None else list(seen[host])
            starts = {n: start_clock(kind, seen[host][n]) for n in names}
            t0 = self.clock0[step][0 if kind == "compose" else 1]
            out[host] = level_timeline(starts, self.count, t0)
        self.timelines[step] = out
        self.pulls[step] = {host: self.pulls_of(host, step) for kind, host in self.targets.items() if kind == "compose"}

    def pulls_of(self, host: str, step: str) -> dict[str, Any]:
        """The image pulls the Docker engine of ``host`` logged since ``step`` started."""
        since = self.clock0[step][0]
        res = self.site.exec(host, ["docker", "events", "--since", f"{since:.3f}", "--until", f"{time.time():.3f}",
                                    "--filter", "type=image", "--filter", "event=pull",
                                    "--format", "{{.TimeNano}} {{.Actor.ID}}"], timeout=60)
        if res.rc != 0:
            raise RunFailed(f"{host}: reading the Docker engine's pull events failed: {res.output[-1000:]}")
        return pull_span(res.stdout, since)

    def disk_used(self) -> None:
        """Bytes on disk for the app's images on each target: the Docker engine's image store (layers shared),
        or the systemd target's layer store + image directories (`du -x`: not into the mounted roots)."""
        for kind, host in self.targets.items():
            cmd = (["docker", "system", "df", "--format", "{{.Type}} {{.Size}}"] if kind == "compose" else
                   ["du", "-sxcB1", f"{APPS_DIR}/.layers", f"{APPS_DIR}/{APP}/images"])
            res = self.site.exec(host, cmd, timeout=300)
            lines = [l.split() for l in res.stdout.splitlines() if l.split()]
            size = next((l[1] for l in lines if l[0] == "Images") if kind == "compose" else
                        (l[0] for l in lines if l[-1] == "total"), "")
            if res.rc != 0 or not size:
                raise RunFailed(f"{host}: measuring the images' disk use ({' '.join(cmd)}) failed: "
                                f"{res.output[-1000:]}")
            self.disk[host] = size_bytes(size)

    def measure_exposure(self) -> None:
        """systemd-analyze security of every unit of the app on the systemd host (docs/reliability.md)."""
        host = self.targets["systemd"]
        script = (f"for c in {' '.join(self.names)}; do echo $c $(systemd-analyze security --no-pager "
                  f"od-{APP}-$c.service | tail -n 1); done")
        res = self.site.exec(host, script, timeout=900)
        self.exposure = parse_exposure(res.stdout)
        if res.rc != 0 or sorted(self.exposure) != sorted(self.names):
            raise RunFailed(f"{host}: systemd-analyze security of the units failed: {res.output[-2000:]}")

    def store(self) -> set[str]:
        """The layers in the systemd host's layer store."""
        host = self.targets["systemd"]
        res = self.site.exec(host, ["ls", f"{APPS_DIR}/.layers"], timeout=60)
        if res.rc != 0:
            raise RunFailed(f"{host}: listing the layer store failed: {res.output[-1000:]}")
        return {name for name in res.stdout.split() if not name.startswith(".")}

    def check_answers(self, version: str) -> None:
        expected = expected_answers(self.count, version)
        for kind, host in self.targets.items():
            res = self.site.exec(host, ["python3", "-c", ANSWERS_SCRIPT, kind, APP, json.dumps(self.ports)],
                                 timeout=300)
            if res.rc != 0:
                raise RunFailed(f"{host}: asking the components failed: {res.output[-2000:]}")
            problem = answers_problem(json.loads(res.stdout), expected, host)
            if problem:
                raise RunFailed(f"after {version}: {problem}")

    def check_plans(self, stdout: str, step: str, want: dict[str, list[str]]) -> None:
        """The engine's summary line on each target says exactly ``want`` (added/changed/removed)."""
        plans = [p for p in plan_lines(stdout) if p["to"] in (V1, V2)]
        if len(plans) != len(self.targets):
            raise RunFailed(f"{step}: expected one '{APP} ... -> ...' summary per target ({len(self.targets)}), "
                            f"found {len(plans)}:\n{stdout[-4000:]}")
        for plan in plans:
            for field, names in want.items():
                if sorted(plan[field]) != sorted(names):
                    raise RunFailed(f"{step}: the engine's plan has {field} {plan[field]}, expected {names}")

    def run(self) -> None:
        keys = json.dumps({"offline_delivery_vendor_keys_src": [f"{TRANSFER}/vendor.pub"]})
        for version in (V1, V2):
            self.play(f"import {version}", "import", "-e", f"offline_delivery_bundle_src={TRANSFER}/{APP}-{version}",
                      "-e", keys)
        self.play("runtime", "runtime")
        out = self.app_play(f"install {V1}", "install", V1)
        self.check_plans(out, "install", {"added": self.names, "changed": [], "removed": []})
        self.check_answers(V1)
        before = self.identities()
        self.timeline(f"install {V1}", before)
        self.disk_used()
        if "systemd" in self.targets:
            self.measure_exposure()
        store_before = self.store() if "systemd" in self.targets else set()
        out = self.app_play(f"upgrade {V2}", "upgrade", V2)
        if "systemd" in self.targets:
            self.store_added = sorted(self.store() - store_before)
            if len(self.store_added) != 1:
                raise RunFailed(f"upgrade {V2}: the layer store gained {self.store_added}, expected exactly "
                                f"{self.media.changed}'s new top layer")
        after = self.identities()
        self.check_plans(out, "upgrade", {"added": [], "changed": [self.media.changed], "removed": []})
        for host in self.targets.values():
            self.restarted[host] = restarted(before[host], after[host])
            problem = restart_problem(before[host], after[host], [self.media.changed], host)
            if problem:
                raise RunFailed(f"upgrade {V2}: {problem}\nbefore: {before[host]}\nafter: {after[host]}")
        self.timeline(f"upgrade {V2}", after, only=self.restarted)
        self.check_answers(V2)
        out = self.app_play(f"upgrade {V2} again (no change)", "upgrade", V2)
        counts = recap(out)
        busy = {h: counts.get(h, {}).get("changed") for h in [*self.targets.values(), "repo"]
                if counts.get(h, {}).get("changed") != 0}
        if busy:
            raise RunFailed(f"the second upgrade changed something (changed= per host): {busy}\n{out[-4000:]}")
        if self.identities() != after:
            raise RunFailed("the second upgrade restarted components")


def parse_exposure(stdout: str) -> dict[str, float]:
    """`<component> <systemd-analyze security's last line>` lines -> component: exposure level."""
    out = {}
    for line in stdout.splitlines():
        match = re.match(r"(\S+) .*Overall exposure level for \S+: ([0-9.]+) ", line)
        if match:
            out[match.group(1)] = float(match.group(2))
    return out


def size_bytes(text: str) -> int:
    """`du -B1` bytes, or Docker's human size (`193.2MB`, `1.1GB`, `512kB`) as bytes."""
    units = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
    if text.isdigit():
        return int(text)
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit) and text[:-len(unit)].replace(".", "", 1).isdigit():
            return round(float(text[:-len(unit)]) * units[unit])
    raise ValueError(f"not a size: {text!r}")


def install_done(levels: list[dict[str, Any]]) -> float:
    """Seconds after the playbook's start at which the host's last component started."""
    return max(level["last_s"] for level in levels)


def layer_store_goals(bench: Bench, media: Media) -> dict[str, Any]:
    """Issue 19 item 3's goals from one run with both targets: systemd install <= 1.3x the compose host's,
    disk <= 1.2x the unique layer bytes, an upgrade of one top layer unpacks that layer only."""
    compose, systemd = TARGET_HOSTS["compose"].name, TARGET_HOSTS["systemd"].name
    install = bench.timelines[f"install {V1}"]
    unique = sum(media.layers.values())
    return {
        "install_done_s": {compose: install_done(install[compose]), systemd: install_done(install[systemd])},
        "install_ratio": round(install_done(install[systemd]) / install_done(install[compose]), 2),
        "unique_layer_bytes": unique,
        "disk_ratio": round(bench.disk[systemd] / unique, 2),
        "upgrade_unpacked_layers": len(bench.store_added),
    }


def _bundle_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def result_doc(bench: Bench, media: Media, kinds: list[str], started: str, load: tuple[float, ...]) -> dict[str, Any]:
    """One run's record for bench/results/<date>-lifecycle.json."""
    return {
        "date": started, "setting": "lifecycle", "machine": machine_info(repo_root()),
        "code": code_state(repo_root()),
        "app": {"name": APP, "components": bench.count, "base_images": 3, "changed": media.changed,
                "layers_1_0_0": len(media.layers), "layer_bytes_1_0_0": sum(media.layers.values()),
                "bundle_bytes": {name: _bundle_bytes(media.bundles[name]) for name in (f"{APP}-{V1}", f"{APP}-{V2}")},
                "bundle_1_0_0_carries": "the Debian 12 packages of the runtime playbook (amd64)"},
        "targets": {kind: TARGET_HOSTS[kind].name for kind in kinds},
        "steps_s": bench.times,
        "restarted": bench.restarted,
        "restarted_count": {h: len(v) for h, v in bench.restarted.items()},
        "start_timeline": bench.timelines,
        "image_pulls": bench.pulls,
        "images_disk_after_install": bench.disk,
        "layer_store_goals": layer_store_goals(bench, media) if len(kinds) == 2 else None,
        "systemd_exposure": ({"min": min(bench.exposure.values()), "max": max(bench.exposure.values()),
                              "units": len(bench.exposure)} if bench.exposure else None),
        "conditions": {"load_before": load, "load_after": os.getloadavg(), "media_from_cache": not media.built},
    }


def print_table(doc: dict[str, Any]) -> None:
    n, changed = doc["app"]["components"], doc["app"]["changed"]
    hosts = ", ".join(f"{h} ({k})" for k, h in doc["targets"].items())
    sizes = {version: doc["app"]["bundle_bytes"][f"{APP}-{version}"] / 1e6 for version in (V1, V2)}
    notes = {
        f"import {V1}": f"{sizes[V1]:.0f} MB bundle: {n} images + Debian packages",
        f"import {V2}": f"{sizes[V2]:.2f} MB delta: {changed}'s new top layer",
        "runtime": "Docker + Compose / unpack tools from the site repo",
        f"install {V1}": f"{n} components, level by level, each health-gated; images on disk: "
                         + ", ".join(f"{h} {v / 1e6:.0f} MB" for h, v in doc["images_disk_after_install"].items()),
        f"upgrade {V2}": "restarted: " + "; ".join(f"{h}: {', '.join(v) or '-'}" for h, v in doc["restarted"].items()),
        f"upgrade {V2} again (no change)": "changed=0 everywhere",
    }
    rows = [(step, f"{secs:.1f} s", notes.get(step, "")) for step, secs in doc["steps_s"].items()]
    print(f"lifecycle of a {n}-component app on {hosts} ({doc['date']})")
    print(format_table(rows))
    goals = doc.get("layer_store_goals")
    if goals:
        print(f"layer store: systemd install {goals['install_ratio']}x the compose host's (goal <= 1.3; last start "
              f"{goals['install_done_s']}); disk {goals['disk_ratio']}x the {goals['unique_layer_bytes'] / 1e6:.0f} MB "
              f"of unique layers (goal <= 1.2); the upgrade unpacked {goals['upgrade_unpacked_layers']} layer(s) "
              "(goal 1)")
    for step, hosts_lines in doc["start_timeline"].items():
        for host, levels in hosts_lines.items():
            spans = ", ".join(f"level {l['level']} ({l['started']}): {l['first_s']}-{l['last_s']} s" for l in levels)
            pulls = doc["image_pulls"].get(step, {}).get(host)
            if pulls and pulls["pulls"]:
                spans = f"{pulls['pulls']} image pulls done {pulls['first_done_s']}-{pulls['last_done_s']} s; " + spans
            print(f"{step} on {host}, after the playbook's start: {spans}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.lifecycle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--components", type=int, default=30, help="components of the app (default %(default)s)")
    p.add_argument("--target", choices=("compose", "systemd", "both"), default="compose",
                   help="target host kind(s) (default %(default)s)")
    p.add_argument("--site", default="b-lc", help="world site name (default %(default)s)")
    p.add_argument("--out", type=Path, default=repo_root() / "bench" / "results", help="results directory")
    p.add_argument("--keep-site", action="store_true", help="leave the site up afterwards (for poking at)")
    return p


def _log(message: str) -> None:
    print(f"[lifecycle {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    kinds = ["compose", "systemd"] if args.target == "both" else [args.target]
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    load = os.getloadavg()
    try:
        media_started = time.monotonic()
        media = prepare(args.components, _log)
        media_s = round(time.monotonic() - media_started, 1)
        site = Site(args.site, [REPO_HOST, *(TARGET_HOSTS[k] for k in kinds)])
        site.down()  # leftovers of a killed run under this name
        try:
            _log(f"bringing up site {site.name}")
            site.up()
            from tests.e2e.media import carry  # the e2e tests' way of carrying media into the drop box
            carry(site, media.bundles)
            bench = Bench(site, media, args.components, kinds, _log)
            bench.run()
        finally:
            if not args.keep_site:
                _log(f"removing site {site.name}")
                site.down()
    except (RunFailed, MediaError, WorldError, ValueError) as exc:
        print(f"lifecycle benchmark FAILED: {exc}", file=sys.stderr)
        return 1
    doc = result_doc(bench, media, kinds, started, load)
    doc["conditions"]["media_s"] = media_s
    path = append_result(args.out, doc)
    print_table(doc)
    print(f"result appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
