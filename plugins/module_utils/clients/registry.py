# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A client of the OCI distribution API: the minimal part a push and a pull need.

Standard library only (``http.client``). ``HEAD`` a blob, upload one (``POST`` to open a session, then one
monolithic ``PUT ?digest=`` streaming the file), mount it from another repository of the same registry,
``PUT`` a manifest with its exact bytes (so its digest is the one the release names), ``HEAD`` a manifest to
learn the digest a tag resolves to, and fetch manifests and blobs with their digest checked on arrival.

It knows nothing of the site repository: the repo host publishes through it (``site/publish.py``) and the
systemd target pulls through it (``targets/rootfs.py``).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..common.digests import digest_hex, is_digest, sha256_digest
from ..common.oci import INDEX_TYPES, MANIFEST_TYPES

MANIFEST_ACCEPT = ", ".join(INDEX_TYPES + MANIFEST_TYPES)

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # Distribution refuses bigger manifests anyway
MAX_ERROR_BODY = 64 * 1024
UPLOAD_BLOCK = 1024 * 1024
DEFAULT_TIMEOUT = 60.0

# Distribution's repository name grammar (reference/regexp.go): lowercase path components.
_REGISTRY = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?|\[[a-fA-F0-9:]+\])(?::[0-9]{1,5})?\Z")


class RegistryError(RuntimeError):
    """A registry request failed or a release cannot be published; the message names registry, repository
    and blob or manifest, and says what to do."""


# ----------------------------------------------------------------------------------------------------------
# References


def check_registry(registry: str) -> str:
    """``registry`` as ``host[:port]``, refusing URLs and paths with a message saying what to write."""
    if "://" in registry or "/" in registry or not _REGISTRY.match(registry):
        raise RegistryError(f"registry {registry!r}: give host:port (e.g. repo.site:5000), without a scheme "
                            "or path; plain HTTP or HTTPS is chosen with insecure / ca_file")
    return registry


def upload_url(location: str, digest: str) -> str:
    """The monolithic upload URL: the session ``Location`` with ``digest=`` added to its query."""
    sep = "&" if urllib.parse.urlsplit(location).query else "?"
    if location.endswith(("?", "&")):
        sep = ""
    return f"{location}{sep}digest={urllib.parse.quote(digest, safe='')}"


def registry_error_text(body: bytes) -> str:
    """The ``errors`` of a distribution error body as one line (or the raw start of a body that is not)."""
    try:
        doc = json.loads(body.decode("utf-8"))
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errors, list) and errors:
            parts = []
            for err in errors:
                if isinstance(err, dict):
                    text = f"{err.get('code', '?')}: {err.get('message', '')}"
                    if err.get("detail"):
                        text += f" ({json.dumps(err['detail'], sort_keys=True)[:300]})"
                    parts.append(text)
            if parts:
                return "; ".join(parts)
    except (ValueError, UnicodeDecodeError):
        pass
    return body[:300].decode("utf-8", "replace").strip() or "(empty body)"


# ----------------------------------------------------------------------------------------------------------
# The client


@dataclass
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes


class RegistryClient:
    """A minimal OCI distribution client for one registry (``host:port``).

    ``insecure`` selects plain HTTP (the site registry); otherwise HTTPS, verified against ``ca_file`` when
    given, else the system's CAs. ``timeout`` bounds every connect and every socket read or write.
    """

    def __init__(self, registry: str, *, insecure: bool = True, ca_file: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.registry = check_registry(registry)
        self.scheme = "http" if insecure else "https"
        self.timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        if not insecure:
            try:
                self._ssl = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise RegistryError(f"CA file {ca_file} for registry {registry} cannot be loaded: {exc}") from None
        self._conn: http.client.HTTPConnection | None = None
        self._conn_netloc = ""

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.registry}"

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------------------

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        key = f"{scheme}://{netloc}"
        if self._conn is not None and self._conn_netloc == key:
            return self._conn
        self.close()
        if scheme == "https":
            ctx = self._ssl or ssl.create_default_context()
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                netloc, timeout=self.timeout, context=ctx, blocksize=UPLOAD_BLOCK)
        else:
            conn = http.client.HTTPConnection(netloc, timeout=self.timeout, blocksize=UPLOAD_BLOCK)
        self._conn, self._conn_netloc = conn, key
        return conn

    def _request(self, method: str, url: str, what: str, *, headers: dict[str, str] | None = None,
                 body: Any = None, retry: bool = True) -> _Response:
        """One request; ``url`` absolute or relative to the registry. A request on a kept-alive connection
        the server had closed is retried once when ``retry`` (requests without a streamed body)."""
        full = urllib.parse.urljoin(self.base_url + "/", url)
        parts = urllib.parse.urlsplit(full)
        if parts.scheme not in ("http", "https"):
            raise RegistryError(f"registry {self.registry}: {what}: unsupported URL {full!r}")
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        for attempt in (1, 2):
            conn = self._connection(parts.scheme, parts.netloc)
            try:
                conn.request(method, target, body=body, headers=headers or {})
                resp = conn.getresponse()
                # read (HEAD: b"") so the connection can carry the next request; error bodies are capped
                data = resp.read(MAX_ERROR_BODY if resp.status >= 300 else MAX_MANIFEST_BYTES)
                if resp.status >= 300 or not resp.isclosed() or resp.will_close:
                    self.close()  # an unread rest of a body would poison the kept-alive connection
                return _Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self.close()
                if attempt == 1 and retry:
                    continue
                raise RegistryError(f"registry {self.registry}: {what}: connection lost ({exc}); is the "
                                    "registry running and reachable?") from None
            except socket.timeout:
                self.close()
                raise RegistryError(f"registry {self.registry}: {what}: no answer within {self.timeout:.0f}s; "
                                    "check the registry service and its disk") from None
            except ssl.SSLError as exc:
                self.close()
                raise RegistryError(f"registry {self.registry}: {what}: TLS failed ({exc}); give the site CA "
                                    "with ca_file, or insecure for a plain HTTP registry") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise RegistryError(f"registry {self.registry}: {what}: {exc}; is the registry running at "
                                    f"{parts.netloc} ({parts.scheme})?") from None
        raise AssertionError("unreachable")

    def _fail(self, resp: _Response, what: str, hint: str = "") -> RegistryError:
        if resp.status == 401:
            hint = hint or ("the site registry is expected to run without authentication (offline_repo "
                            "role); check its config")
        text = f"registry {self.registry}: {what}: HTTP {resp.status}: {registry_error_text(resp.body)}"
        return RegistryError(text + (f"; {hint}" if hint else ""))

    # -- API -----------------------------------------------------------------------------------------

    def ping(self) -> None:
        """``GET /v2/``: the registry answers and speaks the distribution API without authentication."""
        resp = self._request("GET", "/v2/", "API check (GET /v2/)")
        if resp.status != 200:
            raise self._fail(resp, "API check (GET /v2/)")

    def blob_exists(self, repository: str, digest: str) -> bool:
        what = f"blob {digest} in {repository}"
        resp = self._request("HEAD", f"/v2/{repository}/blobs/{digest}", what)
        if resp.status == 200:
            return True
        if resp.status == 404:
            return False
        raise self._fail(resp, what)

    def mount_blob(self, repository: str, digest: str, from_repository: str) -> str | None:
        """Cross-repository mount; None when mounted, else the ``Location`` of the upload session the
        registry opened instead (use it with :meth:`upload_blob`)."""
        what = f"mount of blob {digest} from {from_repository} into {repository}"
        query = urllib.parse.urlencode({"mount": digest, "from": from_repository})
        resp = self._request("POST", f"/v2/{repository}/blobs/uploads/?{query}", what,
                             headers={"Content-Length": "0"})
        if resp.status == 201:
            return None
        if resp.status == 202 and resp.headers.get("location"):
            return resp.headers["location"]
        raise self._fail(resp, what)

    def start_upload(self, repository: str, digest: str) -> str:
        what = f"upload of blob {digest} to {repository} (POST)"
        resp = self._request("POST", f"/v2/{repository}/blobs/uploads/", what, headers={"Content-Length": "0"})
        if resp.status != 202 or not resp.headers.get("location"):
            raise self._fail(resp, what, "" if resp.status != 202 else "the answer has no Location header")
        return resp.headers["location"]

    def upload_blob(self, repository: str, digest: str, path: str, size: int, *,
                    location: str | None = None) -> None:
        """Upload the file ``path`` as blob ``digest``: open a session (unless ``location`` is one), then one
        monolithic ``PUT`` streaming the file with its Content-Length; the registry checks the digest."""
        location = location or self.start_upload(repository, digest)
        what = f"upload of blob {digest} ({size} bytes) to {repository} (PUT)"
        try:
            fh = open(path, "rb")
        except OSError as exc:
            raise RegistryError(f"{what}: cannot read {path}: {exc}") from None
        with fh:
            if os.fstat(fh.fileno()).st_size != size:
                raise RegistryError(f"{what}: {path} is {os.fstat(fh.fileno()).st_size} bytes, the release "
                                    f"says {size}; the site repository is damaged: import the release again")
            resp = self._request("PUT", upload_url(location, digest), what, body=fh, retry=False,
                                 headers={"Content-Type": "application/octet-stream",
                                          "Content-Length": str(size)})
        if resp.status != 201:
            raise self._fail(resp, what)
        got = resp.headers.get("docker-content-digest")
        if got and got != digest:
            raise RegistryError(f"registry {self.registry}: {what}: the registry stored it as {got}")

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> str:
        """``PUT`` a manifest or index with its exact bytes under a tag or its digest; returns its digest."""
        digest = sha256_digest(data)
        what = f"manifest {digest} ({media_type}) as {repository}:{reference}" if not is_digest(reference) \
            else f"manifest {digest} ({media_type}) in {repository}"
        resp = self._request("PUT", f"/v2/{repository}/manifests/{reference}", what, body=data,
                             headers={"Content-Type": media_type, "Content-Length": str(len(data))})
        if resp.status != 201:
            hint = ("a blob or manifest it references is not in this repository of the registry"
                    if b"UNKNOWN" in resp.body else "")
            raise self._fail(resp, what, hint)
        got = resp.headers.get("docker-content-digest")
        if got and got != digest:
            raise RegistryError(f"registry {self.registry}: {what}: the registry stored it as {got} (it "
                                "rewrote the manifest); the site registry must keep manifests byte for byte")
        return digest

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        """The digest ``reference`` (tag or digest) resolves to in ``repository``, None when unknown."""
        what = f"manifest {repository}:{reference}" if not is_digest(reference) else \
            f"manifest {reference} in {repository}"
        resp = self._request("HEAD", f"/v2/{repository}/manifests/{reference}", what,
                             headers={"Accept": MANIFEST_ACCEPT})
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise self._fail(resp, what)
        got = resp.headers.get("docker-content-digest")
        if not got or not is_digest(got):
            raise RegistryError(f"registry {self.registry}: {what}: the answer has no valid "
                                f"Docker-Content-Digest header ({got!r})")
        return got

    # -- read side (the systemd target unpacks images itself) ------------------------------------------

    def get_manifest(self, repository: str, digest: str) -> tuple[bytes, str]:
        """``GET`` a manifest or index by digest; returns (exact bytes, media type), proven to have ``digest``."""
        if not is_digest(digest):
            raise RegistryError(f"manifest {digest!r} in {repository}: not a sha256:<64 hex> digest")
        what = f"manifest {digest} in {repository}"
        resp = self._request("GET", f"/v2/{repository}/manifests/{digest}", what,
                             headers={"Accept": MANIFEST_ACCEPT})
        if resp.status == 404:
            raise self._fail(resp, what, "the image is not published in the site registry: run the import "
                                         "(registry_publish) for this release")
        if resp.status != 200:
            raise self._fail(resp, what)
        if hashlib.sha256(resp.body).hexdigest() != digest_hex(digest):
            raise RegistryError(f"registry {self.registry}: {what}: the bytes served do not match the digest; "
                                "the registry storage is damaged: publish the release again")
        media_type = resp.headers.get("content-type", "").split(";")[0].strip()
        return resp.body, media_type

    def copy_blob(self, repository: str, digest: str, out: BinaryIO, *, size: int | None = None,
                  max_redirects: int = 3) -> int:
        """Stream blob ``digest`` into ``out`` through sha256 (bounded memory); returns the byte count.

        Raises when the bytes do not match ``digest`` (or ``size``): the caller discards what was written.
        A redirect (a registry with a storage middleware) is followed without the registry's headers."""
        if not is_digest(digest):
            raise RegistryError(f"blob {digest!r} in {repository}: not a sha256:<64 hex> digest")
        what = f"blob {digest} in {repository}"
        url = urllib.parse.urljoin(self.base_url + "/", f"/v2/{repository}/blobs/{digest}")
        for _hop in range(max_redirects + 1):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https"):
                raise RegistryError(f"registry {self.registry}: {what}: unsupported URL {url!r}")
            conn = self._stream_connection(parts.scheme, parts.netloc)
            try:
                conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
                resp = conn.getresponse()
                if resp.status in (301, 302, 303, 307, 308) and resp.getheader("location"):
                    url = urllib.parse.urljoin(url, resp.getheader("location"))
                    continue
                if resp.status != 200:
                    body = resp.read(MAX_ERROR_BODY)
                    hint = "the image is not published in the site registry" if resp.status == 404 else ""
                    raise self._fail(_Response(resp.status, {}, body), f"GET {what}", hint)
                return self._hash_into(resp, out, digest, size, what)
            except socket.timeout:
                raise RegistryError(f"registry {self.registry}: {what}: no data for {self.timeout:.0f}s; check "
                                    "the registry service and the network") from None
            except (OSError, http.client.HTTPException) as exc:
                raise RegistryError(f"registry {self.registry}: {what}: {exc}; is the registry running at "
                                    f"{parts.netloc}?") from None
            finally:
                conn.close()
        raise RegistryError(f"registry {self.registry}: {what}: more than {max_redirects} redirects")

    def _stream_connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        """A connection of its own for one streamed body (the shared one must never hold a half-read body)."""
        if scheme == "https":
            return http.client.HTTPSConnection(netloc, timeout=self.timeout,
                                               context=self._ssl or ssl.create_default_context())
        return http.client.HTTPConnection(netloc, timeout=self.timeout)

    def _hash_into(self, resp: http.client.HTTPResponse, out: BinaryIO, digest: str, size: int | None,
                   what: str) -> int:
        hasher = hashlib.sha256()
        total = 0
        while True:
            chunk = resp.read(UPLOAD_BLOCK)
            if not chunk:
                break
            hasher.update(chunk)
            out.write(chunk)
            total += len(chunk)
            if size is not None and total > size:
                raise RegistryError(f"registry {self.registry}: {what}: more than the {size} bytes the manifest "
                                    "says; the registry storage is damaged: publish the release again")
        if (size is not None and total != size) or hasher.hexdigest() != digest_hex(digest):
            raise RegistryError(f"registry {self.registry}: {what}: the {total} bytes served do not match the "
                                "digest (and size) the manifest names; the registry storage is damaged: publish "
                                "the release again")
        return total
