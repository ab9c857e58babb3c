"""Progress reporting: a bar on a terminal, plain lines otherwise (CI logs), nothing in --json mode."""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 30


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


human_size = _human


class BarProgress:
    """Redraws one line on a TTY, at most 10 times a second."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._last = 0.0
        self._start = time.monotonic()

    def __call__(self, done: int, total: int, message: str) -> None:
        if total == 0 and done == 0:  # a step without a size (e.g. resolving packages): say it on its own line
            self.stream.write(f"{message}\n")
            self.stream.flush()
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        frac = done / total if total else 1.0
        filled = int(frac * BAR_WIDTH)
        rate = done / max(now - self._start, 1e-6)
        self.stream.write(f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {frac * 100:5.1f}% "
                          f"{_human(done)}/{_human(total)} {_human(rate)}/s {message:<14}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


class LineProgress:
    """One line per 10 % step (and at the end): readable in CI logs."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._next_step = 0

    def __call__(self, done: int, total: int, message: str) -> None:
        if total == 0 and done == 0:  # a step without a size (e.g. resolving packages)
            self.stream.write(f"{message}\n")
            self.stream.flush()
            return
        pct = int(done * 100 / total) if total else 100
        if pct < self._next_step and done < total:
            return
        self._next_step = (pct // 10 + 1) * 10
        self.stream.write(f"{message}: {pct}% ({_human(done)} of {_human(total)})\n")
        self.stream.flush()


def make_progress(json_mode: bool, stream: TextIO | None = None):  # type: ignore[no-untyped-def]
    """The progress callback for the CLI: None with --json (stdout holds only the JSON)."""
    if json_mode:
        return None
    stream = stream or sys.stderr
    return BarProgress(stream) if stream.isatty() else LineProgress(stream)
