"""A PAX extended header is accepted only exactly as bundle-builder writes one (a size record before a member
of 8 GiB or more): any other PAX header - extra records, an empty one, one in front of a small member, or one
hiding a changed member header - is refused, and the site stays as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from offline_delivery_core.bundle import format as bf
from offline_delivery_core.bundle.format import BundleError
from offline_delivery_core.site.repo import SiteRepo
from tests.faults.conftest import Vendor, refused_import
from tests.helpers.bundles import members


def _header_with_mode(header: bytes, mode: int) -> bytes:
    raw = bytearray(header)
    raw[100:108] = b"%07o\0" % mode
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw)
    return bytes(raw)


@pytest.mark.parametrize("records", [{"comment": "hello"}, {"mtime": "1700000000"}, {"uname": "mallory"},
                                     {"linkpath": "/etc/shadow"}, {"path": "../../etc/evil"},
                                     "size-of-a-small-member", "zeros", "mode-0777-behind-pax", "two-in-a-row"])
def test_a_pax_header_cannot_alter_a_bundle_unseen(vendor: Vendor, site: SiteRepo, tmp_path: Path,
                                                    records: object) -> None:
    data = vendor.tiny.read_bytes()
    m = members(vendor.tiny)[3]
    hdr = data[m.header_offset:m.header_offset + 512]
    if records == "size-of-a-small-member":
        pax = bf._pax_header(m.name, {"size": str(m.size)})
    elif records == "zeros":  # an 'x' header whose records are all zero bytes
        pax = bf._pax_header(m.name, {"comment": "x"})[:512]
        pax = pax[:124] + b"%011o\0" % 512 + pax[136:]
        pax = _header_with_mode(pax, 0o644) + b"\0" * 512
    elif records == "mode-0777-behind-pax":
        pax = bf._pax_header(m.name, {"comment": "x"})
        hdr = _header_with_mode(hdr, 0o777)
    elif records == "two-in-a-row":
        pax = bf._pax_header(m.name, {"size": str(8 ** 11)}) * 2
    else:
        pax = bf._pax_header(m.name, records)  # type: ignore[arg-type]
    bad = tmp_path / "pax.bundle"
    bad.write_bytes(data[:m.header_offset] + pax + hdr + data[m.header_offset + 512:])
    err = refused_import(site, bad, vendor.keys)
    assert isinstance(err, BundleError) and err.offset is not None, err
    assert "PAX" in str(err) or "not allowed" in str(err) or "tar header" in str(err), err
