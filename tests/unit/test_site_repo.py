"""The site repository: import publishes whole or not at all, refuses bad bundles leaving the repo as it
was, skips what it holds, resumes after an abrupt stop. Real bundles built from real image artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from bundle_builder import signing
from bundle_builder.build import build_bundle
from offline_delivery_core.bundle import ed25519
from offline_delivery_core.bundle.format import BundleError, blob_path
from offline_delivery_core.site.repo import RepoError, SiteRepo, import_bundle
from tests.helpers.images import TestImage, pseudo_random, rootfs_layer, write_oci_layout

PLATFORMS = ["linux/amd64", "linux/arm64"]

APP = """\
apiVersion: offline.delivery/v1
kind: Application
name: mini
version: {version}
components:
  web:
    image: mini/web:{web_tag}
    ports: [{{port: 8080}}]
  cache:
    image: mini/cache:1.0.0
"""


def tree_hash(root: Path) -> str:
    """Every path, mode and byte under root (or the absence of root)."""
    h = hashlib.sha256()
    if not root.exists():
        return "absent"
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(root)}|{st.st_mode:o}|".encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two releases of a two-component app for amd64+arm64; 1.1.0 changes only web's top layer."""
    d = tmp_path_factory.mktemp("vendor")
    key, pub = signing.keygen(d / "vendor")
    images = []
    for arch in ("amd64", "arm64"):
        base = rootfs_layer({"etc/os-release": b"ID=mini\n", "bin/blob": pseudo_random(200_000, arch)},
                            arch=arch)
        images += [
            TestImage("mini/web:1.0.0", arch, [base, rootfs_layer({"app/web": b"v1\n"})]).for_arch(arch),
            TestImage("mini/web:1.1.0", arch, [base, rootfs_layer({"app/web": b"v2\n"})]).for_arch(arch),
            TestImage("mini/cache:1.0.0", arch, [base, rootfs_layer({"app/cache": b"c\n"})]).for_arch(arch),
        ]
    layout = write_oci_layout(d / "oci", images)
    out = d / "out"
    out.mkdir()
    for version, tag in (("1.0.0", "1.0.0"), ("1.1.0", "1.1.0")):
        (d / f"app-{version}.yml").write_text(APP.format(version=version, web_tag=tag))
    full = build_bundle(d / "app-1.0.0.yml", out, image_sources=[f"oci:{layout}"], platforms=PLATFORMS,
                        sign_key=key)
    delta = build_bundle(d / "app-1.1.0.yml", out, image_sources=[f"oci:{layout}"], platforms=PLATFORMS,
                         sign_key=key, base=full.path)
    split_dir = d / "split"
    split_dir.mkdir()
    split = build_bundle(d / "app-1.0.0.yml", split_dir, image_sources=[f"oci:{layout}"], platforms=PLATFORMS,
                         sign_key=key, volume_size=20_000)
    other_key, other_pub = signing.keygen(d / "other")
    return {"dir": d, "key": key, "pub": ed25519.load_public_key_pem(pub.read_text()),
            "other_pub": ed25519.load_public_key_pem(other_pub.read_text()), "other_key": other_key,
            "layout": layout, "full": Path(full.path), "delta": Path(delta.path),
            "split": Path(split.path)}


def _manifest(bundle: Path) -> dict:
    from offline_delivery_core.bundle.format import read_head
    return read_head(str(bundle)).manifest


def test_import_publishes_release_and_second_import_is_no_change(vendor, tmp_path):
    repo = SiteRepo(str(tmp_path / "repo"))
    res = import_bundle(repo, str(vendor["full"]), [vendor["pub"]], imported_by="tester")
    assert res.changed and res.name == "mini" and res.version == "1.0.0"
    assert res.components == ["cache", "web"] and res.platforms == PLATFORMS
    manifest = _manifest(vendor["full"])
    for desc in manifest["blobs"]:
        data = (Path(repo.root) / blob_path(desc["digest"])).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"]
    assert res.blobs_new == len(manifest["blobs"])
    (rel,) = repo.catalog()["releases"]
    assert rel["manifestDigest"] == res.manifest_digest and rel["importedBy"] == "tester"
    assert (Path(repo.root) / "releases/mini/1.0.0/manifest.sig").exists()
    assert not os.listdir(repo.staging_dir)

    before = tree_hash(Path(repo.root))
    again = import_bundle(repo, str(vendor["full"]), [vendor["pub"]])
    assert not again.changed and "already imported" in again.msg
    assert tree_hash(Path(repo.root)) == before


def test_check_mode_verifies_and_writes_nothing(vendor, tmp_path):
    root = tmp_path / "repo"
    res = import_bundle(SiteRepo(str(root)), str(vendor["full"]), [vendor["pub"]], check_mode=True)
    assert res.changed and "would be imported" in res.msg and res.bytes_verified > 0
    assert not root.exists()


def test_delta_carries_only_new_blobs_and_needs_its_base(vendor, tmp_path):
    repo = SiteRepo(str(tmp_path / "repo"))
    with pytest.raises(RepoError) as err:
        import_bundle(repo, str(vendor["delta"]), [vendor["pub"]])
    assert "delta bundle built against release mini 1.0.0" in str(err.value)
    assert "sha256:" in str(err.value)
    assert not Path(repo.root).exists(), "a refused first import must not leave a repository behind"

    import_bundle(repo, str(vendor["full"]), [vendor["pub"]])
    res = import_bundle(repo, str(vendor["delta"]), [vendor["pub"]])
    manifest = _manifest(vendor["delta"])
    bundled = [b for b in manifest["blobs"] if b["bundled"]]
    assert res.changed and res.blobs_new == len(bundled)
    assert {r["version"] for r in repo.catalog()["releases"]} == {"1.0.0", "1.1.0"}
    for desc in manifest["blobs"]:
        assert repo.has_blob(desc["digest"], desc["size"])


def test_missing_base_blob_refused_before_anything_changes(vendor, tmp_path):
    repo = SiteRepo(str(tmp_path / "repo"))
    import_bundle(repo, str(vendor["full"]), [vendor["pub"]])
    omitted = [b for b in _manifest(vendor["delta"])["blobs"] if not b["bundled"]]
    os.unlink(repo.blob_file(omitted[0]["digest"]))  # the site lost one blob of its base
    before = tree_hash(Path(repo.root))
    with pytest.raises(RepoError) as err:
        import_bundle(repo, str(vendor["delta"]), [vendor["pub"]])
    assert omitted[0]["digest"] in str(err.value)
    assert tree_hash(Path(repo.root)) == before


def _flip_byte_in_last_blob(src: Path, dst: Path) -> None:
    data = bytearray(src.read_bytes())
    manifest = _manifest(src)
    last = [b for b in manifest["blobs"] if b["bundled"]][-1]
    name = blob_path(last["digest"]).encode()
    member = data.rindex(name)  # header of the last blob member
    data[member + 512 + last["size"] // 2] ^= 0x01
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("fresh", [True, False])
def test_tampered_bundle_leaves_repo_unchanged(vendor, tmp_path, fresh):
    repo = SiteRepo(str(tmp_path / "repo"))
    if not fresh:
        import_bundle(repo, str(vendor["full"]), [vendor["pub"]])
    bad = tmp_path / "mini-1.1.0.bundle"
    _flip_byte_in_last_blob(vendor["delta"] if not fresh else vendor["full"], bad)
    before = tree_hash(Path(repo.root))
    with pytest.raises(BundleError) as err:
        import_bundle(repo, str(bad), [vendor["pub"]])
    assert "tampered" in str(err.value) and "blobs/sha256/" in str(err.value)
    assert tree_hash(Path(repo.root)) == before


def test_untrusted_signer_refused_and_repo_unchanged(vendor, tmp_path):
    repo = SiteRepo(str(tmp_path / "repo"))
    import_bundle(repo, str(vendor["full"]), [vendor["pub"]])
    before = tree_hash(Path(repo.root))
    with pytest.raises(BundleError) as err:
        import_bundle(repo, str(vendor["delta"]), [vendor["other_pub"]])
    assert "not one of the trusted keys" in str(err.value)
    assert tree_hash(Path(repo.root)) == before


def test_changed_release_with_same_version_refused(vendor, tmp_path):
    repo = SiteRepo(str(tmp_path / "repo"))
    import_bundle(repo, str(vendor["full"]), [vendor["pub"]])
    out = tmp_path / "rebuilt"
    out.mkdir()
    app = vendor["dir"] / "app-1.0.0.yml"
    changed = tmp_path / "app.yml"
    changed.write_text(app.read_text() + "description: same version, different content\n")
    rebuilt = build_bundle(changed, out, image_sources=[f"oci:{vendor['layout']}"], platforms=PLATFORMS,
                           sign_key=vendor["key"])
    before = tree_hash(Path(repo.root))
    with pytest.raises(RepoError) as err:
        import_bundle(repo, str(rebuilt.path), [vendor["pub"]])
    assert "a published release never changes" in str(err.value)
    assert tree_hash(Path(repo.root)) == before


def test_split_bundle_imports_like_a_file(vendor, tmp_path):
    repo = SiteRepo(str(tmp_path / "repo"))
    parts = sorted(vendor["split"].parent.glob("*.part*"))
    assert len([p for p in parts if not p.name.endswith(".json")]) > 1
    res = import_bundle(repo, str(vendor["split"]), [vendor["pub"]])
    assert res.changed and res.manifest_digest == import_bundle(
        SiteRepo(str(tmp_path / "repo2")), str(vendor["full"]), [vendor["pub"]]).manifest_digest


def test_second_import_waits_for_the_lock_then_fails_cleanly(vendor, tmp_path):
    repo = SiteRepo(str(tmp_path / "repo"))
    repo.ensure_layout()
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with SiteRepo(repo.root).lock(5):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(5)
        with pytest.raises(RepoError) as err:
            import_bundle(repo, str(vendor["full"]), [vendor["pub"]], lock_timeout=0.5)
        assert "another import holds" in str(err.value)
    finally:
        release.set()
        t.join(10)
    assert not repo.catalog()["releases"] and not any(Path(repo.staging_dir).iterdir())
    assert import_bundle(repo, str(vendor["full"]), [vendor["pub"]]).changed


def test_abrupt_stop_keeps_staged_blobs_and_rerun_reuses_them(vendor, tmp_path, monkeypatch):
    repo = SiteRepo(str(tmp_path / "repo"))
    real_stage = SiteRepo._stage_blob
    calls = {"n": 0}

    def dying_stage(self, stage, desc, chunks):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill")
        return real_stage(self, stage, desc, chunks)

    monkeypatch.setattr(SiteRepo, "_stage_blob", dying_stage)
    with pytest.raises(KeyboardInterrupt):
        import_bundle(repo, str(vendor["full"]), [vendor["pub"]])
    assert not repo.catalog()["releases"], "nothing is published before every byte is verified"
    staged = {p.name: p.stat().st_ino for d in Path(repo.staging_dir).iterdir() for p in d.iterdir()}
    assert len(staged) == 3

    monkeypatch.setattr(SiteRepo, "_stage_blob", real_stage)
    res = import_bundle(repo, str(vendor["full"]), [vendor["pub"]])
    assert res.changed
    for hexd, ino in staged.items():
        assert (Path(repo.blobs_dir) / hexd).stat().st_ino == ino, "staged blob moved, not rewritten"
    assert not any(Path(repo.staging_dir).iterdir())


def test_catalog_is_json_a_reader_can_use(vendor, tmp_path):
    repo = SiteRepo(str(tmp_path / "repo"))
    import_bundle(repo, str(vendor["full"]), [vendor["pub"]])
    doc = json.loads(Path(repo.catalog_path).read_text())
    assert doc["schemaVersion"] == 1 and doc["releases"][0]["components"] == ["cache", "web"]
