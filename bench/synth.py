"""Synthetic container images for the benchmarks: shared base layers, realistic shapes, no downloads.

What it writes (once per setting; cached under ``${OD_CACHE:-/var/cache/offline-delivery-test}/bench/``,
keyed by a hash of the settings and of this generator's version):

- ``oci/``            an OCI image layout holding every image (one nested index per reference, annotated
                      with ``org.opencontainers.image.ref.name`` = the full reference, as buildx/skopeo write);
- ``images.docker.tar`` the same images as a ``docker save`` archive (Docker 20.10 layout), for
                      ``docker load`` (the docker reference) and ``--images-from archive:``;
- ``app-1.0.0.yml``   the application model of release 1.0.0 (one component per image);
- ``app-1.0.1.yml``   release 1.0.1: component ``c00``'s top layer changed (new tag ``1.0.1``), the rest equal;
- ``meta.json``       what was generated: images, their blobs and roles, the changed layer (written last: its
                      presence marks a complete cache entry).

Shape: ``bases`` base images of two layers (an "os" layer and a "runtime" layer); every component image is
one base plus a "deps" layer and an "app" layer (its top layer). Layer content is a mix of pseudo-random
bytes (binaries, compressed assets: incompressible) and text-like files (configs, sources: compressible
like real text, about 3x), in files of lognormal sizes. Everything is seeded: same settings, same digests.

Platforms: linux/amd64 only. An arm64 variant would share nothing with amd64 but the config's shape (its
layers are other binaries), so it would double the bytes without measuring anything new: dedup works per
digest, whatever the platform. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import yaml

from offline_delivery_core.app.model import load_model  # the product's validator: the models must pass it

GENERATOR_VERSION = 1
MB = 1_000_000
MTIME = 1_700_000_000  # fixed, so layers are reproducible
CREATED = "2023-11-14T22:13:20Z"
APP_NAME = "bench"
REPO = "odbench"  # image repository prefix: names every image this suite loads into the engine
V1, V2 = "1.0.0", "1.0.1"
CHANGED_COMPONENT = "c00"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
REF_ANNOTATION = "org.opencontainers.image.ref.name"

BASE_SPLIT = (("os", 0.6), ("runtime", 0.4))
COMPONENT_SPLIT = (("deps", 0.55), ("app", 0.45))  # "app" is the top layer


@dataclass(frozen=True)
class Settings:
    """One data set. Sizes count file content; tar headers add a little on top."""

    name: str
    components: int
    base_sizes: tuple[int, ...]          # bytes of each base image (both its layers)
    component_size: tuple[int, int]      # own bytes of a component image (deps + app), min and max
    text_fraction: float = 0.3           # share of bytes in text-like files
    max_file: int = 8 * 1024 * 1024      # largest single file
    seed: int = 20261121

    @property
    def bases(self) -> int:
        return len(self.base_sizes)

    def key(self) -> str:
        """Cache key: changes whenever the settings or the generator change."""
        doc = json.dumps({"v": GENERATOR_VERSION, **asdict(self)}, sort_keys=True).encode()
        return hashlib.sha256(doc).hexdigest()[:12]


SETTINGS: dict[str, Settings] = {
    # for the unit test: seconds, a few hundred KB
    "tiny": Settings("tiny", components=3, base_sizes=(150_000, 250_000), component_size=(40_000, 90_000),
                     max_file=64 * 1024),
    # ~300 MB unique: 180 MB of bases + 10 x ~12 MB of components
    "default": Settings("default", components=10, base_sizes=(40 * MB, 60 * MB, 80 * MB),
                        component_size=(8 * MB, 16 * MB)),
    # ~2 GB unique: 750 MB of bases + 30 x ~42 MB of components (the 2 GB bundle of the RSS goal)
    "large": Settings("large", components=30, base_sizes=(150 * MB, 250 * MB, 350 * MB),
                      component_size=(30 * MB, 54 * MB)),
}


def default_cache_root() -> Path:
    return Path(os.environ.get("OD_CACHE", "/var/cache/offline-delivery-test")) / "bench"


# ----------------------------------------------------------------------------------------------------------
# Blobs


@dataclass
class Blob:
    digest: str
    size: int
    media_type: str
    role: str = ""  # os, runtime, deps, app, config, manifest, index

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


class _HashingWriter:
    """File wrapper that hashes and counts what goes through it (tarfile needs write and tell)."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._fh.write(data)
        self.hash.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


class Layout:
    """The OCI layout being written: content-addressed blobs under ``blobs/sha256``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))

    def path(self, digest: str) -> Path:
        return self.blob_dir / digest.split(":", 1)[1]

    def put_bytes(self, data: bytes, media_type: str, role: str) -> Blob:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if not target.exists():
            target.write_bytes(data)
        return Blob(digest, len(data), media_type, role)

    def put_tar(self, files: Iterator[tuple[str, bytes]], role: str) -> Blob:
        """Stream a layer tar into the layout (never whole in memory) and name it by its digest."""
        tmp = self.blob_dir / f".tmp-{os.getpid()}-{role}"
        with open(tmp, "wb") as raw:
            writer = _HashingWriter(raw)
            _write_tar(writer, files)
        digest = "sha256:" + writer.hash.hexdigest()
        os.replace(tmp, self.path(digest))
        return Blob(digest, writer.size, OCI_LAYER, role)


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _write_tar(writer: _HashingWriter, files: Iterator[tuple[str, bytes]]) -> None:
    dirs: set[str] = set()
    with tarfile.open(fileobj=writer, mode="w", format=tarfile.GNU_FORMAT) as tar:  # type: ignore[arg-type]
        for path, data in files:
            parts = path.split("/")
            for i in range(1, len(parts)):  # real layers carry their directories
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    tar.addfile(_tarinfo(d, 0, tarfile.DIRTYPE, 0o755))
            mode = 0o755 if "/bin/" in path or path.endswith(".so") else 0o644
            tar.addfile(_tarinfo(path, len(data), tarfile.REGTYPE, mode), io.BytesIO(data))


def _tarinfo(name: str, size: int, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode, info.mtime = size, kind, mode, MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


# ----------------------------------------------------------------------------------------------------------
# Layer content


def _vocabulary(rng: random.Random) -> list[str]:
    """Pseudo-words plus code/config tokens; some end a line, so text has lines like real files."""
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    words = ["".join(rng.choices(letters, weights, k=rng.randint(2, 10))) for _ in range(3000)]
    tokens = ["=", "{", "}", "(", ")", "def", "return", "import", "true", "false", "null", "0", "1", "#", "-",
              "self", "config", "value", "name:", "path:", "if", "else", "for", "in", ":", ";", "//", "<div>"]
    vocab = words + tokens * 20
    return vocab + [w + "\n" for w in rng.sample(vocab, 600)]


def _text(rng: random.Random, vocab: list[str], size: int) -> bytes:
    data = " ".join(rng.choices(vocab, k=size // 5 + 8)).encode()
    while len(data) < size:
        data += b" " + " ".join(rng.choices(vocab, k=size // 5 + 8)).encode()
    return data[:size]


_TEXT_EXT = ("py", "conf", "json", "yaml", "html", "js", "txt", "xml", "sh")
_BIN_EXT = ("so", "bin", "jar", "gz", "png", "pyc", "dat")


def layer_files(seed: str, budget: int, text_fraction: float, max_file: int,
                prefix: str) -> Iterator[tuple[str, bytes]]:
    """Files of one layer: ``budget`` content bytes, ``text_fraction`` of them text-like, lognormal sizes.

    Small text files (median ~6 KB) and bigger binaries (median ~48 KB, long tail to ``max_file``), which
    is how an OS or an application layer looks; the mix decides how compressible the layer is.
    """
    rng = random.Random(seed)
    vocab = _vocabulary(random.Random(f"{seed}:vocab"))
    written = text_written = index = 0
    while written < budget:
        is_text = text_written < text_fraction * (written + 1)
        if is_text:
            size = int(rng.lognormvariate(math.log(6000), 1.0))
            size = min(size, 256 * 1024)
        else:
            size = min(int(rng.lognormvariate(math.log(48_000), 1.5)), max_file)
        size = max(16, min(size, budget - written))
        ext = rng.choice(_TEXT_EXT if is_text else _BIN_EXT)
        path = f"{prefix}/d{index // 64:03d}/{'bin/' if ext == 'bin' else ''}f{index:05d}.{ext}"
        data = _text(rng, vocab, size) if is_text else rng.randbytes(size)
        written += size
        text_written += size if is_text else 0
        index += 1
        yield path, data


# ----------------------------------------------------------------------------------------------------------
# Images


@dataclass
class Image:
    ref: str
    component: str
    base: str
    layers: list[Blob]
    config: Blob | None = None
    manifest: Blob | None = None
    index: Blob | None = None

    def blobs(self) -> list[Blob]:
        """Every blob of the image as a bundle carries it (OCI index, manifest, config, layers)."""
        return [b for b in (self.index, self.manifest, self.config) if b is not None] + self.layers


@dataclass
class Generated:
    """What ``generate`` wrote (the contents of meta.json)."""

    root: Path
    settings: Settings
    images: dict[str, Image] = field(default_factory=dict)
    releases: dict[str, dict[str, str]] = field(default_factory=dict)  # version -> component -> ref

    @property
    def oci(self) -> Path:
        return self.root / "oci"

    @property
    def docker_archive(self) -> Path:
        return self.root / "images.docker.tar"

    def app_yml(self, version: str) -> Path:
        return self.root / f"app-{version}.yml"

    def release_images(self, version: str) -> list[Image]:
        return [self.images[ref] for ref in self.releases[version].values()]

    def unique_blobs(self, version: str) -> dict[str, Blob]:
        """Digest -> blob over every image of a release: what a deduplicating bundle must carry."""
        out: dict[str, Blob] = {}
        for image in self.release_images(version):
            for blob in image.blobs():
                out.setdefault(blob.digest, blob)
        return out

    def changed(self) -> tuple[Image, Image]:
        """(old, new) image of the component whose top layer changed between V1 and V2."""
        return (self.images[self.releases[V1][CHANGED_COMPONENT]], self.images[self.releases[V2][CHANGED_COMPONENT]])

    def blob_path(self, digest: str) -> Path:
        return self.oci / "blobs" / "sha256" / digest.split(":", 1)[1]


def _ref(component: str, version: str) -> str:
    return f"{REPO}/{component}:{version}"


def _component_size(settings: Settings, j: int) -> int:
    low, high = settings.component_size
    return random.Random(f"{settings.seed}:size:{j}").randint(low, high)


def _layers(layout: Layout, settings: Settings, name: str, total: int, split: tuple[tuple[str, float], ...],
            revision: str = "") -> list[Blob]:
    out = []
    for role, share in split:
        seed = f"{settings.seed}:{name}:{role}{revision}"
        files = layer_files(seed, int(total * share), settings.text_fraction, settings.max_file,
                            prefix=f"{'usr/lib' if role in ('os', 'runtime') else 'app'}/{name}-{role}")
        out.append(layout.put_tar(files, role))
    return out


def _finish_image(layout: Layout, image: Image, component_index: int) -> None:
    """Config, manifest and a one-platform index for an image whose layers are written."""
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": CREATED,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                           f"COMPONENT={image.component}"],
                   "Cmd": [f"/app/bin/{image.component}"], "WorkingDir": "/app",
                   "ExposedPorts": {f"{8000 + component_index}/tcp": {}},
                   "Labels": {"org.opencontainers.image.ref.name": image.ref}},
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in image.layers]},
        "history": [{"created": CREATED, "created_by": f"bench synth: {layer.role} layer"} for layer in image.layers],
    }
    image.config = layout.put_bytes(_json(config), OCI_CONFIG, "config")
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": image.config.descriptor(),
                "layers": [layer.descriptor() for layer in image.layers]}
    image.manifest = layout.put_bytes(_json(manifest), OCI_MANIFEST, "manifest")
    entry = {**image.manifest.descriptor(), "platform": {"architecture": "amd64", "os": "linux"}}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
    image.index = layout.put_bytes(_json(index), OCI_INDEX, "index")


def _write_index(layout: Layout, images: list[Image]) -> None:
    entries = [{**image.index.descriptor(), "annotations": {REF_ANNOTATION: image.ref}}  # type: ignore[union-attr]
               for image in sorted(images, key=lambda i: i.ref)]
    (layout.root / "index.json").write_bytes(_json({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                    "manifests": entries}))


def build_images(root: Path, settings: Settings, log: Any = None) -> Generated:
    """Write every layer and image of both releases into ``root/oci``."""
    layout = Layout(root / "oci")
    gen = Generated(root=root, settings=settings)
    bases = []
    for i, size in enumerate(settings.base_sizes):
        _say(log, f"base b{i}: {size / MB:.1f} MB")
        bases.append(_layers(layout, settings, f"b{i}", size, BASE_SPLIT))
    gen.releases = {V1: {}, V2: {}}
    for j in range(settings.components):
        name = f"c{j:02d}"
        base_index = j % settings.bases
        own = _layers(layout, settings, name, _component_size(settings, j), COMPONENT_SPLIT)
        _say(log, f"component {name}: base b{base_index}, own {sum(b.size for b in own) / MB:.1f} MB")
        image = Image(_ref(name, V1), name, f"b{base_index}", bases[base_index] + own)
        _finish_image(layout, image, j)
        gen.images[image.ref] = image
        gen.releases[V1][name] = gen.releases[V2][name] = image.ref
        if name == CHANGED_COMPONENT:  # release 1.0.1: a new top (app) layer, everything below unchanged
            app = _layers(layout, settings, name, _component_size(settings, j), COMPONENT_SPLIT[1:], revision="+v2")
            changed = Image(_ref(name, V2), name, image.base, image.layers[:-1] + app)
            _finish_image(layout, changed, j)
            gen.images[changed.ref] = changed
            gen.releases[V2][name] = changed.ref
    _write_index(layout, list(gen.images.values()))
    return gen


# ----------------------------------------------------------------------------------------------------------
# docker save archive (Docker 20.10 layout: <id>/layer.tar, <config hex>.json, manifest.json, repositories)


def write_docker_archive(gen: Generated, refs: list[str], path: Path) -> Path:
    """Stream the images into one ``docker save``-style tar; a layer shared by images is stored once."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    manifest: list[dict[str, Any]] = []
    repositories: dict[str, dict[str, str]] = {}
    written: set[str] = set()
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for ref in refs:
            image = gen.images[ref]
            layer_paths = []
            for layer in image.layers:
                hex_id = layer.digest.split(":", 1)[1]
                member = f"{hex_id}/layer.tar"
                if member not in written:
                    written.add(member)
                    _add_bytes(tar, f"{hex_id}/VERSION", b"1.0")
                    with open(gen.blob_path(layer.digest), "rb") as fh:
                        tar.addfile(_tarinfo(member, layer.size, tarfile.REGTYPE, 0o644), fh)
                layer_paths.append(member)
            assert image.config is not None
            config_name = image.config.digest.split(":", 1)[1] + ".json"
            if config_name not in written:
                written.add(config_name)
                _add_bytes(tar, config_name, gen.blob_path(image.config.digest).read_bytes())
            manifest.append({"Config": config_name, "RepoTags": [ref], "Layers": layer_paths})
            repo, tag = ref.rsplit(":", 1)
            repositories.setdefault(repo, {})[tag] = layer_paths[-1].split("/")[0]
        _add_bytes(tar, "manifest.json", _json(manifest))
        _add_bytes(tar, "repositories", _json(repositories))
    os.replace(tmp, path)
    return path


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_tarinfo(name, len(data), tarfile.REGTYPE, 0o644), io.BytesIO(data))


# ----------------------------------------------------------------------------------------------------------
# Application model


def app_model(gen: Generated, version: str) -> dict[str, Any]:
    """One component per image; c01.. depend on c00 (a realistic fan-in on one core service)."""
    components: dict[str, Any] = {}
    for j, (name, ref) in enumerate(sorted(gen.releases[version].items())):
        port = 8000 + j
        comp: dict[str, Any] = {
            "image": ref,
            "command": [f"/app/bin/{name}"],
            "ports": [{"name": "http", "port": port, "protocol": "tcp"}],
            "env": {"LOG_LEVEL": "info", "COMPONENT": name},
            "health": {"tcp": {"port": port}, "interval": "5s", "timeout": "3s", "retries": 3},
        }
        if name != CHANGED_COMPONENT:
            comp["depends_on"] = {CHANGED_COMPONENT: {"condition": "healthy"}}
        components[name] = comp
    return {"apiVersion": "offline.delivery/v1", "kind": "Application", "name": APP_NAME, "version": version,
            "description": f"synthetic benchmark app ({gen.settings.name} setting)", "components": components}


def write_app_models(gen: Generated) -> None:
    for version in (V1, V2):
        model = app_model(gen, version)
        load_model(model, source=str(gen.app_yml(version)))
        gen.app_yml(version).write_text(yaml.safe_dump(model, sort_keys=False))


# ----------------------------------------------------------------------------------------------------------
# meta.json and the cache


def _meta(gen: Generated) -> dict[str, Any]:
    return {
        "generator": GENERATOR_VERSION,
        "key": gen.settings.key(),
        "settings": asdict(gen.settings),
        "images": {ref: {"component": i.component, "base": i.base,
                         "blobs": [asdict(b) for b in i.blobs()]} for ref, i in gen.images.items()},
        "releases": gen.releases,
    }


def _from_meta(root: Path, meta: dict[str, Any]) -> Generated:
    s = meta["settings"]
    settings = Settings(**{**s, "base_sizes": tuple(s["base_sizes"]), "component_size": tuple(s["component_size"])})
    gen = Generated(root=root, settings=settings, releases=meta["releases"])
    for ref, doc in meta["images"].items():
        blobs = [Blob(**b) for b in doc["blobs"]]
        by_role = {b.role: b for b in blobs if b.role in ("index", "manifest", "config")}
        layers = [b for b in blobs if b.role not in by_role]
        gen.images[ref] = Image(ref, doc["component"], doc["base"], layers, config=by_role["config"],
                                manifest=by_role["manifest"], index=by_role["index"])
    return gen


def load(root: Path) -> Generated | None:
    """A complete cache entry, or None."""
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        return None
    return _from_meta(root, json.loads(meta_path.read_text()))


def generate(settings: Settings, cache_root: Path | None = None, *, force: bool = False,
             log: Any = None) -> Generated:
    """The data set for ``settings``: from the cache when complete, else generated (into a temporary
    directory renamed at the end, so an interrupted run leaves no half entry)."""
    root = (cache_root or default_cache_root()) / f"{settings.name}-{settings.key()}"
    if not force:
        cached = load(root)
        if cached is not None:
            return cached
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = build_images(tmp, settings, log)
    _say(log, "writing the docker save archive")
    write_docker_archive(gen, sorted(gen.images), gen.docker_archive)
    write_app_models(gen)
    (tmp / "meta.json").write_text(json.dumps(_meta(gen), indent=1, sort_keys=True))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return load(root)  # type: ignore[return-value]


def _say(log: Any, text: str) -> None:
    if log is not None:
        log(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.synth",
                                     description=(__doc__ or "").split("\n", maxsplit=1)[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="default")
    parser.add_argument("--large", action="store_true", help="same as --setting large")
    parser.add_argument("--cache", type=Path, default=None, help="cache root (default: $OD_CACHE/bench)")
    parser.add_argument("--force", action="store_true", help="regenerate even when cached")
    args = parser.parse_args(argv)
    settings = SETTINGS["large" if args.large else args.setting]
    gen = generate(settings, args.cache, force=args.force, log=lambda t: print(t, file=sys.stderr))
    v1 = gen.unique_blobs(V1)
    print(f"{gen.root}: {len(gen.images)} images, release {V1}: {len(v1)} unique blobs, "
          f"{sum(b.size for b in v1.values()) / MB:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
