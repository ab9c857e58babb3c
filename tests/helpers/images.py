"""Write real container image artifacts from small generated root filesystems.

Nothing here is a mock: the layer tars are real tar files, the configs real image configs, and the outputs
are what ``docker save`` (20.10 layout) and an OCI image layout (``skopeo copy ... oci:``) look like, so the
code under test parses the same structures it meets in the field. Everything is deterministic (fixed mtimes,
sorted members) so two calls give identical digests.

Typical use::

    base = rootfs_layer({"etc/os-release": b"ID=test\\n"}, arch="amd64")
    img = TestImage("shop/api:1.0.0", "amd64", [base, rootfs_layer({"app/main.py": b"print(1)\\n"})])
    write_docker_archive(tmp / "api.tar", [img])
    write_oci_layout(tmp / "oci", [img, img.for_arch("arm64")])
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_ANNOTATION = "org.opencontainers.image.ref.name"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def tar_bytes(files: dict[str, bytes], *, mode: int = 0o644, dirs: bool = True) -> bytes:
    """A deterministic tar of ``files`` (path -> content), parent directories included."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        written: set[str] = set()
        for path in sorted(files):
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if dirs and d not in written:
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                    tar.addfile(info)
                    written.add(d)
            info = tarfile.TarInfo(path.strip("/"))
            info.size, info.mode, info.mtime = len(files[path]), mode, 0
            tar.addfile(info, io.BytesIO(files[path]))
    return buf.getvalue()


def rootfs_layer(files: dict[str, bytes] | None = None, *, arch: str = "amd64", size: int = 0) -> bytes:
    """A small root-filesystem layer: a few files plus ``size`` bytes of seeded pseudo-random filler
    (so layers can be made big enough to exercise streaming and splitting)."""
    content = {"etc/os-release": b"ID=testos\nVERSION_ID=1\n", "etc/arch": arch.encode() + b"\n"}
    content.update(files or {})
    if size:
        content["var/filler.bin"] = pseudo_random(size, seed=f"{arch}:{sorted(content)}")
    return tar_bytes(content)


def pseudo_random(size: int, seed: str) -> bytes:
    """Deterministic incompressible bytes (sha256 in counter mode)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


@dataclass
class TestImage:
    """One single-platform image: reference, platform and uncompressed layer tars."""

    __test__ = False  # not a pytest test class

    ref: str
    arch: str
    layers: list[bytes]
    os: str = "linux"
    variant: str | None = None
    cmd: list[str] = field(default_factory=lambda: ["/bin/sh"])
    # What an OCI index says about this image's platform (None: the truth). Lets tests write a liar.
    index_arch: str | None = None

    def for_arch(self, arch: str, layers: list[bytes] | None = None) -> "TestImage":
        variant = "v8" if arch == "arm64" else None
        return replace(self, arch=arch, variant=variant, layers=list(layers if layers is not None else self.layers))

    @property
    def platform(self) -> str:
        return f"{self.os}/{self.arch}" + (f"/{self.variant}" if self.variant and self.arch != "arm64" else "")

    @property
    def diff_ids(self) -> list[str]:
        return [sha256(layer) for layer in self.layers]

    def config_bytes(self) -> bytes:
        config: dict[str, object] = {
            "architecture": self.arch,
            "os": self.os,
            "config": {"Cmd": self.cmd, "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                       "Labels": {"test.ref": self.ref}},
            "rootfs": {"type": "layers", "diff_ids": self.diff_ids},
            "history": [{"created_by": f"test layer {i}"} for i in range(len(self.layers))],
        }
        if self.variant:
            config["variant"] = self.variant
        return _json(config)

    @property
    def config_digest(self) -> str:
        return sha256(self.config_bytes())

    def platform_dict(self, arch: str | None = None) -> dict[str, str]:
        p = {"architecture": arch or self.arch, "os": self.os}
        if self.variant and (arch or self.arch) == self.arch:
            p["variant"] = self.variant
        return p


# ----------------------------------------------------------------------------------------------------------
# docker save (Docker 20.10 layout)


def write_docker_archive(path: Path, images: Iterable[TestImage], *, symlink_duplicate_layers: bool = True,
                         gzip_layers: bool = False) -> Path:
    """Write a ``docker save`` archive (``<id>/layer.tar``, ``<config hex>.json``, ``manifest.json``,
    ``repositories``). Like dockerd, a layer whose content was already written under another id becomes a
    symlink to the first copy. ``gzip_layers`` writes compressed layers (older/other tools do)."""
    files: dict[str, bytes] = {}
    links: dict[str, str] = {}
    manifest: list[dict[str, object]] = []
    repositories: dict[str, dict[str, str]] = {}
    first_copy: dict[str, str] = {}
    for image in images:
        layer_paths = []
        parent = ""
        for layer, diff_id in zip(image.layers, image.diff_ids):
            layer_id = hashlib.sha256(f"{parent}\n{diff_id}\n{image.config_digest}".encode()).hexdigest()
            parent = layer_id
            path_in = f"{layer_id}/layer.tar"
            files[f"{layer_id}/VERSION"] = b"1.0"
            files[f"{layer_id}/json"] = _json({"id": layer_id, "os": image.os})
            if diff_id in first_copy and symlink_duplicate_layers:
                links[path_in] = f"../{first_copy[diff_id]}"
            else:
                files[path_in] = gzip.compress(layer, mtime=0) if gzip_layers else layer
                first_copy.setdefault(diff_id, path_in)
            layer_paths.append(path_in)
        config_name = image.config_digest.split(":")[1] + ".json"
        files[config_name] = image.config_bytes()
        manifest.append({"Config": config_name, "RepoTags": [image.ref], "Layers": layer_paths})
        repo, tag = image.ref.rsplit(":", 1)
        repositories.setdefault(repo, {})[tag] = parent
    files["manifest.json"] = _json(manifest)
    files["repositories"] = _json(repositories)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(set(files) | set(links)):
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if name in links:
                info.type, info.linkname = tarfile.SYMTYPE, links[name]
                tar.addfile(info)
            else:
                info.size = len(files[name])
                tar.addfile(info, io.BytesIO(files[name]))
    return path


# ----------------------------------------------------------------------------------------------------------
# OCI image layout


class _Layout:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))

    def put(self, data: bytes) -> tuple[str, int]:
        digest = sha256(data)
        target = self.root / "blobs" / "sha256" / digest.split(":")[1]
        if not target.exists():
            target.write_bytes(data)
        return digest, len(data)


def oci_manifest_bytes(image: TestImage, layout: "_Layout | None" = None, *, gzip_layers: bool = False) -> bytes:
    layers = []
    for layer in image.layers:
        data = gzip.compress(layer, mtime=0) if gzip_layers else layer
        digest, size = layout.put(data) if layout else (sha256(data), len(data))
        layers.append({"mediaType": OCI_LAYER_GZIP if gzip_layers else OCI_LAYER, "digest": digest, "size": size})
    config = image.config_bytes()
    cdigest, csize = layout.put(config) if layout else (sha256(config), len(config))
    return _json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                  "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": csize}, "layers": layers})


def write_oci_layout(root: Path, images: Iterable[TestImage], *, gzip_layers: bool = False,
                     nested: bool = True) -> Path:
    """Write an OCI image layout. With ``nested`` (the default), each reference gets one image index listing
    its per-platform manifests, referenced from ``index.json`` with the ``ref.name`` annotation (what a
    multi-platform ``skopeo copy --all`` or buildx ``--output type=oci`` writes). Without it, each image's
    manifest is listed directly in ``index.json`` with its platform and annotation."""
    layout = _Layout(root)
    by_ref: dict[str, list[TestImage]] = {}
    for image in images:
        by_ref.setdefault(image.ref, []).append(image)
    top: list[dict[str, object]] = []
    for ref in sorted(by_ref):
        entries = []
        for image in by_ref[ref]:
            manifest = oci_manifest_bytes(image, layout, gzip_layers=gzip_layers)
            digest, size = layout.put(manifest)
            entries.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                            "platform": image.platform_dict(image.index_arch)})
        if nested:
            index = _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
            digest, size = layout.put(index)
            top.append({"mediaType": OCI_INDEX, "digest": digest, "size": size, "annotations": {REF_ANNOTATION: ref}})
        else:
            top.extend({**e, "annotations": {REF_ANNOTATION: ref}} for e in entries)
    (root / "index.json").write_bytes(_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": top}))
    return root


# ----------------------------------------------------------------------------------------------------------
# A ready-made set: two apps sharing a base layer, for amd64 and arm64


@dataclass
class SampleImages:
    """Images of a small two-component app, both platforms, with shared base layers."""

    api: dict[str, TestImage]
    web: dict[str, TestImage]
    base: dict[str, bytes]

    def all(self) -> list[TestImage]:
        return [*self.api.values(), *self.web.values()]


def sample_images(api_tag: str = "1.0.0", *, api_payload: bytes = b"v1", filler: int = 0,
                  web_tag: str = "1.0.0") -> SampleImages:
    """``test/api:<api_tag>`` and ``test/web:<web_tag>`` for amd64 and arm64. Both images of one arch share
    that arch's base layer; the api's top layer depends only on ``api_payload`` (same on both arches, so it
    is shared across platforms too)."""
    base = {arch: rootfs_layer({"bin/busybox": f"busybox-{arch}".encode()}, arch=arch, size=filler)
            for arch in ("amd64", "arm64")}
    api_layer = tar_bytes({"app/api.py": b"print(" + api_payload + b")\n"})
    web_layer = tar_bytes({"srv/www/index.html": b"<h1>hello</h1>\n"})
    api = {arch: TestImage(f"test/api:{api_tag}", arch, [base[arch], api_layer],
                           variant="v8" if arch == "arm64" else None, cmd=["/app/api.py"])
           for arch in ("amd64", "arm64")}
    web = {arch: TestImage(f"test/web:{web_tag}", arch, [base[arch], web_layer],
                           variant="v8" if arch == "arm64" else None, cmd=["/bin/httpd"])
           for arch in ("amd64", "arm64")}
    return SampleImages(api=api, web=web, base=base)


def sample_model(version: str = "1.0.0", *, api_tag: str = "1.0.0", web_tag: str = "1.0.0",
                 name: str = "demo", extra_env: dict[str, str] | None = None) -> dict[str, object]:
    """An app.yml (as a dict) using the sample images."""
    env = {"GREETING": "hello"}
    env.update(extra_env or {})
    return {
        "apiVersion": "offline.delivery/v1",
        "kind": "Application",
        "name": name,
        "version": version,
        "components": {
            "api": {"image": f"test/api:{api_tag}", "ports": [{"name": "http", "port": 8000}], "env": env},
            "web": {"image": f"test/web:{web_tag}", "ports": [{"name": "http", "port": 8080}],
                    "depends_on": {"api": {"condition": "started"}}},
        },
    }


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()



# ----------------------------------------------------------------------------------------------------------
# Big layers, streamed to disk (for memory-bound tests: the test process never holds them either)


def write_big_layer(path: Path, size: int, *, member: str = "data/big.bin") -> tuple[str, int]:
    """A layer tar holding one file of ``size`` random bytes, written in 1 MiB chunks. Returns its
    (digest, size)."""
    import os

    class _Random(io.RawIOBase):
        def __init__(self, left: int) -> None:
            self.left = left

        def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
            n = min(len(buf), self.left, 1 << 20)
            buf[:n] = os.urandom(n)
            self.left -= n
            return n

        def readable(self) -> bool:
            return True

    with open(path, "wb") as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(member)
            info.size, info.mtime = size, 0
            tar.addfile(info, io.BufferedReader(_Random(size), 1 << 20))
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest(), path.stat().st_size


def write_oci_layout_with_layer_files(root: Path, ref: str, arch: str, layer_files: list[Path]) -> Path:
    """An OCI layout with one single-platform image whose layers are existing tar files (moved into
    ``blobs/``), so big images never pass through memory."""
    layout = _Layout(root)
    layers = []
    for layer in layer_files:
        h = hashlib.sha256()
        with open(layer, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        digest = "sha256:" + h.hexdigest()
        size = layer.stat().st_size
        layer.rename(root / "blobs" / "sha256" / digest.split(":")[1])
        layers.append({"mediaType": OCI_LAYER, "digest": digest, "size": size})
    config = _json({"architecture": arch, "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                    "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]}})
    cdigest, csize = layout.put(config)
    manifest = _json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                      "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": csize}, "layers": layers})
    mdigest, msize = layout.put(manifest)
    (root / "index.json").write_bytes(_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": mdigest, "size": msize, "platform": {"architecture": arch, "os": "linux"},
         "annotations": {REF_ANNOTATION: ref}}]}))
    return root
