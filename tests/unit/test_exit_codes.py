"""The one exit-code contract of ``bundle-builder`` and ``offline-delivery`` (README.md, "Exit codes"):
0 done, 1 it ran and failed, 2 usage (argparse's own code, for every usage error), 130 interrupted; kept by one
function both commands' ``main`` go through (offline_delivery_common/exits.py).

The numbers are literal on purpose: they are the contract callers script against, not whatever the constants
say. The commands run as processes (their console scripts) wherever a shell or a CI job would see the code;
the failures are real ones (a damaged bundle, an unreachable host), no runner is faked for them.
rollout's waves, stops and policies: tests/unit/test_fleet_rollout.py (test_rollout_exit_codes_...).
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

from bundle_builder import cli
from offline_delivery_cli import command as od
from offline_delivery_common import exits
from tests.helpers.bundles import copy_with_flipped_bit, members

REPO = Path(__file__).resolve().parents[2]
OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130
MODULES = {"bundle-builder": "bundle_builder.cli", "offline-delivery": "offline_delivery_cli"}


def run(name: str, *argv: object, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command as a process: its console script beside this Python (``python -m`` when not installed)."""
    exe = Path(sys.executable).with_name(name)
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", MODULES[name]]
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([*cmd, *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.fixture
def bundle(sample_world, keypair, tmp_path: Path, capsys) -> Path:  # type: ignore[no-untyped-def]
    code = cli.main(["build", str(sample_world.write_model()), "-o", str(tmp_path / "out"),
                     "--images-from", f"oci:{sample_world.oci}", "--sign-key", str(keypair[0]), "--json"])
    out, _ = capsys.readouterr()
    assert code == OK
    return Path(json.loads(out)["path"])


# ---------------------------------------------------------------------------------------------- usage: 2


@pytest.mark.parametrize("name, argv", [
    ("bundle-builder", []),                                                      # no arguments
    ("bundle-builder", ["--bogus"]),                                             # unknown option
    ("bundle-builder", ["verify"]),                                              # a missing argument
    ("bundle-builder", ["verify", "x.bundle", "--pub", "k.pub", "--bogus"]),     # unknown option of a subcommand
    ("offline-delivery", []),                                                    # no arguments
    ("offline-delivery", ["--bogus"]),
    ("offline-delivery", ["deploy", "-i", "inv.yml"]),                           # no such command
    ("offline-delivery", ["status", "-i", "inv.yml", "--app", "shop", "--bogus"]),
    ("offline-delivery", ["rollout"]),                                           # the case: it exited 2, "failed"
    ("offline-delivery", ["rollout", "upgrade", "-i", "inv.yml", "--policy", "p.yml", "--app", "shop", "--bogus"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_bad_command_line_is_usage(tmp_path: Path, name: str, argv: list[str]) -> None:
    proc = run(name, *argv, cwd=tmp_path)
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
    assert od.main(["status", "-i", "missing.yml", "--app", "shop"]) == USAGE
    assert f"inventory {tmp_path / 'missing.yml'} does not exist" in capsys.readouterr().err
    assert od.main(["install", "-i", "missing.yml"]) == USAGE  # and a missing --app
    assert "install needs --app NAME" in capsys.readouterr().err
    proc = run("offline-delivery", "status", "-i", "missing.yml", "--app", "shop", cwd=tmp_path)
    assert proc.returncode == USAGE and "does not exist" in proc.stderr


def test_offline_delivery_import_checks_its_files_before_any_run(keypair: tuple[Path, Path], tmp_path: Path) -> None:
    """A missing bundle or a vendor key that is not one is usage (2), found before ansible-runner starts: it ran
    the import playbook with them before, which then failed on the repo host (1, "the run failed")."""
    (tmp_path / "inv.yml").write_text("all: {}\n")
    (tmp_path / "usb").mkdir()
    pub = tmp_path / "usb" / "vendor.pub"
    pub.write_bytes(keypair[1].read_bytes())
    cases = [
        (["--bundle", "usb/shop-1.1.0", "--vendor-key", "usb/vendor.pub"], "shop-1.1.0 does not exist"),
        (["--bundle", "usb", "--vendor-key", "usb/missing.pub"], "cannot read it"),
        (["--bundle", "usb", "--vendor-key", str(keypair[0])], "this is a private key"),
        (["--bundle", "usb", "--vendor-key", "inv.yml"], "inv.yml"),
    ]
    for argv, message in cases:
        proc = run("offline-delivery", "import", "-i", "inv.yml", *argv, cwd=tmp_path)
        assert proc.returncode == USAGE and message in proc.stderr, (argv, proc.stderr)
        assert "offline-delivery import: error: " in proc.stderr
    assert not (tmp_path / "offline-delivery-runs").exists(), "a usage error runs nothing"


# ---------------------------------------------------------------------------------------------- failed: 1, done: 0


def test_bundle_builder_verify_ok_and_a_corrupted_bundle(bundle: Path, keypair: tuple[Path, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["verify", str(bundle), "--pub", str(keypair[1])]) == OK
    blob = [m for m in members(bundle) if m.name.startswith("blobs/")][2]
    bad = copy_with_flipped_bit(bundle, tmp_path / "bad.bundle", blob.data_offset + 3)
    capsys.readouterr()
    assert cli.main(["verify", str(bad), "--pub", str(keypair[1])]) == FAILED
    assert f"member: {blob.name}" in capsys.readouterr().err
    proc = run("bundle-builder", "verify", bad, "--pub", keypair[1], cwd=tmp_path)
    assert proc.returncode == FAILED and "FAILED" in proc.stderr
    assert run("bundle-builder", "verify", bundle, "--pub", keypair[1], cwd=tmp_path).returncode == OK


def test_bundle_builder_inspect_and_diff_of_a_damaged_bundle_fail(bundle: Path, tmp_path: Path) -> None:
    """A file that is there but is no bundle: the command ran and the check failed (1), not usage."""
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"not a tar" * 100)
    for argv in (["inspect", junk], ["diff", bundle, junk]):
        proc = run("bundle-builder", *argv, cwd=tmp_path)
        assert proc.returncode == FAILED and f"bundle-builder {argv[0]}: error: " in proc.stderr, proc.stderr
    assert run("bundle-builder", "inspect", bundle, cwd=tmp_path).returncode == OK


UNREACHABLE = """all:
  children:
    offline_repo:
      hosts:
        repo:
          ansible_host: 127.0.0.1
          ansible_port: 1
          ansible_connection: ssh
          ansible_ssh_common_args: -o ConnectTimeout=5 -o BatchMode=yes -o StrictHostKeyChecking=no
"""


def test_offline_delivery_a_real_run_with_an_unreachable_host_fails(tmp_path: Path) -> None:
    """The have playbook really runs (ansible-runner, ansible-playbook, this checkout as the collection) against
    a repo host nobody answers for: the run failed, 1."""
    link = tmp_path / "collections" / "ansible_collections" / "offline" / "delivery"
    link.parent.mkdir(parents=True)
    link.symlink_to(REPO)
    (tmp_path / "inv.yml").write_text(UNREACHABLE)
    env = {"ANSIBLE_COLLECTIONS_PATH": str(tmp_path / "collections"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    proc = run("offline-delivery", "have", "-i", "inv.yml", "--site", "north", cwd=tmp_path, env=env)
    assert proc.returncode == FAILED, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "UNREACHABLE repo" in proc.stdout and "have FAILED" in proc.stdout
    assert list((tmp_path / "offline-delivery-runs").iterdir()), "the run's artifacts are kept"


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
    assert od.main(["install", "-i", "inv.yml", "--app", "shop"]) == code
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
    monkeypatch.setattr(od, "run", interrupt)
    assert main(od, "status", "-i", "inv.yml", "--app", "shop") == INTERRUPTED
    monkeypatch.setattr(od, "rollout", interrupt)
    assert main(od, "rollout", "upgrade", "-i", "i", "--policy", "p", "--app", "shop") == INTERRUPTED


# ---------------------------------------------------------------------------------------------- one implementation


def test_both_commands_keep_the_contract_through_one_function() -> None:
    """Not two copies of the codes and the exception mapping that could drift (they did: 64 and a "failed" 2)."""
    for module in (cli, od):
        assert module.run_command is exits.run_command and module.UsageError is exits.UsageError
        source = Path(module.__file__).read_text(encoding="utf-8")
        assert not re.search(r"^EXIT_\w+.*=", source, re.M), f"{module.__name__} defines exit codes of its own"
        assert "except KeyboardInterrupt" not in source, f"{module.__name__} maps Ctrl-C itself"
    assert od.PolicyError.__mro__[1] is exits.UsageError and od.CommandFailed is exits.CommandFailed


# ---------------------------------------------------------------------------------------------- documented once


def test_the_readme_documents_the_codes_both_commands_use() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    documented = [int(code) for code in re.findall(r"^\| (\d+) \|", section, re.M)]
    assert documented == [OK, FAILED, USAGE, INTERRUPTED]
    assert (exits.EXIT_OK, exits.EXIT_FAILED, exits.EXIT_USAGE, exits.EXIT_INTERRUPTED) == tuple(documented)
    # the other docs link to the section instead of keeping their own numbers (64 was one that drifted)
    for doc in ("fleet.md", "multisite.md", "status.md"):
        text = (REPO / "docs" / doc).read_text(encoding="utf-8")
        assert "../README.md#exit-codes" in text and not re.search(r"\b64 bad", text), doc
