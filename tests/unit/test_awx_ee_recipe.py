"""The EE the AWX-path test builds (tests/world/awx_path.py) and the one meta/execution-environment.yml documents
for real AWX users describe the same content: the same collection tarball (galaxy.yml's version), the same tag,
and a base that brings what the definition says the base must (ansible-core, ansible-runner, ssh). The e2e test
(tests/e2e/test_awx_path.py) then checks the built image itself: the installed collection's version, ansible-core
inside meta/runtime.yml's range, ansible-runner importable.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.world.awx_path import (BUNDLES_MOUNT, EE_RECIPE, EeContent, definition_content, recipe_content,
                                  worker_argv, EeImage)
from tests.world.util import WorldError

REPO = Path(__file__).resolve().parents[2]


def test_the_recipe_and_the_definition_describe_the_same_ee() -> None:
    assert recipe_content() == definition_content()
    version = yaml.safe_load((REPO / "galaxy.yml").read_text())["version"]
    assert definition_content() == EeContent(f"offline-delivery-{version}.tar.gz", f"offline-delivery-ee:{version}",
                                             ("ansible-core", "ansible-runner", "ssh"))


def test_the_recipe_takes_everything_from_debian_13() -> None:
    assert EE_RECIPE.suite == "trixie"  # Debian 13: ansible-core 2.19, inside meta/runtime.yml's range
    assert {"ansible-core", "python3-ansible-runner", "openssh-client"} <= set(EE_RECIPE.packages)


def test_a_definition_with_another_collection_is_refused(tmp_path: Path) -> None:
    (tmp_path / "meta").mkdir()
    doc = yaml.safe_load((REPO / "meta" / "execution-environment.yml").read_text())
    doc["dependencies"]["galaxy"]["collections"].append({"name": "community.general", "type": "galaxy"})
    (tmp_path / "meta" / "execution-environment.yml").write_text(yaml.safe_dump(doc))
    with pytest.raises(WorldError, match="must be the one collection tarball"):
        definition_content(tmp_path)


def test_a_bumped_galaxy_version_shows_as_a_difference(tmp_path: Path) -> None:
    shutil.copytree(REPO / "meta", tmp_path / "meta")
    galaxy = yaml.safe_load((REPO / "galaxy.yml").read_text())
    galaxy["version"] = "9.9.9"
    (tmp_path / "galaxy.yml").write_text(yaml.safe_dump(galaxy))
    assert recipe_content(tmp_path) != definition_content(tmp_path)


def test_the_worker_runs_as_the_documented_pod_spec_and_sees_the_bundles_read_only() -> None:
    """docs/awx.md's container-group pod spec runs `ansible-runner worker --private-data-dir=/runner` with the
    bundles at /srv/offline-bundles: the test's podman work command runs the same."""
    argv = worker_argv(EeImage(tag="localhost/offline-delivery-ee:0", archive=Path("/nonexistent")))
    doc = (REPO / "docs" / "awx.md").read_text()
    spec_args = re.search(r"args: \[([^]]*)\]", doc)
    assert spec_args, "docs/awx.md lost its pod spec"
    assert argv[-3:] == [a.strip() for a in spec_args.group(1).split(",")]
    assert f"{BUNDLES_MOUNT}:{BUNDLES_MOUNT}:ro" in argv and f"mountPath: {BUNDLES_MOUNT}, readOnly: true" in doc
