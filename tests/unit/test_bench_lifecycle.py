"""The lifecycle benchmark's pure parts: the synthetic app's shape and models, its layers, result parsing."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from bench.lifecycle_app import (APP, V1, V2, answers_problem, app_model, changed_component, components,
                                 expected_answers, format_table, level_sizes, level_timeline, parse_identities,
                                 plan_lines, pull_span, recap, restart_problem, restarted, start_clock)
from offline_delivery_core.app.model import load_model


@pytest.mark.parametrize("count", [4, 5, 10, 30, 61])
def test_levels_add_up_and_each_level_depends_only_on_the_one_before(count: int) -> None:
    comps = components(count)
    assert [c.name for c in comps] == [f"c{i:02d}" for i in range(count)]
    assert sum(level_sizes(count)) == count and min(level_sizes(count)) >= 1
    level = {c.name: c.level for c in comps}
    for comp in comps:
        assert (comp.level == 0) == (not comp.deps)
        assert all(level[d] == comp.level - 1 for d in comp.deps), comp
        assert 1 <= len(comp.deps) <= 2 or comp.level == 0
    assert {c.base for c in comps} == {0, 1, 2}
    assert len({c.port for c in comps}) == count, "distinct ports: systemd components share the host network"


def test_thirty_components_have_four_levels_and_the_changed_one_has_dependents() -> None:
    comps = components(30)
    assert level_sizes(30) == [3, 6, 9, 12]
    changed = changed_component(comps)
    assert changed.level == 2
    assert any(changed.name in c.deps for c in comps), "its dependents must be seen to keep running"


def test_too_few_components_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 4"):
        components(3)


def test_models_are_valid_and_1_1_0_changes_exactly_one_component() -> None:
    one, two = app_model(30, V1), app_model(30, V2)
    for model in (one, two):
        load_model(model, source="test")
        assert model["name"] == APP and len(model["components"]) == 30
    differ = [n for n in one["components"] if one["components"][n] != two["components"][n]]
    changed = changed_component(components(30)).name
    assert differ == [changed]
    assert two["components"][changed]["image"] == f"odlc/{changed}:1.1.0"
    assert two["components"][changed]["env"]["ODLC_MODE"] == "v2"
    dependents = [n for n, spec in one["components"].items() if changed in spec.get("depends_on", {})]
    assert dependents and all(one["components"][n]["env"]["ODLC_DEPS"].split().count(changed) == 1
                              for n in dependents)


def test_expected_answers_and_their_check() -> None:
    want = expected_answers(10, V2)
    changed = changed_component(components(10)).name
    assert want[changed] == {"version": V2, "mode": "v2"}
    assert sum(1 for v in want.values() if v["version"] == V1) == 9
    seen = {n: {**v, "name": n, "deps": []} for n, v in want.items()}
    assert answers_problem(seen, want, "node1") is None
    seen[changed] = {"version": V1, "mode": "v1"}
    del seen["c00"]
    problem = answers_problem(seen, want, "node1")
    assert problem is not None and problem.startswith("node1: ")
    assert "c00 did not answer" in problem and f"{changed} says" in problem


def test_layers_are_deterministic_and_the_top_layer_differs_between_versions() -> None:
    from bench.lifecycle_images import base_layer, layer_tar, top_layer
    comp = components(30)[9]
    assert top_layer(comp, V1) == top_layer(comp, V1)
    assert top_layer(comp, V1) != top_layer(comp, V2)
    assert base_layer(0) == base_layer(0) and base_layer(0) != base_layer(1)
    with tarfile.open(fileobj=io.BytesIO(layer_tar([("opt/x/y.json", b"{}", 0o644)]))) as tar:
        members = tar.getmembers()
    assert [(m.name, m.isdir(), m.uid, m.mtime) for m in members] == [
        ("opt", True, 0, members[0].mtime), ("opt/x", True, 0, members[0].mtime), ("opt/x/y.json", False, 0,
                                                                                    members[0].mtime)]
    with tarfile.open(fileobj=io.BytesIO(top_layer(comp, V2))) as tar:
        conf = json.load(tar.extractfile("opt/odlc/component.json"))  # type: ignore[arg-type]
    assert conf == {"name": comp.name, "version": V2, "port": comp.port, "base": comp.base}


PLAY = """
TASK [offline.delivery.app : Deploy] *******
changed: [node1] => {"msg": "odlc 1.0.0 -> 1.1.0: added -; changed c09; removed -; unchanged c00, c01, c02"}
changed: [node2] => {"msg": "odlc (none) -> 1.1.0: added -; changed c09; removed -; unchanged c00, c01, c02"}
ok: [node3] => {"msg": "shop 1.0.0 -> 1.1.0: added -; changed api; removed -; unchanged db"}

PLAY RECAP *********************************************************************
node1                      : ok=12   changed=1    unreachable=0    failed=0    skipped=3    rescued=0    ignored=0
node2                      : ok=12   changed=0    unreachable=0    failed=0    skipped=3    rescued=0    ignored=0
repo                       : ok=5    changed=0    unreachable=0    failed=0    skipped=0    rescued=0    ignored=0
"""


def test_recap_and_plan_lines() -> None:
    counts = recap(PLAY)
    assert counts["node1"]["changed"] == 1 and counts["node2"]["changed"] == 0 and counts["repo"]["ok"] == 5
    plans = plan_lines(PLAY)
    assert len(plans) == 2, "only the app's own summaries"
    assert plans[0] == {"from": V1, "to": V2, "added": [], "changed": ["c09"], "removed": [],
                        "unchanged": ["c00", "c01", "c02"]}
    assert plans[1]["from"] == "(none)", "a first install"
    with pytest.raises(ValueError, match="no PLAY RECAP"):
        recap("fatal: nothing ran")


def test_identities_and_the_exactly_one_restart_check() -> None:
    before = parse_identities("c00 aaa 2026-11-22T05:00:00Z\nc01 bbb 2026-11-22T05:00:01Z\nc02 ccc t\n")
    assert before == {"c00": "aaa 2026-11-22T05:00:00Z", "c01": "bbb 2026-11-22T05:00:01Z", "c02": "ccc t"}
    after = {**before, "c01": "ddd 2026-11-22T05:10:00Z"}
    assert restarted(before, after) == ["c01"]
    assert restart_problem(before, after, ["c01"], "node1") is None
    problem = restart_problem(before, {**after, "c02": "eee later"}, ["c01"], "node1")
    assert problem == ("node1: the upgrade restarted 2 component(s), expected exactly 1 "
                       "(restarted although unchanged: c02)")
    assert "not restarted although changed: c01" in (restart_problem(before, before, ["c01"], "n") or "")
    assert "not running before and after alike: c02" in (
        restart_problem(before, {k: v for k, v in after.items() if k != "c02"}, ["c01"], "n") or "")


@pytest.mark.parametrize("text, match", [("c00\n", "expected '<component> <identity>'"),
                                         ("c00 a\nc00 b\n", "listed twice")])
def test_identities_refuse_what_hides_a_restart(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_identities(text)


def test_table() -> None:
    table = format_table([("install 1.0.0", "60.0 s", "30 components"), ("runtime", "5.0 s", "")])
    lines = table.splitlines()
    assert lines[0].split() == ["step", "wall", "time", "what", "it", "did"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].startswith("install 1.0.0  60.0 s") and lines[3].rstrip().endswith("5.0 s")


def test_start_clock_of_both_kinds() -> None:
    assert start_clock("compose", "abc 2026-11-22T05:32:24.500000123Z") == pytest.approx(1795325544.5)
    assert start_clock("systemd", "1234 5000250000") == pytest.approx(5000.25)
    with pytest.raises(ValueError, match="expected '<MainPID> <ActiveEnterTimestampMonotonic>'"):
        start_clock("systemd", "0 ")  # a unit that is not running has no start timestamp
    with pytest.raises(ValueError, match="expected '<container id> <StartedAt>'"):
        start_clock("compose", "abc")


def test_level_timeline() -> None:
    starts = {f"c{i:02d}": 100.0 + 10 * components(10)[i].level + i / 10 for i in range(10)}
    timeline = level_timeline(starts, 10, t0=90.0)
    assert [(t["level"], t["started"]) for t in timeline] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert timeline[0] == {"level": 0, "started": 1, "first_s": 10.0, "last_s": 10.0}
    assert timeline[3]["first_s"] == 40.6 and timeline[3]["last_s"] == 40.9
    assert level_timeline({"c03": 95.0}, 10, t0=90.0) == [{"level": 2, "started": 1, "first_s": 5.0,
                                                           "last_s": 5.0}]


def test_pull_span() -> None:
    out = "1000000002500000000 sha256:aa\n1000000010000000000 sha256:bb\n"
    assert pull_span(out, 1e9) == {"pulls": 2, "first_done_s": 2.5, "last_done_s": 10.0}
    assert pull_span("", 1e9) == {"pulls": 0}
    with pytest.raises(ValueError, match="expected '<TimeNano> ...'"):
        pull_span("2026-11-22 pull\n", 0)


def test_the_printed_table_has_every_step_and_the_timelines(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.lifecycle import print_table
    doc = {"date": "2026-11-22T05:00:00Z", "targets": {"compose": "node1", "systemd": "node2"},
           "app": {"components": 30, "changed": "c09", "bundle_bytes": {"odlc-1.0.0": 297e6, "odlc-1.1.0": 324096}},
           "steps_s": {"import 1.0.0": 48.1, "import 1.1.0": 20.4, "install 1.0.0": 148.5, "upgrade 1.1.0": 41.3},
           "restarted": {"node1": ["c09"], "node2": ["c09"]},
           "images_disk_after_install": {"node1": 190_000_000, "node2": 210_000_000},
           "layer_store_goals": {"install_done_s": {"node1": 27.0, "node2": 30.1}, "install_ratio": 1.11,
                                 "unique_layer_bytes": 193_000_000, "disk_ratio": 1.09, "upgrade_unpacked_layers": 1},
           "start_timeline": {"install 1.0.0": {"node1": [{"level": 0, "started": 3, "first_s": 19.5,
                                                           "last_s": 19.7}]}},
           "image_pulls": {"install 1.0.0": {"node1": {"pulls": 30, "first_done_s": 9.0, "last_done_s": 17.0}}}}
    print_table(doc)
    out = capsys.readouterr().out
    assert "node1 (compose), node2 (systemd)" in out
    assert "297 MB bundle" in out and "0.32 MB delta: c09's new top layer" in out
    assert "restarted: node1: c09; node2: c09" in out and "node2 210 MB" in out
    assert ("layer store: systemd install 1.11x the compose host's (goal <= 1.3; last start {'node1': 27.0, "
            "'node2': 30.1}); disk 1.09x the 193 MB of unique layers (goal <= 1.2); the upgrade unpacked 1 layer(s) "
            "(goal 1)") in out
    assert ("install 1.0.0 on node1, after the playbook's start: 30 image pulls done 9.0-17.0 s; "
            "level 0 (3): 19.5-19.7 s") in out


def test_exposure_lines() -> None:
    from bench.lifecycle import parse_exposure
    out = ("c00 \u2192 Overall exposure level for od-odlc-c00.service: 2.5 OK :-)\n"
           "c01 \u2192 Overall exposure level for od-odlc-c01.service: 9.6 UNSAFE \U0001f628\nc02\n")
    assert parse_exposure(out) == {"c00": 2.5, "c01": 9.6}


def test_sizes_from_du_and_docker() -> None:
    from bench.lifecycle import size_bytes
    assert size_bytes("210000000") == 210_000_000 and size_bytes("193.2MB") == 193_200_000
    assert size_bytes("1.1GB") == 1_100_000_000 and size_bytes("512kB") == 512_000
    with pytest.raises(ValueError, match="not a size"):
        size_bytes("5.4G")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """The components' server run here with this Python (its config path pointed into tmp_path)."""
    from bench.lifecycle_app import SERVER
    (tmp_path / "component.json").write_text(json.dumps({"name": "c03", "version": V1}))
    script = tmp_path / "server.py"
    script.write_text(SERVER.replace("/opt/odlc/component.json", str(tmp_path / "component.json")))
    return subprocess.Popen([sys.executable, str(script)], env={"PATH": os.environ["PATH"], **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_server_refuses_to_start_before_its_dependency(tmp_path: Path) -> None:
    port = _free_port()
    proc = _server(tmp_path, {"ODLC_PORT": str(_free_port()), "ODLC_DEPS": "c00", "C00_HOST": "127.0.0.1",
                              "C00_PORT": str(port)})
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert f"c03: dependency c00 is not healthy (http://127.0.0.1:{port}/healthz" in err and "started before it?" in err


def test_the_server_answers_once_its_dependency_does_and_stops_at_once_on_sigterm(tmp_path: Path) -> None:
    dep_port, port = _free_port(), _free_port()
    (tmp_path / "dep").mkdir()
    dep = _server(tmp_path / "dep", {"ODLC_PORT": str(dep_port)})
    proc = _server(tmp_path, {"ODLC_PORT": str(port), "ODLC_DEPS": "c00", "C00_HOST": "127.0.0.1",
                              "C00_PORT": str(dep_port), "ODLC_MODE": "v1"})
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 20
        while True:
            try:
                answer = json.load(opener.open(f"http://127.0.0.1:{port}/healthz", timeout=2))
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer within 20 s"
                time.sleep(0.2)
        assert answer == {"name": "c03", "version": V1, "mode": "v1", "deps": ["c00"]}
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0 and time.monotonic() - started < 5
    finally:
        for p in (proc, dep):
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=10)
