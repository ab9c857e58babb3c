"""One-shot jobs (issue #20 item 6) on the test world's real Kubernetes cluster (tests/world/k8s).

A small app `jobdemo`: `migrate`, a job (the shop's API image running `python3 -c ...`), and `web`, a service
(the same image serving HTTP) that depends on it with `condition: completed`. Deployed by the
`offline.delivery.app_deploy` module run by ansible-playbook on the jump host (connection local, Debian's
python3, the cluster's kubeconfig from the drop box), as role `app` runs it for a `k8s_clusters` host; the
images are the shop's, read with `offline.delivery.app_release` from the site repository:

- 1.0.0: the Job runs (batch/v1, backoffLimit 0, no Service), `web` is created only after it completed;
- 1.0.0 again: nothing runs again (same Job, same pod of `web`);
- 1.1.0 (the job's code changed): the job runs again as a new Job, `web` is left alone;
- 1.2.0 (the job exits 1): the deploy fails naming `migrate` and its exit code, and 1.1.0 is put back (its
  job runs again and succeeds); `web` keeps running;
- app_uninstall removes the Job with everything else.

Skips, naming the reason, only when the cluster cannot be built or run on this machine (CI fails on it).
Run alone: `OD_E2E_SITE=k8sj .venv/bin/python -m pytest -v tests/e2e/test_k8s_jobs.py`.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
import yaml

from offline_delivery_core.app.model import dump_model, load_model
from offline_delivery_core.clients.kubernetes import K8sClient, parse_rfc3339
from offline_delivery_core.targets.k8s import FINGERPRINT_ANNOTATION
from tests.e2e.test_k8s_cluster import cluster_problem, import_shop
from tests.world.site import Site

pytestmark = pytest.mark.world

APP = "jobdemo"
NS = "od-jobs"
DIR = "jobs"             # in the site's drop box: /srv/transfer/jobs in the jump host
STATE_DIR = "/tmp/od-jobs-state"

# The job: the shop API's image (python3, runs as nobody), a few seconds of "migration", then exit 0 or 1.
MIGRATE_OK = "import os, time; time.sleep(4); print('migrated to schema', os.environ['SCHEMA'])"
MIGRATE_BROKEN = ("import sys; print('migration failed: relation \"votes\" does not exist', file=sys.stderr); "
                  "sys.exit(1)")


def model(version: str, code: str, schema: str) -> Dict[str, Any]:
    data = {
        "apiVersion": "offline.delivery/v1", "kind": "Application", "name": APP, "version": version,
        "components": {
            "migrate": {"kind": "job", "image": "shop/api:1.0.0", "entrypoint": ["/usr/bin/python3", "-c", code],
                        "env": {"SCHEMA": schema}, "resources": {"cpus": "0.2", "memory": "64Mi"}},
            "web": {"image": "shop/api:1.0.0", "entrypoint": ["/usr/bin/python3", "-m", "http.server", "8000"],
                    "ports": [{"name": "http", "port": 8000, "protocol": "tcp"}],
                    "health": {"http": {"port": 8000, "path": "/"}, "interval": "2s", "timeout": "2s", "retries": 30},
                    "resources": {"cpus": "0.2", "memory": "64Mi"},
                    "depends_on": ["migrate"]},      # list form: a job is waited for until it completed
        }}
    return dump_model(load_model(data, source="jobdemo-%s.yml" % version))


RELEASES = {"1.0.0": model("1.0.0", MIGRATE_OK, "1"), "1.1.0": model("1.1.0", MIGRATE_OK, "2"),
            "1.2.0": model("1.2.0", MIGRATE_BROKEN, "3")}

PLAYBOOK = [{
    "hosts": "localhost", "gather_facts": False,
    "vars": {"images": "{{ lookup('ansible.builtin.file', '/srv/transfer/jobs/images.json') | from_json }}"},
    "tasks": [
        {"name": "deploy jobdemo {{ version }} to the cluster", "register": "out", "ignore_errors": True,
         "offline.delivery.app_deploy": {
             "app": APP, "target": "k8s", "namespace": NS, "state_dir": STATE_DIR, "host": "cluster",
             "platform": "linux/amd64", "registry": "repo:5000", "health_timeout": 120, "version": "{{ version }}",
             "kubeconfig": "{{ lookup('ansible.builtin.file', '/srv/transfer/kubeconfig') | from_yaml }}",
             "model": "{{ lookup('ansible.builtin.file', '/srv/transfer/jobs/' ~ version ~ '.json') | from_json }}",
             "images": {"migrate": "{{ images.api }}", "web": "{{ images.api }}"},
             "placement": {"migrate": ["cluster"], "web": ["cluster"]}}},
        {"ansible.builtin.copy": {"content": "{{ out | to_json }}", "dest": "/srv/transfer/jobs/out.json"}}]}]

RELEASE_PLAYBOOK = [{
    "hosts": "offline_repo", "gather_facts": False,
    "tasks": [{"offline.delivery.app_release": {"name": "shop", "version": "1.0.0"}, "register": "rel"},
              {"ansible.builtin.copy": {"content": "{{ rel.release.images | to_json }}",
                                        "dest": "/tmp/od-jobs-images.json"}},
              {"ansible.builtin.fetch": {"src": "/tmp/od-jobs-images.json", "dest": "/srv/transfer/jobs/images.json",
                                         "flat": True}}]}]

UNINSTALL_PLAYBOOK = [{
    "hosts": "localhost", "gather_facts": False,
    "tasks": [{"register": "out", "offline.delivery.app_uninstall": {
        "app": APP, "target": "k8s", "namespace": NS, "state_dir": STATE_DIR,
        "kubeconfig": "{{ lookup('ansible.builtin.file', '/srv/transfer/kubeconfig') | from_yaml }}"}},
        {"ansible.builtin.copy": {"content": "{{ out | to_json }}", "dest": "/srv/transfer/jobs/out.json"}}]}]


@dataclass
class World:
    site: Site
    admin: K8sClient
    dir: Path              # on this machine; /srv/transfer/jobs in the jump host

    def play(self, playbook: str, *args: str) -> Dict[str, Any]:
        out = self.dir / "out.json"
        if out.exists():
            out.unlink()
        res = self.site.jump(["ansible-playbook", "-i", "localhost,", "-c", "local",
                              "-e", "ansible_python_interpreter=/usr/bin/python3",
                              "/srv/transfer/jobs/%s" % playbook, *args], timeout=900)
        assert res.rc == 0 and out.exists(), res.output[-4000:]
        return json.loads(out.read_text())

    def deploy(self, version: str) -> Dict[str, Any]:
        return self.play("deploy.yml", "-e", "version=%s" % version)

    def job(self) -> Dict[str, Any]:
        job = self.admin.get("Job", "migrate", NS)
        assert job, "Job migrate missing"
        return job

    def web_pods(self) -> Dict[str, str]:
        """Running, not terminating pods of web: name -> creationTimestamp."""
        return {p["metadata"]["name"]: p["metadata"]["creationTimestamp"]
                for p in self.admin.list("Pod", NS, label_selector="app.kubernetes.io/component=web")
                if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")}


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    from tests.world.k8s.cluster import Cluster
    from tests.world.util import WorldError

    problem = cluster_problem()
    if problem:
        pytest.skip("k8s cluster unavailable on this machine: " + problem)
    site: Site = request.getfixturevalue("world_site")
    import_shop(site, request.getfixturevalue("shop_bundles"))   # the site registry serves shop/api:1.0.0
    cluster = Cluster(site.name)
    info = None
    failures = []
    for _attempt in range(2):   # as test_k8s_apply: a busy machine can miss the node's readiness window once
        try:
            info = cluster.up()
            break
        except WorldError as exc:
            failures.append(str(exc))
            cluster.down()
    if info is None:
        pytest.skip("the test world's Kubernetes cluster did not come up: %s" % " / ".join(failures))
    work = site.transfer_dir / DIR
    admin = K8sClient.from_kubeconfig(yaml.safe_load(Path(info["kubeconfig"]).read_text()))
    try:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o755)
        for version, data in RELEASES.items():
            (work / ("%s.json" % version)).write_text(json.dumps(data))
        for name, playbook in (("deploy.yml", PLAYBOOK), ("release.yml", RELEASE_PLAYBOOK),
                               ("uninstall.yml", UNINSTALL_PLAYBOOK)):
            (work / name).write_text(yaml.safe_dump(playbook, sort_keys=False))
        res = site.jump(["bash", "-c", 'ansible-playbook -i "$ANSIBLE_INVENTORY" /srv/transfer/jobs/release.yml'],
                        timeout=600)
        assert res.rc == 0 and (work / "images.json").exists(), res.output[-4000:]
        yield World(site, admin, work)
    finally:
        try:
            admin.delete("Namespace", NS)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if os.environ.get("OD_WORLD_KEEP") != "1":
                cluster.down()


def test_a_job_gates_its_dependent_runs_once_reruns_when_changed_and_a_failure_rolls_back(world: World) -> None:
    # 1.0.0: the Job runs to completion, then web is created.
    out = world.deploy("1.0.0")
    assert out.get("failed") is not True, out.get("msg")
    assert out["plan"]["added"] == ["migrate", "web"] and out["changed"] is True, out
    assert out["health"] == {"migrate": "completed", "web": "healthy"}, out
    job = world.job()
    assert job["apiVersion"] == "batch/v1" and job["spec"]["backoffLimit"] == 0
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert any(c["type"] == "Complete" and c["status"] == "True" for c in job["status"]["conditions"])
    assert world.admin.get("Service", "migrate", NS) is None      # nothing connects to a job
    pods = world.web_pods()
    assert len(pods) == 1, pods
    (created,) = pods.values()
    assert parse_rfc3339(created) >= parse_rfc3339(job["status"]["completionTime"]), (created, job["status"])
    job_pods = world.admin.list("Pod", NS, label_selector="app.kubernetes.io/component=migrate")
    assert [p["status"]["phase"] for p in job_pods] == ["Succeeded"]
    uid = job["metadata"]["uid"]

    # 1.0.0 again: nothing runs again.
    out = world.deploy("1.0.0")
    assert out.get("failed") is not True and out["changed"] is False, out
    assert out["plan"]["unchanged"] == ["migrate", "web"], out
    assert world.job()["metadata"]["uid"] == uid and world.web_pods() == pods

    # 1.1.0: the job changed: a new Job runs; web is left alone.
    out = world.deploy("1.1.0")
    assert out.get("failed") is not True, out.get("msg")
    assert out["plan"]["changed"] == ["migrate"] and out["plan"]["unchanged"] == ["web"], out
    job = world.job()
    assert job["metadata"]["uid"] != uid
    assert any(c["type"] == "Complete" and c["status"] == "True" for c in job["status"]["conditions"])
    good = job["metadata"]["annotations"][FINGERPRINT_ANNOTATION]
    assert good == out["components"]["migrate"]["fingerprint"]
    assert world.web_pods() == pods

    # 1.2.0: the job exits 1: the deploy fails naming it and its exit code; 1.1.0 is put back.
    out = world.deploy("1.2.0")
    assert out.get("failed") is True, out
    msg = out["msg"]
    print("the failed deploy said:", msg)
    assert "component migrate did not complete" in msg and "exited 1" in msg, msg
    assert "rolled back to 1.1.0" in msg, msg
    job = world.job()
    assert job["metadata"]["annotations"][FINGERPRINT_ANNOTATION] == good
    assert any(c["type"] == "Complete" and c["status"] == "True" for c in job["status"]["conditions"])
    assert world.web_pods() == pods

    # Uninstall: the Job goes with the rest.
    out = world.play("uninstall.yml")
    assert "Job/migrate" in out["removed"] and "Deployment/web" in out["removed"], out
    assert world.admin.get("Job", "migrate", NS) is None


STATIC_NS = "od-jobs-static"


def _documented_two_step_apply() -> str:
    """The shell lines docs/kubernetes.md gives for applying a job before its dependents (without its `cd`),
    for this test's namespace: the test runs what the user is told to run."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "kubernetes.md").read_text()
    block = text.split("**Dependents of a job in static manifests.**", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if not line.startswith("cd ")]
    return "set -euo pipefail\n" + "\n".join(lines).replace("-n shop ", "-n %s " % STATIC_NS) + "\n"


def test_static_manifests_apply_a_job_first_and_a_changed_job_is_a_new_job(world: World, tmp_path: Path) -> None:
    """The manifest directory (app_k8s_manifests) with kubectl: the documented two-step apply runs the Job to
    completion before its dependent exists; applying it again leaves the Job alone; a changed job is a new Job
    (named by its fingerprint) that kubectl apply creates and runs."""
    from tests.world.k8s.build import kubernetes_build
    from tests.world.k8s.cluster import Cluster
    from offline_delivery_core.targets.k8s import render_manifests, write_manifest_dir
    from tests.world.util import run

    cluster = Cluster(world.site.name)
    images = json.loads((world.dir / "images.json").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").symlink_to(kubernetes_build().out_dir() / "kubectl")
    env = {"PATH": "%s:%s" % (bin_dir, os.environ["PATH"]), "KUBECONFIG": str(cluster.kubeconfig_path)}
    dest = tmp_path / "manifests"

    def render(version: str) -> str:
        objects = render_manifests(load_model(RELEASES[version]), namespace=STATIC_NS, secrets={}, registry="repo:5000",
                                   image_digests={"migrate": images["api"]["index"], "web": images["api"]["index"]},
                                   include_namespace=True, fingerprint_key=b"k" * 32)
        write_manifest_dir(objects, str(dest))
        (job,) = [o["metadata"]["name"] for o in objects if o["kind"] == "Job"]
        return job

    def sh(script: str) -> str:
        res = run(["bash", "-c", script], timeout=700, cwd=dest, env=env)
        assert res.rc == 0, res.output[-4000:]
        return res.output

    try:
        first = render("1.0.0")
        assert first.startswith("migrate-") and len(first) == len("migrate-") + 10
        sh(_documented_two_step_apply())
        job = world.admin.get("Job", first, STATIC_NS)
        assert any(c["type"] == "Complete" and c["status"] == "True" for c in job["status"]["conditions"]), job["status"]
        web = world.admin.get("Deployment", "web", STATIC_NS)
        assert parse_rfc3339(web["metadata"]["creationTimestamp"]) >= parse_rfc3339(job["status"]["completionTime"])

        # Applied again: the same Job, not run again (kubectl may say "configured" rather than "unchanged": it
        # compares the file's cpu "0.2" with the server's "200m"; the server finds nothing to change).
        out = sh("kubectl apply -f .")
        assert "job.batch/%s " % first in out and "created" not in out, out
        again = world.admin.get("Job", first, STATIC_NS)
        assert again["metadata"]["uid"] == job["metadata"]["uid"] and again["status"] == job["status"]

        second = render("1.1.0")
        assert second != first and not list(dest.glob("*-job-%s.json" % first))
        out = sh("kubectl apply -f . && kubectl -n %s wait --for=condition=complete --timeout=300s job/%s"
                 % (STATIC_NS, second))
        assert "job.batch/%s created" % second in out, out
        assert world.admin.get("Job", first, STATIC_NS) is not None     # the earlier run stays until deleted
    finally:
        world.admin.delete("Namespace", STATIC_NS)
