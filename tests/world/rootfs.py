"""Debian root filesystems for the test world's hosts, built with mmdebstrap and cached by recipe hash.

A recipe is (suite, arch, variant, packages, customize hooks). Its hash names the cached tar, so changing
any part of it (or a hook script's text) rebuilds; anything else reuses the cache. The suite is a parameter:
bookworm today, trixie is one name away.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shlex
import time
from pathlib import Path

from offline_delivery_core.common.arch import debian_arch
from offline_delivery_core.common.digests import sha256_file

from .util import WorldError, cache_dir, file_lock, log, run

# The Debian name of this machine's architecture (the others run under qemu).
NATIVE_ARCH = debian_arch(platform.machine())

# Bumped when the way a recipe turns into a tar changes (not visible in the fields below).
FORMAT_VERSION = 1
DEFAULT_SUITE = "bookworm"
HOOKS_DIR = Path(__file__).resolve().parent / "hooks"
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")

# A small Debian server: systemd as PID 1, sshd for ansible, python3 (+ python3-apt so ansible's apt
# module works without installing anything), sudo for become tests, and the basic tools.
HOST_PACKAGES: tuple[str, ...] = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-apt", "sudo",
    "iproute2", "ca-certificates", "procps",
)

SOURCES_DEB822 = Path("/etc/apt/sources.list.d/debian.sources")
SOURCES_LIST = Path("/etc/apt/sources.list")


@dataclasses.dataclass(frozen=True)
class RootfsRecipe:
    """What goes into one root filesystem."""

    arch: str = "amd64"
    suite: str = DEFAULT_SUITE
    variant: str = "minbase"
    packages: tuple[str, ...] = HOST_PACKAGES
    hooks: tuple[str, ...] = ("customize-host.sh",)  # file names under tests/world/hooks/

    def hook_paths(self) -> list[Path]:
        return [HOOKS_DIR / name for name in self.hooks]

    def key(self) -> str:
        """Hash of everything that decides the content: fields, hook texts, format version."""
        doc = {
            "format": FORMAT_VERSION,
            "fields": dataclasses.asdict(self),
            "hooks": {p.name: p.read_text() for p in self.hook_paths()},
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def name(self) -> str:
        return f"{self.suite}-{self.arch}-{self.key()}"


@dataclasses.dataclass(frozen=True)
class Rootfs:
    """A built root filesystem tar and the sha256 of its bytes (its diff_id as an image layer)."""

    recipe: RootfsRecipe
    path: Path
    sha256: str


def debian_mirror(suite: str = DEFAULT_SUITE) -> str:
    """The Debian archive URL this machine's apt uses (never hard-coded: CI machines differ)."""
    if SOURCES_DEB822.exists():
        url = _mirror_from_deb822(SOURCES_DEB822.read_text(), suite)
        if url:
            return url
    if SOURCES_LIST.exists():
        url = _mirror_from_one_line(SOURCES_LIST.read_text(), suite)
        if url:
            return url
    raise WorldError(f"no Debian archive found in {SOURCES_DEB822} or {SOURCES_LIST}: add a 'deb' source "
                     f"for the main archive (e.g. suite {suite}) or set OD_DEBIAN_MIRROR")


def _is_main_archive_suite(name: str) -> bool:
    return not re.search(r"-(security|updates|backports|proposed-updates)$", name) and "/" not in name


def _mirror_from_deb822(text: str, suite: str) -> str | None:
    """First URI of a `Types: deb` stanza serving the main archive (preferring one that lists `suite`)."""
    fallback = None
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        suites = fields.get("suites", "").split()
        uris = fields.get("uris", "").split()
        if not uris or not any(_is_main_archive_suite(s) for s in suites):
            continue
        if suite in suites:
            return uris[0]
        fallback = fallback or uris[0]
    return fallback


def _mirror_from_one_line(text: str, suite: str) -> str | None:
    fallback = None
    for line in text.splitlines():
        parts = [p for p in re.sub(r"\[[^]]*\]", "", line).split() if p]
        if len(parts) >= 3 and parts[0] == "deb" and _is_main_archive_suite(parts[2]):
            if parts[2] == suite:
                return parts[1]
            fallback = fallback or parts[1]
    return fallback


def foreign_arch_problem(arch: str) -> str | None:
    """Why this machine cannot run `arch` binaries (None when it can): native, or qemu via binfmt with F."""
    if arch == NATIVE_ARCH:
        return None
    qemu_names = {"arm64": "qemu-aarch64", "armhf": "qemu-arm", "amd64": "qemu-x86_64"}
    entry = Path("/proc/sys/fs/binfmt_misc") / qemu_names.get(arch, f"qemu-{arch}")
    if not entry.exists():
        return (f"{entry} missing: install qemu-user-static binfmt-support, mount binfmt_misc and run "
                f"'update-binfmts --enable {entry.name}' (scripts/bootstrap does this)")
    text = entry.read_text()
    if not text.startswith("enabled"):
        return f"{entry} is disabled: run 'update-binfmts --enable {entry.name}'"
    flags = re.search(r"^flags:\s*(\S*)", text, re.M)
    if not flags or "F" not in flags.group(1):
        return f"{entry} lacks flag F (fix-binary), needed inside containers: reinstall qemu-user-static"
    return None


def _cache_paths(recipe: RootfsRecipe) -> tuple[Path, Path]:
    tar_path = cache_dir() / "rootfs" / f"{recipe.name()}.tar"
    return tar_path, tar_path.with_suffix(".tar.sha256")


def cached_rootfs(recipe: RootfsRecipe) -> Rootfs | None:
    """The cached root filesystem of `recipe`, or None when it has not been built."""
    tar_path, sum_path = _cache_paths(recipe)
    if tar_path.exists() and sum_path.exists():
        return Rootfs(recipe, tar_path, sum_path.read_text().strip())
    return None


def build_rootfs(recipe: RootfsRecipe, mirror: str | None = None) -> Rootfs:
    """Return the cached root filesystem for `recipe`, building it with mmdebstrap when absent."""
    tar_path, sum_path = _cache_paths(recipe)
    with file_lock(tar_path.with_suffix(".lock")):
        cached = cached_rootfs(recipe)
        if cached:
            return cached
        problem = foreign_arch_problem(recipe.arch)
        if problem:
            raise WorldError(f"cannot build the {recipe.arch} root filesystem: {problem}")
        mirror = mirror or os.environ.get("OD_DEBIAN_MIRROR") or debian_mirror(recipe.suite)
        _mmdebstrap(recipe, mirror, tar_path)
        digest = sha256_file(tar_path)
        sum_path.write_text(digest + "\n")
    return Rootfs(recipe, tar_path, digest)


def _mmdebstrap(recipe: RootfsRecipe, mirror: str, tar_path: Path) -> None:
    # The output name must end in .tar for mmdebstrap to pick the format; rename when complete so a
    # half-written tar is never taken for a cached one.
    partial = tar_path.with_name(f".partial-{os.getpid()}-{tar_path.name}")
    log_path = tar_path.with_suffix(".log")
    hooks = [f"--customize-hook={shlex.quote('sh')} {shlex.quote(str(p))} \"$1\"" for p in recipe.hook_paths()]
    args = [
        "mmdebstrap", f"--variant={recipe.variant}", f"--architectures={recipe.arch}",
        f"--include={','.join(recipe.packages)}", f"--hook-dir={MERGED_USR_HOOKS}", *hooks,
        recipe.suite, str(partial), mirror,
    ]
    log(f"building root filesystem {tar_path.name} (mmdebstrap {recipe.suite} {recipe.arch}; log {log_path})")
    started = time.monotonic()
    # arm64 runs every maintainer script under qemu: minutes, not seconds.
    result = run(args, timeout=1800)
    log_path.write_text(result.output)
    if result.rc != 0:
        partial.unlink(missing_ok=True)
        tail = result.output.strip()[-2000:]
        raise WorldError(f"mmdebstrap for {tar_path.name} failed (rc={result.rc}), full log in {log_path}:\n{tail}")
    partial.rename(tar_path)
    log(f"built {tar_path.name} in {time.monotonic() - started:.0f}s ({tar_path.stat().st_size >> 20} MiB)")
