"""inventories/example: its layout as Ansible reads it, and the canary waves as Ansible really runs them.

The wave tests copy the target plays of the lifecycle playbooks (their `hosts:`, `serial:` and
`max_fail_percentage:` expressions, unchanged) into a playbook whose tasks only print and, for one chosen host,
fail; they run with a local connection against the example inventory and the rollout extra-vars files.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "inventories" / "example"
HOSTS = EXAMPLE / "hosts.yml"
SITE_A_TARGETS = ["a-node1", "a-node2", "a-sys1"]
SITE_B_TARGETS = ["b-node1", "b-sys1", "b-arm1"]
# Lifecycle playbook -> the name of its play that runs on the targets in waves.
WAVE_PLAYS = {"install.yml": "Deploy the release on the targets", "rollback.yml": "Roll back the targets"}


def ansible(tool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run an ansible CLI of this interpreter's environment (found beside it, not on PATH: the venv may not
    be activated)."""
    exe = Path(sys.executable).with_name(tool)
    if not exe.exists():
        pytest.fail(f"{exe} missing: install ansible-core into this Python environment (pip install -e '.[test]')")
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_RETRY_FILES_ENABLED="0",
               ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_INVENTORY_UNPARSED_WARNING="false")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def listing() -> dict:
    res = ansible("ansible-inventory", "-i", str(HOSTS), "--list")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def members(listing: dict, group: str) -> list[str]:
    """Hosts of a group, its child groups' hosts included, in inventory order."""
    entry = listing.get(group, {})
    found = list(entry.get("hosts", []))
    for child in entry.get("children", []):
        found += [h for h in members(listing, child) if h not in found]
    return found


def test_graph_shows_both_sites_and_roles() -> None:
    res = ansible("ansible-inventory", "-i", str(HOSTS), "--graph")
    assert res.returncode == 0, res.stderr
    for group in ("@site_a:", "@site_b:", "@offline_repo:", "@targets:", "@compose_hosts:", "@systemd_hosts:"):
        assert group in res.stdout
    assert "[WARNING]" not in res.stderr, res.stderr


def test_every_host_has_one_site_and_one_role(listing: dict) -> None:
    site_a, site_b = members(listing, "site_a"), members(listing, "site_b")
    assert not set(site_a) & set(site_b)
    repos, targets = members(listing, "offline_repo"), members(listing, "targets")
    assert not set(repos) & set(targets)
    assert sorted(site_a + site_b) == sorted(repos + targets)
    assert sorted(targets) == sorted(SITE_A_TARGETS + SITE_B_TARGETS)


def test_each_host_knows_its_site_and_its_own_repo_host(listing: dict) -> None:
    hostvars = listing["_meta"]["hostvars"]
    for site in ("site_a", "site_b"):
        hosts = members(listing, site)
        repos = [h for h in hosts if h in members(listing, "offline_repo")]
        assert len(repos) == 1, f"{site}: exactly one repo host, got {repos}"
        for host in hosts:
            assert hostvars[host]["offline_delivery_site"] == site
            assert hostvars[host]["offline_delivery_repo_host"] == hostvars[repos[0]]["ansible_host"]
            assert hostvars[host]["app_name"] == "shop"
    assert hostvars["b-node1"]["app_overrides"] == {"api": {"SHOP_CURRENCY": "CHF"}}
    assert "app_overrides" not in hostvars["a-node1"]


def test_the_canary_wave_covers_exactly_site_a(listing: dict) -> None:
    canary = yaml.safe_load((EXAMPLE / "rollout" / "canary.yml").read_text())
    assert canary["offline_delivery_serial"][0] == len(SITE_A_TARGETS), "wave 1 = every target of site_a"
    assert canary["offline_delivery_max_fail_percentage"] == 0


def wave_playbook(tmp_path: Path, playbook: str, fail_on: str) -> Path:
    """The lifecycle playbook's wave play with its expressions as they are, tasks replaced by a probe."""
    plays = yaml.safe_load((REPO / "playbooks" / playbook).read_text())
    play = next(p for p in plays if p.get("name") == WAVE_PLAYS[playbook])
    probe = {key: play[key] for key in ("name", "hosts", "serial", "max_fail_percentage")}
    probe.update(gather_facts=False, tasks=[
        {"name": "probe", "ansible.builtin.debug": {"msg": "wave host"}},
        {"name": "health gate", "ansible.builtin.fail": {"msg": "health gate failed"},
         "when": f"inventory_hostname == '{fail_on}'"},
        {"name": "after the gate", "ansible.builtin.debug": {"msg": "still going"}},
    ])
    path = tmp_path / playbook
    path.write_text(yaml.safe_dump([probe], sort_keys=False))
    return path


def batches(stdout: str, play_name: str) -> list[list[str]]:
    """Hosts of each serial batch, in the order the probe task ran on them."""
    parts = stdout.split(f"PLAY [{play_name}]")[1:]
    return [re.findall(r"^ok: \[([^\]]+)\] => \{\n\s+\"msg\": \"wave host\"", part, flags=re.M) for part in parts]


def run_waves(tmp_path: Path, playbook: str, rollout: str, fail_on: str = "") -> subprocess.CompletedProcess[str]:
    return ansible("ansible-playbook", "-i", str(HOSTS), str(wave_playbook(tmp_path, playbook, fail_on)),
                   "-e", f"@{EXAMPLE / 'rollout' / rollout}", "-e", "ansible_connection=local",
                   "-e", "ansible_python_interpreter=auto_silent", "-f", "2")


@pytest.mark.parametrize("playbook", sorted(WAVE_PLAYS))
@pytest.mark.parametrize("rollout", ["canary.yml", "site-by-site.yml"])
def test_waves_run_site_a_first_then_site_b(tmp_path: Path, playbook: str, rollout: str) -> None:
    res = run_waves(tmp_path, playbook, rollout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    waves = batches(res.stdout, WAVE_PLAYS[playbook])
    assert [sorted(w) for w in waves] == [sorted(SITE_A_TARGETS), sorted(SITE_B_TARGETS)], res.stdout[-3000:]


@pytest.mark.parametrize("playbook", sorted(WAVE_PLAYS))
def test_a_failing_canary_host_stops_the_rollout_before_site_b(tmp_path: Path, playbook: str) -> None:
    res = run_waves(tmp_path, playbook, "canary.yml", fail_on="a-node2")
    assert res.returncode != 0
    assert "fatal: [a-node2]" in res.stdout and "health gate failed" in res.stdout
    waves = batches(res.stdout, WAVE_PLAYS[playbook])
    assert [sorted(w) for w in waves] == [sorted(SITE_A_TARGETS)], "only the canary wave ran"
    for host in SITE_B_TARGETS:
        assert f"[{host}]" not in res.stdout, f"{host} of site_b was touched after the canary failed"


def test_without_waves_all_targets_run_in_one_batch(tmp_path: Path) -> None:
    """The default (no rollout file): compose and systemd hosts of both sites at once."""
    res = ansible("ansible-playbook", "-i", str(HOSTS), str(wave_playbook(tmp_path, "install.yml", "")),
                  "-e", "ansible_connection=local", "-e", "ansible_python_interpreter=auto_silent")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    waves = batches(res.stdout, WAVE_PLAYS["install.yml"])
    assert len(waves) == 1 and sorted(waves[0]) == sorted(SITE_A_TARGETS + SITE_B_TARGETS)


# AWX lists a project file as a playbook only when a line matches this (awx/main/utils/ansible.py,
# valid_playbook_re); a job template can select nothing else.
AWX_PLAYBOOK_LINE = re.compile(r"^\s*?-?\s*?(?:hosts|include|import_playbook):\s*?.*?$")
LIFECYCLE = ["import.yml", "runtime.yml", "install.yml", "upgrade.yml", "rollback.yml", "status.yml",
             "uninstall.yml", "verify.yml"]


@pytest.mark.parametrize("playbook", LIFECYCLE)
def test_awx_lists_the_lifecycle_playbook(playbook: str) -> None:
    lines = (REPO / "playbooks" / playbook).read_text(encoding="utf-8").splitlines()
    assert any(AWX_PLAYBOOK_LINE.match(line) for line in lines), f"AWX would not offer playbooks/{playbook}"


# offline-delivery rollout (offline_delivery_cli/command.py) runs each wave with these variables and --limit the
# wave's site groups; the same plays as above show what Ansible makes of them.
@pytest.mark.parametrize("playbook", sorted(WAVE_PLAYS))
def test_a_rollout_wave_runs_exactly_its_sites_and_every_host_finishes(tmp_path: Path, playbook: str) -> None:
    from offline_delivery_cli import command

    targets = ["a-node1", "a-sys1", "b-node1", "b-arm1"]  # two sites in one wave, not all of their targets
    extra = tmp_path / "wave.json"
    extra.write_text(json.dumps(command.wave_vars({"app_name": "shop"}, targets)))
    res = ansible("ansible-playbook", "-i", str(HOSTS), str(wave_playbook(tmp_path, playbook, "a-node1")),
                  "-e", f"@{extra}", "--limit", "site_a:site_b", "-e", "ansible_connection=local",
                  "-e", "ansible_python_interpreter=auto_silent", "-f", "4")
    assert res.returncode != 0 and "fatal: [a-node1]" in res.stdout
    waves = batches(res.stdout, WAVE_PLAYS[playbook])
    assert [sorted(w) for w in waves] == [sorted(targets)], res.stdout[-3000:]
    # max_fail_percentage 100: the failed host does not stop the others of its wave
    recap = dict(re.findall(r"^(\S+)\s+: ok=(\d+)", res.stdout, flags=re.M))
    assert {h: recap.get(h) for h in targets} == {"a-node1": "1", "a-sys1": "2", "b-node1": "2", "b-arm1": "2"}
    assert "fatal: [b-" not in res.stdout and "NO MORE HOSTS LEFT" not in res.stdout
