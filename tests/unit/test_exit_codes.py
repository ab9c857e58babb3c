"""The one exit-code contract of ``bundle-builder`` and ``offline-delivery`` (README.md, "Exit codes"):
0 done, 1 it ran and failed, 2 usage (argparse's own code, for every usage error), 130 interrupted.

The numbers are literal on purpose: they are the contract callers script against, not whatever the constants
say. rollout's waves, stops and policies: tests/unit/test_fleet_rollout.py (test_rollout_exit_codes_...).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bundle_builder import cli, fleet
from tests.helpers.bundles import copy_with_flipped_bit, members

REPO = Path(__file__).resolve().parents[2]
OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130


def command(module: str, *argv: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The command as a process (``python -m bundle_builder.<module>``): what a shell or a CI job sees."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", f"bundle_builder.{module}", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def bundle(sample_world, keypair, tmp_path: Path, capsys) -> Path:  # type: ignore[no-untyped-def]
    code = cli.main(["build", str(sample_world.write_model()), "-o", str(tmp_path / "out"),
                     "--images-from", f"oci:{sample_world.oci}", "--sign-key", str(keypair[0]), "--json"])
    out, _ = capsys.readouterr()
    assert code == OK
    return Path(json.loads(out)["path"])


# ---------------------------------------------------------------------------------------------- usage: 2


@pytest.mark.parametrize("module, argv", [
    ("cli", []),                                                      # no arguments
    ("cli", ["--bogus"]),                                             # unknown option
    ("cli", ["verify"]),                                              # a missing argument
    ("cli", ["verify", "x.bundle", "--pub", "k.pub", "--bogus"]),     # unknown option of a subcommand
    ("fleet", []),                                                    # no arguments
    ("fleet", ["--bogus"]),
    ("fleet", ["deploy", "-i", "inv.yml"]),                           # no such command
    ("fleet", ["status", "-i", "inv.yml", "--app", "shop", "--bogus"]),
    ("fleet", ["rollout"]),                                           # the case: it exited 2, "failed"
    ("fleet", ["rollout", "upgrade", "-i", "inv.yml", "--policy", "p.yml", "--app", "shop", "--bogus"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_bad_command_line_is_usage(tmp_path: Path, module: str, argv: list[str]) -> None:
    proc = command(module, *argv, cwd=tmp_path)
    assert proc.returncode == USAGE and "usage:" in proc.stderr, proc.stderr
    assert not (tmp_path / "offline-delivery-runs").exists(), "a usage error runs nothing"


def test_a_missing_file_argument_is_usage(bundle: Path, keypair: tuple[Path, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.main(["verify", str(tmp_path / "missing.bundle"), "--pub", str(keypair[1])]) == USAGE
    assert "missing.bundle does not exist" in capsys.readouterr().err
    assert cli.main(["verify", str(bundle), "--pub", str(tmp_path / "missing.pub")]) == USAGE
    assert cli.main(["inspect", str(tmp_path / "missing.bundle")]) == USAGE
    assert cli.main(["build", str(tmp_path / "missing.yml"), "-o", str(tmp_path / "o"), "--unsigned"]) == USAGE
    monkeypatch.chdir(tmp_path)
    # offline-delivery exited 64 here while argparse's usage errors exited 2 (= its "failed")
    assert fleet.main(["status", "-i", "missing.yml", "--app", "shop"]) == USAGE
    assert f"inventory {tmp_path / 'missing.yml'} does not exist" in capsys.readouterr().err
    assert fleet.main(["install", "-i", "missing.yml"]) == USAGE  # and a missing --app
    assert "install needs --app NAME" in capsys.readouterr().err
    proc = command("fleet", "status", "-i", "missing.yml", "--app", "shop", cwd=tmp_path)
    assert proc.returncode == USAGE and "does not exist" in proc.stderr


# ---------------------------------------------------------------------------------------------- failed: 1, done: 0


def test_bundle_builder_verify_ok_and_a_corrupted_bundle(bundle: Path, keypair: tuple[Path, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["verify", str(bundle), "--pub", str(keypair[1])]) == OK
    blob = [m for m in members(bundle) if m.name.startswith("blobs/")][2]
    bad = copy_with_flipped_bit(bundle, tmp_path / "bad.bundle", blob.data_offset + 3)
    capsys.readouterr()
    assert cli.main(["verify", str(bad), "--pub", str(keypair[1])]) == FAILED
    assert f"member: {blob.name}" in capsys.readouterr().err
    proc = command("cli", "verify", bad, "--pub", keypair[1], cwd=tmp_path)
    assert proc.returncode == FAILED and "FAILED" in proc.stderr
    assert command("cli", "verify", bundle, "--pub", keypair[1], cwd=tmp_path).returncode == OK


class _Run:
    def __init__(self, failed: bool) -> None:
        self.rc, self.status = (2, "failed") if failed else (0, "successful")
        self.stats = {"ok": {"node1": 3}, "failures": {"node1": 1} if failed else {}}


@pytest.mark.parametrize("failed, status, code", [
    (False, "successful", OK), (True, "failed", FAILED), (False, "timeout", FAILED),
], ids=["done", "host failed", "unfinished"])
def test_offline_delivery_a_run_done_or_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch,
                                              failed: bool, status: str, code: int) -> None:
    import ansible_runner

    def fake_run(**kw: Any) -> _Run:
        if failed:
            kw["event_handler"]({"event": "runner_on_failed",
                                 "event_data": {"host": "node1", "res": {"msg": "component api failed"}}})
        run = _Run(failed)
        run.status = status
        return run

    monkeypatch.setattr(ansible_runner, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inv.yml").write_text("all: {}\n")
    assert fleet.main(["install", "-i", "inv.yml", "--app", "shop"]) == code
    out = capsys.readouterr().out
    assert ("install done" in out) if code == OK else ("install FAILED" in out)


# ---------------------------------------------------------------------------------------------- interrupted: 130


def test_interrupted_is_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*_a: Any, **_kw: Any) -> int:
        raise KeyboardInterrupt

    def main(module: Any, *argv: str) -> int:
        try:
            return module.main(list(argv))
        except KeyboardInterrupt:  # escaping main would also stop this pytest session
            pytest.fail(f"{module.__name__}.main let the KeyboardInterrupt through")

    monkeypatch.setattr(cli, "cmd_inspect", interrupt)
    assert main(cli, "inspect", "x.bundle") == INTERRUPTED
    monkeypatch.setattr(fleet, "run", interrupt)
    assert main(fleet, "status", "-i", "inv.yml", "--app", "shop") == INTERRUPTED


# ---------------------------------------------------------------------------------------------- documented once


def test_the_readme_documents_the_codes_both_commands_use() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    documented = [int(code) for code in re.findall(r"^\| (\d+) \|", section, re.M)]
    assert documented == [OK, FAILED, USAGE, INTERRUPTED]
    for module in (cli, fleet):
        assert (module.EXIT_OK, module.EXIT_FAILED, module.EXIT_USAGE, module.EXIT_INTERRUPTED) == tuple(documented)
    # the other docs link to the section instead of keeping their own numbers (64 was one that drifted)
    for doc in ("fleet.md", "multisite.md", "status.md"):
        text = (REPO / "docs" / doc).read_text(encoding="utf-8")
        assert "../README.md#exit-codes" in text and not re.search(r"\b64 bad", text), doc
