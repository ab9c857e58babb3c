"""Images, models and bundles of the lifecycle benchmark's synthetic app, built locally and cached.

Each image is four layers, so layers are really shared as in a real app:

1. Debian 12 minbase            -- the shop's base layer (tests/world/shop_images.py), shared by all;
2. python3 (+ two libraries)    -- the shop API's packages layer, shared by all;
3. base k (k = 0, 1, 2)         -- /opt/odlc/server.py (the health server) and a base-specific library
                                   file of 2, 4 or 6 MB: the 3 base images;
4. component (top)              -- /opt/odlc/component.json and a 256 KiB asset, seeded by name + version.

Layers 1-2 come from the shop's cache (built from Debian packages once; nothing is downloaded when it is
warm); 3-4 are written here deterministically (fixed mtime, numeric ids, sorted members), so the same
inputs always give the same digests. Cached under ${OD_CACHE}/bench/lifecycle/<key>/ with the two app
models and the signed bundles (1.0.0 full with the Debian 12 packages the runtime playbook installs, 1.1.0
a delta against it).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from bench.lifecycle_app import APP, BASES, SERVER, V1, V2, Component, app_model, changed_component, components
from offline_delivery_core.app.model import load_model
from tests.world import shop_images
from tests.world.util import cache_dir, file_lock, repo_root

# Bump when the layout of the images changes in a way the key below does not capture.
REVISION = "1"
MTIME = shop_images.SOURCE_DATE_EPOCH
OCI_LAYER, OCI_CONFIG = shop_images.OCI_LAYER, shop_images.OCI_CONFIG
OCI_MANIFEST, OCI_INDEX, REF_ANNOTATION = shop_images.OCI_MANIFEST, shop_images.OCI_INDEX, shop_images.REF_ANNOTATION
ARCH = "amd64"
BASE_LIB_MB = (2, 4, 6)
ASSET_BYTES = 256 * 1024
BUILD_TIMEOUT = 1800
PYTHON_RECIPE = "shop/api:1.0.0"  # its packages layer: python3, python3-psycopg2, python3-redis


class MediaError(RuntimeError):
    """Building the images or bundles failed; the message names the step and what to do."""


@dataclass(frozen=True)
class Media:
    root: Path                 # the cache entry
    oci: Path                  # OCI layout with every image of both releases
    models: dict[str, Path]    # version -> app.yml
    bundles: dict[str, Path]   # name -> file or directory to carry (odlc-1.0.0/, odlc-1.1.0/, vendor.pub)
    layers: dict[str, int]     # digest -> size of every layer of 1.0.0
    changed: str               # the component 1.1.0 changes
    built: bool                # False when everything came from the cache


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: list[tuple[str, bytes, int]]) -> bytes:
    """A deterministic layer: the files (path, data, mode) and their parent directories, sorted."""
    members: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
    for path, data, mode in files:
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            name = "/".join(parts[:depth])
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            members.setdefault(name, (info, None))
        info = tarfile.TarInfo("/".join(parts))
        info.size, info.mode = len(data), mode
        members[info.name] = (info, data)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(members, key=os.fsencode):
            info, data = members[name]
            info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 0, 0, "", ""
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def base_layer(k: int) -> bytes:
    lib = random.Random(f"odlc-base-{k}").randbytes(BASE_LIB_MB[k % len(BASE_LIB_MB)] * 1024 * 1024)
    return layer_tar([("opt/odlc/server.py", SERVER.encode(), 0o644),
                      ("opt/odlc/base.json", _canonical({"base": k}), 0o644),
                      (f"opt/odlc/lib/base{k}.bin", lib, 0o644)])


def top_layer(comp: Component, version: str) -> bytes:
    conf = {"name": comp.name, "version": version, "port": comp.port, "base": comp.base}
    asset = random.Random(f"odlc-{comp.name}-{version}").randbytes(ASSET_BYTES)
    return layer_tar([("opt/odlc/component.json", _canonical(conf), 0o644),
                      (f"opt/odlc/assets/{comp.name}.bin", asset, 0o644)])


def image_config(comp: Component, ref: str, diff_ids: list[str]) -> dict:
    return {
        "architecture": ARCH, "os": "linux", "created": shop_images.CREATED,
        "config": {"Entrypoint": ["/usr/bin/python3", "/opt/odlc/server.py"],
                   "Env": [shop_images.PATH_ENV, "PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1"],
                   "WorkingDir": "/opt/odlc", "User": "65534:65534",
                   "ExposedPorts": {f"{comp.port}/tcp": {}},
                   "Labels": {"org.opencontainers.image.title": ref}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": shop_images.CREATED, "created_by": what}
                    for what in ("debian 12 minbase", "python3", f"odlc base {comp.base}", f"odlc {comp.name}")],
    }


class Layout:
    """An OCI layout being written: blobs by digest, shared layers hard-linked from the shop's cache."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True)
        (root / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": "1.0.0"}))
        self.sizes: dict[str, int] = {}

    def put(self, data: bytes) -> dict:
        digest = _digest(data)
        target = self.blobs / digest.split(":", 1)[1]
        if not target.exists():
            target.write_bytes(data)
        self.sizes[digest] = len(data)
        return {"digest": digest, "size": len(data)}

    def link(self, digest: str, src: Path) -> dict:
        target = self.blobs / digest.split(":", 1)[1]
        if not target.exists():
            try:
                os.link(src, target)
            except OSError:
                shutil.copyfile(src, target)
        self.sizes[digest] = target.stat().st_size
        return {"digest": digest, "size": self.sizes[digest]}


def _shared_layers() -> list[tuple[str, Path]]:
    """The minbase and python3 layers from the shop's cache (built there if missing: needs root)."""
    if os.geteuid() != 0:
        raise MediaError("the images reuse the shop's Debian layers (mmdebstrap, chroot): run as root")
    recipe = next((r for r in shop_images.RECIPES if r.ref == PYTHON_RECIPE), None)
    if recipe is None:
        raise MediaError(f"tests/world/shop_images.py has no recipe {PYTHON_RECIPE} any more: pick another "
                         "recipe with python3 for PYTHON_RECIPE in bench/lifecycle_images.py")
    sources = shop_images.debian_sources()
    with file_lock(shop_images.cache_root() / ".lock", timeout=BUILD_TIMEOUT):
        digests = [shop_images.base_layer(ARCH, sources), shop_images.packages_layer(ARCH, sources, recipe)]
    return [(d, shop_images.blob_dir() / d.split(":", 1)[1]) for d in digests]


def write_images(oci: Path, count: int, shared: list[tuple[str, Path]]) -> None:
    """Every image of 1.0.0 and 1.1.0 into the OCI layout ``oci``."""
    layout = Layout(oci)
    comps = components(count)
    changed = changed_component(comps)
    common = [layout.link(d, p) for d, p in shared]
    bases = [layout.put(base_layer(k)) for k in range(BASES)]
    entries = []
    for comp in comps:
        for version in (V1, V2) if comp.name == changed.name else (V1,):
            layers = [*common, bases[comp.base], layout.put(top_layer(comp, version))]
            ref = comp.ref(version)
            config = layout.put(_canonical(image_config(comp, ref, [l["digest"] for l in layers])))
            manifest = layout.put(_canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                              "config": {"mediaType": OCI_CONFIG, **config},
                                              "layers": [{"mediaType": OCI_LAYER, **l} for l in layers]}))
            index = layout.put(_canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
                {"mediaType": OCI_MANIFEST, **manifest, "platform": {"architecture": ARCH, "os": "linux"}}]}))
            entries.append({"mediaType": OCI_INDEX, **index, "annotations": {REF_ANNOTATION: ref}})
    entries.sort(key=lambda e: e["annotations"][REF_ANNOTATION])
    (oci / "index.json").write_bytes(_canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}))


def write_models(root: Path, count: int) -> dict[str, Path]:
    out = {}
    for version in (V1, V2):
        model = app_model(count, version)
        path = root / f"app-{version}.yml"
        load_model(model, source=str(path))  # refuse a model the product would refuse, before any build
        path.write_text(yaml.safe_dump(model, sort_keys=False))
        out[version] = path
    return out


def bundle_builder(*args: str) -> None:
    cli = Path(sys.executable).with_name("bundle-builder")
    try:
        proc = subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise MediaError(f"bundle-builder {' '.join(args)} did not finish within {BUILD_TIMEOUT}s") from None
    if proc.returncode != 0:
        raise MediaError(f"bundle-builder {' '.join(args)} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}")


def write_bundles(out: Path, oci: Path, models: dict[str, Path]) -> None:
    """vendor key pair; 1.0.0 full (with the Debian 12 packages for the runtime playbook); 1.1.0 a delta."""
    bundle_builder("keygen", str(out / "vendor"))
    common = ["--images-from", f"oci:{oci}", "--platform", f"linux/{ARCH}", "--sign-key", str(out / "vendor.key")]
    first = out / f"{APP}-{V1}"
    bundle_builder("build", str(models[V1]), "-o", str(first), *common, "--packages", "debian-12")
    bundle_builder("build", str(models[V2]), "-o", str(out / f"{APP}-{V2}"), *common,
                   "--base", str(first / f"{APP}-{V1}.bundle"), "--base-pub", str(out / "vendor.pub"))


def _key(parts: list[object], files: list[Path]) -> str:
    digest = hashlib.sha256(json.dumps([REVISION, *parts], default=str).encode())
    for path in files:
        digest.update(str(path.relative_to(repo_root())).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def _cached(dest: Path, build: Callable[[Path], None]) -> bool:
    """``build`` into a temp dir renamed to ``dest`` when done; False when ``dest`` was complete already."""
    if (dest / ".complete").exists():
        return False
    work = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    build(work)
    (work / ".complete").write_text("")
    shutil.rmtree(dest, ignore_errors=True)
    work.rename(dest)
    return True


def prepare(count: int, log: Callable[[str], None]) -> Media:
    """The images, models and bundles for ``count`` components, from the cache or built now."""
    shared = _shared_layers()
    here = Path(__file__).resolve().parent
    base = cache_dir() / "bench" / "lifecycle"
    # What the images and models are made of: the shared layers, the models, the server, this file.
    images_key = _key([count, [d for d, _ in shared], app_model(count, V1), app_model(count, V2), SERVER],
                      [here / "lifecycle_images.py"])
    root = base / f"{count}-{images_key}"
    code = sorted([*repo_root().glob("bundle_builder/*.py"), *repo_root().glob("plugins/module_utils/**/*.py")])
    bundles = root / f"bundles-{_key([], code)}"
    with file_lock(base / ".lock", timeout=BUILD_TIMEOUT):
        built = _cached(root, lambda work: (log(f"writing {count} images (x2 for the changed one) and models"),
                                            write_images(work / "oci", count, shared), write_models(work, count)))
        built |= _cached(bundles, lambda work: (log("building bundles 1.0.0 (with Debian 12 packages) and 1.1.0"),
                                                write_bundles(work, root / "oci", {v: root / f"app-{v}.yml"
                                                                                   for v in (V1, V2)})))
        for old in base.iterdir():  # one set per count is enough
            if old.is_dir() and old.name.startswith(f"{count}-") and old != root:
                shutil.rmtree(old, ignore_errors=True)
        for old in root.glob("bundles-*"):
            if old != bundles:
                shutil.rmtree(old, ignore_errors=True)
    oci = root / "oci"
    layers = _layers_of(oci, V1)
    return Media(root=root, oci=oci, models={v: root / f"app-{v}.yml" for v in (V1, V2)},
                 bundles={f"{APP}-{V1}": bundles / f"{APP}-{V1}", f"{APP}-{V2}": bundles / f"{APP}-{V2}",
                          "vendor.pub": bundles / "vendor.pub"},
                 layers=layers, changed=changed_component(components(count)).name, built=built)


def _layers_of(oci: Path, version: str) -> dict[str, int]:
    """digest -> size of every layer the images of ``version`` use (read back from the layout)."""
    blobs = oci / "blobs" / "sha256"
    top = json.loads((oci / "index.json").read_text())
    model = yaml.safe_load((oci.parent / f"app-{version}.yml").read_text())
    refs = {spec["image"] for spec in model["components"].values()}
    out: dict[str, int] = {}
    for entry in top["manifests"]:
        if entry["annotations"][REF_ANNOTATION] not in refs:
            continue
        index = json.loads((blobs / entry["digest"].split(":", 1)[1]).read_bytes())
        manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":", 1)[1]).read_bytes())
        out.update({l["digest"]: l["size"] for l in manifest["layers"]})
    return out
