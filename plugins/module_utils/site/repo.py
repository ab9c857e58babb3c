# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The site's offline repository: content-addressed blobs, release records and the catalog.

Standard library only: it runs in ``bundle_import`` on the repo host. Layout under ``root``::

    blobs/sha256/<hex>                  every blob of every imported release, stored once
    releases/<name>/<version>/          manifest.json, manifest.sig, release.json (who imported it, when),
                                        sbom.cdx.json (a copy of the release's SBOM blob, when it has one)
    catalog.json                        the releases the site has; replaced atomically — the commit point
    staging/<manifest hex>/<hex>        blobs of an import in progress, verified, not yet published

One import at a time: an flock on the root directory (no lock file). Everything an import writes, the
layout included, is written while it holds the lock.

An import verifies the whole bundle into ``staging`` (same filesystem), and only then moves the blobs into
place (rename: no second copy), renames the release record into place, and finally replaces ``catalog.json``. A release
therefore appears in the catalog whole or not at all, and a failed import changes nothing a reader of the
catalog can see. Everything an import writes (staged blobs, the release record, the new catalog) is
written before the first rename, so a full disk stops it with the repository unchanged. Staged blobs survive
an abrupt stop (kill, power loss), and a rerun re-hashes them instead of writing them again: nothing in
staging is trusted without proof.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from ..bundle.format import (MAX_MANIFEST_SIZE, BundleError, BundleHead, SIGNATURE_NAME, blob_path, read_head,
                             sbom_descriptor, verify_bundle)
from ..bundle.trust import check_signer, check_vendor_release
from ..common.digests import (ContentError, canonical_json, digest_hex, json_object, read_verified, sha256_digest,
                              sha256_file)
from ..common.files import fsync_dir, remove, write_atomic
from ..common.locks import flock_within

CATALOG_SCHEMA = 1
DEFAULT_REPO_ROOT = "/srv/offline-delivery"
SBOM_FILE = "sbom.cdx.json"
# The catalog record of a release made on site (a field fix, site/patch.py) says so: {"origin": "site", ...}.
SITE_ORIGIN = "site"
# The ``repo_root`` option of every module working on the repository (doc fragment offline.delivery.repo).
REPO_ROOT_OPTION = {"type": "path", "default": DEFAULT_REPO_ROOT}
_MISSING_SHOWN = 10


class RepoError(ValueError):
    """The import cannot go ahead; the message says why and what to do. The repository is unchanged."""


class _Syncer:
    """fsyncs staged blobs on a worker thread: the disk writes one blob back while the next is read,
    hashed and written, instead of the import stopping for every fsync. ``wait`` returns once every
    staged blob is on disk (raising the first failure); nothing is published before it."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsync")
        self._jobs: list[tuple[concurrent.futures.Future[None], str]] = []

    def sync(self, fd: int, what: str) -> None:
        """fsync and close ``fd`` (a duplicate of the writer's descriptor, so a write-back error is seen)."""
        self._jobs.append((self._pool.submit(_fsync_close, fd), what))

    def wait(self, root: str) -> None:
        jobs, self._jobs = self._jobs, []
        failed: tuple[OSError, str] | None = None
        for job, what in jobs:
            try:
                job.result()
            except OSError as exc:
                failed = failed or (exc, what)
        if failed is not None:
            exc, what = failed
            if exc.errno == errno.ENOSPC:
                raise RepoError(f"no space left on the filesystem of {root} while writing blob {what}; free "
                                "space and run the import again") from None
            raise OSError(exc.errno, f"writing blob {what} to disk in {root} failed: {exc.strerror}")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for job, dummy in self._jobs:
            if not job.cancelled():
                job.exception()  # closed its descriptor either way


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ImportResult:
    name: str
    version: str
    manifest_digest: str
    changed: bool
    msg: str
    components: list[str] = field(default_factory=list)
    platforms: list[str] = field(default_factory=list)
    blobs_total: int = 0
    blobs_new: int = 0
    bytes_new: int = 0
    bytes_verified: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class SiteRepo:
    """One site repository rooted at ``root``."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.blobs_dir = os.path.join(self.root, "blobs", "sha256")
        self.releases_dir = os.path.join(self.root, "releases")
        self.staging_dir = os.path.join(self.root, "staging")
        self.catalog_path = os.path.join(self.root, "catalog.json")
        self._syncer: _Syncer | None = None  # set while an import stages blobs

    # -- reading -------------------------------------------------------------------------------------

    def exists(self) -> bool:
        return os.path.isdir(self.blobs_dir) and os.path.isfile(self.catalog_path)

    def catalog(self) -> dict[str, Any]:
        if not os.path.exists(self.catalog_path):
            return {"schemaVersion": CATALOG_SCHEMA, "releases": []}
        try:
            with open(self.catalog_path, "rb") as fh:
                doc = json.loads(fh.read().decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise RepoError(f"{self.catalog_path} cannot be read ({exc}); restore it from a backup "
                            "before importing") from None
        if not isinstance(doc, dict) or doc.get("schemaVersion") != CATALOG_SCHEMA or \
                not isinstance(doc.get("releases"), list):
            raise RepoError(f"{self.catalog_path} is not a catalog of schema {CATALOG_SCHEMA}")
        return doc

    def find_release(self, name: str, version: str) -> dict[str, Any] | None:
        for rel in self.catalog()["releases"]:
            if rel["name"] == name and rel["version"] == version:
                return rel
        return None

    def releases(self) -> list[dict[str, Any]]:
        """The catalog's release records, oldest import first."""
        return sorted(self.catalog()["releases"], key=lambda r: (r["importedAt"], r["name"], r["version"]))

    def release_manifest(self, name: str, version: str) -> dict[str, Any]:
        """The manifest of an imported release, proven to be the bytes the import validated (the catalog
        records their digest); every reader of a release goes through here (or :meth:`manifest_of`)."""
        record = self.find_release(name, version)
        if record is None:
            have = ", ".join(f"{r['name']}:{r['version']}" for r in self.catalog()["releases"]) or "none"
            raise RepoError(f"release {name}:{version} is not in the catalog of {self.root} (releases there: "
                            f"{have}); import its bundle first")
        return self.manifest_of(record)

    def manifest_of(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """:meth:`release_manifest` for a catalog record already in hand (a walk over the catalog reads it once)."""
        name, version = record["name"], record["version"]
        path = os.path.join(self.releases_dir, name, version, "manifest.json")
        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_MANIFEST_SIZE + 1)
        except OSError as exc:
            raise RepoError(f"{path} cannot be read ({exc.strerror or exc}); import the bundle of {name} "
                            f"{version} again") from None
        if sha256_digest(raw) != record.get("manifestDigest"):
            raise RepoError(f"{path} does not match the catalog's digest {record.get('manifestDigest')}: the "
                            "repository was changed by hand; import the bundle again")
        try:
            return json_object(raw, path)
        except ContentError as exc:
            raise RepoError(f"{exc}; import the bundle again") from None

    def read_blob(self, digest: str, *, limit: int, size: int | None = None, where: str = "") -> bytes:
        """A (small) blob of the store, proven to have its digest."""
        try:
            return read_verified(self.blob_file(digest), digest, limit=limit, size=size)
        except ContentError as exc:
            raise RepoError(f"{where + ': ' if where else ''}{exc}; the site repository is damaged: remove "
                            "that file and import the release again") from None

    def blob_file(self, digest: str) -> str:
        return os.path.join(self.root, blob_path(digest))

    def has_blob(self, digest: str, size: int) -> bool:
        try:
            return os.stat(self.blob_file(digest)).st_size == size
        except FileNotFoundError:
            return False

    # -- writing -------------------------------------------------------------------------------------

    def ensure_layout(self) -> bool:
        """Create the directories and an empty catalog; True when something was created."""
        created: list[str] = []
        self._create_layout(created)
        return bool(created)

    def _create_layout(self, created: list[str]) -> None:
        """Create what is missing of the layout, appending each path created to ``created`` as it goes
        (so a failure half-way still says what to undo)."""
        for d in (os.path.dirname(self.blobs_dir), self.blobs_dir, self.releases_dir, self.staging_dir):
            if not os.path.isdir(d):
                os.makedirs(d, mode=0o755, exist_ok=True)
                created.append(d)
        if not os.path.exists(self.catalog_path):
            self._write_catalog({"schemaVersion": CATALOG_SCHEMA, "releases": []})
            created.append(self.catalog_path)

    def _undo_layout(self, created_root: bool, created: list[str]) -> None:
        """After a refused import into a repository without releases: remove what this import created
        (the root, or the layout inside a root that was there, e.g. a mount point). Holding the lock."""
        if created_root:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for path in created:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                remove(path)

    @contextmanager
    def lock(self, timeout: float) -> Iterator[bool]:
        """Hold the repository lock; wait at most ``timeout`` seconds for another import to finish.
        Yields True when this call created the root directory.

        The lock is an flock on the root directory itself: no lock file, so an import that is refused or
        has nothing to do leaves the repository byte for byte as it was. The root is created when missing.
        A refused first import removes the root it created (holding the lock); whoever waited on that
        directory then finds it gone and locks the new one instead.
        """
        deadline = time.monotonic() + timeout
        while True:
            created = self._make_root()
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self._flock(fd, deadline, timeout)
            except BaseException:
                os.close(fd)
                raise
            if _is_current_dir(fd, self.root):
                break
            os.close(fd)  # removed (or replaced) while we waited: lock the directory that is there now
        try:
            yield created
        finally:
            os.close(fd)  # closing drops the flock

    def _make_root(self) -> bool:
        os.makedirs(os.path.dirname(self.root), exist_ok=True)
        try:
            os.mkdir(self.root, 0o755)
            return True
        except FileExistsError:
            return False

    def _flock(self, fd: int, deadline: float, timeout: float) -> None:
        if not flock_within(fd, max(0.0, deadline - time.monotonic())):
            raise RepoError(f"another import holds the lock on {self.root} and did not finish "
                            f"within {timeout:.0f}s; wait for it and run again")

    def _write_catalog(self, doc: dict[str, Any]) -> None:
        write_atomic(self.catalog_path, json.dumps(doc, indent=2, sort_keys=True).encode("utf-8") + b"\n", sync_dir=True)

    def _stage_blob(self, stage: str, desc: dict[str, Any], chunks: Iterator[memoryview]) -> None:
        """Sink for verify_bundle: write a new blob into the staging area, renamed to its final staged
        name only once its digest has been checked (the iterator raises at its end otherwise). Each chunk
        is written at once (it is valid only until the next one is read). Its fsync runs on the import's
        syncer while the next blob streams in (a rerun re-hashes a staged file before trusting it, so a
        rename before the fsync is safe); without one (a direct call), it fsyncs here."""
        hexd = digest_hex(desc["digest"])
        final = os.path.join(stage, hexd)
        if self.has_blob(desc["digest"], desc["size"]) or _staged_intact(final, desc):
            return  # present already; verify_bundle still hashes the bundle's copy
        remove(final)  # a damaged leftover of an interrupted import: write it again
        partial = final + ".partial"
        try:
            with open(partial, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                out.flush()
                if self._syncer is None:
                    os.fsync(out.fileno())
                else:
                    self._syncer.sync(os.dup(out.fileno()), desc["digest"])
            os.replace(partial, final)
        except BaseException as exc:
            remove(partial)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise RepoError(f"no space left on the filesystem of {self.root} while writing blob "
                                f"{desc['digest']} ({desc['size']} bytes); free space and run the import "
                                "again") from None
            raise

    def _check_model_agrees(self, stage: str, manifest: dict[str, Any]) -> None:
        """The signed manifest's name, version and image references are those of the model it carries (a
        verified blob by now), so a manifest cannot relabel one application's model as another's release."""
        digest = manifest["model"]["digest"]
        staged = os.path.join(stage, digest_hex(digest))
        path = staged if os.path.exists(staged) else self.blob_file(digest)
        try:
            with open(path, "rb") as fh:
                model = json.loads(fh.read().decode("utf-8"))
            ours = {"name": model["name"], "version": model["version"],
                    "images": {c: spec["image"] for c, spec in model["components"].items()}}
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
            raise RepoError(f"the model blob {digest} of {manifest['name']} {manifest['version']} is not an "
                            "application model; the bundle was not made by bundle-builder") from None
        theirs = {"name": manifest["name"], "version": manifest["version"],
                  "images": {c: img["reference"] for c, img in manifest["images"].items()}}
        for key in ("name", "version", "images"):
            if ours[key] != theirs[key]:
                raise RepoError(f"manifest.json: {key} {theirs[key]!r} differs from its model's {ours[key]!r} "
                                f"(model blob {digest}); the bundle is refused, nothing was changed")

    def _staged_or_stored(self, stage: str, desc: Mapping[str, Any]) -> bytes:
        """A small blob of a release being published, proven to have its digest: staged (this import) or
        already in the store (an earlier release)."""
        staged = os.path.join(stage, digest_hex(desc["digest"]))
        path = staged if os.path.exists(staged) else self.blob_file(desc["digest"])
        try:
            return read_verified(path, desc["digest"], limit=MAX_MANIFEST_SIZE, size=desc["size"])
        except ContentError as exc:
            raise RepoError(f"{exc}; the release is not published, run the import again") from None

    def _publish(self, stage: str, head_manifest: dict[str, Any], manifest_bytes: bytes,
                 signature: bytes | None, record: dict[str, Any], *, bundled_only: bool = True) -> tuple[int, int]:
        """Write the release record and the new catalog aside, then move the staged blobs into place,
        the record to its place, and commit the catalog. Nothing visible changes before every write has
        succeeded (a full disk fails here), and from then on only renames follow. ``bundled_only``: an
        import stages only the blobs its bundle carries; a sync (publish_staged) may stage any blob."""
        self._check_model_agrees(stage, head_manifest)
        name, version = head_manifest["name"], head_manifest["version"]
        rel_dir = os.path.join(self.releases_dir, name, version)
        tmp_dir = os.path.join(self.releases_dir, f".tmp-{name}-{version}")
        catalog = self.catalog()
        catalog["releases"] = [r for r in catalog["releases"]
                               if not (r["name"] == name and r["version"] == version)] + [record]
        catalog["releases"].sort(key=lambda r: (r["name"], r["importedAt"], r["version"]))
        self._remove_leftovers()
        sbom_desc = sbom_descriptor(head_manifest)
        sbom = None if sbom_desc is None else self._staged_or_stored(stage, sbom_desc)
        catalog_tmp = f"{self.catalog_path}.tmp-{os.getpid()}"
        try:
            os.makedirs(tmp_dir, mode=0o755)
            write_atomic(os.path.join(tmp_dir, "manifest.json"), manifest_bytes, sync_dir=True)
            if signature is not None:
                write_atomic(os.path.join(tmp_dir, SIGNATURE_NAME), signature, sync_dir=True)
            write_atomic(os.path.join(tmp_dir, "release.json"), canonical_json(record) + b"\n", sync_dir=True)
            if sbom is not None:  # beside the release, for a security officer or a scanner on the repo host
                write_atomic(os.path.join(tmp_dir, SBOM_FILE), sbom, sync_dir=True)
            _write_synced(catalog_tmp, json.dumps(catalog, indent=2, sort_keys=True).encode("utf-8") + b"\n")
            os.makedirs(os.path.dirname(rel_dir), mode=0o755, exist_ok=True)
        except OSError as exc:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            remove(catalog_tmp)
            if exc.errno == errno.ENOSPC:
                raise RepoError(f"no space left on the filesystem of {self.root} while writing the release "
                                f"record of {name} {version}; free space and run the import again") from None
            raise

        new_blobs = new_bytes = 0
        for desc in head_manifest["blobs"]:
            if bundled_only and not desc["bundled"]:
                continue
            staged = os.path.join(stage, digest_hex(desc["digest"]))
            if os.path.exists(staged):
                if self.has_blob(desc["digest"], desc["size"]):
                    os.unlink(staged)
                    continue
                os.chmod(staged, 0o644)
                os.replace(staged, self.blob_file(desc["digest"]))
                new_blobs += 1
                new_bytes += desc["size"]
        fsync_dir(self.blobs_dir)
        if os.path.exists(rel_dir):  # left by an import interrupted after this step; not in the catalog
            shutil.rmtree(rel_dir)
        os.rename(tmp_dir, rel_dir)
        fsync_dir(os.path.dirname(rel_dir))
        os.replace(catalog_tmp, self.catalog_path)  # the commit point
        fsync_dir(self.root)
        return new_blobs, new_bytes

    def _remove_leftovers(self) -> None:
        """Temporary files and directories of imports that were killed before their commit (only ever
        under the lock, so none of them belongs to a running import)."""
        for entry in os.listdir(self.root):
            if entry.startswith(os.path.basename(self.catalog_path) + ".tmp-"):
                remove(os.path.join(self.root, entry))
        for entry in os.listdir(self.releases_dir):
            if entry.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.releases_dir, entry), ignore_errors=True)


def import_bundle(repo: SiteRepo, path: str, trusted_keys: list[bytes], *, check_mode: bool = False,
                  imported_by: str = "unknown", lock_timeout: float = 600.0,
                  signers: Mapping[str, Sequence[str]] | None = None) -> ImportResult:
    """Verify a bundle and publish it into ``repo`` (see the module docstring for the guarantees).

    A refused bundle leaves nothing behind: its staged blobs are discarded, and a repository this call
    created (the root, or the layout inside an existing root such as a mount point) is removed again.
    ``signers`` (keyid -> applications, from trust.pinned_keys) binds each key to what it may sign; None
    trusts every given key for every application.
    Only an abrupt stop (kill, power loss) leaves staged blobs, which the next run of the same import
    re-hashes and reuses instead of writing them again.
    """
    if check_mode:
        return _check_only(repo, path, trusted_keys, signers, created=not repo.exists())
    with repo.lock(lock_timeout) as created_root:
        created: list[str] = []
        try:
            repo._create_layout(created)
            return _import_locked(repo, path, trusted_keys, signers, imported_by)
        except (BundleError, RepoError, OSError):
            if (created_root or created) and not repo.catalog()["releases"]:
                repo._undo_layout(created_root, created)  # still locked: nobody else is inside
            raise


def _import_locked(repo: SiteRepo, path: str, trusted_keys: list[bytes],
                   signers: Mapping[str, Sequence[str]] | None, imported_by: str) -> ImportResult:
    head = read_head(path, trusted_keys)  # signature first: nothing in the manifest is trusted before
    manifest = head.manifest
    check_signer(signers, head.keyid, manifest["name"])
    check_vendor_identity(repo, head)
    name, version = manifest["name"], manifest["version"]
    stage = os.path.join(repo.staging_dir, digest_hex(head.manifest_digest))
    if _already_imported(repo, head):
        # An import killed after its commit may have left its (emptied) staging directory.
        shutil.rmtree(stage, ignore_errors=True)
        return _result(manifest, head.manifest_digest, changed=False,
                       msg=f"{name} {version} is already imported (same manifest); nothing to do")
    _require_base_blobs(repo, manifest)

    os.makedirs(stage, mode=0o700, exist_ok=True)
    repo._syncer = _Syncer()
    try:
        verified = verify_bundle(path, trusted_keys,
                                 sink=lambda desc, chunks: repo._stage_blob(stage, desc, chunks))
        if verified.manifest_digest != head.manifest_digest:
            raise BundleError("the bundle changed while it was being imported; copy it again and rerun")
        repo._syncer.wait(repo.root)  # every staged blob on disk before anything is published
        record = _release_record(head, imported_by)
        new_blobs, new_bytes = repo._publish(stage, manifest, head.manifest_bytes, head.signature, record)
    except (BundleError, RepoError, OSError):
        repo._syncer.close()
        shutil.rmtree(stage, ignore_errors=True)  # nothing of a refused bundle stays on the site
        raise
    finally:
        repo._syncer.close()
        repo._syncer = None
    shutil.rmtree(stage, ignore_errors=True)
    res = _result(manifest, head.manifest_digest, changed=True,
                  msg=f"{name} {version} imported: {new_blobs} new blobs, {new_bytes} bytes")
    res.blobs_new, res.bytes_new, res.bytes_verified = new_blobs, new_bytes, verified.bytes_checked
    return res


def publish_staged(repo: SiteRepo, head: BundleHead, stage: str, *, imported_by: str,
                   lock_timeout: float = 600.0) -> ImportResult:
    """Publish a release whose blobs were staged by something other than a bundle tar (site_sync), through
    the same steps as an import: record and catalog written aside, blobs renamed into place, catalog last.

    ``head`` must carry a manifest whose signature the caller checked with the site's trusted keys, and
    ``stage`` (a directory under ``repo.staging_dir``) the blobs the repository lacks, each named by its hex
    digest and already hashed by the caller. Every blob of the manifest must be in the repository or
    staged with its size, else nothing is published. The stage directory is removed after a publish or when
    the release is already there. The repository must exist (an import sets it up).
    """
    manifest = head.manifest
    name, version = manifest["name"], manifest["version"]
    if not repo.exists():
        raise RepoError(f"there is no site repository at {repo.root}; set the repo host up with a first "
                        "import (offline.delivery.import) before publishing into it")
    with repo.lock(lock_timeout):
        check_vendor_identity(repo, head)
        if _already_imported(repo, head):
            shutil.rmtree(stage, ignore_errors=True)
            return _result(manifest, head.manifest_digest, changed=False,
                           msg=f"{name} {version} is already in this repository (same manifest); nothing to do")
        missing = [b["digest"] for b in manifest["blobs"] if not repo.has_blob(b["digest"], b["size"])
                   and not _staged_size(os.path.join(stage, digest_hex(b["digest"])), b["size"])]
        if missing:
            shown = ", ".join(missing[:_MISSING_SHOWN]) + (f" and {len(missing) - _MISSING_SHOWN} more"
                                                           if len(missing) > _MISSING_SHOWN else "")
            raise RepoError(f"{name} {version}: {len(missing)} blobs are neither in {repo.root} nor staged in "
                            f"{stage}: {shown}; nothing was published")
        record = _release_record(head, imported_by)
        new_blobs, new_bytes = repo._publish(stage, manifest, head.manifest_bytes, head.signature, record,
                                             bundled_only=False)
    shutil.rmtree(stage, ignore_errors=True)
    res = _result(manifest, head.manifest_digest, changed=True,
                  msg=f"{name} {version} published: {new_blobs} new blobs, {new_bytes} bytes")
    res.blobs_new, res.bytes_new = new_blobs, new_bytes
    return res


def check_vendor_identity(repo: SiteRepo, head: BundleHead) -> None:
    """A vendor's release (import, sync) is refused when it carries a site release's version or is signed by
    the key that signed this site's own releases (bundle/trust.check_vendor_release)."""
    site_keys = {r["keyid"] for r in repo.catalog()["releases"] if r.get("origin") == SITE_ORIGIN and r.get("keyid")}
    check_vendor_release(head.manifest["version"], head.keyid, site_keys)


def publish_site_release(repo: SiteRepo, head: BundleHead, stage: str, site_record: Mapping[str, Any], *,
                         made_by: str, lock_timeout: float = 600.0) -> ImportResult:
    """Publish a site release (site/patch.py: a field fix signed by the site key) whose new blobs are staged
    in ``stage``, through the import's own steps; its catalog record carries ``origin: site`` and
    ``site_record`` (the patch), so every reader can tell it from the vendor's releases."""
    with repo.lock(lock_timeout):
        if _already_imported(repo, head):
            shutil.rmtree(stage, ignore_errors=True)
            return _result(head.manifest, head.manifest_digest, changed=False,
                           msg=f"{head.manifest['name']} {head.manifest['version']} is already in this repository")
        record = {**_release_record(head, made_by), **site_record, "origin": SITE_ORIGIN}
        new_blobs, new_bytes = repo._publish(stage, head.manifest, head.manifest_bytes, head.signature, record,
                                             bundled_only=False)
    shutil.rmtree(stage, ignore_errors=True)
    res = _result(head.manifest, head.manifest_digest, changed=True,
                  msg=f"{head.manifest['name']} {head.manifest['version']} recorded: {new_blobs} new blobs, "
                      f"{new_bytes} bytes")
    res.blobs_new, res.bytes_new = new_blobs, new_bytes
    return res


def _staged_size(path: str, size: int) -> bool:
    try:
        return os.stat(path).st_size == size
    except FileNotFoundError:
        return False


def _release_record(head: BundleHead, imported_by: str) -> dict[str, Any]:
    manifest = head.manifest
    name, version = manifest["name"], manifest["version"]
    sbom = sbom_descriptor(manifest)
    return {
        "name": name, "version": version, "manifestDigest": head.manifest_digest, "keyid": head.keyid,
        "importedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "importedBy": imported_by,
        "components": sorted(manifest["images"]), "platforms": manifest["platforms"],
        "blobs": len(manifest["blobs"]), "bytes": sum(b["size"] for b in manifest["blobs"]),
        "delta": manifest["delta"],
        **({} if sbom is None else {"sbom": sbom["digest"]}),
    }


def _already_imported(repo: SiteRepo, head: BundleHead) -> bool:
    """True when the catalog has this very release and all its blobs; refuse a changed release."""
    name, version = head.manifest["name"], head.manifest["version"]
    known = repo.find_release(name, version)
    if known is None:
        return False
    if known["manifestDigest"] != head.manifest_digest:
        raise RepoError(f"{name} {version} is already in this site's catalog with manifest "
                        f"{known['manifestDigest']}, and this bundle's manifest is {head.manifest_digest}: "
                        "a published release never changes; the vendor must build the change as a new version")
    return all(repo.has_blob(b["digest"], b["size"]) for b in head.manifest["blobs"])


def _require_base_blobs(repo: SiteRepo, manifest: dict[str, Any]) -> None:
    """A delta omits blobs the site should hold; refuse before streaming anything if it does not."""
    missing = [b["digest"] for b in manifest["blobs"]
               if not b["bundled"] and not repo.has_blob(b["digest"], b["size"])]
    if not missing:
        return
    base = (manifest.get("delta") or {}).get("base") or {}
    based_on = (f"release {base.get('name')} {base.get('version')}" if base.get("version")
                else "the site's have-list")
    shown = ", ".join(missing[:_MISSING_SHOWN]) + (f" and {len(missing) - _MISSING_SHOWN} more"
                                                   if len(missing) > _MISSING_SHOWN else "")
    raise RepoError(f"this is a delta bundle built against {based_on}, but {len(missing)} of the blobs it "
                    f"leaves out are not in this repository: {shown}. Import the base release first, or ask "
                    "the vendor for a full bundle (or a delta built from this site's have-list)")


def _check_only(repo: SiteRepo, path: str, trusted_keys: list[bytes],
                signers: Mapping[str, Sequence[str]] | None, *, created: bool) -> ImportResult:
    """Check mode: verify every byte, write nothing, say what an import would add."""
    head = read_head(path, trusted_keys)
    check_signer(signers, head.keyid, head.manifest["name"])
    check_vendor_identity(repo, head)
    if not created and _already_imported(repo, head):
        return _result(head.manifest, head.manifest_digest, changed=False,
                       msg=f"{head.manifest['name']} {head.manifest['version']} is already imported")
    _require_base_blobs(repo, head.manifest)
    verified = verify_bundle(path, trusted_keys)
    manifest = verified.manifest
    new = [b for b in manifest["blobs"] if b["bundled"] and not repo.has_blob(b["digest"], b["size"])]
    res = _result(manifest, verified.manifest_digest, changed=True,
                  msg=f"{manifest['name']} {manifest['version']} would be imported "
                      f"({len(new)} new blobs){' into a new repository' if created else ''}")
    res.blobs_new, res.bytes_new = len(new), sum(b["size"] for b in new)
    res.bytes_verified = verified.bytes_checked
    return res


def _result(manifest: dict[str, Any], digest: str, *, changed: bool, msg: str) -> ImportResult:
    return ImportResult(name=manifest["name"], version=manifest["version"], manifest_digest=digest,
                        changed=changed, msg=msg, components=sorted(manifest["images"]),
                        platforms=list(manifest["platforms"]), blobs_total=len(manifest["blobs"]))


def _write_synced(path: str, data: bytes) -> None:
    """Write ``data`` to a new file (mode 0644) and flush it to disk."""
    try:
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(path, 0o644)
    except BaseException:
        remove(path)
        raise


def _staged_intact(path: str, desc: dict[str, Any]) -> bool:
    """True when a staged file left by an interrupted import holds exactly the blob (size and sha256)."""
    try:
        if os.path.getsize(path) != desc["size"]:
            return False
    except FileNotFoundError:
        return False
    return "sha256:" + sha256_file(path) == desc["digest"]


def _is_current_dir(fd: int, path: str) -> bool:
    """True when the open directory ``fd`` is still the one at ``path`` (not removed or replaced)."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)
