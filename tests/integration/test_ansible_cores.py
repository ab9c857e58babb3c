"""Lint, sanity and the unit suite on every claimed ansible-core besides the test extra's pin.

meta/runtime.yml claims the series of tests/world/ansible_cores.py. The test extra's pin runs everything in the
project venv; each other series needs Python >= 3.12, which this Debian 12 machine lacks, so its checks run in a
Debian 13 container with a venv of the test extra and that series (tests/world/core_checks.py): scripts/lint
(ansible-lint, ansible-test sanity on Python 3.13) and `pytest tests/unit` with CI=true, on the checkout as it is.
scripts/test runs this file as a session of its own, beside the two others.
"""
from __future__ import annotations

import os
import re
import shutil

import pytest

from tests.world.ansible_cores import AnsibleCore, extra_cores
from tests.world.core_checks import run_checks
from tests.world.util import docker


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("core", extra_cores(), ids=lambda core: f"ansible-core-{core.series}")
def test_lint_sanity_and_unit_suite_pass_on(core: AnsibleCore) -> None:
    if os.geteuid() != 0 or shutil.which("mmdebstrap") is None or docker("info", timeout=30).rc != 0:
        pytest.skip("needs root, mmdebstrap and a Docker engine (scripts/bootstrap) for the check image")
    result = run_checks(core)
    out = result.output
    assert result.rc == 0, f"ansible-core {core.series}: lint, sanity or the unit suite failed:\n{out[-8000:]}"
    version = re.search(r"^ansible-core (\S+) on Python (\S+)", out, re.M)
    assert version and version.group(1).startswith(f"{core.series}."), out[:2000]
    assert "lint: ansible-lint" in out and "lint: ansible-test sanity" in out, out[-4000:]
    summary = re.search(r"^(\d+) passed(?:, (\d+) \w+)*? in ", out, re.M)
    assert summary and int(summary.group(1)) > 0, out[-4000:]
    assert not re.search(r"\d+ (failed|skipped|error)", out.splitlines()[-1]), out[-4000:]
