# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Writing files so that a kill at any moment leaves the old bytes or the new ones, never a mix: a fresh
temporary name next to the file (never a fixed one another writer could share), fsync, the mode set before
the rename. Only what changed is written, so a second run reports no change."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import BinaryIO


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_bytes(path: str) -> bytes | None:
    """The content of ``path``, or None when it does not exist."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def file_differs(path: str, data: bytes, mode: int | None = None) -> bool:
    """True unless ``path`` holds exactly ``data`` (and has permission bits ``mode`` when given)."""
    try:
        if mode is not None and os.stat(path).st_mode & 0o7777 != mode:
            return True
    except FileNotFoundError:
        return True
    return file_bytes(path) != data


def write_atomic(path: str, data: bytes, mode: int = 0o644, *, sync_dir: bool = False) -> None:
    """Replace ``path`` with ``data`` (mode ``mode``) by temp file, fsync and rename; a missing parent
    directory is made (0755); ``sync_dir`` also makes the rename itself durable."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    # <name>.tmp-<random>: the name repository clean-ups look for after a kill
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path)[:64] + ".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    if sync_dir:
        fsync_dir(directory)


def write_if_changed(path: str, data: bytes, mode: int = 0o644, *, check_mode: bool = False,
                     sync_dir: bool = False) -> bool:
    """:func:`write_atomic` unless ``path`` already holds ``data`` with ``mode``; True when it (would have)
    changed."""
    if not file_differs(path, data, mode):
        return False
    if not check_mode:
        write_atomic(path, data, mode, sync_dir=sync_dir)
    return True


def ensure_private_dir(path: str) -> None:
    """Create ``path`` (and parents) 0700; tighten an existing one."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o700)


def write_private(path: str, data: bytes) -> bool:
    """A 0600 file in a 0700 directory (secrets and what is derived from them); False when unchanged."""
    ensure_private_dir(os.path.dirname(path))
    return write_if_changed(path, data, 0o600)


def link_or_copy(src: str, dest: str) -> None:
    """Put ``src`` at ``dest`` as a hard link (no second copy of a blob), or as a 0644 copy when ``dest`` is on
    another file system; atomically, replacing what was there."""
    tmp = f"{dest}.tmp-{os.getpid()}"
    remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def read_full(fh: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``fh`` (fewer bytes only at the end of the file), into the caller's buffer: no
    fresh ``bytes`` per chunk."""
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def remove(path: str) -> None:
    """Remove a file that may not exist."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
