"""The deploy engine's decisions (plan, order, gate, rollback, state) against an in-memory runtime.

The runtime here is a recorder, not a container engine: it proves what the engine asks for and in which
order. The real runtimes are proven on world hosts (tests/e2e/test_lifecycle.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from offline_delivery_core.app.engine import (Engine, HealthGateError, Target, host_status, make_plan, start_levels,
                                           uninstall)
from offline_delivery_core.app.model import ModelError, load_model
from offline_delivery_core.app.runtime import (DeployError, Observed, Runtime, desired_specs, health_budget,
                                               wait_healthy)
from offline_delivery_core.app.state import AppState

SHOP = Path(__file__).resolve().parents[2] / "examples" / "shop"
HOST = "node1"
PLATFORM = "linux/amd64"
SECRETS = {"db_password": "d" * 32, "redis_password": "r" * 32}
KEY = bytes(range(32))


def model(version: str) -> dict:
    return load_model(yaml.safe_load((SHOP / f"app-{version}.yml").read_text()))


def images(m: dict) -> dict:
    out = {}
    for name, comp in m["components"].items():
        tag = comp["image"].replace("/", "-").replace(":", "-")
        out[name] = {"reference": comp["image"], "index": "sha256:" + tag.ljust(64, "0")[:64],
                     "manifests": {PLATFORM: "sha256:" + ("m" + tag).ljust(64, "1")[:64]}}
    return out


class FakeRuntime(Runtime):
    """Keeps 'running' components in memory; `unhealthy` names components whose probe fails."""

    kind = "compose"

    def __init__(self) -> None:
        super().__init__("shop", apps_dir="/nonexistent", state_dir="/nonexistent", run=lambda argv: (0, "", ""))
        self.running: dict[str, Observed] = {}
        self.calls: list[tuple[str, list[str]]] = []
        self.unhealthy: set[str] = set()
        self.fingerprints: dict[str, str] = {}
        self.clock = 0

    def observe(self):
        return {n: Observed(o.fingerprint, o.running, o.started_at) for n, o in self.running.items()}

    def prepare(self, specs):
        self.calls.append(("prepare", [s.name for s in specs]))

    def start(self, specs, *, all_specs):
        self.calls.append(("start", [s.name for s in specs]))
        for s in specs:
            self.clock += 1
            self.running[s.name] = Observed(s.fingerprint, True, "t%d" % self.clock)
            self.fingerprints[s.name] = s.image

    def remove(self, names, *, all_specs):
        self.calls.append(("remove", list(names)))
        for n in names:
            self.running.pop(n, None)

    def probe(self, spec):
        if spec.name in self.unhealthy and self.fingerprints.get(spec.name, "").find(":1.2.0@") >= 0:
            return False, "HTTP 500"
        return True, ""

    def volume_dirs(self, spec):
        return {}

    def prune(self, keep):
        self.calls.append(("prune", sorted(keep)))
        return []

    def uninstall(self, *, keep_data):
        names = sorted(self.running)
        self.running.clear()
        return names


def engine(tmp_path: Path, rt: FakeRuntime, check: bool = False) -> Engine:
    placement = {n: [HOST] for n in model("1.0.0")["components"]}
    target = Target(host=HOST, platform=PLATFORM, registry="repo:5000", secrets=SECRETS, placement=placement,
                    addresses={HOST: "10.0.0.3"})
    return Engine(rt, AppState(str(tmp_path), "shop"), target, health_cap=1, actor="tester", check_mode=check)


def deploy(tmp_path: Path, rt: FakeRuntime, version: str, overrides=None, check: bool = False) -> dict:
    m = model(version)
    return engine(tmp_path, rt, check).deploy(version=version, model=m, images=images(m), overrides=overrides or {},
                                              snapshot=False, auto_rollback=True)


def test_install_starts_in_dependency_order_and_records_state(tmp_path: Path) -> None:
    rt = FakeRuntime()
    result = deploy(tmp_path, rt, "1.0.0")
    assert result["changed"] and result["plan"]["added"] == ["db", "redis", "api", "gateway"]
    assert [c for c in rt.calls if c[0] == "start"] == [("start", ["db", "redis"]), ("start", ["api"]),
                                                         ("start", ["gateway"])]
    state = json.loads((tmp_path / "apps" / "shop" / "state.json").read_text())
    assert state["current"]["version"] == "1.0.0" and state["current"]["by"] == "tester"
    assert oct(os.stat(tmp_path / "apps" / "shop" / "state.json").st_mode & 0o777) == "0o600"
    assert "d" * 32 not in (tmp_path / "apps" / "shop" / "state.json").read_text()


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    rt = FakeRuntime()
    deploy(tmp_path, rt, "1.0.0")
    rt.calls.clear()
    result = deploy(tmp_path, rt, "1.0.0")
    assert not result["changed"] and result["plan"]["unchanged"] == ["db", "redis", "api", "gateway"]
    assert [c for c in rt.calls if c[0] in ("start", "remove")] == []


def test_the_engine_names_the_action_and_keeps_the_overrides(tmp_path: Path) -> None:
    """install / reconfigure / upgrade is the engine's call, and overrides=None keeps the last deploy's."""
    rt = FakeRuntime()

    def run(version: str, overrides=None) -> dict:
        m = model(version)
        return engine(tmp_path, rt).deploy(version=version, model=m, images=images(m), overrides=overrides,
                                           snapshot=False, auto_rollback=True)

    assert run("1.0.0", {"api": {"SHOP_CURRENCY": "CHF"}})["action"] == "install"
    assert run("1.0.0")["action"] == "reconfigure"
    assert run("1.1.0")["action"] == "upgrade"
    assert AppState(str(tmp_path), "shop").current["overrides"] == {"api": {"SHOP_CURRENCY": "CHF"}}


def test_a_target_refusal_is_found_in_check_mode_before_anything_runs(tmp_path: Path) -> None:
    """Runtime.check runs in check mode too, so the role's check pass finds what a target refuses on every
    host before any host changes (issue #20 item 3)."""
    rt = FakeRuntime()

    def refuse(specs):
        rt.calls.append(("check", [s.name for s in specs]))
        raise DeployError("component api: replicas 2: not on this target")

    rt.check = refuse  # type: ignore[method-assign]
    with pytest.raises(DeployError, match="replicas 2"):
        deploy(tmp_path, rt, "1.0.0", check=True)
    with pytest.raises(DeployError, match="replicas 2"):
        deploy(tmp_path, rt, "1.0.0")
    assert [c[0] for c in rt.calls] == ["check", "check"], "refused before prepare or start"
    assert AppState(str(tmp_path), "shop").current is None


def test_upgrade_restarts_only_the_changed_component(tmp_path: Path) -> None:
    rt = FakeRuntime()
    deploy(tmp_path, rt, "1.0.0")
    before = dict(rt.running)
    result = deploy(tmp_path, rt, "1.1.0")
    assert result["plan"]["changed"] == ["api"]
    assert result["model_diff"]["env_defaults"]["api"]["SHOP_PAGE_SIZE"] == {"old": "20", "new": "50"}
    for name in ("db", "redis", "gateway"):
        assert rt.running[name].started_at == before[name].started_at


def test_after_a_deploy_the_host_prunes_what_no_kept_release_uses(tmp_path: Path) -> None:
    """The runtime is told the images of every release the state keeps (the rollback targets), not just the
    running one's; a release the state trims is no longer among them."""
    rt = FakeRuntime()
    deploy(tmp_path, rt, "1.0.0")
    deploy(tmp_path, rt, "1.1.0")
    kept = [c[1] for c in rt.calls if c[0] == "prune"][-1]
    both = {d for v in ("1.0.0", "1.1.0") for i in images(model(v)).values() for d in i["manifests"].values()}
    assert set(kept) == both and len(both) > len(images(model("1.1.0")))


def test_check_mode_plans_without_touching(tmp_path: Path) -> None:
    rt = FakeRuntime()
    deploy(tmp_path, rt, "1.0.0")
    rt.calls.clear()
    result = deploy(tmp_path, rt, "1.1.0", check=True)
    assert result["changed"] and result["plan"]["changed"] == ["api"]
    assert rt.calls == []
    assert json.loads((tmp_path / "apps" / "shop" / "state.json").read_text())["current"]["version"] == "1.0.0"


def test_failed_gate_rolls_back_and_names_the_component(tmp_path: Path) -> None:
    rt = FakeRuntime()
    rt.unhealthy.add("api")
    deploy(tmp_path, rt, "1.0.0")
    deploy(tmp_path, rt, "1.1.0")
    with pytest.raises(HealthGateError) as err:
        deploy(tmp_path, rt, "1.2.0")
    assert "component api failed its health check: HTTP 500" in str(err.value)
    assert "rolled back to 1.1.0" in str(err.value)
    assert ":1.1.0@" in rt.fingerprints["api"]
    state = AppState(str(tmp_path), "shop")
    assert state.current["version"] == "1.1.0"
    last = state.data["history"][-1]
    assert last["result"] == "failed" and last["component"] == "api" and last["rolled_back_to"] == "1.1.0"
    # what 1.2.0 unpacked goes with the rollback: the prune after it keeps only the kept releases' images
    assert rt.calls[-1] == ("prune", sorted(state.kept_images()))
    assert not any("-1.2.0" in d for d in rt.calls[-1][1]) and any("-1.1.0" in d for d in rt.calls[-1][1])


def test_a_slow_hosts_health_scale_stretches_each_budget_up_to_the_cap() -> None:
    health = {"start_period": 2, "retries": 6, "interval": 5, "timeout": 3}   # 50 s as the vendor timed it
    assert health_budget(health, 300) == 50 and health_budget(health, 300, 3) == 150
    assert health_budget(health, 120, 3) == 120 and health_budget(None, 300, 3) == 30

    class NeverHealthy:
        health_scale = 3   # a host that says it is three times slower

        def probe(self, spec):  # type: ignore[no-untyped-def]
            return False, "connection refused"

    spec = type("Spec", (), {"is_job": False, "health": health})()
    now = [0.0]
    ok, reason = wait_healthy(NeverHealthy(), spec, cap=300,  # type: ignore[arg-type]
                              clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert not ok and reason == "connection refused" and 148 <= now[0] <= 150


def test_rollback_to_previous_keeps_overrides(tmp_path: Path) -> None:
    rt = FakeRuntime()
    deploy(tmp_path, rt, "1.0.0", overrides={"api": {"SHOP_CURRENCY": "CHF"}})
    deploy(tmp_path, rt, "1.1.0", overrides={"api": {"SHOP_CURRENCY": "CHF"}})
    result = engine(tmp_path, rt).rollback(version=None, restore=False)
    assert result["version"] == "1.0.0" and result["plan"]["changed"] == ["api"]
    state = AppState(str(tmp_path), "shop")
    assert state.current["overrides"] == {"api": {"SHOP_CURRENCY": "CHF"}}
    assert state.previous["version"] == "1.1.0"
    again = engine(tmp_path, rt).rollback(version="1.0.0", restore=False)
    assert not again["changed"]


def test_rollback_to_a_release_never_installed_is_refused(tmp_path: Path) -> None:
    rt = FakeRuntime()
    deploy(tmp_path, rt, "1.0.0")
    with pytest.raises(DeployError, match="1.1.0 was never installed on node1"):
        engine(tmp_path, rt).rollback(version="1.1.0", restore=False)


def test_failed_first_install_is_removed(tmp_path: Path) -> None:
    rt = FakeRuntime()
    rt.unhealthy.add("api")
    with pytest.raises(HealthGateError, match="failed first install was removed"):
        deploy(tmp_path, rt, "1.2.0")
    assert rt.running == {}


def test_port_taken_by_another_program_is_refused_before_any_change(tmp_path: Path, monkeypatch) -> None:
    import offline_delivery_core.app.engine as eng
    monkeypatch.setattr(eng, "listening_tcp_ports", lambda: {8080})
    rt = FakeRuntime()
    with pytest.raises(DeployError, match=r"port\(s\) 8080 \(gateway\) already in use on node1"):
        deploy(tmp_path, rt, "1.0.0")
    assert rt.calls == []


def test_uninstall_keeps_history(tmp_path: Path) -> None:
    rt = FakeRuntime()
    deploy(tmp_path, rt, "1.0.0")
    result = uninstall(rt, AppState(str(tmp_path), "shop"), keep_data=True, actor="t", check_mode=False)
    assert result["removed"] == ["api", "db", "gateway", "redis"]
    state = AppState(str(tmp_path), "shop")
    assert state.current is None and state.data["history"][-1]["action"] == "uninstall"
    assert not uninstall(rt, state, keep_data=True, actor="t", check_mode=False)["changed"]


def test_plan_and_levels() -> None:
    m = model("1.0.0")
    specs = desired_specs(m, images(m), host=HOST, platform=PLATFORM, placement={n: [HOST] for n in m["components"]},
                          addresses={}, secrets=SECRETS, overrides={}, registry="repo:5000",
                          fingerprint_key=KEY)
    assert [[s.name for s in level] for level in start_levels(specs)] == [["db", "redis"], ["api"], ["gateway"]]
    seen = {"db": Observed(specs[0].fingerprint, True), "api": Observed("sha256:old", True),
            "redis": Observed(specs[1].fingerprint, False), "old": Observed("x", True)}
    plan = make_plan(specs, seen)
    assert plan.as_dict() == {"added": ["gateway"], "changed": ["api"], "unchanged": ["db"], "removed": ["old"],
                              "restarted": ["redis"]}


def test_dependency_on_another_host_resolves_to_its_address() -> None:
    m = model("1.0.0")
    placement = {"db": ["dbhost"], "redis": [HOST], "api": [HOST], "gateway": [HOST]}
    specs = desired_specs(m, images(m), host=HOST, platform=PLATFORM, placement=placement,
                          addresses={"dbhost": "10.0.0.9"}, secrets=SECRETS, overrides={}, registry="repo:5000",
                          fingerprint_key=KEY)
    api = next(s for s in specs if s.name == "api")
    assert api.env["DB_HOST"] == "10.0.0.9" and api.env["REDIS_HOST"] == "127.0.0.1"
    assert api.local_deps == ["redis"] and "db" not in [s.name for s in specs]


def test_a_failed_fetch_changes_nothing_and_says_so(tmp_path: Path) -> None:
    rt = FakeRuntime()
    deploy(tmp_path, rt, "1.0.0")
    before = dict(rt.running)

    def refuse(specs):
        raise DeployError("pulling the image of api (shop/api:1.1.0): manifest unknown")
    rt.prepare = refuse  # type: ignore[method-assign]
    with pytest.raises(DeployError, match="manifest unknown; nothing was changed"):
        deploy(tmp_path, rt, "1.1.0")
    assert rt.running == before
    state = AppState(str(tmp_path), "shop")
    assert state.current["version"] == "1.0.0" and state.data["history"][-1]["result"] == "failed"
    assert rt.calls[-1] == ("prune", sorted(state.kept_images()))   # a half-done fetch is removed


def test_one_change_at_a_time_per_app_and_host(tmp_path: Path) -> None:
    from offline_delivery_core.app.state import StateError, app_lock
    with app_lock(str(tmp_path), "shop", HOST, timeout=1):
        with pytest.raises(StateError, match="another deploy, rollback or uninstall of shop is running on node1"):
            with app_lock(str(tmp_path), "shop", HOST, timeout=1):
                pass
    with app_lock(str(tmp_path), "shop", HOST, timeout=1):
        pass  # released when the holder ends


class VolumeRuntime(FakeRuntime):
    """FakeRuntime whose db volume is a real directory, to prove snapshot and restore on real files."""

    def __init__(self, data: Path) -> None:
        super().__init__()
        self.data = data

    def volume_dirs(self, spec):
        return {v["name"]: str(self.data) for v in spec.volumes}


def test_snapshot_before_an_upgrade_and_restore_on_rollback(tmp_path: Path) -> None:
    data = tmp_path / "pgdata"
    data.mkdir()
    (data / "orders").write_text("1 book\n")
    rt = VolumeRuntime(data)
    state_dir = tmp_path / "state"
    target = Target(host=HOST, platform=PLATFORM, registry="repo:5000", secrets=SECRETS,
                    placement={n: [HOST] for n in model("1.0.0")["components"]}, addresses={})

    def run(version: str, **kw):
        m = model(version)
        return Engine(rt, AppState(str(state_dir), "shop"), target, health_cap=1, actor="t").deploy(
            version=version, model=m, images=images(m), overrides={}, auto_rollback=True, **kw)

    run("1.0.0", snapshot=False)
    result = run("1.1.0", snapshot=True)
    assert result["snapshot"] == {"pgdata": (state_dir / "apps/shop/snapshots/1.0.0/pgdata.tar").stat().st_size}
    assert ("remove", ["db"]) in rt.calls and rt.running["db"].running, "db stopped for the snapshot, then back"
    (data / "orders").write_text("1 book\n2 written by 1.1.0\n")
    (data / "new-in-1.1.0").write_text("x")
    engine = Engine(rt, AppState(str(state_dir), "shop"), target, health_cap=1, actor="t")
    engine.rollback(version=None, restore=True)
    assert (data / "orders").read_text() == "1 book\n" and not (data / "new-in-1.1.0").exists()
    assert oct((state_dir / "apps/shop/snapshots/1.0.0/pgdata.tar").stat().st_mode & 0o777) == "0o600"


def test_restore_without_a_snapshot_is_refused_before_any_change(tmp_path: Path) -> None:
    data = tmp_path / "pgdata"
    data.mkdir()
    (data / "orders").write_text("kept\n")
    rt = VolumeRuntime(data)
    deploy(tmp_path, rt, "1.0.0")
    deploy(tmp_path, rt, "1.1.0")
    rt.calls.clear()
    from offline_delivery_core.app.state import StateError
    with pytest.raises(StateError, match="no data snapshot of shop 1.0.0 for volume"):
        engine(tmp_path, rt).rollback(version=None, restore=True)
    assert (data / "orders").read_text() == "kept\n"
    assert rt.calls == [], "nothing was stopped"


class JobRuntime(FakeRuntime):
    """Jobs run to their end at start: ``failing`` names the commands whose run exits non-zero."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[str] = set()
        self.runs: list[str] = []

    def start(self, specs, *, all_specs):
        super().start(specs, all_specs=all_specs)
        for s in specs:
            if s.is_job:
                self.runs.append(" ".join(s.command))
                self.running[s.name].running = " ".join(s.command) not in self.failing

    def job_state(self, spec):
        return ("succeeded", "exited 0") if self.running[spec.name].running else ("failed", "exit status 1")


def with_job(version: str, command: str) -> dict:
    data = yaml.safe_load((SHOP / f"app-{version}.yml").read_text())
    data["components"]["migrate"] = {"kind": "job", "image": data["components"]["api"]["image"],
                                     "command": command.split()}
    data["components"]["api"]["depends_on"]["migrate"] = None   # a dependency on a job: completed
    return load_model(data)


def deploy_model(tmp_path: Path, rt: FakeRuntime, m: dict) -> dict:
    placement = {n: [HOST] for n in m["components"]}
    target = Target(host=HOST, platform=PLATFORM, registry="repo:5000", secrets=SECRETS, placement=placement,
                    addresses={HOST: "10.0.0.3"})
    eng = Engine(rt, AppState(str(tmp_path), "shop"), target, health_cap=1, actor="tester")
    return eng.deploy(version=m["version"], model=m, images=images(m), overrides={}, snapshot=False,
                      auto_rollback=True)


def test_a_job_runs_before_its_dependents_once_per_change(tmp_path: Path) -> None:
    rt = JobRuntime()
    result = deploy_model(tmp_path, rt, with_job("1.0.0", "migrate v1"))
    started = [name for call, names in rt.calls if call == "start" for name in names]
    assert started.index("migrate") < started.index("api")
    assert result["health"]["migrate"] == "completed" and rt.runs == ["migrate v1"]
    again = deploy_model(tmp_path, rt, with_job("1.0.0", "migrate v1"))
    assert not again["changed"] and rt.runs == ["migrate v1"]   # a succeeded job is not run again
    deploy_model(tmp_path, rt, with_job("1.1.0", "migrate v2"))
    assert rt.runs == ["migrate v1", "migrate v2"]
    status = host_status(rt, AppState(str(tmp_path), "shop"))
    assert status["components"]["migrate"] == {"running": False, "job": True, "completed": True, "healthy": True,
                                               "reason": "exited 0", "started_at": status["components"]["migrate"]
                                               ["started_at"], "as_deployed": True}


def test_a_failed_job_fails_the_deploy_and_rolls_back(tmp_path: Path) -> None:
    rt = JobRuntime()
    deploy_model(tmp_path, rt, with_job("1.0.0", "migrate v1"))
    rt.failing.add("migrate broken")
    api_before = rt.running["api"].started_at
    with pytest.raises(HealthGateError) as err:
        deploy_model(tmp_path, rt, with_job("1.1.0", "migrate broken"))
    assert "component migrate did not complete: the job failed: exit status 1" in str(err.value)
    assert "rolled back to 1.0.0" in str(err.value)
    assert rt.running["api"].started_at == api_before   # the gate stopped the upgrade before api moved
    assert rt.runs == ["migrate v1", "migrate broken", "migrate v1"]
    last = AppState(str(tmp_path), "shop").data["history"][-1]
    assert last["component"] == "migrate" and last["rolled_back_to"] == "1.0.0"


def with_reports(version: str) -> dict:
    """The shop with an optional module 'reports' (off by default) whose component needs db."""
    data = yaml.safe_load((SHOP / f"app-{version}.yml").read_text())
    data["components"]["reports"] = {"image": data["components"]["api"]["image"], "depends_on": ["db"]}
    data["modules"] = {"reports": {"components": ["reports"]}}
    return load_model(data)


def test_modules_turned_on_and_off_on_site_and_kept_across_upgrades(tmp_path: Path) -> None:
    rt = FakeRuntime()
    m = with_reports("1.0.0")

    def run(model: dict, modules=None, check: bool = False) -> dict:
        placement = {n: [HOST] for n in model["components"]}
        target = Target(host=HOST, platform=PLATFORM, registry="repo:5000", secrets=SECRETS, placement=placement,
                        addresses={HOST: "10.0.0.3"})
        eng = Engine(rt, AppState(str(tmp_path), "shop"), target, health_cap=1, actor="tester", check_mode=check)
        return eng.deploy(version=model["version"], model=model, images=images(model), overrides={},
                          snapshot=False, auto_rollback=True, modules=modules)

    result = run(m)
    assert "reports" not in rt.running and result["modules"] == {"reports": False}
    plan = run(m, {"reports": True}, check=True)
    assert plan["changed"] and plan["plan"]["added"] == ["reports"] and "reports" not in rt.running
    result = run(m, {"reports": True})
    assert result["plan"]["added"] == ["reports"] and rt.running["reports"].running
    assert not run(m)["changed"]                                   # the choice is kept
    upgraded = run(with_reports("1.1.0"))                          # and survives an upgrade
    assert "reports" in rt.running and upgraded["modules"] == {"reports": True}
    assert host_status(rt, AppState(str(tmp_path), "shop"))["modules"] == {"reports": True}
    off = run(with_reports("1.1.0"), {"reports": False})
    assert off["plan"]["removed"] == ["reports"] and "reports" not in rt.running
    with pytest.raises(ModelError, match="has no module search"):
        run(with_reports("1.1.0"), {"search": True})
    rolled = engine(tmp_path, rt).rollback(version=None, restore=False)   # to 1.0.0, reports still off
    assert rolled["version"] == "1.0.0" and "reports" not in rt.running
