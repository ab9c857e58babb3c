"""Make a booted world host foreign: no apt, no dpkg, an os-release of another family (openEuler by default).

The host keeps what such a host has of its own (systemd, python3, util-linux, coreutils, libzstd, overlayfs in
the kernel) and loses what ties it to Debian, so Ansible's facts name another distro and nothing of the
collection can install a package there. Used by tests/e2e/test_foreign_hosts.py."""
from __future__ import annotations

import shlex

from tests.world.site import Site

OPENEULER = ('NAME="openEuler"\nVERSION="22.03 (LTS-SP3)"\nID="openEuler"\nVERSION_ID="22.03"\n'
             'PRETTY_NAME="openEuler 22.03 (LTS-SP3)"\nANSI_COLOR="0;31"\nID_LIKE="rhel fedora"\n')
# What Debian's package management is made of on a world host (apt, dpkg and their state).
PACKAGE_MANAGER = ("/usr/bin/apt*", "/usr/bin/dpkg*", "/usr/sbin/dpkg*", "/usr/lib/apt", "/etc/apt", "/var/lib/apt",
                   "/var/cache/apt", "/var/lib/dpkg", "/etc/dpkg", "/etc/debian_version", "/usr/lib/python3/dist-packages/apt*")


def make_foreign(site: Site, host: str, os_release: str = OPENEULER) -> None:
    """Remove apt and dpkg from `host` and give it `os_release` (both /etc/os-release and /usr/lib/os-release)."""
    script = ("set -e; rm -rf " + " ".join(PACKAGE_MANAGER) + "; rm -f /etc/os-release /usr/lib/os-release; "
              f"printf %s {shlex.quote(os_release)} > /usr/lib/os-release; "
              "ln -s ../usr/lib/os-release /etc/os-release; "
              "! command -v apt-get && ! command -v dpkg")
    site.exec(host, script, timeout=60).check(f"making {host} of site {site.name} foreign")
