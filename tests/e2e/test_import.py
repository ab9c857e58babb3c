"""The import playbook in an air-gapped site: a shop bundle with Debian 12 packages becomes the site's signed apt
repository and registry, re-imports change nothing, and refused bundles leave the repository byte-for-byte
as it was.

One site for the whole module: the `imported` fixture builds the bundles once per session and imports shop
1.0.0 (amd64+arm64, --packages debian-12) with `ansible-playbook offline.delivery.import` from the jump host.
The tests that follow run in file order: the refusals and the re-import before the 1.1.0 delta changes the
repository.
"""
from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.media import carry, recap
from tests.world.site import Site
from tests.world.util import Result

pytestmark = pytest.mark.world

REPO_ROOT = "/srv/offline-delivery"
KEY_URL = "http://repo:8080/keys/offline-delivery-archive.gpg"
APT_LINE = "deb [signed-by=/root/od-apt/site.gpg] http://repo:8080/apt/debian-12/ ./"
IMPORT_TIMEOUT = 900

# Every path, mode and byte under the repository root, computed on the repo host (nothing left out: the
# import lock is an flock on the root directory, not a file).
TREE_HASH = r"""
import hashlib, os, sys
root = sys.argv[1]
if not os.path.exists(root):
    print("absent"); raise SystemExit
h = hashlib.sha256()
for d, dirs, files in os.walk(root):
    dirs.sort()
    for n in sorted(dirs + files):
        p = os.path.join(d, n)
        rel = os.path.relpath(p, root)
        st = os.lstat(p)
        h.update(f"{rel}|{st.st_mode:o}|".encode())
        if os.path.isfile(p) and not os.path.islink(p):
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
print(h.hexdigest())
"""


def run_import(site: Site, media: str, *options: str) -> Result:
    return site.jump(["ansible-playbook", "offline.delivery.import", *options,
                      "-e", f"offline_delivery_bundle_src=/srv/transfer/{media}",
                      "-e", json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})],
                     timeout=IMPORT_TIMEOUT)


def tree_hash(site: Site, root: str = REPO_ROOT) -> str:
    res = site.exec("repo", ["python3", "-c", TREE_HASH, root], timeout=300)
    assert res.rc == 0, res.output
    return res.stdout.strip()


def blob_names(site: Site) -> set[str]:
    res = site.exec("repo", ["ls", f"{REPO_ROOT}/blobs/sha256"], timeout=60)
    assert res.rc == 0, res.output
    return set(res.stdout.split())


@pytest.fixture(scope="module")
def imported(world_site: Site, shop_bundles: dict[str, Path]) -> Iterator[Site]:
    carry(world_site, shop_bundles)
    res = run_import(world_site, "shop-1.0.0")
    assert res.rc == 0, f"import of shop 1.0.0 failed:\n{res.output[-5000:]}"
    assert recap(res)["failed"] == 0
    yield world_site


def apt_update_on(site: Site, host: str) -> Result:
    """apt-get update on a target against the site repository ONLY (a private source list, no other list or
    parts directory), trusting it by the site key fetched from the repo host."""
    script = f"""
set -e
rm -rf /root/od-apt && mkdir -p /root/od-apt/lists/partial /root/od-apt/parts
python3 -c 'import urllib.request; open("/root/od-apt/site.gpg", "wb").write(urllib.request.urlopen("{KEY_URL}", timeout=20).read())'
echo '{APT_LINE}' > /root/od-apt/sources.list
O="-o Dir::Etc::SourceList=/root/od-apt/sources.list -o Dir::Etc::SourceParts=/root/od-apt/parts -o Dir::State::Lists=/root/od-apt/lists -o Acquire::Languages=none"
apt-get $O update -q --error-on=any
apt-cache $O policy docker.io
"""
    return site.exec(host, ["bash", "-c", script], timeout=180)


def test_apt_repository_is_signed_by_the_site_key_and_alone_is_enough(imported: Site) -> None:
    res = apt_update_on(imported, "node1")
    assert res.rc == 0, res.output
    assert "Candidate: 20.10" in res.stdout
    assert "http://repo:8080/apt/debian-12 ./ Packages" in res.stdout
    # the private key stays on the repo host, 0600 in a 0700 home
    perms = imported.exec("repo", ["sh", "-c", "stat -c '%a %n' /etc/offline-delivery/apt-signing "
                                               "/etc/offline-delivery/apt-signing/private-keys-v1.d/*.key"])
    modes = [line.split()[0] for line in perms.stdout.splitlines()]
    assert modes and modes[0] == "700" and all(m == "600" for m in modes[1:]), perms.output


def test_tampered_inrelease_is_rejected_and_republish_repairs_it(imported: Site) -> None:
    inrelease = f"{REPO_ROOT}/www/apt/debian-12/InRelease"
    tamper = ("import re,sys; p=sys.argv[1]; t=open(p).read(); "
              "t=re.sub(r'^( [0-9a-f])', lambda m: ' ' + ('1' if m.group(1)[1] != '1' else '2'), t, count=1, "
              "flags=re.M); open(p,'w').write(t)")
    assert imported.exec("repo", ["python3", "-c", tamper, inrelease]).rc == 0
    bad = apt_update_on(imported, "node1")
    assert bad.rc != 0 and re.search(r"BADSIG|signatures were invalid|is not signed", bad.output), bad.output
    fixed = imported.jump(["ansible", "offline_repo", "-m", "offline.delivery.repo_apt_publish"], timeout=300)
    assert fixed.rc == 0 and '"signed": true' in fixed.stdout, fixed.output
    assert apt_update_on(imported, "node1").rc == 0


def test_registry_serves_every_image_of_the_release(imported: Site) -> None:
    code = ("import json, urllib.request as u; b='http://repo:5000/v2/'; u.urlopen(b, timeout=10); "
            "print(json.dumps(json.load(u.urlopen(b + '_catalog', timeout=10))['repositories']))")
    res = imported.exec("node1", ["python3", "-c", code], timeout=60)
    assert res.rc == 0, res.output
    assert set(json.loads(res.stdout)) >= {"shop/api", "shop/db", "shop/gateway", "shop/redis"}


WRITE_PROBE = r"""
import json, sys, urllib.error, urllib.request as u
out = {}
for name, url, method in (("registry pull", "http://repo:5000/v2/shop/api/tags/list", "GET"),
                          ("registry push", "http://repo:5000/v2/shop/api/blobs/uploads/", "POST"),
                          ("registry delete", "http://repo:5000/v2/shop/api/manifests/1.0.0", "DELETE"),
                          ("registry direct", "http://repo:5001/v2/", "GET"),
                          ("apt put", "http://repo:8080/apt/debian-12/Packages", "PUT"),
                          ("files delete", "http://repo:8080/files/index.json", "DELETE")):
    try:
        out[name] = u.urlopen(u.Request(url, data=b"x" if method in ("POST", "PUT") else None, method=method),
                              timeout=10).status
    except urllib.error.HTTPError as exc:
        out[name] = exc.code
    except OSError as exc:
        out[name] = "unreachable"
print(json.dumps(out))
"""


def test_only_the_repo_host_writes_to_the_site_services(imported: Site) -> None:
    """From a target: pulls work, every write to the registry, the apt repository and the file tree is refused,
    and the registry itself (where the repo host pushes) is not reachable at all."""
    res = imported.exec("node1", ["python3", "-c", WRITE_PROBE], timeout=120)
    assert res.rc == 0, res.output
    seen = json.loads(res.stdout)
    assert seen["registry pull"] == 200, seen
    assert seen["registry push"] == 403 and seen["registry delete"] == 403, seen
    assert seen["registry direct"] == "unreachable", seen
    assert seen["apt put"] in (403, 405) and seen["files delete"] in (403, 405), seen
    # the repo host publishes through the loopback port
    local = imported.exec("repo", ["python3", "-c", "import urllib.request as u; "
                                   "print(u.urlopen('http://127.0.0.1:5001/v2/', timeout=10).status)"], timeout=60)
    assert local.rc == 0 and local.stdout.strip() == "200", local.output


def test_services_restart_on_failure(imported: Site) -> None:
    for unit in ("nginx", "docker-registry"):
        res = imported.exec("repo", ["systemctl", "show", unit, "-p", "Restart", "-p", "UnitFileState",
                                     "-p", "ActiveState"])
        assert res.rc == 0, res.output
        assert set(res.stdout.split()) == {"Restart=on-failure", "UnitFileState=enabled", "ActiveState=active"}


def test_reimport_changes_nothing(imported: Site) -> None:
    before = tree_hash(imported)
    res = run_import(imported, "shop-1.0.0")
    assert res.rc == 0, res.output[-5000:]
    assert recap(res)["changed"] == 0, res.stdout[-5000:]
    assert "already imported" in res.stdout
    assert tree_hash(imported) == before


@pytest.mark.parametrize("media, expected", [
    # a flip in a layer that travels compressed is found by the decompression or by the digest of its result
    ("tampered", r"blob content hashes to sha256:[0-9a-f]+, not sha256:|blob sha256:[0-9a-f]+: its compressed data "
                 r"is damaged|blob sha256:[0-9a-f]+ decompresses to"),
    ("untrusted", r"which is not one of the trusted keys"),
], ids=["tampered-layer", "untrusted-signer"])
def test_refused_bundle_leaves_the_repository_unchanged(imported: Site, media: str, expected: str) -> None:
    before = tree_hash(imported)
    res = run_import(imported, media)
    assert res.rc != 0, res.output[-3000:]
    assert "refused, repository unchanged" in res.stdout and re.search(expected, res.stdout), res.stdout[-3000:]
    assert tree_hash(imported) == before


def test_delta_without_its_base_is_refused(world_site_b: Site, shop_bundles: dict[str, Path]) -> None:
    """A site that never imported 1.0.0 (the second site) refuses the 1.1.0 delta, naming missing blobs."""
    carry(world_site_b, {k: v for k, v in shop_bundles.items() if k in ("shop-1.1.0", "vendor.pub")})
    before = tree_hash(world_site_b)
    res = run_import(world_site_b, "shop-1.1.0")
    assert res.rc != 0
    assert "delta bundle built against release shop 1.0.0" in res.stdout, res.stdout[-3000:]
    assert tree_hash(world_site_b) == before


def test_check_mode_writes_nothing(imported: Site) -> None:
    """--check of an imported release: the whole play predicts no change. Of a new delta: not on the repo
    host yet, nothing to predict; once `verify` has copied and checked it, --check verifies it again and
    says it would be imported. The repository is untouched throughout."""
    before = tree_hash(imported)
    again = run_import(imported, "shop-1.0.0", "--check")
    assert again.rc == 0 and recap(again)["changed"] == 0, again.stdout[-5000:]
    early = run_import(imported, "shop-1.1.0", "--check")
    assert early.rc == 0 and "the bundle is not on the repo host yet" in early.stdout, early.output[-5000:]
    verified = imported.jump(["ansible-playbook", "offline.delivery.verify",
                              "-e", "offline_delivery_bundle_src=/srv/transfer/shop-1.1.0",
                              "-e", json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})],
                             timeout=IMPORT_TIMEOUT)
    assert verified.rc == 0 and "shop 1.1.0" in verified.stdout, verified.output[-5000:]
    delta = run_import(imported, "shop-1.1.0", "--check")
    assert delta.rc == 0, delta.output[-5000:]
    assert "shop 1.1.0 would be imported" in delta.stdout and "the release is not imported yet" in delta.stdout
    assert tree_hash(imported) == before


def test_delta_import_adds_only_its_new_blobs(imported: Site, shop_bundles: dict[str, Path]) -> None:
    with tarfile.open(shop_bundles["shop-1.1.0"] / "shop-1.1.0.bundle") as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    carried = {b["digest"].split(":", 1)[1] for b in manifest["blobs"] if b["bundled"]}
    before = blob_names(imported)
    inrelease = imported.exec("repo", ["sha256sum", f"{REPO_ROOT}/www/apt/debian-12/InRelease"]).stdout
    res = run_import(imported, "shop-1.1.0")
    assert res.rc == 0, res.output[-5000:]
    assert blob_names(imported) - before == carried - before
    assert carried - before, "the delta should carry at least one blob the site lacks"
    # the same OS packages again: the apt repository is not re-signed
    assert imported.exec("repo", ["sha256sum", f"{REPO_ROOT}/www/apt/debian-12/InRelease"]).stdout == inrelease
    code = ("import json, urllib.request as u; "
            "print(json.dumps(json.load(u.urlopen('http://repo:5000/v2/shop/api/tags/list', timeout=10))['tags']))")
    tags = imported.exec("node1", ["python3", "-c", code], timeout=60)
    assert tags.rc == 0 and set(json.loads(tags.stdout)) >= {"1.0.0", "1.1.0"}, tags.output
    again = run_import(imported, "shop-1.1.0")
    assert again.rc == 0 and recap(again)["changed"] == 0, again.stdout[-5000:]
