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
