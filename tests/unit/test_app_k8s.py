"""Unit tests for the k8s renderer and its cross-object checks (plugins/module_utils/targets/k8s.py)."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import pytest
import yaml

from offline_delivery_core.targets.k8s import (
    FINGERPRINT_ANNOTATION,
    K8sRenderError,
    check_manifests,
    object_name,
    redact,
    render_manifests,
)
from offline_delivery_core.app.model import load_model

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {"db_password": "Pw" * 16, "redis_password": "Rp" * 16}
DIGEST = "sha256:" + "ab" * 32
KEY = b"k" * 32  # the fingerprint key (app_state.fingerprint_key)


def shop(version: str = "1.0.0") -> dict:
    return load_model(yaml.safe_load((ROOT / ("examples/shop/app-%s.yml" % version)).read_text()),
                      source="app-%s.yml" % version)


def render(model: dict, **kwargs: object) -> list:
    args = dict(namespace="shop", secrets=SECRETS, registry="repo.site:5000",
                image_digests={c: DIGEST for c in model["components"]}, fingerprint_key=KEY)
    args.update(kwargs)
    return render_manifests(model, **args)  # type: ignore[arg-type]


def find(objects: list, kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, "%s %s: %d matches" % (kind, name, len(matches))
    return matches[0]


def container(objects: list, kind: str, name: str) -> dict:
    return find(objects, kind, name)["spec"]["template"]["spec"]["containers"][0]


def fingerprints(objects: list) -> dict:
    return {o["metadata"]["name"]: o["metadata"]["annotations"][FINGERPRINT_ANNOTATION]
            for o in objects if o["kind"] in ("Deployment", "StatefulSet")}


# -- rendering ------------------------------------------------------------------------------------------

def test_shop_objects_in_start_order_and_kind_order() -> None:
    objects = render(shop())
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("Secret", "db-env"), ("Service", "db"), ("StatefulSet", "db"),
        ("Secret", "redis-env"), ("Service", "redis"), ("Deployment", "redis"),
        ("Secret", "api-env"), ("Service", "api"), ("Deployment", "api"),
        ("ConfigMap", "gateway-config"), ("Service", "gateway"), ("Service", "gateway-published"),
        ("Deployment", "gateway"),
    ]
    assert all(o["metadata"]["namespace"] == "shop" for o in objects)
    assert check_manifests(objects) == []


def test_output_is_deterministic_and_plain_data() -> None:
    first, second = render(shop()), render(shop())
    assert json.dumps(first, sort_keys=False) == json.dumps(second, sort_keys=False)
    # No shared sub-objects (YAML anchors would appear in a dump otherwise).
    assert "&id" not in yaml.safe_dump_all(first)


def test_images_are_site_registry_reference_pinned_by_index_digest() -> None:
    objects = render(shop())
    assert container(objects, "Deployment", "api")["image"] == "repo.site:5000/shop/api:1.0.0@" + DIGEST
    assert container(objects, "Deployment", "api")["imagePullPolicy"] == "IfNotPresent"


def test_missing_or_conflicting_digest_is_refused() -> None:
    model = shop()
    with pytest.raises(K8sRenderError, match="components.api.image: no index digest"):
        render(model, image_digests={c: DIGEST for c in model["components"] if c != "api"})
    model["components"]["api"]["image"] = "shop/api:1.0.0@sha256:" + "cd" * 32
    with pytest.raises(K8sRenderError, match="the reference pins"):
        render(model)


def test_secret_values_never_inline() -> None:
    objects = render(shop())
    text = json.dumps([o for o in objects if o["kind"] != "Secret"])
    for value in SECRETS.values():
        assert value not in text
    api_env = {e["name"]: e for e in container(objects, "Deployment", "api")["env"]}
    # Injected exports: DB_PASSWORD comes from db's exports (${secrets.db_password}).
    assert api_env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "api-env", "key": "DB_PASSWORD"}
    assert api_env["DB_HOST"] == {"name": "DB_HOST", "value": "db"}   # ${host} = the Service name
    assert api_env["SHOP_PAGE_SIZE"] == {"name": "SHOP_PAGE_SIZE", "value": "20"}
    secret = find(objects, "Secret", "api-env")
    assert base64.b64decode(secret["data"]["DB_PASSWORD"]).decode() == SECRETS["db_password"]
    assert sorted(secret["data"]) == ["DB_PASSWORD", "REDIS_PASSWORD"]


def test_site_override_holding_a_secret_value_goes_to_the_secret() -> None:
    objects = render(shop(), overrides={"api": {"SHOP_CURRENCY": "CHF",
                                                "PASTED": "x" + SECRETS["redis_password"] + "y"}})
    api_env = {e["name"]: e for e in container(objects, "Deployment", "api")["env"]}
    assert api_env["SHOP_CURRENCY"]["value"] == "CHF"
    assert "secretKeyRef" in api_env["PASTED"]["valueFrom"]
    with pytest.raises(K8sRenderError, match="overrides: no component nope"):
        render(shop(), overrides={"nope": {"A": "1"}})


def test_config_file_is_a_configmap_mounted_read_only_with_subpath() -> None:
    objects = render(shop())
    config = find(objects, "ConfigMap", "gateway-config")
    (key, content), = config["data"].items()
    assert "proxy_pass http://api:8000/;" in content and "proxy_set_header Host $host;" in content
    pod = find(objects, "Deployment", "gateway")["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "config-files", "configMap": {
        "name": "gateway-config", "items": [{"key": key, "path": key, "mode": 0o644}]}}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "config-files", "mountPath": "/etc/nginx/conf.d/shop.conf",
                                                     "subPath": key, "readOnly": True}]


def test_config_file_with_a_secret_is_a_secret() -> None:
    model = shop()
    model["components"]["api"]["config_files"] = [
        {"path": "/etc/api/db.ini", "mode": "0600", "content": "password=${secrets.db_password}\n"},
        {"path": "/etc/api/plain.ini", "mode": "0644", "content": "page=${env.SHOP_PAGE_SIZE}\n"}]
    objects = render(model)
    files = find(objects, "Secret", "api-files")
    assert base64.b64decode(files["data"]["f0-db.ini"]).decode() == "password=%s\n" % SECRETS["db_password"]
    assert find(objects, "ConfigMap", "api-config")["data"] == {"f1-plain.ini": "page=20\n"}
    pod = find(objects, "Deployment", "api")["spec"]["template"]["spec"]
    secret_volume = [v for v in pod["volumes"] if v["name"] == "secret-files"][0]
    assert secret_volume["secret"]["items"] == [{"key": "f0-db.ini", "path": "f0-db.ini", "mode": 0o600}]
    assert check_manifests(objects) == []


def test_probes_follow_the_model_health() -> None:
    objects = render(shop())
    api = container(objects, "Deployment", "api")
    assert api["readinessProbe"] == {"httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTP"},
                                     "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 6,
                                     "successThreshold": 1}
    assert api["livenessProbe"] == api["readinessProbe"]
    # start_period 5s at interval 5s: one more failure allowed while starting.
    assert api["startupProbe"]["failureThreshold"] == 7
    assert container(objects, "Deployment", "redis")["readinessProbe"]["tcpSocket"] == {"port": "redis"}
    assert container(objects, "StatefulSet", "db")["livenessProbe"]["exec"]["command"][0].endswith("pg_isready")
    model = shop()
    model["components"]["redis"]["health"] = None
    assert "readinessProbe" not in container(render(model), "Deployment", "redis")


def test_volumes_make_a_statefulset_with_claims() -> None:
    objects = render(shop(), storage_class="local-path", volume_sizes={"pgdata": "5Gi"})
    db = find(objects, "StatefulSet", "db")
    assert db["spec"]["serviceName"] == "db"
    (claim,) = db["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "pgdata"
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}},
                             "storageClassName": "local-path"}
    assert {"name": "pgdata", "mountPath": "/var/lib/postgresql/data"} in db["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert "storageClassName" not in find(render(shop()), "StatefulSet", "db")["spec"]["volumeClaimTemplates"][0]["spec"]


def test_resources_limits_and_small_cpu_requests() -> None:
    res = container(render(shop()), "StatefulSet", "db")["resources"]
    assert res == {"limits": {"cpu": "1", "memory": "512Mi"}, "requests": {"cpu": "100m", "memory": "512Mi"}}


def test_published_port_nodeport_and_loadbalancer() -> None:
    svc = find(render(shop()), "Service", "gateway-published")
    # 8080 is outside the default NodePort range: the cluster allocates the node port.
    assert svc["spec"]["type"] == "NodePort"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    svc = find(render(shop(), node_port_range=(1, 32767)), "Service", "gateway-published")
    assert svc["spec"]["ports"][0]["nodePort"] == 8080
    svc = find(render(shop(), publish_type="LoadBalancer"), "Service", "gateway-published")
    assert svc["spec"]["type"] == "LoadBalancer" and "nodePort" not in svc["spec"]["ports"][0]
    with pytest.raises(K8sRenderError, match="publish_type"):
        render(shop(), publish_type="HostPort")


def test_labels_and_no_version_on_pod_template() -> None:
    objects = render(shop(), labels={"site": "north"})
    api = find(objects, "Deployment", "api")
    assert api["metadata"]["labels"] == {
        "app.kubernetes.io/component": "api", "app.kubernetes.io/instance": "shop",
        "app.kubernetes.io/managed-by": "offline-delivery", "app.kubernetes.io/name": "api",
        "app.kubernetes.io/part-of": "shop", "app.kubernetes.io/version": "1.0.0", "site": "north"}
    assert "app.kubernetes.io/version" not in api["spec"]["template"]["metadata"]["labels"]
    assert api["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/instance": "shop",
                                                      "app.kubernetes.io/component": "api"}
    with pytest.raises(K8sRenderError, match="set by the renderer"):
        render(shop(), labels={"app.kubernetes.io/name": "x"})
    model = shop()
    model["version"] = "1.0.0+build.5"
    assert find(render(model), "Deployment", "api")["metadata"]["labels"]["app.kubernetes.io/version"] == "1.0.0_build.5"


def test_fingerprint_changes_only_with_the_component_spec() -> None:
    v100, v110, v120 = (fingerprints(render(shop(v))) for v in ("1.0.0", "1.1.0", "1.2.0"))
    assert {n for n in v100 if v100[n] != v110[n]} == {"api"}
    assert {n for n in v110 if v110[n] != v120[n]} == {"api"}
    # The pod template carries the fingerprint, so a changed spec (even only a Secret's value) rolls the pod.
    objects = render(shop())
    api = find(objects, "Deployment", "api")
    assert api["spec"]["template"]["metadata"]["annotations"][FINGERPRINT_ANNOTATION] == v100["api"]
    other = fingerprints(render(shop(), secrets=dict(SECRETS, db_password="Other" * 7)))
    assert {n for n in v100 if v100[n] != other[n]} == {"db", "api"}
    overridden = fingerprints(render(shop(), overrides={"api": {"SHOP_CURRENCY": "CHF"}}))
    assert {n for n in v100 if v100[n] != overridden[n]} == {"api"}


def test_description_and_release_do_not_change_the_fingerprint() -> None:
    model = shop()
    model["components"]["db"]["description"] = "PostgreSQL 15"
    model["version"] = "9.9.9"
    objects = render(model)
    db = find(objects, "StatefulSet", "db")
    assert db["metadata"]["annotations"]["offline.delivery/description"] == "PostgreSQL 15"
    assert db["metadata"]["annotations"]["offline.delivery/release"] == "shop-9.9.9"
    assert fingerprints(objects)["db"] == fingerprints(render(shop()))["db"]


def test_names_starting_with_a_digit_and_placement_and_user() -> None:
    model = shop()
    comps = model["components"]
    comps["3d"] = copy.deepcopy(comps["redis"])
    comps["3d"]["exports"] = {}
    comps["3d"]["user"] = "1000:1001"
    comps["3d"]["placement"] = {"group": "gpu_nodes"}
    objects = render(model)
    assert object_name("3d") == "c-3d"
    dep = find(objects, "Deployment", "c-3d")
    assert find(objects, "Service", "c-3d")["spec"]["selector"]["app.kubernetes.io/component"] == "3d"
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"offline.delivery/group.gpu_nodes": "true"}
    ctx = pod["containers"][0]["securityContext"]
    assert (ctx["runAsUser"], ctx["runAsGroup"]) == (1000, 1001)
    assert ctx["allowPrivilegeEscalation"] is False and ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctx["capabilities"]["drop"] == ["ALL"] and "NET_ADMIN" not in ctx["capabilities"]["add"]
    assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False
    assert check_manifests(objects) == []
    comps["3d"]["user"] = "postgres"
    with pytest.raises(K8sRenderError, match="components.3d.user: 'postgres' is a name"):
        render(model)


def test_bad_namespace_and_volume_name_clash() -> None:
    with pytest.raises(K8sRenderError, match="namespace 'Shop'"):
        render(shop(), namespace="Shop")
    model = shop()
    model["components"]["gateway"]["volumes"] = [{"name": "config-files", "path": "/data"}]
    with pytest.raises(K8sRenderError, match="config-files is used by the k8s target"):
        render(model)


def test_redact_hides_secret_values() -> None:
    objects = render(shop(), include_namespace=True)
    assert objects[0]["kind"] == "Namespace"
    text = json.dumps(redact(objects))
    assert all(v not in text and base64.b64encode(v.encode()).decode() not in text for v in SECRETS.values())
    assert "<redacted: 32 bytes>" in text


# -- check_manifests: each check catches its own kind of breakage ----------------------------------------

def broken(mutate) -> list:  # type: ignore[no-untyped-def]
    objects = render(shop())
    mutate(objects)
    return check_manifests(objects)


def test_check_selector_must_match_pod_labels() -> None:
    def mutate(objs: list) -> None:
        find(objs, "Deployment", "api")["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "apx"
    assert any("Deployment shop/api: selector app.kubernetes.io/component=apx does not match" in p
               for p in broken(mutate))


def test_check_service_must_select_pods() -> None:
    def mutate(objs: list) -> None:
        find(objs, "Service", "redis")["spec"]["selector"]["app.kubernetes.io/component"] = "redis2"
    assert any("Service shop/redis: its selector" in p and "selects no pod" in p for p in broken(mutate))


def test_check_service_target_port_names() -> None:
    def mutate(objs: list) -> None:
        find(objs, "Service", "gateway")["spec"]["ports"][0]["targetPort"] = "web"
    assert any("Service shop/gateway: port http targets 'web'" in p for p in broken(mutate))

    def numeric(objs: list) -> None:
        find(objs, "Service", "api")["spec"]["ports"][0]["targetPort"] = 8001
    assert any("targets 8001" in p for p in broken(numeric))

    def protocol(objs: list) -> None:
        find(objs, "Service", "api")["spec"]["ports"][0]["protocol"] = "UDP"
    assert any("port http is UDP but the container port" in p for p in broken(protocol))


def test_check_probe_port_names() -> None:
    def mutate(objs: list) -> None:
        container(objs, "Deployment", "api")["livenessProbe"]["httpGet"]["port"] = "htp"
    assert any("livenessProbe.httpGet.port 'htp' is not one of its port names (http)" in p for p in broken(mutate))


def test_check_secret_key_refs_exist() -> None:
    def missing_secret(objs: list) -> None:
        objs.remove(find(objs, "Secret", "api-env"))
    assert any("env DB_PASSWORD names Secret api-env, which is not in these manifests" in p
               for p in broken(missing_secret))

    def missing_key(objs: list) -> None:
        del find(objs, "Secret", "db-env")["data"]["POSTGRES_PASSWORD"]
    assert any("env POSTGRES_PASSWORD names key POSTGRES_PASSWORD of Secret db-env" in p for p in broken(missing_key))


def test_check_volume_mounts_match_volumes() -> None:
    def mutate(objs: list) -> None:
        find(objs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["name"] = "cfg"
    assert any("mounts 'cfg', which is neither a pod volume nor a volumeClaimTemplate" in p for p in broken(mutate))

    def claim(objs: list) -> None:
        find(objs, "StatefulSet", "db")["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] = "data"
    assert any("mounts 'pgdata'" in p for p in broken(claim))

    def sub_path(objs: list) -> None:
        find(objs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["subPath"] = "x.conf"
    assert any("subPath 'x.conf'" in p for p in broken(sub_path))

    def configmap_key(objs: list) -> None:
        find(objs, "ConfigMap", "gateway-config")["data"] = {"other": ""}
    assert any("volume config-files names key f0-shop.conf of ConfigMap gateway-config" in p
               for p in broken(configmap_key))


def test_check_names_labels_and_duplicates() -> None:
    def bad_name(objs: list) -> None:
        find(objs, "Service", "api")["metadata"]["name"] = "1api"
    assert any("a Service name must be a DNS-1035 label" in p for p in broken(bad_name))

    def dup(objs: list) -> None:
        objs.append(copy.deepcopy(find(objs, "ConfigMap", "gateway-config")))
    assert any("ConfigMap shop/gateway-config: defined twice" in p for p in broken(dup))

    def label(objs: list) -> None:
        find(objs, "Deployment", "api")["metadata"]["labels"]["app.kubernetes.io/version"] = "1.0.0+b"
    assert any("app.kubernetes.io/version='1.0.0+b' is not a valid label value" in p for p in broken(label))

    def service_name(objs: list) -> None:
        find(objs, "StatefulSet", "db")["spec"]["serviceName"] = "postgres"
    assert any("serviceName postgres names no Service" in p for p in broken(service_name))


# -- jobs (issue #20 item 6): a component of kind job is a batch/v1 Job -------------------------------------

MIGRATE = ["python3", "-c", "import os; print('migrated', os.environ['DB_HOST'])"]


def shop_with_job(command: list = MIGRATE, **changes: object) -> dict:
    """The shop with a job ``migrate`` (the API's image) that needs the database and that the API waits for."""
    data = yaml.safe_load((ROOT / "examples/shop/app-1.0.0.yml").read_text())
    migrate = {"kind": "job", "image": "shop/api:1.0.0", "command": list(command), "user": "1000",
               "env": {"MIGRATE_LOG": "info"},
               "config_files": [{"path": "/etc/migrate.conf", "mode": "0640", "content": "level = ${env.MIGRATE_LOG}\n"}],
               "resources": {"cpus": "0.5", "memory": "64Mi"}, "placement": {"group": "shop_db"},
               "depends_on": {"db": {"condition": "healthy"}}}
    migrate.update(changes)
    data["components"]["migrate"] = migrate
    data["components"]["api"]["depends_on"]["migrate"] = {"condition": "completed"}
    return load_model(data, source="app-job.yml")


def jobs(objects: list) -> dict:
    return {o["metadata"]["labels"]["app.kubernetes.io/component"]: o for o in objects if o["kind"] == "Job"}


def test_a_job_is_a_batch_job_with_the_pod_spec_of_every_component() -> None:
    objects = render(shop_with_job())
    job = jobs(objects)["migrate"]
    digest = job["metadata"]["annotations"][FINGERPRINT_ANNOTATION]
    assert job["apiVersion"] == "batch/v1"
    assert job["metadata"]["name"] == "migrate-" + digest.split(":")[1][:10]
    spec = job["spec"]
    # One run, no retry in place (the engine's rollback handles a failure), the completed Job is kept as the
    # record that this definition ran (no ttlSecondsAfterFinished), and the controller makes the selector.
    assert spec["backoffLimit"] == 0 and spec["completions"] == 1 and spec["parallelism"] == 1
    assert "ttlSecondsAfterFinished" not in spec and "selector" not in spec and "activeDeadlineSeconds" not in spec
    template = spec["template"]
    assert template["metadata"]["annotations"] == {FINGERPRINT_ANNOTATION: digest}
    assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "migrate"
    assert "app.kubernetes.io/version" not in template["metadata"]["labels"]
    pod = template["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False
    assert pod["nodeSelector"] == {"offline.delivery/group.shop_db": "true"}
    (ctr,) = pod["containers"]
    assert ctr["image"] == "repo.site:5000/shop/api:1.0.0@" + DIGEST and ctr["args"] == MIGRATE
    assert ctr["securityContext"]["runAsUser"] == 1000 and ctr["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert ctr["resources"] == {"limits": {"cpu": "0.5", "memory": "64Mi"}, "requests": {"cpu": "50m", "memory": "64Mi"}}
    assert not {"ports", "startupProbe", "readinessProbe", "livenessProbe"} & set(ctr)
    env = {e["name"]: e for e in ctr["env"]}
    assert env["DB_HOST"] == {"name": "DB_HOST", "value": "db"}                        # injected exports of db
    assert env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "migrate-env", "key": "DB_PASSWORD"}
    assert ctr["volumeMounts"] == [{"name": "config-files", "mountPath": "/etc/migrate.conf",
                                    "subPath": "f0-migrate.conf", "readOnly": True}]
    assert find(objects, "ConfigMap", "migrate-config")["data"] == {"f0-migrate.conf": "level = info\n"}
    # Nothing connects to a job: no Service, and the manifests pass the cross-object checks.
    assert not [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"].startswith("migrate")]
    assert check_manifests(objects) == []


def test_a_job_comes_before_its_dependents_in_the_manifests() -> None:
    order = [(o["kind"], o["metadata"]["labels"]["app.kubernetes.io/component"]) for o in render(shop_with_job())]
    assert order.index(("Job", "migrate")) < order.index(("Deployment", "api"))
    assert order.index(("StatefulSet", "db")) < order.index(("Secret", "migrate"))


def test_the_job_name_follows_its_fingerprint_so_kubectl_apply_creates_a_changed_job() -> None:
    """Same definition: same Job (applying it again changes nothing); another definition (command, env, a Secret
    value, the image): another Job name, created and run by `kubectl apply`. Other components do not change."""
    first = render(shop_with_job())
    assert [o["metadata"]["name"] for o in first] == [o["metadata"]["name"] for o in render(shop_with_job())]
    changed = render(shop_with_job(MIGRATE + ["--again"]))
    assert jobs(changed)["migrate"]["metadata"]["name"] != jobs(first)["migrate"]["metadata"]["name"]
    assert fingerprints(changed) == fingerprints(first)
    other_secret = render(shop_with_job(), secrets=dict(SECRETS, db_password="Other" * 7))
    assert jobs(other_secret)["migrate"]["metadata"]["name"] != jobs(first)["migrate"]["metadata"]["name"]
    # Long component names still make a valid Job name (at most 63: its pods' job-name label).
    model = shop_with_job()
    model["components"]["m" * 60] = model["components"].pop("migrate")
    model["components"]["api"]["depends_on"]["m" * 60] = model["components"]["api"]["depends_on"].pop("migrate")
    (job,) = jobs(render(model)).values()
    assert len(job["metadata"]["name"]) == 63 and check_manifests(render(model)) == []


def test_models_stored_before_jobs_existed_render_services() -> None:
    model = shop()
    for comp in model["components"].values():
        comp.pop("kind", None)
    assert render(model) == render(shop())


def test_a_job_with_what_a_job_cannot_have_is_refused() -> None:
    model = shop_with_job()
    model["components"]["migrate"]["ports"] = [{"name": "http", "port": 8000, "protocol": "tcp", "publish": None}]
    with pytest.raises(K8sRenderError, match="components.migrate.ports: a job"):
        render(model)


def test_check_job_restart_policy_name_and_services() -> None:
    def restart(objs: list) -> None:
        jobs(objs)["migrate"]["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    objects = render(shop_with_job())
    restart(objects)
    assert any("Job shop/migrate-" in p and "restartPolicy Never or OnFailure, not Always" in p
               for p in check_manifests(objects))

    objects = render(shop_with_job())
    jobs(objects)["migrate"]["metadata"]["name"] = "m" * 64
    assert any("a Job name longer than 63" in p for p in check_manifests(objects))

    objects = render(shop_with_job())
    service = copy.deepcopy(find(objects, "Service", "redis"))
    service["metadata"]["name"] = "migrate"
    service["spec"]["selector"]["app.kubernetes.io/component"] = "migrate"
    objects.append(service)
    assert any("Service shop/migrate: its selector" in p and "but those of Job migrate-" in p
               and "which run to completion" in p for p in check_manifests(objects))
    # A Job has no selector of its own (the controller makes it): not an "empty selector".
    assert check_manifests(render(shop_with_job())) == []
