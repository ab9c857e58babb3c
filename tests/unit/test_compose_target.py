"""The compose target without Docker: the project file a job and its dependents get, how a job container's
state is read (observe, job_state), and the bounded parallel image pulls (prepare). The real containers run in tests/e2e/test_parity.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from offline_delivery_core.app.runtime import ComponentSpec, DeployError
from offline_delivery_core.targets.compose import PULL_WORKERS, ComposeRuntime


def make_spec(name: str, **changes: Any) -> ComponentSpec:
    data: Dict[str, Any] = dict(
        name=name, app="poll", version="1.0.0", image="repo:5000/poll/app@sha256:" + "cd" * 32,
        reference="poll/app:1.0.0", index_digest="sha256:" + "cd" * 32, manifest_digest="sha256:" + "ab" * 32,
        platform="linux/amd64", entrypoint=None, command=None, user=None, env={}, config_files=[],
        fingerprint="hmac-sha256:" + name)
    data.update(changes)
    return ComponentSpec(**data)


class Docker:
    """Answers `docker ps` / `docker inspect` with the containers given (State as Docker reports it), and a
    health check's `timeout ... docker exec` with ``check_rc``."""

    def __init__(self, containers: List[Tuple[str, str, Dict[str, Any]]]) -> None:
        self.containers = containers   # (service, kind label or "", State)
        self.checks: List[List[str]] = []
        self.check_rc = 0

    def __call__(self, argv: List[str]) -> Tuple[int, str, str]:
        if argv[1] == "ps":
            return 0, "\n".join("id%d" % i for i in range(len(self.containers))), ""
        if argv[1] == "inspect":
            out = []
            for i, (service, kind, state) in enumerate(self.containers):
                labels = {"com.docker.compose.service": service, "io.offline-delivery.fingerprint": "fp-" + service}
                if kind:
                    labels["io.offline-delivery.kind"] = kind
                out.append({"Id": "id%d" % i, "Name": "/od-poll-%s-1" % service, "Config": {"Labels": labels},
                            "State": state})
            return 0, json.dumps(out), ""
        if argv[0] == "timeout":   # docker exec of a health check: what `timeout` says when it stops one
            self.checks.append(argv)
            return self.check_rc, "", ""
        return 0, "", ""


def runtime(tmp_path: Path, docker: Docker, health_scale: float = 1.0) -> ComposeRuntime:
    return ComposeRuntime("poll", apps_dir=str(tmp_path / "apps"), state_dir=str(tmp_path / "state"), run=docker,
                          health_scale=health_scale)


def test_a_slow_hosts_exec_check_gets_its_scaled_time(tmp_path: Path) -> None:
    docker = Docker([("tally", "", {"Status": "running", "Running": True})])
    tally = make_spec("tally", health={"exec": ["python3", "/opt/poll/poll.py", "check-tally"], "timeout": 3,
                                       "interval": 5, "retries": 6, "start_period": 2})
    rt = runtime(tmp_path, docker, health_scale=3)
    assert rt.probe(tally) == (True, "")
    assert docker.checks[-1][:5] == ["timeout", "10", "docker", "exec", "id0"]
    docker.check_rc = 124
    assert rt.probe(tally) == (False, "python3 did not finish within 9s")


def test_a_job_is_a_one_shot_service_its_dependents_wait_for(tmp_path: Path) -> None:
    job = make_spec("migrate", kind="job")
    web = make_spec("web", local_deps=["migrate", "redis"],
                    depends_on={"migrate": {"condition": "completed"}, "redis": {"condition": "healthy"}})
    rt = runtime(tmp_path, Docker([]))
    rt._write_project([job, web])
    project = json.loads(Path(rt.compose_file).read_text().split("\n", 2)[2])
    assert project["services"]["migrate"]["restart"] == "no"
    assert project["services"]["migrate"]["labels"]["io.offline-delivery.kind"] == "job"
    assert project["services"]["web"]["restart"] == "unless-stopped"
    assert "io.offline-delivery.kind" not in project["services"]["web"]["labels"]
    assert project["services"]["web"]["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully"}, "redis": {"condition": "service_started"}}


def test_a_job_container_state_is_the_job_state(tmp_path: Path) -> None:
    exited0 = {"Status": "exited", "Running": False, "ExitCode": 0, "FinishedAt": "2026-12-06T03:00:00Z"}
    rt = runtime(tmp_path, Docker([("migrate", "job", exited0),
                                   ("web", "", {"Status": "running", "Running": True})]))
    seen = rt.observe()
    assert seen["migrate"].running and seen["web"].running   # a succeeded job counts as deployed and well
    assert rt.job_state(make_spec("migrate", kind="job")) == ("succeeded", "exited 0 at 2026-12-06T03:00:00Z")
    assert rt.probe(make_spec("migrate", kind="job")) == (True, "exited 0 at 2026-12-06T03:00:00Z")

    failed = {"Status": "exited", "Running": False, "ExitCode": 3}
    rt = runtime(tmp_path, Docker([("migrate", "job", failed)]))
    assert not rt.observe()["migrate"].running   # the next deploy runs it again
    assert rt.job_state(make_spec("migrate", kind="job")) == ("failed", "container exited, exit code 3")
    rt = runtime(tmp_path, Docker([("migrate", "job", {"Status": "running", "Running": True})]))
    assert rt.job_state(make_spec("migrate", kind="job")) == ("running", "running")
    # an exited service is not a finished job
    rt = runtime(tmp_path, Docker([("web", "", exited0)]))
    assert not rt.observe()["web"].running


class Registry:
    """Answers `docker image inspect` (present or not) and `docker pull` (slow, or failing for some images),
    recording how many pulls ran at once and the order things were asked."""

    def __init__(self, present: Tuple[str, ...] = (), failing: Tuple[str, ...] = (), delay: float = 0.2) -> None:
        self.present, self.failing, self.delay = set(present), set(failing), delay
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.pulled: List[str] = []

    def __call__(self, argv: List[str]) -> Tuple[int, str, str]:
        image = argv[-1]
        if argv[1:3] == ["image", "inspect"]:
            return (0, "sha256:x\n", "") if image in self.present else (1, "", "No such image: " + image)
        assert argv[1:3] == ["pull", "--quiet"], argv
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(self.delay)
        with self.lock:
            self.running -= 1
            self.pulled.append(image)
        if image in self.failing:
            return 1, "", "Error response from daemon: manifest unknown: " + image
        return 0, image + "\n", ""


def image(n: int) -> str:
    return "repo:5000/shop/c%d@sha256:%064x" % (n, n)


def test_pulls_run_side_by_side_bounded_one_per_image(tmp_path: Path) -> None:
    specs = [make_spec("c%d" % n, image=image(n)) for n in range(9)]
    specs.append(make_spec("c9", image=image(0)))          # shares c0's image: pulled once
    specs.append(make_spec("c10", image=image(10)))        # already on the host: not pulled
    registry = Registry(present=(image(10),))
    rt = ComposeRuntime("poll", apps_dir=str(tmp_path / "apps"), state_dir=str(tmp_path / "state"), run=registry)
    started = time.monotonic()
    rt.prepare(specs)
    took = time.monotonic() - started
    assert sorted(registry.pulled) == sorted(image(n) for n in range(9))
    assert registry.peak == PULL_WORKERS
    assert took < 9 * registry.delay * 0.75   # 9 pulls of 0.2 s, 4 at a time: 3 rounds, not 9


def test_failed_pulls_name_component_and_image_in_plan_order(tmp_path: Path) -> None:
    specs = [make_spec("db", image=image(1), reference="shop/postgres:1.0.0"),
             make_spec("api", image=image(2), reference="shop/api:1.0.0"),
             make_spec("worker", image=image(2), reference="shop/api:1.0.0"),
             make_spec("gateway", image=image(3), reference="shop/gateway:1.0.0")]
    # the later image fails first (no delay): the message still follows the plan's order
    registry = Registry(failing=(image(2), image(3)), delay=0.0)
    rt = ComposeRuntime("shop", apps_dir=str(tmp_path / "apps"), state_dir=str(tmp_path / "state"), run=registry)
    with pytest.raises(DeployError) as caught:
        rt.prepare(specs)
    assert str(caught.value) == (
        "pulling from the site registry failed for 2 of 3 images: "
        "api, worker (shop/api:1.0.0, %s): docker pull exited 1: Error response from daemon: manifest unknown: %s; "
        "gateway (shop/gateway:1.0.0, %s): docker pull exited 1: Error response from daemon: manifest unknown: %s"
        % (image(2), image(2), image(3), image(3)))
    assert sorted(registry.pulled) == [image(1), image(2), image(3)]   # every pull ran to its end


def test_nothing_to_pull_runs_nothing(tmp_path: Path) -> None:
    registry = Registry(present=(image(1),))
    rt = ComposeRuntime("shop", apps_dir=str(tmp_path / "apps"), state_dir=str(tmp_path / "state"), run=registry)
    rt.prepare([])
    rt.prepare([make_spec("db", image=image(1))])
    assert registry.pulled == []
