"""Ansible collections the test tooling needs beyond ansible-core (molecule's docker driver uses
community.docker and ansible.posix), taken from the `ansible` community package on PyPI because Galaxy is
unreachable here. Only the named collections are extracted from its wheel, cached by package version.
"""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path

from .util import WorldError, cache_dir, file_lock, log, run

# The community package whose collections match the test extra's ansible-core pin (2.19 <-> ansible 12).
ANSIBLE_PACKAGE = "ansible==12.3.0"
DEFAULT_COLLECTIONS = ("community.docker", "ansible.posix")


def ensure_collections(names: tuple[str, ...] = DEFAULT_COLLECTIONS) -> Path:
    """A collections path (the dir holding `ansible_collections/`) with `names`; downloads once."""
    version = ANSIBLE_PACKAGE.split("==", 1)[1]
    root = cache_dir() / "collections" / f"ansible-{version}"
    with file_lock(root.parent / f"{root.name}.lock"):
        missing = [n for n in names
                   if not (root / "ansible_collections" / n.replace(".", "/") / "MANIFEST.json").exists()]
        if missing:
            _extract(_download_wheel(root.parent, version), root, missing)
    return root


def _download_wheel(dest: Path, version: str) -> Path:
    wheel = dest / f"ansible-{version}-py3-none-any.whl"
    if wheel.exists():
        return wheel
    log(f"downloading {ANSIBLE_PACKAGE} from PyPI (its wheel carries the collections)")
    dest.mkdir(parents=True, exist_ok=True)
    result = run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                  "-d", str(dest), ANSIBLE_PACKAGE], timeout=600)
    result.check(f"pip download {ANSIBLE_PACKAGE}")
    if not wheel.exists():
        raise WorldError(f"pip download {ANSIBLE_PACKAGE} did not produce {wheel}; found {sorted(dest.iterdir())}")
    return wheel


def _extract(wheel: Path, root: Path, names: list[str]) -> None:
    prefixes = [f"ansible_collections/{n.replace('.', '/')}/" for n in names]
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if any(m.startswith(p) for p in prefixes)]
        found = {p for p in prefixes if any(m.startswith(p) for m in members)}
        absent = [n for n, p in zip(names, prefixes, strict=True) if p not in found]
        if absent:
            raise WorldError(f"{wheel.name} has no collection {', '.join(absent)}")
        archive.extractall(root, members)
    log(f"extracted {', '.join(names)} from {wheel.name} into {root}")
