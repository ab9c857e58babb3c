"""scripts/bootstrap on a pristine Debian 12: its package step installs every tool, and each of them works.

This is what keeps the README's two commands honest: CI's machine has packages installed long ago, a user's
fresh machine has none. tests/world/fresh.py says how the pristine machine is made.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.world.fresh import fresh_check


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_bootstrap_sets_up_a_pristine_debian_12() -> None:
    if os.geteuid() != 0 or shutil.which("mmdebstrap") is None:
        pytest.skip("needs root and mmdebstrap (scripts/bootstrap installs it) for the pristine root filesystem")
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        pytest.skip("the qemu-aarch64 binfmt handler is not registered (scripts/bootstrap registers it)")
    result = fresh_check()
    assert result.packages_rc == 0, result.output[-4000:]
    assert result.smoke_rc == 0, result.output[-4000:]
    assert "bootstrap: installing" in result.output, "the pristine root filesystem already had every package?"
    assert "bootstrap smoke: every tool works" in result.output
