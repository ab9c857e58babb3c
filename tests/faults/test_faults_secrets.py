"""Items 1 (key file permissions) and 6 (secrets never shown) of the fault suite.

Trusted keys: a trusted-key file that its group or everyone may write is refused (whoever can write it could
make the site trust their own key), naming the file and the chmod that fixes it, by the API and through the
import module, and the site repository is left untouched.

Secrets on a running site (install, upgrade, rollback, status with -vvv; the outputs, the reports, the compose
file, the unit files, state.json and the journal searched for the generated values; the secret files 0600
root) are checked in tests/faults/test_faults_lifecycle.py, on the same world site as the lifecycle faults, so
the site is brought up once: `test_no_secret_appears_anywhere` there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from offline_delivery_core.ed25519 import Ed25519KeyError, load_public_key_files
from offline_delivery_core.site_repo import SiteRepo
from tests.faults.conftest import Vendor, assert_unchanged, import_args, run_module, site_state


@pytest.mark.parametrize("mode", [0o666, 0o646, 0o664, 0o620, 0o602])
def test_a_writable_trusted_key_file_is_refused(vendor: Vendor, tmp_path: Path, mode: int) -> None:
    key = tmp_path / "vendor.pub"
    key.write_bytes(vendor.pub.read_bytes())
    os.chmod(key, mode)
    with pytest.raises(Ed25519KeyError) as err:
        load_public_key_files([str(key)])
    text = str(err.value)
    assert str(key) in text and "writable" in text and f"chmod 644 {key}" in text, text
    assert ("everyone" if mode & 0o002 else "its group") in text, text


@pytest.mark.parametrize("mode", [0o644, 0o444, 0o600, 0o640, 0o400])
def test_a_key_file_nobody_else_can_write_is_loaded(vendor: Vendor, tmp_path: Path, mode: int) -> None:
    """The refusal is about write access only: the usual modes keep working (the check cannot always fail)."""
    key = tmp_path / "vendor.pub"
    key.write_bytes(vendor.pub.read_bytes())
    os.chmod(key, mode)
    assert load_public_key_files([str(key)]) == vendor.keys


def test_the_checked_file_is_the_one_read(vendor: Vendor, tmp_path: Path) -> None:
    """A writable key behind a safe-looking symlink is refused: the mode is taken from the opened file."""
    target = tmp_path / "writable.pub"
    target.write_bytes(vendor.pub.read_bytes())
    os.chmod(target, 0o666)
    link = tmp_path / "vendor.pub"
    link.symlink_to(target)
    with pytest.raises(Ed25519KeyError, match="writable"):
        load_public_key_files([str(link)])


def test_the_import_module_refuses_a_writable_key_and_leaves_the_site(vendor: Vendor, site: SiteRepo,
                                                                      tmp_path: Path, collections_path: Path) -> None:
    key = tmp_path / "vendor.pub"
    key.write_bytes(vendor.pub.read_bytes())
    os.chmod(key, 0o664)
    before = site_state(Path(site.root))
    rc, res = run_module(collections_path, "bundle_import", import_args(vendor.tiny, site, key))
    assert rc != 0 and not res.get("changed"), res
    assert str(key) in res["msg"] and f"chmod 644 {key}" in res["msg"], res["msg"]
    assert_unchanged(Path(site.root), before, "import with a writable trusted key")
