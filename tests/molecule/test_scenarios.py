"""Every molecule scenario (molecule/<name>/molecule.yml) runs its full sequence on the test world's images:
check → converge → idempotence → verify. A role's scenario is picked up here as soon as it exists, and
test_every_scenario_runs_the_full_sequence holds each scenario's test_sequence to that claim."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = sorted(p.parent.name for p in (REPO / "molecule").glob("*/molecule.yml"))
# What "full sequence" means: fresh instances, check mode, converge, idempotence, verify.
FULL = ["destroy", "create", "prepare", "check", "converge", "idempotence", "verify", "destroy"]


def _can_run() -> str | None:
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True,
                                                        timeout=30, check=False).returncode != 0:
        return "no running Docker engine"
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        return "qemu-aarch64 binfmt is not enabled (scripts/bootstrap enables it)"
    return None


@pytest.mark.world
@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_molecule_scenario(scenario: str) -> None:
    reason = _can_run()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run(["make", "-s", "molecule", f"SCENARIO={scenario}"], cwd=REPO, capture_output=True,
                          text=True, timeout=1700, check=False)
    assert proc.returncode == 0, f"molecule test -s {scenario} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"


def test_scenarios_are_found() -> None:
    assert "world" in SCENARIOS, f"molecule scenarios found: {SCENARIOS}"


def _sequence(scenario: str) -> list[str]:
    """The scenario's test_sequence as molecule runs it: its own, else molecule/base.yml's."""
    base = yaml.safe_load((REPO / "molecule" / "base.yml").read_text(encoding="utf-8"))
    own = yaml.safe_load((REPO / "molecule" / scenario / "molecule.yml").read_text(encoding="utf-8")) or {}
    return list((own.get("scenario") or {}).get("test_sequence") or base["scenario"]["test_sequence"])


def test_base_sequence_is_the_full_one() -> None:
    assert _sequence("world") == FULL


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_scenario_runs_the_full_sequence(scenario: str) -> None:
    """No scenario quietly drops converge or idempotence (a scenario may only add its dependency step first)."""
    sequence = _sequence(scenario)
    if sequence[:1] == ["dependency"]:
        sequence = sequence[1:]
    assert sequence == FULL, f"molecule/{scenario}/molecule.yml runs {sequence}, not the full sequence {FULL}"
    assert (REPO / "molecule" / scenario / "converge.yml").is_file()
    assert list((REPO / "molecule" / scenario / "tests").glob("test_*.py")), f"{scenario}: nothing to verify"
