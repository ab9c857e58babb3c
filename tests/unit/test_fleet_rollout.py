"""offline-delivery rollout (offline_delivery_cli/command.py): the policy file, its checks against the inventory,
the waves as they are run (ansible-runner faked, the inventory read by the real ansible-inventory) and the report.

The real thing on two world sites: tests/e2e/test_multisite.py (rollout tests).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from offline_delivery_cli import command
from offline_delivery_common import exits

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "inventories" / "example"

# Three sites, each a repo host and targets; site_z has two targets.
THREE_SITES = {"all": {"children": {
    "site_x": {"hosts": {"x-repo": None, "x-node1": None}},
    "site_y": {"hosts": {"y-repo": None, "y-node1": None}},
    "site_z": {"hosts": {"z-repo": None, "z-node1": None, "z-sys1": None}},
    "offline_repo": {"hosts": {"x-repo": None, "y-repo": None, "z-repo": None}},
    "compose_hosts": {"hosts": {"x-node1": None, "y-node1": None, "z-node1": None}},
    "systemd_hosts": {"hosts": {"z-sys1": None}},
}}}
HEALTH_FAILED = ("shop 1.1.0 on {host}: component api failed its health check: HTTP GET http://{host}:8000/healthz "
                 "answered 'HTTP/1.0 500 Internal Server Error'; rolled back to 1.0.0, which is healthy")


def policy(*waves: list[str], canary: bool = True, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"waves": [{"site_groups": list(w)} for w in waves], **extra}
    if canary:
        doc["waves"][0]["canary"] = True
    return doc


# ---------------------------------------------------------------------------------------------- the policy file


def test_a_valid_policy_is_read_in_order() -> None:
    p = command.parse_policy(policy(["site_x"], ["site_y", "site_z"], max_failed_sites=1), "p.yml")
    assert [(w.number, w.site_groups, w.canary) for w in p.waves] == [
        (1, ("site_x",), True), (2, ("site_y", "site_z"), False)]
    assert p.max_failed_sites == 1 and p.target_groups == command.DEFAULT_TARGET_GROUPS
    assert [w.label for w in p.waves] == ["1 canary", "2"]


def test_the_example_policy_fits_the_example_inventory() -> None:
    path = EXAMPLE / "rollout" / "policy.yml"
    p = command.load_policy(path)
    plans = command.plan_sites(p, command.read_inventory(EXAMPLE / "hosts.yml"), str(path))
    assert [(s.group, s.wave.label, s.targets) for s in plans] == [
        ("site_a", "1 canary", ("a-node1", "a-node2", "a-sys1")),
        ("site_b", "2", ("b-node1", "b-sys1", "b-arm1"))]
    assert plans[0].members == ("a-repo", "a-node1", "a-node2", "a-sys1")


@pytest.mark.parametrize("doc, message", [
    ([], "p.yml: expected a mapping with 'waves'"),
    ({"waves": []}, "p.yml: waves: expected a non-empty list"),
    ({"waves": [{"site_groups": ["a"]}], "max_fail": 1}, "p.yml: unknown key(s) max_fail (allowed: waves,"),
    ({"waves": [{"site_groups": ["a"], "serial": 2}]}, "p.yml: waves[0]: unknown key(s) serial (allowed: site_groups"),
    ({"waves": [["a"]]}, "p.yml: waves[0]: expected a mapping {site_groups: [GROUP, ...]}"),
    ({"waves": [{"site_groups": []}]}, "p.yml: waves[0].site_groups: expected a non-empty list of site groups"),
    ({"waves": [{"site_groups": "site_a"}]}, "p.yml: waves[0].site_groups: expected a non-empty list"),
    ({"waves": [{"site_groups": ["a"], "canary": "yes"}]}, "p.yml: waves[0].canary: expected true or false"),
    (policy(["a"], ["b"]) | {"waves": [{"site_groups": ["a"]}, {"site_groups": ["b"], "canary": True}]},
     "p.yml: waves[1].canary: only the first wave can be the canary"),
    (policy(["a"], ["b", "a"]), "p.yml: waves[1].site_groups[1]: site group a is already in waves[0].site_groups[0]"),
    (policy(["a", "a"]), "p.yml: waves[0].site_groups[1]: site group a is already in waves[0].site_groups[0]"),
    (policy(["a"], max_failed_sites=-1), "p.yml: max_failed_sites: expected a whole number >= 0, got -1"),
    (policy(["a"], max_failed_sites=True), "p.yml: max_failed_sites: expected a whole number >= 0, got True"),
    (policy(["a"], target_groups=[]), "p.yml: target_groups: expected a non-empty list"),
])
def test_a_bad_policy_is_refused_naming_the_field(doc: Any, message: str) -> None:
    with pytest.raises(command.PolicyError, match=re.escape(message)):
        command.parse_policy(doc, "p.yml")


def test_a_policy_that_is_not_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.yml"
    path.write_text("waves: [site_a\n")
    with pytest.raises(command.PolicyError, match=re.escape(f"policy {path}: not valid YAML")):
        command.load_policy(path)
    with pytest.raises(command.PolicyError, match=re.escape(f"policy {tmp_path / 'missing.yml'}: cannot read it")):
        command.load_policy(tmp_path / "missing.yml")


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inv") / "hosts.yml"
    path.write_text(yaml.safe_dump(THREE_SITES))
    return path


@pytest.mark.parametrize("doc, message", [
    (policy(["site_x"], ["site_w"]), "waves[1].site_groups[0]: site_w is not a group of the inventory (its groups: "),
    (policy(["site_x"], ["offline_repo"]),
     "waves[1].site_groups[0]: site group offline_repo has no host in the target groups"),
    (policy(["site_x", "compose_hosts"]),
     "waves[0].site_groups[1]: host x-node1 is in site group compose_hosts and in site_x; a site goes in exactly one"),
    (policy(["site_x"], target_groups=["k8s"]), "target_groups: none of k8s is a group of the inventory"),
])
def test_a_policy_that_does_not_fit_the_inventory_is_refused(three_sites: Path, doc: Any, message: str) -> None:
    inv = command.read_inventory(three_sites)
    with pytest.raises(command.PolicyError, match=re.escape(message)):
        command.plan_sites(command.parse_policy(doc, "p.yml"), inv, "p.yml")


# ---------------------------------------------------------------------------------------------- the waves, run


class FakeRunner:
    """Stands in for ansible_runner.run: records each call, fails the hosts asked for, and for the status
    playbook writes the report the app role would (host -> version, health)."""

    def __init__(self, fail: dict[str, str], running: dict[str, tuple[str, bool]]) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail, self.running = fail, running

    def __call__(self, **kw: Any) -> Any:
        self.calls.append(kw)
        assert not Path(kw["private_data_dir"], "env").exists(), "each run gets a fresh private data dir"
        handler, limit = kw["event_handler"], kw["limit"].split(":")
        in_play = kw["extravars"]["offline_delivery_app_hosts"].split(",")
        failures = {}
        for host in in_play:
            if host in self.fail and kw["playbook"] != "offline.delivery.status":
                failures[host] = 1
                handler({"event": "runner_on_failed", "event_data": {"host": host, "res": {"msg": self.fail[host]}}})
        if kw["playbook"] == "offline.delivery.status":
            report = {"app": "shop", "hosts": {h: {"site": "?", "reachable": True, "status": {
                "installed": True, "version": self.running[h][0], "healthy": self.running[h][1],
                "components": {"api": {"healthy": self.running[h][1], "reason": "HTTP 200" if self.running[h][1]
                                       else "connection refused"}}}} for h in in_play if h in self.running}}
            out = Path(kw["extravars"]["app_report_dir"])
            out.mkdir(parents=True)
            (out / "shop-status.json").write_text(json.dumps(report))
        allowed = {h for g in limit for h in THREE_SITES["all"]["children"][g]["hosts"]}
        assert set(in_play) <= allowed, "a host outside the --limit"

        class R:
            rc = 2 if failures else 0
            status = "failed" if failures else "successful"
            stats = {"ok": {h: 3 for h in in_play}, "failures": failures}
        return R()


def run_rollout(tmp_path: Path, inventory: Path, doc: dict[str, Any], runner: FakeRunner,
                monkeypatch: pytest.MonkeyPatch, *extra: str) -> tuple[int, list[str]]:
    import ansible_runner
    monkeypatch.setattr(ansible_runner, "run", runner)
    (tmp_path / "policy.yml").write_text(yaml.safe_dump(doc))
    lines: list[str] = []
    args = command.parse_rollout_args(["upgrade", "-i", str(inventory), "--policy", "policy.yml", "--app", "shop",
                                     "--version", "1.1.0", *extra])
    return command.rollout(args, write=lines.append, cwd=tmp_path), lines


def table(lines: list[str]) -> dict[str, list[str]]:
    """The report's rows by site (the fleet table: APP VERSION HEALTH LAST-FAILURE LAG AGE NOTE), columns split
    on two spaces or more."""
    start = next(i for i, ln in enumerate(lines) if ln.startswith("SITE "))
    rows = {}
    for line in lines[start + 1:]:
        if not line.startswith("site_"):
            break
        cells = re.split(r"\s{2,}", line)
        rows[cells[0]] = cells[1:]
    return rows


def test_a_failed_second_wave_stops_the_rollout_and_every_site_is_reported(
        tmp_path: Path, three_sites: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = FakeRunner(fail={"y-node1": HEALTH_FAILED.format(host="y-node1")},
                        running={"x-node1": ("1.1.0", True), "y-node1": ("1.0.0", True),
                                 "z-node1": ("1.0.0", True), "z-sys1": ("1.0.0", True)})
    rc, lines = run_rollout(tmp_path, three_sites, policy(["site_x"], ["site_y"], ["site_z"]), runner, monkeypatch)
    assert rc == command.EXIT_FAILED
    plays = [(Path(c["private_data_dir"]).name, c["playbook"], c["limit"],
              c["extravars"]["offline_delivery_app_hosts"]) for c in runner.calls]
    assert plays == [("wave1", "offline.delivery.upgrade", "site_x", "x-node1"),
                     ("wave2", "offline.delivery.upgrade", "site_y", "y-node1"),
                     ("status", "offline.delivery.status", "site_x:site_y:site_z", "x-node1,y-node1,z-node1,z-sys1")]
    first = runner.calls[0]["extravars"]
    assert first == {"app_name": "shop", "app_version": "1.1.0", "offline_delivery_app_hosts": "x-node1",
                     "offline_delivery_serial": "100%", "offline_delivery_max_fail_percentage": 100}
    assert "app_version" not in runner.calls[2]["extravars"]
    rows = table(lines)
    assert rows == {"site_x": ["shop", "1.1.0", "1/1", "-", "-", "-", "wave 1 canary: done"],
                    "site_y": ["shop", "1.0.0", "1/1", "api failed, rolled back to 1.0.0", "behind 1.1.0", "-",
                               "wave 2: FAILED"],
                    "site_z": ["shop", "1.0.0", "2/2", "-", "behind 1.1.0", "-", "wave 3: not started"]}
    assert f"  site_y: y-node1: {HEALTH_FAILED.format(host='y-node1')}" in lines
    assert lines[-1] == ("rollout upgrade STOPPED: 1 failed site(s) (site_y), more than max_failed_sites 0; "
                         "later waves not started")
    top = Path(next(ln for ln in lines if ln.startswith("artifacts (keep for support): ")).split(": ", 1)[1])
    assert top.parent == tmp_path / "offline-delivery-runs"
    assert top.name.endswith(f"-rollout-upgrade-{command.os.getpid()}")
    assert sorted(p.name for p in top.iterdir()) == ["report", "status", "wave1", "wave2"]


def test_a_failed_canary_stops_even_when_failures_are_tolerated(
        tmp_path: Path, three_sites: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = FakeRunner(fail={"x-node1": HEALTH_FAILED.format(host="x-node1")},
                        running={h: ("1.0.0", True) for h in ("x-node1", "y-node1", "z-node1", "z-sys1")})
    rc, lines = run_rollout(tmp_path, three_sites, policy(["site_x"], ["site_y", "site_z"], max_failed_sites=2),
                            runner, monkeypatch)
    assert rc == command.EXIT_FAILED and len(runner.calls) == 2  # the canary wave and the status run
    assert not any(ln.startswith("not in the policy") for ln in lines)
    rows = table(lines)
    assert rows["site_x"][3] == "api failed, rolled back to 1.0.0" and rows["site_x"][-1] == "wave 1 canary: FAILED"
    assert rows["site_z"] == ["shop", "1.0.0", "2/2", "-", "behind 1.1.0", "-", "wave 2: not started"]
    assert lines[-1] == "rollout upgrade STOPPED: the canary wave failed (site_x); later waves not started"
    assert [ln for ln in lines if ln.startswith("== Wave")] == ["== Wave 1 canary: site_x"]


def test_tolerated_failures_let_later_waves_run_and_still_fail_the_command(
        tmp_path: Path, three_sites: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # z-sys1 fails without a rollback (e.g. unreachable): site_z has mixed versions and an unhealthy host
    runner = FakeRunner(fail={"y-node1": HEALTH_FAILED.format(host="y-node1"), "z-sys1": "Failed to connect"},
                        running={"x-node1": ("1.1.0", True), "y-node1": ("1.0.0", True),
                                 "z-node1": ("1.1.0", True), "z-sys1": ("1.0.0", False)})
    rc, lines = run_rollout(tmp_path, three_sites, policy(["site_x"], ["site_y"], ["site_z"], max_failed_sites=2),
                            runner, monkeypatch)
    assert rc == command.EXIT_FAILED and len(runner.calls) == 4
    rows = table(lines)
    assert rows["site_z"] == ["shop", "MIXED 1.0.0 (z-sys1), 1.1.0 (z-node1)", "1/2 (not: z-sys1/api)",
                              "z-sys1 failed", "behind 1.1.0", "-", "wave 3: FAILED"]
    assert "  site_z: z-sys1: Failed to connect" in lines
    assert "  site_z: unhealthy z-sys1/api: connection refused" in lines
    assert lines[-1] == "rollout upgrade finished with failed site(s): site_y, site_z"


def test_a_rollout_without_failures_runs_every_wave(
        tmp_path: Path, three_sites: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = FakeRunner(fail={}, running={h: ("1.1.0", True) for h in ("x-node1", "y-node1", "z-node1", "z-sys1")})
    rc, lines = run_rollout(tmp_path, three_sites, policy(["site_x"], ["site_y", "site_z"], canary=False),
                            runner, monkeypatch, "--check")
    assert rc == command.EXIT_OK and len(runner.calls) == 3
    assert runner.calls[1]["limit"] == "site_y:site_z" and runner.calls[1]["cmdline"] == "--check"
    assert runner.calls[2]["cmdline"] is None, "the status run is never in check mode"
    assert [row[-1] for row in table(lines).values()] == ["wave 1: done", "wave 2: done", "wave 2: done"]
    assert all(row[1] == "1.1.0" and row[4] == "-" for row in table(lines).values())
    assert lines[-1] == "rollout upgrade done on every site (check mode: nothing changed)"
    assert [ln for ln in lines if ln.startswith("== Wave")] == ["== Wave 1: site_x", "== Wave 2: site_y, site_z"]


def test_a_site_without_a_status_is_reported_unknown() -> None:
    wave = command.Wave(1, ("site_x",), True)
    plan = command.SitePlan("site_x", wave, ("x-node1", "x-node2"), ("x-repo", "x-node1", "x-node2"))
    states = {"site_x": command.SiteState("site_x", wave, outcome="done")}
    command.apply_status(states, [plan], {"hosts": {"x-node1": {"status": {
        "version": "1.1.0", "healthy": True, "installed": True,
        "components": {"api": {"healthy": True}, "db": {"healthy": True}}}},
        "x-node2": {"reachable": False, "status": None}}})
    lines = command.report_lines(list(states.values()), "shop", None)
    assert table(lines)["site_x"] == ["shop", "1.1.0", "2/2", "-", "-", "-",
                                      "unreachable: x-node2; wave 1 canary: done"]
    assert lines[-1].startswith("  site_x: no status from x-node2")
    command.apply_status(states := {"site_x": command.SiteState("site_x", wave)}, [plan], None)
    lines = command.report_lines(list(states.values()), "shop", "1.1.0")
    assert table(lines)["site_x"] == ["shop", "not installed", "-", "-", "-", "-",
                                      "unreachable: x-node1, x-node2; wave 1 canary: not started"]


def test_rollout_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    args = command.parse_rollout_args(["rollback", "-i", "i", "--policy", "p", "--app", "shop", "--version", "1.0.0",
                                     "-e", "app_restore_snapshot=true"])
    assert command.rollout_vars(args) == {"app_name": "shop", "app_rollback_version": "1.0.0",
                                        "app_restore_snapshot": True}
    args = command.parse_rollout_args(["upgrade", "-i", "i", "--policy", "p", "--app", "shop",
                                     "-e", "offline_delivery_serial=[1]"])
    with pytest.raises(command.UsageError, match="the rollout sets it per wave from the policy"):
        command.rollout_vars(args)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inv.yml").write_text("all: {}\n")
    assert command.main(["rollout", "upgrade", "-i", "inv.yml", "--policy", "nope.yml", "--app", "shop"]) == \
        exits.EXIT_USAGE
    assert f"policy {tmp_path / 'nope.yml'}: cannot read it" in capsys.readouterr().err


def test_targets_outside_the_policy_are_named(tmp_path: Path, three_sites: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    runner = FakeRunner(fail={}, running={h: ("1.1.0", True) for h in ("x-node1", "y-node1")})
    rc, lines = run_rollout(tmp_path, three_sites, policy(["site_x"], ["site_y"]), runner, monkeypatch)
    assert rc == command.EXIT_OK
    assert "not in the policy (neither changed nor reported): z-node1, z-sys1" in lines
    assert all("z-" not in c["extravars"]["offline_delivery_app_hosts"] for c in runner.calls)


# ---------------------------------------------------------------------------------------------- exit codes


def test_rollout_exit_codes_follow_the_one_contract(tmp_path: Path, three_sites: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """README.md "Exit codes", literal numbers on purpose: 0 every site done, 1 a stop or a (tolerated) failed
    site or a missing tool, 2 usage (argparse's own code: also for a policy or inventory that is wrong)."""
    import ansible_runner
    monkeypatch.chdir(tmp_path)
    every = ("x-node1", "y-node1", "z-node1", "z-sys1")
    runs: list[str] = []

    def rollout(doc: dict[str, Any] | None, runner: FakeRunner | None = None, *argv: str) -> int:
        if doc is not None:
            (tmp_path / "policy.yml").write_text(yaml.safe_dump(doc))
        if runner is not None:
            monkeypatch.setattr(ansible_runner, "run", runner)
        runs.append(f"runs{len(runs)}")  # two rollouts in one second would share a run directory
        return command.main(["rollout", "upgrade", "-i", str(three_sites), "--policy", "policy.yml", "--app", "shop",
                           "--version", "1.1.0", "--runs-dir", runs[-1], *argv])

    assert rollout(policy(["site_x"], ["site_y", "site_z"]), FakeRunner({}, {h: ("1.1.0", True) for h in every})) == 0
    canary_fails = FakeRunner({"x-node1": HEALTH_FAILED.format(host="x-node1")}, {h: ("1.0.0", True) for h in every})
    assert rollout(None, canary_fails) == 1 and capsys.readouterr().out.rstrip().endswith(
        "later waves not started")
    tolerated = FakeRunner({"y-node1": HEALTH_FAILED.format(host="y-node1")},
                           {h: ("1.1.0", True) for h in every} | {"y-node1": ("1.0.0", True)})
    assert rollout(policy(["site_x"], ["site_y"], ["site_z"], max_failed_sites=1), tolerated) == 1
    assert capsys.readouterr().out.rstrip().endswith("finished with failed site(s): site_y")

    nothing_runs = FakeRunner({}, {})
    monkeypatch.setattr(ansible_runner, "run", nothing_runs)
    assert rollout(policy(["site_x"], ["site_w"])) == 2  # the policy does not fit the inventory
    assert "site_w is not a group of the inventory" in capsys.readouterr().err
    (tmp_path / "policy.yml").unlink()
    assert rollout(None) == 2 and "policy.yml: cannot read it" in capsys.readouterr().err
    assert command.main(["rollout", "upgrade", "-i", "missing.yml", "--policy", "p.yml", "--app", "shop"]) == 2
    for argv in ([], ["upgrade"], ["deploy", "-i", "i", "--policy", "p", "--app", "shop"],
                 ["upgrade", "-i", "i", "--policy", "p", "--app", "shop", "--serial", "1"]):
        with pytest.raises(SystemExit) as exc:
            command.main(["rollout", *argv])
        assert exc.value.code == 2, argv
        assert "usage: offline-delivery rollout" in capsys.readouterr().err
    assert nothing_runs.calls == [], "a usage error runs no playbook"

    def no_ansible_inventory(*_a: Any, **_kw: Any) -> Any:
        raise FileNotFoundError("ansible-inventory")
    monkeypatch.setattr(command.subprocess, "run", no_ansible_inventory)
    assert rollout(policy(["site_x"])) == 1  # right arguments, a tool missing: a failure, not usage
    assert "ansible-inventory not found" in capsys.readouterr().err
