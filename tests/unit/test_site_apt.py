"""The site's apt repository (site_apt): package sets from the catalog, the union index, the signed flat
repository with real gpg/gpgv and apt-style checks of the Release hashes, idempotence (no re-sign), the
bootstrap source of the repo host's own tools."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from offline_delivery_core.site import apt as site_apt
from offline_delivery_core.site.apt import AptRepoError

needs_gpg = pytest.mark.skipif(not (shutil.which("gpg") and shutil.which("gpgv")), reason="gpg/gpgv not installed")


class FakeSite:
    """A site repository as bundle_import leaves it: blobs, release manifests with a packages section, catalog."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        self.releases: list[dict] = []

    def blob(self, data: bytes) -> str:
        hexd = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / "sha256" / hexd).write_bytes(data)
        return f"sha256:{hexd}"

    def deb(self, name: str, version: str, arch: str, payload: bytes | None = None) -> tuple[dict, str]:
        """A package file blob and its index entry + stanza (payload stands in for the .deb bytes)."""
        data = payload if payload is not None else f"{name} {version} {arch}".encode()
        digest = self.blob(data)
        filename = f"{name}_{version}_{arch}.deb"
        entry = {"package": name, "version": version, "architecture": arch, "filename": filename,
                 "digest": digest, "size": len(data), "profiles": ["repo"]}
        stanza = (f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\nDescription: test\n"
                  f"Filename: ./{filename}\nSize: {len(data)}\nSHA256: {digest.split(':')[1]}\n")
        return entry, stanza

    def release(self, name: str, version: str, imported_at: str,
                psets: dict[str, list[tuple[dict, str]]], profiles: list[str] | None = None) -> None:
        packages = {}
        for key, debs in psets.items():
            distro, arch = key.split("/")
            index = "\n".join(s for _, s in sorted(debs, key=lambda d: d[0]["filename"])).encode()
            packages[key] = {"distro": distro, "arch": arch, "profiles": profiles or ["base", "repo"],
                             "index": self.blob(index), "packages": [e for e, _ in debs]}
        rel_dir = self.root / "releases" / name / version
        rel_dir.mkdir(parents=True)
        manifest = json.dumps({"name": name, "version": version, "packages": packages}).encode()
        (rel_dir / "manifest.json").write_bytes(manifest)
        self.releases.append({"name": name, "version": version, "importedAt": imported_at,
                              "manifestDigest": "sha256:" + hashlib.sha256(manifest).hexdigest()})
        (self.root / "catalog.json").write_text(json.dumps({"schemaVersion": 1, "releases": self.releases}))


@pytest.fixture
def site(tmp_path: Path) -> FakeSite:
    s = FakeSite(tmp_path / "repo")
    common = s.deb("libc6", "2.36-9", "amd64")
    s.release("shop", "1.0.0", "2026-11-21T10:00:00Z", {
        "debian-12/amd64": [common, s.deb("nginx", "1.22.1-9", "amd64"), s.deb("gpg", "2.2.40-1.1", "all")],
        "debian-12/arm64": [s.deb("nginx", "1.22.1-9", "arm64"), s.deb("gpg", "2.2.40-1.1", "all")],
    })
    return s


@pytest.fixture
def gpg_home(tmp_path: Path) -> Path:
    home = tmp_path / "signing"
    yield home
    site_apt.stop_agent(str(home))


def publish(site: FakeSite, home: Path, *, check_mode: bool = False) -> site_apt.DistroResult:
    www = site.root / "www"
    fpr = site_apt.signing_key(str(home)) if home.exists() else None
    if fpr is None and not check_mode:
        fpr = site_apt.create_key(str(home), "test site key")
    keyring = www / "keys" / "site.gpg"
    if fpr and not check_mode:
        keyring.parent.mkdir(parents=True, exist_ok=True)
        keyring.write_bytes(site_apt.export_public(str(home), fpr, armor=False))
    return site_apt.publish_distro(str(site.root), str(www), "debian-12", site_apt.package_sets(str(site.root)),
                                   home=str(home), fpr=fpr, keyring=str(keyring), check_mode=check_mode)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- selecting the release the repo host installs its tools from -----------------------------------------


def test_newest_release_with_the_profiles_is_selected(site: FakeSite) -> None:
    site.release("shop", "1.1.0", "2026-11-21T11:00:00Z", {"debian-12/amd64": [site.deb("nginx", "1.22.1-10", "amd64")]})
    site.release("other", "2.0.0", "2026-11-21T12:00:00Z",
                 {"debian-12/amd64": [site.deb("zstd", "1.5", "amd64")]}, profiles=["systemd"])
    chosen = site_apt.select_package_set(site_apt.package_sets(str(site.root)), "debian-12", "amd64", ["base", "repo"])
    assert chosen.release == "shop 1.1.0"


def test_no_release_for_the_distro_arch_is_a_clear_error(site: FakeSite) -> None:
    with pytest.raises(AptRepoError) as err:
        site_apt.select_package_set(site_apt.package_sets(str(site.root)), "debian-13", "amd64", ["base", "repo"])
    assert "no imported release carries OS packages for debian-13/amd64" in str(err.value)
    assert "--packages debian-13" in str(err.value) and "debian-12/amd64 (base, repo) in shop 1.0.0" in str(err.value)


def test_empty_repository_has_no_package_sets(tmp_path: Path) -> None:
    assert site_apt.package_sets(str(tmp_path)) == []
    with pytest.raises(AptRepoError, match="no package sets at all"):
        site_apt.select_package_set([], "debian-12", "amd64", ["repo"])


def test_bootstrap_source_links_the_blobs_and_is_idempotent(site: FakeSite, tmp_path: Path) -> None:
    pset = site_apt.select_package_set(site_apt.package_sets(str(site.root)), "debian-12", "amd64", ["repo"])
    dest = site.root / "bootstrap" / "debian-12-amd64"
    assert site_apt.stage_bootstrap_source(str(site.root), pset, str(dest), check_mode=True)
    assert not dest.exists()
    assert site_apt.stage_bootstrap_source(str(site.root), pset, str(dest), check_mode=False)
    deb = dest / "nginx_1.22.1-9_amd64.deb"
    blob = site.root / "blobs" / "sha256" / pset.entries[1]["digest"].split(":")[1]
    assert os.stat(deb).st_ino == os.stat(blob).st_ino
    stanzas = site_apt.parse_stanzas((dest / "Packages").read_bytes(), "Packages")
    assert [s["Package"] for s in stanzas] == ["gpg", "libc6", "nginx"]
    assert not site_apt.stage_bootstrap_source(str(site.root), pset, str(dest), check_mode=False)


# -- the union index ---------------------------------------------------------------------------------------


def test_union_deduplicates_by_file_name_across_releases_and_arches(site: FakeSite) -> None:
    site.release("shop", "1.1.0", "2026-11-21T11:00:00Z", {"debian-12/amd64": [site.deb("nginx", "1.22.1-9", "amd64")]})
    union = site_apt.union_index(str(site.root), site_apt.package_sets(str(site.root)))
    assert sorted(union.stanzas) == ["gpg_2.2.40-1.1_all.deb", "libc6_2.36-9_amd64.deb", "nginx_1.22.1-9_amd64.deb",
                                     "nginx_1.22.1-9_arm64.deb"]
    assert union.origin["nginx_1.22.1-9_amd64.deb"] == "shop 1.0.0"
    assert union.packages_bytes().count(b"Package: gpg\n") == 1


def test_same_name_different_bytes_names_both_releases(site: FakeSite) -> None:
    site.release("evil", "9.9.9", "2026-11-21T11:00:00Z",
                 {"debian-12/amd64": [site.deb("nginx", "1.22.1-9", "amd64", payload=b"other bytes")]})
    with pytest.raises(AptRepoError) as err:
        site_apt.union_index(str(site.root), site_apt.package_sets(str(site.root)))
    msg = str(err.value)
    assert "nginx_1.22.1-9_amd64.deb differs between shop 1.0.0" in msg and "evil 9.9.9" in msg


def test_index_and_manifest_must_agree(site: FakeSite) -> None:
    entry, stanza = site.deb("curl", "7.88", "amd64")
    entry = dict(entry, digest="sha256:" + "0" * 64)
    site.release("bad", "1.0.0", "2026-11-21T11:00:00Z", {"debian-12/amd64": [(entry, stanza)]})
    with pytest.raises(AptRepoError, match="curl_7.88_amd64.deb is not listed with SHA256"):
        site_apt.union_index(str(site.root), site_apt.package_sets(str(site.root)))


def test_stanzas_need_their_fields_and_plain_file_names() -> None:
    with pytest.raises(AptRepoError, match="no SHA256 field"):
        site_apt.parse_stanzas(b"Package: a\nFilename: ./a.deb\n", "idx")
    stanza = site_apt.parse_stanzas(b"Package: a\nFilename: ../etc/a.deb\nSHA256: 00\n", "idx")[0]
    with pytest.raises(AptRepoError, match="not a plain .deb file name"):
        site_apt._plain_filename(stanza, "idx")


def test_damaged_index_blob_is_named(site: FakeSite) -> None:
    pset = site_apt.package_sets(str(site.root))[0]
    path = site.root / "blobs" / "sha256" / pset.index_digest.split(":")[1]
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(AptRepoError, match="does not match its digest"):
        site_apt.union_index(str(site.root), [pset])


# -- dates ------------------------------------------------------------------------------------------------


def test_release_date_moves_only_with_new_indexes(site: FakeSite) -> None:
    sets = site_apt.package_sets(str(site.root))
    assert site_apt.content_date(sets) == "2026-11-21T10:00:00Z"
    again = [site_apt.PackageSet(**{**s.__dict__, "release": "shop 1.1.0", "imported_at": "2026-11-22T00:00:00Z"})
             for s in sets]
    assert site_apt.content_date(sets + again) == "2026-11-21T10:00:00Z"
    assert site_apt.rfc2822("2026-11-21T10:00:00Z") == "Sat, 21 Nov 2026 10:00:00 GMT"
    with pytest.raises(AptRepoError):
        site_apt.rfc2822("yesterday")


# -- the signed repository ----------------------------------------------------------------------------------


@needs_gpg
def test_publish_makes_a_signed_flat_repository(site: FakeSite, gpg_home: Path) -> None:
    res = publish(site, gpg_home)
    repo = site.root / "www" / "apt" / "debian-12"
    assert res.changed and res.signed and res.packages == 4 and res.arches == ["amd64", "arm64"]
    packages = (repo / "Packages").read_bytes()
    assert gzip.decompress((repo / "Packages.gz").read_bytes()) == packages
    release = (repo / "Release").read_text()
    assert "Architectures: all amd64 arm64\n" in release and "Date: Sat, 21 Nov 2026 10:00:00 GMT\n" in release
    for name in ("Packages", "Packages.gz"):
        data = (repo / name).read_bytes()
        assert f" {hashlib.sha256(data).hexdigest()} {len(data)} {name}\n" in release
    for stanza in site_apt.parse_stanzas(packages, "Packages"):  # every file apt may ask for is there, intact
        f = repo / stanza["Filename"][2:]
        assert hashlib.sha256(f.read_bytes()).hexdigest() == stanza["SHA256"]
    keyring = site.root / "www" / "keys" / "site.gpg"
    out = subprocess.run(["gpgv", "--keyring", str(keyring), "--output", "-", str(repo / "InRelease")],
                         capture_output=True, check=True).stdout
    assert out == (repo / "Release").read_bytes()
    subprocess.run(["gpgv", "--keyring", str(keyring), str(repo / "Release.gpg"), str(repo / "Release")],
                   capture_output=True, check=True)
    assert oct(gpg_home.stat().st_mode & 0o777) == "0o700"
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in (gpg_home / "private-keys-v1.d").iterdir())


@needs_gpg
def test_second_publish_changes_nothing_and_does_not_resign(site: FakeSite, gpg_home: Path) -> None:
    publish(site, gpg_home)
    before = tree(site.root / "www")
    again = publish(site, gpg_home)
    assert not again.changed and not again.signed
    assert tree(site.root / "www") == before


@needs_gpg
def test_check_mode_reports_and_writes_nothing(site: FakeSite, gpg_home: Path) -> None:
    res = publish(site, gpg_home, check_mode=True)
    assert res.changed and res.signed and not (site.root / "www").exists() and not gpg_home.exists()
    publish(site, gpg_home)
    site.release("shop", "1.1.0", "2026-11-21T11:00:00Z", {"debian-12/amd64": [site.deb("curl", "7.88", "amd64")]})
    before = tree(site.root / "www")
    res = publish(site, gpg_home, check_mode=True)
    assert res.files_changed == ["curl_7.88_amd64.deb"] and res.index_changed and res.signed
    assert tree(site.root / "www") == before


@needs_gpg
def test_new_release_adds_links_and_resigns_a_tampered_repository(site: FakeSite, gpg_home: Path) -> None:
    publish(site, gpg_home)
    repo = site.root / "www" / "apt" / "debian-12"
    (repo / "InRelease").write_text((repo / "InRelease").read_text().replace("Packages.gz", "Packages.xz"))
    res = publish(site, gpg_home)
    assert res.signed and not res.index_changed
    site.release("shop", "1.1.0", "2026-11-21T11:00:00Z", {"debian-12/amd64": [site.deb("curl", "7.88", "amd64")]})
    res = publish(site, gpg_home)
    assert res.files_changed == ["curl_7.88_amd64.deb"] and res.signed
    assert "Date: Sat, 21 Nov 2026 11:00:00 GMT" in (repo / "Release").read_text()
    (repo / "stale_1_amd64.deb").write_bytes(b"x")
    assert publish(site, gpg_home).files_changed == ["stale_1_amd64.deb"]
    assert not (repo / "stale_1_amd64.deb").exists()


@needs_gpg
def test_key_is_made_once_and_pinned(gpg_home: Path) -> None:
    assert site_apt.signing_key(str(gpg_home)) is None
    fpr = site_apt.create_key(str(gpg_home), "test site key")
    assert site_apt.signing_key(str(gpg_home)) == fpr
    assert (gpg_home / site_apt.KEY_FPR_FILE).read_text().strip() == fpr
    assert b"BEGIN PGP PUBLIC KEY BLOCK" in site_apt.export_public(str(gpg_home), fpr, armor=True)
    (gpg_home / site_apt.KEY_FPR_FILE).write_text("0" * 40 + "\n")
    with pytest.raises(AptRepoError, match="is not a secret key"):
        site_apt.signing_key(str(gpg_home))
