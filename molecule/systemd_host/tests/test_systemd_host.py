"""systemd_host: the components' group, the root-only state directory, the applications tree."""
import os

import testinfra.utils.ansible_runner

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts("all")


def test_shared_group_is_a_system_group(host):
    group = host.group("od-apps")
    assert group.exists
    assert group.gid < 1000, group.gid


def test_state_dir_root_only(host):
    state = host.file("/var/lib/offline-delivery")
    assert state.is_directory and state.user == "root" and state.group == "root" and state.mode == 0o700


def test_apps_dir_traversable_by_the_group_only(host):
    apps = host.file("/srv/offline-delivery-apps")
    assert apps.is_directory and apps.user == "root" and apps.group == "od-apps" and apps.mode == 0o750


def test_unpack_tools_present(host):
    for tool in ("tar", "gzip"):
        assert host.exists(tool), tool
