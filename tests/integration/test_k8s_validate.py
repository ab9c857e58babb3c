"""The shop's rendered manifests pass strict schema validation for Kubernetes 1.31 (kubernetes-validate) and
the renderer's own cross-object checks, for every release of the sample (1.0.0, 1.1.0, 1.2.0)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from offline_delivery_core.targets.k8s import check_manifests, render_manifests
from offline_delivery_core.app.model import load_model

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extras")

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.31.0"
SECRETS = {"db_password": "A" * 32, "redis_password": "B" * 32}
VERSIONS = ("1.0.0", "1.1.0", "1.2.0")


def shop_manifests(version: str, **kwargs: object) -> list:
    model = load_model(yaml.safe_load((ROOT / "examples" / "shop" / ("app-%s.yml" % version)).read_text()))
    args = dict(namespace="shop", secrets=SECRETS, registry="repo.site:5000",
                image_digests={c: "sha256:" + "0f" * 32 for c in model["components"]}, include_namespace=True,
                fingerprint_key=b"k" * 32)
    args.update(kwargs)
    return render_manifests(model, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("options", [{}, {"publish_type": "LoadBalancer", "storage_class": "local-path"},
                                     {"node_port_range": (1, 32767), "overrides": {"api": {"SHOP_CURRENCY": "CHF"}}}],
                         ids=["defaults", "loadbalancer-storageclass", "nodeport-overrides"])
def test_shop_manifests_validate_strictly(version: str, options: dict) -> None:
    objects = shop_manifests(version, **options)
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert check_manifests(objects) == []


def test_a_port_less_component_gets_a_headless_service_in_dns() -> None:
    """Issue #20 item 4: compose files often give internal services no ports (any port is reachable on a compose
    network). Such a component still gets its name in cluster DNS, a headless Service (no ports, clusterIP
    None), so a dependent's ${host} resolves; with a volume its StatefulSet's serviceName names that Service.
    Valid for the API server's schema and for the renderer's cross-object checks."""
    model = load_model(yaml.safe_load((ROOT / "examples" / "shop" / "app-1.0.0.yml").read_text()))
    for name in ("redis", "db"):
        model["components"][name]["ports"] = []
        model["components"][name]["health"] = {"exec": ["true"], "interval": 5, "timeout": 3, "retries": 3,
                                               "start_period": 0}
    model = load_model(model)
    objects = render_manifests(model, namespace="shop", secrets=SECRETS, registry="repo.site:5000",
                               image_digests={c: "sha256:" + "0f" * 32 for c in model["components"]},
                               include_namespace=True, fingerprint_key=b"k" * 32)
    services = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "Service"}
    assert services["redis"].get("clusterIP") == "None" and "ports" not in services["redis"]
    assert services["db"].get("clusterIP") == "None"
    assert "ports" in services["api"] and "clusterIP" not in services["api"]
    sts = next(o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "db")
    assert sts["spec"]["serviceName"] == "db"
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert check_manifests(objects) == []


def test_strict_validation_catches_an_unknown_field() -> None:
    """The validator really is strict for 1.31: a misspelt field in a pod spec fails."""
    objects = shop_manifests("1.0.0")
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_cli_validates_the_written_files(tmp_path: Path) -> None:
    """The same check a delivery engineer runs by hand on the module's output directory."""
    for version in VERSIONS:
        (tmp_path / ("shop-%s.yaml" % version)).write_text(yaml.safe_dump_all(shop_manifests(version), sort_keys=False))
    cli = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    result = subprocess.run([cli, "--strict", "-k", K8S_VERSION, "--quiet", *sorted(map(str, tmp_path.iterdir()))],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_job_validates_strictly_with_its_dependents() -> None:
    """Issue #20 item 6: a component of kind job renders a batch/v1 Job (its Secret and ConfigMap, no Service)
    that the 1.31 schema takes strictly, next to the API that waits for it; the cross-object checks pass."""
    from tests.unit.test_app_k8s import shop_with_job

    model = shop_with_job()
    objects = render_manifests(model, namespace="shop", secrets=SECRETS, registry="repo.site:5000",
                               image_digests={c: "sha256:" + "0f" * 32 for c in model["components"]},
                               include_namespace=True, fingerprint_key=b"k" * 32)
    kinds = {(o["kind"], o["metadata"]["labels"].get("app.kubernetes.io/component")) for o in objects}
    assert {("Job", "migrate"), ("Secret", "migrate"), ("ConfigMap", "migrate")} <= kinds
    assert ("Service", "migrate") not in kinds
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert check_manifests(objects) == []
    job = next(o for o in objects if o["kind"] == "Job")
    job["spec"]["ttlSecondsAfterFinishedd"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
