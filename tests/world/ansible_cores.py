"""The ansible-core series the collection claims and is tested on: one table decides it all.

- meta/runtime.yml's `requires_ansible` is exactly the table's range (tests/unit/test_versions.py);
- the first series is the test extra's pin in pyproject.toml: the project venv, molecule, and the Debian 12 jump
  host of every e2e flow run it;
- a jump host of another suite runs the newest series its python3 runs (a Debian 13 jump host: the parity flow,
  tests/e2e/test_parity.py);
- the other series need a newer Python than the machine's (Debian 12: 3.11): lint, sanity and the unit suite run
  for each in a container of the oldest Debian suite whose python3 runs it (tests/world/core_checks.py).
README.md, "ansible-core", says why these series.
"""
from __future__ import annotations

import dataclasses

from .util import WorldError

# python3 of each Debian release the world builds hosts of.
SUITE_PYTHON: dict[str, tuple[int, int]] = {"bookworm": (3, 11), "trixie": (3, 13)}


@dataclasses.dataclass(frozen=True)
class AnsibleCore:
    """One ansible-core series and the controller Pythons it supports (ansible-core's support matrix)."""

    series: str                      # "2.20"
    python_min: tuple[int, int]
    python_max: tuple[int, int]

    def requirement(self) -> str:
        major, minor = self.series.split(".")
        return f"ansible-core>={self.series},<{major}.{int(minor) + 1}"

    def runs_on(self, suite: str) -> bool:
        return self.python_min <= SUITE_PYTHON[suite] <= self.python_max

    def suite(self) -> str:
        """The oldest Debian suite whose python3 runs this series: where its checks run."""
        for suite in SUITE_PYTHON:
            if self.runs_on(suite):
                return suite
        raise WorldError(f"ansible-core {self.series}: no Debian suite of {sorted(SUITE_PYTHON)} has a python3 "
                         f"between {self.python_min} and {self.python_max}")


# Oldest first; contiguous. 2.18 is out of maintenance (end of life Nov 2026) and was dropped; 2.19 is the newest
# that runs on Debian 12's Python 3.11; 2.20 and 2.21 need Python >= 3.12 (Debian 13).
ANSIBLE_CORES: tuple[AnsibleCore, ...] = (
    AnsibleCore("2.19", (3, 11), (3, 13)),
    AnsibleCore("2.20", (3, 12), (3, 14)),
    AnsibleCore("2.21", (3, 12), (3, 14)),
)


# The suite of the jump host that proves the newest series in the world (the parity flow's; prepare builds it).
NEWEST_JUMP_SUITE = "trixie"


def claimed_range() -> str:
    """requires_ansible for meta/runtime.yml: from the oldest series to the newest, nothing else."""
    newest = ANSIBLE_CORES[-1].requirement().split(",<", 1)[1]
    return f">={ANSIBLE_CORES[0].series}.0,<{newest}.0"


def newest_for(suite: str) -> AnsibleCore:
    """The newest claimed series a host of `suite` runs (what its jump host installs)."""
    fitting = [core for core in ANSIBLE_CORES if core.runs_on(suite)]
    if not fitting:
        raise WorldError(f"no claimed ansible-core runs on {suite}'s python3 {SUITE_PYTHON.get(suite)}")
    return fitting[-1]


def extra_cores() -> tuple[AnsibleCore, ...]:
    """The series besides the test extra's pin: each gets lint, sanity and the unit suite in its own image."""
    return ANSIBLE_CORES[1:]
