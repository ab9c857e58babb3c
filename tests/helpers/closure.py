"""Proof that a package closure installs from itself (docs/packages.md): a flat apt repository of the closure,
and apt simulating the profiles' install on the release's minbase with that repository as its only source.

Test code: the builder does not run it; the integration tests (tests/integration/test_packages.py) use it to
check what bundle_builder.packages resolves.
"""

from __future__ import annotations

import email.utils
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from bundle_builder.distros import DebianMirrors, check_arch, debian_mirrors, get_distro
from bundle_builder.packages import (
    TIMEOUT_APT_QUERY,
    AptState,
    PackageFile,
    _write_apt_config,
    apt_index,
    minbase_rootfs,
)
from offline_delivery_core.site.apt import release_bytes


def write_flat_repo(files: Sequence[PackageFile], repo: Path) -> None:
    """A flat apt repository (Packages + Release) of ``files`` in ``repo``, the way the site's repo is."""
    for f in files:
        try:
            os.link(f.path, repo / f.filename)
        except OSError:  # another file system: copy
            shutil.copyfile(f.path, repo / f.filename)
    packages = apt_index(files)
    (repo / "Packages").write_bytes(packages)
    # the site's own Release writer, so the closure is checked against the repository shape the site serves
    (repo / "Release").write_bytes(release_bytes("closure-check", {f.target_arch for f in files},
                                                 {"Packages": packages}, email.utils.formatdate(usegmt=True)))


def verify_closure(distro: str, arch: str, profiles: list[str], files: Sequence[PackageFile], *,
                   cache_dir: Path, mirrors: DebianMirrors | None = None) -> list[str]:
    """Simulate installing ``profiles`` on the minbase of ``distro``/``arch`` with ``files`` as the only
    package source; return the names apt would install. Raises :class:`PackageError` with apt's words when
    anything is missing: the proof that a resolved closure is complete."""
    row = get_distro(distro)
    arch = check_arch(row, arch)
    mirrors = mirrors or debian_mirrors()
    minbase = minbase_rootfs(row.key, arch, cache_dir=cache_dir, mirrors=mirrors)
    (cache_dir / "tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="verify-", dir=cache_dir / "tmp") as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        write_flat_repo(files, repo)
        config = _write_apt_config(Path(tmp) / "apt", arch=arch, status=minbase.status,
                                   sources=[f"deb [trusted=yes] file:{repo} ./"], preferences="")
        state = AptState(Path(tmp) / "apt", config, f"{row.key}/{arch} closure check")
        state.apt_get(["update", "-q", "--error-on=any"], timeout=TIMEOUT_APT_QUERY, what="index the closure")
        names = [r.name for p in dict.fromkeys(profiles) for r in row.packages(p)]
        sim = state.apt_get(["-s", "install", "-y", "--no-install-recommends", *names],
                            timeout=TIMEOUT_APT_QUERY, what=f"simulate installing {' '.join(names)}")
        return sorted(set(re.findall(r"^Inst (\S+)", sim.stdout, flags=re.M)))
