"""Helpers to take bundles apart and damage them the ways the format must refuse."""

from __future__ import annotations

import io
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Member:
    name: str
    header_offset: int
    data_offset: int
    size: int


def trust_args(*pubs: Path | str, apps: tuple[str, ...] = ("*",)) -> dict[str, object]:
    """The trust options of bundle_import, bundle_info and repo_sync for key files the site pins (every
    given key pinned for ``apps``), as the playbooks pass them from the inventory."""
    from offline_delivery_core.bundle import ed25519
    from offline_delivery_core.bundle import trust

    # the key's bytes only (no mode check): a test may hand the module a key file it must refuse
    return {"trusted_keys": [str(p) for p in pubs],
            "pinned_keys": [{"fingerprint": trust.fingerprint(ed25519.load_public_key_pem(Path(p).read_text())),
                             "apps": list(apps)} for p in pubs]}


def members(path: Path) -> list[Member]:
    """Tar members of a (single-file) bundle with their offsets."""
    with tarfile.open(path, "r:") as tar:
        return [Member(m.name, m.offset, m.offset_data, m.size) for m in tar.getmembers()]


def member_data(path: Path, name: str) -> bytes:
    with tarfile.open(path, "r:") as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read()


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    """Flip one bit of the file in place."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ (1 << bit)]))


def copy_with_flipped_bit(src: Path, dst: Path, offset: int, bit: int = 0) -> Path:
    shutil.copyfile(src, dst)
    flip_bit(dst, offset, bit)
    return dst


def truncate_copy(src: Path, dst: Path, size: int) -> Path:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(fin.read(size))
    return dst


def regular(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    return info, data


def special(name: str, type_: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = type_, linkname, 0
    if type_ in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, b""


def rewrite(src: Path, dst: Path, *, replace: dict[str, bytes] | None = None,
            insert_after: dict[str, list[tuple[tarfile.TarInfo, bytes]]] | None = None,
            drop: set[str] | None = None, append: list[tuple[tarfile.TarInfo, bytes]] | None = None) -> Path:
    """Copy a bundle member by member, replacing contents, inserting crafted members or dropping some."""
    replace, insert_after, drop = replace or {}, insert_after or {}, drop or set()
    with tarfile.open(src, "r:") as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        for m in tin.getmembers():
            if m.name not in drop:
                f = tin.extractfile(m)
                data = replace.get(m.name, f.read() if f else b"")
                info, _ = regular(m.name, data)
                tout.addfile(info, io.BytesIO(data))
            for info, data in insert_after.get(m.name, []):
                tout.addfile(info, io.BytesIO(data) if data else None)
        for info, data in append or []:
            tout.addfile(info, io.BytesIO(data) if data else None)
    return dst
