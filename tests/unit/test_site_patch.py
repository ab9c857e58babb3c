"""A field fix made on site (site/patch.py): the new layer and image written by our own OCI code (they unpack,
every digest and diff_id right), the site release recorded and signed by the site key, and the trust rules
between site and vendor releases, with fault tests. Real bundles built from real image artifacts."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from bundle_builder.build import build_bundle
from offline_delivery_core.bundle.format import BundleError
from offline_delivery_core.bundle.trust import check_vendor_release, site_version
from offline_delivery_core.common.oci import OCI_LAYER, OCI_LAYER_GZIP
from offline_delivery_core.site.have import KEY_NAME, load_or_create_key
from offline_delivery_core.site.patch import (PATCH_USED_BY, PatchError, check_files, image_path_problem, make_patch,
                                              patched_reference)
from offline_delivery_core.site.publish import plan_release
from offline_delivery_core.site.release import read_release, semver_key
from offline_delivery_core.site.repo import RepoError, SiteRepo, import_bundle
from offline_delivery_core.site.status import build_status
from tests.unit.test_site_repo import APP, PLATFORMS, vendor  # noqa: F401  (module-scoped signed bundles)


@pytest.fixture
def site(vendor, tmp_path):  # noqa: F811
    repo = SiteRepo(str(tmp_path / "repo"))
    import_bundle(repo, str(vendor["full"]), [vendor["pub"]])
    fix = tmp_path / "fix"
    fix.mkdir()
    (fix / "web").write_bytes(b"v1-fixed\n")
    (fix / "run.sh").write_bytes(b"#!/bin/sh\necho fixed\n")
    return {"repo": repo, "keys": str(tmp_path / "keys"), "fix": fix, "tmp": tmp_path}


def patch(site, base="1.0.0", **kw):
    files = kw.pop("files", [{"src": str(site["fix"] / "web"), "path": "/app/web"},
                             {"src": str(site["fix"] / "run.sh"), "path": "/app/bin/run.sh", "mode": "0755"}])
    return make_patch(site["repo"], "mini", kw.pop("component", "web"), files, base_version=base, author="alice",
                      note="web answers v1-fixed", key_dir=site["keys"], **kw)


def unpack(repo: SiteRepo, manifest_digest: str, dest: Path) -> dict:
    """Apply an image's layers in order as a runtime would, checking each layer's digest and diff_id."""
    manifest = json.loads(Path(repo.blob_file(manifest_digest)).read_bytes())
    config_bytes = Path(repo.blob_file(manifest["config"]["digest"])).read_bytes()
    assert "sha256:" + hashlib.sha256(config_bytes).hexdigest() == manifest["config"]["digest"]
    config = json.loads(config_bytes)
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"])
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"]):
        data = Path(repo.blob_file(layer["digest"])).read_bytes()
        assert len(data) == layer["size"] and "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]
        raw = gzip.decompress(data) if layer["mediaType"].endswith("gzip") else data
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == diff_id
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            tar.extractall(dest, filter="tar")
    return {"manifest": manifest, "config": config}


def test_patch_adds_one_layer_per_platform_and_the_image_unpacks(site, tmp_path):
    res = patch(site)
    repo = site["repo"]
    assert res.changed and res.version == "1.0.0+site.1" and res.reference == "mini/web:1.0.0-site.1"
    rel = read_release(repo, "mini", "1.0.0+site.1", site_key_dir=site["keys"])
    base = read_release(repo, "mini", "1.0.0")
    assert rel["model"]["version"] == "1.0.0+site.1"
    manifest = repo.release_manifest("mini", "1.0.0+site.1")
    assert manifest["schemaVersion"] == 1 and all("stored" not in b and b["bundled"] for b in manifest["blobs"])
    assert manifest["builder"]["name"] == "offline.delivery site patch" and manifest["delta"] is None
    assert rel["model"]["components"]["web"]["image"] == "mini/web:1.0.0-site.1"
    assert rel["images"]["cache"] == base["images"]["cache"], "the other components do not move"
    assert rel["patch"]["component"] == "web" and rel["patch"]["by"] == "alice"
    assert rel["patch"]["base"] == {"version": "1.0.0", "manifestDigest": base["manifest_digest"]}
    assert rel["patch"]["files"] == [
        {"path": "/app/bin/run.sh", "mode": "0755", "size": 21, "sha256": "sha256:" + hashlib.sha256(
            b"#!/bin/sh\necho fixed\n").hexdigest()},
        {"path": "/app/web", "mode": "0644", "size": 9, "sha256": "sha256:" + hashlib.sha256(b"v1-fixed\n").hexdigest()}]
    for platform in PLATFORMS:
        old = unpack(repo, base["images"]["web"]["manifests"][platform], tmp_path / f"old-{platform[6:]}")
        new = unpack(repo, rel["images"]["web"]["manifests"][platform], tmp_path / f"new-{platform[6:]}")
        assert new["manifest"]["layers"][:-1] == old["manifest"]["layers"], "the base layers are the vendor's"
        assert new["manifest"]["layers"][-1]["mediaType"] == OCI_LAYER_GZIP
        assert new["config"]["rootfs"]["diff_ids"][:-1] == old["config"]["rootfs"]["diff_ids"]
        assert new["config"]["architecture"] == platform[6:]
        assert new["config"]["history"][-1]["author"] == "alice"
        root = tmp_path / f"new-{platform[6:]}"
        assert (root / "app/web").read_bytes() == b"v1-fixed\n"
        assert (root / "etc/os-release").read_bytes() == (tmp_path / f"old-{platform[6:]}" / "etc/os-release").read_bytes()
        assert oct((root / "app/bin/run.sh").stat().st_mode & 0o777) == "0o755"
        assert (tmp_path / f"old-{platform[6:]}" / "app/web").read_bytes() == b"v1\n"
    index = json.loads(Path(repo.blob_file(rel["images"]["web"]["index"])).read_bytes())
    assert {m["digest"] for m in index["manifests"]} == set(rel["images"]["web"]["manifests"].values())
    # the registry publish reads the site release like any other: every blob present, the new tag
    plans = {p.component: p for p in plan_release(repo, "mini", "1.0.0+site.1")}
    assert plans["web"].tag == "1.0.0-site.1" and plans["web"].index_digest == rel["images"]["web"]["index"]


def test_removed_paths_are_whiteouts_in_the_new_layer_and_part_of_the_patch(site, tmp_path):
    files = [{"src": str(site["fix"] / "web"), "path": "/app/web"}]
    res = patch(site, files=files, remove=["/etc/os-release", "/app/old"])
    assert res.changed and "1 file, 2 removed paths on 1.0.0" in res.msg, res.msg
    repo = site["repo"]
    rel = read_release(repo, "mini", "1.0.0+site.1", site_key_dir=site["keys"])
    assert rel["patch"]["removed"] == ["/app/old", "/etc/os-release"]
    manifest = json.loads(Path(repo.blob_file(rel["images"]["web"]["manifests"][PLATFORMS[0]])).read_bytes())
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(Path(repo.blob_file(
            manifest["layers"][-1]["digest"])).read_bytes()))) as tar:
        members = [(m.name, m.type, m.size) for m in tar]
    assert members == [("app/.wh.old", tarfile.REGTYPE, 0), ("app/web", tarfile.REGTYPE, 9),
                       ("etc/.wh.os-release", tarfile.REGTYPE, 0)]
    assert "-/etc/os-release" in json.loads(Path(repo.blob_file(manifest["config"]["digest"])).read_bytes())[
        "history"][-1]["created_by"]
    # the same again is this very patch; other removals are another
    again = patch(site, files=files, remove=["/app/old", "/etc/os-release"])
    assert not again.changed and again.version == "1.0.0+site.1"
    only_removal = patch(site, files=[], remove=["/etc/os-release"])
    assert only_removal.changed and only_removal.version == "1.0.0+site.2"
    assert "0 file" not in only_removal.msg and "1 removed path on 1.0.0" in only_removal.msg


@pytest.mark.parametrize("files, remove, error", [
    ([], [], "at least one file .* or one path to remove"),
    (None, ["/app/web"], r"remove\[0\]: /app/web cannot be removed by the patch that adds /app/web"),
    (None, ["/app"], r"remove\[0\]: /app cannot be removed by the patch that adds /app/(web|bin/run.sh)"),
    (None, ["/etc/x", "/etc/x"], r"remove\[1\]: /etc/x is given twice"),
    (None, ["etc/x"], r"remove\[0\]: path in the image 'etc/x' must be absolute"),
    (None, ["/etc/.wh.x"], r"remove\[0\]: .*starting with \.wh\. \(a whiteout"),
    ([{"src": "web", "path": "/app/.wh.web"}], [], r"files\[0\]: .*starting with \.wh\."),
])
def test_removals_are_checked_before_anything_is_recorded(site, files, remove, error):
    if files is not None:
        files = [dict(f, src=str(site["fix"] / f["src"])) for f in files]
    before = site["repo"].catalog()
    with pytest.raises(PatchError, match=error):
        patch(site, remove=remove, **({} if files is None else {"files": files}))
    assert site["repo"].catalog() == before


def test_an_uncompressed_layer_and_the_same_patch_again_is_no_change(site, tmp_path):
    first = patch(site, compress=False)
    manifest = json.loads(Path(site["repo"].blob_file(first.patch["image"]["manifests"]["linux/amd64"])).read_bytes())
    assert manifest["layers"][-1]["mediaType"] == OCI_LAYER
    assert first.patch["layer"]["digest"] == first.patch["layer"]["diffId"]
    unpack(site["repo"], first.patch["image"]["manifests"]["linux/amd64"], tmp_path / "root")
    catalog = Path(site["repo"].catalog_path).read_bytes()
    again = patch(site, compress=False)
    assert not again.changed and again.version == "1.0.0+site.1"
    assert Path(site["repo"].catalog_path).read_bytes() == catalog
    other = patch(site, files=[{"src": str(site["fix"] / "web"), "path": "/app/web2"}])
    assert other.changed and other.version == "1.0.0+site.2"


def test_a_patch_on_a_site_release_keeps_the_earlier_one_on_record(site):
    patch(site)
    second = patch(site, base="1.0.0+site.1", component="cache",
                   files=[{"src": str(site["fix"] / "web"), "path": "/app/cache"}])
    assert second.version == "1.0.0+site.2"
    rel = read_release(site["repo"], "mini", "1.0.0+site.2", site_key_dir=site["keys"])
    assert rel["model"]["components"]["web"]["image"] == "mini/web:1.0.0-site.1"
    assert rel["model"]["components"]["cache"]["image"] == "mini/cache:1.0.0-site.2"
    assert [e["version"] for e in rel["patch"]["earlier"]] == ["1.0.0+site.1"]


def test_check_mode_writes_nothing(site):
    before = Path(site["repo"].catalog_path).read_bytes()
    res = patch(site, check_mode=True)
    assert res.changed and res.version == "1.0.0+site.1" and res.patch is None
    assert Path(site["repo"].catalog_path).read_bytes() == before
    assert not os.path.exists(os.path.join(site["keys"], KEY_NAME))


def test_semver_order_puts_a_site_release_between_vendor_releases():
    versions = ["1.1.0", "1.0.0+site.2", "1.0.0", "1.0.0+site.10", "1.0.0+site.1", "1.1.0-rc.1"]
    assert sorted(versions, key=semver_key) == ["1.0.0", "1.0.0+site.1", "1.0.0+site.2", "1.0.0+site.10",
                                                "1.1.0-rc.1", "1.1.0"]
    assert site_version("1.0.0+site.3") == ("1.0.0", 3)
    assert site_version("1.0.0+build.3") is None and site_version("1.0.0+site.0") is None


def test_newest_is_the_site_release_until_the_vendor_ships_the_next(site, vendor):  # noqa: F811
    patch(site)
    assert read_release(site["repo"], "mini", site_key_dir=site["keys"])["version"] == "1.0.0+site.1"
    import_bundle(site["repo"], str(vendor["delta"]), [vendor["pub"]])
    assert read_release(site["repo"], "mini", site_key_dir=site["keys"])["version"] == "1.1.0"


@pytest.mark.parametrize("path", ["app/web", "/app/../etc/passwd", "/app//web", "/app/./web", "/", "/app/",
                                  "/app/we\nb", 7])
def test_paths_in_the_image_must_be_absolute_and_normalised(path):
    assert image_path_problem(path)


def test_files_are_checked_before_anything_is_written(site):
    before = Path(site["repo"].catalog_path).read_bytes()
    cases = [
        ([{"src": str(site["fix"] / "web"), "path": "/app/../x"}], "normalised"),
        ([{"src": str(site["fix"] / "nope"), "path": "/app/x"}], "cannot be read"),
        ([{"src": str(site["fix"]), "path": "/app/x"}], "not a regular file"),
        ([{"src": str(site["fix"] / "web"), "path": "/app/x", "mode": "4755"}], "mode"),
        ([{"src": str(site["fix"] / "web"), "path": "/a"}, {"src": str(site["fix"] / "web"), "path": "/a"}], "twice"),
        ([], "at least one file"),
    ]
    for files, fragment in cases:
        with pytest.raises(PatchError, match=fragment):
            patch(site, files=files)
    for kw, fragment in (({"component": "../etc"}, "component name"), ({"component": "db"}, "no component 'db'"),
                         ({"base": "9.9.9"}, "not in the site repository"), ({"base": "../x"}, "base release")):
        with pytest.raises(PatchError, match=fragment):
            patch(site, **kw)
    assert Path(site["repo"].catalog_path).read_bytes() == before


def test_files_are_bounded_in_size(site, monkeypatch):
    from offline_delivery_core.site import patch as patch_mod
    monkeypatch.setattr(patch_mod, "MAX_FILE_BYTES", 8)
    with pytest.raises(PatchError, match="more than 8"):
        check_files([{"src": str(site["fix"] / "web"), "path": "/app/web"}])


def test_patched_reference():
    assert patched_reference("registry.example:5000/shop/api:1.0.0", "1.0.0", 2) == "shop/api:1.0.0-site.2"
    assert patched_reference("shop/api@sha256:" + "a" * 64, "1.2.0", 1) == "shop/api:1.2.0-site.1"


# ----------------------------------------------------------------------------------------------------------
# Trust: a site key never signs as the vendor, a vendor key never signs a site release


def _site_signed_bundle(site, vendor, version: str) -> Path:  # noqa: F811
    """A bundle of ``version`` signed with the site's own key (the seed load_or_create_key made)."""
    load_or_create_key(site["keys"])
    out = site["tmp"] / f"bundle-{version}"
    out.mkdir()
    (site["tmp"] / "app.yml").write_text(APP.format(version=version, web_tag="1.1.0"))
    key = Path(site["keys"]) / KEY_NAME
    return Path(build_bundle(site["tmp"] / "app.yml", out, image_sources=[f"oci:{vendor['layout']}"],
                             platforms=PLATFORMS, sign_key=key).path)


def _site_pub(site) -> bytes:
    from offline_delivery_core.bundle import ed25519
    return ed25519.load_public_key_files([os.path.join(site["keys"], "site-have.pub")])[0]


def test_a_site_signed_bundle_claiming_a_vendor_version_is_refused(site, vendor):  # noqa: F811
    patch(site)
    bundle = _site_signed_bundle(site, vendor, "1.1.0")
    before = Path(site["repo"].catalog_path).read_bytes()
    with pytest.raises(BundleError, match="this site's own key"):
        import_bundle(site["repo"], str(bundle), [vendor["pub"], _site_pub(site)])
    with pytest.raises(BundleError, match="this site's own key"):
        import_bundle(site["repo"], str(bundle), [vendor["pub"], _site_pub(site)], check_mode=True)
    assert Path(site["repo"].catalog_path).read_bytes() == before


def test_a_vendor_key_cannot_sign_a_site_release(site, vendor):  # noqa: F811
    out = site["tmp"] / "forged"
    out.mkdir()
    (site["tmp"] / "forged.yml").write_text(APP.format(version="1.0.0+site.1", web_tag="1.1.0"))
    bundle = build_bundle(site["tmp"] / "forged.yml", out, image_sources=[f"oci:{vendor['layout']}"],
                          platforms=PLATFORMS, sign_key=vendor["key"])
    with pytest.raises(BundleError, match="site release's"):
        import_bundle(site["repo"], str(bundle.path), [vendor["pub"]])
    with pytest.raises(BundleError, match="site release's"):
        check_vendor_release("2.0.0+site.7", None)
    check_vendor_release("2.0.0+build.7", "ab" * 32, {"cd" * 32})


def test_a_site_key_that_signed_a_vendor_release_cannot_patch(site, vendor):  # noqa: F811
    bundle = _site_signed_bundle(site, vendor, "1.1.0")
    import_bundle(site["repo"], str(bundle), [vendor["pub"], _site_pub(site)])  # pinned by mistake, before any patch
    with pytest.raises(PatchError, match="never signs as the vendor"):
        patch(site)


def test_a_site_release_is_read_only_with_the_site_key(site, vendor, tmp_path):  # noqa: F811
    patch(site)
    repo = site["repo"]
    rel_dir = Path(repo.releases_dir) / "mini" / "1.0.0+site.1"
    # another site's key: refused
    other = tmp_path / "other-keys"
    load_or_create_key(str(other))
    with pytest.raises(RepoError, match="refused"):
        read_release(repo, "mini", "1.0.0+site.1", site_key_dir=str(other))
    # the manifest signed by the vendor's key instead: refused
    from bundle_builder import signing
    sig = rel_dir / "manifest.sig"
    good = sig.read_bytes()
    sig.write_bytes(signing.sign(signing.load_private_key(vendor["key"]), (rel_dir / "manifest.json").read_bytes()))
    with pytest.raises(RepoError, match="refused"):
        read_release(repo, "mini", "1.0.0+site.1", site_key_dir=site["keys"])
    sig.write_bytes(good)
    assert read_release(repo, "mini", "1.0.0+site.1", site_key_dir=site["keys"])["patch"]["component"] == "web"
    # a site release whose vendor release is gone from the catalog: refused
    catalog = json.loads(Path(repo.catalog_path).read_text())
    catalog["releases"] = [r for r in catalog["releases"] if r["version"] != "1.0.0"]
    Path(repo.catalog_path).write_text(json.dumps(catalog))
    with pytest.raises(RepoError, match="vendor's release 1.0.0 is not in"):
        read_release(repo, "mini", "1.0.0+site.1", site_key_dir=site["keys"])


def test_the_status_report_names_the_patch(site):
    patch(site)
    hosts = {"node1": {"apps": {"mini": {"installed": True, "version": "1.0.0+site.1", "history": [
        {"at": "t", "by": "bob", "action": "upgrade", "from": "1.0.0", "to": "1.0.0+site.1", "result": "ok"}]}}}}
    doc = build_status(site["repo"].root, "north", hosts, "2026-01-01T00:00:00Z")
    rel = next(r for r in doc["releases"] if r["version"] == "1.0.0+site.1")
    assert rel["patch"]["component"] == "web" and rel["patch"]["by"] == "alice" and rel["patch"]["base"] == "1.0.0"
    assert [f["path"] for f in rel["patch"]["files"]] == ["/app/bin/run.sh", "/app/web"]
    event = doc["hosts"]["node1"]["apps"]["mini"]["history"][0]
    assert event["patch"]["component"] == "web" and event["patch"]["files"][1]["sha256"].startswith("sha256:")
    assert PATCH_USED_BY == "site-patch"
    shutil.rmtree(site["keys"])


def test_the_hosts_history_names_the_patch_of_a_site_release(tmp_path):
    """The engine writes a site release's patch (component, files with their sha256, who, when) into the history
    entry of its deploy, as app_deploy passes it from app_release."""
    from tests.unit.test_app_engine import FakeRuntime, deploy, engine, images, model
    rt = FakeRuntime()
    deploy(tmp_path, rt, "1.0.0")
    m = model("1.0.0")
    m["version"] = "1.0.0+site.1"
    m["components"]["api"]["image"] = "shop/api:1.0.0-site.1"
    record = {"component": "api", "base": {"version": "1.0.0", "manifestDigest": "sha256:" + "0" * 64},
              "files": [{"path": "/opt/shop-api/shop_api.py", "sha256": "sha256:" + "a" * 64, "size": 3, "mode": "0644"}],
              "by": "alice", "at": "2026-12-06T06:00:00Z", "note": "fix", "layer": {"digest": "sha256:" + "b" * 64}}
    res = engine(tmp_path, rt).deploy(version="1.0.0+site.1", model=m, images=images(m), overrides={},
                                      snapshot=False, auto_rollback=True, patch=record)
    assert res["plan"]["changed"] == ["api"]
    state = json.loads((tmp_path / "apps" / "shop" / "state.json").read_text())
    assert state["history"][-1]["to"] == "1.0.0+site.1"
    assert state["history"][-1]["patch"] == {"component": "api", "base": "1.0.0", "by": "alice",
                                             "at": "2026-12-06T06:00:00Z", "note": "fix",
                                             "files": [{"path": "/opt/shop-api/shop_api.py", "sha256": "sha256:" + "a" * 64}],
                                             "removed": []}
    back = engine(tmp_path, rt).rollback(version=None, restore=False)
    assert back["version"] == "1.0.0" and "patch" not in json.loads(
        (tmp_path / "apps" / "shop" / "state.json").read_text())["history"][-1]
