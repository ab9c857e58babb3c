# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Publish a release's images from the site repository into an OCI distribution registry.

Standard library only (``http.client``): it runs in ``registry_publish`` on the repo host, next to the
site registry (Distribution 2.8, plain HTTP on the site network, no authentication).

Two layers:

- :class:`RegistryClient` speaks the minimal part of the OCI distribution API a push needs: ``HEAD`` a blob,
  upload one (``POST`` to open a session, then one monolithic ``PUT ?digest=`` streaming the file), mount it
  from another repository of the same registry, ``PUT`` a manifest with its exact bytes (so its digest is
  the one the release names) and ``HEAD`` a manifest to learn the digest a tag resolves to.
- :func:`plan_release` / :func:`publish_image` walk a release of the site repository: per component the
  OCI index, its per-platform manifests, their configs and layers. Everything is read and checked locally
  first (a blob missing from the repository fails before anything is pushed); then blobs go up (those the
  registry has are skipped), each manifest by digest, and the index last, by tag. A tag that already
  resolves to the index digest means the image is published: nothing is pushed.

Repository and tag come from the image reference of the model as written: ``shop/api:1.0.0`` becomes
repository ``shop/api``, tag ``1.0.0``. A registry host in the reference (``ghcr.io/x/y:1``) is dropped —
the site registry serves every image under its path, the way a registry mirror does. A reference with a
digest and no tag is pushed by the index digest only.
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
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ..bundle.format import OCI_INDEX_MEDIA_TYPE, OCI_MANIFEST_MEDIA_TYPE, digest_hex, is_digest
from ..site.repo import SiteRepo

DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX_MEDIA_TYPE, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (OCI_MANIFEST_MEDIA_TYPE, DOCKER_MANIFEST)
MANIFEST_ACCEPT = ", ".join(INDEX_TYPES + MANIFEST_TYPES)

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # Distribution refuses bigger manifests anyway
MAX_ERROR_BODY = 64 * 1024
UPLOAD_BLOCK = 1024 * 1024
DEFAULT_TIMEOUT = 60.0

# Distribution's repository name grammar (reference/regexp.go): lowercase path components.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*\Z")
_TAG = re.compile(r"^[\w][\w.-]{0,127}\Z")
_DOMAIN = re.compile(r"^(?:[a-zA-Z0-9.-]+|\[[a-fA-F0-9:]+\])(?::[0-9]+)?\Z")
_REGISTRY = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?|\[[a-fA-F0-9:]+\])(?::[0-9]{1,5})?\Z")
_MAX_REPOSITORY = 255


class RegistryError(RuntimeError):
    """A registry request failed or a release cannot be published; the message names registry, repository
    and blob or manifest, and says what to do."""


# ----------------------------------------------------------------------------------------------------------
# References


def split_reference(reference: str) -> tuple[str, str | None, str | None]:
    """``(repository, tag, digest)`` of an image reference; the registry host, if any, is dropped.

    ``shop/api:1.0.0`` -> ``("shop/api", "1.0.0", None)``; ``x/y@sha256:..`` -> ``("x/y", None, "sha256:..")``.
    """
    rest, digest = reference, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not is_digest(digest):
            raise RegistryError(f"image reference {reference!r}: digest {digest!r} is not sha256:<64 hex>")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG.match(tag):
            raise RegistryError(f"image reference {reference!r}: invalid tag {tag!r}")
    first, _sep, remainder = rest.partition("/")
    # Docker's rule: the first component is a registry host when it has a dot or a port, or is localhost.
    if remainder and (("." in first or ":" in first or first == "localhost") and _DOMAIN.match(first)):
        rest = remainder
    if not _REPOSITORY.match(rest) or len(rest) > _MAX_REPOSITORY:
        raise RegistryError(f"image reference {reference!r}: {rest!r} is not a valid repository name "
                            "(lowercase path components separated by '/')")
    if tag is None and digest is None:
        raise RegistryError(f"image reference {reference!r} has neither a tag nor a digest")
    return rest, tag, digest


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
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
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


# ----------------------------------------------------------------------------------------------------------
# Publishing a release from the site repository


@dataclass
class BlobPlan:
    digest: str
    size: int
    path: str
    role: str  # "config" or "layer", for messages


@dataclass
class ManifestPlan:
    digest: str
    media_type: str
    data: bytes
    platform: str
    blobs: list[BlobPlan]


@dataclass
class ImagePlan:
    release: str
    component: str
    reference: str
    repository: str
    tag: str | None
    index_digest: str
    index_media_type: str
    index_data: bytes
    manifests: list[ManifestPlan]

    @property
    def target(self) -> str:
        return f"{self.repository}:{self.tag}" if self.tag else f"{self.repository}@{self.index_digest}"


@dataclass
class ImageResult:
    release: str
    component: str
    reference: str
    repository: str
    tag: str | None
    index: str
    changed: bool
    msg: str
    blobs_pushed: int = 0
    blobs_mounted: int = 0
    blobs_present: int = 0
    manifests_pushed: int = 0
    index_pushed: bool = False
    bytes_pushed: int = 0
    pushed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _read_checked(repo: SiteRepo, digest: str, where: str) -> bytes:
    """A small JSON blob (index or manifest) from the repository, proven to have its digest."""
    path = repo.blob_file(digest)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise RegistryError(f"{where}: blob {digest} is not in the site repository ({path}); import the "
                            "release again to restore it") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise RegistryError(f"{where}: blob {digest} ({path}) is larger than {MAX_MANIFEST_BYTES} bytes: "
                            "not a manifest")
    if hashlib.sha256(data).hexdigest() != digest_hex(digest):
        raise RegistryError(f"{where}: blob {digest} ({path}) does not match its digest; the site repository "
                            "is damaged: remove that file and import the release again")
    return data


def _json_doc(data: bytes, digest: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{where}: blob {digest} is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{where}: blob {digest} is not a JSON object")
    return doc


def _descriptor(desc: object, where: str) -> tuple[str, int, str]:
    if not (isinstance(desc, dict) and is_digest(desc.get("digest")) and isinstance(desc.get("size"), int)
            and isinstance(desc.get("mediaType"), str)):
        raise RegistryError(f"{where}: descriptor {desc!r} lacks digest, size or mediaType")
    return desc["digest"], desc["size"], desc["mediaType"]


def _plan_blob(repo: SiteRepo, desc: object, role: str, where: str) -> BlobPlan:
    digest, size, _media_type = _descriptor(desc, f"{where} {role}")
    if not repo.has_blob(digest, size):
        path = repo.blob_file(digest)
        state = "is missing" if not os.path.exists(path) else f"has {os.path.getsize(path)} bytes, not {size}"
        raise RegistryError(f"{where}: {role} blob {digest} {state} in the site repository ({path}); "
                            "import the release again to restore it (nothing was pushed)")
    return BlobPlan(digest, size, repo.blob_file(digest), role)


def _plan_manifest(repo: SiteRepo, desc: object, where: str) -> ManifestPlan:
    digest, _size, media_type = _descriptor(desc, where)
    platform_doc = desc.get("platform") if isinstance(desc, dict) else None
    platform = "/".join(str(platform_doc.get(k)) for k in ("os", "architecture", "variant")
                        if platform_doc.get(k)) if isinstance(platform_doc, dict) else "?"
    where = f"{where} manifest {platform}"
    if media_type not in MANIFEST_TYPES:
        raise RegistryError(f"{where}: {digest} has media type {media_type!r}; only image manifests "
                            f"({', '.join(MANIFEST_TYPES)}) can be listed in an image's index")
    data = _read_checked(repo, digest, where)
    doc = _json_doc(data, digest, where)
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise RegistryError(f"{where}: manifest {digest} has no layers list")
    blobs = [_plan_blob(repo, doc.get("config"), "config", where)]
    blobs += [_plan_blob(repo, layer, "layer", where) for layer in layers]
    return ManifestPlan(digest, media_type, data, platform, blobs)


def plan_image(repo: SiteRepo, release: str, component: str, image: dict[str, Any],
               blob_types: dict[str, str]) -> ImagePlan:
    """Read and check everything one component image needs from the repository (no network)."""
    where = f"release {release} component {component}"
    reference = image["reference"]
    repository, tag, _digest = split_reference(reference)
    index_digest = image["index"]
    index_data = _read_checked(repo, index_digest, f"{where} index")
    index = _json_doc(index_data, index_digest, f"{where} index")
    media_type = index.get("mediaType") or blob_types.get(index_digest) or OCI_INDEX_MEDIA_TYPE
    if media_type not in INDEX_TYPES or not isinstance(index.get("manifests"), list):
        raise RegistryError(f"{where}: index {index_digest} is not an image index (media type {media_type!r})")
    manifests = [_plan_manifest(repo, desc, where) for desc in index["manifests"]]
    listed = {m.digest for m in manifests}
    expected = set(image["manifests"].values())
    if not expected <= listed:
        raise RegistryError(f"{where}: index {index_digest} does not list the release's manifests "
                            f"{sorted(expected - listed)}; the release record is inconsistent")
    return ImagePlan(release, component, reference, repository, tag, index_digest, media_type, index_data,
                     manifests)


def plan_release(repo: SiteRepo, name: str, version: str) -> list[ImagePlan]:
    """Every component image of an imported release, checked against the repository's blobs."""
    if repo.find_release(name, version) is None:
        have = ", ".join(f"{r['name']}:{r['version']}" for r in repo.catalog()["releases"]) or "none"
        raise RegistryError(f"release {name}:{version} is not in the catalog of {repo.root} (releases there: "
                            f"{have}); import its bundle first")
    path = os.path.join(repo.releases_dir, name, version, "manifest.json")
    try:
        with open(path, "rb") as fh:
            manifest = json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise RegistryError(f"release {name}:{version}: {path} cannot be read ({exc}); import the release "
                            "again") from None
    blob_types = {b["digest"]: b["mediaType"] for b in manifest.get("blobs", [])}
    return [plan_image(repo, f"{name}:{version}", comp, manifest["images"][comp], blob_types)
            for comp in sorted(manifest.get("images", {}))]


def check_tag_conflicts(plans: list[ImagePlan]) -> None:
    """Two images of the selected releases may share a tag only with the same index."""
    seen: dict[str, ImagePlan] = {}
    for plan in plans:
        if plan.tag is None:
            continue
        other = seen.setdefault(plan.target, plan)
        if other.index_digest != plan.index_digest:
            raise RegistryError(
                f"{plan.target} is {other.index_digest} in release {other.release} (component "
                f"{other.component}) but {plan.index_digest} in release {plan.release} (component "
                f"{plan.component}); one tag cannot name both: publish one of the releases (option releases), "
                "and have the vendor give changed images a new tag")


def publish_image(client: RegistryClient, plan: ImagePlan, *, check_mode: bool = False,
                  mount_sources: dict[str, str] | None = None) -> ImageResult:
    """Push one image unless its tag already resolves to its index. ``mount_sources`` (digest ->
    repository) remembers where blobs went, so another repository gets them by a cross-repository mount."""
    mount_sources = mount_sources if mount_sources is not None else {}
    res = ImageResult(plan.release, plan.component, plan.reference, plan.repository, plan.tag,
                      plan.index_digest, changed=False, msg="")
    current = client.manifest_digest(plan.repository, plan.tag or plan.index_digest)
    if current == plan.index_digest:
        for m in plan.manifests:
            for b in m.blobs:
                mount_sources.setdefault(b.digest, plan.repository)
        res.msg = f"{plan.target} is already {plan.index_digest}"
        return res
    res.changed = True
    handled: set[str] = set()  # a layer shared by two platforms is pushed (or counted) once
    for manifest in plan.manifests:
        for blob in manifest.blobs:
            if blob.digest not in handled:
                handled.add(blob.digest)
                _push_blob(client, plan.repository, blob, res, check_mode, mount_sources)
        if client.manifest_digest(plan.repository, manifest.digest) != manifest.digest:
            if not check_mode:
                client.put_manifest(plan.repository, manifest.digest, manifest.data, manifest.media_type)
            res.manifests_pushed += 1
            res.pushed.append(f"manifest {manifest.digest} ({manifest.platform})")
    if not check_mode:
        client.put_manifest(plan.repository, plan.tag or plan.index_digest, plan.index_data,
                            plan.index_media_type)
    res.index_pushed = True
    res.pushed.append(f"index {plan.index_digest}")
    verb = "would push" if check_mode else "pushed"
    was = f" (was {current})" if current else ""
    res.msg = (f"{plan.target}{was}: {verb} {res.blobs_pushed} blobs ({res.bytes_pushed} bytes), "
               f"{res.blobs_mounted} mounted, {res.blobs_present} present, {res.manifests_pushed} manifests "
               f"and the index {plan.index_digest}")
    return res


def _push_blob(client: RegistryClient, repository: str, blob: BlobPlan, res: ImageResult, check_mode: bool,
               mount_sources: dict[str, str]) -> None:
    if client.blob_exists(repository, blob.digest):
        res.blobs_present += 1
        mount_sources.setdefault(blob.digest, repository)
        return
    source = mount_sources.get(blob.digest)
    location = None
    if source and source != repository:
        if check_mode:
            res.blobs_mounted += 1
            return
        location = client.mount_blob(repository, blob.digest, source)
        if location is None:
            res.blobs_mounted += 1
            res.pushed.append(f"blob {blob.digest}")
            return
    if not check_mode:
        client.upload_blob(repository, blob.digest, blob.path, blob.size, location=location)
    mount_sources.setdefault(blob.digest, repository)
    res.blobs_pushed += 1
    res.bytes_pushed += blob.size
    res.pushed.append(f"blob {blob.digest}")


def publish_releases(repo: SiteRepo, client: RegistryClient, releases: list[tuple[str, str]] | None, *,
                     check_mode: bool = False) -> list[ImageResult]:
    """Publish every image of ``releases`` (default: every release in the catalog). Everything is planned
    and checked locally before the first request, so a damaged repository pushes nothing."""
    if releases is None:
        releases = [(r["name"], r["version"]) for r in repo.catalog()["releases"]]
    plans = [plan for name, version in releases for plan in plan_release(repo, name, version)]
    check_tag_conflicts(plans)
    if not plans:
        return []
    client.ping()
    mount_sources: dict[str, str] = {}
    done: dict[str, ImageResult] = {}
    results = []
    for plan in plans:
        key = f"{plan.target}@{plan.index_digest}"
        if key in done:  # the same image in two releases: pushed once
            first = done[key]
            results.append(ImageResult(plan.release, plan.component, plan.reference, plan.repository, plan.tag,
                                       plan.index_digest, changed=False,
                                       msg=f"{plan.target}: same image as release {first.release} "
                                           f"component {first.component}"))
            continue
        done[key] = publish_image(client, plan, check_mode=check_mode, mount_sources=mount_sources)
        results.append(done[key])
    return results


def parse_release(text: str) -> tuple[str, str]:
    """``name:version`` -> ``(name, version)``."""
    name, sep, version = text.partition(":")
    if not sep or not name or not version:
        raise RegistryError(f"release {text!r}: write it as name:version (e.g. shop:1.0.0)")
    return name, version
