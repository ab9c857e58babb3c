"""The SBOM's fast layer walk (bundle_builder/sbom.py ``_scan_headers``): on every kind of tar it reads the
same as ``tarfile`` does, and it hands what it does not read exactly as ``tarfile`` over to ``tarfile``."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Callable

import pytest

from bundle_builder import images as img
from bundle_builder import sbom

STATUS = b"Package: libc6\nStatus: install ok installed\nVersion: 2.36\nArchitecture: amd64\n"
LONG_DIR = "usr/share/" + "a-very-long-directory-name/" * 6


def _tar(fmt: int, members: list[tuple[str, bytes | str | None, bytes]]) -> bytes:
    """members: (name, data, or a link target / None for a directory, type)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.LNKTYPE, tarfile.SYMTYPE):
                info.linkname = str(data)
                tar.addfile(info)
            elif kind == tarfile.DIRTYPE:
                tar.addfile(info)
            else:
                assert isinstance(data, bytes)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _layer(fmt: int) -> bytes:
    return _tar(fmt, [
        ("etc", None, tarfile.DIRTYPE),
        ("etc/os-release", b"ID=debian\n", tarfile.REGTYPE),
        ("./var/lib/dpkg/status", STATUS, tarfile.REGTYPE),
        ("var/lib/dpkg/status.d/", None, tarfile.DIRTYPE),
        ("var/lib/dpkg/status.d/" + "x" * 120, STATUS.replace(b"libc6", b"longname"), tarfile.REGTYPE),
        (LONG_DIR + "file.txt", b"text" * 300, tarfile.REGTYPE),
        (LONG_DIR + ".wh.gone", b"", tarfile.REGTYPE),
        ("usr/lib/os-release", "../../etc/os-release", tarfile.SYMTYPE),
        ("var/lib/.wh..wh..opq", b"", tarfile.REGTYPE),
        ("lib/apk/db/installed", LONG_DIR + "target-" + "y" * 100, tarfile.SYMTYPE),  # a long link target
        ("opt/app/" + "z" * 200, b"\0" * 1500, tarfile.REGTYPE),
    ])


def _by_tarfile(data: bytes) -> sbom.LayerScan:
    """What scan_layer read with tarfile alone before the walk (seekable: hard links resolved)."""
    scan = sbom.LayerScan()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            sbom._record(scan, sbom._norm(member.name), lambda m=member: sbom._member_bytes(tar, m))
    return scan


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_walk_reads_what_tarfile_reads(fmt: int, tmp_path: Path) -> None:
    if fmt == tarfile.USTAR_FORMAT:  # no long names in plain ustar: the prefix field carries the long paths
        data = _tar(fmt, [("etc/os-release", b"ID=debian\n", tarfile.REGTYPE),
                          ("var/lib/dpkg/status", STATUS, tarfile.REGTYPE),
                          (LONG_DIR[:140] + "/.wh.x", b"", tarfile.REGTYPE)])
    else:
        data = _layer(fmt)
    expected = _by_tarfile(data)
    assert expected.files and expected.whiteouts
    walked = sbom._scan_headers(sbom._positional_reader(io.BytesIO(data), 0))  # no fallback
    assert walked == expected
    path = tmp_path / "layer.tar"
    path.write_bytes(data)
    with open(path, "rb") as fh:  # a real file: os.pread
        assert sbom.scan_layer(fh, seekable=True) == expected
    with img._Section(str(path), 0, len(data)) as section:  # a member of a docker-save archive
        assert sbom.scan_layer(section, seekable=True) == expected  # type: ignore[arg-type]


def _global_pax() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x"}) as tar:
        info = tarfile.TarInfo("var/lib/dpkg/status")
        info.size = len(STATUS)
        tar.addfile(info, io.BytesIO(STATUS))
    return out.getvalue()


def _damage(data: bytes) -> bytes:
    second = 512 * 2  # the second member's header (the first is "etc" with no data)
    return data[:second + 10] + b"\xff" + data[second + 11:]


@pytest.mark.parametrize("case", [
    lambda: _tar(tarfile.GNU_FORMAT, [("var/lib/dpkg/status-old", STATUS, tarfile.REGTYPE),
                                      ("var/lib/dpkg/status", "var/lib/dpkg/status-old", tarfile.LNKTYPE)]),
    lambda: _damage(_layer(tarfile.GNU_FORMAT)),              # a bad checksum after the first member
    lambda: _layer(tarfile.GNU_FORMAT)[:3000],                # truncated inside a header or its data
    lambda: b"",                                             # empty: an error to tarfile
    lambda: b"\0" * 1024,                                    # only end blocks: an empty layer
    lambda: _global_pax(),
], ids=["hard-link-to-status", "bad-checksum", "truncated", "empty", "only-end-blocks", "pax-global-header"])
def test_what_the_walk_leaves_to_tarfile_ends_as_tarfile_says(case: Callable[[], bytes]) -> None:
    data = case()
    try:
        expected: sbom.LayerScan | str = _by_tarfile(data)
    except (tarfile.TarError, EOFError) as exc:
        expected = type(exc).__name__
    try:
        got: sbom.LayerScan | str = sbom.scan_layer(io.BytesIO(data), seekable=True)
    except (tarfile.TarError, EOFError) as exc:
        got = type(exc).__name__
    assert got == expected


def test_a_hard_link_to_the_status_is_resolved_by_tarfile() -> None:
    data = _tar(tarfile.GNU_FORMAT, [("var/lib/dpkg/status-old", STATUS, tarfile.REGTYPE),
                                     ("var/lib/dpkg/status", "var/lib/dpkg/status-old", tarfile.LNKTYPE)])
    with pytest.raises(sbom._Unsupported):
        sbom._scan_headers(sbom._positional_reader(io.BytesIO(data), 0))
    assert sbom.scan_layer(io.BytesIO(data), seekable=True).files == {"var/lib/dpkg/status": STATUS}
