"""systemd_host on a fresh target, from the scenario's site repo: the `systemd` profile's unpack tools (tar,
gzip, zstd, xz-utils) installed and working, the components' system group, the root-only state directory and
the applications tree only the group can traverse."""
import os

import testinfra.utils.ansible_runner

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts("targets")

SITE_APT = "http://od-mol-sh-repo:8080/apt/debian-12"  # the scenario's offline_repo host (molecule.yml)


def test_default_packages_installed(host):
    # roles/systemd_host/vars/Debian-12.yml; a world host has only tar and gzip of these before the converge.
    for name in ("tar", "gzip", "zstd", "xz-utils"):
        assert host.package(name).is_installed, name


def test_unpack_tools_came_from_the_site_repo(host):
    for name in ("zstd", "xz-utils"):
        madison = host.check_output(f"apt-cache madison {name}").splitlines()
        assert madison and all(SITE_APT in line for line in madison), madison
        version = host.package(name).version
        assert any(line.split("|")[1].strip() == version for line in madison), (version, madison)


def test_unpack_tools_work(host):
    # What a component's image layers need: zstd- and xz-compressed tars.
    made = host.run("cd /tmp && echo layer > od-layer && tar -cf od-layer.tar od-layer "
                    "&& zstd -q -f od-layer.tar -o od-layer.tar.zst && xz -k -f od-layer.tar "
                    "&& tar --zstd -tf od-layer.tar.zst && tar -xJOf od-layer.tar.xz od-layer")
    assert made.rc == 0, made.stderr
    assert made.stdout.split() == ["od-layer", "layer"]


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
