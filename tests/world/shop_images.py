"""Build the sample applications' container images (examples/shop, examples/poll) from Debian packages,
without any registry.

Every image is three layers so that layers are really shared (and bundle deltas/dedup mean something):

1. base     -- ``mmdebstrap --variant=minbase`` of Debian 12, one per arch, shared by all images;
2. packages -- the component's Debian packages, installed with apt in a chroot on an overlayfs whose
               upper directory becomes the layer (whiteouts converted to OCI ``.wh.`` files);
3. app      -- the files under ``examples/<app>/<component>/`` (entrypoints, nginx config, API source).
               Only this layer differs between api 1.0.0, 1.1.0 and 1.2.0.

The poll app's images (``RECIPES_BY_APP["poll"]``) reuse the shop's base and packages layers: the same
Debian packages give the same layer (``ImageRecipe.package_set`` names the shared record), so only their
app layers are new.

Layer tars are written by :func:`write_layer` (sorted members, fixed mtime, numeric ids, no xattrs), so the
same tree always gives the same digest. Output: an OCI image layout with one multi-platform index per image
reference, and one ``docker save`` archive per arch that ``docker load`` accepts.

Everything is cached under ``${OD_CACHE:-/var/cache/offline-delivery-test}/shop/`` keyed by a hash of its
recipe: changing the API source rebuilds only the app layer and what references it. Each app has its own
output sets (``out/`` for the shop, ``out-poll/`` for poll); the blob store is shared.

CLI: ``python -m tests.world.shop_images build [--app shop|poll] [--arch amd64,arm64]`` prints the OCI layout
path.
Needs root, mmdebstrap, overlayfs and (for arm64) qemu-user-static registered with binfmt_misc (flag F).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterator

from offline_delivery_core.common.digests import sha256_file

REPO_ROOT = Path(__file__).resolve().parents[2]
SHOP_DIR = REPO_ROOT / "examples" / "shop"
POLL_DIR = REPO_ROOT / "examples" / "poll"
SUITE = "bookworm"
# Fixed timestamp for every layer member and image config: rebuilds give identical digests.
SOURCE_DATE_EPOCH = 1747699200  # 2025-05-20T00:00:00Z
CREATED = "2025-05-20T00:00:00Z"
# Bump when the build procedure itself changes in a way the recipes below do not capture.
BUILDER_REVISION = "1"
ARCHES = ("amd64", "arm64")
# Output sets (OCI layout + docker archives) kept in the cache; older ones are deleted on a new build.
KEEP_OUTPUTS = 3
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REF_ANNOTATION = "org.opencontainers.image.ref.name"

# Removed from the base and after every package install: caches and host identity that must not ship.
CLEANUP_SHELL = (
    'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb '
    '"$1"/var/cache/apt/archives/partial/* "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old '
    '"$1"/var/log/apt/* "$1"/var/log/dpkg.log "$1"/var/log/alternatives.log "$1"/var/log/bootstrap.log '
    '"$1"/var/cache/ldconfig/aux-cache "$1"/etc/hostname "$1"/etc/resolv.conf "$1"/tmp/* "$1"/var/tmp/*; '
    ': > "$1"/etc/machine-id'
)


@dataclasses.dataclass(frozen=True)
class AppFile:
    """One file of the app layer: ``src`` relative to the recipe's ``source`` directory, ``dest`` absolute in
    the image."""

    src: str
    dest: str
    mode: int = 0o644


@dataclasses.dataclass(frozen=True)
class ImageRecipe:
    ref: str
    component: str
    packages: tuple[str, ...]
    files: tuple[AppFile, ...]
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    workdir: str = "/"
    user: str = ""
    stop_signal: str = "SIGTERM"
    volumes: tuple[str, ...] = ()
    # Extra shell run on the build root ("$1") before / after the package install.
    package_setup: str = ""
    package_cleanup: str = ""
    # The example directory the app files come from (relative to the repository).
    source: str = "examples/shop"
    # Names the cached packages layer (default: the component): recipes with the same packages share it.
    package_set: str = ""

    @property
    def name(self) -> str:
        return self.ref.split(":", 1)[0]

    @property
    def tag(self) -> str:
        return self.ref.split(":", 1)[1]


PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _api_recipe(version: str) -> ImageRecipe:
    return ImageRecipe(
        ref=f"shop/api:{version}",
        component="api",
        packages=("python3", "python3-psycopg2", "python3-redis"),
        files=(
            AppFile("api/common/shop_store.py", "/opt/shop-api/shop_store.py"),
            AppFile(f"api/{version}/shop_api.py", "/opt/shop-api/shop_api.py"),
        ),
        entrypoint=("/usr/bin/python3", "/opt/shop-api/shop_api.py"),
        env=(PATH_ENV, "PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1", "SHOP_API_PORT=8000"),
        ports=(8000,),
        workdir="/opt/shop-api",
        user="65534:65534",  # nobody:nogroup, numeric so no user lookup is needed on any target
    )


_POSTGRES_PACKAGES: dict = dict(
    packages=("postgresql-15",),
    # The image's entrypoint makes the cluster in the volume; Debian's postinst would bake one in.
    package_setup='mkdir -p "$1"/etc/postgresql-common/createcluster.d && '
                  'echo "create_main_cluster = false" > "$1"/etc/postgresql-common/createcluster.d/shop.conf',
    # ssl-cert generates a random snakeoil key at install: one private key in every copy of the image,
    # and a layer that differs on each rebuild. The sample apps' postgres does not use TLS.
    package_cleanup='rm -f "$1"/etc/ssl/private/ssl-cert-snakeoil.key "$1"/etc/ssl/certs/ssl-cert-snakeoil.pem; '
                    'find "$1"/etc/ssl/certs -xtype l -delete',
)


RECIPES: tuple[ImageRecipe, ...] = (
    ImageRecipe(
        ref="shop/gateway:1.0.0",
        component="gateway",
        packages=("nginx-light",),
        files=(
            AppFile("gateway/nginx.conf", "/etc/nginx/nginx.conf"),
            AppFile("gateway/shop.conf", "/etc/nginx/conf.d/shop.conf"),
        ),
        entrypoint=("/usr/sbin/nginx", "-c", "/etc/nginx/nginx.conf"),
        env=(PATH_ENV,),
        ports=(8080,),
        stop_signal="SIGQUIT",  # nginx: graceful shutdown
    ),
    _api_recipe("1.0.0"),
    _api_recipe("1.1.0"),
    _api_recipe("1.2.0"),
    ImageRecipe(
        ref="shop/db:1.0.0",
        component="db",
        files=(AppFile("db/entrypoint.sh", "/usr/local/bin/shop-db-entrypoint", 0o755),),
        entrypoint=("/usr/local/bin/shop-db-entrypoint",),
        env=(PATH_ENV + ":/usr/lib/postgresql/15/bin", "PGDATA=/var/lib/postgresql/data"),
        ports=(5432,),
        stop_signal="SIGINT",  # postgres: fast shutdown
        volumes=("/var/lib/postgresql/data",),
        **_POSTGRES_PACKAGES,
    ),
    ImageRecipe(
        ref="shop/redis:1.0.0",
        component="redis",
        packages=("redis-server",),
        files=(AppFile("redis/entrypoint.sh", "/usr/local/bin/shop-redis-entrypoint", 0o755),),
        entrypoint=("/usr/local/bin/shop-redis-entrypoint",),
        env=(PATH_ENV,),
        ports=(6379,),
    ),
)


def _poll_app_recipe(version: str) -> ImageRecipe:
    """poll/app:<version>: web, worker and migrate in one image (the first argument picks the role); the
    release is the image's POLL_VERSION, so the app layer is the same in every release."""
    return ImageRecipe(
        ref=f"poll/app:{version}",
        component="app",
        packages=("python3", "python3-psycopg2", "python3-redis"),
        package_set="api",  # the shop api's packages layer
        files=(AppFile("app/poll_common.py", "/opt/poll/poll_common.py"), AppFile("app/poll.py", "/opt/poll/poll.py")),
        entrypoint=("/usr/bin/python3", "/opt/poll/poll.py"),
        cmd=("web",),
        env=(PATH_ENV, "PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1", f"POLL_VERSION={version}"),
        ports=(8090,),
        workdir="/opt/poll",
        source="examples/poll",
    )


POLL_VERSIONS = ("1.0.0", "1.1.0", "1.2.0")
POLL_RECIPES: tuple[ImageRecipe, ...] = (
    *(_poll_app_recipe(v) for v in POLL_VERSIONS),
    ImageRecipe(
        ref="poll/db:1.0.0",
        component="db",
        files=(AppFile("db/entrypoint.sh", "/usr/local/bin/poll-db-entrypoint", 0o755),),
        entrypoint=("/usr/local/bin/poll-db-entrypoint",),
        env=(PATH_ENV + ":/usr/lib/postgresql/15/bin", "PGDATA=/var/lib/postgresql/data"),
        ports=(5432,),
        stop_signal="SIGINT",
        volumes=("/var/lib/postgresql/data",),
        source="examples/poll",
        **_POSTGRES_PACKAGES,
    ),
    ImageRecipe(
        ref="poll/redis:1.0.0",
        component="redis",
        packages=("redis-server",),
        files=(AppFile("redis/entrypoint.sh", "/usr/local/bin/poll-redis-entrypoint", 0o755),),
        entrypoint=("/usr/local/bin/poll-redis-entrypoint",),
        env=(PATH_ENV,),
        ports=(6379,),
        source="examples/poll",
    ),
)
RECIPES_BY_APP: dict[str, tuple[ImageRecipe, ...]] = {"shop": RECIPES, "poll": POLL_RECIPES}
ALL_RECIPES: tuple[ImageRecipe, ...] = RECIPES + POLL_RECIPES


class BuildError(RuntimeError):
    """A step of the image build failed; the message says which and what to check."""


# --------------------------------------------------------------------------------------------- helpers

def cache_root() -> Path:
    return Path(os.environ.get("OD_CACHE", "/var/cache/offline-delivery-test")) / "shop"


def _sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    return "sha256:" + sha256_file(path)


def _recipe_key(*parts: object) -> str:
    text = json.dumps([BUILDER_REVISION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _run(argv: list[str], what: str, **kwargs: object) -> None:
    """Run a build command; on failure raise BuildError with the command and the tail of its output."""
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise BuildError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}")


def _log(message: str) -> None:
    print(f"[shop_images] {message}", file=sys.stderr, flush=True)


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def debian_sources(path: Path = Path("/etc/apt/sources.list.d/debian.sources")) -> list[str]:
    """One-line ``deb`` entries for the machine's Debian mirror (deb822 stanzas of ``path``)."""
    if not path.exists():
        raise BuildError(f"{path} not found: the Debian mirror is read from it (deb822 format)")
    lines: list[str] = []
    for stanza in path.read_text().split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                lines.append(f"deb {uri} {suite} {fields.get('components', 'main')}")
    if not lines:
        raise BuildError(f"{path} lists no 'deb' source; cannot pick a Debian mirror")
    return lines


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise builds sharing one cache (tests may build from several processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------- layer writing

def _tarinfo_for(path: Path, name: str) -> tarfile.TarInfo | None:
    """A normalised TarInfo for ``path`` (no xattrs, fixed mtime, numeric ids); None for sockets/fifos."""
    st = path.lstat()
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = SOURCE_DATE_EPOCH
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(path)
    elif stat.S_ISREG(st.st_mode):
        info.type = tarfile.REGTYPE
        info.size = st.st_size
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        return None
    return info


def iter_tree(root: Path, skip: frozenset[str] = frozenset()) -> Iterator[tuple[Path, str]]:
    """(path, relative name) for every entry under ``root``, parents before children, sorted bytewise.

    ``skip`` names directories whose contents are left out (the directory itself is kept), e.g. ``dev``.
    """
    def visit(directory: Path, prefix: str) -> Iterator[tuple[Path, str]]:
        for entry in sorted(os.listdir(directory), key=os.fsencode):
            path = directory / entry
            name = prefix + entry
            yield path, name
            if path.is_dir() and not path.is_symlink() and name not in skip:
                yield from visit(path, name + "/")

    yield from visit(root, "")


def write_layer(
    root: Path, out: Path, *, skip: frozenset[str] = frozenset(), overlay_upper: bool = False
) -> str:
    """Write the tree under ``root`` as a deterministic layer tar at ``out``; return its sha256 digest.

    With ``overlay_upper`` the tree is an overlayfs upper directory: whiteouts (char device 0/0) become
    ``.wh.<name>`` files and opaque directories get a ``.wh..wh..opq`` member, as the OCI spec wants.
    Hard links inside the tree are kept as hard links (first name in sort order is the target).
    """
    tmp = out.with_name(out.name + ".tmp")
    seen_inodes: dict[tuple[int, int], str] = {}
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for path, name in iter_tree(root, skip):
            info = _tarinfo_for(path, name)
            if info is None:
                continue
            if overlay_upper and info.type == tarfile.CHRTYPE and info.devmajor == 0 and info.devminor == 0:
                _add_whiteout(tar, name, info)
                continue
            st = path.lstat()
            if info.type == tarfile.REGTYPE and st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen_inodes:
                    info.type, info.linkname, info.size = tarfile.LNKTYPE, seen_inodes[key], 0
                    tar.addfile(info)
                    continue
                seen_inodes[key] = name
            if info.type == tarfile.REGTYPE:
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
            if overlay_upper and info.type == tarfile.DIRTYPE and _is_opaque(path):
                _add_whiteout(tar, name + "/.wh..wh..opq", info)
    digest = _sha256_file(tmp)
    tmp.replace(out)
    return digest


def _add_whiteout(tar: tarfile.TarFile, name: str, like: tarfile.TarInfo) -> None:
    if not name.endswith(".wh..wh..opq"):
        head, _, base = name.rpartition("/")
        name = (head + "/" if head else "") + ".wh." + base
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size = tarfile.REGTYPE, 0o644, 0
    info.uid = info.gid = 0
    info.mtime = like.mtime
    tar.addfile(info, io.BytesIO(b""))


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def source_dir(recipe: ImageRecipe) -> Path:
    """The directory a recipe's app files come from (read at call time: tests point SHOP_DIR at a copy)."""
    return {"examples/shop": SHOP_DIR, "examples/poll": POLL_DIR}.get(recipe.source, REPO_ROOT / recipe.source)


def app_layer_bytes(recipe: ImageRecipe) -> bytes:
    """The app layer of ``recipe``: its files from its example directory plus their parent directories."""
    members: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
    for item in recipe.files:
        src = source_dir(recipe) / item.src
        if not src.is_file():
            raise BuildError(f"{src}: listed in the recipe of {recipe.ref} but missing")
        parts = item.dest.strip("/").split("/")
        for depth in range(1, len(parts)):
            dirname = "/".join(parts[:depth])
            info = tarfile.TarInfo(dirname)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, SOURCE_DATE_EPOCH
            members.setdefault(dirname, (info, None))
        data = src.read_bytes()
        info = tarfile.TarInfo("/".join(parts))
        info.mode, info.size, info.mtime = item.mode, len(data), SOURCE_DATE_EPOCH
        members[info.name] = (info, data)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(members, key=os.fsencode):
            info, data = members[name]
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------- the base

def _base_key(arch: str, sources: list[str]) -> str:
    return _recipe_key("base", SUITE, arch, sources, CLEANUP_SHELL)


def build_base(arch: str, sources: list[str]) -> Path:
    """The extracted minbase root filesystem for ``arch`` (cached); returns its directory."""
    key = _base_key(arch, sources)
    final = cache_root() / "base" / f"{arch}-{key}"
    if (final / "rootfs" / "etc" / "os-release").exists():
        return final / "rootfs"
    tmp = final.with_name(final.name + ".tmp")
    _remove_tree(tmp)
    tmp.mkdir(parents=True)
    started = time.monotonic()
    _log(f"mmdebstrap {SUITE} {arch} (minbase) ...")
    _run(
        [
            "mmdebstrap", "--mode=root", "--variant=minbase", f"--architectures={arch}",
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
            "--aptopt=Acquire::Retries=3",
            f"--customize-hook={CLEANUP_SHELL}",
            SUITE, str(tmp / "rootfs"), *sources,
        ],
        f"mmdebstrap of the {arch} base",
        env={**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)},
    )
    _log(f"base {arch} done in {time.monotonic() - started:.0f}s")
    tmp.replace(final)
    return final / "rootfs"


def _remove_tree(path: Path) -> None:
    """Delete a build directory, after unmounting what a crashed build left mounted in it."""
    if not path.exists():
        return
    _unmount_below(path)
    left = _mounts_below(path)
    if left:
        # Never recurse into a mount: the chroot's /dev is the host's own.
        raise BuildError(f"cannot clean {path}: still mounted: {', '.join(left)}; unmount them by hand")
    shutil.rmtree(path)


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True)


def _unmount_below(path: Path) -> None:
    """Unmount everything mounted under ``path``, deepest first."""
    for point in _mounts_below(path):
        subprocess.run(["umount", "-l", point], check=False)


# ------------------------------------------------------------------------------------ package layer

def _packages_key(base_key: str, recipe: ImageRecipe) -> str:
    extra = [recipe.package_setup, recipe.package_cleanup] if recipe.package_setup or recipe.package_cleanup else []
    return _recipe_key("packages", base_key, sorted(recipe.packages), CLEANUP_SHELL, *extra)


@contextlib.contextmanager
def overlay_chroot(lower: Path, work: Path, apt_state: Path) -> Iterator[Path]:
    """Mount an overlay of ``lower`` with /proc, /dev, apt lists and archives for a chroot build.

    Yields the merged root; the upper directory is ``work / "upper"``. apt's lists and downloaded debs
    live in ``apt_state`` (bind mounts), so they never reach the layer and are shared between components.
    Everything is unmounted on the way out, also after a failure.
    """
    upper, ovl_work, merged = work / "upper", work / "work", work / "merged"
    for directory in (upper, ovl_work, merged, apt_state / "lists" / "partial", apt_state / "archives" / "partial"):
        directory.mkdir(parents=True, exist_ok=True)
    mounted: list[Path] = []
    try:
        # metacopy/redirect_dir/index off: every changed file is copied up whole, so upper is a full diff.
        options = f"lowerdir={lower},upperdir={upper},workdir={ovl_work},metacopy=off,redirect_dir=off,index=off"
        _run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], "overlay mount")
        mounted.append(merged)
        for target, argv in (
            ("proc", ["mount", "-t", "proc", "proc"]),
            ("dev", ["mount", "--rbind", "/dev"]),
            ("var/lib/apt/lists", ["mount", "--bind", str(apt_state / "lists")]),
            ("var/cache/apt/archives", ["mount", "--bind", str(apt_state / "archives")]),
        ):
            point = merged / target
            _run([*argv, str(point)], f"mount {target} for the chroot")
            mounted.append(point)
        yield merged
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-R", str(point)], check=False)
        _unmount_below(work)


def _chroot_install(merged: Path, recipe: ImageRecipe, what: str) -> None:
    resolv = merged / "etc" / "resolv.conf"
    policy = merged / "usr" / "sbin" / "policy-rc.d"
    shutil.copyfile("/etc/resolv.conf", resolv)
    # No service may start inside the build chroot.
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C.UTF-8",
        "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
    }
    try:
        if recipe.package_setup:
            _run(["sh", "-c", recipe.package_setup, "setup", str(merged)], f"package setup ({what})")
        _run(["chroot", str(merged), "apt-get", "-o", "Acquire::Retries=3", "update"], f"apt-get update ({what})", env=env)
        _run(
            ["chroot", str(merged), "apt-get", "install", "-y", "--no-install-recommends", *recipe.packages],
            f"apt-get install {' '.join(recipe.packages)} ({what})",
            env=env,
        )
    finally:
        resolv.unlink(missing_ok=True)
        policy.unlink(missing_ok=True)
    for script in filter(None, (CLEANUP_SHELL, recipe.package_cleanup)):
        _run(["sh", "-c", script, "cleanup", str(merged)], f"cleanup ({what})")


def build_packages_layer(arch: str, base: Path, base_key: str, recipe: ImageRecipe) -> str:
    """Digest of the packages layer of ``recipe`` on ``arch``, built into the blob store if not cached."""
    key = _packages_key(base_key, recipe)
    record = cache_root() / "packages" / f"{recipe.package_set or recipe.component}-{arch}-{key}.digest"
    if record.exists() and _blob_path(record.read_text().strip()).exists():
        return record.read_text().strip()
    work = record.with_suffix(".work")
    _remove_tree(work)
    work.mkdir(parents=True)
    what = f"{recipe.package_set or recipe.component} {arch}"
    _log(f"installing {' '.join(recipe.packages)} for {what} ...")
    started = time.monotonic()
    apt_state = cache_root() / "apt" / f"{arch}-{base_key}"
    try:
        with overlay_chroot(base, work / "ovl", apt_state) as merged:
            _chroot_install(merged, recipe, what)
        write_layer(work / "ovl" / "upper", work / "layer.tar", overlay_upper=True)
        digest = _store_file(work / "layer.tar")
    finally:
        _remove_tree(work)
    record.write_text(digest + "\n")
    _log(f"packages {what} done in {time.monotonic() - started:.0f}s")
    return digest


# ---------------------------------------------------------------------------------- blobs and images

def blob_dir() -> Path:
    return cache_root() / "blobs" / "sha256"


def _blob_path(digest: str) -> Path:
    return blob_dir() / digest.split(":", 1)[1]


def _store_file(path: Path) -> str:
    """Move ``path`` into the content-addressed blob store; return its digest."""
    digest = _sha256_file(path)
    target = _blob_path(digest)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        path.unlink()
    else:
        path.replace(target)
    return digest


def _store_bytes(data: bytes) -> str:
    digest = _sha256_bytes(data)
    target = _blob_path(digest)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(target)
    return digest


def _descriptor(media_type: str, digest: str, **extra: object) -> dict:
    return {"mediaType": media_type, "digest": digest, "size": _blob_path(digest).stat().st_size, **extra}


def base_layer(arch: str, sources: list[str]) -> str:
    """Digest of the base layer for ``arch`` (built and stored if needed)."""
    rootfs = build_base(arch, sources)
    record = rootfs.parent / "layer.digest"
    if record.exists() and _blob_path(record.read_text().strip()).exists():
        return record.read_text().strip()
    tmp = rootfs.parent / "layer.tar"
    _normalise_apt_partial(rootfs)
    # /dev, /proc, /sys are provided by every runtime; their build-time contents must not ship.
    digest = write_layer(rootfs, tmp, skip=frozenset({"dev", "proc", "sys"}))
    _store_file(tmp)
    record.write_text(digest + "\n")
    return digest


def _normalise_apt_partial(rootfs: Path) -> None:
    """Give apt's download dir the owner stock Debian has (_apt), whatever the build host did.

    mmdebstrap leaves it owned by root when apt's sandbox user cannot traverse the cache path (e.g. under
    a 0700 temporary directory): the same recipe must still give the same layer.
    """
    partial = rootfs / "var/cache/apt/archives/partial"
    for line in (rootfs / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "_apt" and partial.is_dir():
            os.chown(partial, int(fields[2]), 0)
            partial.chmod(0o700)


def packages_layer(arch: str, sources: list[str], recipe: ImageRecipe) -> str:
    return build_packages_layer(arch, build_base(arch, sources), _base_key(arch, sources), recipe)


def image_config(recipe: ImageRecipe, arch: str, diff_ids: list[str]) -> dict:
    config: dict = {
        "Entrypoint": list(recipe.entrypoint),
        "Env": list(recipe.env),
        "WorkingDir": recipe.workdir,
        "StopSignal": recipe.stop_signal,
        "ExposedPorts": {f"{port}/tcp": {} for port in recipe.ports},
        "Labels": {
            "org.opencontainers.image.title": recipe.ref,
            "org.opencontainers.image.version": recipe.tag,
            "org.opencontainers.image.source": recipe.source,
        },
    }
    if recipe.cmd:
        config["Cmd"] = list(recipe.cmd)
    if recipe.user:
        config["User"] = recipe.user
    if recipe.volumes:
        config["Volumes"] = {path: {} for path in recipe.volumes}
    result: dict = {
        "architecture": arch,
        "os": "linux",
        "created": CREATED,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": CREATED, "created_by": f"mmdebstrap --variant=minbase {SUITE}"},
            {"created": CREATED, "created_by": f"apt-get install --no-install-recommends {' '.join(recipe.packages)}"},
            {"created": CREATED, "created_by": f"{recipe.source}/{recipe.component} files"},
        ],
    }
    if arch == "arm64":
        result["variant"] = "v8"
    return result


@dataclasses.dataclass
class PlatformImage:
    arch: str
    manifest: str
    config: str
    layers: list[str]


def build_image(recipe: ImageRecipe, arch: str, sources: list[str]) -> PlatformImage:
    layers = [base_layer(arch, sources), packages_layer(arch, sources, recipe), _store_bytes(app_layer_bytes(recipe))]
    config = _store_bytes(_canonical(image_config(recipe, arch, layers)))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _descriptor(OCI_CONFIG, config),
        "layers": [_descriptor(OCI_LAYER, digest) for digest in layers],
    }
    return PlatformImage(arch, _store_bytes(_canonical(manifest)), config, layers)


def _platform(arch: str) -> dict:
    platform = {"architecture": arch, "os": "linux"}
    if arch == "arm64":
        platform["variant"] = "v8"
    return platform


def image_index(recipe: ImageRecipe, images: list[PlatformImage]) -> str:
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            _descriptor(OCI_MANIFEST, image.manifest, platform=_platform(image.arch)) for image in images
        ],
        "annotations": {REF_ANNOTATION: recipe.ref},
    }
    return _store_bytes(_canonical(index))


# ------------------------------------------------------------------------------------------ outputs

def _link_blob(digest: str, blobs: Path) -> None:
    target = blobs / digest.split(":", 1)[1]
    if not target.exists():
        os.link(_blob_path(digest), target)


def _blob_closure(index_digest: str) -> list[str]:
    """Every blob an image index references, index first."""
    index = json.loads(_blob_path(index_digest).read_bytes())
    out = [index_digest]
    for entry in index["manifests"]:
        manifest = json.loads(_blob_path(entry["digest"]).read_bytes())
        out += [entry["digest"], manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
    return out


def write_oci_layout(directory: Path, indexes: dict[str, str]) -> None:
    """OCI image layout at ``directory`` with one index per ref (blobs hard-linked from the store)."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    for digest in indexes.values():
        for blob in _blob_closure(digest):
            _link_blob(blob, blobs)
    top = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            _descriptor(OCI_INDEX, digest, annotations={REF_ANNOTATION: ref}) for ref, digest in sorted(indexes.items())
        ],
    }
    (directory / "index.json").write_bytes(_canonical(top))


def write_docker_archive(path: Path, images: dict[str, PlatformImage]) -> None:
    """A ``docker save``-format archive holding every image of one arch (layers stored once)."""
    entries: list[dict] = []
    members: dict[str, Path] = {}
    for ref, image in sorted(images.items()):
        config_name = image.config.split(":", 1)[1] + ".json"
        members[config_name] = _blob_path(image.config)
        layer_names = []
        for layer in image.layers:
            name = layer.split(":", 1)[1] + "/layer.tar"
            members[name] = _blob_path(layer)
            layer_names.append(name)
        entries.append({"Config": config_name, "RepoTags": [ref], "Layers": layer_names})
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        manifest = json.dumps(entries, indent=1).encode()
        _add_bytes(tar, "manifest.json", manifest)
        for name in sorted(members):
            if name.endswith("/layer.tar"):
                info = tarfile.TarInfo(name.split("/", 1)[0])
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, SOURCE_DATE_EPOCH
                tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = members[name].stat().st_size, 0o644, SOURCE_DATE_EPOCH
            with members[name].open("rb") as handle:
                tar.addfile(info, handle)
    tmp.replace(path)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, SOURCE_DATE_EPOCH
    tar.addfile(info, io.BytesIO(data))


def image_manifest(layout: Path, ref: str, arch: str) -> dict:
    """The manifest of ``ref`` for ``arch`` in an OCI layout written by :func:`write_oci_layout`."""
    top = json.loads((layout / "index.json").read_text())
    for entry in top["manifests"]:
        if entry.get("annotations", {}).get(REF_ANNOTATION) != ref:
            continue
        index = json.loads((layout / "blobs" / "sha256" / entry["digest"].split(":", 1)[1]).read_bytes())
        for desc in index["manifests"]:
            if desc["platform"]["architecture"] == arch:
                return json.loads((layout / "blobs" / "sha256" / desc["digest"].split(":", 1)[1]).read_bytes())
        raise BuildError(f"{layout}: {ref} has no {arch} image; build with --arch {arch}")
    raise BuildError(f"{layout}/index.json: no image {ref}")


def unpack_image(layout: Path, ref: str, arch: str, dest: Path) -> None:
    """Apply the layers of ``ref``/``arch`` to ``dest`` as a root filesystem, honouring OCI whiteouts.

    This is what the systemd target does with an image (RootDirectory=); tests use it to run the arm64
    binaries through qemu without a container runtime.
    """
    manifest = image_manifest(layout, ref, arch)
    dest.mkdir(parents=True, exist_ok=True)
    for layer in manifest["layers"]:
        with tarfile.open(layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]) as tar:
            members = tar.getmembers()
            for member in members:
                if member.name.startswith("/") or ".." in member.name.split("/"):
                    raise BuildError(f"layer {layer['digest']}: unsafe member name {member.name!r}")
            # Whiteouts hide what lower layers had; apply them before this layer's own files.
            for member in members:
                head, _, base = member.name.rpartition("/")
                if base.startswith(".wh."):
                    parent = _inside(dest, head)
                    if base == ".wh..wh..opq":
                        _clear_dir(parent)
                    else:
                        _remove_path(parent / base[len(".wh."):])
            for member in members:
                if not member.name.rpartition("/")[2].startswith(".wh."):
                    target = dest / member.name
                    if member.isdir() and target.is_dir() and not target.is_symlink():
                        os.chmod(target, member.mode)
                        os.chown(target, member.uid, member.gid)
                        continue
                    if not member.isdir():
                        _remove_path(_inside(dest, member.name.rpartition("/")[0]) / target.name)
                    tar.extract(member, dest, numeric_owner=True, filter=_keep_modes_filter)


def _inside(root: Path, relative: str) -> Path:
    """``root/relative`` with symlinks resolved, refusing anything that leaves ``root``."""
    resolved = Path(os.path.realpath(root / relative)) if relative else Path(os.path.realpath(root))
    if resolved != Path(os.path.realpath(root)) and not str(resolved).startswith(os.path.realpath(root) + "/"):
        raise BuildError(f"{relative!r} resolves outside {root} (to {resolved}); refusing to touch it")
    return resolved


def _keep_modes_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "tar" safety checks (nothing lands outside ``dest``) but keeping setuid and modes."""
    checked = tarfile.tar_filter(member, dest)
    return checked.replace(mode=member.mode, deep=False)


def _remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _clear_dir(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            _remove_path(child)


@dataclasses.dataclass(frozen=True)
class ShopImages:
    """Where a build put its outputs."""

    oci_layout: Path
    docker_archives: dict[str, Path]  # arch -> docker save archive
    indexes: dict[str, str]           # ref -> OCI index digest


def build_all(arches: tuple[str, ...] = ARCHES, app: str = "shop") -> ShopImages:
    """Build (or reuse) every image of ``app`` (shop, poll) for ``arches``; write the OCI layout and docker
    archives."""
    if app not in RECIPES_BY_APP:
        raise BuildError(f"unknown sample app {app!r}: choose from {', '.join(RECIPES_BY_APP)}")
    recipes = RECIPES_BY_APP[app]
    unknown = set(arches) - set(ARCHES)
    if unknown or not arches:
        raise BuildError(f"unsupported arch(es) {sorted(unknown) or '(none)'}: choose from {', '.join(ARCHES)}")
    arches = tuple(a for a in ARCHES if a in arches)
    if os.geteuid() != 0:
        raise BuildError(f"building the {app} images needs root (mmdebstrap, overlay mounts, chroot)")
    sources = debian_sources()
    with _locked(cache_root() / ".lock"):
        per_ref: dict[str, list[PlatformImage]] = {}
        for arch in arches:
            for recipe in recipes:
                per_ref.setdefault(recipe.ref, []).append(build_image(recipe, arch, sources))
        indexes = {recipe.ref: image_index(recipe, per_ref[recipe.ref]) for recipe in recipes}
        out = cache_root() / ("out" if app == "shop" else f"out-{app}") / _recipe_key("out", arches,
                                                                                       sorted(indexes.items()))
        archives = {arch: out / "docker" / f"{app}-{arch}.tar" for arch in arches}
        if not (out / "oci" / "index.json").exists():
            tmp = out.with_name(out.name + ".tmp")
            _remove_tree(tmp)
            write_oci_layout(tmp / "oci", indexes)
            (tmp / "docker").mkdir()
            for arch in arches:
                images = {ref: next(i for i in imgs if i.arch == arch) for ref, imgs in per_ref.items()}
                write_docker_archive(tmp / "docker" / f"{app}-{arch}.tar", images)
            tmp.replace(out)
            _prune_outputs(out.parent, keep=KEEP_OUTPUTS)
        _collect_garbage(sources)
        return ShopImages(out / "oci", archives, indexes)


def _collect_garbage(sources: list[str]) -> None:
    """Forget build products of recipes that no longer exist, and blobs nothing refers to.

    Kept: the base and packages layers of the current recipes (both arches), and every blob an output
    set links (outputs hold hard links, so a store entry with one link is referenced by no output).
    """
    root = cache_root()
    base_dirs = {root / "base" / f"{arch}-{_base_key(arch, sources)}" for arch in ARCHES}
    apt_dirs = {root / "apt" / f"{arch}-{_base_key(arch, sources)}" for arch in ARCHES}
    records = {root / "packages" / f"{r.package_set or r.component}-{arch}-"
                                   f"{_packages_key(_base_key(arch, sources), r)}.digest"
               for r in ALL_RECIPES for arch in ARCHES}
    records |= {directory / "layer.digest" for directory in base_dirs}
    for directory, keep in ((root / "base", base_dirs), (root / "apt", apt_dirs)):
        for entry in directory.iterdir() if directory.is_dir() else ():
            if entry not in keep:
                _remove_tree(entry)
    for record in (root / "packages").glob("*.digest"):
        if record not in records:
            record.unlink()
    needed = {r.read_text().strip().split(":", 1)[1] for r in records if r.exists()}
    for blob in blob_dir().iterdir() if blob_dir().is_dir() else ():
        if blob.name not in needed and blob.stat().st_nlink == 1:
            blob.unlink()


def _prune_outputs(directory: Path, keep: int) -> None:
    """Drop all but the ``keep`` newest output sets (each holds full docker archives)."""
    outputs = sorted((p for p in directory.iterdir() if p.is_dir() and not p.name.endswith(".tmp")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in outputs[keep:]:
        _remove_tree(old)


def build_shop_images(arches: tuple[str, ...] = ARCHES) -> Path:
    """Build (cached) and return the OCI image layout of every shop image for ``arches``."""
    return build_all(tuple(arches)).oci_layout


def build_poll_images(arches: tuple[str, ...] = ARCHES) -> Path:
    """Build (cached) and return the OCI image layout of every poll image for ``arches``."""
    return build_all(tuple(arches), app="poll").oci_layout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.world.shop_images", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the images (cached) and print the OCI layout path")
    build.add_argument("--arch", default=",".join(ARCHES), help="comma-separated: amd64,arm64 (default both)")
    build.add_argument("--app", default="shop", choices=sorted(RECIPES_BY_APP), help="which sample app (default shop)")
    build.add_argument("--json", action="store_true", help="print layout, docker archives and index digests")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        result = build_all(tuple(a.strip() for a in args.arch.split(",") if a.strip()), app=args.app)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _log(f"ready in {time.monotonic() - started:.1f}s")
    if args.json:
        print(json.dumps({
            "oci_layout": str(result.oci_layout),
            "docker_archives": {arch: str(path) for arch, path in result.docker_archives.items()},
            "indexes": result.indexes,
        }, indent=2))
    else:
        print(result.oci_layout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
