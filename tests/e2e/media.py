"""Media for the end-to-end tests: bundles built with the real CLI, carried into a site's drop box."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from offline_delivery_core.bundle.format import member_name
from tests.world.shop_images import build_shop_images
from tests.world.site import Site
from tests.world.util import Result, cache_dir, repo_root

BUILD_TIMEOUT = 1800


def bundle_builder(*args: str, timeout: float = BUILD_TIMEOUT) -> None:
    cli = Path(sys.executable).with_name("bundle-builder")
    proc = subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"bundle-builder {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"


def flip_byte_in_layer(src: Path, dest: Path) -> str:
    """Copy a bundle with one byte flipped in the middle of its first carried layer; return that digest."""
    shutil.copyfile(src, dest)
    with tarfile.open(src) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        layer = next(b for b in manifest["blobs"] if b["bundled"] and "layer" in b["mediaType"])
        # blobs/sha256/<hex>, or <hex>.zst when it travels compressed (bundle format 2)
        member = tar.getmember(member_name(layer))
    with open(dest, "r+b") as fh:
        fh.seek(member.offset_data + member.size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x01]))
    return layer["digest"]


def carry(site: Site, bundles: dict[str, Path]) -> None:
    """Put the media into the site's drop box (/srv/transfer in the jump host). Files are hard links to the
    bundle cache where possible: replace a carried file to change it, never write into it. Carrying the vendor's
    key (vendor.pub) also pins it in the site's inventory: in the world the test is also the site's engineer who
    compared the fingerprint with the vendor's."""
    for name, path in bundles.items():
        dest = site.transfer_dir / name
        if path.is_dir():
            dest.mkdir(exist_ok=True)
            for f in path.iterdir():
                _link_or_copy(f, dest / f.name)
        elif name.endswith(".pub"):
            _link_or_copy(path, dest)
            if name == "vendor.pub":
                site.pin_vendor_key(path)


def _link_or_copy(src: Path, dest: Path) -> None:
    if dest.exists():
        dest.unlink()
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def build_shop_bundles(out: Path) -> dict[str, Path]:
    """shop 1.0.0 (full) and 1.1.0 and the broken 1.2.0 (deltas) with Debian 12 packages, a tampered and an
    untrusted 1.1.0, built once per session. Each in its own directory, as media are carried."""
    oci = build_shop_images(("amd64", "arm64"))
    shop = repo_root() / "examples" / "shop"
    for who in ("vendor", "other"):
        bundle_builder("keygen", str(out / who))
    common = ["--images-from", f"oci:{oci}", "--platform", "linux/amd64,linux/arm64", "--packages", "debian-12"]
    bundle_builder("build", str(shop / "app-1.0.0.yml"), "-o", str(out / "shop-1.0.0"), *common,
                   "--sign-key", str(out / "vendor.key"))
    base = ["--base", str(out / "shop-1.0.0" / "shop-1.0.0.bundle"), "--base-pub", str(out / "vendor.pub")]
    bundle_builder("build", str(shop / "app-1.1.0.yml"), "-o", str(out / "shop-1.1.0"), *common, *base,
                   "--sign-key", str(out / "vendor.key"))
    bundle_builder("build", str(shop / "app-1.2.0.yml"), "-o", str(out / "shop-1.2.0"), *common, *base,
                   "--sign-key", str(out / "vendor.key"))
    bundle_builder("build", str(shop / "app-1.1.0.yml"), "-o", str(out / "untrusted"), *common, *base,
                   "--sign-key", str(out / "other.key"))
    (out / "tampered").mkdir()
    flip_byte_in_layer(out / "shop-1.1.0" / "shop-1.1.0.bundle", out / "tampered" / "shop-1.1.0.bundle")
    return {p.name: p for p in out.iterdir()}


def _bundle_inputs(oci: Path) -> list[Path]:
    """Everything the shop bundles are made from: the images' index, the models, the builder and the core."""
    root = repo_root()
    return sorted([oci / "index.json", Path(__file__), *root.glob("examples/shop/app-*.yml"),
                   *root.glob("bundle_builder/*.py"), *root.glob("plugins/module_utils/**/*.py")])


def _stamp(directory: Path) -> str:
    """Size and mtime of every file: carry() hard-links these files into sites, so an in-place write shows."""
    return "".join(f"{p.relative_to(directory)} {p.stat().st_size} {p.stat().st_mtime_ns}\n"
                   for p in sorted(directory.rglob("*")) if p.is_file() and not p.name.startswith("."))


def cached_shop_bundles() -> dict[str, Path]:
    """build_shop_bundles, cached in ${OD_CACHE}/bundles/<key> (the key hashes every input, so any change to
    the images, the models or the code builds anew); concurrent test runs wait for one build."""
    oci = build_shop_images(("amd64", "arm64"))
    digest = hashlib.sha256()
    for path in _bundle_inputs(oci):
        digest.update(str(path.relative_to(path.anchor)).encode() + b"\0" + path.read_bytes() + b"\0")
    base = cache_dir() / "bundles"
    dest = base / digest.hexdigest()[:24]
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / ".complete").exists() and (dest / ".complete").read_text() != _stamp(dest):
            shutil.rmtree(dest)  # a carried hard link was written to in place: never trust that set again
        if not (dest / ".complete").exists():
            work = base / f".tmp-{os.getpid()}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            build_shop_bundles(work)
            (work / ".complete").write_text(_stamp(work))
            shutil.rmtree(dest, ignore_errors=True)
            work.rename(dest)
            for old in base.iterdir():  # one set is enough: drop bundles of older inputs
                if old.is_dir() and old != dest:
                    shutil.rmtree(old, ignore_errors=True)
    return {p.name: p for p in dest.iterdir() if not p.name.startswith(".")}


def recap(result: Result, host: str = "repo") -> dict[str, int]:
    m = re.search(rf"^{host}\s+:\s+(.*)$", result.stdout, flags=re.M)
    assert m, f"no play recap for {host}:\n{result.output[-3000:]}"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


def exposure(site: Site, host: str, unit: str) -> tuple[float, str]:
    """systemd-analyze security's overall exposure of a unit on a host: (level, rating such as "OK")."""
    res = site.exec(host, f"systemd-analyze security --no-pager {unit} | tail -n 1", timeout=120)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", res.stdout)
    assert res.rc == 0 and match, (host, unit, res.output)
    return float(match.group(1)), match.group(2)
