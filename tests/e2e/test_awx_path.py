"""The path AWX runs every job through, for real on an air-gapped site (tests/world/awx_path.py):

  ansible-runner transmit (this machine) -> receptorctl work submit --node exec1 (AWX's control node stand-in,
  receptor 1.5 from Debian 13) -> receptor mesh -> exec1's work type: podman runs the EE image (Debian 13
  ansible-core + ansible-runner + this collection) with `ansible-runner worker`, the carried bundles mounted
  read-only at /srv/offline-bundles -> the event stream back -> ansible-runner process (this machine).

One site (`e2e-awx`: a repo host and one compose host), one job per step, each job the collection's playbook
from the project directory as AWX's project sync would give it (`playbooks/<name>.yml`):

  import 1.0.0, 1.1.0, 1.2.0 -> runtime -> install 1.0.0 -> upgrade 1.1.0 -> upgrade 1.2.0 (its API fails the
  health gate: a failed job naming the component, the host back on 1.1.0)

The assertions read the job events `ansible-runner process` gives (what AWX stores as the job's events): task
results, per-host changed counts, the failed task. What is NOT run here (AWX's API, scheduler, credential
injection, project sync): docs/awx.md, section "What was run".
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.conftest import require_world, running_site
from tests.e2e.media import carry
from tests.e2e.test_lifecycle import http
from tests.world.awx_path import (BUNDLES_MOUNT, CONTROL, EE_RECIPE, EXEC, AwxPath, EeImage, Job,
                                  definition_content, ensure_ee_image)
from tests.world.site import HostSpec, Site
from tests.world.util import repo_root

pytestmark = pytest.mark.world

HOSTS = (HostSpec("repo", "amd64", ("offline_repo",)), HostSpec("node1", "amd64", ("compose_hosts",)))
VERSIONS = ("1.0.0", "1.1.0", "1.2.0")
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def site(shop_bundles: dict[str, Path]) -> Iterator[Site]:
    require_world(h.arch for h in HOSTS)
    yield from running_site(Site(os.environ.get("OD_E2E_SITE_AWX", "e2e-awx"), HOSTS))
    if os.environ.get("OD_AWX_TIMES"):
        Path(os.environ["OD_AWX_TIMES"]).write_text(json.dumps(TIMES, indent=1) + "\n")


@pytest.fixture(scope="module")
def ee() -> EeImage:
    started = time.monotonic()
    image = ensure_ee_image()
    TIMES["EE image (cached: only the collection layer)"] = round(time.monotonic() - started, 1)
    return image


@pytest.fixture(scope="module")
def awx(site: Site, ee: EeImage, shop_bundles: dict[str, Path]) -> AwxPath:
    """The carried disk on the execution node, the receptor mesh up, the EE loaded into exec1's podman."""
    carry(site, {name: shop_bundles[name] for name in (*(f"shop-{v}" for v in VERSIONS), "vendor.pub")})
    path = AwxPath(site)
    started = time.monotonic()
    path.up(ee)
    TIMES["receptor mesh + EE loaded"] = round(time.monotonic() - started, 1)
    return path


@pytest.fixture(scope="module")
def jobs(awx: AwxPath, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    """Every job of the module, in order, each through the whole path."""
    work = tmp_path_factory.mktemp("awx-jobs")
    keys = [f"{BUNDLES_MOUNT}/vendor.pub"]
    steps: list[tuple[str, str, dict]] = [
        *((f"import-{v}", "playbooks/import.yml",
           {"offline_delivery_bundle_src": f"{BUNDLES_MOUNT}/shop-{v}", "offline_delivery_vendor_keys_src": keys})
          for v in VERSIONS),
        ("runtime", "playbooks/runtime.yml", {}),
        ("install-1.0.0", "playbooks/install.yml", {"app_name": "shop", "app_version": "1.0.0"}),
        ("upgrade-1.1.0", "playbooks/upgrade.yml", {"app_name": "shop", "app_version": "1.1.0"}),
        ("upgrade-1.2.0", "playbooks/upgrade.yml", {"app_name": "shop", "app_version": "1.2.0"}),
    ]
    done: dict[str, Job] = {}
    for name, playbook, extravars in steps:
        done[name] = awx.run_job(name, playbook, extravars, work)
        TIMES[f"job {name}"] = done[name].seconds
    return done


def successful(job: Job) -> Job:
    failed = [e["event_data"].get("res", {}).get("msg") for e in job.of("runner_on_failed")]
    assert job.status == "successful" and job.rc == 0, (job.status, job.rc, job.receptor, failed,
                                                        (job.artifacts / "stdout").read_text()[-4000:])
    return job


def task_result(job: Job, task: str, host: str) -> dict:
    """The result of a task on a host, from its runner_on_ok / runner_on_failed event."""
    for event in job.events:
        data = event.get("event_data", {})
        if event.get("event") in ("runner_on_ok", "runner_on_failed") and data.get("task") == task \
                and data.get("host") == host:
            return data["res"]
    raise AssertionError(f"no result of task {task!r} on {host} in job {job.artifacts.name}")


def test_the_ee_image_carries_what_the_definition_describes(awx: AwxPath, ee: EeImage) -> None:
    """In the EE exec1 runs: the collection at the definition's version, ansible-core in meta/runtime.yml's
    range, ansible-runner."""
    definition = definition_content()
    script = ("ansible-galaxy collection list offline.delivery 2>/dev/null | grep '^offline.delivery '; "
              "ansible --version | head -n 1; python3 -c 'import ansible_runner.streaming' && "
              "dpkg-query -W -f '${Version}\\n' python3-ansible-runner")
    res = awx.exec(EXEC, ["podman", "run", "--rm", "--network", "host", ee.tag, "sh", "-c", script], timeout=120)
    assert res.rc == 0, res.output
    collection, core, runner = res.stdout.strip().splitlines()
    version = definition.collection_tarball.removeprefix("offline-delivery-").removesuffix(".tar.gz")
    assert collection.split() == ["offline.delivery", version]
    found = re.search(r"core ([0-9.]+)", core)
    assert found, core
    text = (repo_root() / "meta" / "runtime.yml").read_text()
    low, high = re.search(r'requires_ansible: ">=([0-9.]+),<([0-9.]+)"', text).groups()  # type: ignore[union-attr]

    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split("."))
    assert parts(low) <= parts(found.group(1)) < parts(high), (found.group(1), low, high)
    assert runner.startswith("2."), runner
    assert "python3-ansible-runner" in EE_RECIPE.packages


def test_every_job_ran_in_the_ee_on_the_execution_node(awx: AwxPath, jobs: dict[str, Job]) -> None:
    """The worker's own status line says where the playbook ran: in a podman container on exec1, the job's
    private data dir at /runner (as AWX's worker), with runner's event callback."""
    for name, job in jobs.items():
        starting = next(s for s in job.statuses if s.get("status") == "starting")
        assert starting["env"]["container"] == "podman" and starting["env"]["HOSTNAME"] == EXEC, (name, starting)
        assert starting["cwd"] == "/runner/project" and starting["env"]["ANSIBLE_STDOUT_CALLBACK"] == "awx_display"
        assert starting["command"][:2] == ["ssh-agent", "sh"], "the key reaches the job through ssh-agent"
    # receptor on exec1 started one EE container per job, and removed each (podman run --rm)
    journal = awx.exec(EXEC, ["journalctl", "-u", "receptor.service", "--no-pager", "-o", "cat"], timeout=60)
    started = [line for line in journal.stdout.splitlines()
               if " container start " in line and "offline-delivery.awx-path=job" in line]
    assert len(started) == len(jobs), journal.stdout[-3000:]
    assert awx.exec(EXEC, ["podman", "ps", "-aq"], timeout=60).stdout.strip() == ""
    # the control node reaches exec1 only through the mesh: it has no podman job, no EE image
    assert awx.exec(CONTROL, ["podman", "images", "-q"], timeout=60).stdout.strip() == ""


def test_import_jobs_publish_each_release(jobs: dict[str, Job]) -> None:
    for version in VERSIONS:
        job = successful(jobs[f"import-{version}"])
        stats = job.stats()
        assert stats["repo"]["failures"] == 0 and stats["repo"]["changed"] > 0, stats
        res = task_result(job, "Verify the bundle and publish its release into the offline repository", "repo")
        assert res["changed"] and f"shop {version}" in res["msg"], res


def test_install_job_runs_the_app(awx: AwxPath, jobs: dict[str, Job]) -> None:
    successful(jobs["runtime"])
    job = successful(jobs["install-1.0.0"])
    assert job.stats()["node1"]["changed"] > 0 and job.stats()["node1"]["failures"] == 0


def test_upgrade_job_changes_only_what_changed(awx: AwxPath, jobs: dict[str, Job]) -> None:
    job = successful(jobs["upgrade-1.1.0"])
    assert job.stats()["node1"]["changed"] > 0
    stdout = (job.artifacts / "stdout").read_text()
    assert "shop 1.0.0 -> 1.1.0: added -; changed api; removed -; unchanged db, redis, gateway" in stdout, \
        stdout[-4000:]
    assert http(awx.site, "node1", "GET", "/version")["version"] == "1.1.0"


def test_a_failed_health_gate_is_a_failed_job_naming_the_component(awx: AwxPath, jobs: dict[str, Job]) -> None:
    job = jobs["upgrade-1.2.0"]
    assert job.status == "failed" and job.rc != 0, (job.status, job.rc)
    assert "Remote unit failed" in job.receptor, job.receptor  # receptor's own verdict on the work unit
    failed = job.of("runner_on_failed")
    assert {e["event_data"]["host"] for e in failed} == {"node1"}
    msg = failed[-1]["event_data"]["res"]["msg"]
    assert "component api failed its health check" in msg and "rolled back to 1.1.0" in msg, msg
    assert job.stats()["node1"]["failures"] == 1
    assert http(awx.site, "node1", "GET", "/version")["version"] == "1.1.0", "the host serves 1.1.0 again"
