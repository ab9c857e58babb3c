"""The jump-host kit: what a bare Debian jump host needs to run every playbook and the ``offline-delivery`` command.

Inside the air gap the jump host is a customer machine with python3 and nothing else. ``bundle-builder jumpkit``
writes a directory for the media::

    install.py          the site's one command (bundle_builder/jumpkit_install.py; stdlib only)
    ed25519.py          the collection's own pure-Python verifier (plugins/module_utils/bundle/ed25519.py)
    arch.py             the product's architecture names (plugins/module_utils/common/arch.py)
    vendor.pub          the vendor's public key: a carrier, used only when its fingerprint is pinned on the command
    kit.json            the manifest: every other file with its size and sha256, the wheels of each target
    kit.sig             its signature by the vendor key, the same document as a bundle's manifest.sig
    collection/offline-delivery-<version>.tar.gz      ``ansible-galaxy collection build`` of the collection
    wheels/py<X.Y>-<arch>/*.whl                       per target Python and architecture: ansible-core (the
                        newest of meta/runtime.yml's claimed range that runs on that Python, as pip resolves it),
                        the offline-delivery package and every dependency, plus pip itself (the installer runs
                        it from its wheel: a bare Debian python3 has no ensurepip)

The wheels come from ``pip download --only-binary=:all:`` for each target's platform tag, so a jump host needs
no compiler and no network. docs/jump-host.md tells the site's side.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from offline_delivery_core.common.digests import canonical_json, sha256_file
from offline_delivery_core.bundle import format as bundle_format

from . import __version__, signing

KIT_FORMAT = "offline-delivery-jumpkit/1"
MANIFEST = "kit.json"
SIGNATURE = "kit.sig"
PUBLIC_KEY = "vendor.pub"
INSTALLER = "install.py"
# The collection's own stdlib modules the installer imports from the kit: the signature check, the arch names.
KIT_MODULES = {"ed25519.py": "bundle/ed25519.py", "arch.py": "common/arch.py"}
MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}
# glibc of Debian 12 is 2.36 (Debian 13: 2.41): any manylinux wheel up to 2.36 runs on both; pip takes only the
# platform tags it is given, so all of them are named (2.17 is manylinux2014, the oldest any dependency needs).
GLIBC_MINORS = range(17, 37)
PYTHON_RE = re.compile(r"^3\.(1[1-9])\Z")
DOWNLOAD_TIMEOUT = 1800
# What pyproject.toml's package-dir builds the offline-delivery package from.
PACKAGE_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "bundle_builder", "offline_delivery_cli",
                   "offline_delivery_common", "plugins/module_utils")


class KitError(ValueError):
    """A kit cannot be built: the message names the input (Python, architecture, tool, path) and what to do."""


def source_root() -> Path:
    """The checkout the builder runs from: it holds the collection (galaxy.yml) and the package (pyproject.toml)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "galaxy.yml").is_file() or not (root / "pyproject.toml").is_file():
        raise KitError(f"{root} is not the offline.delivery source tree (no galaxy.yml/pyproject.toml): "
                       "bundle-builder jumpkit runs from a checkout, where the collection is built")
    return root


def claimed_ansible_core(root: Path) -> str:
    """The pip requirement of meta/runtime.yml's requires_ansible: the range the collection is tested on."""
    text = (root / "meta" / "runtime.yml").read_text(encoding="utf-8")
    match = re.search(r"^requires_ansible:\s*[\"']?([^\"'\n]+)[\"']?\s*$", text, flags=re.M)
    if not match:
        raise KitError(f"{root / 'meta' / 'runtime.yml'}: no requires_ansible")
    return "ansible-core" + match.group(1).replace(" ", "")


def _run(argv: Sequence[str], what: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd, timeout=DOWNLOAD_TIMEOUT, check=False)
    if proc.returncode != 0:
        raise KitError(f"{what} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc.stdout


def _tool(name: str) -> str:
    """A command of the builder's own environment first (the venv bundle-builder runs in), then PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise KitError(f"{name} not found beside {sys.executable} or on PATH: install ansible-core where "
                       "bundle-builder runs (it builds the collection tarball)")
    return found


def build_collection(root: Path, out: Path) -> Path:
    """``ansible-galaxy collection build`` of the checkout into ``out``; the tarball's path."""
    out.mkdir(parents=True, exist_ok=True)
    _run([_tool("ansible-galaxy"), "collection", "build", "--force", "--output-path", str(out), str(root)],
         "ansible-galaxy collection build")
    built = sorted(out.glob("offline-delivery-*.tar.gz"))
    if len(built) != 1:
        raise KitError(f"ansible-galaxy collection build left {len(built)} tarballs in {out}, expected one")
    return built[0]


def build_package(root: Path, out: Path) -> Path:
    """The offline-delivery wheel (pure Python: the CLI, what it shares with the builder, the core)."""
    out.mkdir(parents=True, exist_ok=True)
    # Built from a copy of what the package is made of: setuptools reuses a build/ directory in the tree it
    # builds, and a file deleted from the checkout would live on there (and in the wheel).
    tree = out / "src"
    for name in PACKAGE_SOURCES:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            tree.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tree / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(tree)],
         "pip wheel of the offline-delivery package")
    shutil.rmtree(tree)
    built = sorted(out.glob("offline_delivery-*.whl"))
    if len(built) != 1:
        raise KitError(f"pip wheel left {len(built)} offline_delivery wheels in {out}, expected one")
    return built[0]


def download_wheels(requirements: Sequence[str], python: str, arch: str, out: Path,
                    find_links: Path) -> None:
    """Every wheel of ``requirements`` and their dependencies for CPython ``python`` on Linux ``arch``."""
    _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary=:all:",
          *platform_args(arch), "--python-version", python, "--implementation", "cp",
          "--find-links", str(find_links), "-d", str(out), *requirements],
         f"pip download for Python {python} on {arch}")


def platform_args(arch: str) -> list[str]:
    """pip's --platform options for a Debian 12/13 host of ``arch``: every manylinux tag its glibc runs."""
    machine = MACHINES[arch]
    tags = [f"manylinux_2_{minor}_{machine}" for minor in reversed(GLIBC_MINORS)] + [f"manylinux2014_{machine}"]
    return [a for tag in tags for a in ("--platform", tag)]


def _wheel_name(path: Path) -> tuple[str, str]:
    """(normalized project name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def _check_targets(pythons: Sequence[str], arches: Sequence[str]) -> list[tuple[str, str]]:
    if not pythons or not arches:
        raise KitError("name at least one --python (e.g. 3.11) and one --arch (amd64, arm64)")
    for python in pythons:
        if not PYTHON_RE.match(python):
            raise KitError(f"--python {python}: expected 3.X with X >= 11 (the package needs Python 3.11+)")
    for arch in arches:
        if arch not in MACHINES:
            raise KitError(f"--arch {arch}: one of {', '.join(sorted(MACHINES))}")
    return [(p, a) for p in dict.fromkeys(pythons) for a in dict.fromkeys(arches)]


def write_kit(out: Path, key_path: Path, pythons: Sequence[str], arches: Sequence[str]) -> dict[str, Any]:
    """Build the kit into the new directory ``out``; returns its manifest. Nothing is left at ``out`` on failure."""
    targets = _check_targets(pythons, arches)
    key = signing.load_private_key(key_path)
    if out.exists():
        raise KitError(f"{out} already exists: the kit is written to a new directory (remove it or choose another)")
    root = source_root()
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = _fill(work, root, key, targets)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _fill(work: Path, root: Path, key: Any, targets: list[tuple[str, str]]) -> dict[str, Any]:
    collection = build_collection(root, work / "collection")
    package = build_package(root, work / ".package")
    core = claimed_ansible_core(root)
    entries = []
    for python, arch in targets:
        rel = f"wheels/py{python}-{arch}"
        dest = work / rel
        download_wheels([core, f"offline-delivery=={__version__}", "pip"], python, arch, dest,
                        find_links=package.parent)
        wheels = sorted(dest.glob("*.whl"))
        names = dict(_wheel_name(w) for w in wheels)
        if "ansible-core" not in names or "pip" not in names:
            raise KitError(f"pip download for Python {python} on {arch} gave no ansible-core or pip wheel")
        extra = sorted(p.name for p in dest.iterdir() if not p.name.endswith(".whl"))
        if extra:
            raise KitError(f"pip download for Python {python} on {arch} left non-wheel files: {', '.join(extra)}")
        entries.append({"python": python, "arch": arch, "dir": rel, "ansible_core": names["ansible-core"],
                        "pip": next(w.name for w in wheels if _wheel_name(w)[0] == "pip")})
    shutil.rmtree(work / ".package")
    return seal(work, key, {"format": KIT_FORMAT, "version": __version__,
                            "collection": {"name": "offline.delivery", "file": collection.relative_to(work).as_posix()},
                            "ansible_core": core, "targets": entries})


def seal(work: Path, key: Any, header: dict[str, Any]) -> dict[str, Any]:
    """Add the installer, the verifier and the public key to the kit in ``work``, then write kit.json (``header``
    plus every file but vendor.pub with its size and sha256) and kit.sig; returns the manifest."""
    module_utils = Path(bundle_format.__file__).parent.parent
    for name, src in KIT_MODULES.items():
        shutil.copyfile(module_utils / src, work / name)
    shutil.copyfile(Path(__file__).with_name("jumpkit_install.py"), work / INSTALLER)
    (work / PUBLIC_KEY).write_bytes(signing.public_key_pem(key.public_key()))
    files = sorted(p for p in work.rglob("*") if p.is_file())
    manifest = {**header, "files": [{"path": p.relative_to(work).as_posix(), "size": p.stat().st_size,
                                     "sha256": sha256_file(str(p))} for p in files if p.name != PUBLIC_KEY]}
    data = canonical_json(manifest)
    (work / MANIFEST).write_bytes(data)
    (work / SIGNATURE).write_bytes(signing.sign(key, data))
    for d in [work, *[p for p in work.rglob("*") if p.is_dir()]]:
        os.chmod(d, 0o755)
    return manifest


def summary(manifest: dict[str, Any], out: Path) -> list[str]:
    """Lines for the vendor: what each target gets, the kit's size, the installer's sha256."""
    lines = []
    for t in manifest["targets"]:
        size = sum(f["size"] for f in manifest["files"] if f["path"].startswith(t["dir"] + "/"))
        count = sum(1 for f in manifest["files"] if f["path"].startswith(t["dir"] + "/"))
        lines.append(f"Python {t['python']} {t['arch']}: ansible-core {t['ansible_core']}, {count} wheels, "
                     f"{size / 1e6:.1f} MB")
    total = sum(f["size"] for f in manifest["files"])
    lines.append(f"{out}: {len(manifest['files'])} files, {total / 1e6:.1f} MB")
    lines.append(f"install.py sha256:{sha256_file(out / INSTALLER)} (the installer runs before any check: a "
                 "careful site compares this with the vendor's too)")
    return lines
