"""One version for the collection and the builder: galaxy.yml's is the one recorded in every manifest."""
from __future__ import annotations

from pathlib import Path

import yaml

import bundle_builder
from bundle_builder import build

ROOT = Path(__file__).resolve().parents[2]


def test_builder_version_is_the_collection_version() -> None:
    galaxy = yaml.safe_load((ROOT / "galaxy.yml").read_text())
    assert bundle_builder.__version__ == galaxy["version"], (
        "bump bundle_builder/__init__.py __version__ together with galaxy.yml's version")
    assert build.BUILDER_VERSION == galaxy["version"]


def test_the_collection_knows_its_version_at_run_time() -> None:
    """bundle_export compares this constant (module_utils travel with a module; galaxy.yml does not) with the
    installed builder's version: it must be galaxy.yml's."""
    from offline_delivery_core.common.version import COLLECTION_VERSION

    galaxy = yaml.safe_load((ROOT / "galaxy.yml").read_text())
    assert COLLECTION_VERSION == galaxy["version"], (
        "bump plugins/module_utils/common/version.py COLLECTION_VERSION together with galaxy.yml's version")


def test_the_claimed_ansible_core_range_is_the_tested_range() -> None:
    """meta/runtime.yml claims exactly the series of tests/world/ansible_cores.py (it once claimed >=2.16.0 while
    only 2.18 was tested): the test extra pins the first, every other one has its check session
    (tests/integration/test_ansible_cores.py), and this suite runs on one of them."""
    import re

    from ansible.release import __version__ as running
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    from tests.world.ansible_cores import ANSIBLE_CORES, claimed_range, extra_cores

    claimed = SpecifierSet(yaml.safe_load((ROOT / "meta" / "runtime.yml").read_text())["requires_ansible"])
    assert claimed == SpecifierSet(claimed_range()), (str(claimed), claimed_range())
    pinned = re.findall(r'"(ansible-core[^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned == [ANSIBLE_CORES[0].requirement()], (
        "pyproject.toml's test extra pins the oldest claimed series", pinned)
    series = [Version(core.series) for core in ANSIBLE_CORES]
    assert series == sorted(series) and all(
        (b.major, b.minor) == (a.major, a.minor + 1) for a, b in zip(series, series[1:])), (
        "the claimed series are contiguous, oldest first: a range claims every series in it", series)
    assert extra_cores() == ANSIBLE_CORES[1:]
    assert any(running in SpecifierSet(core.requirement()[len("ansible-core"):]) for core in ANSIBLE_CORES), (
        f"the suite runs on ansible-core {running}, not one of the claimed series")


def test_the_readme_names_the_claimed_series() -> None:
    """README.md's ansible-core policy names every claimed series and the range runtime.yml claims."""
    from tests.world.ansible_cores import ANSIBLE_CORES, claimed_range

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## ansible-core", 1)[1].split("\n## ", 1)[0] if "## ansible-core" in readme else ""
    assert section, "README.md has an '## ansible-core' section (the policy: which versions, why)"
    for core in ANSIBLE_CORES:
        assert core.series in section, f"README.md's ansible-core section does not name {core.series}"
    assert f"`{claimed_range()}`" in section
