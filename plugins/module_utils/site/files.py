# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The site's file tree: binaries carried in bundles (manifest section ``files``), served over HTTP.

Standard library only: it runs in ``repo_files_publish`` on the repo host. Layout under ``www/files``::

    <name>/<version>/<arch>/<name>      a hard link to blobs/sha256/<hex> (a copy only across file systems)
    index.json                          every file: name, version, arch, digest, size, mode, url, releases,
                                        importedAt (the newest import of a release carrying it)

Everything is derived from the catalog (every imported release), so the tree is the same whatever order the
releases came in. Nothing is written when nothing differs; links no release carries any more are removed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..bundle.format import FILE_NAME_RE, FILE_VERSION_RE
from ..common.digests import canonical_json, is_digest, sha256_file
from ..common.files import link_or_copy, write_if_changed
from .repo import RepoError, SiteRepo

INDEX_NAME = "index.json"
INDEX_SCHEMA = 1
_ARCH_RE = re.compile(r"^[a-z0-9_]+\Z")


class FilesError(ValueError):
    """The file tree cannot be made; the message names the release, file or blob and what to do."""


@dataclass
class SiteFile:
    """One carried file, as the site serves it (one entry per name/version/arch)."""
    name: str
    version: str
    arch: str
    digest: str
    size: int
    mode: str
    releases: list[str] = field(default_factory=list)  # "name version" of every release carrying it
    imported_at: str = ""  # import time of the newest release carrying it: clients pick the newest version

    @property
    def rel_path(self) -> str:
        """Path under www/files/; also the entry's URL relative to index.json."""
        return f"{self.name}/{self.version}/{self.arch}/{self.name}"

    def as_index(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "arch": self.arch, "digest": self.digest,
                "size": self.size, "mode": self.mode, "url": self.rel_path, "releases": sorted(self.releases),
                "importedAt": self.imported_at}


@dataclass
class FilesResult:
    files: list[SiteFile]
    links_changed: list[str]  # rel paths added, replaced or removed
    index_changed: bool
    index_path: str

    @property
    def changed(self) -> bool:
        return bool(self.links_changed) or self.index_changed

    def as_dict(self) -> dict[str, Any]:
        return {"files": [f.as_index() for f in self.files], "links_changed": self.links_changed,
                "index_changed": self.index_changed, "index": self.index_path}


def _checked(entry: Any, where: str) -> tuple[str, str, str, str, int, str]:
    """The fields of a manifest ``files`` entry, re-checked: they become paths on this host."""
    ok = isinstance(entry, dict) and isinstance(entry.get("name"), str) and bool(FILE_NAME_RE.match(entry["name"])) \
        and isinstance(entry.get("version"), str) and bool(FILE_VERSION_RE.match(entry["version"])) \
        and isinstance(entry.get("arch"), str) and bool(_ARCH_RE.match(entry["arch"])) \
        and isinstance(entry.get("size"), int) and entry.get("mode") in ("0644", "0755") \
        and is_digest(entry.get("digest"))
    if not ok:
        raise FilesError(f"{where} is not a valid files entry; the site repository is damaged - import the "
                         "release again")
    return entry["name"], entry["version"], entry["arch"], entry["digest"], entry["size"], entry["mode"]


def site_files(repo_root: str) -> list[SiteFile]:
    """Every file of every release in the catalog, sorted by name, version, arch. The same name, version and
    arch with other bytes in two releases is an error naming both: one URL cannot serve two files."""
    repo = SiteRepo(repo_root)
    found: dict[tuple[str, str, str], SiteFile] = {}
    try:
        releases = repo.releases()
        manifests = [repo.manifest_of(rel) for rel in releases]
    except RepoError as exc:
        raise FilesError(str(exc)) from None
    for rel, manifest in zip(releases, manifests):
        label = f"{rel['name']} {rel['version']}"
        path = os.path.join(repo.releases_dir, rel["name"], rel["version"], "manifest.json")
        for key, entry in sorted(manifest.get("files", {}).items()):
            name, version, arch, digest, size, mode = _checked(entry, f"{path}: files.{key}")
            known = found.get((name, version, arch))
            if known is None:
                found[(name, version, arch)] = SiteFile(name, version, arch, digest, size, mode, [label],
                                                        rel["importedAt"])
            elif (known.digest, known.mode) != (digest, mode):
                raise FilesError(f"file {name} {version} for {arch} differs between {', '.join(known.releases)} "
                                 f"({known.digest}, mode {known.mode}) and {label} ({digest}, mode {mode}): one "
                                 "URL cannot serve two files; the vendor must give one of them another version")
            else:
                known.releases.append(label)
                known.imported_at = rel["importedAt"]  # releases come oldest first
    return [found[k] for k in sorted(found)]


# -- files on disk ------------------------------------------------------------------------------------------


def _in_place(blob: str, dest: str, f: SiteFile) -> bool:
    """``dest`` already serves the blob: the blob itself (a hard link), or a copy with its bytes."""
    try:
        sb, sd = os.stat(blob), os.lstat(dest)
    except FileNotFoundError:
        return False
    if (sb.st_dev, sb.st_ino) == (sd.st_dev, sd.st_ino):
        return True
    # A copy (www on another file system): re-hashed only when size and mode already fit.
    return os.path.isfile(dest) and not os.path.islink(dest) and sd.st_size == f.size \
        and (sd.st_mode & 0o7777) == 0o644 and "sha256:" + sha256_file(dest) == f.digest


def _link(blob: str, dest: str) -> None:
    os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
    link_or_copy(blob, dest)


def _stale(files_dir: str, wanted: set[str]) -> list[str]:
    """Files of the tree's shape (``<name>/<version>/<arch>/<name>``) that no release carries any more.
    Anything else under www/files is not ours and is left alone."""
    stale = []
    if not os.path.isdir(files_dir):
        return stale
    for top, dirs, names in os.walk(files_dir):
        dirs.sort()
        rel_dir = os.path.relpath(top, files_dir)
        parts = rel_dir.split(os.sep)
        if len(parts) != 3:
            continue
        for name in sorted(names):
            rel = f"{rel_dir.replace(os.sep, '/')}/{name}"
            if name == parts[0] and rel not in wanted:
                stale.append(rel)
    return stale


def _prune(files_dir: str, rel: str) -> None:
    """Remove the directories a removed file leaves empty (up to, not including, www/files)."""
    parent = os.path.dirname(os.path.join(files_dir, rel))
    while os.path.abspath(parent) != os.path.abspath(files_dir):
        try:
            os.rmdir(parent)
        except OSError:
            return
        parent = os.path.dirname(parent)


def index_bytes(files: list[SiteFile]) -> bytes:
    """index.json: canonical JSON (the same files give the same bytes), sorted by name, version, arch."""
    return canonical_json({"schemaVersion": INDEX_SCHEMA, "files": [f.as_index() for f in files]}) + b"\n"


def publish_files(repo_root: str, www_dir: str, *, check_mode: bool = False) -> FilesResult:
    """Make ``www_dir/files`` serve every file of every imported release, plus index.json."""
    files = site_files(repo_root)
    files_dir = os.path.join(www_dir, "files")
    repo = SiteRepo(repo_root)
    changed: list[str] = []
    for f in files:
        blob = repo.blob_file(f.digest)
        try:
            blob_size = os.stat(blob).st_size
        except FileNotFoundError:
            raise FilesError(f"blob {f.digest} ({f.name} {f.version} {f.arch}, from {', '.join(f.releases)}) is "
                             f"missing from {repo_root}; import that release again") from None
        if blob_size != f.size:
            raise FilesError(f"blob {blob} is {blob_size} bytes, the manifest says {f.size} ({f.name} {f.version} "
                             f"{f.arch}); the repository is damaged - remove the blob and import the release again")
        dest = os.path.join(files_dir, f.rel_path)
        if _in_place(blob, dest, f):
            continue
        changed.append(f.rel_path)
        if not check_mode:
            _link(blob, dest)
    for rel in _stale(files_dir, {f.rel_path for f in files}):
        changed.append(rel)
        if not check_mode:
            os.unlink(os.path.join(files_dir, rel))
            _prune(files_dir, rel)
    index_path = os.path.join(files_dir, INDEX_NAME)
    if not check_mode:
        os.makedirs(files_dir, mode=0o755, exist_ok=True)
    index_changed = write_if_changed(index_path, index_bytes(files), check_mode=check_mode)
    return FilesResult(files=files, links_changed=changed, index_changed=index_changed, index_path=index_path)
