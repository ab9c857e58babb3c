"""Docker images of the world's hosts: a systemd host image per arch, and the jump host image (amd64).

Host images are made from the cached root filesystem as a one-layer docker-archive whose config we write
ourselves (this engine labels `docker import --platform linux/arm64` images amd64, and `docker import`
rejects STOPSIGNAL), then `docker load`ed. The jump image is a legacy `docker build` on top of the amd64
host image that adds ansible-core in a venv: the newest claimed series that suite's python3 runs
(tests/world/ansible_cores.py). Tags carry a hash of everything that made the image, so a
stale image is never reused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .ansible_cores import newest_for
from .rootfs import Rootfs, RootfsRecipe, build_rootfs, cached_rootfs
from .util import IMAGE_REPO, WorldError, cache_dir, docker, file_lock, log, repo_root, run

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_FIXED_TIME = "1970-01-01T00:00:00Z"  # no timestamps: the same rootfs gives the same image ID

JUMP_VENV = "/opt/ansible"
JUMP_APT_PACKAGES = ("openssh-client", "python3-venv")
# Where the repository is bind-mounted read-only in the jump host, so ansible always runs the current code.
COLLECTION_MOUNT = "/root/.ansible/collections/ansible_collections/offline/delivery"
WORLD_MOUNT = "/root/world"        # the state dirs of all sites (inventories, ssh keys), read-only
TRANSFER_MOUNT = "/srv/transfer"   # a writable drop box: how files are "carried" into the site

ANSIBLE_CFG = """\
[defaults]
# The inventory comes from ANSIBLE_INVENTORY, set per site on the jump container.
host_key_checking = False
interpreter_python = /usr/bin/python3
collections_path = /root/.ansible/collections
forks = 10
timeout = 30
retry_files_enabled = False

[ssh_connection]
pipelining = True
ssh_args = -o ControlMaster=auto -o ControlPersist=60s -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
"""


@dataclasses.dataclass(frozen=True)
class HostImage:
    tag: str
    arch: str
    suite: str


def host_image_config(rootfs: Rootfs) -> dict:
    """The OCI/docker image config of a host image: systemd as PID 1, stop with SIGRTMIN+3."""
    arch = rootfs.recipe.arch
    config: dict = {
        "architecture": arch,
        "os": "linux",
        "created": _FIXED_TIME,
        "config": {
            "Env": [f"PATH={_PATH}", "container=docker"],
            "Cmd": ["/lib/systemd/systemd"],
            "StopSignal": "SIGRTMIN+3",
            "Labels": {"offline-delivery.world.recipe": rootfs.recipe.key(),
                       "offline-delivery.world.arch": arch},
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{rootfs.sha256}"]},
        "history": [{"created": _FIXED_TIME,
                     "created_by": f"mmdebstrap {rootfs.recipe.suite} {arch} ({rootfs.recipe.name()})"}],
    }
    if arch == "arm64":
        config["variant"] = "v8"
    return config


def _canonical(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", "--format", "{{.Id}}", tag, timeout=30).rc == 0


def host_image_tag(rootfs: Rootfs) -> str:
    """Tag named by the hash of the image config (which holds the rootfs digest and recipe key)."""
    key = hashlib.sha256(_canonical(host_image_config(rootfs))).hexdigest()[:16]
    return f"{IMAGE_REPO}/host:{rootfs.recipe.suite}-{rootfs.recipe.arch}-{key}"


def ensure_host_image(recipe: RootfsRecipe) -> HostImage:
    """Build (or reuse) the root filesystem and the host image for `recipe`."""
    rootfs = build_rootfs(recipe)
    config = _canonical(host_image_config(rootfs))
    tag = host_image_tag(rootfs)
    with file_lock(_lock_path(tag)):
        if not image_exists(tag):
            log(f"loading host image {tag}")
            _docker_load(rootfs, config, tag)
    return HostImage(tag=tag, arch=recipe.arch, suite=recipe.suite)


def _docker_load(rootfs: Rootfs, config: bytes, tag: str) -> None:
    """Stream a docker-archive (manifest.json, config, one layer = the rootfs tar) into `docker load`."""
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    layer_name = f"{rootfs.sha256}/layer.tar"
    manifest = _canonical([{"Config": config_name, "RepoTags": [tag], "Layers": [layer_name]}])
    proc = subprocess.Popen(["docker", "load"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdin is not None
    try:
        with tarfile.open(fileobj=proc.stdin, mode="w|", format=tarfile.PAX_FORMAT) as archive:
            _add_bytes(archive, config_name, config)
            _add_bytes(archive, "manifest.json", manifest)
            info = tarfile.TarInfo(layer_name)
            info.size = rootfs.path.stat().st_size
            with open(rootfs.path, "rb") as layer:
                archive.addfile(info, layer)
        out, _ = proc.communicate(timeout=600)
    except (BrokenPipeError, subprocess.TimeoutExpired) as exc:
        proc.kill()
        out, _ = proc.communicate()
        raise WorldError(
            f"docker load of {tag} from {rootfs.path} failed ({exc}): {out.decode(errors='replace')}") from exc
    if proc.returncode != 0:
        raise WorldError(f"docker load of {tag} from {rootfs.path} failed: {out.decode(errors='replace')}")


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _jump_dockerfile(base_tag: str, ansible_req: str) -> str:
    # The machine's CA bundle is used for pip only during the build (egress proxies with their own CA).
    return f"""\
FROM {base_tag}
COPY build-ca.crt /tmp/od-build-ca.crt
RUN set -eux; export DEBIAN_FRONTEND=noninteractive; \\
    apt-get update -q; apt-get install -y -q --no-install-recommends {' '.join(JUMP_APT_PACKAGES)}; \\
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb; \\
    mkdir -p /var/lib/apt/lists/partial; \\
    python3 -m venv {JUMP_VENV}; \\
    PIP_CERT=/tmp/od-build-ca.crt {JUMP_VENV}/bin/pip install -q --no-cache-dir --disable-pip-version-check \\
        '{ansible_req}'; \\
    rm -f /tmp/od-build-ca.crt
COPY ansible.cfg /etc/ansible/ansible.cfg
ENV PATH={JUMP_VENV}/bin:{_PATH}
LABEL offline-delivery.world.role=jump
"""


def jump_ansible_core(suite: str) -> str:
    """The ansible-core a jump host of `suite` installs: the newest claimed series its python3 runs (Debian 12:
    the test extra's pin, so the jump host runs what the venv runs; Debian 13: the newest claimed)."""
    return newest_for(suite).requirement()


def jump_image_tag(base: HostImage) -> str:
    dockerfile = _jump_dockerfile(base.tag, jump_ansible_core(base.suite))
    key = hashlib.sha256((dockerfile + ANSIBLE_CFG).encode()).hexdigest()[:16]
    return f"{IMAGE_REPO}/jump:{base.suite}-amd64-{key}"


def ensure_jump_image(base: HostImage) -> str:
    """Build (or reuse) the jump host image on top of the amd64 host image; returns its tag."""
    if base.arch != "amd64":
        raise WorldError(f"the jump host image is built on the amd64 host image, got {base.arch}")
    dockerfile = _jump_dockerfile(base.tag, jump_ansible_core(base.suite))
    tag = jump_image_tag(base)
    with file_lock(_lock_path(tag)):
        if image_exists(tag):
            return tag
        log(f"building jump image {tag} (apt + pip from the registries)")
        with tempfile.TemporaryDirectory(prefix="od-world-jump-") as ctx:
            ctx_path = Path(ctx)
            (ctx_path / "Dockerfile").write_text(dockerfile)
            (ctx_path / "ansible.cfg").write_text(ANSIBLE_CFG)
            shutil.copyfile(_machine_ca_bundle(), ctx_path / "build-ca.crt")
            result = run(["docker", "build", "--network", "bridge", "-t", tag, str(ctx_path)],
                         timeout=900, env={"DOCKER_BUILDKIT": "0"})
        result.check(f"building the jump image {tag} (needs apt and PyPI reachable from a build container)")
    return tag


def _lock_path(tag: str) -> Path:
    """One lock per image tag, so two sites coming up at once do not build the same image twice."""
    return cache_dir() / "locks" / (tag.replace("/", "_").replace(":", "_") + ".lock")


def _machine_ca_bundle() -> Path:
    for candidate in (Path("/etc/ssl/certs/ca-certificates.crt"), Path("/etc/pki/tls/certs/ca-bundle.crt")):
        if candidate.exists():
            return candidate
    raise WorldError("no CA bundle at /etc/ssl/certs/ca-certificates.crt: apt-get install ca-certificates")


def current_image_tags(suites: tuple[str, ...]) -> set[str]:
    """Tags of the images the current recipes give, for root filesystems already in the cache."""
    tags: set[str] = set()
    for suite in suites:
        for arch in ("amd64", "arm64"):
            rootfs = cached_rootfs(RootfsRecipe(arch=arch, suite=suite))
            if rootfs is None:
                continue
            tags.add(host_image_tag(rootfs))
            if arch == "amd64":
                tags.add(jump_image_tag(HostImage(host_image_tag(rootfs), arch, suite)))
    return tags


def remove_stale_images(keep: set[str]) -> list[str]:
    """Remove od-world images whose tag is not in `keep` (older recipes); returns the removed tags."""
    listed = docker("images", "--format", "{{.Repository}}:{{.Tag}}", timeout=60).check("listing images")
    stale = [t for t in listed.stdout.split() if t.startswith(f"{IMAGE_REPO}/") and t not in keep]
    for tag in stale:
        docker("rmi", tag, timeout=120)
    return stale
