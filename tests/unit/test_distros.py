"""The distro family table, arch names, mirror discovery, and the pure parts of package resolution."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bundle_builder import build, packages
from bundle_builder.distros import (
    DISTROS,
    DebianMirrors,
    DistroError,
    PackageRef,
    apt_source_lines,
    borrowed_codenames,
    check_arch,
    debian_mirrors,
    get_distro,
    normalize_arch,
)
from bundle_builder.images import Platform
from bundle_builder.packages import PackageError, PackageFile, package_index, resolve_packages

MIRRORS = DebianMirrors(archive="http://mirror.invalid/debian", security="http://mirror.invalid/debian-security",
                        keyring=Path("/usr/share/keyrings/debian-archive-keyring.gpg"))


# --- the table ----------------------------------------------------------------------------------------------

def test_debian_12_row() -> None:
    d = get_distro("debian-12")
    assert (d.family, d.suite, d.package_format, d.release) == ("debian", "bookworm", "deb", "12")
    assert d.arches == ("amd64", "arm64")
    assert d.security_suite == "bookworm-security"
    assert set(d.profiles) == {"base", "compose", "repo", "systemd"}


def test_debian_12_ships_compose_v2_from_trixie() -> None:
    compose = {r.name: r for r in get_distro("debian-12").packages("compose")}
    assert {"docker.io", "containerd", "runc", "docker-compose"} <= set(compose)
    assert compose["docker-compose"].suite == "trixie"
    assert compose["docker-compose"].apt_arg() == "docker-compose/trixie"
    assert compose["docker.io"].apt_arg() == "docker.io"
    assert get_distro("debian-12").borrowed_suites == ("trixie",)


def test_debian_13_is_a_second_supported_release() -> None:
    d = get_distro("debian-13")
    assert (d.family, d.suite, d.supported) == ("debian", "trixie", True)
    names = {r.name for r in d.packages("compose")}
    assert {"docker.io", "docker-cli", "containerd", "runc", "docker-compose"} <= names
    assert d.borrowed_suites == ()


def test_profiles_name_the_needed_services() -> None:
    for key in sorted(k for k, d in DISTROS.items() if d.supported):
        d = get_distro(key)
        repo = {r.name for r in d.packages("repo")}
        assert {"docker-registry", "gpg", "apt-utils"} <= repo, key
        assert {"python3", "python3-apt"} <= {r.name for r in d.packages("base")}, key
        assert "zstd" in {r.name for r in d.packages("systemd")}, key


def test_supported_list_is_only_debian_deb() -> None:
    assert sorted(k for k, d in DISTROS.items() if d.supported) == ["debian-12", "debian-13"]
    for key, d in DISTROS.items():
        if not d.supported:
            assert d.reason, f"{key} must say why it is not supported"


@pytest.mark.parametrize("key,family,fmt", [("ubuntu-22.04", "ubuntu", "deb"), ("ubuntu-24.04", "ubuntu", "deb"),
                                            ("rhel-9", "rhel", "rpm"), ("rocky-9", "rhel", "rpm")])
def test_unsupported_rows_are_visible_and_refused_with_reason(key: str, family: str, fmt: str) -> None:
    row = get_distro(key, require_supported=False)
    assert (row.family, row.package_format, row.supported) == (family, fmt, False)
    with pytest.raises(DistroError, match="not supported") as err:
        get_distro(key)
    assert row.reason in str(err.value)
    assert "not reachable" in str(err.value)


def test_unknown_distro_lists_known_ones() -> None:
    with pytest.raises(DistroError, match="unknown distro 'debian-99'.*debian-12"):
        get_distro("debian-99")


def test_unknown_profile_names_distro_and_known_profiles() -> None:
    with pytest.raises(DistroError, match=r"debian-12: unknown package profile 'k8s'.*base, compose, repo, systemd"):
        get_distro("debian-12").packages("k8s")


# --- arch names ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given,expected", [
    ("amd64", "amd64"), ("x86_64", "amd64"), ("X86_64", "amd64"), ("linux/amd64", "amd64"),
    ("arm64", "arm64"), ("aarch64", "arm64"), ("linux/arm64", "arm64"), ("linux/arm64/v8", "arm64"),
])
def test_arch_aliases(given: str, expected: str) -> None:
    assert normalize_arch(given) == expected


@pytest.mark.parametrize("bad", ["armhf", "riscv64", "i386", "", "linux/s390x"])
def test_unknown_arch_refused(bad: str) -> None:
    with pytest.raises(DistroError, match="unknown architecture"):
        normalize_arch(bad)


def test_check_arch_against_row() -> None:
    assert check_arch(get_distro("debian-12"), "aarch64") == "arm64"


# --- mirrors ------------------------------------------------------------------------------------------------

def _apt_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_mirrors_from_deb822_sources(tmp_path: Path) -> None:
    apt = _apt_dir(tmp_path, {
        "sources.list.d/debian.sources": (
            "Types: deb\n# a comment\nURIs: http://archive.example/debian/\nSuites: bookworm bookworm-updates\n"
            "Components: main\nSigned-By: /keys/debian.gpg\n\n"
            "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n"
            "Components: main\nSigned-By: /keys/debian.gpg\n"),
        "sources.list.d/other.sources": (
            "Types: deb\nURIs: https://vendor.example/apt\nSuites: nodistro\nComponents: main\n"),
        "sources.list": "deb https://cloud.example/apt cloud-sdk-bookworm main\n",
    })
    m = debian_mirrors(apt, environ={})
    assert m == DebianMirrors("http://archive.example/debian", "http://security.example/debian-security",
                              Path("/keys/debian.gpg"))


def test_mirrors_from_one_line_sources(tmp_path: Path) -> None:
    apt = _apt_dir(tmp_path, {"sources.list": (
        "# deb http://old.example/debian buster main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian trixie main contrib\n"
        "deb http://one.example/debian-security trixie-security main\n")})
    m = debian_mirrors(apt, environ={})
    assert (m.archive, m.security, m.keyring) == ("http://one.example/debian",
                                                  "http://one.example/debian-security", Path("/k.gpg"))


def test_mirrors_from_environment_win(tmp_path: Path) -> None:
    apt = _apt_dir(tmp_path, {"sources.list": "deb http://one.example/debian bookworm main\n"})
    m = debian_mirrors(apt, environ={"OD_DEBIAN_MIRROR": "http://env.example/debian/",
                                     "OD_DEBIAN_SECURITY_MIRROR": "http://env.example/sec"})
    assert (m.archive, m.security) == ("http://env.example/debian", "http://env.example/sec")


def test_no_debian_source_is_a_clear_error(tmp_path: Path) -> None:
    apt = _apt_dir(tmp_path, {"sources.list": "deb https://vendor.example/apt nodistro main\n"})
    with pytest.raises(DistroError, match="OD_DEBIAN_MIRROR"):
        debian_mirrors(apt, environ={})


def test_build_machine_sources_give_a_mirror() -> None:
    if not Path("/etc/apt").is_dir():
        pytest.skip("no /etc/apt on this machine")
    m = debian_mirrors()
    assert m.archive.startswith(("http://", "https://", "file:"))


def test_source_lines_for_debian_12() -> None:
    lines = apt_source_lines(get_distro("debian-12"), MIRRORS)
    key = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
    assert lines == [
        f"deb {key} http://mirror.invalid/debian bookworm main",
        f"deb {key} http://mirror.invalid/debian bookworm-updates main",
        f"deb {key} http://mirror.invalid/debian-security bookworm-security main",
        f"deb {key} http://mirror.invalid/debian trixie main",
        f"deb {key} http://mirror.invalid/debian-security trixie-security main",
    ]
    # The minimal root filesystem is made from the release's point-release suite only.
    assert apt_source_lines(get_distro("debian-12"), MIRRORS, updates=False, borrowed=False) == [
        f"deb {key} http://mirror.invalid/debian bookworm main"]
    assert not any("trixie" in line for line in apt_source_lines(get_distro("debian-12"), MIRRORS, borrowed=False))
    assert borrowed_codenames(get_distro("debian-12"), MIRRORS) == ["trixie", "trixie-security"]


def test_source_lines_refused_for_other_families() -> None:
    with pytest.raises(DistroError, match="debian family"):
        apt_source_lines(get_distro("rhel-9", require_supported=False), MIRRORS)


# --- resolve_packages: refusals before any work, and the pure helpers ---------------------------------------

@pytest.mark.parametrize("distro,arch,profiles,match", [
    ("debian-99", "amd64", ["compose"], "unknown distro 'debian-99'"),
    ("ubuntu-24.04", "amd64", ["compose"], "not supported: Ubuntu's archive is not reachable"),
    ("rhel-9", "x86_64", ["compose"], "not supported: RPM-family"),
    ("debian-12", "armhf", ["compose"], "unknown architecture 'armhf'"),
    ("debian-12", "amd64", ["k8s"], "debian-12: unknown package profile 'k8s'"),
    ("debian-12", "amd64", [], "no package profile"),
])
def test_resolve_refuses_early(tmp_path: Path, distro: str, arch: str, profiles: list[str], match: str) -> None:
    with pytest.raises(DistroError, match=match):
        resolve_packages(distro, arch, profiles, cache_dir=tmp_path, mirrors=MIRRORS)
    assert list(tmp_path.iterdir()) == [], "nothing may be built for a refused request"


def test_split_filename_decodes_epoch() -> None:
    assert packages._split_filename("libbpf1_1%3a1.1.2-0+deb12u1_amd64.deb") == ("libbpf1", "1:1.1.2-0+deb12u1",
                                                                                 "amd64")
    with pytest.raises(PackageError, match="name_version_arch"):
        packages._split_filename("weird.deb")


def test_uri_lines_with_and_without_hash() -> None:
    main = packages._URI_LINE.match("'http://m/debian/pool/main/t/tini/tini_0.19.0-1+b3_amd64.deb' "
                                    "tini_0.19.0-1+b3_amd64.deb 255944 MD5Sum:0123abcd")
    assert main and (main["filename"], main["size"], main["hash"]) == ("tini_0.19.0-1+b3_amd64.deb", "255944",
                                                                       "MD5Sum:0123abcd")
    # The security archive's index carries no MD5: apt prints the line without a hash.
    line = ("'http://m/debian-security/pool/updates/main/o/openssl/libssl3_3.0.22_amd64.deb' "
            "libssl3_3.0.22_amd64.deb 2039888 ")
    sec = packages._URI_LINE.match(line.strip())  # the resolver strips each line first
    assert sec and (sec["filename"], sec["size"], sec["hash"]) == ("libssl3_3.0.22_amd64.deb", "2039888", None)


def test_apt_errors_name_the_package() -> None:
    exc = PackageError("debian-12/arm64: list closure: apt-get exited 100:\nE: Unable to locate package nope\n"
                       "E: Release 'forky' for 'docker-compose' was not found")
    text = str(packages._explain_apt_error(exc, "debian-12/arm64", "compose", ["nope"]))
    assert "debian-12/arm64: profile 'compose'" in text
    assert "nope" in text and "docker-compose (in forky)" in text and "not available" in text


def _pf(name: str, arch: str, profiles: tuple[str, ...], target: str = "amd64") -> PackageFile:
    return PackageFile(path=Path(f"/c/{name}.deb"), package=name, version="1.0-1", architecture=arch,
                       sha256=name[0] * 64, size=10, filename=f"{name}_1.0-1_{arch}.deb", distro="debian-12",
                       target_arch=target, profiles=profiles)


def test_package_file_blob_metadata() -> None:
    f = _pf("runc", "amd64", ("compose", "repo"))
    assert f.media_type == "application/vnd.debian.binary-package"
    assert f.digest == "sha256:" + "r" * 64
    assert f.used_by == ["packages:debian-12/amd64/compose", "packages:debian-12/amd64/repo"]


def test_package_index_is_grouped_sorted_and_stable() -> None:
    files = [_pf("tini", "amd64", ("compose",)), _pf("netbase", "all", ("compose",)),
             _pf("zstd", "arm64", ("systemd",), target="arm64"), _pf("apt-utils", "amd64", ("repo",))]
    index = package_index(files)
    assert list(index) == ["debian-12/amd64", "debian-12/arm64"]
    amd = index["debian-12/amd64"]
    assert amd["profiles"] == ["compose", "repo"]
    assert [p["package"] for p in amd["packages"]] == ["apt-utils", "netbase", "tini"]
    assert index == package_index(reversed(files))
    assert index["debian-12/arm64"]["packages"][0]["digest"] == "sha256:" + "z" * 64


def test_package_ref_plain() -> None:
    assert PackageRef("zstd").apt_arg() == "zstd"


def test_builder_plans_one_blob_per_file_with_used_by_merged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The builder's own path (build._plan_packages): a file in several closures is one blob whose usedBy is
    the union; each distro/arch also gets its apt index blob."""
    amd = _pf("netbase", "all", ("compose",))
    arm = dataclasses.replace(amd, target_arch="arm64", profiles=("base", "compose"))
    other = _pf("tini", "amd64", ("compose",))
    monkeypatch.setattr(packages, "resolve_all", lambda *a, **k: [other, amd, arm])
    monkeypatch.setattr(packages, "apt_index", lambda files: "".join(f.filename + "\n" for f in files).encode())
    plan = build._Plan()
    section = build._plan_packages(plan, ["debian-12"], ["base", "compose"],
                                   [Platform.parse("linux/amd64"), Platform.parse("linux/arm64")], "/c", None)
    debs = {d: p for d, p in plan.blobs.items() if p.blob.media_type == PackageFile.media_type}
    assert sorted(debs) == ["sha256:" + "n" * 64, "sha256:" + "t" * 64]
    netbase = debs["sha256:" + "n" * 64]
    assert netbase.used_by == {"packages:debian-12/amd64/compose", "packages:debian-12/arm64/base",
                               "packages:debian-12/arm64/compose"}
    assert netbase.blob.size == 10
    assert sorted(section) == ["debian-12/amd64", "debian-12/arm64"]
    for key, pset in section.items():
        assert plan.blobs[pset["index"]].used_by == {f"packages:{key}"}


def test_removals_are_found_in_apt_output() -> None:
    out = ("Reading package lists...\nThe following packages will be REMOVED:\n  libfoo1* sysvinit-core\n"
           "The following NEW packages will be installed:\n  systemd-sysv\n"
           "1 upgraded, 1 newly installed, 2 to remove and 0 not upgraded.\n")
    assert packages._removed_packages(out) == ["libfoo1", "sysvinit-core"]
    assert packages._removed_packages("0 upgraded, 3 newly installed, 0 to remove and 4 not upgraded.\n") == []
    assert packages._removed_packages("0 upgraded, 0 newly installed, 1 to remove and 0 not upgraded.\n") == \
        ["1 package(s)"]
