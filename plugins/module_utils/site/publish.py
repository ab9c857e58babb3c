# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Publish a release's images from the site repository into the site registry (module ``registry_publish``,
repo host).

:func:`plan_release` / :func:`publish_image` walk a release of the site repository: per component the OCI
index, its per-platform manifests, their configs and layers. Everything is read and checked locally first (a
blob missing from the repository fails before anything is pushed); then blobs go up (those the registry has
are skipped), each manifest by digest, and the index last, by tag. A tag that already resolves to the index
digest means the image is published: nothing is pushed.

Repository and tag come from the image reference of the model as written: ``shop/api:1.0.0`` becomes
repository ``shop/api``, tag ``1.0.0``. A registry host in the reference (``ghcr.io/x/y:1``) is dropped —
the site registry serves every image under its path, the way a registry mirror does. A reference with a
digest and no tag is pushed by the index digest only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..clients.registry import MAX_MANIFEST_BYTES, RegistryClient, RegistryError
from ..common.digests import ContentError, json_object
from ..common.oci import INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX_MEDIA_TYPE, OciError, check_descriptor, split_reference
from .repo import RepoError, SiteRepo


@dataclass
class BlobPlan:
    digest: str
    size: int
    path: str
    role: str  # "config" or "layer", for messages


@dataclass
class ManifestPlan:
    digest: str
    media_type: str
    data: bytes
    platform: str
    blobs: list[BlobPlan]


@dataclass
class ImagePlan:
    release: str
    component: str
    reference: str
    repository: str
    tag: str | None
    index_digest: str
    index_media_type: str
    index_data: bytes
    manifests: list[ManifestPlan]

    @property
    def target(self) -> str:
        return f"{self.repository}:{self.tag}" if self.tag else f"{self.repository}@{self.index_digest}"


@dataclass
class ImageResult:
    release: str
    component: str
    reference: str
    repository: str
    tag: str | None
    index: str
    changed: bool
    msg: str
    blobs_pushed: int = 0
    blobs_mounted: int = 0
    blobs_present: int = 0
    manifests_pushed: int = 0
    index_pushed: bool = False
    bytes_pushed: int = 0
    pushed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _read_checked(repo: SiteRepo, digest: str, where: str) -> bytes:
    """A small JSON blob (index or manifest) from the repository, proven to have its digest."""
    try:
        return repo.read_blob(digest, limit=MAX_MANIFEST_BYTES, where=where)
    except RepoError as exc:
        raise RegistryError(f"{exc} (nothing was pushed)") from None


def _json_doc(data: bytes, digest: str, where: str) -> dict[str, Any]:
    try:
        return json_object(data, f"{where}: blob {digest}")
    except ContentError as exc:
        raise RegistryError(str(exc)) from None


def _descriptor(desc: object, where: str) -> tuple[str, int, str]:
    try:
        return check_descriptor(desc, where)
    except OciError as exc:
        raise RegistryError(str(exc)) from None


def _plan_blob(repo: SiteRepo, desc: object, role: str, where: str) -> BlobPlan:
    digest, size, _media_type = _descriptor(desc, f"{where} {role}")
    if not repo.has_blob(digest, size):
        path = repo.blob_file(digest)
        state = "is missing" if not os.path.exists(path) else f"has {os.path.getsize(path)} bytes, not {size}"
        raise RegistryError(f"{where}: {role} blob {digest} {state} in the site repository ({path}); "
                            "import the release again to restore it (nothing was pushed)")
    return BlobPlan(digest, size, repo.blob_file(digest), role)


def _plan_manifest(repo: SiteRepo, desc: object, where: str) -> ManifestPlan:
    digest, _size, media_type = _descriptor(desc, where)
    platform_doc = desc.get("platform") if isinstance(desc, dict) else None
    platform = "/".join(str(platform_doc.get(k)) for k in ("os", "architecture", "variant")
                        if platform_doc.get(k)) if isinstance(platform_doc, dict) else "?"
    where = f"{where} manifest {platform}"
    if media_type not in MANIFEST_TYPES:
        raise RegistryError(f"{where}: {digest} has media type {media_type!r}; only image manifests "
                            f"({', '.join(MANIFEST_TYPES)}) can be listed in an image's index")
    data = _read_checked(repo, digest, where)
    doc = _json_doc(data, digest, where)
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise RegistryError(f"{where}: manifest {digest} has no layers list")
    blobs = [_plan_blob(repo, doc.get("config"), "config", where)]
    blobs += [_plan_blob(repo, layer, "layer", where) for layer in layers]
    return ManifestPlan(digest, media_type, data, platform, blobs)


def plan_image(repo: SiteRepo, release: str, component: str, image: dict[str, Any],
               blob_types: dict[str, str]) -> ImagePlan:
    """Read and check everything one component image needs from the repository (no network)."""
    where = f"release {release} component {component}"
    reference = image["reference"]
    try:
        repository, tag, _digest = split_reference(reference)
    except OciError as exc:
        raise RegistryError(f"{where}: {exc}") from None
    index_digest = image["index"]
    index_data = _read_checked(repo, index_digest, f"{where} index")
    index = _json_doc(index_data, index_digest, f"{where} index")
    media_type = index.get("mediaType") or blob_types.get(index_digest) or OCI_INDEX_MEDIA_TYPE
    if media_type not in INDEX_TYPES or not isinstance(index.get("manifests"), list):
        raise RegistryError(f"{where}: index {index_digest} is not an image index (media type {media_type!r})")
    manifests = [_plan_manifest(repo, desc, where) for desc in index["manifests"]]
    listed = {m.digest for m in manifests}
    expected = set(image["manifests"].values())
    if not expected <= listed:
        raise RegistryError(f"{where}: index {index_digest} does not list the release's manifests "
                            f"{sorted(expected - listed)}; the release record is inconsistent")
    return ImagePlan(release, component, reference, repository, tag, index_digest, media_type, index_data,
                     manifests)


def plan_release(repo: SiteRepo, name: str, version: str) -> list[ImagePlan]:
    """Every component image of an imported release, checked against the repository's blobs."""
    try:
        manifest = repo.release_manifest(name, version)
    except RepoError as exc:
        raise RegistryError(str(exc)) from None
    blob_types = {b["digest"]: b["mediaType"] for b in manifest.get("blobs", [])}
    return [plan_image(repo, f"{name}:{version}", comp, manifest["images"][comp], blob_types)
            for comp in sorted(manifest.get("images", {}))]


def check_tag_conflicts(plans: list[ImagePlan]) -> None:
    """Two images of the selected releases may share a tag only with the same index."""
    seen: dict[str, ImagePlan] = {}
    for plan in plans:
        if plan.tag is None:
            continue
        other = seen.setdefault(plan.target, plan)
        if other.index_digest != plan.index_digest:
            raise RegistryError(
                f"{plan.target} is {other.index_digest} in release {other.release} (component "
                f"{other.component}) but {plan.index_digest} in release {plan.release} (component "
                f"{plan.component}); one tag cannot name both: publish one of the releases (option releases), "
                "and have the vendor give changed images a new tag")


def publish_image(client: RegistryClient, plan: ImagePlan, *, check_mode: bool = False,
                  mount_sources: dict[str, str] | None = None) -> ImageResult:
    """Push one image unless its tag already resolves to its index. ``mount_sources`` (digest ->
    repository) remembers where blobs went, so another repository gets them by a cross-repository mount."""
    mount_sources = mount_sources if mount_sources is not None else {}
    res = ImageResult(plan.release, plan.component, plan.reference, plan.repository, plan.tag,
                      plan.index_digest, changed=False, msg="")
    current = client.manifest_digest(plan.repository, plan.tag or plan.index_digest)
    if current == plan.index_digest:
        for m in plan.manifests:
            for b in m.blobs:
                mount_sources.setdefault(b.digest, plan.repository)
        res.msg = f"{plan.target} is already {plan.index_digest}"
        return res
    res.changed = True
    handled: set[str] = set()  # a layer shared by two platforms is pushed (or counted) once
    for manifest in plan.manifests:
        for blob in manifest.blobs:
            if blob.digest not in handled:
                handled.add(blob.digest)
                _push_blob(client, plan.repository, blob, res, check_mode, mount_sources)
        if client.manifest_digest(plan.repository, manifest.digest) != manifest.digest:
            if not check_mode:
                client.put_manifest(plan.repository, manifest.digest, manifest.data, manifest.media_type)
            res.manifests_pushed += 1
            res.pushed.append(f"manifest {manifest.digest} ({manifest.platform})")
    if not check_mode:
        client.put_manifest(plan.repository, plan.tag or plan.index_digest, plan.index_data,
                            plan.index_media_type)
    res.index_pushed = True
    res.pushed.append(f"index {plan.index_digest}")
    verb = "would push" if check_mode else "pushed"
    was = f" (was {current})" if current else ""
    res.msg = (f"{plan.target}{was}: {verb} {res.blobs_pushed} blobs ({res.bytes_pushed} bytes), "
               f"{res.blobs_mounted} mounted, {res.blobs_present} present, {res.manifests_pushed} manifests "
               f"and the index {plan.index_digest}")
    return res


def _push_blob(client: RegistryClient, repository: str, blob: BlobPlan, res: ImageResult, check_mode: bool,
               mount_sources: dict[str, str]) -> None:
    if client.blob_exists(repository, blob.digest):
        res.blobs_present += 1
        mount_sources.setdefault(blob.digest, repository)
        return
    source = mount_sources.get(blob.digest)
    location = None
    if source and source != repository:
        if check_mode:
            res.blobs_mounted += 1
            return
        location = client.mount_blob(repository, blob.digest, source)
        if location is None:
            res.blobs_mounted += 1
            res.pushed.append(f"blob {blob.digest}")
            return
    if not check_mode:
        client.upload_blob(repository, blob.digest, blob.path, blob.size, location=location)
    mount_sources.setdefault(blob.digest, repository)
    res.blobs_pushed += 1
    res.bytes_pushed += blob.size
    res.pushed.append(f"blob {blob.digest}")


def publish_releases(repo: SiteRepo, client: RegistryClient, releases: list[tuple[str, str]] | None, *,
                     check_mode: bool = False) -> list[ImageResult]:
    """Publish every image of ``releases`` (default: every release in the catalog). Everything is planned
    and checked locally before the first request, so a damaged repository pushes nothing."""
    if releases is None:
        releases = [(r["name"], r["version"]) for r in repo.catalog()["releases"]]
    plans = [plan for name, version in releases for plan in plan_release(repo, name, version)]
    check_tag_conflicts(plans)
    if not plans:
        return []
    client.ping()
    mount_sources: dict[str, str] = {}
    done: dict[str, ImageResult] = {}
    results = []
    for plan in plans:
        key = f"{plan.target}@{plan.index_digest}"
        if key in done:  # the same image in two releases: pushed once
            first = done[key]
            results.append(ImageResult(plan.release, plan.component, plan.reference, plan.repository, plan.tag,
                                       plan.index_digest, changed=False,
                                       msg=f"{plan.target}: same image as release {first.release} "
                                           f"component {first.component}"))
            continue
        done[key] = publish_image(client, plan, check_mode=check_mode, mount_sources=mount_sources)
        results.append(done[key])
    return results


def parse_release(text: str) -> tuple[str, str]:
    """``name:version`` -> ``(name, version)``."""
    name, sep, version = text.partition(":")
    if not sep or not name or not version:
        raise RegistryError(f"release {text!r}: write it as name:version (e.g. shop:1.0.0)")
    return name, version
