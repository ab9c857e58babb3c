"""The distro family table: which OS releases a bundle can carry packages for, and what each host kind needs.

This is the seam between the product and the operating systems of a site. A key such as ``debian-12`` names
one release; its entry says which family and package format it belongs to, which suite of the archive it is,
which architectures exist, and per *profile* (a kind of site host) which packages to install. The closure of
those packages is resolved by :mod:`bundle_builder.packages`.

Only the ``deb`` format of the ``debian`` family is implemented. Ubuntu and the RPM family are listed with
``supported=False`` and the reason, so a build that asks for them fails with that reason instead of a guess.

The archive mirror is never hard-coded: it is read from the build machine's own apt sources (the entry whose
suite is a Debian release) or from ``OD_DEBIAN_MIRROR`` / ``OD_DEBIAN_SECURITY_MIRROR``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from offline_delivery_core.common.arch import debian_arch

DEB_MEDIA_TYPE = "application/vnd.debian.binary-package"

DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# Debian release codenames we recognise in the build machine's apt sources (suites, not "stable" aliases).
_DEBIAN_CODENAMES = ("bullseye", "bookworm", "trixie", "forky", "sid")


class DistroError(ValueError):
    """A distro, profile or architecture that cannot be served; the message says which and what to do."""


@dataclass(frozen=True)
class PackageRef:
    """One package a profile installs; ``suite`` takes it from another suite of the same archive (a backport)."""

    name: str
    suite: str | None = None

    def apt_arg(self) -> str:
        """The argument for ``apt-get install``: ``name`` or ``name/suite``."""
        return f"{self.name}/{self.suite}" if self.suite else self.name


@dataclass(frozen=True)
class Distro:
    """One row of the distro family table."""

    key: str
    family: str
    release: str
    suite: str
    package_format: str
    supported: bool
    reason: str = ""
    arches: tuple[str, ...] = ("amd64", "arm64")
    # Suites of the archive besides ``suite`` whose newer packages a target should get (point updates).
    update_suites: tuple[str, ...] = ()
    # Security suite, served from the security mirror.
    security_suite: str | None = None
    profiles: Mapping[str, tuple[PackageRef, ...]] = field(default_factory=dict)

    @property
    def borrowed_suites(self) -> tuple[str, ...]:
        """Other releases' suites some profile takes a package from (added to apt with a low pin)."""
        return tuple(sorted({p.suite for refs in self.profiles.values() for p in refs if p.suite}))

    def packages(self, profile: str) -> tuple[PackageRef, ...]:
        """The packages of one profile; raises naming the distro and the known profiles."""
        try:
            return self.profiles[profile]
        except KeyError:
            known = ", ".join(sorted(self.profiles)) or "none"
            raise DistroError(
                f"{self.key}: unknown package profile {profile!r}; known profiles: {known}"
            ) from None


def _refs(*names: str, suite: str | None = None) -> tuple[PackageRef, ...]:
    return tuple(PackageRef(n, suite) for n in names)


# What each kind of site host needs on top of a minimal install (see docs/packages.md for the why of each).
#  base    - every host: Python for Ansible, python3-apt for ansible.builtin.apt, the CA store for the site CA.
#  compose - Docker engine (docker.io brings containerd, runc, tini, iptables) and Compose v2.
#  repo    - the site's registry (Distribution), nginx as static file server for the apt repo and the file
#            tree (bookworm's nginx-light is only a transitional package to it), gpg + apt-ftparchive
#            (apt-utils) to build and sign the apt repository's Release file on site, and python3-cryptography
#            for the site key's Ed25519 signatures (have-list, status report).
#  systemd - unpacking image root filesystems: tar and gzip are essential already; zstd and xz for layers
#            compressed that way (OCI layouts may carry them).
_BASE = _refs("python3", "python3-apt", "ca-certificates")
_REPO = _refs("docker-registry", "nginx", "gpg", "gpg-agent", "apt-utils", "python3-cryptography")
_SYSTEMD = _refs("tar", "gzip", "zstd", "xz-utils")

_TABLE: tuple[Distro, ...] = (
    Distro(
        key="debian-12",
        family="debian",
        release="12",
        suite="bookworm",
        package_format="deb",
        supported=True,
        update_suites=("bookworm-updates",),
        security_suite="bookworm-security",
        profiles={
            "base": _BASE,
            # Compose v2 from Debian 13: bookworm only has Compose v1 (1.29, Python, end of life); trixie's
            # docker-compose is one static Go binary depending on libc6 (>= 2.34) only (bookworm has 2.36).
            "compose": _refs("docker.io", "containerd", "runc") + _refs("docker-compose", suite="trixie"),
            "repo": _REPO,
            "systemd": _SYSTEMD,
        },
    ),
    Distro(
        key="debian-13",
        family="debian",
        release="13",
        suite="trixie",
        package_format="deb",
        supported=True,
        update_suites=("trixie-updates",),
        security_suite="trixie-security",
        profiles={
            "base": _BASE,
            # trixie split the docker CLI out of docker.io (only a Recommends there): name it.
            "compose": _refs("docker.io", "docker-cli", "containerd", "runc", "docker-compose"),
            "repo": _REPO,
            "systemd": _SYSTEMD,
        },
    ),
    Distro(
        key="ubuntu-22.04",
        family="ubuntu",
        release="22.04",
        suite="jammy",
        package_format="deb",
        supported=False,
        reason="Ubuntu's archive is not reachable from the build machines here, so no closure can be "
        "resolved or tested; the deb code path would serve it once a mirror is (add its table row).",
    ),
    Distro(
        key="ubuntu-24.04",
        family="ubuntu",
        release="24.04",
        suite="noble",
        package_format="deb",
        supported=False,
        reason="Ubuntu's archive is not reachable from the build machines here, so no closure can be "
        "resolved or tested; the deb code path would serve it once a mirror is (add its table row).",
    ),
    Distro(
        key="rhel-9",
        family="rhel",
        release="9",
        suite="el9",
        package_format="rpm",
        supported=False,
        reason="RPM-family repositories are not reachable from the build machines here and rpm closure "
        "resolution (dnf --downloadonly --installroot) is not implemented.",
    ),
    Distro(
        key="rocky-9",
        family="rhel",
        release="9",
        suite="el9",
        package_format="rpm",
        supported=False,
        reason="RPM-family repositories are not reachable from the build machines here and rpm closure "
        "resolution (dnf --downloadonly --installroot) is not implemented.",
    ),
)

DISTROS: dict[str, Distro] = {d.key: d for d in _TABLE}


def get_distro(key: str, *, require_supported: bool = True) -> Distro:
    """The table row for ``key``; refuses unknown keys and (by default) unsupported ones, saying why."""
    distro = DISTROS.get(key)
    if distro is None:
        raise DistroError(
            f"unknown distro {key!r}; known: {', '.join(sorted(DISTROS))} (see docs/packages.md)"
        )
    if require_supported and not distro.supported:
        raise DistroError(f"distro {key!r} ({distro.family}, {distro.package_format}) is not supported: "
                          f"{distro.reason}")
    return distro


def normalize_arch(arch: str) -> str:
    """Debian architecture name for ``arch``: accepts ``amd64``, ``x86_64``, ``aarch64``, ``linux/arm64``."""
    name = debian_arch(arch)
    if name is None:
        raise DistroError(
            f"unknown architecture {arch!r}; use one of amd64, arm64 (aliases: x86_64, aarch64, linux/amd64, "
            "linux/arm64)"
        )
    return name


def check_arch(distro: Distro, arch: str) -> str:
    """Normalised ``arch`` if ``distro`` has it, else an error naming both."""
    name = normalize_arch(arch)
    if name not in distro.arches:
        raise DistroError(f"{distro.key} has no architecture {name!r} here; available: {', '.join(distro.arches)}")
    return name


# ---------------------------------------------------------------------------------------------------------
# Archive mirrors: from the environment, else from the build machine's apt sources.


@dataclass(frozen=True)
class DebianMirrors:
    """Where the Debian archive and its security archive are fetched from, and the key that signs them."""

    archive: str
    security: str | None
    keyring: Path = DEBIAN_KEYRING


def _deb822_entries(text: str) -> Iterable[dict[str, str]]:
    for block in re.split(r"\n\s*\n", text):
        entry: dict[str, str] = {}
        last = ""
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0].isspace() and last:  # continuation line (e.g. an inline key)
                entry[last] += "\n" + line.strip()
                continue
            key, _sep, value = line.partition(":")
            last = key.strip().lower()
            entry[last] = value.strip()
        if entry:
            yield entry


def _one_line_entries(text: str) -> Iterable[dict[str, str]]:
    """One-line ``deb [opts] URI suite comp...`` entries, as deb822-like dicts."""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        opts: dict[str, str] = {}
        match = re.match(r"deb\s+\[([^\]]*)\]\s+(.*)", line)
        rest = line[4:].strip()
        if match:
            for opt in match.group(1).split():
                k, _sep, v = opt.partition("=")
                opts[k.lower()] = v
            rest = match.group(2)
        parts = rest.split()
        if len(parts) < 2:
            continue
        entry = {"types": "deb", "uris": parts[0], "suites": parts[1], "components": " ".join(parts[2:])}
        if "signed-by" in opts:
            entry["signed-by"] = opts["signed-by"]
        yield entry


def _source_entries(apt_dir: Path) -> list[dict[str, str]]:
    entries: list[dict[str, str]] = []
    files = [apt_dir / "sources.list"] + sorted((apt_dir / "sources.list.d").glob("*"))
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            continue
        if path.suffix == ".sources":
            entries.extend(e for e in _deb822_entries(text) if "deb" in e.get("types", "").split())
        elif path.name == "sources.list" or path.suffix == ".list":
            entries.extend(_one_line_entries(text))
    return entries


def debian_mirrors(apt_dir: Path = Path("/etc/apt"), environ: Mapping[str, str] | None = None) -> DebianMirrors:
    """The Debian mirrors to use: ``OD_DEBIAN_MIRROR`` / ``OD_DEBIAN_SECURITY_MIRROR`` (and
    ``OD_DEBIAN_KEYRING``) if set, else the first entries of the build machine's apt sources whose suite is a
    Debian release (``bookworm``…) and its ``-security`` suite."""
    env = os.environ if environ is None else environ
    archive = env.get("OD_DEBIAN_MIRROR", "").strip() or None
    security = env.get("OD_DEBIAN_SECURITY_MIRROR", "").strip() or None
    keyring = Path(env["OD_DEBIAN_KEYRING"]) if env.get("OD_DEBIAN_KEYRING") else None
    for entry in _source_entries(apt_dir):
        suites = entry.get("suites", "").split()
        uri = entry.get("uris", "").split()[0] if entry.get("uris") else ""
        if not uri or "main" not in entry.get("components", "").split():
            continue
        signed_by = entry.get("signed-by", "")
        if any(s in _DEBIAN_CODENAMES for s in suites) and archive is None:
            archive = uri
            if keyring is None and signed_by.startswith("/"):
                keyring = Path(signed_by)
        if any(s.endswith("-security") and s.split("-")[0] in _DEBIAN_CODENAMES for s in suites) \
                and security is None:
            security = uri
    if archive is None:
        raise DistroError(
            f"no Debian archive mirror found: none of the apt sources under {apt_dir} has a Debian release "
            "suite (bookworm, trixie, ...) with component main; set OD_DEBIAN_MIRROR to the archive's URL"
        )
    return DebianMirrors(archive=archive.rstrip("/"), security=security.rstrip("/") if security else None,
                         keyring=keyring or DEBIAN_KEYRING)


def borrowed_codenames(distro: Distro, mirrors: DebianMirrors) -> list[str]:
    """Release codenames (as in their Release files) of the suites borrowed from: to pin them low."""
    names: list[str] = []
    for suite in distro.borrowed_suites:
        names.append(suite)
        if mirrors.security:
            names.append(f"{suite}-security")
    return names


def apt_source_lines(distro: Distro, mirrors: DebianMirrors, *, updates: bool = True,
                     borrowed: bool = True) -> list[str]:
    """One-line apt sources for ``distro``: its suite, and if ``updates`` its update and security suites,
    and if ``borrowed`` the suites some profile borrows a package from (with their security suites)."""
    if distro.family != "debian":
        raise DistroError(f"{distro.key}: apt sources are only known for the debian family")
    opt = f"[signed-by={mirrors.keyring}]"
    lines = [f"deb {opt} {mirrors.archive} {distro.suite} main"]
    if updates:
        lines += [f"deb {opt} {mirrors.archive} {s} main" for s in distro.update_suites]
        if distro.security_suite and mirrors.security:
            lines.append(f"deb {opt} {mirrors.security} {distro.security_suite} main")
    if borrowed:
        for suite in distro.borrowed_suites:
            lines.append(f"deb {opt} {mirrors.archive} {suite} main")
            if mirrors.security:
                lines.append(f"deb {opt} {mirrors.security} {suite}-security main")
    return lines
