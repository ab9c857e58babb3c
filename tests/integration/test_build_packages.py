"""A bundle built with --packages carries the real Debian closure: one blob per .deb, an apt index per
distro/arch whose stanzas match the blobs, omitted again by a delta, importable into a site repository."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from bundle_builder import signing
from bundle_builder.build import APT_INDEX_MEDIA_TYPE, build_bundle
from offline_delivery_core.bundle import ed25519
from offline_delivery_core.bundle.format import read_blob, read_head
from offline_delivery_core.site.repo import SiteRepo, import_bundle
from tests.helpers.images import TestImage, rootfs_layer, write_oci_layout

pytestmark = pytest.mark.slow

APP = ("apiVersion: offline.delivery/v1\nkind: Application\nname: mini\nversion: {v}\n"
       "components:\n  web:\n    image: mini/web:1.0.0\n")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("pkgs")
    key, pub = signing.keygen(d / "vendor")
    layout = write_oci_layout(d / "oci", [TestImage("mini/web:1.0.0", a, [rootfs_layer({"w": b"1"}, arch=a)])
                                          .for_arch(a) for a in ("amd64", "arm64")])
    for v in ("1.0.0", "1.1.0"):
        (d / f"app-{v}.yml").write_text(APP.format(v=v))
    common = dict(image_sources=[f"oci:{layout}"], platforms=["linux/amd64", "linux/arm64"], sign_key=key,
                  packages=["debian-12"], package_profiles=["compose"])
    (d / "full").mkdir()
    (d / "delta").mkdir()
    full = build_bundle(d / "app-1.0.0.yml", d / "full", **common)
    delta = build_bundle(d / "app-1.1.0.yml", d / "delta", base=full.path, **common)
    return {"full": str(full.path), "delta": str(delta.path), "pub": ed25519.load_public_key_pem(pub.read_text())}


def test_closure_for_both_arches_with_matching_index(built):
    manifest = read_head(built["full"]).manifest
    assert sorted(manifest["packages"]) == ["debian-12/amd64", "debian-12/arm64"]
    by_digest = {b["digest"]: b for b in manifest["blobs"]}
    for key, pset in manifest["packages"].items():
        arch = key.split("/")[1]
        names = {p["package"]: p for p in pset["packages"]}
        for wanted in ("docker.io", "containerd", "runc", "docker-compose"):
            assert wanted in names, f"{wanted} missing from the {key} closure"
            assert names[wanted]["architecture"] == arch
        assert by_digest[pset["index"]]["mediaType"] == APT_INDEX_MEDIA_TYPE
        index = read_blob(built["full"], pset["index"]).decode()
        stanzas = {re.search(r"^Filename: \./(\S+)$", s, re.M).group(1): s for s in index.strip().split("\n\n")}
        assert set(stanzas) == {p["filename"] for p in pset["packages"]}
        for p in pset["packages"]:
            assert f"SHA256: {p['digest'][7:]}" in stanzas[p["filename"]]
            assert f"Package: {p['package']}\n" in stanzas[p["filename"]]
            assert by_digest[p["digest"]]["size"] == p["size"]


def test_deb_blob_is_the_real_package(built):
    manifest = read_head(built["full"]).manifest
    pkg = next(p for p in manifest["packages"]["debian-12/amd64"]["packages"] if p["package"] == "runc")
    data = read_blob(built["full"], pkg["digest"], limit=64 * 1024 * 1024)
    assert data[:8] == b"!<arch>\n" and "sha256:" + hashlib.sha256(data).hexdigest() == pkg["digest"]


def test_delta_leaves_packages_out_and_imports_on_top(built, tmp_path: Path):
    delta = read_head(built["delta"]).manifest
    debs = {p["digest"] for pset in delta["packages"].values() for p in pset["packages"]}
    assert debs and all(not b["bundled"] for b in delta["blobs"] if b["digest"] in debs)
    repo = SiteRepo(str(tmp_path / "repo"))
    assert import_bundle(repo, built["full"], [built["pub"]]).changed
    res = import_bundle(repo, built["delta"], [built["pub"]])
    assert res.changed and res.blobs_new == 2  # only the new model and SBOM: images and packages are unchanged
