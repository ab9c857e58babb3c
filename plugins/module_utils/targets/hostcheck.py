# Copyright: offline.delivery contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""What a host offers each target kind, and what it lacks: read on the host, changing nothing.

The systemd target needs no package of ours: systemd (as the service manager, ``MIN_SYSTEMD`` or newer),
python3 (``MIN_PYTHON``, standard library only), the util-linux and coreutils commands its units and probes run
(``SYSTEMD_COMMANDS``), overlayfs in the kernel (root filesystems are assembled from shared layers) and, for
zstd-compressed layers, libzstd (``common/zstd.py``). Any distro family with those
qualifies. The compose target needs the Docker engine with Compose v2 (``offline.delivery.runtime`` installs
them on the distros of the site repository). The k8s target runs its module here against the cluster's API:
python3 only. Standard library only.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..common.zstd import ZstdError
from ..common.zstd import version as libzstd_version

# RHEL 9 and openEuler 22.03 ship python 3.9; the world's Debian 12 hosts (where it is tested) 3.11.
MIN_PYTHON = (3, 9)
# The unit options and `systemd-run` switches the systemd target writes (credentials, MountAPIVFS with
# private mounts, --pipe --wait probes) behave alike from systemd 247 on.
MIN_SYSTEMD = 247
SYSTEMD_COMMANDS = ("systemctl", "systemd-run", "journalctl", "mount", "umount", "nsenter", "cp", "timeout")
TARGETS = ("compose", "systemd", "k8s")
SYSTEMD_VERSION_RE = re.compile(r"^systemd (\d+)")

Run = Callable[[List[str]], Tuple[int, str, str]]


def os_release(text: str) -> Dict[str, str]:
    """The KEY=value pairs of an os-release file (quotes removed)."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            fields[key] = value.strip().strip("\"'")
    return fields


def overlay_support(filesystems: str, modules_dir: str) -> str:
    """How the kernel offers overlayfs: "built in or loaded" (listed in /proc/filesystems), "module" (the
    kernel's module tree has overlay.ko, which mount loads), or "" (neither)."""
    if any(line.split()[-1:] == ["overlay"] for line in filesystems.splitlines()):
        return "built in or loaded"
    for name in ("modules.dep", "modules.builtin"):
        try:
            with open(os.path.join(modules_dir, name), encoding="utf-8", errors="replace") as handle:
                if any(re.search(r"(^|/)overlay\.ko(\.\w+)?:?", line) for line in handle):
                    return "module"
        except OSError:
            continue
    return ""


def zstd_support() -> str:
    """What unpacks zstd-compressed layers here (targets/rootfs.py reads them through libzstd): its version, or ""."""
    try:
        return "libzstd %s" % libzstd_version()
    except ZstdError:
        return ""


def systemd_version(run: Run) -> int:
    """systemd's version number (0 when `systemctl --version` does not answer)."""
    rc, out, dummy = run(["systemctl", "--version"])
    match = SYSTEMD_VERSION_RE.match(out) if rc == 0 else None
    return int(match.group(1)) if match else 0


def docker_state(run: Run, which: Callable[[str], Optional[str]]) -> List[str]:
    """What the compose target lacks on this host (empty: Docker runs and has Compose v2)."""
    if not which("docker"):
        return ["the Docker engine and Compose v2 (offline.delivery.runtime installs them from the site repository "
                "on the distros the bundle carries packages for)"]
    missing = []
    rc, dummy, err = run(["docker", "compose", "version"])
    if rc != 0:
        missing.append("Compose v2 (`docker compose version` failed: %s)" % " ".join(err.split())[-200:])
    rc, dummy, err = run(["docker", "info", "--format", "{{.ServerVersion}}"])
    if rc != 0:
        missing.append("a running Docker engine (`docker info` failed: %s)" % " ".join(err.split())[-200:])
    return missing


def host_report(*, run: Run, which: Callable[[str], Optional[str]] = shutil.which,
                python: Sequence[int] = tuple(sys.version_info[:3]), root: str = "/",
                kernel_release: str = "") -> Dict[str, Any]:
    """Per target kind, whether this host can take it and what it lacks, with what was found. ``root`` and
    ``kernel_release`` let tests point it at a tree of their own."""
    def read(path: str) -> str:
        try:
            with open(os.path.join(root, path.lstrip("/")), encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    release = os_release(read("/etc/os-release") or read("/usr/lib/os-release"))
    kernel = kernel_release or os.uname().release
    found: Dict[str, Any] = {
        "distro": "%s-%s" % (release.get("ID", "unknown"), release.get("VERSION_ID", "")),
        "distro_like": release.get("ID_LIKE", ""),
        "python": ".".join(str(n) for n in python),
        "package_manager": "apt" if which("apt-get") and which("dpkg") else "",
        "systemd_booted": os.path.isdir(os.path.join(root, "run/systemd/system")),
        "systemd": systemd_version(run) if which("systemctl") else 0,
        "overlay": overlay_support(read("/proc/filesystems"), os.path.join(root, "lib/modules", kernel)),
        "zstd": zstd_support(),
        "commands": {name: which(name) or "" for name in SYSTEMD_COMMANDS},
    }
    python_missing = [] if tuple(python[:2]) >= MIN_PYTHON else [
        "python3 %d.%d or newer (found %s)" % (MIN_PYTHON + (found["python"],))]

    systemd = list(python_missing)
    if not found["systemd_booted"]:
        systemd.append("systemd as the service manager (/run/systemd/system is absent)")
    elif found["systemd"] < MIN_SYSTEMD:
        seen = found["systemd"] or "no answer from `systemctl --version`"
        systemd.append("systemd %d or newer (found %s)" % (MIN_SYSTEMD, seen))
    absent = [name for name, path in found["commands"].items() if not path and name != "systemctl"]
    if absent:
        systemd.append("the commands %s (util-linux: mount, umount, nsenter; coreutils: cp, timeout; systemd: "
                       "systemd-run, journalctl)" % ", ".join(absent))
    if not found["overlay"]:
        systemd.append("overlayfs in the kernel (not in /proc/filesystems, no overlay module under %s)"
                       % os.path.join("/lib/modules", kernel))
    if not found["zstd"]:
        systemd.append("zstd for zstd-compressed layers: libzstd.so.1 (package libzstd / libzstd1)")
    compose = python_missing + docker_state(run, which)
    missing = {"compose": compose, "systemd": systemd, "k8s": list(python_missing)}
    return {"targets": {kind: {"ok": not missing[kind], "missing": missing[kind]} for kind in TARGETS},
            "found": found}
