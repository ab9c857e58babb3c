"""Benchmarks of issue 2/6: every figure next to its reference, measured in the same run.

    python -m bench.run [--large] [--out bench/results] [--docs docs/benchmarks.md] [--repeat 3]

Measures build, verify, size/dedup, delta and import (when the site repository code is present) and skips
lifecycle with its reason until that lands. Each measurement is a function ``measure_x(ctx) -> list[Row]``
in ``MEASUREMENTS``; a later suite adds one function there. The product is driven exactly as a user drives
it: the ``bundle-builder`` CLI (and the importer's own code) as child processes, whose own peak RSS is read
with ``wait4``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from . import measure, report, synth
from .measure import BenchError, ChildRun, median, run_child, settle
from .report import Row, check_at_least, check_at_most, check_below, check_ratio_at_most

REPO_ROOT = Path(__file__).resolve().parent.parent
MB = 1e6
MIB = 1024 * 1024
THROUGHPUT_GOAL = 0.80
RSS_GOAL_MB = 150.0
# issue 19: the compressed bundle against zstd of the uncompressed one, and against what users do by hand
COMPRESS_SIZE_GOAL = 1.05
COMPRESS_BUILD_GOAL = 1.3
BY_HAND_TIME_GOAL = 0.5
BY_HAND_SIZE_GOAL = 0.9  # issue 19: "<= 0.5x its time and <= 0.9x its size"
OVERHEAD_GOAL_PCT = 1.0
# Issues 2 and 6 set their goals (throughput against read + sha256, size overheads, import disk) on the
# uncompressed bundle (format 1); the compressed default is measured against zstd by measure_compress (issue 19).
FORMAT_1 = ["--compress", "none"]
EXTRA_DISK_GOAL = 1.0


def _log(text: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


@dataclass
class Context:
    gen: synth.Generated
    work: Path
    repeat: int
    key: Path
    pub: Path
    docker_reason: str | None          # None: the engine is usable
    builder: list[str]                 # argv prefix of the bundle-builder CLI
    bundle: Path | None = None         # the full release-1.0.0 bundle built by measure_build
    docker_loaded: list[str] = field(default_factory=list)
    docker_save_bytes: dict[str, int] = field(default_factory=dict)   # "all" and per ref
    load_before: list[float] = field(default_factory=lambda: list(os.getloadavg()))
    code_before: dict[str, Any] = field(default_factory=lambda: measure.code_state(REPO_ROOT))

    def v1_blob_paths(self) -> list[Path]:
        return [self.gen.blob_path(d) for d in sorted(self.gen.unique_blobs(synth.V1))]

    def v1_bytes(self) -> int:
        return sum(b.size for b in self.gen.unique_blobs(synth.V1).values())

    def v1_refs(self) -> list[str]:
        return sorted(self.gen.releases[synth.V1].values())


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _mbps(nbytes: int, seconds: float) -> float:
    return nbytes / MB / seconds


def _builder_argv() -> list[str]:
    search = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")  # the venv's first
    exe = shutil.which("bundle-builder", path=search)
    return [exe] if exe else [sys.executable, "-m", "bundle_builder.cli"]


def _build(ctx: Context, model: Path, out: Path, sources: list[str],
           extra: list[str] | None = None) -> tuple[ChildRun, dict[str, Any]]:
    """One ``bundle-builder build`` into a fresh directory: (the run, its --json summary)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    argv = [*ctx.builder, "build", str(model), "-o", str(out), "--platform", "linux/amd64",
            "--sign-key", str(ctx.key), "--json", *(extra or [])]
    for source in sources:
        argv += ["--images-from", source]
    run = run_child(argv)
    return run, json.loads(run.stdout)


@dataclass
class Limit:
    """The limit's runs: wall and CPU seconds of read+sha256 over the same bytes."""

    wall: list[float]
    cpu: list[float]


def _interleaved(ctx: Context, limit_paths: Callable[[], list[Path]],
                 step: Callable[[int], ChildRun]) -> tuple[Limit, list[ChildRun]]:
    """Alternate the limit (read+sha256) and the measured step, ``repeat`` times, so machine noise hits
    both alike. Returns the limit's runs and the step's runs."""
    limit, runs = Limit([], []), []
    for i in range(ctx.repeat):
        _, wall, cpu = measure.hash_files(limit_paths())
        limit.wall.append(wall)
        limit.cpu.append(cpu)
        runs.append(step(i))
    return limit, runs


def _secs(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _throughput_rows(prefix: str, what: str, nbytes: int, limit: Limit, runs: list[ChildRun],
                     reference: str, rss: bool = True, goal: bool = True) -> list[Row]:
    """Throughput (MB/s of the median wall time) and its ratio to the limit: the median of the ratios of
    each interleaved (limit, step) pair, which cancels slow drifts of a shared machine. The note adds the
    same ratio in CPU time (less sensitive to other load, blind to waiting on the disk)."""
    seconds = [r.seconds for r in runs]
    ratio = median([lw / r.seconds for lw, r in zip(limit.wall, runs)])
    cpu_ratio = (median([lc / r.cpu_seconds for lc, r in zip(limit.cpu, runs)])
                 if all(r.cpu_seconds for r in runs) else None)
    row = Row(prefix, what, _mbps(nbytes, median(seconds)), "MB/s", reference, _mbps(nbytes, median(limit.wall)),
              "MB/s", ratio, runs=[_mbps(nbytes, s) for s in seconds],
              note=f"{nbytes} bytes; wall s: {_secs(seconds)} (limit {_secs(limit.wall)}); CPU s: "
                   f"{_secs([r.cpu_seconds for r in runs])} (limit {_secs(limit.cpu)})"
                   + (f"; ratio in CPU time {cpu_ratio:.2f} x" if cpu_ratio else ""))
    rows = [check_at_least(row, THROUGHPUT_GOAL) if goal else row]
    if rss:
        peak = [r.max_rss / MIB for r in runs]
        rows.append(check_below(Row(f"{prefix}.rss", f"{what}: peak RSS", max(peak), "MiB",
                                    runs=peak, note="max over the runs, of the command alone (GNU time %M)"),
                                RSS_GOAL_MB, "MiB"))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Docker engine (the reference for what users do today)


def _docker_reason() -> str | None:
    if shutil.which("docker") is None:
        return "no docker CLI on this machine"
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "docker info did not answer within 30 s"
    if proc.returncode != 0:
        return f"docker engine not reachable: {proc.stderr.strip()[:200]}"
    return None


def _docker_image_id(ref: str) -> str | None:
    proc = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", ref], capture_output=True,
                          text=True, timeout=60, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _ensure_docker_images(ctx: Context) -> None:
    """The generated images in the engine (:func:`_ensure_in_engine`)."""
    wanted = {ref: ctx.gen.images[ref].config.digest for ref in sorted(ctx.gen.images)}  # type: ignore[union-attr]
    _ensure_in_engine(ctx, wanted, ctx.gen.docker_archive)


def _ensure_in_engine(ctx: Context, wanted: dict[str, str], archive: Path) -> None:
    """``docker load`` ``archive`` unless the engine holds exactly ``wanted`` (ref -> config digest, which is the
    image ID) already; what it loads is removed at the end of the run."""
    if all(_docker_image_id(ref) == digest for ref, digest in wanted.items()):
        return
    _log(f"docker load {archive}")
    run_child(["docker", "load", "-i", str(archive)], timeout=3600)
    ctx.docker_loaded += [ref for ref in wanted if ref not in ctx.docker_loaded]
    bad = [ref for ref, digest in wanted.items() if _docker_image_id(ref) != digest]
    if bad:
        raise BenchError(f"after docker load of {archive}, the engine's {', '.join(bad)} do not have the expected "
                         "config digests as image IDs")


def _remove_docker_images(ctx: Context) -> None:
    if ctx.docker_loaded:
        subprocess.run(["docker", "rmi", *ctx.docker_loaded], capture_output=True, timeout=600, check=False)


def _docker_save(refs: list[str], out: Path) -> ChildRun:
    out.unlink(missing_ok=True)
    return run_child(["docker", "save", "-o", str(out), *refs], timeout=3600)


# ----------------------------------------------------------------------------------------------------------
# Measurements


def _startup_row(ctx: Context) -> Row:
    """The fixed cost every CLI call pays (interpreter, imports): it weighs on small bundles only."""
    children = [run_child([*ctx.builder, "--help"]) for _ in range(ctx.repeat)]
    runs = [c.seconds for c in children]
    return Row("startup", "bundle-builder start-up (--help: interpreter + imports)", median(runs), "s",
               runs=runs, note=f"paid once per build/verify; included in their wall times; CPU s: "
                               f"{_secs([c.cpu_seconds for c in children])}")


def _floor_row(nbytes: int, floor: list[tuple[float, float]], runs: list[ChildRun], prefix: str = "build.floor",
               what: str = "build from an OCI layout vs the copy floor (no goal)",
               why: str = "a build must write its bundle, the limit does not: this is the write's share") -> Row:
    """A step against read + sha256 + write + fsync of the same bytes, done by the bench itself."""
    walls = [w for w, _ in floor]
    return Row(prefix, what,
               _mbps(nbytes, median([r.seconds for r in runs])), "MB/s",
               "floor: read+sha256+write+fsync", _mbps(nbytes, median(walls)), "MB/s",
               median([w / r.seconds for w, r in zip(walls, runs)]), runs=[_mbps(nbytes, w) for w in walls],
               note=f"floor wall s: {_secs(walls)}; CPU s: {_secs([c for _, c in floor])}; "
                    f"ratio in CPU time {median([c / r.cpu_seconds for (_, c), r in zip(floor, runs)]):.2f} x; "
                    + why)


def measure_build(ctx: Context) -> list[Row]:
    """Build throughput from an OCI layout and a docker-save archive vs the limit; vs docker save; RSS."""
    gen, nbytes = ctx.gen, ctx.v1_bytes()
    model = gen.app_yml(synth.V1)
    rows: list[Row] = []
    summaries: list[dict[str, Any]] = []

    floor: list[tuple[float, float]] = []

    def build_oci(i: int) -> ChildRun:
        _, wall, cpu = measure.copy_files(ctx.v1_blob_paths(), ctx.work / "floor.bin")
        floor.append((wall, cpu))
        run, summary = _build(ctx, model, ctx.work / "build-oci", [f"oci:{gen.oci}"], FORMAT_1)
        summaries.append(summary)
        _log(f"build from oci layout #{i + 1}: {run.seconds:.2f} s, peak RSS {run.max_rss / MIB:.0f} MiB")
        return run

    rows.append(_startup_row(ctx))
    limit, runs = _interleaved(ctx, ctx.v1_blob_paths, build_oci)
    rows.append(Row("limit", "limit: read + sha256 of the release's unique blobs (1 thread)",
                    _mbps(nbytes, median(limit.wall)), "MB/s", runs=[_mbps(nbytes, s) for s in limit.wall],
                    note=f"{nbytes} bytes in {len(ctx.v1_blob_paths())} files; 1 MiB readinto + hashlib.sha256"))
    rows += _throughput_rows("build.oci", "build from an OCI layout", nbytes, limit, runs,
                             "limit (read+sha256)")
    rows.append(_floor_row(nbytes, floor, runs))
    ctx.bundle = Path(summaries[-1]["path"])
    build_seconds = median([r.seconds for r in runs])

    def build_archive(i: int) -> ChildRun:
        run, _ = _build(ctx, model, ctx.work / "build-archive", [f"archive:{gen.docker_archive}"], FORMAT_1)
        _log(f"build from docker-save archive #{i + 1}: {run.seconds:.2f} s")
        return run

    limit, runs = _interleaved(ctx, ctx.v1_blob_paths, build_archive)
    rows += _throughput_rows("build.archive", "build from a docker-save archive", nbytes, limit, runs,
                             "limit (read+sha256)")
    shutil.rmtree(ctx.work / "build-archive", ignore_errors=True)
    rows += _docker_build_rows(ctx, model, nbytes, build_seconds)
    return rows


def _docker_build_rows(ctx: Context, model: Path, nbytes: int, build_seconds: float) -> list[Row]:
    """docker save of the same images (what users do today), and a build straight from the engine."""
    what_save = "docker save of the same images, all at once (what users do today)"
    what_eng = "build from the Docker engine (--images-from docker)"
    if ctx.docker_reason:
        return [Row("docker.save.all", what_save, skipped=ctx.docker_reason),
                Row("build.docker", what_eng, skipped=ctx.docker_reason)]
    _ensure_docker_images(ctx)
    tar = ctx.work / "docker-save-all.tar"
    save_runs = []
    for i in range(ctx.repeat):
        save_runs.append(_docker_save(ctx.v1_refs(), tar))
        _log(f"docker save (all) #{i + 1}: {save_runs[-1].seconds:.2f} s")
    ctx.docker_save_bytes["all"] = tar.stat().st_size
    tar.unlink()
    save_s = median([r.seconds for r in save_runs])
    rows = [Row("docker.save.all", what_save, _mbps(nbytes, save_s), "MB/s",
                "build from an OCI layout", _mbps(nbytes, build_seconds), "MB/s", save_s / build_seconds,
                runs=[r.seconds for r in save_runs],
                note=f"same {nbytes} unique bytes per second; ratio = docker save time / build time "
                     f"(> 1: the build is faster); runs in seconds")]
    limit, runs = _interleaved(ctx, ctx.v1_blob_paths,
                               lambda i: _build(ctx, model, ctx.work / "build-docker", ["docker"], FORMAT_1)[0])
    shutil.rmtree(ctx.work / "build-docker", ignore_errors=True)
    rows += _throughput_rows("build.docker", what_eng, nbytes, limit, runs, "limit (read+sha256)", goal=False)
    rows[-2].note += "; no goal: the engine must first docker-save every image (the reference above)"
    return rows


def measure_verify(ctx: Context) -> list[Row]:
    """bundle-builder verify (signature + every blob re-hashed) vs read+sha256 of the bundle file."""
    assert ctx.bundle is not None
    bundle = ctx.bundle
    size = bundle.stat().st_size

    def verify(i: int) -> ChildRun:
        run = run_child([*ctx.builder, "verify", str(bundle), "--pub", str(ctx.pub), "--json"])
        if not json.loads(run.stdout).get("ok"):
            raise BenchError(f"verify of {bundle} did not say ok: {run.stdout[:500]}")
        _log(f"verify #{i + 1}: {run.seconds:.2f} s, peak RSS {run.max_rss / MIB:.0f} MiB")
        return run

    limit, runs = _interleaved(ctx, lambda: [bundle], verify)
    return _throughput_rows("verify", "verify (signature + re-hash every blob)", size, limit, runs,
                            "limit (read+sha256 of the bundle)")


def measure_size(ctx: Context) -> list[Row]:
    """Bundle bytes vs the unique layers (dedup overhead), vs docker save per image and all at once."""
    assert ctx.bundle is not None
    gen = ctx.gen
    size = ctx.bundle.stat().st_size
    unique = gen.unique_blobs(synth.V1)
    layers = sum(b.size for b in unique.values() if b.role not in ("index", "manifest", "config"))
    # every unique blob but the layout's own indexes (the builder writes its own index per image)
    blobs = sum(b.size for b in unique.values() if b.role != "index")
    rows = [check_at_most(Row("size.dedup", "bundle size: overhead over the unique layers",
                              (size - layers) / layers * 100, "%", "unique layers", layers / MB, "MB",
                              size / layers, note=f"bundle {size} bytes; unique layers {layers} bytes; the "
                              "overhead is tar headers and padding, manifest, signature, configs, manifests, "
                              f"indexes and the model; over the unique blobs (layers, configs, manifests: "
                              f"{blobs} bytes) it is {(size - blobs) / blobs * 100:.3f} %"),
                          OVERHEAD_GOAL_PCT, "%")]
    per_image_oci = sum(b.size for image in gen.release_images(synth.V1) for b in image.blobs())
    rows.append(Row("size.whole_images", "bundle size vs every image carried whole (no dedup)", size / MB, "MB",
                    "sum of each image's blobs", per_image_oci / MB, "MB", size / per_image_oci))
    if ctx.docker_reason:
        rows.append(Row("size.docker", "bundle size vs docker save", skipped=ctx.docker_reason))
        return rows
    _ensure_docker_images(ctx)
    tar = ctx.work / "docker-save-one.tar"
    per_image = 0
    for ref in ctx.v1_refs():
        _docker_save([ref], tar)
        ctx.docker_save_bytes[ref] = tar.stat().st_size
        per_image += ctx.docker_save_bytes[ref]
    tar.unlink(missing_ok=True)
    if "all" not in ctx.docker_save_bytes:
        _docker_save(ctx.v1_refs(), tar)
        ctx.docker_save_bytes["all"] = tar.stat().st_size
        tar.unlink()
    rows.append(Row("size.docker.per_image", "bundle size vs docker save of each image", size / MB, "MB",
                    "sum of docker save per image", per_image / MB, "MB", size / per_image))
    rows.append(Row("size.docker.all", "bundle size vs docker save of all images at once", size / MB, "MB",
                    "docker save, all at once", ctx.docker_save_bytes["all"] / MB, "MB",
                    size / ctx.docker_save_bytes["all"]))
    return rows


def measure_delta(ctx: Context) -> list[Row]:
    """After changing one component's top layer: the delta bundle vs that layer and vs whole images."""
    assert ctx.bundle is not None
    gen = ctx.gen
    old, new = gen.changed()
    layer = new.layers[-1]
    runs: list[ChildRun] = []
    summary: dict[str, Any] = {}
    for i in range(ctx.repeat):
        run, summary = _build(ctx, gen.app_yml(synth.V2), ctx.work / "build-delta", [f"oci:{gen.oci}"],
                              ["--base", str(ctx.bundle), *FORMAT_1])
        runs.append(run)
        _log(f"delta build #{i + 1}: {run.seconds:.2f} s")
    delta = Path(summary["path"]).stat().st_size
    whole = sum(b.size for b in new.blobs())
    rows = [check_at_most(Row("delta.layer", "delta bundle: overhead over the changed layer",
                              (delta - layer.size) / layer.size * 100, "%", "changed top layer",
                              layer.size / MB, "MB", delta / layer.size,
                              runs=[r.seconds for r in runs],
                              note=f"delta {delta} bytes, {summary['blobs_bundled']} blobs carried of "
                                   f"{summary['blobs_total']}; changed layer {layer.size} bytes "
                                   f"({old.ref} -> {new.ref}); runs: build seconds"),
                          OVERHEAD_GOAL_PCT, "%")]
    rows.append(Row("delta.whole_image", "delta bundle vs a whole-image differential (Zarf --differential)",
                    delta / MB, "MB", f"{new.ref} carried whole", whole / MB, "MB", delta / whole,
                    note="every blob of each changed image (index, manifest, config, all layers)"))
    if not ctx.docker_reason:
        _ensure_docker_images(ctx)
        tar = ctx.work / "docker-save-changed.tar"
        _docker_save([new.ref], tar)
        rows.append(Row("delta.docker", "delta bundle vs docker save of the changed image", delta / MB, "MB",
                        f"docker save {new.ref}", tar.stat().st_size / MB, "MB", delta / tar.stat().st_size))
        tar.unlink()
    shutil.rmtree(ctx.work / "build-delta", ignore_errors=True)
    return rows


def _import_available() -> str | None:
    try:
        from offline_delivery_core.site import repo as site_repo  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    except ImportError as exc:
        return f"the site repository code (issue 4, offline_delivery_core.site.repo) is not there yet ({exc})"
    return None


def measure_import(ctx: Context) -> list[Row]:
    """Import (verify into staging, publish by rename) vs the limit; extra disk on the repo host; RSS;
    and importing the same release again."""
    what = "import into the site repository (bundle_import's code)"
    reason = _import_available()
    if reason:
        return [Row("import", what, skipped=reason)]
    assert ctx.bundle is not None
    bundle, size = ctx.bundle, ctx.bundle.stat().st_size
    repo = ctx.work / "repo"
    peaks: list[int] = []
    floor: list[tuple[float, float]] = []

    def do_import(i: int) -> ChildRun:
        shutil.rmtree(repo, ignore_errors=True)
        repo.mkdir(parents=True)
        _, wall, cpu = measure.copy_files([bundle], ctx.work / "floor-import.bin")
        floor.append((wall, cpu))
        with measure.PeakSampler(repo) as sampler:
            run = run_child([sys.executable, "-m", "bench.import_child", str(repo), str(bundle), str(ctx.pub)],
                            cwd=REPO_ROOT)
        peaks.append(sampler.peak)
        result = json.loads(run.stdout)
        if not result.get("changed"):
            raise BenchError(f"import into an empty repository reported no change: {run.stdout[:500]}")
        _log(f"import #{i + 1}: {run.seconds:.2f} s, peak repo {sampler.peak / MB:.0f} MB")
        return run

    limit, runs = _interleaved(ctx, lambda: [bundle], do_import)
    rows = _throughput_rows("import", what, size, limit, runs, "limit (read+sha256 of the bundle)")
    rows.append(_floor_row(size, floor, runs, "import.floor", "import vs the copy floor (no goal)",
                           "an import must write every blob to disk and fsync it before it publishes, the limit "
                           "writes nothing: the floor's write + fsync is the disk's share"))
    extra = max(peaks) / size
    rows.append(check_at_most(Row("import.disk", "import: peak disk used in the repository / bundle size",
                                  extra, "x", "bundle size", size / MB, "MB", extra,
                                  runs=[p / size for p in peaks],
                                  note="sampled every 50 ms (bytes of every file under the repo root, each inode "
                                       "once); 1.0 x means "
                                       "each blob is written once and published by rename, never copied"),
                              EXTRA_DISK_GOAL, "x"))
    again = [run_child([sys.executable, "-m", "bench.import_child", str(repo), str(bundle), str(ctx.pub)],
                       cwd=REPO_ROOT) for _ in range(ctx.repeat)]
    if any(json.loads(r.stdout).get("changed") for r in again):
        raise BenchError("re-importing the same release reported a change")
    rows.append(Row("import.again", "re-import of an already imported release", median([r.seconds for r in again]),
                    "s", "first import", median([r.seconds for r in runs]), "s",
                    median([r.seconds for r in again]) / median([r.seconds for r in runs]),
                    runs=[r.seconds for r in again], note="signature + catalog + a stat per blob, no blob read"))
    shutil.rmtree(repo, ignore_errors=True)
    return rows


def measure_lifecycle(_ctx: Context) -> list[Row]:
    """Install/upgrade of the 30-component app on the test world (issue 6 item 6). That needs a world site and
    takes minutes, so it is its own command (``python -m bench.lifecycle``); this reports its newest result,
    dated, next to the throughput figures."""
    results = REPO_ROOT / "bench" / "results"
    files = sorted(results.glob("*-lifecycle.json"))
    runs = [run for f in files for run in json.loads(f.read_text())]
    if not runs:
        return [Row("lifecycle", "install and upgrade wall time (test world)",
                    skipped=f"no result in {results}/*-lifecycle.json yet: run python -m bench.lifecycle")]
    last = max(runs, key=lambda r: r["date"])
    app, steps = last["app"], last["steps_s"]
    source = f"python -m bench.lifecycle, {last['date']} ({', '.join(sorted(last['targets']))})"
    rows = [Row("lifecycle.install", f"install {app['components']} components (test world; {source})",
                steps["install 1.0.0"], "s"),
            Row("lifecycle.upgrade", f"upgrade where 1 component changed ({app['changed']})",
                steps["upgrade 1.1.0"], "s", "install", steps["install 1.0.0"], "s",
                steps["upgrade 1.1.0"] / steps["install 1.0.0"])]
    for host, count in sorted(last["restarted_count"].items()):
        row = Row(f"lifecycle.restarted.{host}", f"components the upgrade restarted on {host}", count, "count",
                  note=", ".join(last["restarted"][host]))
        row.goal, row.met = "exactly 1", count == 1
        row.miss = "" if row.met else f"{count} restarted"
        rows.append(row)
    return rows


def _ratio_row(row_id: str, what: str, ours: list[float], refs: list[float], reference: str, unit: str = "s",
               note: str = "") -> Row:
    """Our median against the reference's, with the ratio the median of the per-pair ratios."""
    return Row(row_id, what, median(ours), unit, reference, median(refs), unit,
               median([o / r for o, r in zip(ours, refs)]), runs=list(ours),
               note=f"reference runs: {_secs(refs)}" + (f"; {note}" if note else ""))


def measure_compress(ctx: Context) -> list[Row]:
    """Issue 19: the compressed bundle (format 2, the default) against ``zstd`` of the uncompressed bundle
    (``--compress none``, format 1) of the same release, built in this run: size, build time (against
    ``zstd -3 -T0`` of those bytes), verify (against decompress + sha256 of the same bytes, one thread) and
    import (against decompress + sha256 + write + fsync), peak RSS. Size and build again on the shop 1.0.0
    release (examples/shop: its four real Debian images for amd64 and arm64 and the Debian 12 packages), the
    release the issue's size goal names."""
    if shutil.which("zstd") is None:
        return [Row("compress", "compressed bundle", skipped="no zstd command (scripts/bootstrap installs it)")]
    rows = _compress_pairs(ctx, "compress", "", ctx.gen.app_yml(synth.V1), [f"oci:{ctx.gen.oci}"],
                           verify_import=True)
    from tests.world import shop_images  # the test world's image builder (cached): only the shop rows need it

    try:
        built = shop_images.build_all(("amd64", "arm64"))
    except shop_images.BuildError as exc:
        return rows + [Row("compress.shop", "compressed bundle of shop 1.0.0", skipped=f"shop images: {exc}")]
    shop = REPO_ROOT / "examples" / "shop" / "app-1.0.0.yml"
    return rows + _compress_pairs(ctx, "compress.shop", ", shop 1.0.0", shop, [f"oci:{built.oci_layout}"],
                                  ["--platform", "linux/arm64", "--packages", "debian-12"])


def _compress_pairs(ctx: Context, row_id: str, label: str, model: Path, sources: list[str],
                    extra: list[str] | None = None, verify_import: bool = False) -> list[Row]:
    """Size, build time and peak RSS of the default (compressed) build of ``model`` against ``zstd -3 -T0``
    of its ``--compress none`` bundle, interleaved pairs; with ``verify_import`` also verify and import of the
    compressed bundle (:func:`_compressed_verify_import`). Removes what it wrote."""
    dummy, plain = _build(ctx, model, ctx.work / "plain", sources, [*FORMAT_1, *(extra or [])])
    plain_path = Path(plain["path"])
    zst = ctx.work / "plain.bundle.zst"
    refs: list[ChildRun] = []
    builds: list[ChildRun] = []
    summary: dict[str, Any] = {}
    measure.reread(plain_path)
    for dummy in range(ctx.repeat):
        refs.append(run_child(["zstd", "-3", "-T0", "-q", "-f", str(plain_path), "-o", str(zst)]))
        run, summary = _build(ctx, model, ctx.work / "packed", sources, extra)
        builds.append(run)
        _log(f"{row_id}: zstd -3 -T0 {refs[-1].seconds:.2f} s, build {run.seconds:.2f} s "
             f"(peak RSS {run.max_rss / MIB:.0f} MiB)")
    packed = Path(summary["path"])
    size, ref_size, plain_size = packed.stat().st_size, zst.stat().st_size, plain_path.stat().st_size
    rows = [check_ratio_at_most(Row(
        f"{row_id}.size", f"compressed bundle size vs zstd -3 of the uncompressed bundle of the same release{label}",
        size / MB, "MB", "zstd -3 of the --compress none bundle", ref_size / MB, "MB", size / ref_size,
        note=f"uncompressed bundle {plain_size} bytes; ours {size} ({size / plain_size:.2f} x of it, "
             f"{summary['compression']['blobs']} blobs compressed); zstd -3 {ref_size}"), COMPRESS_SIZE_GOAL)]
    rows.append(check_ratio_at_most(_ratio_row(
        f"{row_id}.build", f"build (zstd, the default) vs zstd -3 -T0 of the uncompressed bundle's bytes{label}",
        [r.seconds for r in builds], [r.seconds for r in refs], "zstd -3 -T0 of the same bytes",
        note=f"build CPU s: {_secs([r.cpu_seconds for r in builds])}; zstd CPU s: "
             f"{_secs([r.cpu_seconds for r in refs])}"), COMPRESS_BUILD_GOAL))
    peak = [r.max_rss / MIB for r in builds]
    rows.append(check_below(Row(f"{row_id}.build.rss", f"compressed build: peak RSS{label}", max(peak), "MiB",
                                runs=peak), RSS_GOAL_MB, "MiB"))
    shutil.rmtree(ctx.work / "plain", ignore_errors=True)
    if verify_import:
        rows += _compressed_verify_import(ctx, packed, zst)
    shutil.rmtree(ctx.work / "packed", ignore_errors=True)
    zst.unlink(missing_ok=True)
    return rows


def _compressed_verify_import(ctx: Context, packed: Path, zst: Path) -> list[Row]:
    refs, verifies = [], []
    for dummy in range(ctx.repeat):
        refs.append(measure.unzstd_files(zst))
        verifies.append(run_child([*ctx.builder, "verify", str(packed), "--pub", str(ctx.pub), "--json"]))
        if not json.loads(verifies[-1].stdout).get("ok"):
            raise BenchError(f"verify of {packed} did not say ok: {verifies[-1].stdout[:500]}")
        _log(f"compress: decompress+sha256 {refs[-1][1]:.2f} s, verify {verifies[-1].seconds:.2f} s")
    nbytes = refs[0][0]
    rows = [check_at_least(Row(
        "compress.verify", "verify of the compressed bundle vs decompress + sha256 of the same bytes",
        _mbps(nbytes, median([v.seconds for v in verifies])), "MB/s", "decompress + sha256 (1 thread)",
        _mbps(nbytes, median([r[1] for r in refs])), "MB/s",
        median([r[1] / v.seconds for r, v in zip(refs, verifies)]), runs=[v.seconds for v in verifies],
        note=f"{nbytes} bytes decompressed; verify wall s {_secs([v.seconds for v in verifies])}, reference "
             f"{_secs([r[1] for r in refs])}; verify peak RSS {max(v.max_rss for v in verifies) / MIB:.0f} MiB"),
        THROUGHPUT_GOAL)]
    if _import_available():
        return rows
    repo = ctx.work / "repo-packed"
    refs, imports = [], []
    for i in range(ctx.repeat):
        shutil.rmtree(repo, ignore_errors=True)
        repo.mkdir(parents=True)
        refs.append(measure.unzstd_files(zst, ctx.work / "floor-unzstd.bin"))
        imports.append(run_child([sys.executable, "-m", "bench.import_child", str(repo), str(packed), str(ctx.pub)],
                                 cwd=REPO_ROOT))
        if not json.loads(imports[-1].stdout).get("changed"):
            raise BenchError(f"import of {packed} reported no change: {imports[-1].stdout[:500]}")
        _log(f"compress: decompress+sha256+write+fsync {refs[-1][1]:.2f} s, import {imports[-1].seconds:.2f} s")
    shutil.rmtree(repo, ignore_errors=True)
    rows.append(check_at_least(Row(
        "compress.import", "import of the compressed bundle vs decompress + sha256 + write + fsync",
        _mbps(nbytes, median([v.seconds for v in imports])), "MB/s", "decompress + sha256 + write + fsync",
        _mbps(nbytes, median([r[1] for r in refs])), "MB/s",
        median([r[1] / v.seconds for r, v in zip(refs, imports)]), runs=[v.seconds for v in imports],
        note=f"import wall s {_secs([v.seconds for v in imports])}, reference {_secs([r[1] for r in refs])}; "
             f"import peak RSS {max(v.max_rss for v in imports) / MIB:.0f} MiB"), THROUGHPUT_GOAL))
    return rows


def measure_by_hand(ctx: Context) -> list[Row]:
    """Issue 19: what users do by hand today, on the same images from the Docker engine: ``skopeo copy`` each
    image into one OCI layout (skopeo gzips the layers), then ``tar | zstd -3``; against our build from the
    engine (signed, verifiable). Twice: on the bench's images (made hard to compress on purpose) and on the
    shop's four real Debian images (examples/shop), the kind of app the issue measured."""
    what = "build from the Docker engine vs skopeo copy into one OCI layout + tar | zstd -3"
    missing = [c for c in ("skopeo", "zstd", "tar") if shutil.which(c) is None]
    if ctx.docker_reason or missing:
        return [Row("byhand", what, skipped=ctx.docker_reason or f"missing {', '.join(missing)} (scripts/bootstrap)")]
    rows = _by_hand(ctx, "byhand", what, ctx.gen.app_yml(synth.V1), ctx.v1_refs(), lambda: _ensure_docker_images(ctx))
    from tests.world import shop_images  # the test world's image builder (cached): only this measurement needs it

    shop = REPO_ROOT / "examples" / "shop" / "app-1.0.0.yml"
    built = shop_images.build_all(("amd64",))
    wanted = {ref: shop_images.image_manifest(built.oci_layout, ref, "amd64")["config"]["digest"]
              for ref in sorted({c["image"] for c in yaml.safe_load(shop.read_text())["components"].values()})}
    return rows + _by_hand(ctx, "byhand.shop", f"{what}, the shop's real images", shop, list(wanted),
                           lambda: _ensure_in_engine(ctx, wanted, built.docker_archives["amd64"]))


def _by_hand(ctx: Context, row_id: str, what: str, model: Path, image_refs: list[str],
             ensure: Callable[[], None]) -> list[Row]:
    layout, out = ctx.work / "byhand-oci", ctx.work / "byhand.tar.zst"
    refs, ours, ref_size, our_size = [], [], 0, 0
    for dummy in range(ctx.repeat):
        shutil.rmtree(layout, ignore_errors=True)
        ensure()  # the engine is shared: check the images are (still) there before each run
        settle()
        start = time.perf_counter()
        for ref in image_refs:
            run_child(["skopeo", "copy", "-q", f"docker-daemon:{ref}", f"oci:{layout}:{ref}"], timeout=3600,
                      settled=True)
        run_child(["sh", "-c", 'tar -C "$1" -cf - . | zstd -3 -T0 -q -f -o "$2"', "sh", str(layout), str(out)],
                  settled=True)
        refs.append(time.perf_counter() - start)
        ref_size = out.stat().st_size
        run, summary = _build(ctx, model, ctx.work / "build-docker-z", ["docker"])
        ours.append(run.seconds)
        our_size = Path(summary["path"]).stat().st_size
        _log(f"{row_id}: skopeo + tar | zstd {refs[-1]:.2f} s ({ref_size / MB:.0f} MB); build from docker "
             f"{run.seconds:.2f} s ({our_size / MB:.0f} MB)")
    shutil.rmtree(layout, ignore_errors=True)
    out.unlink(missing_ok=True)
    shutil.rmtree(ctx.work / "build-docker-z", ignore_errors=True)
    return [check_ratio_at_most(_ratio_row(f"{row_id}.time", f"{what}: time", ours, refs,
                                           f"skopeo copy x {len(image_refs)} + tar | zstd -3"), BY_HAND_TIME_GOAL),
            check_ratio_at_most(Row(f"{row_id}.size", f"{what}: size", our_size / MB, "MB", "the .tar.zst",
                                    ref_size / MB, "MB", our_size / ref_size,
                                    note="ours is signed and verifiable, blob by blob"), BY_HAND_SIZE_GOAL)]


MEASUREMENTS: list[tuple[str, Callable[[Context], list[Row]]]] = [
    ("build", measure_build),      # first: produces ctx.bundle for the others
    ("verify", measure_verify),
    ("size", measure_size),
    ("delta", measure_delta),
    ("import", measure_import),
    ("compress", measure_compress),
    ("byhand", measure_by_hand),
    ("lifecycle", measure_lifecycle),
]
NEEDS_BUILD = {"verify", "size", "delta", "import"}  # they use the bundle measure_build makes


# ----------------------------------------------------------------------------------------------------------
# The run


def _data_summary(gen: synth.Generated) -> dict[str, Any]:
    unique = gen.unique_blobs(synth.V1)
    images = gen.release_images(synth.V1)
    return {
        "setting": gen.settings.name, "key": gen.settings.key(), "path": str(gen.root),
        "release": synth.V1, "images": len(images), "components": gen.settings.components,
        "bases": gen.settings.bases, "unique_blobs": len(unique),
        "unique_bytes": sum(b.size for b in unique.values()),
        "unique_layer_bytes": sum(b.size for b in unique.values() if b.role not in ("index", "manifest", "config")),
        "per_image_bytes": sum(b.size for i in images for b in i.blobs()),
        "text_fraction": gen.settings.text_fraction,
    }


def _conditions(ctx: Context, warmed: int) -> dict[str, Any]:
    mem = measure.machine_info(REPO_ROOT).get("memory_bytes") or 0
    return {
        "cache": f"hot: every input ({warmed / MB:,.0f} MB) was read once before the first measurement and "
                 f"fits in RAM ({mem / 2**30:.0f} GiB), so reads come from the page cache, for the limit and "
                 "the product alike; the builder writes its output to the page cache (no fsync; the copy floor fsyncs)",
        "repeat": ctx.repeat,
        "load_average": {"before": ctx.load_before, "after": list(os.getloadavg())},
        "code": _code_conditions(ctx.code_before, measure.code_state(REPO_ROOT)),
        "docker": ctx.docker_reason or "engine used for the docker references",
        "filesystem": str(ctx.work),
    }


def _code_conditions(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The product is developed in this very tree: say when it changed while the run measured it."""
    changed = (before["trees"], before["product_files_modified"]) != (after["trees"], after["product_files_modified"])
    return {"before": before, "after": after, "changed_during_run": changed,
            "note": ("the builder/core code changed during this run: figures mix two versions" if changed
                     else "the same code throughout the run")}


def prepare(settings: synth.Settings, cache_root: Path | None, repeat: int, use_docker: bool) -> Context:
    gen = synth.generate(settings, cache_root, log=_log)
    work = gen.root.parent / f"work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    builder = _builder_argv()
    run_child([*builder, "keygen", str(work / "bench")])
    reason = _docker_reason() if use_docker else "disabled with --no-docker"
    return Context(gen=gen, work=work, repeat=repeat, key=work / "bench.key", pub=work / "bench.pub",
                   docker_reason=reason, builder=builder)


def run_suite(settings: synth.Settings, *, cache_root: Path | None = None, repeat: int = 3, use_docker: bool = True,
        only: list[str] | None = None, keep: bool = False) -> tuple[list[Row], dict[str, Any]]:
    ctx = prepare(settings, cache_root, repeat, use_docker)
    rows: list[Row] = []
    try:
        warmed = measure.warm(ctx.v1_blob_paths() + [ctx.gen.docker_archive])
        for name, fn in MEASUREMENTS:
            if only and name not in only and not (name == "build" and NEEDS_BUILD & set(only)):
                continue
            _log(f"measuring {name}")
            rows += fn(ctx)
        doc = report.result_doc(rows, setting=settings.name, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                machine=measure.machine_info(REPO_ROOT), data=_data_summary(ctx.gen),
                                conditions=_conditions(ctx, warmed))
        return rows, doc
    finally:
        if not keep:
            _remove_docker_images(ctx)
            shutil.rmtree(ctx.work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description="offline.delivery benchmarks")
    parser.add_argument("--large", action="store_true", help="30 components, ~2 GB (default: 10, ~300 MB)")
    parser.add_argument("--setting", choices=sorted(synth.SETTINGS), help="data set (overrides --large)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results",
                        help="directory of the JSON results (appended to <date>-<setting>.json)")
    parser.add_argument("--docs", type=Path, help="update the generated block of this file (docs/benchmarks.md)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median reported; >= 3)")
    parser.add_argument("--cache", type=Path,
                        help="data cache root (default ${OD_CACHE:-/var/cache/offline-delivery-test}/bench)")
    parser.add_argument("--no-docker", action="store_true", help="skip the docker references")
    parser.add_argument("--only", action="append", choices=[n for n, _ in MEASUREMENTS],
                        help="run only these measurements (build always runs: the others need its bundle)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and loaded docker images")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    settings = synth.SETTINGS[args.setting or ("large" if args.large else "default")]
    try:
        rows, doc = run_suite(settings, cache_root=args.cache, repeat=args.repeat, use_docker=not args.no_docker,
                        only=args.only, keep=args.keep)
    except BenchError as exc:
        sys.stderr.write(f"bench: {exc}\n")
        return 1
    print(report.text_table(rows))
    path = report.append_result(args.out, doc)
    print(f"\nresults appended to {path}")
    if args.docs:
        try:
            shown = str(path.resolve().relative_to(REPO_ROOT))
        except ValueError:
            shown = str(path)
        report.update_docs(args.docs, report.docs_block(doc, shown), settings.name)
        print(f"updated {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
