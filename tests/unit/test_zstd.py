"""common/zstd.py: the ctypes binding to libzstd.so.1 (streaming, bounded memory, stdlib only)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import pytest

from offline_delivery_core.common import zstd

DATA = b"".join(b"line %d of a text that compresses well\n" % i for i in range(200_000)) + os.urandom(300_000)


def _compress(data: bytes, level: int = 3, threads: int = 1) -> bytes:
    out = io.BytesIO()
    with zstd.ZstdWriter(out, level, threads) as writer:
        for i in range(0, len(data), 100_000):
            writer.write(memoryview(data)[i:i + 100_000])
    return out.getvalue()


def test_round_trip_through_reader():
    packed = _compress(DATA)
    assert len(packed) < len(DATA) // 3
    with zstd.ZstdReader(io.BytesIO(packed), chunk=4096) as reader:
        assert reader.read() == DATA


def test_output_is_the_same_for_any_worker_count():
    assert _compress(DATA, threads=1) == _compress(DATA, threads=2) == _compress(DATA, threads=0)


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd command not installed")
def test_interoperates_with_the_zstd_command():
    packed = _compress(DATA)
    assert subprocess.run(["zstd", "-dc"], input=packed, capture_output=True, check=True).stdout == DATA
    theirs = subprocess.run(["zstd", "-3", "-c"], input=DATA, capture_output=True, check=True).stdout
    assert zstd.ZstdReader(io.BytesIO(theirs)).read() == DATA


def test_truncated_and_garbage_streams_are_errors():
    packed = _compress(DATA)
    with pytest.raises(zstd.ZstdError, match="truncated"):
        zstd.ZstdReader(io.BytesIO(packed[:-50])).read()
    with pytest.raises(zstd.ZstdError, match="damaged zstd data"):
        zstd.ZstdReader(io.BytesIO(b"not zstd at all" * 100)).read()


def test_decompressor_steps_into_caller_buffers_and_reports_frame_end():
    packed = _compress(b"abc" * 1000)
    dec = zstd.Decompressor()
    out = bytearray(1000)
    src = memoryview(packed)
    got = bytearray()
    while True:
        used, made = dec.decompress_into(src, out)
        src = src[used:]
        got += out[:made]
        if not used and not made:
            break
    assert bytes(got) == b"abc" * 1000 and dec.frame_done
    dec.release()


def test_writer_restart_makes_a_new_frame_and_level_is_checked():
    first, second = io.BytesIO(), io.BytesIO()
    writer = zstd.ZstdWriter(first, 1)
    writer.write(b"one" * 100)
    writer.close()
    writer.restart(second)
    writer.write(b"two" * 100)
    writer.close()
    writer.release()
    assert zstd.ZstdReader(io.BytesIO(first.getvalue())).read() == b"one" * 100
    assert zstd.ZstdReader(io.BytesIO(second.getvalue())).read() == b"two" * 100
    with pytest.raises(zstd.ZstdError, match="out of range"):
        zstd.ZstdWriter(io.BytesIO(), 42)
    assert zstd.version().count(".") == 2
