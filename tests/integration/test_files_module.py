"""offline.delivery.repo_files_publish through the ansible command: check mode writes nothing, a real run
publishes, a second run reports no change, errors name the problem."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tests.integration.test_modules import collections_path, run_module  # noqa: F401  (fixture)
from tests.unit.test_files_site import Vendor


def test_repo_files_publish_check_changed_unchanged(sample_world, keypair, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                    collections_path) -> None:  # noqa: F811
    vendor = Vendor(sample_world, keypair, tmp_path)
    data = b"\x7fELF pretend k3s for the module test"
    vendor.release("1.0.0", [f"k3s@v1.30.2+k3s1/arm64={vendor.binary('k3s', data)}"])
    args = {"repo_root": str(vendor.repo)}

    rc, res = run_module(collections_path, "repo_files_publish", args, "--check")
    assert rc == 0 and res["changed"] and res["links_changed"] == ["k3s/v1.30.2+k3s1/arm64/k3s"], res
    assert "would change" in res["msg"] and not vendor.www.exists()

    rc, res = run_module(collections_path, "repo_files_publish", args)
    assert rc == 0 and res["changed"] and res["index_changed"], res
    served = vendor.served("k3s/v1.30.2+k3s1/arm64/k3s")
    assert hashlib.sha256(served.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert res["files"][0]["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert json.loads(vendor.served("index.json").read_bytes())["files"] == res["files"]

    rc, res = run_module(collections_path, "repo_files_publish", args)
    assert rc == 0 and not res["changed"] and res["msg"] == "1 files served; nothing to change", res


def test_repo_files_publish_fails_naming_the_missing_blob(sample_world, keypair, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                         collections_path) -> None:  # noqa: F811
    vendor = Vendor(sample_world, keypair, tmp_path)
    vendor.release("1.0.0", [f"tool/amd64={vendor.binary('tool', b'tool')}"])
    digest = hashlib.sha256(b"tool").hexdigest()
    os.unlink(vendor.repo / "blobs" / "sha256" / digest)
    rc, res = run_module(collections_path, "repo_files_publish", {"repo_root": str(vendor.repo)})
    assert rc != 0 and f"blob sha256:{digest} (tool 1.0.0 amd64, from demo 1.0.0) is missing" in res["msg"], res
