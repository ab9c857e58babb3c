# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Hub -> site sync: pull one release from a hub's read-only repository over HTTP into this site's repository.

Standard library only: it runs in ``repo_sync`` on the site's repo host, where the site's repository and its
trusted vendor keys are. The hub serves ``catalog.json``, ``releases/`` and ``blobs/`` of its repository
(docs/sync.md), over plain HTTP or, from a hub with TLS on, HTTPS verified against that hub's site CA alone
(``hub_ca``: carried to the site like a vendor key; the machine's CAs then play no part). The hub is trusted no
more than a USB disk:

* the release's ``manifest.json`` is accepted only with a ``manifest.sig`` by one of the site's own trusted keys;
* only the blobs this repository lacks are fetched, each into ``staging/sync-<manifest hex>/`` (kept across runs)
  with HTTP ``Range``, so an interrupted transfer resumes where it stopped; a partial file is re-hashed before
  the rest is appended, and every blob is checked for size and sha256 before it is trusted;
* a wrong blob is refused naming its digest and URL, and its whole stage is discarded (the repository never saw
  any of it); a network failure keeps what arrived, to resume;
* publishing goes through ``site_repo.publish_staged``: the same record/catalog/rename steps as an import.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from ..bundle.format import (MANIFEST_NAME, MAX_MANIFEST_SIZE, MAX_SIGNATURE_SIZE, SIGNATURE_NAME, BundleError,
                             BundleHead, check_signature, digest_hex, parse_manifest, sha256_digest)
from ..bundle.trust import check_signer
from ..common.locks import flock_within
from ..common.names import name_problem, version_problem
from .repo import SiteRepo, publish_staged

DEFAULT_TIMEOUT = 30.0
MIN_RATE = 1024  # bytes/s a transfer must average after its first timeout (a hub that drips is dropped)
DEFAULT_REPO_PATH = "/repo/"
READ_SIZE = 64 * 1024
MAX_SLEEP = 1.0  # one bandwidth-limit sleep never exceeds this (a stop is seen within a second)
MAX_CATALOG_SIZE = 16 * 1024 * 1024
STAGE_PREFIX = "sync-"
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?(?:/s)?\s*\Z", re.I)
_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


class SyncError(ValueError):
    """The sync cannot go ahead; the message says why and what to do. The repository is unchanged."""


class SyncInterrupted(SyncError):
    """The transfer stopped (network, timeout); what arrived stays staged so a rerun resumes."""


class BlobRefused(SyncError):
    """A blob from the hub is not the one the signed manifest names; its stage was discarded."""


@dataclass
class SyncResult:
    name: str
    version: str
    hub: str
    manifest_digest: str = ""
    changed: bool = False
    msg: str = ""
    blobs_total: int = 0
    blobs_missing: int = 0  # blobs this repository lacked
    bytes_missing: int = 0
    blobs_sent: int = 0  # blobs (partly) transferred by this run
    bytes_sent: int = 0  # bytes transferred by this run
    bytes_resumed: int = 0  # bytes already staged by an earlier, interrupted run (re-hashed, not sent again)
    blobs_new: int = 0  # blobs the publish added to the repository
    bytes_new: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------------------------------------
# Bandwidth


def parse_rate(text: str | int | None) -> int:
    """Bytes per second from ``10M``, ``512k``, ``2.5M``, ``1048576`` (K/M/G = 1024-based); 0 = unlimited."""
    if text is None or text == "" or text == 0:
        return 0
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _RATE.match(str(text))
        if not m:
            raise SyncError(f"bandwidth_limit {text!r}: expected bytes per second such as 10M, 512K or 1048576 "
                            "(K, M, G are 1024-based), or 0 for no limit")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value == 0:
        return 0
    if value < MIN_RATE:
        raise SyncError(f"bandwidth_limit {text!r} is below {MIN_RATE} bytes/s; give at least 1K, or 0 for no limit")
    return value


class TokenBucket:
    """At most ``rate`` bytes per second on average, with a burst of a quarter second; every wait is a
    series of sleeps of at most MAX_SLEEP, bounded by the request size."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = rate
        self.capacity = max(rate // 4, 1)
        self.tokens = float(self.capacity)
        self._clock, self._sleep = clock, sleep
        self._last = clock()

    @property
    def chunk(self) -> int:
        """The largest read that fits one burst."""
        return min(READ_SIZE, self.capacity)

    def take(self, n: int) -> None:
        n = min(n, self.capacity)
        while True:
            now = self._clock()
            self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
            self._last = now
            if self.tokens >= n:
                self.tokens -= n
                return
            self._sleep(min((n - self.tokens) / self.rate, MAX_SLEEP))


class _Unlimited:
    chunk = READ_SIZE

    def take(self, n: int) -> None:
        """No limit: nothing to wait for."""


# --------------------------------------------------------------------------------------------------------
# The hub


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A hub answers from its own repository; a redirect elsewhere is refused rather than followed."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused", headers, fp)


def hub_base(url: str) -> str:
    """The URL of the hub's served repository, ending in '/'; a bare ``http://host:port`` means /repo/."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SyncError(f"hub {url!r}: expected http://HOST:PORT (or a URL of the served repository, "
                        f"default path {DEFAULT_REPO_PATH})")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise SyncError(f"hub {url!r}: give scheme, host, port and path only (no credentials, query or fragment)")
    path = parts.path if parts.path not in ("", "/") else DEFAULT_REPO_PATH
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path.rstrip("/") + "/", "", ""))


HUB_CA_HINT = ("give the hub's CA certificate (offline_delivery_sync_hub_ca: a copy of the hub repo host's "
               "/etc/offline-delivery/tls/site-ca.crt, carried to the site like the vendor key, docs/sync.md)")


def hub_tls_context(ca_pem: str) -> ssl.SSLContext:
    """A client context that trusts exactly the hub's site CA (PEM text), not the machine's CAs."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cadata=ca_pem)
    except (ssl.SSLError, ValueError) as exc:
        raise SyncError(f"the hub CA is not a PEM certificate ({exc}); {HUB_CA_HINT}") from None
    return context


class Hub:
    """Read-only HTTP(S) access to a hub's repository; every wait bounded by ``timeout`` seconds."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT, ca_pem: str | None = None) -> None:
        self.base = hub_base(url)
        self.timeout = timeout
        handlers: list[Any] = [urllib.request.ProxyHandler({}), _NoRedirect()]  # internal link: no proxy, redirect
        if ca_pem:
            if not self.base.startswith("https://"):
                raise SyncError(f"hub {self.base}: a hub CA is given, so the hub must be reached over https:// "
                                "(its TLS option serves the repository over HTTPS only)")
            handlers.append(urllib.request.HTTPSHandler(context=hub_tls_context(ca_pem)))
        self._opener = urllib.request.build_opener(*handlers)

    def url(self, path: str) -> str:
        return self.base + "/".join(urllib.parse.quote(p, safe="") for p in path.split("/"))

    @contextmanager
    def open(self, path: str, start: int = 0) -> Iterator[Any]:
        """The response for ``path`` (from byte ``start``: a Range request). HTTP errors propagate as
        urllib.error.HTTPError; a hub that cannot be reached raises SyncInterrupted."""
        url = self.url(path)
        headers = {"User-Agent": "offline-delivery-sync/1", "Accept-Encoding": "identity"}
        if start:
            headers["Range"] = f"bytes={start}-"
        try:
            resp = self._opener.open(urllib.request.Request(url, headers=headers), timeout=self.timeout)
        except (urllib.error.URLError, OSError) as exc:
            if isinstance(exc, urllib.error.HTTPError):
                raise  # an answer from the hub: the caller says what it means
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise SyncError(f"the hub {self.base} presented a certificate this site does not trust "
                                f"({reason.verify_message}); {HUB_CA_HINT}, and reach the hub by a name its "
                                "certificate carries (offline_repo_tls_names on the hub)") from None
            raise SyncInterrupted(f"the hub {self.base} cannot be reached ({reason}) fetching {url}; check the "
                                  f"link and that the hub serves its repository (docs/sync.md), then run again") \
                from None
        try:
            yield resp
        finally:
            resp.close()

    def get(self, path: str, limit: int) -> bytes | None:
        """The whole document at ``path``, at most ``limit`` bytes; None when the hub has no such file."""
        url = self.url(path)
        try:
            with self.open(path) as resp:
                data = _read_bounded(resp, limit + 1, url, self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            tls = ""
            if exc.code == 400 and self.base.startswith("http://"):
                tls = f" (a hub with its TLS option on answers plain HTTP so: use https:// and {HUB_CA_HINT})"
            raise SyncError(f"the hub answered {exc.code} {exc.reason} for {url}{tls}") from None
        if len(data) > limit:
            raise SyncError(f"{url} is larger than {limit} bytes: not a file of an offline.delivery repository")
        return data


def _read_bounded(resp: Any, limit: int, url: str, timeout: float) -> bytes:
    try:
        return resp.read(limit)
    except (socket.timeout, OSError) as exc:
        raise SyncInterrupted(f"reading {url} failed ({exc or f'no data for {timeout:.0f}s'}); run again") from None


# --------------------------------------------------------------------------------------------------------
# The signed manifest


def fetch_head(hub: Hub, name: str, version: str, trusted_keys: list[bytes],
               signers: Mapping[str, Sequence[str]] | None = None) -> BundleHead:
    """The release's manifest from the hub, accepted only with a signature by one of ``trusted_keys`` that
    ``signers`` allows for ``name`` (trust.pinned_keys)."""
    for problem in (name_problem(name, "release name"), version_problem(version)):
        if problem:  # both become URL paths on the hub and directories here
            raise SyncError(problem)
    rel = f"releases/{name}/{version}/"
    manifest_bytes = hub.get(rel + MANIFEST_NAME, MAX_MANIFEST_SIZE)
    if manifest_bytes is None:
        raise SyncError(f"the hub {hub.base} has no release {name} {version} ({hub.url(rel + MANIFEST_NAME)}: "
                        f"404); {_hub_versions(hub, name)}")
    sig = hub.get(rel + SIGNATURE_NAME, MAX_SIGNATURE_SIZE)
    if sig is None:
        raise SyncError(f"{name} {version} on the hub {hub.base} is unsigned (no {hub.url(rel + SIGNATURE_NAME)}); "
                        "a site accepts signed releases only")
    try:
        keyid = check_signature(manifest_bytes, sig, trusted_keys)  # before anything in it is trusted
        manifest = parse_manifest(manifest_bytes)
        check_signer(signers, keyid, manifest["name"])
    except BundleError as exc:
        raise SyncError(f"{name} {version} from the hub {hub.base} refused: {exc.reason}") from None
    if (manifest["name"], manifest["version"]) != (name, version):
        raise SyncError(f"{hub.url(rel + MANIFEST_NAME)} is a signed manifest of {manifest['name']} "
                        f"{manifest['version']}, not of {name} {version}: the hub's repository is inconsistent")
    return BundleHead(manifest=manifest, manifest_bytes=manifest_bytes, signature=sig,
                      manifest_digest=sha256_digest(manifest_bytes), keyid=keyid)


def _hub_versions(hub: Hub, name: str) -> str:
    """What the hub's catalog lists for ``name`` (for the error message only; never trusted)."""
    try:
        data = hub.get("catalog.json", MAX_CATALOG_SIZE)
        releases = json.loads(data or b"{}").get("releases", [])
        versions = sorted({str(r.get("version")) for r in releases if isinstance(r, dict) and r.get("name") == name})
    except (SyncError, ValueError, AttributeError):
        return "its catalog could not be read either"
    if not versions:
        return f"its catalog lists no release of {name}"
    return f"its catalog lists {name} {', '.join(versions)}"


# --------------------------------------------------------------------------------------------------------
# Blobs


class _Transfer:
    """Counters of one sync run."""

    def __init__(self, bucket: TokenBucket | _Unlimited) -> None:
        self.bucket = bucket
        self.blobs_sent = 0
        self.bytes_sent = 0
        self.bytes_resumed = 0


def fetch_blob(hub: Hub, desc: dict[str, Any], stage: str, transfer: _Transfer) -> None:
    """Make ``stage/<hex>`` hold exactly the blob ``desc`` names: a finished file from an earlier run is
    re-hashed, a partial one is re-hashed and continued with Range, a missing one is fetched whole. A blob
    continued from a partial file that then fails its digest is fetched once more from its first byte
    (the partial file may have been damaged by the interruption); a second failure is refused."""
    hexd = digest_hex(desc["digest"])
    final = os.path.join(stage, hexd)
    if os.path.exists(final):
        if os.path.getsize(final) == desc["size"] and _hash_file(final).hexdigest() == hexd:
            transfer.bytes_resumed += desc["size"]
            return
        os.unlink(final)
    partial = final + ".partial"
    for attempt in (1, 2):
        resumed = _download(hub, desc, partial, transfer)
        problem = _check_partial(partial, desc)
        if problem is None:
            os.replace(partial, final)
            return
        os.unlink(partial)
        if not resumed or attempt == 2:
            raise BlobRefused(f"blob {desc['digest']} from {hub.url('blobs/sha256/' + hexd)} refused: {problem}; "
                              "the hub's copy is damaged or not the blob its signed manifest names. Nothing "
                              "was published; repair the hub (re-import the release there) and run again")


def _check_partial(path: str, desc: dict[str, Any]) -> str | None:
    size = os.path.getsize(path)
    if size != desc["size"]:
        return f"{size} bytes arrived, the manifest says {desc['size']}"
    got = "sha256:" + _hash_file(path).hexdigest()
    return None if got == desc["digest"] else f"its content hashes to {got}"


def _hash_file(path: str) -> Any:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1024 * 1024), b""):
            h.update(chunk)
    return h


def _download(hub: Hub, desc: dict[str, Any], partial: str, transfer: _Transfer) -> bool:
    """Append the rest of the blob to ``partial``; True when it continued data an earlier run left."""
    size = desc["size"]
    path = "blobs/sha256/" + digest_hex(desc["digest"])
    url = hub.url(path)
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    if have > size:
        os.unlink(partial)
        have = 0
    if have == size:
        transfer.bytes_resumed += have
        return True
    try:
        with hub.open(path, start=have) as resp:
            if have and resp.status == 206:
                _check_content_range(resp, have, size, url)
                transfer.bytes_resumed += have
            elif resp.status == 200:
                have = 0  # the hub sent the whole blob: start over
            else:
                raise SyncError(f"the hub answered {resp.status} for {url}; expected 200 or 206")
            transfer.blobs_sent += 1
            with open(partial, "ab" if have else "wb") as out:
                _copy(resp, out, size - have, url, hub.timeout, transfer)
                out.flush()
                os.fsync(out.fileno())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise SyncError(f"the hub has no blob {desc['digest']} ({url}: 404) although its catalog has the "
                            "release; re-import the release on the hub and run again") from None
        if exc.code == 416 and have:
            os.unlink(partial)  # the hub's copy is shorter than what we hold: start over
            return _download(hub, desc, partial, transfer)
        raise SyncError(f"the hub answered {exc.code} {exc.reason} for {url}") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise SyncError(f"no space left on the filesystem of {partial} while fetching blob {desc['digest']} "
                            f"({size} bytes); free space and run again (what arrived is kept)") from None
        raise
    return have > 0


def _check_content_range(resp: Any, start: int, size: int, url: str) -> None:
    value = resp.headers.get("Content-Range", "")
    m = re.match(r"^bytes (\d+)-(\d+)/(\d+|\*)$", value.strip())
    if not m or int(m.group(1)) != start or (m.group(3) != "*" and int(m.group(3)) != size):
        raise SyncError(f"{url}: the hub answered the range request from byte {start} with Content-Range "
                        f"{value!r}; expected 'bytes {start}-{size - 1}/{size}'")


def min_rate(bucket: TokenBucket | _Unlimited) -> float:
    """Bytes per second a transfer must average once it has run ``timeout`` seconds: a hub that drips a byte
    just often enough to beat every read's timeout still ends (MIN_RATE, or half of a lower bandwidth limit)."""
    rate = getattr(bucket, "rate", 0)
    return min(MIN_RATE, rate / 2) if rate else MIN_RATE


def _copy(resp: Any, out: Any, remaining: int, url: str, timeout: float, transfer: _Transfer) -> None:
    """Copy exactly ``remaining`` bytes (one more is read to catch a blob that is too long). ``read1`` returns
    what one receive brought, so everything that arrived before a stall is written and kept; the bandwidth
    limit is charged for what was read, before the next read. Each read waits at most ``timeout``; the whole
    copy must also average min_rate() after its first ``timeout`` seconds."""
    started, got, floor = time.monotonic(), 0, min_rate(transfer.bucket)
    while remaining >= 0:
        elapsed = time.monotonic() - started
        if elapsed > timeout and got < floor * elapsed:
            raise SyncInterrupted(f"the hub sends {url} slower than {floor:.0f} bytes/s ({got} bytes in "
                                  f"{elapsed:.0f}s); what arrived is kept: run again to resume")
        want = min(transfer.bucket.chunk, remaining + 1)
        try:
            data = resp.read1(want)
        except (socket.timeout, OSError) as exc:
            raise SyncInterrupted(f"the transfer of {url} stopped ({exc or f'no data for {timeout:.0f}s'}); "
                                  "what arrived is kept: run again to resume") from None
        transfer.bucket.take(len(data))
        if not data:
            if remaining:
                raise SyncInterrupted(f"the hub closed the connection with {remaining} bytes of {url} still to "
                                      "come; what arrived is kept: run again to resume")
            return
        if len(data) > remaining:
            out.write(data[:remaining])
            transfer.bytes_sent += remaining
            return  # longer than the manifest says: the size check refuses it
        out.write(data)
        got += len(data)
        transfer.bytes_sent += len(data)
        remaining -= len(data)


# --------------------------------------------------------------------------------------------------------
# The sync


def stage_dir(repo: SiteRepo, manifest_digest: str) -> str:
    return os.path.join(repo.staging_dir, STAGE_PREFIX + digest_hex(manifest_digest))


@contextmanager
def _stage_lock(stage: str, timeout: float) -> Iterator[None]:
    """One sync of a release at a time (an flock on its stage directory, bounded wait)."""
    fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if not flock_within(fd, timeout):
            raise SyncError(f"another sync of this release holds {stage} and did not finish within "
                            f"{timeout:.0f}s; wait for it and run again")
        yield
    finally:
        os.close(fd)


def sync_release(repo: SiteRepo, hub_url: str, name: str, version: str, trusted_keys: list[bytes], *,
                 bandwidth_limit: int = 0, timeout: float = DEFAULT_TIMEOUT, check_mode: bool = False,
                 imported_by: str = "unknown", lock_timeout: float = 600.0,
                 bucket: TokenBucket | None = None,
                 signers: Mapping[str, Sequence[str]] | None = None, hub_ca: str | None = None) -> SyncResult:
    """Sync ``name`` ``version`` from the hub at ``hub_url`` into ``repo`` (see the module docstring); ``hub_ca``
    is the PEM certificate of an HTTPS hub's site CA."""
    started = time.monotonic()
    if not trusted_keys:
        raise SyncError("no trusted vendor keys: a site accepts only releases signed by a key it trusts")
    hub = Hub(hub_url, timeout, hub_ca)
    res = SyncResult(name=name, version=version, hub=hub.base)
    if not repo.exists():
        raise SyncError(f"there is no site repository at {repo.root}; set the repo host up with a first import "
                        "(offline.delivery.import) and sync into it afterwards")
    head = fetch_head(hub, name, version, trusted_keys, signers)
    manifest = head.manifest
    res.manifest_digest, res.blobs_total = head.manifest_digest, len(manifest["blobs"])
    missing = [b for b in manifest["blobs"] if not repo.has_blob(b["digest"], b["size"])]
    res.blobs_missing, res.bytes_missing = len(missing), sum(b["size"] for b in missing)
    known = repo.find_release(name, version)
    if known is not None and known["manifestDigest"] != head.manifest_digest:
        raise SyncError(f"{name} {version} is already in this site's catalog with manifest {known['manifestDigest']}, "
                        f"and the hub's is {head.manifest_digest}: a published release never changes; ask the "
                        "vendor which one is right")
    if known is not None and not missing:
        res.msg = f"{name} {version} is already in this repository (same manifest); nothing to send"
        return _done(res, started)
    if check_mode:
        res.changed = True
        res.msg = (f"{name} {version} would be synced from {hub.base}: {len(missing)} of {len(manifest['blobs'])} "
                   f"blobs, {res.bytes_missing} bytes to send")
        return _done(res, started)

    stage = stage_dir(repo, head.manifest_digest)
    os.makedirs(stage, mode=0o700, exist_ok=True)
    transfer = _Transfer(bucket or (TokenBucket(bandwidth_limit) if bandwidth_limit else _Unlimited()))
    try:
        with _stage_lock(stage, lock_timeout):
            for desc in missing:
                fetch_blob(hub, desc, stage, transfer)
            published = publish_staged(repo, head, stage, imported_by=f"{imported_by} via sync from {hub.base}",
                                       lock_timeout=lock_timeout)
    except BlobRefused:
        shutil.rmtree(stage, ignore_errors=True)  # nothing of a refused transfer stays on the site
        raise
    finally:
        res.blobs_sent, res.bytes_sent = transfer.blobs_sent, transfer.bytes_sent
        res.bytes_resumed = transfer.bytes_resumed
    res.changed = published.changed
    res.blobs_new, res.bytes_new = published.blobs_new, published.bytes_new
    resumed = f", {transfer.bytes_resumed} bytes resumed from an earlier run" if transfer.bytes_resumed else ""
    res.msg = (f"{name} {version} synced from {hub.base}: {transfer.blobs_sent} blobs, {transfer.bytes_sent} bytes "
               f"sent{resumed}; {published.msg}")
    return _done(res, started)


def _done(res: SyncResult, started: float) -> SyncResult:
    res.seconds = round(time.monotonic() - started, 3)
    return res
