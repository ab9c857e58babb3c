"""The fresh-machine check: scripts/bootstrap on a pristine Debian 12, so no package a test or a world builder
needs can hide behind this machine's own installs.

The pristine machine is the shop images' cached minbase root filesystem (mmdebstrap of Debian 12, with apt's
package lists removed), under a throw-away overlay: `scripts/bootstrap packages` runs in it as root through
chroot, with no package lists at the start (so the refresh path runs too), then `scripts/bootstrap smoke` uses
every tool once (it needs the machine's own qemu binfmt handlers, which the full bootstrap registers, for the
arm64 mmdebstrap). Downloaded .deb files are cached in ${OD_CACHE}/fresh/archives so a rerun does not fetch them
again. Only the machine's apt sources reach the chroot, as a fresh machine on this network would have them.

CLI: `python -m tests.world fresh-check [--bootstrap PATH]` (PATH: another bootstrap script to try).
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

from . import shop_images
from .util import WorldError, cache_dir, file_lock, log, repo_root, run

CHECK_TIMEOUT = 1800  # the package step downloads and installs ~150 packages on a busy 2-core machine
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8",
              "HOME": "/root"}


@dataclasses.dataclass(frozen=True)
class FreshCheck:
    """What the check saw: each step's exit code and output, and how long the whole check took."""

    packages_rc: int
    smoke_rc: int
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.packages_rc == 0 and self.smoke_rc == 0


def fresh_check(bootstrap: Path | None = None) -> FreshCheck:
    """Run the bootstrap's package step and its smoke use of every tool in a pristine Debian 12 (amd64)."""
    bootstrap = bootstrap or repo_root() / "scripts" / "bootstrap"
    base = shop_images.build_base("amd64", shop_images.debian_sources())
    state = cache_dir() / "fresh"
    started = time.monotonic()
    with file_lock(state / ".lock", timeout=CHECK_TIMEOUT), \
            tempfile.TemporaryDirectory(prefix="od-fresh-") as tmp:
        shutil.rmtree(state / "lists", ignore_errors=True)  # no package lists, as on a fresh image
        with shop_images.overlay_chroot(base, Path(tmp), state) as root:
            for name in ("etc/os-release", "usr/bin/apt-get"):
                if not (root / name).exists():
                    raise WorldError(f"the pristine root filesystem {base} lacks /{name}")
            shutil.copyfile("/etc/resolv.conf", root / "etc" / "resolv.conf")
            # The machine's qemu binfmt handlers (kernel-wide; the full bootstrap registers them), seen from the
            # chroot as from the machine: mmdebstrap's arm64 check then takes the path the world's builds take.
            run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(root / "proc/sys/fs/binfmt_misc")],
                timeout=30).check("mounting binfmt_misc in the fresh root")
            policy = root / "usr" / "sbin" / "policy-rc.d"  # no service starts inside the chroot
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            scripts = root / "root" / "od" / "scripts"
            scripts.mkdir(parents=True)
            shutil.copy2(bootstrap, scripts / "bootstrap")
            log(f"fresh-machine check: {bootstrap} packages + smoke in a pristine Debian 12 ({base})")
            steps = [run(["chroot", str(root), "/root/od/scripts/bootstrap", step], timeout=CHECK_TIMEOUT,
                         env=CHROOT_ENV) for step in ("packages", "smoke")]
    output = "".join(f"$ scripts/bootstrap {s}  (rc={r.rc})\n{r.output}\n" for s, r in zip(("packages", "smoke"), steps))
    return FreshCheck(steps[0].rc, steps[1].rc, output, time.monotonic() - started)
