"""Measuring primitives: a timed child process with its own peak RSS, the hashlib limit, medians,
a disk-usage sampler, and what machine this ran on."""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

CHUNK = 1024 * 1024


class BenchError(RuntimeError):
    """A measured command failed: says which, with its exit code and the end of its stderr."""


@dataclass
class ChildRun:
    seconds: float
    max_rss: int          # bytes, peak RSS of the command alone (GNU time), 0 when unknown
    cpu_seconds: float    # user + system CPU time of the command (GNU time), 0 when unknown
    stdout: str
    stderr: str


GNU_TIME = "/usr/bin/time"


def settle() -> None:
    """Write back the dirty pages earlier steps left (``sync``) before a timed step starts, so that none pays
    for another's writeback: measured 2026-12-06, a 2 GB build right after a 1.7 GB ``zstd`` output took
    4.3-9.3 s against 3.4-3.5 s after a sync (the kernel throttles a writer once dirty pages pile up)."""
    os.sync()


def run_child(argv: Sequence[str], *, cwd: Path | None = None, timeout: float = 3600,
              env: dict[str, str] | None = None, check: bool = True, settled: bool = False) -> ChildRun:
    """Run a command, wall-timed, and read the peak RSS of exactly that command.

    The peak RSS comes from GNU time (``/usr/bin/time -f %M``), which forks the command itself. Reading
    ``wait4``/RUSAGE_CHILDREN here would be wrong: Linux carries the forking process's high-water RSS into
    the child's ``ru_maxrss`` across exec, so every child would report at least this Python process's RSS.
    Output goes to files (not pipes) so a chatty child cannot block on a full pipe while we wait.
    ``settled``: the caller has just called :func:`settle` (a step timed as several children).
    """
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    out_path, err_path, rss_path = (tmp / f"bench-child-{os.getpid()}.{ext}" for ext in ("out", "err", "rss"))
    rss_path.unlink(missing_ok=True)
    wrapped = ([GNU_TIME, "-f", "%M %U %S", "-o", str(rss_path), *argv] if os.access(GNU_TIME, os.X_OK)
               else list(argv))
    if not settled:
        settle()
    start = time.perf_counter()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        # pylint: disable-next=consider-using-with
        proc = subprocess.Popen(wrapped, stdout=out, stderr=err, cwd=cwd, env=child_env() if env is None else env)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=60)
            raise BenchError(f"{' '.join(argv)} did not finish within {timeout:.0f} s; killed") from None
    seconds = time.perf_counter() - start
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    rss_kb, cpu = _read_time_file(rss_path)
    for path in (out_path, err_path, rss_path):
        path.unlink(missing_ok=True)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {stderr.strip()[-2000:]}")
    return ChildRun(seconds, rss_kb * 1024, cpu, stdout, stderr)


def child_env() -> dict[str, str]:
    """This environment without PYTHONDONTWRITEBYTECODE: an installed package starts from its bytecode
    cache, so the product's children must too (set, every start would recompile the ~5,000 lines of
    bundle_format and the CLI: ~70 ms of CPU per command, a quarter of the default setting's limit)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _read_time_file(path: Path) -> tuple[int, float]:
    """GNU time's "%M %U %S" (KiB, CPU seconds); the file may start with "Command exited with ..."."""
    try:
        fields = path.read_text().split()[-3:]
        return int(fields[0]), float(fields[1]) + float(fields[2])
    except (OSError, ValueError, IndexError):
        return 0, 0.0


def hash_files(paths: Iterable[Path]) -> tuple[int, float, float]:
    """Read and sha256 every file in 1 MiB chunks, one thread: (bytes, wall seconds, CPU seconds). This is
    the limit the builder, the verifier and the importer are measured against (they do at least this)."""
    total = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    settle()
    start, cpu_start = time.perf_counter(), time.process_time()
    for path in paths:
        h = hashlib.sha256()
        with open(path, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(buf)
                if not n:
                    break
                h.update(view[:n])
                total += n
        h.hexdigest()
    return total, time.perf_counter() - start, time.process_time() - cpu_start


def copy_files(paths: Iterable[Path], out: Path) -> tuple[int, float, float]:
    """Read, sha256 and write every file into ``out``, then fsync, one thread: (bytes, wall s, CPU s).

    The floor of any build: a bundle must be written as well as read and hashed. Not a goal's reference
    (the goals are against read + sha256); it shows how much of a build's time is the write itself."""
    total = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    settle()
    start, cpu_start = time.perf_counter(), time.process_time()
    with open(out, "wb", buffering=0) as dst:
        for path in paths:
            h = hashlib.sha256()
            with open(path, "rb", buffering=0) as fh:
                while True:
                    n = fh.readinto(buf)
                    if not n:
                        break
                    h.update(view[:n])
                    dst.write(view[:n])
                    total += n
            h.hexdigest()
        os.fsync(dst.fileno())
    result = total, time.perf_counter() - start, time.process_time() - cpu_start
    out.unlink()
    return result


def unzstd_files(path: Path, out: Path | None = None) -> tuple[int, float, float]:
    """Decompress a zstd file with libzstd and sha256 what comes out, one thread: (bytes out, wall s, CPU s).
    With ``out``: also write it there and fsync (the floor of an import, which must write every blob).
    The reference of the compressed bundle's verify and import goals (issue 19)."""
    from offline_delivery_core.common import zstd  # pylint: disable=import-outside-toplevel

    total = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    settle()
    start, cpu_start = time.perf_counter(), time.process_time()
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as src, zstd.ZstdReader(src) as reader:  # type: ignore[arg-type]
        dst = open(out, "wb", buffering=0) if out is not None else None  # pylint: disable=consider-using-with
        try:
            while True:
                n = reader.readinto(buf)
                if not n:
                    break
                h.update(view[:n])
                if dst is not None:
                    dst.write(view[:n])
                total += n
            if dst is not None:
                os.fsync(dst.fileno())
        finally:
            if dst is not None:
                dst.close()
    h.hexdigest()
    result = total, time.perf_counter() - start, time.process_time() - cpu_start
    if out is not None:
        out.unlink()
    return result


def warm(paths: Iterable[Path]) -> int:
    """Read files once so every measurement sees the same (hot) page cache; returns bytes read."""
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while chunk := fh.read(8 * CHUNK):
                total += len(chunk)
    return total


def reread(path: Path) -> None:
    """Drop the cached pages of a file this run has just written, and read it back. On this VM the pages a
    process wrote kept slowing other commands' writes for minutes (measured 2026-12-06: with the freshly
    written 2 GB ``--compress none`` bundle cached, a 2 GB build took 3.7-14.9 s, 3.0-3.1 s once that
    file had been dropped and read back; ``zstd`` reading it was not slowed). Read back, the file is as hot
    as every other input, and as harmless."""
    settle()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    warm([path])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def repeat(times: int, fn: Callable[[int], float]) -> list[float]:
    """fn(i) -> one measured value, ``times`` times."""
    return [fn(i) for i in range(times)]


def tree_bytes(root: Path) -> int:
    """Bytes of the files under ``root``, each inode counted once: a hard link or a rename costs nothing,
    a copy counts twice. Apparent sizes, not blocks, so that 4 KiB block rounding of small files does not
    pass for a copy."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue  # renamed away while we walked
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


class PeakSampler:
    """Samples ``tree_bytes(root)`` in a thread while a child runs: the peak disk a step needs there."""

    def __init__(self, root: Path, interval: float = 0.05) -> None:
        self.root = root
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_bytes(self.root))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.peak = max(self.peak, tree_bytes(self.root))


# ----------------------------------------------------------------------------------------------------------
# Machine information


def _first(path: str, prefix: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _command_output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


PRODUCT_PATHS = ("bundle_builder", "plugins/module_utils")


def code_state(repo_root: Path) -> dict[str, object]:
    """What code was measured: the commit, the git tree of each product directory (unchanged trees mean
    unchanged code, whatever else was committed meanwhile) and product files modified in the work tree."""
    git = ["git", "-C", str(repo_root)]
    trees = {p: _command_output([*git, "rev-parse", f"HEAD:{p}"]) or None for p in PRODUCT_PATHS}
    dirty = _command_output([*git, "status", "--porcelain", "--", *PRODUCT_PATHS])
    modified = sorted(line.split(maxsplit=1)[1] for line in dirty.splitlines() if len(line.split()) > 1)
    return {"commit": _command_output([*git, "rev-parse", "HEAD"]) or None, "trees": trees,
            "product_files_modified": modified}


def machine_info(repo_root: Path) -> dict[str, object]:
    mem_kb = _first("/proc/meminfo", "MemTotal").split()[0]
    return {
        "cores": os.cpu_count(),
        "memory_bytes": int(mem_kb) * 1024 if mem_kb.isdigit() else None,
        "cpu_model": _first("/proc/cpuinfo", "model name"),
        "sha_ni": "sha_ni" in _first("/proc/cpuinfo", "flags").split(),
        "kernel": platform.release(),
        "os": _os_release(),
        "python": sys.version.split()[0],
        "openssl": __import__("ssl").OPENSSL_VERSION,
        "docker_server": _command_output(["docker", "version", "--format", "{{.Server.Version}}"]) or None,
        "git_commit": _command_output(["git", "-C", str(repo_root), "rev-parse", "HEAD"]) or None,
    }


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text(encoding="utf-8").splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "unknown"
