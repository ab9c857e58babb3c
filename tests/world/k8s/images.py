"""Images the cluster needs before any registry is involved: the pod sandbox (pause) and CoreDNS.

Each is one static Go binary in a one-layer image, written as a docker-archive with the project's own image
helpers (tests/helpers/images.py) and imported straight into the node's containerd (`ctr images import`),
so the node never pulls them. Named under `od-world.local/`, a name no registry answers to.
"""
from __future__ import annotations

import os
from pathlib import Path

from tests.helpers.images import TestImage, tar_bytes, write_docker_archive

from .build import coredns_build, ensure_go_build, kubernetes_build
from .config import PAUSE_IMAGE

COREDNS_REPO = "od-world.local/coredns"


def coredns_image() -> str:
    return f"{COREDNS_REPO}:{coredns_build().version.lstrip('v')}"


def _one_binary_image(ref: str, binary: Path, out: Path) -> Path:
    """A docker-archive at `out` holding `binary` as /<name>, its command."""
    if out.exists():
        return out
    layer = tar_bytes({binary.name: binary.read_bytes()}, mode=0o755, dirs=False)
    image = TestImage(ref, "amd64", [layer], cmd=[f"/{binary.name}"])
    tmp = out.with_suffix(".tmp")
    write_docker_archive(tmp, [image])
    os.replace(tmp, out)
    return out


def ensure_image_archives() -> dict[str, Path]:
    """{image ref: docker-archive path} for pause and CoreDNS, built (and cached next to the binaries)."""
    kube = ensure_go_build(kubernetes_build())
    dns = ensure_go_build(coredns_build())
    return {
        PAUSE_IMAGE: _one_binary_image(PAUSE_IMAGE, kube / "pause", kube / "pause-image.tar"),
        coredns_image(): _one_binary_image(coredns_image(), dns / "coredns", dns / "coredns-image.tar"),
    }
