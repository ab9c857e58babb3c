# -*- coding: utf-8 -*-
# Copyright: offline.delivery contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Streaming zstd through the system's libzstd (``libzstd.so.1``) with ctypes: standard library only.

Python 3.11-3.13 have no zstd module, and a repo host's first import runs before any package of the
bundle is installed. libzstd1 is on every Debian and Ubuntu host (libapt-pkg, systemd and dpkg's own
decompressor link it), so this binding works with what a minimal host has. ctypes releases the GIL for
each call, so compression and decompression run beside the threads that hash.

The API is small: ``ZstdReader(fileobj)`` (a readable stream of the decompressed bytes),
``ZstdWriter(fileobj, level, threads)`` (write plain bytes, it writes a zstd frame), and ``Decompressor``
(one step at a time into caller-owned buffers, for readers that manage their own buffers). Memory is
bounded: a frame asking for a window over ``MAX_WINDOW_LOG`` is refused rather than allocated.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import os
from typing import Any, BinaryIO, Optional

# One frame's window at most 2**27 (128 MiB, zstd's own default limit for decoders without --long);
# writers here use the level's window (2 MiB at level 3).
MAX_WINDOW_LOG = 27
DEFAULT_LEVEL = 3
MIN_LEVEL, MAX_LEVEL = 1, 19
CHUNK = 1024 * 1024

# zstd.h constants (stable API since 1.4.0)
_C_COMPRESSION_LEVEL = 100
_C_NB_WORKERS = 400
_C_JOB_SIZE = 401
# Input per worker job: libzstd's default at level 3 is 8 MiB, with ~7 jobs' buffers alive (79 MiB peak RSS
# measured compressing 315 MB); 2 MiB jobs peak at 34 MiB for a 0.1 % larger output.
JOB_SIZE = 2 * 1024 * 1024
_D_WINDOW_LOG_MAX = 100
_E_CONTINUE, _E_END = 0, 2
_RESET_SESSION_ONLY = 1


class ZstdError(Exception):
    """libzstd is missing, or the data is not (or not a complete) zstd stream; the message says which."""


class _InBuffer(ctypes.Structure):
    _fields_ = [("src", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


class _OutBuffer(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


_LIB: Any = None
_LIB_ERROR: Optional[str] = None


def _lib() -> Any:
    global _LIB, _LIB_ERROR  # pylint: disable=global-statement
    if _LIB is None and _LIB_ERROR is None:
        names = ["libzstd.so.1", ctypes.util.find_library("zstd")]
        for name in [n for n in names if n]:
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            _LIB_ERROR = ("libzstd.so.1 is not installed on this host (Debian/Ubuntu package libzstd1, which "
                          "apt itself depends on); install it, or build the bundle with --compress none")
            raise ZstdError(_LIB_ERROR)
        size_t, vp = ctypes.c_size_t, ctypes.c_void_p
        for fn, res, args in (
                ("ZSTD_versionNumber", ctypes.c_uint, []),
                ("ZSTD_isError", ctypes.c_uint, [size_t]),
                ("ZSTD_getErrorName", ctypes.c_char_p, [size_t]),
                ("ZSTD_createCCtx", vp, []), ("ZSTD_freeCCtx", size_t, [vp]),
                ("ZSTD_CCtx_setParameter", size_t, [vp, ctypes.c_int, ctypes.c_int]),
                ("ZSTD_CCtx_reset", size_t, [vp, ctypes.c_int]),
                ("ZSTD_compressStream2", size_t, [vp, ctypes.POINTER(_OutBuffer), ctypes.POINTER(_InBuffer),
                                                  ctypes.c_int]),
                ("ZSTD_createDCtx", vp, []), ("ZSTD_freeDCtx", size_t, [vp]),
                ("ZSTD_DCtx_setParameter", size_t, [vp, ctypes.c_int, ctypes.c_int]),
                ("ZSTD_DCtx_reset", size_t, [vp, ctypes.c_int]),
                ("ZSTD_decompressStream", size_t, [vp, ctypes.POINTER(_OutBuffer), ctypes.POINTER(_InBuffer)])):
            func = getattr(lib, fn)
            func.restype, func.argtypes = res, args
        if lib.ZSTD_versionNumber() < 10400:
            _LIB_ERROR = f"libzstd {lib.ZSTD_versionNumber()} is older than 1.4.0 (streaming API); upgrade libzstd1"
            raise ZstdError(_LIB_ERROR)
        _LIB = lib
    if _LIB is None:
        raise ZstdError(_LIB_ERROR or "libzstd unavailable")
    return _LIB


def version() -> str:
    """libzstd's version, e.g. ``1.5.4`` (raises ZstdError when it is missing)."""
    n = _lib().ZSTD_versionNumber()
    return f"{n // 10000}.{n // 100 % 100}.{n % 100}"


def _check(code: int, what: str) -> int:
    lib = _lib()
    if lib.ZSTD_isError(code):
        raise ZstdError(f"{what}: {lib.ZSTD_getErrorName(code).decode('ascii', 'replace')}")
    return code


def _address(buf: Any) -> tuple[int, Any]:
    """(address, keep-alive) of a bytes-like object's memory: writable buffers and ``bytes`` without a copy,
    other read-only views copied."""
    view = memoryview(buf)
    try:
        holder: Any = (ctypes.c_char * view.nbytes).from_buffer(view)
        return ctypes.addressof(holder), holder
    except TypeError:  # read-only memory: bytes (not copied by bytes()), or a view of it
        data = bytes(buf)
        holder = ctypes.c_char_p(data)
        return ctypes.cast(holder, ctypes.c_void_p).value or 0, (holder, data)


class _Context:
    """A libzstd context, freed by ``release`` (or when collected)."""

    _create, _free = "", ""
    _ctx: Any = None

    def __init__(self) -> None:
        self._ctx = getattr(_lib(), self._create)()
        if not self._ctx:
            raise ZstdError(f"{self._create} failed (out of memory)")

    def release(self) -> None:
        if self._ctx:
            getattr(_lib(), self._free)(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        self.release()


class Decompressor(_Context):
    """One zstd stream (one or more frames), decompressed step by step into the caller's buffers."""

    _create, _free = "ZSTD_createDCtx", "ZSTD_freeDCtx"

    def __init__(self) -> None:
        super().__init__()
        lib = _lib()
        _check(lib.ZSTD_DCtx_setParameter(self._ctx, _D_WINDOW_LOG_MAX, MAX_WINDOW_LOG), "window limit")
        self._in = _InBuffer()
        self._out = _OutBuffer()
        self.frame_done = True  # nothing started yet, or the last frame ended

    def reset(self) -> None:
        """Start a new stream (after an error, or for the next member)."""
        _check(_lib().ZSTD_DCtx_reset(self._ctx, _RESET_SESSION_ONLY), "reset")
        self.frame_done = True

    def decompress_into(self, src: Any, dst: Any) -> tuple[int, int]:
        """Decompress from ``src`` into ``dst`` (a writable buffer): (bytes of src consumed, bytes written).
        Call again with the rest of ``src`` (or an empty one at its end) while it writes; ``frame_done``
        says whether the stream ended at a frame boundary. Raises ZstdError on damaged data."""
        if not len(dst):
            return 0, 0
        src_addr, src_keep = _address(src) if len(src) else (0, None)
        dst_addr, dst_keep = _address(dst)
        self._in.src, self._in.size, self._in.pos = src_addr, len(src), 0
        self._out.dst, self._out.size, self._out.pos = dst_addr, len(dst), 0
        code = _lib().ZSTD_decompressStream(self._ctx, ctypes.byref(self._out), ctypes.byref(self._in))
        del src_keep, dst_keep
        _check(code, "damaged zstd data")
        if self._in.pos or self._out.pos:  # a call with nothing to do says nothing about the frame
            self.frame_done = code == 0
        return self._in.pos, self._out.pos


class ZstdReader(io.RawIOBase):
    """The decompressed bytes of a zstd stream read from ``fileobj`` (``read``/``readinto``). A stream that
    ends inside a frame raises ZstdError (truncated), never a silent short result."""

    def __init__(self, fileobj: BinaryIO, chunk: int = CHUNK) -> None:
        super().__init__()
        self._src = fileobj
        self._dec = Decompressor()
        self._buf = bytearray(chunk)
        self._view = memoryview(self._buf)
        self._pos = self._end = 0
        self._eof = False

    def readinto(self, dst: Any) -> int:  # type: ignore[override]
        view = memoryview(dst).cast("B")
        while len(view):
            if self._pos == self._end and not self._eof:
                n = self._src.readinto(self._view)  # type: ignore[attr-defined]
                self._pos, self._end = 0, n or 0
                self._eof = not n
            used, made = self._dec.decompress_into(self._view[self._pos:self._end], view)
            self._pos += used
            if made:
                return made
            if self._eof and self._pos == self._end:
                if not self._dec.frame_done:
                    raise ZstdError("the zstd stream ends inside a frame (truncated)")
                return 0
        return 0

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._dec.release()
        super().close()


def threads_for(threads: int) -> int:
    """Worker threads for a compression: ``0`` means one per CPU. Always at least 1: libzstd's output is
    the same for every worker count from 1 up (not for 0), so the same input gives the same bytes on any
    machine with the same libzstd."""
    return max(1, threads or os.cpu_count() or 1)


class ZstdWriter(_Context):
    """Writes one zstd frame of everything given to ``write`` to ``fileobj``; ``close`` ends the frame (and
    does not close ``fileobj``; ``restart`` begins the next one, ``release`` frees the context). ``threads``:
    libzstd workers (see ``threads_for``)."""

    _create, _free = "ZSTD_createCCtx", "ZSTD_freeCCtx"

    def __init__(self, fileobj: BinaryIO, level: int = DEFAULT_LEVEL, threads: int = 1, chunk: int = CHUNK) -> None:
        if not MIN_LEVEL <= level <= MAX_LEVEL:
            raise ZstdError(f"zstd level {level} is out of range ({MIN_LEVEL}-{MAX_LEVEL})")
        super().__init__()
        lib = _lib()
        self._dst = fileobj
        _check(lib.ZSTD_CCtx_setParameter(self._ctx, _C_COMPRESSION_LEVEL, level), "level")
        _check(lib.ZSTD_CCtx_setParameter(self._ctx, _C_NB_WORKERS, threads_for(threads)), "workers")
        _check(lib.ZSTD_CCtx_setParameter(self._ctx, _C_JOB_SIZE, JOB_SIZE), "job size")
        self._buf = bytearray(chunk)
        self._view = memoryview(self._buf)
        self._in = _InBuffer()
        self._out = _OutBuffer()
        self.written = 0  # compressed bytes written to fileobj
        self._open = True

    def _step(self, data: Any, directive: int) -> None:
        src_addr, src_keep = _address(data) if len(data) else (0, None)
        dst_addr, dst_keep = _address(self._buf)
        self._in.src, self._in.size, self._in.pos = src_addr, len(data), 0
        lib = _lib()
        while True:
            self._out.dst, self._out.size, self._out.pos = dst_addr, len(self._buf), 0
            left = _check(lib.ZSTD_compressStream2(self._ctx, ctypes.byref(self._out), ctypes.byref(self._in),
                                                   directive), "zstd compression")
            if self._out.pos:
                self._dst.write(self._view[:self._out.pos])
                self.written += self._out.pos
            if directive == _E_END:
                if left == 0:
                    break
            elif self._in.pos == self._in.size:
                break
        del src_keep, dst_keep

    def write(self, data: Any) -> int:
        if not self._open:
            raise ValueError("write to a closed ZstdWriter")
        if len(data):
            self._step(data, _E_CONTINUE)
        return len(data)

    def close(self) -> None:
        """End the frame (writes its last bytes). The context is kept for ``restart``."""
        if self._open:
            self._step(b"", _E_END)
            self._open = False

    def restart(self, fileobj: BinaryIO) -> None:
        """Start a new frame into ``fileobj`` with the same settings (no new context, no new threads)."""
        _check(_lib().ZSTD_CCtx_reset(self._ctx, _RESET_SESSION_ONLY), "reset")
        self._dst = fileobj
        self.written = 0
        self._open = True

    def __enter__(self) -> "ZstdWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
