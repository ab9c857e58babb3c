"""Fixtures giving end-to-end tests running air-gapped sites (tests/world), torn down at session end.

- `world_site`: the default site (repo + node1 + node2 amd64, arm1 arm64, a jump host with ansible).
- `world_site_b`: a second, smaller site up at the same time (multi-site and isolation tests).
Both are session-scoped: brought up once, removed when the session ends, also after failures or Ctrl-C.
Leftovers of an earlier killed run with the same name are removed first.

Skips happen only when the machine cannot run the world (not root, no Docker engine, no mmdebstrap, no
qemu binfmt for arm64); with CI=true the root conftest's rule makes those failures.
Env: OD_E2E_SITE / OD_E2E_SITE_B (site names), OD_WORLD_KEEP=1 (leave the sites up for poking at).
The shop bundles are cached in ${OD_CACHE}/bundles/ under a hash of every input (tests/e2e/media.py).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import pytest

from tests.world.rootfs import foreign_arch_problem
from tests.world.site import DEFAULT_HOSTS, HostSpec, Site
from tests.world.util import docker

SITE_B_HOSTS = (HostSpec("repo", "amd64", ("offline_repo",)), HostSpec("node1", "amd64", ("targets",)))


# The first world test's setup may build the world from scratch (about 5-8 min on a 2-core machine, most of
# it the arm64 root filesystem under qemu): give that one test more than the suite's default timeout.
COLD_BUILD_TIMEOUT = 2400


def _in_e2e(item: pytest.Item) -> bool:
    return str(item.path).startswith(os.path.dirname(__file__))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e needs the world: mark it (before -m selects) so `-m world` selects it."""
    for item in items:
        if _in_e2e(item):
            item.add_marker(pytest.mark.world)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """After selection: the first selected e2e test pays for a cold build, so it gets the longer timeout."""
    first = next((item for item in session.items if _in_e2e(item)), None)
    if first is not None and first.get_closest_marker("timeout") is None:
        first.add_marker(pytest.mark.timeout(COLD_BUILD_TIMEOUT))


def world_problem(arches: Iterable[str]) -> str | None:
    """Why this machine cannot run the test world, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (mmdebstrap and the Docker engine); run as root, e.g. sudo scripts/test"
    for tool in ("docker", "mmdebstrap", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/bootstrap installs it)"
    info = docker("info", "--format", "{{.ServerVersion}}", timeout=30)
    if info.rc != 0:
        return ("no Docker engine answers `docker info` (start dockerd; scripts/bootstrap does): "
                f"{info.output.strip()[:300]}")
    for arch in sorted(set(arches)):
        problem = foreign_arch_problem(arch)
        if problem:
            return f"cannot run {arch} hosts: {problem}"
    return None


def require_world(arches: Iterable[str]) -> None:
    problem = world_problem(arches)
    if problem is not None:
        pytest.skip(f"test world unavailable on this machine: {problem}")


def running_site(site: Site) -> Iterator[Site]:
    """Bring `site` up for a fixture's lifetime (removing leftovers of a killed run first), then down."""
    site.down()  # what an earlier, killed run may have left under this name
    try:
        site.up()
        yield site
    finally:
        if os.environ.get("OD_WORLD_KEEP") != "1":
            site.down()


@pytest.fixture(scope="session")
def world_site() -> Iterator[Site]:
    """The default site, up for the whole session."""
    require_world(h.arch for h in DEFAULT_HOSTS)
    yield from running_site(Site(os.environ.get("OD_E2E_SITE", "e2e-a"), DEFAULT_HOSTS))


@pytest.fixture(scope="session")
def world_site_b(world_site: Site) -> Iterator[Site]:
    """A second site, up at the same time as `world_site` (distinct name, network and subnet)."""
    require_world(h.arch for h in SITE_B_HOSTS)
    yield from running_site(Site(os.environ.get("OD_E2E_SITE_B", "e2e-b"), SITE_B_HOSTS))


@pytest.fixture(scope="session")
def shop_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """shop 1.0.0 (full) and 1.1.0 (delta) with Debian 12 packages, a tampered and an untrusted 1.1.0,
    built once per session for every e2e test module."""
    from tests.e2e.media import cached_shop_bundles
    return cached_shop_bundles()
