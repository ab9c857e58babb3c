"""offline.delivery.app_k8s_manifests run through the ansible command: check mode writes nothing, a render is
written once and then unchanged, an upgrade rewrites only what changed, secrets never appear in the result,
and the written directory passes kubernetes-validate --strict for 1.31."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from offline_delivery_core.app.model import dump_model, load_model
from tests.integration.test_modules import collections_path, run_module  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {"db_password": "Zq" * 16, "redis_password": "Yw" * 16}


def release(version: str) -> dict:
    model = load_model(yaml.safe_load((ROOT / "examples" / "shop" / ("app-%s.yml" % version)).read_text()))
    images = {c: {"reference": comp["image"], "index": "sha256:" + ("%02x" % i) * 32, "manifests": {}}
              for i, (c, comp) in enumerate(sorted(model["components"].items()))}
    # Components whose image did not change keep their digest across releases, as in a real bundle.
    if version != "1.0.0":
        images["api"]["index"] = "sha256:" + version.replace(".", "")[:2] * 32
    return {"model": dump_model(model), "images": images}


def args(version: str, dest: Path) -> dict:
    return dict(release(version), registry="repo.site:5000", secrets=SECRETS, storage_class="local-path",
                dest=str(dest), state_dir=str(dest.parent / "state"))  # the fingerprint key, not the host's


def test_render_check_write_unchanged_upgrade(collections_path: Path, tmp_path: Path) -> None:  # noqa: F811
    dest = tmp_path / "k8s" / "shop"
    rc, res = run_module(collections_path, "app_k8s_manifests", args("1.0.0", dest), "--check")
    assert rc == 0 and res["changed"], res
    assert not dest.exists(), "check mode must write nothing"

    rc, res = run_module(collections_path, "app_k8s_manifests", args("1.0.0", dest))
    assert rc == 0 and res["changed"] and len(res["files"]["written"]) == 14, res
    assert res["files"]["written"][0] == "000-namespace-shop.json"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in dest.iterdir())
    assert all(value not in json.dumps(res) for value in SECRETS.values())
    first = res["fingerprints"]

    rc, res = run_module(collections_path, "app_k8s_manifests", args("1.0.0", dest))
    assert rc == 0 and not res["changed"] and not res["files"]["written"], res

    rc, res = run_module(collections_path, "app_k8s_manifests", args("1.1.0", dest))
    assert rc == 0 and res["changed"], res
    changed = {c for c in first if first[c] != res["fingerprints"][c]}
    assert changed == {"api"}
    # Every object's release label/annotation moves to 1.1.0, but only the API's workload spec changes.
    api = json.loads((dest / "009-deployment-api.json").read_text())
    assert api["spec"]["template"]["spec"]["containers"][0]["image"].startswith("repo.site:5000/shop/api:1.1.0@")

    cli = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    if not Path(cli).exists():
        pytest.skip("kubernetes-validate is not installed (test extras)")
    proc = subprocess.run([cli, "--strict", "-k", "1.31.0", "--quiet", *sorted(map(str, dest.iterdir()))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stale_files_are_removed(collections_path: Path, tmp_path: Path) -> None:  # noqa: F811
    dest = tmp_path / "out"
    run_module(collections_path, "app_k8s_manifests", args("1.0.0", dest))
    (dest / "README").write_text("mine\n")
    model = release("1.0.0")
    del model["model"]["components"]["gateway"]
    rc, res = run_module(collections_path, "app_k8s_manifests", dict(args("1.0.0", dest), **model))
    assert rc == 0 and res["changed"]
    assert sorted(res["files"]["removed"]) == ["010-configmap-gateway-config.json", "011-service-gateway.json",
                                               "012-service-gateway-published.json", "013-deployment-gateway.json"]
    assert (dest / "README").read_text() == "mine\n"


def test_errors_name_the_field(collections_path: Path, tmp_path: Path) -> None:  # noqa: F811
    bad = args("1.0.0", tmp_path / "x")
    del bad["images"]["api"]["index"]
    rc, res = run_module(collections_path, "app_k8s_manifests", bad)
    assert rc != 0 and "images.api: no 'index' digest" in res["msg"]
    bad = args("1.0.0", tmp_path / "x")
    bad["overrides"] = {"web": {"A": "1"}}
    rc, res = run_module(collections_path, "app_k8s_manifests", bad)
    assert rc != 0 and "overrides: no component web" in res["msg"]
    assert not (tmp_path / "x").exists()


def test_a_changed_job_is_a_new_job_file(collections_path: Path, tmp_path: Path) -> None:  # noqa: F811
    """A component of kind job: a Job file named after its fingerprint, no Service; the job's fingerprint is
    returned; rendered again unchanged nothing is written, changed the Job gets a new name (the earlier file
    is removed) so `kubectl apply` creates and runs it (docs/kubernetes.md "Jobs")."""
    from tests.unit.test_app_k8s import MIGRATE, shop_with_job

    dest = tmp_path / "out"

    def with_job(command: list) -> dict:
        base = args("1.0.0", dest)
        model = shop_with_job(command)
        base["model"] = dump_model(model)
        base["images"]["migrate"] = dict(base["images"]["api"])
        return base

    rc, res = run_module(collections_path, "app_k8s_manifests", with_job(MIGRATE))
    assert rc == 0 and res["changed"], res
    fp = res["fingerprints"]["migrate"]
    job_file = "-job-migrate-%s.json" % fp.split(":")[1][:10]
    assert [f for f in res["files"]["written"] if f.endswith(job_file)], res["files"]
    assert not [f for f in res["files"]["written"] if "-service-migrate" in f]
    rc, res = run_module(collections_path, "app_k8s_manifests", with_job(MIGRATE))
    assert rc == 0 and not res["changed"], res
    rc, res = run_module(collections_path, "app_k8s_manifests", with_job(MIGRATE + ["--again"]))
    assert rc == 0 and res["changed"] and res["fingerprints"]["migrate"] != fp, res
    assert [f for f in res["files"]["removed"] if f.endswith(job_file)], res["files"]
    assert [f for f in res["files"]["written"] if "-job-migrate-" in f], res["files"]
