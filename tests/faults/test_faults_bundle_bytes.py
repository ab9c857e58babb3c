"""Item 1 of the fault suite: damaged, truncated, re-ordered, swapped, replayed and badly signed bundles.

Every case asserts a clear refusal (naming the member, part or offset and what to do) and, where it goes
through an import, an unchanged site (conftest.site_state: every path, mode, size and content hash).
The exhaustive and sampled loops use the verify API the import runs first; a stratified subset goes
through SiteRepo imports and a few through the ``bundle_import`` module, as a user runs it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest

from offline_delivery_core.bundle import format as bf
from offline_delivery_core.bundle.format import BundleError
from offline_delivery_core.site.repo import SiteRepo, import_bundle
from tests.faults.conftest import (Vendor, assert_unchanged, copy_to, import_args, refused_import, run_module,
                                   site_state)
from tests.helpers.bundles import Member, members, truncate_copy

SEED = 7  # every random choice below derives from it: a failure reproduces exactly
# The first bytes of a zstd frame: magic number, frame header descriptor, window descriptor.
ZSTD_HEADER = 6
ACTIONS = ("refuse", "copy", "rebuild", "get ", "not a bundle", "damaged", "altered", "ask the vendor")


def regions(bundle: Path) -> list[tuple[str, int, int, Member | None]]:
    """(kind, start, end, member) for every byte range of a bundle: header, data, padding, end marker."""
    out: list[tuple[str, int, int, Member | None]] = []
    for m in members(bundle):
        out.append(("header", m.header_offset, m.data_offset, m))
        out.append(("data", m.data_offset, m.data_offset + m.size, m))
        pad = -m.size % 512
        if pad:
            out.append(("padding", m.data_offset + m.size, m.data_offset + m.size + pad, m))
    last = out[-1][2]
    out.append(("end", last, bundle.stat().st_size, None))
    return out


def region_of(regs: list[tuple[str, int, int, Member | None]], pos: int) -> tuple[str, Member | None]:
    for kind, start, end, m in regs:
        if start <= pos < end:
            return kind, m
    raise AssertionError(f"offset {pos} is in no region")


def clarity_problem(err: BundleError, kind: str, m: Member | None) -> str | None:
    """Why an error is not clear enough for where the byte was flipped (None: it is)."""
    text = str(err)
    if err.member is None and err.offset is None:
        return f"names neither member nor offset: {text}"
    if not any(word in text for word in ACTIONS):
        return f"does not say what to do: {text}"
    if kind == "data" and m is not None and m.name.startswith("blobs/"):
        if err.member != m.name:
            return f"a damaged blob must be named ({m.name}), got member {err.member}: {text}"
    if kind == "data" and m is not None and m.name in (bf.MANIFEST_NAME, bf.SIGNATURE_NAME):
        if "manifest" not in text:
            return f"a damaged manifest/signature must be named: {text}"
    return None


def xor_for(pos: int) -> int:
    """The non-zero value XORed into the byte at ``pos``: seeded per position, so any split of the loop
    flips exactly the same bytes the same way."""
    return random.Random(SEED * 1_000_003 + pos).randrange(1, 256)


def flip_positions(bundle: Path, positions: list[int], keys: list[bytes], scratch: Path,
                   workers: int = 1) -> list[str]:
    """Flip one byte at each position in turn; return every problem found. With ``workers`` > 1 the
    positions are split over forked processes: verify hands blobs to hashing threads, so one process
    mostly waits for thread hand-offs, and a few overlap those waits (same CPU, a fraction of the time)."""
    if workers > 1:
        return _forked(lambda share, d: flip_positions(bundle, share, keys, d), positions, scratch, workers)
    data = bundle.read_bytes()
    regs = regions(bundle)
    problems = []
    bad = scratch / bundle.name
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= xor_for(pos)
        bad.write_bytes(flipped)
        kind, m = region_of(regs, pos)
        try:
            bf.verify_bundle(str(bad), keys)
        except BundleError as err:
            why = clarity_problem(err, kind, m)
            if why:
                problems.append(f"offset {pos} ({kind} of {m.name if m else '-'}): {why}")
            continue
        if kind == "data" and m is not None and m.name.endswith(bf.ZSTD_SUFFIX) and pos - m.data_offset < ZSTD_HEADER:
            continue  # a bit of the frame header (window size) the content does not depend on: the verify proved
            # that the member still decompresses to the signed digest, so the site gets the signed bytes
        problems.append(f"offset {pos} ({kind} of {m.name if m else '-'}): flipped byte ACCEPTED")
    return problems


def _forked(work: Callable[[list[int], Path], list[str]], positions: list[int], scratch: Path,
            workers: int) -> list[str]:
    """Run ``work`` on ``workers`` interleaved shares of ``positions`` in forked children; their
    problems come back as JSON through pipes. A child that dies reports that instead."""
    children = []
    for w in range(workers):
        share_dir = scratch / f"worker{w}"
        share_dir.mkdir()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                os.close(read_fd)
                with os.fdopen(write_fd, "w") as out:
                    json.dump(work(positions[w::workers], share_dir), out)
            finally:
                os._exit(0)
        os.close(write_fd)
        children.append((pid, read_fd))
    problems: list[str] = []
    for w, (pid, read_fd) in enumerate(children):
        with os.fdopen(read_fd) as fh:
            text = fh.read()
        dummy, status = os.waitpid(pid, 0)
        problems += json.loads(text) if text else [f"worker {w} died (wait status {status})"]
    return problems


@pytest.mark.slow
def test_every_single_byte_flip_of_a_small_bundle_is_refused(vendor: Vendor, tmp_path: Path) -> None:
    """Exhaustive: each of the ~11 000 bytes (manifest, signature, each blob, headers, padding, end marker)."""
    size = vendor.tiny.stat().st_size
    assert size < 16_384, "keep the exhaustive bundle small (the loop is one verify per byte)"
    kinds = {kind for kind, *_ in regions(vendor.tiny)}
    assert kinds == {"header", "data", "padding", "end"}
    problems = flip_positions(vendor.tiny, list(range(size)), vendor.keys, tmp_path, workers=4)
    assert not problems, f"{len(problems)} of {size} flips:\n" + "\n".join(problems[:30])


def test_sampled_byte_flips_of_a_larger_bundle_are_refused(vendor: Vendor, tmp_path: Path) -> None:
    """Two components, two platforms: every header and padding area plus 300 seeded random offsets."""
    rng = random.Random(SEED)
    regs = regions(vendor.larger)
    spots = {rng.randrange(start, end) for kind, start, end, dummy in regs if end > start}
    spots |= {rng.randrange(vendor.larger.stat().st_size) for dummy in range(300)}
    problems = flip_positions(vendor.larger, sorted(spots), vendor.keys, tmp_path)
    assert not problems, "\n".join(problems[:30])


def test_byte_flips_through_the_import_leave_the_site_unchanged(vendor: Vendor, site: SiteRepo,
                                                                tmp_path: Path) -> None:
    """One flip in every region of the bundle, through a real import into a site holding a release."""
    rng = random.Random(SEED)
    data = vendor.tiny.read_bytes()
    for kind, start, end, m in regions(vendor.tiny):
        for pos in sorted({start, end - 1, rng.randrange(start, end)}):
            flipped = bytearray(data)
            flipped[pos] ^= 0x01 << rng.randrange(8)
            bad = tmp_path / vendor.tiny.name
            bad.write_bytes(flipped)
            err = refused_import(site, bad, vendor.keys)
            assert isinstance(err, BundleError), f"{kind} offset {pos}: {err}"
    assert [r["version"] for r in site.catalog()["releases"]] == ["0.9.0"]


def test_truncation_at_seeded_random_offsets_is_refused(vendor: Vendor, site: SiteRepo, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    for bundle, count in ((vendor.tiny, 60), (vendor.larger, 40)):
        size = bundle.stat().st_size
        cuts = sorted({rng.randrange(size) for dummy in range(count)} | {0, size - 1})
        for cut in cuts:
            short = truncate_copy(bundle, tmp_path / bundle.name, cut)
            err = refused_import(site, short, vendor.keys)
            assert isinstance(err, BundleError) and err.offset is not None, (cut, err)
            assert any(w in str(err) for w in ("truncated", "ends before", "must be manifest.json")), (cut, err)


def split_copy(vendor: Vendor, dst: Path) -> tuple[Path, list[Path]]:
    """A copy of the split set in ``dst``: (parts.json, part files in order)."""
    dst.mkdir()
    doc = json.loads(vendor.parts.read_text())
    for name in [p["name"] for p in doc["parts"]] + [vendor.parts.name]:
        shutil.copyfile(vendor.parts.parent / name, dst / name)
    return dst / vendor.parts.name, [dst / p["name"] for p in doc["parts"]]


@pytest.mark.parametrize("fault", ["missing", "swapped", "duplicated", "truncated", "extra-bytes", "listed-out-of-order",
                                   "listed-twice"])
def test_split_set_faults_name_the_part(vendor: Vendor, site: SiteRepo, tmp_path: Path, fault: str) -> None:
    parts_json, parts = split_copy(vendor, tmp_path / "media")
    assert len(parts) >= 4
    victim = parts[2]
    if fault == "missing":
        victim.unlink()
    elif fault == "swapped":  # the operator copied the parts under each other's names
        a, b = parts[1].read_bytes(), parts[2].read_bytes()
        parts[1].write_bytes(b)
        parts[2].write_bytes(a)
        victim = parts[1]
    elif fault == "duplicated":  # the same part copied twice, over its neighbour
        shutil.copyfile(parts[1], parts[2])
    elif fault == "truncated":
        victim.write_bytes(victim.read_bytes()[:-1000])
    elif fault.startswith("listed"):  # parts.json edited: two entries swapped, or one part listed twice
        doc = json.loads(parts_json.read_text())
        if fault == "listed-out-of-order":
            doc["parts"][1], doc["parts"][2] = doc["parts"][2], doc["parts"][1]
        else:
            doc["parts"].insert(2, dict(doc["parts"][1]))
        parts_json.write_text(json.dumps(doc))
    else:
        victim.write_bytes(victim.read_bytes() + b"\0" * 512)
    # every way a user names a split set: parts.json, the first part, any part
    for entry in (parts_json, parts[0], parts[-1]):
        err = refused_import(site, entry, vendor.keys)
        assert isinstance(err, BundleError), (entry, err)
        if fault.startswith("listed"):  # the list itself is named, with the entry out of place
            assert parts_json.name in str(err) and "entry 2 of 'parts'" in str(err) if fault == "listed-twice" \
                else "entry 1 of 'parts'" in str(err), err
            assert "the list was edited" in str(err), err
        else:
            assert err.member == victim.name and "copy" in str(err), (entry, err)


def test_a_blob_swapped_for_another_valid_blob_is_refused(vendor: Vendor, site: SiteRepo, tmp_path: Path) -> None:
    """Each blob's content replaced by another blob's (same size padded by the tar), and each member
    renamed to another listed blob: the manifest's digest for that slot is what counts."""
    ms = [m for m in members(vendor.larger) if m.name.startswith("blobs/")]
    data = vendor.larger.read_bytes()
    same_size = [(a, b) for a in ms for b in ms if a is not b and a.size == b.size]
    pairs = same_size[:4] + [(ms[i], ms[i + 1]) for i in range(0, len(ms) - 1, 3)]
    for victim, donor in pairs:
        if victim.size == donor.size:
            bad = bytearray(data)
            donor_bytes = data[donor.data_offset:donor.data_offset + donor.size]
            bad[victim.data_offset:victim.data_offset + victim.size] = donor_bytes
            expect = victim.name
        else:  # rename the member: the reader meets a listed blob out of its place
            bad = bytearray(data)
            hdr = bf.tar_header(donor.name, victim.size)
            bad[victim.header_offset:victim.header_offset + 512] = hdr
            expect = donor.name
        path = tmp_path / vendor.larger.name
        path.write_bytes(bad)
        err = refused_import(site, path, vendor.keys)
        assert isinstance(err, BundleError) and err.member == expect, err
        assert "refuse" in str(err) or "out of order" in str(err), err


def test_replayed_older_release_keeps_its_own_identity(vendor: Vendor, site: SiteRepo, tmp_path: Path) -> None:
    """An old signed bundle renamed as the new release is imported as what it is (the signed manifest
    names it), never as the name on the file; spliced manifests and signatures are refused."""
    import_bundle(site, str(vendor.tiny_next), vendor.keys)
    # Splices first (once 1.0.0 is imported its manifest would be a no-op): the old manifest and signature
    # in front of the new release's blobs, and the new manifest with the old signature.
    old, new = vendor.tiny.read_bytes(), vendor.tiny_next.read_bytes()
    old_head = members(vendor.tiny)[2].header_offset
    new_head = members(vendor.tiny_next)[2].header_offset
    new_sig = members(vendor.tiny_next)[1]
    old_sig = members(vendor.tiny)[1]
    for name, spliced, match in (
            ("old-head", old[:old_head] + new[new_head:], "out of order|not listed|tampered"),
            ("new-manifest-old-sig", new[:new_sig.header_offset] + old[old_sig.header_offset:old_head]
             + new[new_head:], "signature does not match"),
    ):
        path = tmp_path / f"{name}.bundle"
        path.write_bytes(spliced)
        err = refused_import(site, path, vendor.keys)
        assert isinstance(err, BundleError), err
        assert re.search(match, str(err)), (name, err)
    catalog_next = {r["version"]: r for r in site.catalog()["releases"]}["1.1.0"]
    renamed = copy_to(vendor.tiny, tmp_path / "tiny-1.1.0.bundle")
    res = import_bundle(site, str(renamed), vendor.keys)
    assert (res.name, res.version) == ("tiny", "1.0.0"), "identity comes from the signed manifest only"
    by_version = {r["version"]: r for r in site.catalog()["releases"]}
    assert by_version["1.1.0"] == catalog_next, "the newer release's record must not change"
    assert by_version["1.0.0"]["manifestDigest"] == res.manifest_digest


def test_unsigned_and_foreign_signed_bundles_are_refused(vendor: Vendor, site: SiteRepo) -> None:
    err = refused_import(site, vendor.unsigned, vendor.keys)
    assert err.member == bf.SIGNATURE_NAME and "unsigned" in str(err) and "--sign-key" in str(err)
    err = refused_import(site, vendor.foreign, vendor.keys)
    assert err.member == bf.SIGNATURE_NAME and "not one of the trusted keys" in str(err)
    # a bundle the site does trust still imports afterwards: nothing was poisoned
    assert import_bundle(site, str(vendor.tiny), vendor.keys).changed


@pytest.mark.parametrize("case", ["flipped-blob", "unsigned", "foreign-key", "missing-part"])
def test_the_import_module_refuses_and_leaves_the_site_unchanged(vendor: Vendor, site: SiteRepo, tmp_path: Path,
                                                                collections_path: Path, case: str) -> None:
    """The same refusals through ``ansible localhost -m offline.delivery.bundle_import``."""
    if case == "flipped-blob":
        last = members(vendor.tiny)[-1]
        bundle = copy_to(vendor.tiny, tmp_path / vendor.tiny.name)
        data = bytearray(bundle.read_bytes())
        data[last.data_offset + 7] ^= 0x80
        bundle.write_bytes(data)
        expect = [last.name, "tampered"]
    elif case == "unsigned":
        bundle, expect = vendor.unsigned, ["unsigned", "--sign-key"]
    elif case == "foreign-key":
        bundle, expect = vendor.foreign, ["not one of the trusted keys"]
    else:
        parts_json, parts = split_copy(vendor, tmp_path / "media")
        parts[1].unlink()
        bundle, expect = parts_json, [parts[1].name, "missing"]
    before = site_state(Path(site.root))
    rc, res = run_module(collections_path, "bundle_import", import_args(bundle, site, vendor.pub))
    assert rc != 0 and not res.get("changed"), res
    assert "repository unchanged" in res["msg"] and all(e in res["msg"] for e in expect), res["msg"]
    assert_unchanged(Path(site.root), before, f"module import ({case})")
