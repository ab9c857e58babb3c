"""Shared fixtures: repository root on sys.path (for ``tests.helpers``), signing keys, sample images."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers.images import (SampleImages, sample_images, sample_model,  # noqa: E402
                                  write_docker_archive, write_oci_layout)


@pytest.fixture(scope="session")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(private key path, public key path) made with bundle_builder.signing.keygen."""
    from bundle_builder import signing

    prefix = tmp_path_factory.mktemp("keys") / "vendor"
    return signing.keygen(prefix)


@pytest.fixture(scope="session")
def other_keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from bundle_builder import signing

    prefix = tmp_path_factory.mktemp("keys2") / "intruder"
    return signing.keygen(prefix)


class SampleWorld:
    """Sample images written as one docker-save archive per arch and one multi-platform OCI layout."""

    def __init__(self, root: Path, images: SampleImages) -> None:
        self.root = root
        self.images = images
        self.archive_amd64 = write_docker_archive(root / "amd64.tar", [images.api["amd64"], images.web["amd64"]])
        self.archive_arm64 = write_docker_archive(root / "arm64.tar", [images.api["arm64"], images.web["arm64"]])
        self.oci = write_oci_layout(root / "oci", images.all())

    def write_model(self, name: str = "app.yml", **kwargs: object) -> Path:
        path = self.root / name
        path.write_text(yaml.safe_dump(sample_model(**kwargs), sort_keys=False))  # type: ignore[arg-type]
        return path

    @property
    def archives(self) -> list[str]:
        return [f"archive:{self.archive_amd64}", f"archive:{self.archive_arm64}"]


@pytest.fixture
def sample_world(tmp_path: Path) -> SampleWorld:
    """Fresh sample image artifacts (amd64 + arm64, shared base layers) under tmp_path/images."""
    root = tmp_path / "images"
    root.mkdir()
    return SampleWorld(root, sample_images())
