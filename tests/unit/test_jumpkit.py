"""The jump-host kit (bundle_builder/jumpkit.py) and its installer (bundle_builder/jumpkit_install.py, install.py in
the kit): what is refused before anything is installed. A kit is sealed here with the real signing code over small
files; the installs themselves (venv, pip, ansible-galaxy on a bare Debian host) run in tests/e2e/test_jump_host.py.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from bundle_builder import cli, jumpkit, jumpkit_install, signing
from offline_delivery_core.bundle.trust import fingerprint
from offline_delivery_core.common.arch import debian_arch
from offline_delivery_core.common.digests import canonical_json

REPO = Path(__file__).resolve().parents[2]
PYTHON = "%d.%d" % sys.version_info[:2]
ARCH = debian_arch(platform.machine())


def make_kit(tmp: Path, targets: list[tuple[str, str]] | None = None) -> tuple[Path, str]:
    """A sealed kit of small files for ``targets`` (default: this machine's); (kit dir, its key's fingerprint)."""
    key_path, _ = signing.keygen(tmp / "vendor")
    key = signing.load_private_key(key_path)
    kit = tmp / "kit"
    entries = []
    for python, arch in targets or [(PYTHON, ARCH)]:
        d = kit / f"wheels/py{python}-{arch}"
        d.mkdir(parents=True)
        (d / "pip-1-py3-none-any.whl").write_bytes(b"pip wheel")
        entries.append({"python": python, "arch": arch, "dir": f"wheels/py{python}-{arch}", "ansible_core": "2.19.1",
                        "pip": "pip-1-py3-none-any.whl"})
    (kit / "collection").mkdir()
    (kit / "collection/offline-delivery-0.2.0.tar.gz").write_bytes(b"collection")
    jumpkit.seal(kit, key, {"format": jumpkit.KIT_FORMAT, "version": "0.2.0", "ansible_core": "ansible-core>=2.19",
                            "collection": {"name": "offline.delivery",
                                           "file": "collection/offline-delivery-0.2.0.tar.gz"},
                            "targets": entries})
    return kit, fingerprint(signing.raw_public_key(key))


def install(kit: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(kit / "install.py"), "--prefix", str(tmp / "venv"),
                           "--collections-path", str(tmp / "collections"), *args],
                          capture_output=True, text=True, timeout=120, check=False)


def refused(res: subprocess.CompletedProcess[str], tmp: Path, *words: str) -> None:
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stderr.startswith("REFUSED: "), res.stderr
    for word in words:
        assert word in res.stderr, (word, res.stderr)
    assert not (tmp / "venv").exists() and not (tmp / "collections").exists(), "something was installed"


def test_kit_layout_and_manifest(tmp_path: Path) -> None:
    kit, _ = make_kit(tmp_path)
    manifest = json.loads((kit / "kit.json").read_bytes())
    paths = {f["path"] for f in manifest["files"]}
    assert {"install.py", "ed25519.py", "arch.py", "collection/offline-delivery-0.2.0.tar.gz",
            f"wheels/py{PYTHON}-{ARCH}/pip-1-py3-none-any.whl"} <= paths
    assert "vendor.pub" not in paths and "kit.json" not in paths and "kit.sig" not in paths
    # the collection's own verifier and the installer travel byte for byte
    assert (kit / "ed25519.py").read_bytes() == (REPO / "plugins/module_utils/bundle/ed25519.py").read_bytes()
    assert (kit / "arch.py").read_bytes() == (REPO / "plugins/module_utils/common/arch.py").read_bytes()
    assert (kit / "install.py").read_bytes() == (REPO / "bundle_builder/jumpkit_install.py").read_bytes()
    assert jumpkit_install.KIT_FORMAT == jumpkit.KIT_FORMAT


def test_an_unpinned_key_is_refused_with_its_fingerprint(tmp_path: Path) -> None:
    kit, pin = make_kit(tmp_path)
    refused(install(kit, tmp_path), tmp_path, "vendor.pub", pin, "not pinned", f"--pin {pin}")


def test_another_key_than_the_pinned_one_is_refused(tmp_path: Path) -> None:
    kit, pin = make_kit(tmp_path)
    other = "sha256:" + "0" * 64
    refused(install(kit, tmp_path, "--pin", other), tmp_path, pin, f"not the pinned key {other}")


def test_a_modified_manifest_fails_the_signature(tmp_path: Path) -> None:
    kit, pin = make_kit(tmp_path)
    doc = json.loads((kit / "kit.json").read_bytes())
    doc["version"] = "9.9.9"
    (kit / "kit.json").write_text(json.dumps(doc))
    refused(install(kit, tmp_path, "--pin", pin), tmp_path, "kit.sig", "modified after signing")


def test_a_tampered_wheel_is_refused_naming_it(tmp_path: Path) -> None:
    kit, pin = make_kit(tmp_path)
    wheel = kit / f"wheels/py{PYTHON}-{ARCH}/pip-1-py3-none-any.whl"
    wheel.write_bytes(b"pip wheeL")
    refused(install(kit, tmp_path, "--pin", pin), tmp_path, str(wheel), "tampered", "nothing was installed")


def test_a_file_of_another_target_is_checked_too(tmp_path: Path) -> None:
    kit, pin = make_kit(tmp_path, [(PYTHON, ARCH), ("3.99", ARCH)])
    (kit / f"wheels/py3.99-{ARCH}/pip-1-py3-none-any.whl").unlink()
    refused(install(kit, tmp_path, "--pin", pin), tmp_path, "py3.99", "media are incomplete")


def test_a_host_the_kit_has_no_wheels_for_is_told_what_to_ask_for(tmp_path: Path) -> None:
    kit, pin = make_kit(tmp_path, [("3.99", ARCH)])
    refused(install(kit, tmp_path, "--pin", pin), tmp_path, f"no wheels for Python {PYTHON} on {ARCH}",
            f"Python 3.99 {ARCH}", f"--python {PYTHON} --arch {ARCH}")


def test_a_signed_path_leaving_the_kit_is_refused(tmp_path: Path) -> None:
    key_path, _ = signing.keygen(tmp_path / "vendor")
    kit = tmp_path / "kit"
    (kit / "wheels").mkdir(parents=True)
    manifest = jumpkit.seal(kit, signing.load_private_key(key_path), {
        "format": jumpkit.KIT_FORMAT, "version": "0.2.0", "ansible_core": "x",
        "collection": {"name": "offline.delivery", "file": "../escape.tar.gz"},
        "targets": [{"python": PYTHON, "arch": ARCH, "dir": "wheels", "ansible_core": "x", "pip": "pip.whl"}]})
    manifest["files"].append({"path": "../escape.tar.gz", "size": 1, "sha256": "0" * 64})
    data = canonical_json(manifest)
    (kit / "kit.json").write_bytes(data)
    (kit / "kit.sig").write_bytes(signing.sign(signing.load_private_key(key_path), data))
    pin = fingerprint(signing.raw_public_key(signing.load_private_key(key_path)))
    refused(install(kit, tmp_path, "--pin", pin), tmp_path, "leaves the kit")


def test_claimed_range_is_meta_runtime() -> None:
    text = (REPO / "meta/runtime.yml").read_text()
    req = jumpkit.claimed_ansible_core(REPO)
    assert req.startswith("ansible-core>=") and req[len("ansible-core"):] in text.replace(" ", "")


def test_platform_tags_cover_manylinux2014_to_debian12_glibc() -> None:
    for arch, machine in (("amd64", "x86_64"), ("arm64", "aarch64")):
        tags = jumpkit.platform_args(arch)[1::2]
        assert f"manylinux2014_{machine}" in tags and f"manylinux_2_36_{machine}" in tags
        assert f"manylinux_2_37_{machine}" not in tags  # Debian 12's glibc is 2.36


@pytest.mark.parametrize("args, words", [
    (["--python", "3.10", "--arch", "amd64"], "--python 3.10"),
    (["--arch", "amd64"], "at least one --python"),
])
def test_jumpkit_bad_usage_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                   words: str) -> None:
    key, _ = signing.keygen(tmp_path / "vendor")
    assert cli.main(["jumpkit", str(tmp_path / "kit"), "--key", str(key), *args]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "kit").exists()


def test_jumpkit_never_writes_into_an_existing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key, _ = signing.keygen(tmp_path / "vendor")
    (tmp_path / "kit").mkdir()
    assert cli.main(["jumpkit", str(tmp_path / "kit"), "--key", str(key), "--python", "3.11", "--arch", "amd64"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_an_existing_prefix_that_is_not_a_kit_install_is_left_alone(tmp_path: Path) -> None:
    kit, pin = make_kit(tmp_path)
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / "mine").write_text("keep")
    res = install(kit, tmp_path, "--pin", pin)
    assert res.returncode == 1 and "is not an install of this kit" in res.stderr, res.stderr
    assert (tmp_path / "venv" / "mine").read_text() == "keep" and not (tmp_path / "collections").exists()
