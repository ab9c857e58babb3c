"""repo_sync through the ansible command, as the sync playbook runs it: check mode sends and writes nothing,
a sync publishes, a rerun changes nothing; errors (bad limit, unknown release, untrusted key) fail clearly."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_modules import collections_path, run_module  # noqa: F401  (fixture)
from tests.unit.test_site_sync import hub, lacking, site, tree_hash, vendor  # noqa: F401  (fixtures)
from tests.helpers.bundles import trust_args


def _args(hub_url: str, repo: str, pub: Path, **extra: object) -> dict:
    return {"hub": hub_url, "name": "mini", "version": "1.1.0", "repo_root": repo, **trust_args(pub), **extra}


def test_repo_sync_check_then_changed_then_unchanged(vendor, hub, site, collections_path):  # noqa: F811
    pub = vendor["dir"] / "vendor.pub"
    before = tree_hash(Path(site.root))
    rc, res = run_module(collections_path, "repo_sync", _args(hub.url, site.root, pub), "--check")
    want = lacking(vendor)
    assert rc == 0 and res["changed"] and res["release"]["blobs_missing"] == len(want), res
    assert not hub.blob_requests() and tree_hash(Path(site.root)) == before

    rc, res = run_module(collections_path, "repo_sync", _args(hub.url, site.root, pub, bandwidth_limit="50M"))
    assert rc == 0 and res["changed"], res
    assert res["release"]["blobs_sent"] == len(want)
    assert res["release"]["bytes_sent"] == sum(b["size"] for b in want)
    assert site.find_release("mini", "1.1.0") is not None

    rc, res = run_module(collections_path, "repo_sync", _args(hub.url, site.root, pub))
    assert rc == 0 and not res["changed"] and res["release"]["bytes_sent"] == 0, res


def test_repo_sync_errors(vendor, hub, site, collections_path):  # noqa: F811
    pub = vendor["dir"] / "vendor.pub"
    rc, res = run_module(collections_path, "repo_sync", _args(hub.url, site.root, pub, bandwidth_limit="fast"))
    assert rc != 0 and "bandwidth_limit 'fast'" in res["msg"], res
    rc, res = run_module(collections_path, "repo_sync", _args(hub.url, site.root, pub, version="2.0.0"))
    assert rc != 0 and "has no release mini 2.0.0" in res["msg"] and "repository unchanged" in res["msg"], res
    rc, res = run_module(collections_path, "repo_sync", _args(hub.url, site.root, vendor["dir"] / "other.pub"))
    assert rc != 0 and "not one of the trusted keys" in res["msg"], res
    assert site.find_release("mini", "1.1.0") is None
