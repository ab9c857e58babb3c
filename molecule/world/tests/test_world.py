"""Testinfra checks of the molecule wiring: systemd PID 1 booted, the converge's file, the right arch."""
import os

import testinfra.utils.ansible_runner

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts("all")


def test_systemd_is_pid1_and_booted(host):
    assert host.file("/proc/1/comm").content_string.strip() == "systemd"
    state = host.run("systemctl is-system-running").stdout.strip()
    assert state == "running", state


def test_marker_written_by_converge(host):
    marker = host.file("/etc/od-molecule-marker")
    assert marker.is_file and marker.mode == 0o644


def test_arch_matches_platform(host):
    expected = "aarch64" if host.backend.get_hostname().endswith("arm64") else "x86_64"
    assert host.system_info.arch == expected
