# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The site's apt repository, made on the repo host from the OS package blobs of imported releases.

Standard library only (plus the ``gpg``/``gpgv`` commands for signing). Two jobs:

* :func:`stage_bootstrap_source` - before the repo host has any tool of its own, a throwaway flat apt source
  of one release's verified package blobs for the host's distro/arch, from which it installs nginx, gpg and
  the registry. It is trusted because every blob was checked against the vendor-signed manifest on import.
* :func:`publish_distro` - the site's flat apt repository ``www/apt/<distro>/``: hard links to the blobs,
  ``Packages``/``Packages.gz`` = the union of the apt index blobs of every imported release, and a ``Release``
  signed with the site's own key (``InRelease``, ``Release.gpg``). Everything is derived from the catalog, so
  a second run with the same catalog writes nothing and signs nothing.
"""

from __future__ import annotations

import calendar
import email.utils
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from ..bundle.format import MAX_MANIFEST_SIZE
from ..common.files import file_bytes, link_or_copy, remove, write_if_changed
from .repo import RepoError, SiteRepo

GPG_TIMEOUT = 120
KEY_FPR_FILE = "site-key.fpr"
_FIELD = re.compile(r"^([A-Za-z0-9-]+):\s*(.*)\Z")


class AptRepoError(ValueError):
    """The apt repository cannot be made; the message names the release, file or blob and what to do."""


# -- the catalog's package sets --------------------------------------------------------------------------


@dataclass
class PackageSet:
    """One release's packages for one distro/arch (the manifest's ``packages["<distro>/<arch>"]``)."""
    release: str  # "name version", for messages
    imported_at: str
    distro: str
    arch: str
    profiles: list[str]
    index_digest: str
    entries: list[dict[str, Any]] = field(default_factory=list)


def package_sets(repo_root: str) -> list[PackageSet]:
    """Every package set of every release in the catalog, oldest import first."""
    repo = SiteRepo(repo_root)
    sets: list[PackageSet] = []
    try:
        for rel in repo.releases():
            sets += _package_sets(rel, repo.manifest_of(rel))
    except RepoError as exc:
        raise AptRepoError(str(exc)) from None
    return sets


def _package_sets(rel: dict[str, Any], manifest: dict[str, Any]) -> list[PackageSet]:
    return [PackageSet(release=f"{rel['name']} {rel['version']}", imported_at=rel["importedAt"], distro=pset["distro"],
                       arch=pset["arch"], profiles=list(pset["profiles"]), index_digest=pset["index"],
                       entries=list(pset["packages"]))
            for _key, pset in sorted(manifest.get("packages", {}).items())]


def select_package_set(sets: list[PackageSet], distro: str, arch: str, profiles: list[str]) -> PackageSet:
    """The newest imported release carrying packages for distro/arch with all of ``profiles``."""
    fitting = [s for s in sets if s.distro == distro and s.arch == arch and set(profiles) <= set(s.profiles)]
    if fitting:
        return fitting[-1]
    have = sorted({f"{s.distro}/{s.arch} ({', '.join(s.profiles)}) in {s.release}" for s in sets})
    raise AptRepoError(
        f"no imported release carries OS packages for {distro}/{arch} with the profiles {', '.join(profiles)} "
        f"(imported: {'; '.join(have) if have else 'no package sets at all'}). Import a bundle built with "
        f"--packages {distro} for this architecture (and --package-profiles including "
        f"{', '.join(profiles)}, or the default: all profiles)")


# -- apt index stanzas -----------------------------------------------------------------------------------


def parse_stanzas(data: bytes, where: str) -> list[dict[str, str]]:
    """Split an apt ``Packages`` text into stanzas; each keeps its raw ``_text`` for re-emitting."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AptRepoError(f"{where}: not UTF-8 ({exc})") from None
    stanzas = []
    for raw in re.split(r"\n[ \t]*\n", text.strip("\n")):
        if not raw.strip():
            continue
        fields: dict[str, str] = {"_text": raw.rstrip("\n")}
        for line in raw.splitlines():
            m = _FIELD.match(line)
            if m:
                fields[m.group(1)] = m.group(2).strip()
        for need in ("Package", "Filename", "SHA256"):
            if need not in fields:
                raise AptRepoError(f"{where}: a stanza has no {need} field: {raw[:120]!r}")
        stanzas.append(fields)
    return stanzas


def _plain_filename(stanza: dict[str, str], where: str) -> str:
    name = stanza["Filename"]
    name = name[2:] if name.startswith("./") else name
    if "/" in name or not name.endswith(".deb") or name.startswith("."):
        raise AptRepoError(f"{where}: Filename {stanza['Filename']!r} of {stanza['Package']} is not a plain "
                           ".deb file name")
    return name


@dataclass
class UnionIndex:
    """The union of the index blobs of several package sets, deduplicated by file name."""
    stanzas: dict[str, dict[str, str]] = field(default_factory=dict)  # filename -> stanza
    digests: dict[str, str] = field(default_factory=dict)  # filename -> blob digest
    origin: dict[str, str] = field(default_factory=dict)  # filename -> release that brought it first
    arches: set[str] = field(default_factory=set)

    def packages_bytes(self) -> bytes:
        return "".join(self.stanzas[f]["_text"] + "\n\n" for f in sorted(self.stanzas)).encode("utf-8")


def union_index(repo_root: str, sets: list[PackageSet]) -> UnionIndex:
    """Merge the index blobs of ``sets``; the same file name with other bytes is an error naming both
    releases (apt could not tell the two apart)."""
    union = UnionIndex()
    for pset in sets:
        where = f"apt index {pset.index_digest} of {pset.release} ({pset.distro}/{pset.arch})"
        by_name = {e["filename"]: e for e in pset.entries}
        data = _read_blob(repo_root, pset.index_digest, where)
        union.arches.add(pset.arch)
        for stanza in parse_stanzas(data, where):
            name = _plain_filename(stanza, where)
            entry = by_name.get(name)
            if entry is None or entry["digest"] != f"sha256:{stanza['SHA256']}":
                raise AptRepoError(f"{where}: {name} is not listed with SHA256 {stanza['SHA256']} in the "
                                   "release's manifest packages; the bundle is inconsistent - ask the vendor")
            known = union.digests.get(name)
            if known is None:
                union.stanzas[name], union.digests[name], union.origin[name] = stanza, entry["digest"], \
                    pset.release
            elif known != entry["digest"]:
                raise AptRepoError(f"{name} differs between {union.origin[name]} ({known}) and {pset.release} "
                                   f"({entry['digest']}): two different files with one name cannot be in one "
                                   "apt repository; the vendor must rebuild one of them")
    return union


def _read_blob(repo_root: str, digest: str, where: str) -> bytes:
    try:
        return SiteRepo(repo_root).read_blob(digest, limit=MAX_MANIFEST_SIZE, where=where)
    except RepoError as exc:
        raise AptRepoError(str(exc)) from None


# -- files -----------------------------------------------------------------------------------------------


def _same_file(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def sync_links(repo_root: str, directory: str, files: dict[str, str], check_mode: bool) -> list[str]:
    """Make ``directory`` hold exactly ``files`` (name -> blob digest) as links to the blobs, besides the
    index files; returns the names added, replaced or removed."""
    changed = []
    repo = SiteRepo(repo_root)
    for name, digest in sorted(files.items()):
        src, dest = repo.blob_file(digest), os.path.join(directory, name)
        if not os.path.exists(src):
            raise AptRepoError(f"blob {digest} ({name}) is missing from {repo_root}; import its release again")
        if _same_file(src, dest):
            continue
        changed.append(name)
        if not check_mode:
            link_or_copy(src, dest)
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            if name.endswith(".deb") and name not in files:
                changed.append(name)
                if not check_mode:
                    os.unlink(os.path.join(directory, name))
    return changed


def gzip_bytes(data: bytes) -> bytes:
    """gzip with no name and no time stamp: the same Packages gives the same Packages.gz."""
    return gzip.compress(data, compresslevel=9, mtime=0)


def release_bytes(distro: str, arches: set[str], files: dict[str, bytes], date: str) -> bytes:
    """The ``Release`` text of a flat repository; ``date`` is an RFC 2822 date that only moves when the
    content does (the newest import that fed it), so an unchanged repository is not re-signed."""
    lines = [
        "Origin: offline-delivery",
        f"Label: offline-delivery site repository {distro}",
        f"Architectures: {' '.join(sorted(arches | {'all'}))}",
        f"Date: {date}",
        "SHA256:",
    ]
    lines += [f" {hashlib.sha256(data).hexdigest()} {len(data)} {name}" for name, data in sorted(files.items())]
    return ("\n".join(lines) + "\n").encode("utf-8")


def content_date(sets: list[PackageSet]) -> str:
    """When the repository's content last changed: the newest first import of any index blob. A release that
    brings the same package indexes again (a delta of the app only) leaves Date, Release and signatures as
    they are."""
    first_seen: dict[str, str] = {}
    for pset in sorted(sets, key=lambda s: s.imported_at):
        first_seen.setdefault(pset.index_digest, pset.imported_at)
    return max(first_seen.values())


def rfc2822(iso_utc: str) -> str:
    """``2026-11-21T23:00:00Z`` -> ``Sat, 21 Nov 2026 23:00:00 GMT``."""
    try:
        stamp = calendar.timegm(time.strptime(iso_utc, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        raise AptRepoError(f"catalog date {iso_utc!r} is not YYYY-MM-DDTHH:MM:SSZ") from None
    return email.utils.formatdate(stamp, usegmt=True)


# -- gpg -------------------------------------------------------------------------------------------------


def _gpg(home: str, args: list[str], *, what: str, gpg: str = "gpg",
         input_bytes: bytes | None = None) -> bytes:
    cmd = [gpg, "--homedir", home, "--batch", "--no-tty", *args] if gpg == "gpg" else [gpg, *args]
    try:
        proc = subprocess.run(cmd, input=input_bytes, capture_output=True, timeout=GPG_TIMEOUT, check=False)
    except FileNotFoundError:
        raise AptRepoError(f"{gpg} is not installed on this host: the offline_repo role installs it from "
                           "the imported release's packages first (profile 'repo')") from None
    except subprocess.TimeoutExpired:
        raise AptRepoError(f"{what}: {gpg} did not finish within {GPG_TIMEOUT}s") from None
    if proc.returncode != 0:
        raise AptRepoError(f"{what} failed (rc {proc.returncode}): "
                           f"{proc.stderr.decode('utf-8', 'replace').strip()[-600:]}")
    return proc.stdout


def secret_fingerprints(home: str) -> list[str]:
    if not os.path.isdir(home):
        return []
    out = _gpg(home, ["--with-colons", "--list-secret-keys"], what=f"list the secret keys in {home}")
    fprs, in_sec = [], False
    for line in out.decode("utf-8", "replace").splitlines():
        parts = line.split(":")
        if parts[0] == "sec":
            in_sec = True
        elif parts[0] == "fpr" and in_sec:
            fprs.append(parts[9])
            in_sec = False
        elif parts[0] in ("ssb", "uid"):
            in_sec = False
    return fprs


def signing_key(home: str) -> str | None:
    """The fingerprint of the site key in ``home`` (pinned in ``site-key.fpr``), None when there is none."""
    pinned = file_bytes(os.path.join(home, KEY_FPR_FILE))
    fprs = secret_fingerprints(home)
    if pinned is not None:
        fpr = pinned.decode("ascii", "replace").strip()
        if fpr not in fprs:
            raise AptRepoError(f"{home}/{KEY_FPR_FILE} names key {fpr}, which is not a secret key in {home}; "
                               "restore the key, or move the directory away to make a new site key (clients "
                               "must then fetch the new public key)")
        return fpr
    if len(fprs) > 1:
        raise AptRepoError(f"{home} holds several secret keys ({', '.join(fprs)}) and no {KEY_FPR_FILE}: write "
                           "the fingerprint of the site key into it")
    return fprs[0] if fprs else None


def create_key(home: str, uid: str) -> str:
    """A new ed25519 signing key without passphrase (the repo host signs unattended); the private part
    stays in ``home`` (0700, gpg writes the key files 0600)."""
    os.makedirs(home, mode=0o700, exist_ok=True)
    os.chmod(home, 0o700)
    _gpg(home, ["--pinentry-mode", "loopback", "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign",
                "never"], what=f"create the site apt key in {home}")
    fprs = secret_fingerprints(home)
    if len(fprs) != 1:
        raise AptRepoError(f"expected one secret key in {home} after creating it, found {len(fprs)}")
    write_if_changed(os.path.join(home, KEY_FPR_FILE), (fprs[0] + "\n").encode("ascii"), mode=0o600)
    return fprs[0]


def export_public(home: str, fpr: str, *, armor: bool) -> bytes:
    return _gpg(home, ["--export-options", "export-minimal", *(["--armor"] if armor else []), "--export", fpr],
                what=f"export the public site key {fpr}")


def stop_agent(home: str) -> None:
    """gpg starts an agent per home directory; do not leave it running after the module."""
    if os.path.isdir(home) and shutil.which("gpgconf"):
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], capture_output=True,
                       timeout=GPG_TIMEOUT, check=False)


def signatures_valid(keyring: str, directory: str, release: bytes) -> bool:
    """True when InRelease carries exactly ``release`` and both signatures verify with ``keyring``."""
    inrelease, detached = os.path.join(directory, "InRelease"), os.path.join(directory, "Release.gpg")
    if not (os.path.exists(inrelease) and os.path.exists(detached) and os.path.exists(keyring)):
        return False
    try:
        signed = _gpg("", ["--keyring", keyring, "--output", "-", inrelease], gpg="gpgv",
                      what=f"check {inrelease}")
        _gpg("", ["--keyring", keyring, detached, os.path.join(directory, "Release")], gpg="gpgv",
             what=f"check {detached}")
    except AptRepoError:
        return False
    return signed == release


def sign_release(home: str, fpr: str, directory: str) -> None:
    release = os.path.join(directory, "Release")
    for out, mode in (("InRelease", "--clearsign"), ("Release.gpg", "--detach-sign")):
        tmp = os.path.join(directory, f".{out}.tmp")
        remove(tmp)
        _gpg(home, ["--pinentry-mode", "loopback", "--passphrase", "", "--local-user", fpr, "--digest-algo",
                    "SHA512", "--armor", "--yes", "--output", tmp, mode, release],
             what=f"sign {release} ({out})")
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(directory, out))


# -- publishing ------------------------------------------------------------------------------------------


@dataclass
class DistroResult:
    distro: str
    packages: int
    arches: list[str]
    releases: list[str]
    files_changed: list[str]
    index_changed: bool
    signed: bool

    @property
    def changed(self) -> bool:
        return bool(self.files_changed) or self.index_changed or self.signed

    def as_dict(self) -> dict[str, Any]:
        return {"distro": self.distro, "packages": self.packages, "arches": self.arches,
                "releases": self.releases, "files_changed": len(self.files_changed),
                "index_changed": self.index_changed, "signed": self.signed, "changed": self.changed}


def publish_distro(repo_root: str, www_dir: str, distro: str, sets: list[PackageSet], *, home: str, fpr: str | None,
                   keyring: str, check_mode: bool) -> DistroResult:
    """Make ``www/apt/<distro>/`` the signed flat repository of every package set of ``distro``.
    ``fpr`` None (check mode before the key exists) means: it would be signed."""
    mine = [s for s in sets if s.distro == distro]
    union = union_index(repo_root, mine)
    directory = os.path.join(www_dir, "apt", distro)
    if not check_mode:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    files_changed = sync_links(repo_root, directory, union.digests, check_mode)
    packages = union.packages_bytes()
    index = {"Packages": packages, "Packages.gz": gzip_bytes(packages)}
    release = release_bytes(distro, union.arches, index, rfc2822(content_date(mine)))
    index_changed = False
    for name, data in (*index.items(), ("Release", release)):
        index_changed |= write_if_changed(os.path.join(directory, name), data, check_mode=check_mode)
    must_sign = fpr is None or index_changed or not signatures_valid(keyring, directory, release)
    if must_sign and not check_mode:
        sign_release(home, fpr, directory)  # type: ignore[arg-type]  # fpr is set outside check mode
    return DistroResult(distro=distro, packages=len(union.stanzas), arches=sorted(union.arches),
                        releases=sorted({s.release for s in mine}), files_changed=files_changed,
                        index_changed=index_changed, signed=must_sign)


# -- the repo host's own tools ---------------------------------------------------------------------------


def stage_bootstrap_source(repo_root: str, pset: PackageSet, dest: str, *, check_mode: bool) -> bool:
    """A flat apt source in ``dest`` of ``pset``'s verified blobs (links named by file name, ``Packages`` =
    its index blob); returns whether anything was (or would be) written."""
    index = _read_blob(repo_root, pset.index_digest, f"apt index of {pset.release} ({pset.distro}/{pset.arch})")
    if not check_mode:
        os.makedirs(dest, mode=0o755, exist_ok=True)
    files = {e["filename"]: e["digest"] for e in pset.entries}
    changed = bool(sync_links(repo_root, dest, files, check_mode))
    changed |= write_if_changed(os.path.join(dest, "Packages"), index, check_mode=check_mode)
    return changed
