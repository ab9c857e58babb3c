"""Items 1 (key file permissions) and 6 (secrets never shown) of the fault suite.

Trusted keys: a trusted-key file that its group or everyone may write is refused (whoever can write it could
make the site trust their own key), naming the file and the chmod that fixes it, by the API and through the
import module, and the site repository is left untouched.

Secrets on a running site (install, upgrade, rollback, status with -vvv; the outputs, the reports, the compose
file, the unit files, state.json and the journal searched for the generated values; the secret files 0600
root) are checked in tests/faults/test_faults_lifecycle.py, on the same world site as the lifecycle faults, so
the site is brought up once: `test_no_secret_appears_anywhere` there.

Site overrides (issue 16, item 5): the modules that take them (app_deploy, app_k8s_manifests) mark them no_log,
so a run with -vvv shows neither the invocation's nor the result's copy of a value. Keyed fingerprints and the
status without override values: tests/unit/test_fingerprint_secrets.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from offline_delivery_core.app.model import dump_model, load_model
from offline_delivery_core.bundle.ed25519 import Ed25519KeyError, load_public_key_files
from offline_delivery_core.site.repo import SiteRepo
from tests.faults.conftest import Vendor, assert_unchanged, import_args, run_module, site_state

SHOP = Path(__file__).resolve().parents[2] / "examples" / "shop" / "app-1.0.0.yml"
SITE_VALUE = "XTS-site-override-hunter2"   # a site override that is a credential


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


def run_verbose(collections: Path, module: str, args: dict) -> tuple[int, str, dict]:
    """The module run as tests.integration.test_modules.run_module does, with -vvv; everything ansible printed."""
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(collections), ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="false", ANSIBLE_PYTHON_INTERPRETER=sys.executable,
               ANSIBLE_LOAD_CALLBACK_PLUGINS="1")
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible"), "localhost", "-i", "localhost,", "-c",
                           "local", "-o", "-vvv", "-m", f"offline.delivery.{module}", "-a", json.dumps(args)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("localhost | ")), "")
    assert "=> " in line, f"no result from ansible (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.returncode, proc.stdout + proc.stderr, json.loads(line.split("=> ", 1)[1])


def shop_args(tmp_path: Path) -> dict:
    model = load_model(yaml.safe_load(SHOP.read_text()))
    images = {c: {"reference": comp["image"], "index": "sha256:" + "%02x" % i * 32, "manifests": {}}
              for i, (c, comp) in enumerate(sorted(model["components"].items()))}
    return {"model": dump_model(model), "images": images, "registry": "repo.site:5000",
            "secrets": {"db_password": "Qd" * 16, "redis_password": "Qr" * 16}, "state_dir": str(tmp_path / "state")}


@pytest.mark.parametrize("module", ["app_deploy", "app_k8s_manifests"])
def test_a_site_override_never_appears_in_module_output(collections_path: Path, tmp_path: Path,
                                                          module: str) -> None:
    args = shop_args(tmp_path)
    if module == "app_deploy":
        # Fails cleanly before anything runs (no container engine needed): an override of a component the
        # release does not have. The invocation (-vvv) still shows every argument.
        args.update(app="shop", target="compose", apps_dir=str(tmp_path / "apps"), version="1.0.0", host="node1",
                    platform="linux/amd64", placement={c: ["node1"] for c in args["model"]["components"]},
                    overrides={"api": {"SHOP_ADMIN_PASSWORD": SITE_VALUE}, "nosuch": {"X": SITE_VALUE + "-2"}})
    else:
        # Renders (pure; nothing is applied): the returned manifests hold the api's env.
        args.update(overrides={"api": {"SHOP_ADMIN_PASSWORD": SITE_VALUE}}, dest=str(tmp_path / "manifests"))
    rc, output, res = run_verbose(collections_path, module, args)
    if module == "app_deploy":
        assert rc != 0 and "overrides: no component nosuch" in res["msg"], res
    else:
        assert rc == 0 and res["changed"], res
        assert SITE_VALUE in (tmp_path / "manifests" / "009-deployment-api.json").read_text(), "it was rendered"
    assert "invocation" in res, "-vvv shows the module's arguments"
    assert SITE_VALUE not in output, f"a site override value appears in the -vvv output of {module}"
    assert all(v not in output for v in args["secrets"].values())
