"""Shared pieces of the fault suite: real signed bundles built by ``bundle-builder``, a site snapshot that
sees every byte, and the helpers that run an import the way a user does.

Bundles are built once per session with the CLI (the code a vendor runs) from OCI layouts written by
tests/helpers/images.py. Tests never modify them: they damage copies.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from offline_delivery_core.bundle import ed25519
from offline_delivery_core.bundle.format import BundleError
from offline_delivery_core.site.repo import RepoError, SiteRepo, import_bundle
from tests.helpers.images import TestImage, pseudo_random, rootfs_layer, write_oci_layout
from tests.integration.test_modules import collections_path, run_module  # noqa: F401  (fixture re-export)
from tests.helpers.bundles import trust_args

BIN = Path(sys.executable).parent
APP = """\
apiVersion: offline.delivery/v1
kind: Application
name: {name}
version: {version}
components:
{components}"""
COMPONENT = "  {name}:\n    image: {ref}\n"


# --------------------------------------------------------------------------------------------------------
# Site state: every path, mode, size and content hash under the repo root


def site_state(root: Path) -> dict[str, str]:
    """``{relative path: "mode size sha256"}`` for every entry under ``root`` (dirs, files, links), plus the
    catalog's bytes; ``{}`` when root does not exist. Two equal states are the same site byte for byte."""
    state: dict[str, str] = {}
    if not root.exists():
        return state
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                state[rel] = f"{st.st_mode:o} {st.st_size} {hashlib.sha256(p.read_bytes()).hexdigest()}"
            elif stat.S_ISLNK(st.st_mode):
                state[rel] = f"{st.st_mode:o} -> {os.readlink(p)}"
            else:
                state[rel] = f"{st.st_mode:o}"
    return state


def state_diff(before: dict[str, str], after: dict[str, str]) -> str:
    """A readable difference between two site states (for assertion messages)."""
    lines = [f"+ {k}" for k in sorted(set(after) - set(before))]
    lines += [f"- {k}" for k in sorted(set(before) - set(after))]
    lines += [f"~ {k}" for k in sorted(set(before) & set(after)) if before[k] != after[k]]
    return "\n".join(lines[:40]) or "(no difference)"


def normalized_state(root: Path) -> dict[str, str]:
    """site_state with the import times taken out of release.json and catalog.json, so two imports of
    the same releases at different times compare equal."""
    state = site_state(root)
    for rel in list(state):
        if rel == "catalog.json" or rel.endswith("/release.json"):
            doc = json.loads((root / rel).read_text())
            for record in doc.get("releases", [doc]):
                record.pop("importedAt", None)
            state[rel] = state[rel].split(" ")[0] + " " + json.dumps(doc, sort_keys=True)
    return state


def assert_unchanged(root: Path, before: dict[str, str], what: str) -> None:
    after = site_state(root)
    assert after == before, f"{what} changed the site:\n{state_diff(before, after)}"


def refused_import(repo: SiteRepo, bundle: Path, keys: list[bytes], **kwargs: object) -> Exception:
    """Import that must be refused with BundleError/RepoError leaving the site byte for byte as it was;
    returns the error."""
    root = Path(repo.root)
    before = site_state(root)
    try:
        result = import_bundle(repo, str(bundle), keys, **kwargs)  # type: ignore[arg-type]
    except (BundleError, RepoError) as exc:
        assert_unchanged(root, before, f"refused import of {bundle.name}")
        return exc
    raise AssertionError(f"import of {bundle.name} was accepted: {result.msg}")


# --------------------------------------------------------------------------------------------------------
# Bundles built by the bundle-builder CLI


def tiny_layer(files: dict[str, bytes]) -> bytes:
    """A real layer tar without tarfile's 10 KiB record padding (headers, data, two zero blocks): the
    smallest honest layer, so an exhaustive byte-flip loop stays short."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    used = sum(512 + -(-len(d) // 512) * 512 for d in files.values())
    return raw[:used + 1024]


def cli(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(BIN / "bundle-builder"), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"bundle-builder {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def write_app(path: Path, name: str, version: str, components: dict[str, str]) -> Path:
    comps = "".join(COMPONENT.format(name=c, ref=ref) for c, ref in sorted(components.items()))
    path.write_text(APP.format(name=name, version=version, components=comps))
    return path


def build(model: Path, out: Path, layout: Path, *extra: str, platforms: str = "linux/amd64") -> Path:
    """``bundle-builder build`` into a fresh ``out``; returns the bundle file (or the parts list)."""
    out.mkdir(parents=True, exist_ok=True)
    proc = cli("build", str(model), "-o", str(out), "--images-from", f"oci:{layout}", "--platform", platforms,
               "--json", *extra)
    return Path(json.loads(proc.stdout)["path"])  # the bundle file, or its .parts.json when split


@dataclass
class Vendor:
    """What a vendor hands a site, and what an attacker might hand it instead."""

    root: Path
    key: Path                # the vendor's private key
    pub: Path                # its public key file (what the site trusts)
    keys: list[bytes]        # the raw trusted key, for the API
    other_key: Path          # a key the site does not trust
    tiny: Path               # tiny 1.0.0: one component, one platform, ~11 KiB
    tiny_next: Path          # tiny 1.1.0, another top layer
    tiny_base: Path          # tiny 0.9.0: what the site already holds before most cases
    unsigned: Path           # tiny 1.0.0 built --unsigned
    foreign: Path            # tiny 1.0.0 signed by other_key
    larger: Path             # two components, two platforms, ~330 KiB (17 members)
    parts: Path              # larger, split into 6 KiB parts (its .parts.json)


@pytest.fixture(scope="session")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Vendor:
    d = tmp_path_factory.mktemp("faults-vendor")
    cli("keygen", str(d / "vendor"))
    cli("keygen", str(d / "intruder"))
    key, pub = d / "vendor.key", d / "vendor.pub"
    images = [TestImage(f"tiny/app:{v}", "amd64", [tiny_layer({"hello": f"{v}\n".encode()})])
              for v in ("0.9.0", "1.0.0", "1.1.0")]
    for arch in ("amd64", "arm64"):
        base = rootfs_layer({"bin/blob": pseudo_random(120_000, arch)}, arch=arch)
        api_top = rootfs_layer({"app/api": b"v2\n"}, size=30_000)
        images += [TestImage("big/api:2.0.0", arch, [base, api_top]).for_arch(arch),
                   TestImage("big/web:2.0.0", arch, [base, rootfs_layer({"app/web": b"w\n"})]).for_arch(arch)]
    layout = write_oci_layout(d / "oci", images)
    tiny = {v: write_app(d / f"tiny-{v}.yml", "tiny", v, {"app": f"tiny/app:{v}"}) for v in ("0.9.0", "1.0.0", "1.1.0")}
    larger = write_app(d / "big.yml", "big", "2.0.0", {"api": "big/api:2.0.0", "web": "big/web:2.0.0"})
    two = "linux/amd64,linux/arm64"
    return Vendor(
        root=d, key=key, pub=pub, keys=[ed25519.load_public_key_pem(pub.read_text())],
        other_key=d / "intruder.key",
        tiny=build(tiny["1.0.0"], d / "out", layout, "--sign-key", str(key)),
        tiny_next=build(tiny["1.1.0"], d / "out", layout, "--sign-key", str(key)),
        tiny_base=build(tiny["0.9.0"], d / "out", layout, "--sign-key", str(key)),
        unsigned=build(tiny["1.0.0"], d / "unsigned", layout, "--unsigned"),
        foreign=build(tiny["1.0.0"], d / "foreign", layout, "--sign-key", str(d / "intruder.key")),
        larger=build(larger, d / "out", layout, "--sign-key", str(key), platforms=two),
        parts=build(larger, d / "split", layout, "--sign-key", str(key), "--volume-size", "6K", platforms=two),
    )


@pytest.fixture
def site(tmp_path: Path, vendor: Vendor) -> SiteRepo:
    """A site repository that already holds tiny 0.9.0 (a refused import must leave it exactly so)."""
    repo = SiteRepo(str(tmp_path / "site"))
    import_bundle(repo, str(vendor.tiny_base), vendor.keys)
    return repo


def copy_to(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def import_args(bundle: Path, repo: SiteRepo, pub: Path, **extra: object) -> dict[str, object]:
    return {"path": str(bundle), "repo_root": repo.root, **trust_args(pub), **extra}
