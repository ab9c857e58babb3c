"""offline.delivery.repo_have through the ansible command: check mode writes nothing, a real run writes the
signed list and the site key, a second run reports no change, a bad repository root fails naming it."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from offline_delivery_core.bundle import ed25519
from offline_delivery_core.site import have as site_have
from tests.integration.test_modules import collections_path, run_module  # noqa: F401  (fixture)
from tests.unit.test_files_site import Vendor


def test_repo_have_check_changed_unchanged(sample_world, keypair, tmp_path: Path,  # type: ignore[no-untyped-def]
                                           collections_path) -> None:  # noqa: F811
    vendor = Vendor(sample_world, keypair, tmp_path)
    vendor.release("1.0.0", [])
    dest, keys = tmp_path / "have" / "north.have.json", tmp_path / "keys"
    args = {"repo_root": str(vendor.repo), "site": "north", "dest": str(dest), "key_dir": str(keys)}

    rc, res = run_module(collections_path, "repo_have", args, "--check")
    assert rc == 0 and res["changed"] and res["key_created"] and "would write" in res["msg"], res
    assert not dest.exists() and not keys.exists()

    rc, res = run_module(collections_path, "repo_have", args)
    assert rc == 0 and res["changed"] and res["key_created"] and res["blobs"] > 0, res
    assert res["releases"][0]["name"] == "demo" and res["releases"][0]["version"] == "1.0.0"
    assert stat.S_IMODE((keys / site_have.KEY_NAME).stat().st_mode) == 0o600
    pub = ed25519.load_public_key_pem(Path(res["pub_path"]).read_text())
    assert res["pub_path"] == str(tmp_path / "have" / "north.have.pub")
    assert ed25519.public_key_id(pub) == res["keyid"]
    doc = site_have.verify_have(dest.read_bytes(), [pub])
    assert len(doc["blobs"]) == res["blobs"] and doc["site"] == "north"

    for extra in (("--check",), ()):
        rc, res = run_module(collections_path, "repo_have", args, *extra)
        assert rc == 0 and not res["changed"] and "already current" in res["msg"], res

    vendor.release("1.1.0", [])
    rc, res = run_module(collections_path, "repo_have", args)
    assert rc == 0 and res["changed"] and not res["key_created"], res
    assert [r["version"] for r in json.loads(dest.read_bytes())["releases"]] == ["1.0.0", "1.1.0"]


def test_repo_have_fails_naming_the_root(tmp_path: Path, collections_path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    args = {"repo_root": str(tmp_path / "nothing"), "site": "north", "dest": str(tmp_path / "h.have.json"),
            "key_dir": str(tmp_path / "keys")}
    rc, res = run_module(collections_path, "repo_have", args)
    assert rc != 0 and f"{tmp_path / 'nothing'} is not a site repository" in res["msg"], res
