"""Item 4 of the fault suite: the import's environment fails — the disk fills up, the process is killed
with SIGKILL at any point, two imports run at once.

What must hold: a failed import leaves the site byte for byte as it was (conftest.site_state); a killed
import leaves a catalog that is either the old or the new one, never a broken one, and nothing a later
import trusts without proof; the rerun completes and yields the same tree as a clean import (import
times aside: conftest.normalized_state); two imports never corrupt each other.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from offline_delivery_core.site.repo import RepoError, SiteRepo, import_bundle
from tests.faults import import_child
from tests.faults.conftest import Vendor, normalized_state, site_state, state_diff
from tests.helpers.bundles import members, trust_args

SEED = 11
REPO_ROOT = Path(__file__).resolve().parents[2]


def child(root: Path, bundle: Path, pub: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.faults.import_child", str(root), str(bundle), str(pub),
                             *extra], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, dict[str, object] | None]:
    out, err = proc.communicate(timeout=timeout)
    line = out.strip().splitlines()[-1] if out.strip() else ""
    return proc.returncode, (json.loads(line) if line else None)


def clean_state(vendor: Vendor, tmp: Path, *bundles: Path, module_last: bool = False) -> dict[str, str]:
    """The normalised tree of a site that imported ``bundles`` in order without any fault (the last one
    recorded as imported by the module, when ``module_last``)."""
    repo = SiteRepo(str(tmp / "clean"))
    for i, bundle in enumerate(bundles):
        by = "ansible" if module_last and i == len(bundles) - 1 else "unknown"
        import_bundle(repo, str(bundle), vendor.keys, imported_by=by)
    return normalized_state(Path(repo.root))


def assert_catalog_sound(repo: SiteRepo, allowed: list[set[str]]) -> None:
    """The catalog parses and lists one of the allowed sets of versions (old or new, nothing between)."""
    versions = {r["version"] for r in repo.catalog()["releases"]}
    assert versions in allowed, f"catalog lists {versions}, expected one of {allowed}"


# --------------------------------------------------------------------------------------------------------
# kill -9


def forked_import(root: Path, bundle: Path, keys: list[bytes], kill_at: int | None) -> tuple[int, int]:
    """Run the import in a forked child (no interpreter start: the loop over every step stays fast) with
    import_child's step hooks; returns (wait status, steps counted)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_fd)
            import_child.hook_steps(kill_at)
            import_bundle(SiteRepo(str(root)), str(bundle), keys)
            os.write(write_fd, str(import_child.steps()).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as fh:
        counted = fh.read()
    dummy, status = os.waitpid(pid, 0)
    return status, int(counted or 0)


@pytest.mark.slow
def test_kill_at_every_step_then_rerun_gives_the_clean_tree(vendor: Vendor, tmp_path: Path) -> None:
    """SIGKILL before each filesystem step of an import (fresh repository, then one holding a release)."""
    for label, preload in (("fresh", []), ("holding 0.9.0", [vendor.tiny_base])):
        expected = clean_state(vendor, tmp_path / label, *preload, vendor.tiny)
        template = SiteRepo(str(tmp_path / label / "template"))
        for bundle in preload:
            import_bundle(template, str(bundle), vendor.keys)
        counting = tmp_path / label / "count"
        if preload:
            shutil.copytree(template.root, counting, symlinks=True)
        status, steps = forked_import(counting, vendor.tiny, vendor.keys, None)
        assert status == 0 and steps > 10, (status, steps)
        old = {r["version"] for r in template.catalog()["releases"]} if preload else set()
        for step in range(1, steps + 1):
            root = tmp_path / label / f"kill{step}"
            if preload:
                shutil.copytree(template.root, root, symlinks=True)
            status, dummy = forked_import(root, vendor.tiny, vendor.keys, step)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
                f"step {step} of {steps}: the child was not killed (status {status})"
            repo = SiteRepo(str(root))
            if root.exists() and Path(repo.catalog_path).exists():
                assert_catalog_sound(repo, [old, old | {"1.0.0"}])
            res = import_bundle(repo, str(vendor.tiny), vendor.keys)
            assert res.name == "tiny" and res.version == "1.0.0"
            got = normalized_state(root)
            assert got == expected, f"{label}: kill at step {step} of {steps}, then rerun:\n{state_diff(expected, got)}"
            shutil.rmtree(root)


def test_kill_at_seeded_random_times_during_a_larger_import(vendor: Vendor, tmp_path: Path) -> None:
    """SIGKILL after seeded random delays within a real import's duration (mid-write points the step
    hooks cannot reach), then a rerun."""
    expected = clean_state(vendor, tmp_path, vendor.larger)
    rc, timed = finish(child(tmp_path / "timed", vendor.larger, vendor.pub))
    assert rc == 0 and timed and timed["ok"]
    duration = float(timed["seconds"]) + 0.15  # type: ignore[arg-type]  (plus interpreter start)
    rng = random.Random(SEED)
    for i in range(8):
        root = tmp_path / f"kill{i}"
        proc = child(root, vendor.larger, vendor.pub)
        time.sleep(rng.uniform(0.05, duration))
        proc.send_signal(signal.SIGKILL)
        finish(proc)
        repo = SiteRepo(str(root))
        if Path(repo.catalog_path).exists():
            assert_catalog_sound(repo, [set(), {"2.0.0"}])
        import_bundle(repo, str(vendor.larger), vendor.keys)
        got = normalized_state(root)
        assert got == expected, f"kill {i}, then rerun:\n{state_diff(expected, got)}"


def test_a_damaged_staged_blob_left_by_a_kill_is_not_trusted(vendor: Vendor, tmp_path: Path) -> None:
    """A staged blob left by a killed import is proven again before the rerun publishes it."""
    root = tmp_path / "site"
    rc, counted = finish(child(tmp_path / "count", vendor.larger, vendor.pub, "--count"))
    assert rc == 0 and counted
    staged: list[Path] = []
    for step in range(int(counted["steps"]) // 2, int(counted["steps"])):  # type: ignore[arg-type]
        shutil.rmtree(root, ignore_errors=True)
        finish(child(root, vendor.larger, vendor.pub, "--kill-at", str(step)))
        staged = [p for p in (root / "staging").rglob("*") if p.is_file() and "." not in p.name]
        if len(staged) >= 2:
            break
    assert staged, "no kill point left staged blobs"
    victim = staged[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content: what a size check alone would trust
    victim.write_bytes(data)
    repo = SiteRepo(str(root))
    import_bundle(repo, str(vendor.larger), vendor.keys)
    published = Path(repo.blob_file("sha256:" + victim.name))
    assert published.exists()
    import hashlib
    assert hashlib.sha256(published.read_bytes()).hexdigest() == victim.name, "a damaged staged blob was published"
    assert normalized_state(root) == clean_state(vendor, tmp_path, vendor.larger)


# --------------------------------------------------------------------------------------------------------
# Two imports at once


@pytest.mark.parametrize("pair", ["same", "different", "bad-and-good"])
def test_two_imports_at_once_never_corrupt_the_site(vendor: Vendor, tmp_path: Path, pair: str) -> None:
    """Both start at the same moment (a go-file), repeatedly, on a fresh and on a used repository."""
    bad = tmp_path / "bad.bundle"
    data = bytearray(vendor.larger.read_bytes())
    last = members(vendor.larger)[-1]
    data[last.data_offset + last.size // 2] ^= 0x01  # inside the last blob
    bad.write_bytes(data)
    first, second = {"same": (vendor.larger, vendor.larger), "different": (vendor.larger, vendor.tiny),
                     "bad-and-good": (bad, vendor.larger)}[pair]
    want_ok = {"same": [first], "different": [first, second], "bad-and-good": [second]}[pair]
    for round_ in range(4):
        root = tmp_path / f"round{round_}"
        if round_ % 2:  # a used repository
            import_bundle(SiteRepo(str(root)), str(vendor.tiny_base), vendor.keys)
        go = tmp_path / f"go{round_}"
        procs = [child(root, b, vendor.pub, "--go", str(go)) for b in (first, second, first)]
        time.sleep(0.4)
        go.touch()
        results = [finish(p) for p in procs]
        for rc, res in results:
            assert rc == 0 and res is not None, results
            if not res["ok"]:
                assert "tampered" in str(res["error"]) or "another import holds" in str(res["error"]), res
        repo = SiteRepo(str(root))
        expected_versions = {"0.9.0"} if round_ % 2 else set()
        expected_versions |= {"2.0.0" if b is vendor.larger else "1.0.0" for b in want_ok}
        assert {r["version"] for r in repo.catalog()["releases"]} == expected_versions, results
        preload = [vendor.tiny_base] if round_ % 2 else []
        expected = clean_state(vendor, tmp_path / f"clean{round_}", *preload, *want_ok)
        got = normalized_state(root)
        assert got == expected, f"round {round_}:\n{state_diff(expected, got)}\n{results}"


def test_a_waiting_import_gives_up_cleanly_after_its_timeout(vendor: Vendor, tmp_path: Path) -> None:
    repo = SiteRepo(str(tmp_path / "site"))
    import_bundle(repo, str(vendor.tiny_base), vendor.keys)
    before = site_state(Path(repo.root))
    with repo.lock(5):
        rc, res = finish(child(Path(repo.root), vendor.tiny, vendor.pub, "--lock-timeout", "0.5"))
    assert rc == 0 and res and not res["ok"] and "another import holds the lock" in str(res["error"]), res
    assert "wait for it and run again" in str(res["error"])
    assert site_state(Path(repo.root)) == before


# --------------------------------------------------------------------------------------------------------
# Disk full: the repository on a small tmpfs (root only); a filler file leaves a chosen amount free


@contextmanager
def small_tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    mountpoint.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "fault-tmpfs", str(mountpoint)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the disk-full cases need root")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], check=False, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False, timeout=30)  # busy: detach it
        assert not os.path.ismount(mountpoint), f"could not unmount {mountpoint}"


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int) -> None:
    """Write a filler file so that about ``leave`` bytes stay free on path's filesystem."""
    filler = path / "filler"
    with open(filler, "ab") as fh:
        want = max(0, free_bytes(path) - leave)
        block = b"\0" * 65536
        while want > 0:
            n = min(want, len(block))
            try:
                fh.write(block[:n])
                fh.flush()
            except OSError:
                break
            want -= n


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_at_every_point_refuses_cleanly_and_the_rerun_completes(vendor: Vendor, tmp_path: Path) -> None:
    expected = clean_state(vendor, tmp_path, vendor.tiny_base, vendor.larger)
    need = sum(int(p.split(" ")[1]) for p in site_state(tmp_path / "clean").values() if p.count(" ") == 2)
    with small_tmpfs(tmp_path / "mnt", "4m") as mnt:
        root = mnt / "site"
        outcomes = {"refused": 0, "imported": 0, "refused writing the record": 0}
        # 4 KiB steps (the tmpfs page) from nothing free to more than enough: ENOSPC strikes in every
        # phase, staging each blob as well as writing the release record and the catalog
        for leave in range(0, need + 64 * 1024, 4096):
            shutil.rmtree(root, ignore_errors=True)
            (mnt / "filler").unlink(missing_ok=True)
            repo = SiteRepo(str(root))
            import_bundle(repo, str(vendor.tiny_base), vendor.keys)
            fill(mnt, leave)
            before = site_state(root)
            try:
                import_bundle(repo, str(vendor.larger), vendor.keys)
                outcomes["imported"] += 1
            except (RepoError, OSError) as exc:
                outcomes["refused"] += 1
                outcomes["refused writing the record"] += "release record" in str(exc)
                assert "no space left" in str(exc).lower() and "free space" in str(exc), exc
                after = site_state(root)
                assert after == before, \
                    f"leave {leave}: the failed import changed the site:\n{state_diff(before, after)}"
                (mnt / "filler").unlink()
                import_bundle(repo, str(vendor.larger), vendor.keys)
            got = normalized_state(root)
            assert got == expected, f"leave {leave}:\n{state_diff(expected, got)}"
        assert outcomes["refused"] >= 3 and outcomes["imported"] >= 1, outcomes
        assert outcomes["refused writing the record"] >= 1, outcomes


# --------------------------------------------------------------------------------------------------------
# The same through the module a user runs: ansible ... -m offline.delivery.bundle_import, killed, rerun


def ansible_import(collections: Path, bundle: Path, root: Path, pub: Path) -> subprocess.Popen[str]:
    """The bundle_import module through the ansible command, in its own process group (so the kill
    reaches the module's process too)."""
    args = {"path": str(bundle), "repo_root": str(root), **trust_args(pub)}
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(collections), ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="false", ANSIBLE_PYTHON_INTERPRETER=sys.executable)
    return subprocess.Popen([str(Path(sys.executable).parent / "ansible"), "localhost", "-i", "localhost,", "-c",
                             "local", "-o", "-m", "offline.delivery.bundle_import", "-a", json.dumps(args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_killed_module_run_then_module_rerun_gives_the_clean_tree(vendor: Vendor, tmp_path: Path,
                                                                  collections_path: Path) -> None:
    expected = clean_state(vendor, tmp_path, vendor.tiny_base, vendor.larger, module_last=True)
    started = time.monotonic()
    proc = ansible_import(collections_path, vendor.larger, tmp_path / "timed", vendor.pub)
    proc.communicate(timeout=300)
    assert proc.returncode == 0
    duration = time.monotonic() - started
    rng = random.Random(SEED)
    for i in range(3):
        root = tmp_path / f"site{i}"
        import_bundle(SiteRepo(str(root)), str(vendor.tiny_base), vendor.keys)
        proc = ansible_import(collections_path, vendor.larger, root, vendor.pub)
        # the import itself is the last part of a module run: aim most kills there
        time.sleep(max(0.0, duration - rng.uniform(0.0, 0.8)))
        os.killpg(proc.pid, signal.SIGKILL)  # the group of the ansible process this test started
        proc.communicate(timeout=60)
        assert_catalog_sound(SiteRepo(str(root)), [{"0.9.0"}, {"0.9.0", "2.0.0"}])
        rerun = ansible_import(collections_path, vendor.larger, root, vendor.pub)
        out, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, out + err
        got = normalized_state(root)
        assert got == expected, f"module kill {i}, then rerun:\n{state_diff(expected, got)}"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_mount_point_as_the_root_stays_as_it_was_when_the_first_import_does_not_fit(vendor: Vendor,
                                                                                       tmp_path: Path) -> None:
    """The repo root is the (empty) tmpfs itself: a refused first import removes the layout it made,
    never the mount point, and a bundle that fits imports afterwards."""
    with small_tmpfs(tmp_path / "root", "192k") as root:
        before = site_state(root)
        repo = SiteRepo(str(root))
        with pytest.raises(RepoError, match="no space left .* free space and run the import again"):
            import_bundle(repo, str(vendor.larger), vendor.keys)
        assert site_state(root) == before and os.path.ismount(root)
        assert import_bundle(repo, str(vendor.tiny), vendor.keys).changed
        assert os.path.ismount(root)


def test_two_module_runs_at_once(vendor: Vendor, tmp_path: Path, collections_path: Path) -> None:
    """Two ``ansible … bundle_import`` runs of the same release into a fresh root: one imports, the other
    waits for the lock and then finds nothing to do; the tree is that of one clean import."""
    root = tmp_path / "site"
    procs = [ansible_import(collections_path, vendor.larger, root, vendor.pub) for dummy in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(out.split("=> ", 1)[1]) for out, dummy in outs]
    assert sorted(r["changed"] for r in results) == [False, True], results
    assert "already imported" in next(r["msg"] for r in results if not r["changed"])
    got = normalized_state(root)
    expected = clean_state(vendor, tmp_path, vendor.larger, module_last=True)
    assert got == expected, state_diff(expected, got)
