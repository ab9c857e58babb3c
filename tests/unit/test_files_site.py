"""The site's file tree (plugins/module_utils/site/files.py): carried binaries of every imported release under
www/files/<name>/<version>/<arch>/<name> as hard links to their blobs, index.json, idempotence, check mode,
stale links removed, conflicts and damage named."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from bundle_builder import build
from offline_delivery_core.bundle import ed25519
from offline_delivery_core.bundle.format import blob_path
from offline_delivery_core.site.files import FilesError, publish_files, site_files
from offline_delivery_core.site.repo import SiteRepo, import_bundle

BOTH = ["linux/amd64", "linux/arm64"]


class Vendor:
    """Builds signed bundles of the sample app carrying given files, and imports them into one repository."""

    def __init__(self, world: Any, keypair: tuple[Path, Path], root: Path) -> None:
        self.world, self.key, self.root = world, keypair[0], root
        self.pub = ed25519.load_public_key_files([str(keypair[1])])
        self.repo = root / "repo"
        self.www = root / "repo" / "www"

    def binary(self, name: str, data: bytes, mode: int = 0o755) -> Path:
        path = self.root / "in" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        return path

    def release(self, version: str, files: list[str]) -> Path:
        out = self.root / f"out-{version}"
        out.mkdir()
        model = self.world.write_model(f"app-{version}.yml", version=version)
        result = build.build_bundle(model, out, image_sources=self.world.archives, platforms=BOTH,
                                    sign_key=self.key, files=files)
        import_bundle(SiteRepo(str(self.repo)), str(result.path), self.pub)
        return result.path

    def served(self, rel: str) -> Path:
        return self.www / "files" / rel


@pytest.fixture
def vendor(sample_world, keypair, tmp_path: Path) -> Vendor:  # type: ignore[no-untyped-def]
    return Vendor(sample_world, keypair, tmp_path)


def _index(v: Vendor) -> dict[str, Any]:
    return json.loads(v.served("index.json").read_bytes())


def _tree(v: Vendor) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for top, _dirs, names in os.walk(v.www):
        for name in names:
            p = os.path.join(top, name)
            st = os.stat(p)
            out[os.path.relpath(p, v.www)] = (st.st_ino, st.st_mode, Path(p).read_bytes())
    return out


def test_publish_links_blobs_and_writes_the_index(vendor: Vendor) -> None:
    k3s = vendor.binary("k3s", b"\x7fELF k3s amd64")
    images = vendor.binary("images.tar.zst", b"\x28\xb5\x2f\xfd images", mode=0o644)
    vendor.release("1.0.0", [f"k3s@v1.30.2+k3s1/amd64={k3s}", f"k3s-airgap-images@v1.30.2+k3s1/amd64={images}"])
    check = publish_files(str(vendor.repo), str(vendor.www), check_mode=True)
    assert check.changed and sorted(check.links_changed) == ["k3s-airgap-images/v1.30.2+k3s1/amd64/k3s-airgap-images",
                                                              "k3s/v1.30.2+k3s1/amd64/k3s"]
    assert not vendor.www.exists(), "check mode must write nothing"

    result = publish_files(str(vendor.repo), str(vendor.www))
    assert result.changed and result.index_changed
    served = vendor.served("k3s/v1.30.2+k3s1/amd64/k3s")
    digest = "sha256:" + hashlib.sha256(k3s.read_bytes()).hexdigest()
    blob = vendor.repo / blob_path(digest)
    assert served.read_bytes() == k3s.read_bytes()
    assert os.stat(served).st_ino == os.stat(blob).st_ino, "a hard link to the blob, not a copy"
    index = _index(vendor)
    imported_at = json.loads((vendor.repo / "catalog.json").read_bytes())["releases"][0]["importedAt"]
    assert [e.pop("importedAt") for e in index["files"]] == [imported_at, imported_at]
    assert index == {"schemaVersion": 1, "files": [
        {"name": "k3s", "version": "v1.30.2+k3s1", "arch": "amd64", "digest": digest, "size": 14, "mode": "0755",
         "url": "k3s/v1.30.2+k3s1/amd64/k3s", "releases": ["demo 1.0.0"]},
        {"name": "k3s-airgap-images", "version": "v1.30.2+k3s1", "arch": "amd64",
         "digest": "sha256:" + hashlib.sha256(images.read_bytes()).hexdigest(), "size": 11, "mode": "0644",
         "url": "k3s-airgap-images/v1.30.2+k3s1/amd64/k3s-airgap-images", "releases": ["demo 1.0.0"]}]}
    assert oct(os.stat(vendor.served("index.json")).st_mode & 0o777) == "0o644"

    before = _tree(vendor)
    again = publish_files(str(vendor.repo), str(vendor.www))
    assert not again.changed and again.links_changed == [] and not again.index_changed
    assert _tree(vendor) == before
    assert not publish_files(str(vendor.repo), str(vendor.www), check_mode=True).changed


def test_releases_share_a_file_and_a_version_replaced_drops_its_link(vendor: Vendor) -> None:
    k3s1 = vendor.binary("k3s-1", b"k3s one")
    vendor.release("1.0.0", [f"k3s@v1/amd64={k3s1}", f"k3s@v1/arm64={k3s1}"])
    publish_files(str(vendor.repo), str(vendor.www))
    vendor.release("1.1.0", [f"k3s@v1/amd64={k3s1}"])
    catalog = json.loads((vendor.repo / "catalog.json").read_bytes())  # imports a month apart, not one second
    for rel in catalog["releases"]:
        rel["importedAt"] = {"1.0.0": "2026-01-01T00:00:00Z", "1.1.0": "2026-02-01T00:00:00Z"}[rel["version"]]
    (vendor.repo / "catalog.json").write_text(json.dumps(catalog))
    result = publish_files(str(vendor.repo), str(vendor.www))
    assert result.links_changed == [] and result.index_changed  # the index now names both releases
    entries = {(e["version"], e["arch"]): e for e in _index(vendor)["files"]}
    assert entries[("v1", "amd64")]["releases"] == ["demo 1.0.0", "demo 1.1.0"]
    assert entries[("v1", "arm64")]["releases"] == ["demo 1.0.0"]
    # importedAt: the newest import carrying the file (what a client picks the newest version by)
    assert entries[("v1", "amd64")]["importedAt"] == "2026-02-01T00:00:00Z"
    assert entries[("v1", "arm64")]["importedAt"] == "2026-01-01T00:00:00Z"

    # the catalog forgets 1.0.0 (as a removal of the release would): its only file goes, empty dirs too
    catalog = json.loads((vendor.repo / "catalog.json").read_bytes())
    catalog["releases"] = [r for r in catalog["releases"] if r["version"] != "1.0.0"]
    (vendor.repo / "catalog.json").write_text(json.dumps(catalog))
    (vendor.served("k3s") / "notes.txt").write_text("left alone: not of the tree's shape")
    result = publish_files(str(vendor.repo), str(vendor.www))
    assert result.links_changed == ["k3s/v1/arm64/k3s"]
    assert not vendor.served("k3s/v1/arm64").exists()
    assert vendor.served("k3s/v1/amd64/k3s").exists() and vendor.served("k3s/notes.txt").exists()


def test_same_name_version_arch_with_other_bytes_names_both_releases(vendor: Vendor) -> None:
    vendor.release("1.0.0", [f"k3s@v1/amd64={vendor.binary('a', b'one')}"])
    vendor.release("1.1.0", [f"k3s@v1/amd64={vendor.binary('b', b'two')}"])
    with pytest.raises(FilesError) as err:
        publish_files(str(vendor.repo), str(vendor.www))
    text = str(err.value)
    assert "file k3s v1 for amd64 differs between demo 1.0.0" in text and "and demo 1.1.0" in text
    assert not vendor.www.exists()


def test_a_missing_or_damaged_blob_is_named(vendor: Vendor) -> None:
    data = b"k3s bytes"
    vendor.release("1.0.0", [f"k3s@v1/amd64={vendor.binary('k3s', data)}"])
    blob = vendor.repo / blob_path("sha256:" + hashlib.sha256(data).hexdigest())
    blob.write_bytes(b"k3s byte")
    with pytest.raises(FilesError, match="is 8 bytes, the manifest says 9 .k3s v1 amd64."):
        publish_files(str(vendor.repo), str(vendor.www))
    blob.unlink()
    with pytest.raises(FilesError, match=r"\(k3s v1 amd64, from demo 1.0.0\) is missing from .*import that release"):
        publish_files(str(vendor.repo), str(vendor.www))


def test_a_replaced_served_file_is_put_back(vendor: Vendor) -> None:
    vendor.release("1.0.0", [f"k3s@v1/amd64={vendor.binary('k3s', b'real')}"])
    publish_files(str(vendor.repo), str(vendor.www))
    served = vendor.served("k3s/v1/amd64/k3s")
    served.unlink()
    served.write_bytes(b"evil")
    result = publish_files(str(vendor.repo), str(vendor.www))
    assert result.links_changed == ["k3s/v1/amd64/k3s"] and served.read_bytes() == b"real"


def test_no_catalog_and_releases_without_files(vendor: Vendor) -> None:
    assert site_files(str(vendor.repo)) == []
    vendor.release("1.0.0", [])
    result = publish_files(str(vendor.repo), str(vendor.www))
    assert result.files == [] and _index(vendor) == {"schemaVersion": 1, "files": []}


def test_a_manifest_entry_that_would_escape_the_tree_is_refused(vendor: Vendor) -> None:
    vendor.release("1.0.0", [f"k3s@v1/amd64={vendor.binary('k3s', b'x')}"])
    # the import checked the manifest; a hand-edited release record must still not become a path
    path = vendor.repo / "releases" / "demo" / "1.0.0" / "manifest.json"
    manifest = json.loads(path.read_bytes())
    manifest["files"]["k3s/amd64"]["version"] = "../../../etc"
    path.write_text(json.dumps(manifest))
    with pytest.raises(FilesError, match="does not match the catalog's digest"):
        publish_files(str(vendor.repo), str(vendor.www))
    # ... and one who also rewrote the catalog's record of it still does not get a path out of the tree
    catalog = json.loads((vendor.repo / "catalog.json").read_bytes())
    catalog["releases"][0]["manifestDigest"] = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    (vendor.repo / "catalog.json").write_text(json.dumps(catalog))
    with pytest.raises(FilesError, match="files.k3s/amd64 is not a valid files entry"):
        publish_files(str(vendor.repo), str(vendor.www))
