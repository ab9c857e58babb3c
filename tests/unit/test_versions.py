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
    """meta/runtime.yml claims exactly the ansible-core range the test extra installs, and the suite runs on a
    version inside it (it claimed >=2.16.0 while only 2.18 was ever tested)."""
    import re

    from ansible.release import __version__ as running
    from packaging.specifiers import SpecifierSet

    claimed = SpecifierSet(yaml.safe_load((ROOT / "meta" / "runtime.yml").read_text())["requires_ansible"])
    pinned = re.search(r'"ansible-core([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned, "pyproject.toml's test extra pins ansible-core"
    assert claimed == SpecifierSet(pinned.group(1)), (str(claimed), pinned.group(1))
    assert running in claimed, f"the suite runs on ansible-core {running}, outside the claimed {claimed}"
