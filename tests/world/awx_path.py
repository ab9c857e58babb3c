"""AWX's job path on a world site: ansible-runner transmit -> receptor mesh -> `ansible-runner worker` in the
execution environment (EE) container started by podman on an execution node -> ansible-runner process.

AWX itself cannot be installed here, but the path it runs every job through can, from Debian 13 packages:

- the EE image: a Debian 13 root filesystem with ansible-core, ansible-runner and ssh from Debian (the recipe
  below, EE_PACKAGES), plus one layer holding this collection installed from the tarball that
  meta/execution-environment.yml names (`ansible-galaxy collection build` of the checkout). Written as a
  docker-archive and cached in ${OD_CACHE}/ee/ under a hash of its config (rootfs digest + layer digest);
- two receptor nodes (Debian 13's receptor 1.5 as a systemd service, the same node image): `awx-control`, the
  stand-in for AWX's control node, on a network of its own; and `exec1`, the execution node, on that network
  and on the site's network, with podman and the EE image loaded into its storage. receptor peers them over
  TCP, as AWX's mesh does;
- exec1's work type `ansible-runner` runs `podman run -i ... <EE> ansible-runner worker
  --private-data-dir=/runner`: the job's transmit stream on stdin, the event stream on stdout — what AWX's
  container groups run in their `worker` container, here on podman. The carried bundles are exposed to the
  job read-only at /srv/offline-bundles (AWX: "Paths to expose to isolated jobs" / the pod's volume);
- the controller side runs on this machine: `ansible-runner transmit` (the runner library, as AWX calls it),
  `receptorctl work submit --node exec1` on the control node, `ansible-runner process` into artifacts here.

Nested podman (a docker container running podman): the execution node runs like the world's hosts (systemd
as PID 1, tests/world/site.py's SYSTEMD_RUN_FLAGS: every capability but three, no seccomp/apparmor, the host's
cgroup tree); /var/lib/containers is a docker volume, i.e. a directory on the machine's own filesystem, so
podman's default overlay driver works there (overlay on top of docker's overlay2 root would not; vfs would
copy every layer). The EE runs with `--network host` in the execution node's network namespace, which is on
the site network: netavark's bridge + NAT inside a container is not needed for the job to reach the hosts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bundle_builder.jumpkit import build_collection
from offline_delivery_core.common.digests import sha256_file

from .hostimages import _add_bytes, _canonical, ensure_host_image
from .rootfs import HOST_PACKAGES, Rootfs, RootfsRecipe, build_rootfs
from .site import SYSTEMD_RUN_FLAGS, Site, inventory
from .util import LABEL, WorldError, cache_dir, docker, file_lock, log, repo_root

EE_SUITE = "trixie"
# What the EE's controller side needs (meta/execution-environment.yml's comment says the same of the base
# image): ansible-core in meta/runtime.yml's range (Debian 13: 2.19), ansible-runner (AWX runs every job as
# `ansible-runner worker` in the EE), ssh to the hosts (+ ssh-agent: how runner hands the job its ssh key).
EE_PACKAGES: tuple[str, ...] = ("ansible-core", "python3-ansible-runner", "openssh-client", "ca-certificates")
EE_RECIPE = RootfsRecipe(suite=EE_SUITE, packages=EE_PACKAGES, hooks=("customize-ee.sh",))
EE_COLLECTIONS = "/usr/share/ansible/collections"   # ansible-core's default system collections path
NODE_RECIPE = RootfsRecipe(suite=EE_SUITE, packages=HOST_PACKAGES + ("receptor", "python3-receptorctl", "podman",
                                                                       "crun"))
EE_DEFINITION = "meta/execution-environment.yml"
BUNDLES_MOUNT = "/srv/offline-bundles"  # where the carried disk is, on the execution node and in the job
EE_ARCHIVE_MOUNT = "/srv/ee-image/ee.tar"
SOCKET = "/run/receptor.sock"
MESH_PORT = 27199
CONTROL, EXEC = "awx-control", "exec1"
WORK_TYPE = "ansible-runner"
_FIXED_TIME = "1970-01-01T00:00:00Z"
STALE_EE_SECONDS = 3 * 3600  # an EE archive of other code older than this is removed when a new one is written
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# ---- the EE definition and the image we test ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EeContent:
    """What an EE carries, as far as this collection cares: comparable between the definition and the recipe."""

    collection_tarball: str        # offline-delivery-<version>.tar.gz
    tag: str                       # offline-delivery-ee:<version>
    needs: tuple[str, ...]         # what the base must bring: ansible-core, ansible-runner, ssh


def definition_content(root: Path | None = None) -> EeContent:
    """What meta/execution-environment.yml (the documented EE for real AWX users) puts into the EE."""
    root = root or repo_root()
    doc = yaml.safe_load((root / EE_DEFINITION).read_text(encoding="utf-8"))
    collections = doc["dependencies"]["galaxy"]["collections"]
    if len(collections) != 1 or collections[0].get("type") != "file":
        raise WorldError(f"{EE_DEFINITION}: dependencies.galaxy.collections must be the one collection tarball "
                         f"(type: file), found {collections}")
    # ansible-builder's final stage checks these two are in the base; ssh is the comment's openssh-clients.
    return EeContent(collection_tarball=Path(collections[0]["name"]).name, tag=doc["options"]["tags"][0],
                     needs=("ansible-core", "ansible-runner", "ssh"))


def recipe_content(root: Path | None = None) -> EeContent:
    """What the test's EE recipe puts into its image: the galaxy build of the checkout and Debian's packages."""
    root = root or repo_root()
    version = yaml.safe_load((root / "galaxy.yml").read_text(encoding="utf-8"))["version"]
    provides = {"ansible-core": "ansible-core", "python3-ansible-runner": "ansible-runner", "openssh-client": "ssh"}
    return EeContent(collection_tarball=f"offline-delivery-{version}.tar.gz", tag=f"offline-delivery-ee:{version}",
                     needs=tuple(provides[p] for p in EE_PACKAGES if p in provides))


@dataclasses.dataclass(frozen=True)
class EeImage:
    tag: str          # as podman names it: localhost/offline-delivery-ee:<version>
    archive: Path     # docker-archive for `podman load`


def _collection_layer(work: Path, definition: EeContent) -> Path:
    """A tar (fixed owner and times, sorted) of the collection installed from its galaxy tarball."""
    tarball = build_collection(repo_root(), work / "dist")
    if tarball.name != definition.collection_tarball:
        raise WorldError(f"ansible-galaxy collection build wrote {tarball.name}, but {EE_DEFINITION} installs "
                         f"{definition.collection_tarball}: bump the definition with galaxy.yml")
    tree = work / "tree"
    beside = Path(sys.executable).with_name("ansible-galaxy")  # the venv's, as bundle_builder.jumpkit finds it
    target = tree / EE_COLLECTIONS.lstrip("/")
    proc = subprocess.run([str(beside) if beside.exists() else "ansible-galaxy", "collection", "install", "--offline",
                           "--no-deps", "--force", "-p", str(target), str(tarball)],
                          capture_output=True, text=True, timeout=300, check=False)
    installed = target / "ansible_collections" / "offline" / "delivery" / "MANIFEST.json"
    if proc.returncode != 0 or not installed.is_file():
        raise WorldError(f"ansible-galaxy collection install of {tarball} failed (no {installed}): "
                         f"{proc.stdout[-1000:]}{proc.stderr[-2000:]}")
    layer = work / "collection-layer.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(tree.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(tree)))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0
            info.mode &= 0o755
            if info.isreg():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    return layer


def ee_image_config(rootfs: Rootfs, layer_sha: str, tag: str) -> dict:
    return {
        "architecture": "amd64", "os": "linux", "created": _FIXED_TIME,
        "config": {"Env": [f"PATH={_PATH}", "HOME=/runner", "LANG=C.UTF-8"], "WorkingDir": "/runner",
                   "Cmd": ["ansible-runner", "worker", "--private-data-dir=/runner"],
                   "Labels": {"offline-delivery.world.role": "ee", "offline-delivery.ee.tag": tag}},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{rootfs.sha256}", f"sha256:{layer_sha}"]},
        "history": [{"created": _FIXED_TIME,
                     "created_by": f"mmdebstrap {rootfs.recipe.name()} ({' '.join(EE_PACKAGES)})"},
                    {"created": _FIXED_TIME, "created_by": f"ansible-galaxy collection install -p {EE_COLLECTIONS}"}],
    }


def ensure_ee_image() -> EeImage:
    """The EE image archive for the current checkout, cached by its config's hash (rootfs + collection layer)."""
    definition = definition_content()
    if recipe_content() != definition:
        raise WorldError(f"the test's EE recipe and {EE_DEFINITION} disagree: {recipe_content()} vs {definition}")
    rootfs = build_rootfs(EE_RECIPE)
    tag = f"localhost/{definition.tag}"
    with tempfile.TemporaryDirectory(prefix="od-world-ee-") as tmp:
        layer = _collection_layer(Path(tmp), definition)
        layer_sha = sha256_file(layer)
        config = _canonical(ee_image_config(rootfs, layer_sha, tag))
        archive = cache_dir() / "ee" / f"offline-delivery-ee-{hashlib.sha256(config).hexdigest()[:16]}.tar"
        with file_lock(archive.with_suffix(".lock")):
            if not archive.exists():
                log(f"writing the EE image archive {archive}")
                partial = archive.with_name(f".partial-{archive.name}")
                _write_docker_archive(partial, config, tag, [(rootfs.sha256, rootfs.path), (layer_sha, layer)])
                partial.rename(archive)
                # Older EEs go, once no test that may still mount one can be running (another checkout's
                # session may have written one a minute ago).
                for old in archive.parent.glob("offline-delivery-ee-*.tar"):
                    if old != archive and time.time() - old.stat().st_mtime > STALE_EE_SECONDS:
                        old.unlink()
    return EeImage(tag=tag, archive=archive)


def _write_docker_archive(dest: Path, config: bytes, tag: str, layers: list[tuple[str, Path]]) -> None:
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    manifest = _canonical([{"Config": config_name, "RepoTags": [tag],
                            "Layers": [f"{sha}/layer.tar" for sha, _ in layers]}])
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as archive:
        _add_bytes(archive, config_name, config)
        _add_bytes(archive, "manifest.json", manifest)
        for sha, path in layers:
            info = tarfile.TarInfo(f"{sha}/layer.tar")
            info.size = path.stat().st_size
            with open(path, "rb") as fh:
                archive.addfile(info, fh)


# ---- the receptor mesh and the execution node ------------------------------------------------------------

def _receptor_config(node_id: str, peer: str | None, podman_argv: list[str] | None) -> str:
    doc: list[dict[str, Any]] = [
        {"node": {"id": node_id}},
        {"log-level": "info"},
        {"control-service": {"service": "control", "filename": SOCKET}},
    ]
    if peer:
        doc.append({"tcp-peer": {"address": peer, "redial": True}})
    else:
        doc.append({"tcp-listener": {"port": MESH_PORT}})
    if podman_argv:
        doc.append({"work-command": {"worktype": WORK_TYPE, "command": podman_argv[0],
                                     "params": " ".join(shlex.quote(a) for a in podman_argv[1:]),
                                     "allowruntimeparams": False}})
    return yaml.safe_dump(doc, sort_keys=False)


def worker_argv(ee: EeImage) -> list[str]:
    """The execution node's work command: the EE container running `ansible-runner worker` on the job's stream."""
    return ["podman", "run", "--rm", "--interactive", "--network", "host", "--pull", "never",
            "--volume", f"{BUNDLES_MOUNT}:{BUNDLES_MOUNT}:ro", "--label", "offline-delivery.awx-path=job",
            ee.tag, "ansible-runner", "worker", "--private-data-dir=/runner"]


def _advertised_work_types(status: dict, node: str) -> list[str]:
    """The work types `node` advertises in a `receptorctl status --json` answer."""
    for ad in status.get("Advertisements") or []:
        if ad.get("NodeID") == node:
            return [w["WorkType"] if isinstance(w, dict) else w for w in ad.get("WorkCommands") or []]
    return []


@dataclasses.dataclass
class Job:
    """One job's outcome as `ansible-runner process` reports it, with every event of the stream."""

    status: str
    rc: int | None
    events: list[dict]
    statuses: list[dict]   # the worker's status lines: "starting" names the command and the EE's environment
    artifacts: Path
    seconds: float
    receptor: str      # what receptorctl said about the work unit (empty when it succeeded)

    def of(self, event: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == event]

    def stats(self) -> dict[str, dict[str, int]]:
        """Per host counts of the last playbook_on_stats event: {"ok": ..., "changed": ..., "failures": ...}."""
        (stats,) = self.of("playbook_on_stats")[-1:]
        data = stats["event_data"]
        hosts = set().union(*(data.get(k) or {} for k in ("ok", "changed", "failures", "dark", "skipped")))
        return {h: {k: (data.get(k) or {}).get(h, 0) for k in ("ok", "changed", "failures", "dark", "skipped")}
                for h in hosts}


class AwxPath:
    """The control node and the execution node of a site, labelled with the site (its `down` removes them)."""

    def __init__(self, site: Site):
        self.site = site
        self.network = f"od-{site.name}-awx"

    def container(self, node: str) -> str:
        return f"od-{self.site.name}-{node}"

    def up(self, ee: EeImage) -> None:
        started = time.monotonic()
        image = ensure_host_image(NODE_RECIPE).tag
        docker("network", "create", "--internal", "--label", f"{LABEL}={self.site.name}", self.network,
               timeout=60).check(f"creating the network {self.network}")
        for node, extra in ((CONTROL, []), (EXEC, ["-v", f"{self.site.transfer_dir}:{BUNDLES_MOUNT}:ro",
                                                   "-v", f"{ee.archive}:{EE_ARCHIVE_MOUNT}:ro",
                                                   "-v", "/var/lib/containers"])):
            docker("run", "-d", "--name", self.container(node), "--hostname", node, "--network", self.network,
                   "--network-alias", node, "--label", f"{LABEL}={self.site.name}",
                   "--label", f"{LABEL}.host={node}", "--label", f"{LABEL}.role=awx",
                   *SYSTEMD_RUN_FLAGS, *extra, image, timeout=120).check(f"starting {node}")
        docker("network", "connect", "--alias", EXEC, self.site.network, self.container(EXEC),
               timeout=60).check(f"connecting {EXEC} to {self.site.network}")
        for node in (CONTROL, EXEC):
            self._wait_booted(node)
        load = self.exec(EXEC, ["podman", "load", "-q", "-i", EE_ARCHIVE_MOUNT], timeout=600)
        load.check(f"podman load of the EE image on {EXEC}")
        self._configure(EXEC, _receptor_config(EXEC, None, worker_argv(ee)))
        self._configure(CONTROL, _receptor_config(CONTROL, f"{EXEC}:{MESH_PORT}", None))
        self._wait_mesh()
        log(f"site {self.site.name}: receptor mesh {CONTROL} -> {EXEC} with the EE {ee.tag} up in "
            f"{time.monotonic() - started:.0f}s")

    def exec(self, node: str, argv: list[str], timeout: float = 120, stdin: Path | None = None,
             stdout: Path | None = None) -> Any:
        """A command on a node (the harness's back door); with stdin/stdout files for streams."""
        env = ["-e", "PODMAN_IGNORE_CGROUPSV1_WARNING=1"]
        if stdin is None and stdout is None:
            return docker("exec", *env, self.container(node), *argv, timeout=timeout)
        with open(stdin or "/dev/null", "rb") as fin, open(stdout or "/dev/null", "wb") as fout:
            proc = subprocess.run(["docker", "exec", "-i", *env, self.container(node), *argv], stdin=fin,
                                  stdout=fout, stderr=subprocess.PIPE, timeout=timeout, check=False)
        return proc

    def _wait_booted(self, node: str) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            state = self.exec(node, ["systemctl", "is-system-running"], timeout=30).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.5)
        raise WorldError(f"{self.container(node)} not booted after 90s")

    def _configure(self, node: str, config: str) -> None:
        # receptor puts the work command's stderr into the job's stream: podman's cgroup v1 deprecation warning
        # would precede the worker's first line there (this machine mounts cgroup v1).
        script = ("cat > /etc/receptor/receptor.conf && mkdir -p /etc/systemd/system/receptor.service.d && "
                  "printf '[Service]\\nEnvironment=PODMAN_IGNORE_CGROUPSV1_WARNING=1\\n' "
                  "> /etc/systemd/system/receptor.service.d/od-world.conf && systemctl daemon-reload && "
                  "systemctl restart receptor.service")
        docker("exec", "-i", self.container(node), "sh", "-c", script, input_text=config,
               timeout=60).check(f"configuring and starting receptor on {node}")

    def _wait_mesh(self) -> None:
        deadline = time.monotonic() + 60
        out = ""
        while time.monotonic() < deadline:
            res = self.exec(CONTROL, ["receptorctl", "--socket", SOCKET, "status", "--json"], timeout=30)
            out = res.output
            if res.rc == 0 and WORK_TYPE in _advertised_work_types(json.loads(res.stdout), EXEC):
                return
            time.sleep(1)
        raise WorldError(f"{EXEC} never advertised the work type {WORK_TYPE} to {CONTROL}:\n{out[-3000:]}")

    # ---- one job, the way AWX runs it -----------------------------------------------------------------

    def job_inventory(self) -> dict:
        """The site's inventory without a key file: the key reaches the job as AWX's machine credential does,
        through runner's ssh_key (ssh-agent inside the EE)."""
        doc = inventory([self.site], {self.site.name: ""}, prefix_hosts=False)
        for group in doc["all"]["children"].values():
            group.get("vars", {}).pop("ansible_ssh_private_key_file", None)
        return doc

    def run_job(self, name: str, playbook: str, extravars: dict, work: Path,
                timeout: float = 1800) -> Job:
        """transmit -> receptorctl work submit --node exec1 (on the control node) -> process, all streamed."""
        import ansible_runner

        started = time.monotonic()
        private = work / name / "private"
        (private / "project").mkdir(parents=True)
        (work / name).chmod(0o700)  # the transmit stream below carries the ssh key until it is submitted
        shutil.copytree(repo_root() / "playbooks", private / "project" / "playbooks")
        (private / "inventory").mkdir()
        (private / "inventory" / "hosts.yml").write_text(yaml.safe_dump(self.job_inventory(), sort_keys=False))
        group_vars = self.site.state_dir / "group_vars"
        if group_vars.is_dir():
            shutil.copytree(group_vars, private / "inventory" / "group_vars")
        stream_in, stream_out = work / name / "transmit.stream", work / name / "results.stream"
        with open(stream_in, "wb") as out:
            ansible_runner.run(streamer="transmit", _output=out, private_data_dir=str(private),
                               playbook=playbook, extravars=extravars, ident=name,
                               ssh_key=self.site.key_path.read_text(), quiet=True)
        submit = self.exec(CONTROL, ["receptorctl", "--socket", SOCKET, "work", "submit", "--node", EXEC,
                                     "--payload", "-", "--follow", "--rm", WORK_TYPE],
                           timeout=timeout, stdin=stream_in, stdout=stream_out)
        stream_in.unlink()  # it holds the ssh key (runner's ssh_key), as AWX's stream does; the worker deleted its copy
        # A failed playbook makes the worker exit non-zero: receptor marks the unit failed ("Remote unit failed:
        # exit status N") and still returns the whole stream, which AWX processes all the same.
        receptor_says = submit.stderr.decode(errors="replace").strip()
        events: list[dict] = []
        statuses: list[dict] = []

        def on_event(event: dict) -> bool:
            events.append(event)
            return True

        def on_status(data: dict, runner_config: Any) -> None:
            statuses.append(data)

        processed = work / name / "processed"
        with open(stream_out, "rb") as fin:
            runner = ansible_runner.run(streamer="process", _input=fin, private_data_dir=str(processed),
                                        ident=name, event_handler=on_event, status_handler=on_status, quiet=True)
        artifacts = processed / "artifacts" / name
        rc_file = artifacts / "rc"
        if not events:
            raise WorldError(f"job {name}: no event came back through receptor (receptorctl rc {submit.returncode}: "
                             f"{receptor_says[-3000:]}); the stream is in {stream_out}")
        return Job(status=runner.status, rc=int(rc_file.read_text()) if rc_file.is_file() else None, events=events,
                   statuses=statuses, artifacts=artifacts, seconds=round(time.monotonic() - started, 1),
                   receptor=receptor_says)

