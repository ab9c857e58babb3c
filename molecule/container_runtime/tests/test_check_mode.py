"""After `ansible-playbook --check` of repo_client + container_runtime on a fresh host: nothing changed."""
import os

import testinfra.utils.ansible_runner

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts("all")


def test_no_engine_installed_or_configured(host):
    for package in ("docker.io", "containerd", "runc", "docker-compose"):
        assert not host.package(package).is_installed, package
    assert not host.file("/etc/docker").exists


def test_apt_sources_untouched(host):
    assert host.file("/etc/apt/sources.list").is_file
    assert not host.file("/etc/apt/sources.list.offline-delivery.disabled").exists
    assert not host.file("/etc/apt/sources.list.d/offline-delivery.list").exists
    assert not host.file("/etc/apt/keyrings/offline-delivery.gpg").exists
