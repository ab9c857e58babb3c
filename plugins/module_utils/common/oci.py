# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""OCI (and Docker v2) vocabulary every layer shares: media types, the image-reference grammar and its
parts, and the check of a content descriptor. No I/O."""

from __future__ import annotations

import re
from typing import Any

from .digests import is_digest

OCI_INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX_MEDIA_TYPE, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (OCI_MANIFEST_MEDIA_TYPE, DOCKER_MANIFEST)
OCI_CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# Docker reference grammar (github.com/distribution/reference, regexp.go).
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = _ALNUM + r"(?:" + _SEPARATOR + _ALNUM + r")*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = _DOMAIN_COMPONENT + r"(?:\." + _DOMAIN_COMPONENT + r")*"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN = r"(?:" + _DOMAIN_NAME + r"|" + _IPV6 + r")(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
IMAGE_RE = re.compile(
    r"^(?:(?P<domain>" + _DOMAIN + r")/)?(?P<path>" + _PATH_COMPONENT + r"(?:/" + _PATH_COMPONENT + r")*)"
    r"(?::(?P<tag>" + _TAG + r"))?(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?\Z"
)
_PATH_RE = re.compile(r"^" + _PATH_COMPONENT + r"(?:/" + _PATH_COMPONENT + r")*\Z")
IMAGE_NAME_MAX = 255


class OciError(ValueError):
    """An image reference or a descriptor is malformed; the message quotes it and says what is expected."""


def _parts(ref: str) -> tuple[str | None, str, str | None, str | None] | None:
    """``(registry, path, tag, digest)``, or None when ``ref`` is not a reference. Docker's rule decides the
    registry: the first component is one only with a dot or a port, or as localhost."""
    match = IMAGE_RE.match(ref) if isinstance(ref, str) else None
    if not match:
        return None
    domain, path = match.group("domain"), match.group("path")
    if domain and not ("." in domain or ":" in domain or domain == "localhost"):
        domain, path = None, domain + "/" + path
    if not _PATH_RE.match(path):
        return None
    return domain, path, match.group("tag"), match.group("digest")


def reference_problem(ref: str) -> str | None:
    """None when ``ref`` is a valid reference with a tag or a sha256 digest, else what is wrong."""
    parts = _parts(ref)
    if parts is None:
        return ("invalid image reference %r: expected [registry[:port]/]path[:tag][@sha256:<64 hex>] with a "
                "lowercase path" % (ref,))
    domain, path, tag, digest = parts
    name_len = len(path) + (len(domain) + 1 if domain else 0)
    if name_len > IMAGE_NAME_MAX:
        return "image name in %r is longer than %d characters" % (ref[:60] + "...", IMAGE_NAME_MAX)
    if digest is not None and not is_digest(digest):
        return "image digest %r must be sha256:<64 lowercase hex digits>" % digest
    if tag is None and digest is None:
        return ("image reference %r has no tag or digest: add one (e.g. %s:1.0.0 or @sha256:<64 hex>); an "
                "implicit ':latest' cannot be reproduced" % (ref, ref))
    return None


def split_reference(reference: str) -> tuple[str, str | None, str | None]:
    """``(repository, tag, digest)`` of an image reference; the registry host, if any, is dropped (the site
    registry serves every image under its path, the way a mirror does).

    ``shop/api:1.0.0`` -> ``("shop/api", "1.0.0", None)``; ``x/y@sha256:..`` -> ``("x/y", None, "sha256:..")``.
    """
    problem = reference_problem(reference)
    if problem:
        raise OciError(problem)
    _domain, path, tag, digest = _parts(reference)  # type: ignore[misc]  # valid: reference_problem said so
    return path, tag, digest


def site_reference(reference: str) -> str:
    """``registry.example:5000/shop/api:1`` -> ``shop/api:1``: the reference the site registry holds."""
    repository, tag, _digest = split_reference(reference)
    return repository + (":" + tag if tag else "")


def check_descriptor(desc: object, where: str) -> tuple[str, int, str]:
    """``(digest, size, mediaType)`` of an OCI content descriptor, or OciError naming ``where`` and the field."""
    if not isinstance(desc, dict):
        raise OciError(f"{where}: must be an object, not {_short(desc)}")
    if not is_digest(desc.get("digest")):
        raise OciError(f"{where}.digest: must be 'sha256:<64 hex>', not {_short(desc.get('digest'))}")
    size = desc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise OciError(f"{where}.size: must be a non-negative integer, not {_short(size)}")
    if not isinstance(desc.get("mediaType"), str) or not desc["mediaType"]:
        raise OciError(f"{where}.mediaType: must be a non-empty string, not {_short(desc.get('mediaType'))}")
    return desc["digest"], size, desc["mediaType"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."
