"""Small shared helpers of the test world: paths, labels, running commands with bounded time, file locks."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

# Every container and network the world creates carries this label with the site name as value,
# so `down` removes exactly what `up` made (also after a failed `up`).
LABEL = "offline-delivery.world"
IMAGE_REPO = "od-world"  # local image names: od-world/host, od-world/jump


def repo_root() -> Path:
    """The collection root (this file is tests/world/util.py)."""
    return Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """Where root filesystems are cached across runs (keyed by recipe hash inside)."""
    return Path(os.environ.get("OD_CACHE", "/var/cache/offline-delivery-test"))


def state_root() -> Path:
    """Per-site state (ssh keys, inventories); git-ignored under the repo by default."""
    return Path(os.environ.get("OD_WORLD_STATE", str(repo_root() / ".world")))


class WorldError(RuntimeError):
    """A step of building or running the world failed; the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class Result:
    """Outcome of a command: exit code and captured text."""

    args: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def check(self, what: str) -> "Result":
        """Raise a WorldError naming `what` when the command failed."""
        if self.rc != 0:
            tail = self.output.strip()[-3000:]
            raise WorldError(f"{what} failed (rc={self.rc}): {' '.join(self.args)}\n{tail}")
        return self


def run(args: Sequence[str], *, timeout: float, input_text: str | None = None,
        env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
    """Run a command, capture its output, never wait longer than `timeout` seconds."""
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.run(list(args), input=input_text, capture_output=True, text=True,
                              timeout=timeout, env=full_env, cwd=cwd, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return Result(tuple(args), 124, out, err + f"\n[timed out after {timeout:.0f}s]")
    except FileNotFoundError as exc:
        return Result(tuple(args), 127, "", f"{exc}")
    return Result(tuple(args), proc.returncode, proc.stdout, proc.stderr)


def docker(*args: str, timeout: float = 120, input_text: str | None = None) -> Result:
    """Run the docker CLI."""
    return run(["docker", *args], timeout=timeout, input_text=input_text)


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = 1800) -> Iterator[None]:
    """Exclusive lock so two concurrent runs do not build the same cached artefact twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with open(path, "w") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as exc:
                if time.monotonic() > deadline:
                    raise WorldError(f"lock {path} still held after {timeout:.0f}s; is another build stuck?") from exc
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def log(msg: str) -> None:
    """Progress lines on stderr (plain lines: CI logs stay readable)."""
    print(f"[world {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
