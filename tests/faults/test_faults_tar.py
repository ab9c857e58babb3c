"""Item 2 of the fault suite: hand-crafted tar attacks, through a real import into a site.

Each crafted bundle is refused with an error naming the member (or offset) and saying to refuse it; the
site is byte for byte as it was; nothing appears anywhere else under the test's directory (the escape
targets stay absent); the bombs are refused with bounded time and memory (measured in a child process).
Positions: before the manifest (nothing trusted yet), right after a valid signed manifest and signature
(the reader's checks after trust), and in place of the first blob.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

import pytest

from offline_delivery_core.bundle import format as bf
from offline_delivery_core.bundle.format import BundleError
from offline_delivery_core.site.repo import SiteRepo
from tests.faults.conftest import Vendor, refused_import, site_state
from tests.helpers.bundles import members

END = b"\0" * 1024


def header(name: str, *, size: int = 0, type_: bytes = tarfile.REGTYPE, mode: int = 0o644, linkname: str = "",
           fmt: int = tarfile.USTAR_FORMAT, pax: dict[str, str] | None = None) -> bytes:
    """Raw header block(s) for one member, the way ordinary tar writers make them."""
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode, info.linkname, info.mtime = size, type_, mode, linkname, 0
    if type_ in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    if pax:
        info.pax_headers = pax
    return info.tobuf(fmt, "utf-8", "surrogateescape")


def member(name: str, data: bytes = b"", **kw: object) -> bytes:
    return header(name, size=len(data), **kw) + data + b"\0" * (-len(data) % 512)  # type: ignore[arg-type]


def signed_head(vendor: Vendor) -> bytes:
    """manifest.json and manifest.sig of the real tiny bundle: a trusted start."""
    return vendor.tiny.read_bytes()[:members(vendor.tiny)[2].header_offset]


def escape(tmp: Path) -> Path:
    return tmp / "escape"


# name -> (attack bytes given the escape dir and the first blob's name, expected message)
ATTACKS: dict[str, tuple[Callable[[Path, str], bytes], str]] = {
    "dotdot": (lambda e, b: member("../../escape/evil", b"x"), r"contains '\.\.'"),
    "dotdot-in-blob-path": (lambda e, b: member("blobs/sha256/../../../escape/evil", b"x"), r"contains '\.\.'"),
    "absolute": (lambda e, b: member(str(e / "evil"), b"x"), "has an absolute path"),
    "symlink-out": (lambda e, b: header(b, type_=tarfile.SYMTYPE, linkname=str(e)) + member(b + "/evil", b"x"),
                    "is a symbolic link pointing to"),
    "symlink-relative": (lambda e, b: header("blobs/sha256", type_=tarfile.SYMTYPE, linkname="../../escape"),
                         "is a symbolic link pointing to '../../escape'"),
    "hardlink-out": (lambda e, b: header(b, type_=tarfile.LNKTYPE, linkname="/etc/shadow"),
                     "is a hard link pointing to '/etc/shadow'"),
    "char-device": (lambda e, b: header(b, type_=tarfile.CHRTYPE), "is a character device"),
    "block-device": (lambda e, b: header(b, type_=tarfile.BLKTYPE), "is a block device"),
    "fifo": (lambda e, b: header(b, type_=tarfile.FIFOTYPE), "is a FIFO"),
    "directory": (lambda e, b: header("blobs/sha256", type_=tarfile.DIRTYPE), "is a directory"),
    "setuid": (lambda e, b: member(b, b"x", mode=0o4755), "setuid/setgid"),
    "setgid": (lambda e, b: member(b, b"x", mode=0o2755), "setuid/setgid"),
    "gnu-longname": (lambda e, b: member("blobs/sha256/" + "a" * 64 + "/" + "x" * 120, b"x",
                                         fmt=tarfile.GNU_FORMAT), "GNU long name"),
    "sparse": (lambda e, b: header(b, type_=tarfile.GNUTYPE_SPARSE), "GNU sparse file"),
    "global-pax": (lambda e, b: _typed("pax_global_header", b"g", b"17 path=../../x\n"), "global PAX header"),
    "pax-path-dotdot": (lambda e, b: member("innocent", b"x", fmt=tarfile.PAX_FORMAT,
                                            pax={"path": "../../escape/evil"}),
                        # a PAX path is never honoured: the member is still 'innocent', which no bundle has
                        r"'innocent' is not allowed in a bundle"),
    "pax-path-absolute": (lambda e, b: member("innocent", b"x", fmt=tarfile.PAX_FORMAT,
                                              pax={"path": str(e / "evil")}), r"'innocent' is not allowed in a bundle"),
    "pax-huge-size": (lambda e, b: member(b, b"", fmt=tarfile.PAX_FORMAT, pax={"size": str(10 ** 18)}),
                      r"is \d+ bytes, the manifest says|unexpected member|more than|not listed|"
                      r"the PAX header before .* is not the one bundle-builder writes"),
    "pax-header-too-long": (lambda e, b: member(b, b"x", fmt=tarfile.PAX_FORMAT, pax={"comment": "c" * 70_000}),
                            "unreasonably large"),
    "base256-size": (lambda e, b: _base256_size(b), "base-256"),
    "unlisted-name": (lambda e, b: member("etc/cron.d/evil", b"* * * * * root sh\n"), "not allowed in a bundle"),
}


def _typed(name: str, typeflag: bytes, data: bytes) -> bytes:
    """A member with any type flag (tarfile will not write some of them by themselves)."""
    raw = bytearray(header(name, size=len(data)))
    raw[156:157] = typeflag
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw)
    return bytes(raw) + data + b"\0" * (-len(data) % 512)


def _base256_size(name: str) -> bytes:
    raw = bytearray(header(name))
    raw[124:136] = b"\x80" + (2 ** 40).to_bytes(11, "big")  # GNU base-256: 1 TiB
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw)
    return bytes(raw)


@pytest.mark.parametrize("where", ["first", "after-signature", "instead-of-blob"])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_crafted_tar_is_refused_and_nothing_escapes(vendor: Vendor, site: SiteRepo, tmp_path: Path,
                                                    attack: str, where: str) -> None:
    make, match = ATTACKS[attack]
    blob = members(vendor.tiny)[2]
    evil = make(escape(tmp_path), blob.name)
    data = vendor.tiny.read_bytes()
    if where == "first":
        crafted = evil + data
    elif where == "after-signature":
        crafted = signed_head(vendor) + evil + data[blob.header_offset:]
    else:
        end = blob.data_offset + blob.size + (-blob.size % 512)
        crafted = signed_head(vendor) + evil + data[end:]
    bundle = tmp_path / "evil.bundle"
    bundle.write_bytes(crafted)
    outside = site_state(tmp_path)
    err = refused_import(site, bundle, vendor.keys)
    assert isinstance(err, BundleError), err
    if where == "first" and attack not in ("gnu-longname", "global-pax", "base256-size", "pax-header-too-long"):
        # before the manifest, any other first member is refused as "not a bundle" or by the member check
        assert err.offset == 0 or err.member is not None, err
    else:
        import re
        assert re.search(match, str(err)) or "must be manifest.json" in str(err), (attack, where, err)
    assert err.member is not None or err.offset is not None, err
    assert site_state(tmp_path) == outside, "something was written outside the site"
    assert not escape(tmp_path).exists()


# --------------------------------------------------------------------------------------------------------
# Bombs: bounded time and memory, measured in a child process running the real import

# The child's own peak is VmHWM of its own address space: ru_maxrss would not do, as Linux carries the forking
# process's high-water mark (pytest's, hundreds of MiB late in a run) into the child across exec.
CHILD = r"""
import json, sys, time
from offline_delivery_core.bundle.format import BundleError
from offline_delivery_core.site.repo import RepoError, SiteRepo, import_bundle
from offline_delivery_core.bundle.ed25519 import load_public_key_files
t = time.monotonic()
try:
    import_bundle(SiteRepo(sys.argv[1]), sys.argv[2], load_public_key_files([sys.argv[3]]))
    error = None
except (BundleError, RepoError) as exc:
    error = str(exc)
hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"error": error, "seconds": time.monotonic() - t, "peak_rss_mib": hwm_kib / 1024}))
"""


def child_import(site: SiteRepo, bundle: Path, pub: Path) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", CHILD, site.root, str(bundle), str(pub)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def write_member_count_bomb(path: Path, head: bytes, count: int) -> None:
    """``count`` empty members named like blobs after a valid head, streamed to disk."""
    with open(path, "wb") as fh:
        fh.write(head)
        for i in range(count):
            fh.write(header(bf.BLOB_PREFIX + f"{i:064x}"))
        fh.write(END)


def write_pax_chain(path: Path, head: bytes, count: int) -> None:
    """``count`` consecutive PAX headers of ~60 KiB each (a bundle never has two in a row)."""
    block = header("blobs/sha256/" + "b" * 64, fmt=tarfile.PAX_FORMAT, pax={"comment": "p" * 60_000})
    pax_only = block[:-512]  # the extended header and its records, without the member header
    with open(path, "wb") as fh:
        fh.write(head)
        for dummy in range(count):
            fh.write(pax_only)
        fh.write(END)


@pytest.mark.parametrize("bomb", ["member-count", "declared-size", "pax-size", "pax-chain"])
def test_bombs_are_refused_with_bounded_time_and_memory(vendor: Vendor, site: SiteRepo, tmp_path: Path,
                                                         bomb: str) -> None:
    bundle = tmp_path / "bomb.bundle"
    head = signed_head(vendor)
    if bomb == "member-count":       # 200 000 members (100 MB of headers)
        write_member_count_bomb(bundle, head, 200_000)
    elif bomb == "declared-size":    # manifest.json claims 8 GiB - 1
        bundle.write_bytes(bf.tar_header("manifest.json", 8 ** 11 - 1) + b"{" * 4096)
    elif bomb == "pax-size":         # a PAX size record of 10^18 for the manifest
        bundle.write_bytes(header("manifest.json", fmt=tarfile.PAX_FORMAT, pax={"size": str(10 ** 18)}) + END)
    else:                            # 300 chained PAX headers (18 MB) before any member
        write_pax_chain(bundle, head, 300)
    before = site_state(Path(site.root))
    started = time.monotonic()
    res = child_import(site, bundle, vendor.pub)
    assert res["error"], f"{bomb} was accepted"
    assert site_state(Path(site.root)) == before
    # loose bounds: a bomb costs no more than reading its bytes once, in the memory of a small import
    assert res["seconds"] < 20 and time.monotonic() - started < 60, res
    assert res["peak_rss_mib"] < 200, res
