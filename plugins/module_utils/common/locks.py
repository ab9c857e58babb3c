# -*- coding: utf-8 -*-
# Copyright: offline.delivery contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""An exclusive flock with a bounded wait: one import, sync or deploy at a time, never an endless wait."""

from __future__ import annotations

import fcntl
import time

POLL_SECONDS = 0.2


def flock_within(fd: int, timeout: float) -> bool:
    """Take an exclusive flock on ``fd``, waiting at most ``timeout`` seconds; False when it stayed taken.
    The caller says who holds it and what to do (each lock guards something else)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
