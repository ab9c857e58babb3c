"""The one skip rule: under CI=true a skip fails the run unless tests/ci_skips.yml allows that test."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, allowed_ci_skips

PROBE = '''
import pytest
def test_skips():
    pytest.skip("no engine here")
@pytest.mark.skipif(True, reason="marked away")
def test_marked():
    pass
def test_passes():
    pass
'''


def _run_probe(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {"PATH": "/usr/bin:/bin", **({"CI": ci} if ci is not None else {})}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(tmp_path), str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_a_skip_under_ci_fails_naming_its_reason(tmp_path: Path) -> None:
    proc = _run_probe(tmp_path, "true")
    assert proc.returncode == 1, proc.stdout
    assert "1 failed, 1 passed, 1 error" in proc.stdout, proc.stdout
    assert "skipped under CI=true" in proc.stdout and "no engine here" in proc.stdout and "marked away" in proc.stdout


def test_outside_ci_a_skip_is_a_skip(tmp_path: Path) -> None:
    proc = _run_probe(tmp_path, None)
    assert proc.returncode == 0 and "1 passed, 2 skipped" in proc.stdout, proc.stdout


def test_every_allowed_skip_names_a_test_that_exists() -> None:
    allowed = allowed_ci_skips()
    assert 0 < len(allowed) <= 5, "the allowlist is meant to stay short"
    for nodeid, reason in allowed.items():
        path, _, name = nodeid.partition("::")
        assert (ROOT / path).is_file(), nodeid
        tree = ast.parse((ROOT / path).read_text())
        assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, nodeid
        assert len(reason) > 20, nodeid


def test_a_bad_entry_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.conftest as root_conftest
    bad = tmp_path / "ci_skips.yml"
    bad.write_text("- test: tests/unit/test_x.py::test_y\n  reason: because\n")
    monkeypatch.setattr(root_conftest, "CI_SKIPS", bad)
    with pytest.raises(pytest.UsageError, match="remove_when"):
        allowed_ci_skips()
