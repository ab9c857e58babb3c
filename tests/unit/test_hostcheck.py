"""What a host offers each target kind (targets/hostcheck.py, module host_targets), read from a fake root: a
Debian host with Docker, a foreign host (openEuler, no apt, no Docker) that still takes the systemd target, and
hosts lacking one thing each, named in the report."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from offline_delivery_core.targets import hostcheck
from offline_delivery_core.targets.hostcheck import SYSTEMD_COMMANDS, host_report, os_release, overlay_support

OPENEULER = 'NAME="openEuler"\nVERSION="22.03 (LTS-SP3)"\nID="openEuler"\nVERSION_ID="22.03"\nID_LIKE="rhel fedora"\n'
DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'
FILESYSTEMS = "nodev\tsysfs\nnodev\ttmpfs\n\text4\nnodev\toverlay\n"


def make_root(tmp_path: Path, release: str, filesystems: str = FILESYSTEMS, booted: bool = True) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text(release)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/filesystems").write_text(filesystems)
    if booted:
        (tmp_path / "run/systemd/system").mkdir(parents=True)
    return tmp_path


class Host:
    """`which` over a set of commands and `run` answering systemctl/docker like a host would."""

    def __init__(self, commands: List[str], systemd: int = 252, docker_ok: bool = True) -> None:
        self.commands, self.systemd, self.docker_ok = set(commands), systemd, docker_ok
        self.ran: List[List[str]] = []

    def which(self, name: str) -> Optional[str]:
        return "/usr/bin/" + name if name in self.commands else None

    def run(self, argv: List[str]) -> Tuple[int, str, str]:
        self.ran.append(argv)
        if argv[0] == "systemctl":
            return 0, "systemd %d (%d.1-1)\n+PAM +AUDIT\n" % (self.systemd, self.systemd), ""
        return (0, "ok\n", "") if self.docker_ok else (1, "", "Cannot connect to the Docker daemon\nat unix:///x\n")


def report(root: Path, host: Host, python: Tuple[int, ...] = (3, 11, 2)) -> Dict:
    return host_report(run=host.run, which=host.which, python=python, root=str(root), kernel_release="6.1.0-test")


@pytest.fixture(autouse=True)
def libzstd_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostcheck, "libzstd_version", lambda: "1.5.4")


def test_a_foreign_host_without_apt_or_docker_takes_the_systemd_target(tmp_path: Path) -> None:
    host = Host(list(SYSTEMD_COMMANDS))
    got = report(make_root(tmp_path, OPENEULER), host)
    assert got["targets"]["systemd"] == {"ok": True, "missing": []}
    assert got["targets"]["k8s"] == {"ok": True, "missing": []}
    assert not got["targets"]["compose"]["ok"]
    assert got["targets"]["compose"]["missing"][0].startswith("the Docker engine and Compose v2")
    found = got["found"]
    assert (found["distro"], found["distro_like"], found["package_manager"]) == ("openEuler-22.03", "rhel fedora", "")
    assert (found["systemd"], found["overlay"], found["zstd"], found["python"]) == (
        252, "built in or loaded", "libzstd 1.5.4", "3.11.2")
    assert ["docker", "compose", "version"] not in host.ran   # no docker command: nothing run for it


def test_a_debian_host_with_docker_takes_every_target(tmp_path: Path) -> None:
    host = Host(list(SYSTEMD_COMMANDS) + ["docker", "apt-get", "dpkg", "zstd"])
    got = report(make_root(tmp_path, DEBIAN), host)
    assert all(got["targets"][kind]["ok"] for kind in ("compose", "systemd", "k8s")), got
    assert (got["found"]["distro"], got["found"]["package_manager"], got["found"]["zstd"]) == (
        "debian-12", "apt", "libzstd 1.5.4")


def test_what_is_missing_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostcheck, "libzstd_version", lambda: (_ for _ in ()).throw(hostcheck.ZstdError("none")))
    host = Host([c for c in SYSTEMD_COMMANDS if c not in ("nsenter", "timeout")] + ["docker"], systemd=239,
                docker_ok=False)
    got = report(make_root(tmp_path, OPENEULER, filesystems="nodev\tsysfs\n\text4\n"), host, python=(3, 6, 8))
    systemd = got["targets"]["systemd"]["missing"]
    assert systemd[0] == "python3 3.9 or newer (found 3.6.8)"
    assert systemd[1] == "systemd 247 or newer (found 239)"
    assert systemd[2].startswith("the commands nsenter, timeout (util-linux")
    assert systemd[3] == ("overlayfs in the kernel (not in /proc/filesystems, no overlay module under "
                          "/lib/modules/6.1.0-test)")
    assert systemd[4].startswith("zstd for zstd-compressed layers")
    compose = got["targets"]["compose"]["missing"]
    assert compose[0] == "python3 3.9 or newer (found 3.6.8)"
    assert compose[2] == ("a running Docker engine (`docker info` failed: Cannot connect to the Docker daemon "
                          "at unix:///x)")
    assert got["targets"]["k8s"] == {"ok": False, "missing": ["python3 3.9 or newer (found 3.6.8)"]}


def test_a_host_not_booted_with_systemd_is_refused_for_the_systemd_target(tmp_path: Path) -> None:
    got = report(make_root(tmp_path, DEBIAN, booted=False), Host(list(SYSTEMD_COMMANDS)))
    assert got["targets"]["systemd"]["missing"] == [
        "systemd as the service manager (/run/systemd/system is absent)"]


def test_overlay_as_a_module_and_os_release_quoting(tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "modules.dep").write_text("kernel/fs/fat/vfat.ko.xz: kernel/fs/fat/fat.ko.xz\n"
                                         "kernel/fs/overlayfs/overlay.ko.xz:\n")
    assert overlay_support("nodev\tsysfs\n", str(modules)) == "module"
    assert overlay_support("nodev\tsysfs\n", str(tmp_path / "absent")) == ""
    assert os_release("# comment\nID='kylin'\nVERSION_ID=\"V10\"\nbroken line\n") == {"ID": "kylin",
                                                                                         "VERSION_ID": "V10"}
