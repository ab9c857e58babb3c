"""Every molecule scenario (molecule/<name>/molecule.yml) runs its full sequence on the test world's images:
check → converge → idempotence → verify. A role's scenario is picked up here as soon as it exists."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = sorted(p.parent.name for p in (REPO / "molecule").glob("*/molecule.yml"))


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
