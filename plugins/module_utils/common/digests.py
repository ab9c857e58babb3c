# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Content addresses: ``sha256:<hex>`` digests, canonical JSON (what a digest is taken of), and reading a
stored blob back with proof that it still has its digest. Every layer names content this way."""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

CHUNK_SIZE = 1024 * 1024

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}\Z")


class ContentError(ValueError):
    """Content is not what its address or its reader says: a malformed digest, a blob file missing, unreadable,
    too big or not hashing to its digest, bytes that are not a JSON object. The message names the digest or
    the file; the caller adds what to do."""


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8: the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """``data`` parsed as one JSON object (a manifest, an index, a config), or ContentError naming ``what``."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ContentError(f"{what} is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ContentError(f"{what} is not a JSON object")
    return doc


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_SIZE), b""):
            h.update(chunk)
    return h.hexdigest()


def is_digest(value: object) -> bool:
    return isinstance(value, str) and bool(_DIGEST.match(value))


def digest_hex(digest: str) -> str:
    """The hex part of a ``sha256:<64 hex>`` digest; anything else is refused (it becomes a file name)."""
    if not is_digest(digest):
        raise ContentError(f"bad digest {digest!r}: expected 'sha256:' followed by 64 lowercase hex digits")
    return digest[len("sha256:"):]


def read_verified(path: str, digest: str, *, limit: int, size: int | None = None) -> bytes:
    """The bytes of the blob file ``path``, proven to be ``digest`` (and ``size`` when given): what is read
    back from a store is never trusted for its name alone. At most ``limit`` bytes are read."""
    want = digest_hex(digest)
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise ContentError(f"blob {digest} is missing ({path})") from None
    except OSError as exc:
        raise ContentError(f"blob {digest} cannot be read ({path}: {exc.strerror or exc})") from None
    if len(data) > limit:
        raise ContentError(f"blob {digest} ({path}) is larger than the {limit} bytes allowed here")
    if (size is not None and len(data) != size) or hashlib.sha256(data).hexdigest() != want:
        raise ContentError(f"blob {digest} ({path}) does not match its digest")
    return data
