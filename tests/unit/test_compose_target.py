"""The compose target's jobs without Docker: the project file a job and its dependents get, and how a job
container's state is read (observe, job_state). The real containers run in tests/e2e/test_parity.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

from offline_delivery_core.app.runtime import ComponentSpec
from offline_delivery_core.targets.compose import ComposeRuntime


def make_spec(name: str, **changes: Any) -> ComponentSpec:
    data: Dict[str, Any] = dict(
        name=name, app="poll", version="1.0.0", image="repo:5000/poll/app@sha256:" + "cd" * 32,
        reference="poll/app:1.0.0", index_digest="sha256:" + "cd" * 32, manifest_digest="sha256:" + "ab" * 32,
        platform="linux/amd64", entrypoint=None, command=None, user=None, env={}, config_files=[],
        fingerprint="hmac-sha256:" + name)
    data.update(changes)
    return ComponentSpec(**data)


class Docker:
    """Answers `docker ps` / `docker inspect` with the containers given (State as Docker reports it)."""

    def __init__(self, containers: List[Tuple[str, str, Dict[str, Any]]]) -> None:
        self.containers = containers   # (service, kind label or "", State)

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
        return 0, "", ""


def runtime(tmp_path: Path, docker: Docker) -> ComposeRuntime:
    return ComposeRuntime("poll", apps_dir=str(tmp_path / "apps"), state_dir=str(tmp_path / "state"), run=docker)


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
