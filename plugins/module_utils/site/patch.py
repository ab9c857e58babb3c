# -*- coding: utf-8 -*-
# Copyright: offline.delivery contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A field fix of one component, made on site: a **site release** ``<vendor version>+site.<n>``.

On the repo host (module ``app_patch``, playbook ``offline.delivery.patch``), standard library only. From a
release of the site repository (the running one, or a named one) and a few files:

* one new layer, a tar of the files (gzip or uncompressed), written here: no Docker, no build tool; a path to
  remove becomes an OCI whiteout (``.wh.<name>``) in it, which Docker, containerd and the systemd target's
  overlay roots all honour;
* per platform the release carries, the component's image config with that layer's diff_id and a history entry
  appended, a new image manifest (the base layers and the new one) and a new index: the component's image
  ``<repository>:<tag>-site.<n>``;
* a release manifest like the vendor's (same format, bundle/format.build_manifest) with the new model (version
  and image reference) and the changed image, the base's packages and files, and one more blob: the patch record
  (component, files with their sha256, removed paths, who, when, the base release), signed by the **site key** (the key of
  the have-list and the status report, site/have.py) in manifest.sig;
* published into the site repository through the import's own steps (site/repo.publish_site_release), its
  catalog record marked ``origin: site`` with the patch.

Trust: a site release is read only with the site key, only as ``<vendor version>+site.<n>`` of a vendor release
the catalog holds (:func:`verify_site_release`); a vendor bundle can neither carry such a version nor be signed
by the site's key (bundle/trust.check_vendor_release, called by every import and sync). Precedence: a site
release sorts after its vendor release and before the vendor's next one (site/release.semver_key).

The same patch again (same base, component, files, paths, modes and removals) is the release already made: no
change.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import tarfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..bundle import ed25519
from ..bundle.format import (MAX_MANIFEST_SIZE, SBOM_USED_BY, BundleError, BundleHead, blob_descriptor,
                             build_manifest, check_signature, make_signature_doc)
from ..bundle.trust import site_version
from ..common.digests import canonical_json, digest_hex, json_object, sha256_digest, ContentError
from ..common.names import CONTROL_RE, name_problem, version_problem
from ..common.oci import (DOCKER_LAYER, DOCKER_LAYER_GZIP, DOCKER_MANIFEST, OCI_LAYER, OCI_LAYER_GZIP,
                          OciError, split_reference)
from ..common.version import COLLECTION_VERSION
from .have import PUB_NAME, HaveError, load_or_create_key, public_from_seed, sign
from .repo import SITE_ORIGIN, ImportResult, RepoError, SiteRepo, publish_site_release

PATCH_MEDIA_TYPE = "application/vnd.offline-delivery.site-patch.v1+json"
PATCH_USED_BY = "site-patch"
BUILDER_NAME = "offline.delivery site patch"
MAX_FILES = 64
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_TOTAL_BYTES = 512 * 1024 * 1024
MAX_PATH = 1024
MAX_TEXT = 1000
MODES = ("0644", "0755", "0600", "0700", "0444", "0555")
_CHUNK = 1024 * 1024


class PatchError(ValueError):
    """The patch cannot be made: names the file, component or release and what to do. Nothing was recorded."""


@dataclass
class PatchFile:
    src: str        # on the repo host (the playbook copied it there)
    path: str       # in the image
    mode: str
    size: int
    sha256: str     # sha256:<hex> of the content

    def record(self) -> Dict[str, Any]:
        return {"path": self.path, "mode": self.mode, "size": self.size, "sha256": self.sha256}


# --------------------------------------------------------------------------------------------------------
# Inputs


def image_path_problem(path: object) -> Optional[str]:
    """Why ``path`` cannot be a file's path in an image, or None: absolute, normalised, no ``..``."""
    if not isinstance(path, str) or not path:
        return f"path in the image {path!r} must be a non-empty string"
    if len(path) > MAX_PATH or CONTROL_RE.search(path):
        return f"path in the image {path[:80]!r} is longer than {MAX_PATH} characters or has control characters"
    if not path.startswith("/") or path.endswith("/"):
        return f"path in the image {path!r} must be absolute and name a file (/opt/app/x.py)"
    parts = path[1:].split("/")
    if any(p in ("", ".", "..") for p in parts):
        return f"path in the image {path!r} must be normalised: no empty, '.' or '..' parts"
    if any(p.startswith(".wh.") for p in parts):
        return f"path in the image {path!r} has a part starting with .wh. (a whiteout: it would remove a file)"
    return None


def check_removed(paths: Sequence[object], files: Sequence[PatchFile]) -> List[str]:
    """The paths a patch removes from the image, sorted; PatchError names the entry. A removed path may not be a
    file the patch adds or a directory one is added under: one layer cannot both hide and fill a path."""
    if len(paths) > MAX_FILES:
        raise PatchError(f"{len(paths)} paths to remove: a field fix removes at most {MAX_FILES}")
    out: List[str] = []
    for i, path in enumerate(paths):
        problem = image_path_problem(path)
        if problem:
            raise PatchError(f"remove[{i}]: {problem}")
        text = str(path)
        if text in out:
            raise PatchError(f"remove[{i}]: {text} is given twice")
        added = next((f.path for f in files if f.path == text or f.path.startswith(text + "/")), None)
        if added:
            raise PatchError(f"remove[{i}]: {text} cannot be removed by the patch that adds {added}")
        out.append(text)
    return sorted(out)


def whiteout_name(path: str) -> str:
    """The layer member that removes ``path`` from the layers below (OCI image spec, "Whiteouts")."""
    parent, _sep, base = path.lstrip("/").rpartition("/")
    return (parent + "/" if parent else "") + ".wh." + base


def check_files(files: Sequence[Mapping[str, Any]]) -> List[PatchFile]:
    """The files of a patch, each regular, bounded in size and hashed; PatchError names the entry."""
    if len(files) > MAX_FILES:
        raise PatchError(f"{len(files)} files: a field fix adds at most {MAX_FILES}; ask the vendor for a release")
    out: List[PatchFile] = []
    total = 0
    for i, entry in enumerate(files):
        where = f"files[{i}]"
        if not isinstance(entry, Mapping) or set(entry) - {"src", "path", "mode"} or not entry.get("src"):
            raise PatchError(f"{where}: must be {{src, path, mode (optional, default 0644)}}")
        problem = image_path_problem(entry.get("path"))
        if problem:
            raise PatchError(f"{where}: {problem}")
        mode = str(entry.get("mode") or "0644")
        if mode not in MODES:
            raise PatchError(f"{where} ({entry['path']}): mode {mode!r} must be one of {', '.join(MODES)}")
        if entry["path"] in {f.path for f in out}:
            raise PatchError(f"{where}: {entry['path']} is given twice")
        src = str(entry["src"])
        try:
            st = os.stat(src)
        except OSError as exc:
            raise PatchError(f"{where}: {src} cannot be read ({exc.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise PatchError(f"{where}: {src} is not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise PatchError(f"{where}: {src} has {st.st_size} bytes, more than {MAX_FILE_BYTES} (a field fix "
                             "changes a file or a jar, not an image: ask the vendor for a release)")
        total += st.st_size
        if total > MAX_TOTAL_BYTES:
            raise PatchError(f"the files add up to more than {MAX_TOTAL_BYTES} bytes; ask the vendor for a release")
        digest, size = _hash_file(src)
        out.append(PatchFile(src, entry["path"], mode, size, digest))
    return out


def _hash_file(path: str) -> Tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def _text_problem(value: object, what: str) -> Optional[str]:
    if not isinstance(value, str) or len(value) > MAX_TEXT or CONTROL_RE.search(value.replace("\n", " ")):
        return f"{what} must be text of at most {MAX_TEXT} characters without control characters"
    return None


# --------------------------------------------------------------------------------------------------------
# The layer and the image


class _HashingWriter:
    """A binary file that hashes what is written (sha256 and size)."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.h, self.size = fh, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.h.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.h.hexdigest()


def write_layer(files: Sequence[PatchFile], directory: str, *, mtime: int, compress: bool,
                removed: Sequence[str] = ()) -> Dict[str, Any]:
    """One layer of ``files`` (regular files owned by root, no directory entries: the image's own stay as they
    are) and a whiteout per ``removed`` path, in ``directory``, named by its digest; ``{digest, diffId, size,
    compressed}``. The tar is PAX, its entries sorted by name; gzip without a name or time, so the same files give
    the same bytes."""
    entries: List[Tuple[str, Optional[PatchFile]]] = [(f.path.lstrip("/"), f) for f in files]
    entries += [(whiteout_name(path), None) for path in removed]
    raw_path = os.path.join(directory, "layer.tar")
    with open(raw_path, "wb") as fh:
        raw = _HashingWriter(fh)
        with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for name, f in sorted(entries, key=lambda e: e[0]):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = (f.size, int(f.mode, 8), mtime) if f else (0, 0o644, mtime)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if f is None:
                    tar.addfile(info)   # a whiteout: an empty regular file
                    continue
                with open(f.src, "rb") as src:
                    tar.addfile(info, src)
                    if src.read(1):
                        raise PatchError(f"{f.src} grew while the layer was written; copy it again")
        fh.flush()
        os.fsync(fh.fileno())
    diff_id = raw.digest
    if not compress:
        final = os.path.join(directory, digest_hex(diff_id))
        os.replace(raw_path, final)
        return {"digest": diff_id, "diffId": diff_id, "size": raw.size, "compressed": False}
    gz_path = os.path.join(directory, "layer.tar.gz")
    with open(gz_path, "wb") as out, open(raw_path, "rb") as src:
        packed = _HashingWriter(out)
        with gzip.GzipFile(filename="", mode="wb", fileobj=packed, mtime=0) as gz:  # type: ignore[arg-type]
            shutil.copyfileobj(src, gz, _CHUNK)
        out.flush()
        os.fsync(out.fileno())
    os.unlink(raw_path)
    os.replace(gz_path, os.path.join(directory, digest_hex(packed.digest)))
    return {"digest": packed.digest, "diffId": diff_id, "size": packed.size, "compressed": True}


def layer_media_type(manifest_media_type: str, compressed: bool) -> str:
    """The new layer's media type in the vocabulary of the manifest it joins (Docker v2 or OCI)."""
    if manifest_media_type == DOCKER_MANIFEST:
        return DOCKER_LAYER_GZIP if compressed else DOCKER_LAYER
    return OCI_LAYER_GZIP if compressed else OCI_LAYER


def _doc_bytes(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class _Stage:
    """New blobs of the site release, written into the repository's staging area by their digest."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.blobs: Dict[str, Dict[str, Any]] = {}  # digest -> blob descriptor of the release manifest
        self.replaced: set = set()  # configs of the base image that the patched image no longer uses

    def add(self, data: bytes, media_type: str, used_by: str) -> Dict[str, Any]:
        digest = sha256_digest(data)
        with open(os.path.join(self.directory, digest_hex(digest)), "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return self.note(digest, len(data), media_type, used_by)

    def note(self, digest: str, size: int, media_type: str, used_by: str) -> Dict[str, Any]:
        known = self.blobs.get(digest)
        used = sorted(set(known["usedBy"] if known else []) | {used_by})
        self.blobs[digest] = blob_descriptor(digest, size, media_type, used)
        return {"mediaType": media_type, "digest": digest, "size": size}


def patch_image(repo: SiteRepo, release: Mapping[str, Any], component: str, layer: Mapping[str, Any],
                stage: _Stage, *, history: Mapping[str, Any], reference: str) -> Dict[str, Any]:
    """The component's image of ``release`` (a release manifest) with ``layer`` on top, per platform: new
    configs, manifests and index staged; returns the release manifest's ``images`` entry for it."""
    image = release["images"][component]
    where = f"{release['name']} {release['version']} component {component}"
    index = _small_json(repo, image["index"], f"{where}: index")
    new_for: Dict[str, str] = {}
    entries = []
    for entry in index.get("manifests") or []:
        digest = entry.get("digest") if isinstance(entry, dict) else None
        platform = next((p for p, d in image["manifests"].items() if d == digest), None)
        if platform is None:
            continue  # not a platform of this release: the patched image does not carry it
        base = _small_json(repo, digest, f"{where}: manifest {platform}")
        config_desc = base.get("config") or {}
        stage.replaced.add(config_desc.get("digest"))
        config = _small_json(repo, config_desc.get("digest"), f"{where}: config {platform}")
        rootfs = config.get("rootfs") if isinstance(config.get("rootfs"), dict) else None
        if rootfs is None or not isinstance(rootfs.get("diff_ids"), list) or \
                len(rootfs["diff_ids"]) != len(base.get("layers") or []):
            raise PatchError(f"{where}: the config of {platform} does not list one diff_id per layer; this image "
                             "cannot be patched on site")
        config = dict(config, rootfs=dict(rootfs, diff_ids=rootfs["diff_ids"] + [layer["diffId"]]),
                      history=list(config.get("history") or []) + [dict(history)])
        media = base.get("mediaType") or entry.get("mediaType") or ""
        layer_desc = stage.note(layer["digest"], layer["size"], layer_media_type(media, layer["compressed"]),
                                component)
        new_config = stage.add(_doc_bytes(config), config_desc.get("mediaType"), component)
        manifest = dict(base, config=new_config, layers=list(base.get("layers") or []) + [layer_desc])
        new_manifest = stage.add(_doc_bytes(manifest), entry.get("mediaType") or media, component)
        new_for[platform] = new_manifest["digest"]
        entries.append(dict(entry, digest=new_manifest["digest"], size=new_manifest["size"]))
    missing = sorted(set(image["manifests"]) - set(new_for))
    if missing:
        raise PatchError(f"{where}: the index {image['index']} lists no manifest for {', '.join(missing)}")
    index_media = index.get("mediaType") or _blob_media_type(release, image["index"])
    new_index = stage.add(_doc_bytes(dict(index, manifests=entries)), index_media, component)
    return {"reference": reference, "index": new_index["digest"], "manifests": new_for}


def _blob_media_type(release: Mapping[str, Any], digest: str) -> str:
    return next(b["mediaType"] for b in release["blobs"] if b["digest"] == digest)


def _small_json(repo: SiteRepo, digest: object, where: str) -> Dict[str, Any]:
    if not isinstance(digest, str):
        raise PatchError(f"{where}: no digest")
    try:
        return json_object(repo.read_blob(digest, limit=MAX_MANIFEST_SIZE, where=where), f"{where} ({digest})")
    except (RepoError, ContentError) as exc:
        raise PatchError(str(exc)) from None


def patched_reference(reference: str, vendor_version: str, n: int) -> str:
    """``shop/api:1.0.0`` -> ``shop/api:1.0.0-site.1`` (a tag cannot hold '+'); the registry host is dropped, as
    the site registry serves every image under its path."""
    try:
        repository, tag, _digest = split_reference(reference)
    except OciError as exc:
        raise PatchError(str(exc)) from None
    base = (tag or vendor_version.replace("+", "-"))[:110]
    return f"{repository}:{base}-site.{n}"


# --------------------------------------------------------------------------------------------------------
# Site releases in the catalog


def site_releases(repo: SiteRepo, app: str) -> List[Dict[str, Any]]:
    return [r for r in repo.catalog()["releases"] if r["name"] == app and r.get("origin") == SITE_ORIGIN]


def site_public_key(key_dir: str) -> bytes:
    """The site key's public half (``site-have.pub``, written beside the private key when it was made)."""
    path = os.path.join(key_dir, PUB_NAME)
    try:
        return ed25519.load_public_key_files([path])[0]
    except ed25519.Ed25519KeyError as exc:
        raise PatchError(f"{exc}; a site release is read only with the site key (made on the repo host by the "
                         "first patch, have-list or status report)") from None


def verify_site_release(repo: SiteRepo, record: Mapping[str, Any], site_key: bytes) -> Dict[str, Any]:
    """The patch record of a site release, when its manifest is signed by ``site_key`` and it is
    ``<vendor version>+site.<n>`` of a vendor release this catalog holds; PatchError says what is wrong."""
    name, version = record["name"], record["version"]
    parsed = site_version(version)
    if parsed is None:
        raise PatchError(f"{name} {version} is recorded as a site release, but a site release's version is "
                         "<vendor version>+site.<n>; the catalog was changed by hand")
    vendor = repo.find_release(name, parsed[0])
    if vendor is None or vendor.get("origin") == SITE_ORIGIN:
        raise PatchError(f"{name} {version}: the vendor's release {parsed[0]} is not in this site repository; a "
                         "site release exists only on top of a vendor release")
    try:
        manifest = repo.manifest_of(record)
        rel_dir = os.path.join(repo.releases_dir, name, version)
        with open(os.path.join(rel_dir, "manifest.json"), "rb") as fh:
            manifest_bytes = fh.read(MAX_MANIFEST_SIZE + 1)
        with open(os.path.join(rel_dir, "manifest.sig"), "rb") as fh:
            signature = fh.read(64 * 1024)
        check_signature(manifest_bytes, signature, [site_key])
    except (OSError, RepoError, BundleError) as exc:
        raise PatchError(f"site release {name} {version} is refused: {exc}") from None
    desc = next((b for b in manifest["blobs"] if PATCH_USED_BY in b["usedBy"]), None)
    if desc is None:
        raise PatchError(f"site release {name} {version} carries no patch record")
    return _small_json(repo, desc["digest"], f"the patch record of {name} {version}")


def _same_patch(patch: Mapping[str, Any], base_version: str, component: str, files: Sequence[PatchFile],
                removed: Sequence[str], compress: bool) -> bool:
    return (patch.get("base", {}).get("version") == base_version and patch.get("component") == component
            and patch.get("files") == [f.record() for f in sorted(files, key=lambda f: f.path)]
            and patch.get("removed", []) == list(removed)
            and patch.get("layer", {}).get("compressed") == compress)


@dataclass
class PatchResult:
    changed: bool
    msg: str
    name: str
    version: str
    base: str
    component: str
    reference: str
    patch: Optional[Dict[str, Any]]
    manifest_digest: Optional[str] = None

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def make_patch(repo: SiteRepo, app: str, component: str, files: Sequence[Mapping[str, Any]], *,
               base_version: str, author: str, note: str, key_dir: str, compress: bool = True,
               remove: Sequence[str] = (), check_mode: bool = False, now: Optional[float] = None) -> PatchResult:
    """Record the site release of ``files`` added to ``component`` of ``app`` ``base_version``, and the paths in
    ``remove`` removed from it (module doc)."""
    for problem in (name_problem(app, "app name"), name_problem(component, "component name"),
                    version_problem(base_version, "base release"), _text_problem(author, "author"),
                    _text_problem(note, "note")):
        if problem:
            raise PatchError(problem)
    if not author.strip():
        raise PatchError("author must name who made the patch")
    if not files and not remove:
        raise PatchError("a patch needs at least one file ({src, path}: a local file and its path in the image) "
                         "or one path to remove")
    patch_files = check_files(files)
    removed = check_removed(remove, patch_files)
    what = _what(patch_files, removed)
    base_record = repo.find_release(app, base_version)
    if base_record is None:
        raise PatchError(f"{app} {base_version} is not in the site repository {repo.root}; name a release it "
                         "holds (the running one)")
    parsed = site_version(base_version)
    is_site_base = base_record.get("origin") == SITE_ORIGIN
    if (parsed is not None) != is_site_base:
        raise PatchError(f"{app} {base_version}: its version and its catalog record disagree on whether it is a "
                         "site release; the catalog was changed by hand")
    vendor_version = parsed[0] if parsed else base_version
    try:
        base = repo.release_manifest(app, base_version)
    except RepoError as exc:
        raise PatchError(str(exc)) from None
    if component not in base["images"]:
        raise PatchError(f"{app} {base_version} has no component {component!r} (components: "
                         f"{', '.join(sorted(base['images']))})")
    siblings = site_releases(repo, app)
    for rec in siblings:
        if (rec.get("patch") and site_version(rec["version"]) and site_version(rec["version"])[0] == vendor_version
                and _same_patch(rec["patch"], base_version, component, patch_files, removed, compress)):
            return PatchResult(False, f"{app} {rec['version']} is this very patch of {component} on {base_version};"
                               " nothing to do", app, rec["version"], base_version, component,
                               rec["patch"]["image"]["reference"], rec["patch"], rec["manifestDigest"])
    try:
        seed, _created = load_or_create_key(key_dir, create=not check_mode)
    except (HaveError, OSError) as exc:
        raise PatchError(f"site key: {exc}") from None
    n = 1 + max((site_version(r["version"])[1] for r in siblings
                 if site_version(r["version"]) and site_version(r["version"])[0] == vendor_version), default=0)
    version = f"{vendor_version}+site.{n}"
    reference = patched_reference(base["images"][component]["reference"], vendor_version, n)
    if seed is None:
        return PatchResult(True, f"{app} {version} would be recorded: {component} as {reference} with "
                           f"{what} (a site key would be made)", app, version, base_version,
                           component, reference, None)
    public = public_from_seed(seed)
    keyid = ed25519.public_key_id(public)
    vendor_signed = sorted(r["version"] for r in repo.catalog()["releases"]
                           if r.get("origin") != SITE_ORIGIN and r.get("keyid") == keyid)
    if vendor_signed:
        raise PatchError(f"the site key sha256:{keyid} signed vendor releases here ({', '.join(vendor_signed)}): "
                         "a site key never signs as the vendor; remove it from offline_delivery_vendor_keys")
    if check_mode:
        return PatchResult(True, f"{app} {version} would be recorded: {component} as {reference} with "
                           f"{what}", app, version, base_version, component, reference, None)
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now))
    stage_dir = os.path.join(repo.staging_dir, f"site-{app}-{os.getpid()}-{int(time.time() * 1000)}")
    os.makedirs(stage_dir, mode=0o700)
    try:
        result = _build_and_publish(repo, base, base_record, component, patch_files, removed, _Stage(stage_dir),
                                    version=version, vendor_version=vendor_version, reference=reference,
                                    author=author, note=note, at=at, compress=compress, seed=seed, keyid=keyid)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
    return result


def _what(files: Sequence[PatchFile], removed: Sequence[str]) -> str:
    """"2 files" or "1 file, 1 removed path": what a patch changes, for its messages."""
    parts = [f"{len(files)} file{'' if len(files) == 1 else 's'}"] if files or not removed else []
    if removed:
        parts.append(f"{len(removed)} removed path{'' if len(removed) == 1 else 's'}")
    return ", ".join(parts)


def _build_and_publish(repo: SiteRepo, base: Dict[str, Any], base_record: Mapping[str, Any], component: str,
                       files: Sequence[PatchFile], removed: Sequence[str], stage: _Stage, *, version: str,
                       vendor_version: str,
                       reference: str, author: str, note: str, at: str, compress: bool, seed: bytes,
                       keyid: str) -> PatchResult:
    app, base_version = base["name"], base["version"]
    layer = write_layer(files, stage.directory, mtime=int(time.time()), compress=compress, removed=removed)
    paths = ", ".join([f.path for f in sorted(files, key=lambda f: f.path)] + [f"-{p}" for p in removed])
    history = {"created": at, "created_by": f"offline.delivery patch {app} {version}: {paths}",
               "author": author, "comment": note or f"field fix of {component} on site"}
    image = patch_image(repo, base, component, layer, stage, history=history, reference=reference)
    model = _small_json(repo, base["model"]["digest"], f"the model of {app} {base_version}")
    model["version"] = version
    model["components"][component]["image"] = reference
    model_desc = stage.add(canonical_json(model), base["model"]["mediaType"], "model")
    earlier = []
    if base_record.get("origin") == SITE_ORIGIN:
        earlier = list(base_record["patch"].get("earlier", [])) + [
            {**{k: base_record["patch"][k] for k in ("version", "component", "files", "by", "at", "note")},
             "removed": base_record["patch"].get("removed", [])}]
    patch = {"mediaType": PATCH_MEDIA_TYPE, "app": app, "version": version, "vendorVersion": vendor_version,
             "base": {"version": base_version, "manifestDigest": base_record["manifestDigest"]},
             "component": component, "files": [f.record() for f in sorted(files, key=lambda f: f.path)],
             "removed": list(removed),
             "layer": {"digest": layer["digest"], "diffId": layer["diffId"], "size": layer["size"],
                       "compressed": layer["compressed"]},
             "image": {"reference": reference, "index": image["index"], "manifests": image["manifests"],
                       "baseIndex": base["images"][component]["index"]},
             "by": author, "at": at, "note": note, "earlier": earlier}
    stage.add(canonical_json(patch), PATCH_MEDIA_TYPE, PATCH_USED_BY)
    images = dict(base["images"], **{component: image})
    manifest = build_manifest(
        name=app, version=version, builder={"name": BUILDER_NAME, "version": COLLECTION_VERSION},
        platforms=list(base["platforms"]), model=model_desc, images=images,
        blobs=_release_blobs(base, component, images, stage), delta=None, packages=base.get("packages") or {},
        files=base.get("files") or None)
    manifest_bytes = canonical_json(manifest)
    signature = make_signature_doc(public_from_seed(seed), sign(seed, manifest_bytes))
    head = BundleHead(manifest, manifest_bytes, signature, sha256_digest(manifest_bytes), keyid)
    try:
        published: ImportResult = publish_site_release(repo, head, stage.directory, {"patch": patch},
                                                       made_by=author)
    except RepoError as exc:
        raise PatchError(str(exc)) from None
    return PatchResult(published.changed, f"{app} {version}: {component} as {reference} (layer "
                       f"{layer['digest']}, {_what(files, removed)} on {base_version}); {published.msg}", app, version,
                       base_version, component, reference, patch, published.manifest_digest)


def _release_blobs(base: Mapping[str, Any], component: str, images: Mapping[str, Any],
                   stage: _Stage) -> List[Dict[str, Any]]:
    """The base release's blobs that the site release still uses (not its model, SBOM or patch record, nor the
    component's old index, manifests and configs unless another component shares that image), every one in the
    store (``bundled``; how a bundle carried it, ``stored``, does not apply to a release made on site), then the
    new ones."""
    old = base["images"][component]
    dropped = {base["model"]["digest"]}
    if not any(img["index"] == old["index"] for name, img in images.items() if name != component):
        dropped |= {old["index"], *old["manifests"].values()}
        dropped |= stage.replaced
    blobs = [dict({k: v for k, v in b.items() if k != "stored"}, bundled=True) for b in base["blobs"]
             if b["digest"] not in dropped and b["digest"] not in stage.blobs
             and SBOM_USED_BY not in b["usedBy"] and PATCH_USED_BY not in b["usedBy"]]
    return blobs + [stage.blobs[d] for d in sorted(stage.blobs)]
