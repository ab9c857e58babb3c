"""Hub -> site sync against a real HTTP server on 127.0.0.1 (Range support like nginx): only the missing blobs
travel, an interrupted transfer resumes from its partial file, a wrong blob or an untrusted signature is
refused with the repository unchanged, the bandwidth limit holds, a second sync changes nothing; over HTTPS, the
hub is verified against its own site CA alone."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import shutil
import ssl
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from bundle_builder import signing
from bundle_builder.build import build_bundle
from offline_delivery_core.bundle import ed25519
from offline_delivery_core.bundle.format import blob_path, digest_hex, read_head
from offline_delivery_core.site import tls as site_tls
from offline_delivery_core.site.repo import SiteRepo, import_bundle
from offline_delivery_core.site.sync import (BlobRefused, Hub, SyncError, SyncInterrupted, TokenBucket, hub_base,
                                             parse_rate, stage_dir, sync_release)
from tests.helpers.images import TestImage, pseudo_random, rootfs_layer, write_oci_layout

PLATFORMS = ["linux/amd64"]
APP = """\
apiVersion: offline.delivery/v1
kind: Application
name: mini
version: {version}
components:
  web:
    image: mini/web:{version}
    ports: [{{port: 8080}}]
  cache:
    image: mini/cache:1.0.0
"""


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            h.update(f"{p.relative_to(root)}|{p.lstat().st_mode:o}|".encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """mini 1.0.0 (full) and 1.1.0 (delta: a new web layer of 600 kB of incompressible data)."""
    d = tmp_path_factory.mktemp("vendor")
    key, pub = signing.keygen(d / "vendor")
    other_key, other_pub = signing.keygen(d / "other")
    base = rootfs_layer({"etc/os-release": b"ID=mini\n", "bin/blob": pseudo_random(100_000, "base")}, arch="amd64")
    images = [
        TestImage("mini/web:1.0.0", "amd64", [base, rootfs_layer({"app/web": b"v1\n"})]).for_arch("amd64"),
        TestImage("mini/web:1.1.0", "amd64",
                  [base, rootfs_layer({"app/web": pseudo_random(600_000, "web2")})]).for_arch("amd64"),
        TestImage("mini/cache:1.0.0", "amd64", [base, rootfs_layer({"app/cache": b"c\n"})]).for_arch("amd64"),
    ]
    layout = write_oci_layout(d / "oci", images)
    for version in ("1.0.0", "1.1.0"):
        (d / f"app-{version}.yml").write_text(APP.format(version=version))
    out = d / "out"
    out.mkdir()
    src = [f"oci:{layout}"]
    full = build_bundle(d / "app-1.0.0.yml", out, image_sources=src, platforms=PLATFORMS, sign_key=key)
    delta = build_bundle(d / "app-1.1.0.yml", out, image_sources=src, platforms=PLATFORMS, sign_key=key,
                         base=full.path)
    pub_key = ed25519.load_public_key_pem(pub.read_text())
    hub = SiteRepo(str(d / "hub"))
    for bundle in (full.path, delta.path):
        assert import_bundle(hub, str(bundle), [pub_key]).changed
    return {"dir": d, "pub": pub_key, "other_pub": ed25519.load_public_key_pem(other_pub.read_text()),
            "other_key": other_key, "full": Path(full.path), "delta": Path(delta.path), "hub": hub,
            "m10": read_head(str(full.path)).manifest, "m11": read_head(str(delta.path)).manifest}


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves <root> under /repo/ with single-range support, as nginx does; the server's knobs damage a blob
    (``corrupt``) or cut a response after N bytes (``cut``)."""

    server: "HubServer"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.requests.append((self.path, self.headers.get("Range")))
        rel = self.path[len("/repo/"):] if self.path.startswith("/repo/") else None
        path = Path(self.server.root, rel) if rel else None
        if path is None or ".." in rel.split("/") or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        if rel in self.server.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        start = 0
        m = re.match(r"^bytes=(\d+)-$", self.headers.get("Range") or "")
        if m:
            start = int(m.group(1))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.server.cut.pop(rel, None)
        if rel in self.server.drip:  # a byte every 0.3 s: each read returns in time, the whole never ends
            for i in range(min(len(body), 200)):
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                time.sleep(0.3)
            self.close_connection = True
            return
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None and rel in self.server.stall:
            self.wfile.flush()
            self.server.stall[rel].wait(30)  # a hub that stops sending without closing (until released)
        if cut is not None:
            self.close_connection = True


class HubServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.requests: list[tuple[str, str | None]] = []
        self.corrupt: set[str] = set()
        self.cut: dict[str, int] = {}
        self.stall: dict[str, threading.Event] = {}
        self.drip: set[str] = set()

    @property
    def url(self) -> str:
        scheme = "https" if isinstance(self.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://127.0.0.1:{self.server_address[1]}"

    def blob_requests(self) -> list[tuple[str, str | None]]:
        return [r for r in self.requests if "/blobs/" in r[0]]


@pytest.fixture
def hub(vendor: dict) -> Iterator[HubServer]:
    server = HubServer(vendor["hub"].root)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def site(vendor: dict, tmp_path: Path) -> SiteRepo:
    repo = SiteRepo(str(tmp_path / "site"))
    assert import_bundle(repo, str(vendor["full"]), [vendor["pub"]]).changed
    return repo


def lacking(vendor: dict) -> list[dict]:
    have = {b["digest"] for b in vendor["m10"]["blobs"]}
    return [b for b in vendor["m11"]["blobs"] if b["digest"] not in have]


def biggest_lacking(vendor: dict) -> dict:
    return max(lacking(vendor), key=lambda b: b["size"])


def test_only_missing_blobs_travel_then_publish_and_rerun_is_no_change(vendor, hub, site):
    res = sync_release(site, hub.url, "mini", "1.1.0", [vendor["pub"]], imported_by="tester")
    want = lacking(vendor)
    assert res.changed and res.blobs_missing == len(want) and res.bytes_missing == sum(b["size"] for b in want)
    assert res.blobs_sent == len(want) and res.bytes_sent == res.bytes_missing and res.bytes_resumed == 0
    assert res.blobs_new == len(want) and res.bytes_new == res.bytes_missing
    assert sorted(p for p, dummy in hub.blob_requests()) == sorted(
        "/repo/" + blob_path(b["digest"]) for b in want)
    rel = site.find_release("mini", "1.1.0")
    assert rel is not None and rel["manifestDigest"] == res.manifest_digest
    assert rel["importedBy"] == f"tester via sync from {hub.url}/repo/"
    # the release record is the hub's, byte for byte (the same signed manifest), and every blob is there
    for name in ("manifest.json", "manifest.sig"):
        assert (Path(site.root) / "releases/mini/1.1.0" / name).read_bytes() == \
            (Path(vendor["hub"].root) / "releases/mini/1.1.0" / name).read_bytes()
    assert all(site.has_blob(b["digest"], b["size"]) for b in vendor["m11"]["blobs"])
    assert not os.listdir(site.staging_dir)

    before, hub.requests[:] = tree_hash(Path(site.root)), []
    again = sync_release(site, hub.url, "mini", "1.1.0", [vendor["pub"]])
    assert not again.changed and again.bytes_sent == 0 and "nothing to send" in again.msg
    assert not hub.blob_requests() and tree_hash(Path(site.root)) == before


def test_an_https_hub_is_verified_against_its_site_ca_alone(vendor, hub, site, tmp_path):
    """The hub's TLS option (nginx with a certificate of the hub's site CA), here the test server with one:
    the sync trusts exactly that CA; the machine's CAs, another CA, or a CA with an http:// URL are refused
    before any blob, with the repository unchanged."""
    made = site_tls.ensure_site_tls(str(tmp_path / "hub-tls"), ["127.0.0.1"])
    other = site_tls.ensure_site_tls(str(tmp_path / "other-tls"), ["127.0.0.1"])
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(made.server_cert, made.server_key)
    plain_url = hub.url
    hub.socket = server.wrap_socket(hub.socket, server_side=True)
    hub_ca, other_ca = Path(made.ca_cert).read_text(), Path(other.ca_cert).read_text()
    before = tree_hash(Path(site.root))
    with pytest.raises(SyncError, match="presented a certificate this site does not trust .*offline_delivery_sync_hub_ca"):
        sync_release(site, hub.url, "mini", "1.1.0", [vendor["pub"]], timeout=10)   # the machine's CAs
    with pytest.raises(SyncError, match="does not trust"):
        sync_release(site, hub.url, "mini", "1.1.0", [vendor["pub"]], hub_ca=other_ca, timeout=10)
    with pytest.raises(SyncError, match="must be reached over https://"):
        sync_release(site, plain_url, "mini", "1.1.0", [vendor["pub"]], hub_ca=hub_ca)
    with pytest.raises(SyncError, match="the hub CA is not a PEM certificate"):
        sync_release(site, hub.url, "mini", "1.1.0", [vendor["pub"]], hub_ca="not a certificate")
    assert not hub.requests and tree_hash(Path(site.root)) == before

    res = sync_release(site, hub.url, "mini", "1.1.0", [vendor["pub"]], hub_ca=hub_ca, timeout=10)
    assert res.changed and res.hub == hub.url + "/repo/" and res.blobs_sent == len(lacking(vendor)) > 0
    assert all(site.has_blob(b["digest"], b["size"]) for b in vendor["m11"]["blobs"])


def test_check_mode_says_what_would_be_sent_and_writes_nothing(vendor, hub, site):
    before = tree_hash(Path(site.root))
    res = sync_release(site, hub.url, "mini", "1.1.0", [vendor["pub"]], check_mode=True)
    assert res.changed and res.blobs_missing == len(lacking(vendor)) and res.bytes_sent == 0
    assert f"{res.bytes_missing} bytes to send" in res.msg
    assert not hub.blob_requests() and tree_hash(Path(site.root)) == before


def test_interrupted_transfer_resumes_from_the_partial_file(vendor, hub, site):
    big = biggest_lacking(vendor)
    rel = blob_path(big["digest"])
    hub.cut[rel] = 250_000
    with pytest.raises(SyncInterrupted, match="run again to resume"):
        sync_release(site, hub.url, "mini", "1.1.0", [vendor["pub"]])
    assert site.find_release("mini", "1.1.0") is None
    partial = Path(stage_dir(site, _manifest_digest(vendor)), digest_hex(big["digest"]) + ".partial")
    assert partial.stat().st_size == 250_000

    hub.requests[:] = []
    res = sync_release(site, hub.url, "mini", "1.1.0", [vendor["pub"]])
    assert res.changed and site.find_release("mini", "1.1.0") is not None
    assert ("/repo/" + rel, "bytes=250000-") in hub.blob_requests()
    assert res.bytes_resumed >= 250_000 and res.bytes_sent == res.bytes_missing - res.bytes_resumed
    assert site.has_blob(big["digest"], big["size"]) and not os.listdir(site.staging_dir)


def test_a_stalled_transfer_stops_after_the_timeout_and_resumes(vendor, hub, site):
    big = biggest_lacking(vendor)
    rel = blob_path(big["digest"])
    hub.cut[rel], hub.stall[rel] = 100_000, threading.Event()
    started = time.monotonic()
    try:
        with pytest.raises(SyncInterrupted, match="stopped .*run again to resume"):
            sync_release(site, hub.url, "mini", "1.1.0", [vendor["pub"]], timeout=1)
    finally:
        hub.stall.pop(rel).set()
    assert time.monotonic() - started < 15
    res = sync_release(site, hub.url, "mini", "1.1.0", [vendor["pub"]])
    assert res.changed and res.bytes_resumed >= 100_000 and site.has_blob(big["digest"], big["size"])


def test_a_hub_that_drips_bytes_is_dropped_after_the_timeout(vendor, hub, site):
    big = biggest_lacking(vendor)
    hub.drip.add(blob_path(big["digest"]))
    started = time.monotonic()
    with pytest.raises(SyncInterrupted, match="slower than 1024 bytes/s"):
        sync_release(site, hub.url, "mini", "1.1.0", [vendor["pub"]], timeout=2)
    assert time.monotonic() - started < 20  # every read came in time: only the rate floor ends it
    hub.drip.clear()
    res = sync_release(site, hub.url, "mini", "1.1.0", [vendor["pub"]])
    assert res.changed and site.has_blob(big["digest"], big["size"])


def test_damaged_partial_file_is_rehashed_and_fetched_again(vendor, hub, site):
    big = biggest_lacking(vendor)
    stage = Path(stage_dir(site, _manifest_digest(vendor)))
    stage.mkdir(mode=0o700)
    (stage / (digest_hex(big["digest"]) + ".partial")).write_bytes(b"\0" * 1000)  # not the blob's first bytes
    hub.requests[:] = []
    res = sync_release(site, hub.url, "mini", "1.1.0", [vendor["pub"]])
    assert res.changed and site.has_blob(big["digest"], big["size"])
    ranges = [r for p, r in hub.blob_requests() if p.endswith(digest_hex(big["digest"]))]
    assert ranges == ["bytes=1000-", None]  # continued, refused by its digest, then fetched whole


def test_corrupted_blob_is_refused_and_nothing_is_published(vendor, hub, site):
    big = biggest_lacking(vendor)
    hub.corrupt.add(blob_path(big["digest"]))
    before = tree_hash(Path(site.root))
    with pytest.raises(BlobRefused) as info:
        sync_release(site, hub.url, "mini", "1.1.0", [vendor["pub"]])
    assert big["digest"] in str(info.value) and f"{hub.url}/repo/{blob_path(big['digest'])}" in str(info.value)
    assert tree_hash(Path(site.root)) == before and site.find_release("mini", "1.1.0") is None


def test_untrusted_signature_is_refused_before_any_blob(vendor, hub, site):
    before = tree_hash(Path(site.root))
    with pytest.raises(SyncError, match="not one of the trusted keys"):
        sync_release(site, hub.url, "mini", "1.1.0", [vendor["other_pub"]])
    assert not hub.blob_requests() and tree_hash(Path(site.root)) == before


def test_changed_manifest_on_the_hub_is_refused(vendor, hub, site, tmp_path):
    hub_copy = tmp_path / "hub-copy"
    shutil.copytree(vendor["hub"].root, hub_copy)
    manifest = hub_copy / "releases/mini/1.1.0/manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"version":"1.1.0"', b'"version":"1.1.0" '))
    hub.root = str(hub_copy)
    with pytest.raises(SyncError, match="signature does not match"):
        sync_release(site, hub.url, "mini", "1.1.0", [vendor["pub"]])
    assert not hub.blob_requests()


def test_clear_errors_for_missing_release_and_unreachable_hub(vendor, hub, site):
    with pytest.raises(SyncError, match=r"has no release mini 9\.9\.9 .*catalog lists mini 1\.0\.0, 1\.1\.0"):
        sync_release(site, hub.url, "mini", "9.9.9", [vendor["pub"]])
    with pytest.raises(SyncError, match="name '../x'"):
        sync_release(site, hub.url, "../x", "1.0.0", [vendor["pub"]])
    port = hub.server_address[1]
    hub.shutdown()
    hub.server_close()
    with pytest.raises(SyncInterrupted, match=f"127.0.0.1:{port}/repo/ cannot be reached"):
        sync_release(site, f"http://127.0.0.1:{port}", "mini", "1.1.0", [vendor["pub"]], timeout=5)


def test_bandwidth_limit_is_honoured(vendor, hub, site):
    rate = 256 * 1024
    started = time.monotonic()
    res = sync_release(site, hub.url, "mini", "1.1.0", [vendor["pub"]], bandwidth_limit=rate)
    took = time.monotonic() - started
    # a quarter-second burst at the start, then at most `rate` bytes per second
    assert res.bytes_sent > 2 * rate
    assert took >= (res.bytes_sent - rate / 4) / rate * 0.95
    assert took < res.bytes_sent / rate * 3 + 5  # roughly the limit, not far slower


def test_token_bucket_sleeps_are_bounded_and_the_rate_holds() -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(4096, clock=lambda: now[0], sleep=sleep)
    for dummy in range(40):
        bucket.take(bucket.chunk)
    sent = 40 * bucket.chunk
    assert bucket.chunk == 1024 and max(sleeps) <= 1.0
    assert abs(now[0] - (sent - 1024) / 4096) < 0.01


def test_parse_rate_and_hub_url() -> None:
    assert parse_rate("10M") == 10 * 1024 ** 2 and parse_rate("512k") == 512 * 1024 and parse_rate("0") == 0
    assert parse_rate("2.5MB/s") == int(2.5 * 1024 ** 2) and parse_rate(4096) == 4096 and parse_rate("") == 0
    for bad in ("fast", "10X", "100"):
        with pytest.raises(SyncError, match="bandwidth_limit"):
            parse_rate(bad)
    assert hub_base("http://hub:8080") == "http://hub:8080/repo/"
    assert hub_base("https://hub/mirror/repo") == "https://hub/mirror/repo/"
    for bad in ("ftp://hub/", "hub:8080", "http://u:p@hub/"):
        with pytest.raises(SyncError, match="hub"):
            Hub(bad)


def _manifest_digest(vendor: dict) -> str:
    return read_head(str(vendor["delta"])).manifest_digest
