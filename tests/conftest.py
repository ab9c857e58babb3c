"""Shared fixtures: repository root on sys.path (for ``tests.helpers``), signing keys, sample images; and the
one rule for skips: under CI (CI=true) a skipped test fails unless tests/ci_skips.yml allows it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers.images import (SampleImages, sample_images, sample_model,  # noqa: E402
                                  write_docker_archive, write_oci_layout)


CI_SKIPS = ROOT / "tests" / "ci_skips.yml"


def in_ci() -> bool:
    """CI=true (set by .ci/run): nothing may pass by not running."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def allowed_ci_skips() -> dict[str, str]:
    """node id -> reason, from tests/ci_skips.yml (every entry has test, reason and remove_when)."""
    entries = yaml.safe_load(CI_SKIPS.read_text()) or []
    allowed = {}
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and {"test", "reason", "remove_when"} <= set(entry)):
            raise pytest.UsageError(f"{CI_SKIPS}: entry {i} needs test, reason and remove_when: {entry!r}")
        allowed[entry["test"]] = entry["reason"]
    return allowed


def _fail_unallowed_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under CI, a skip that tests/ci_skips.yml does not allow becomes a failure naming the reason."""
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    if report.nodeid.split("[", 1)[0] in allowed_ci_skips():
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true, which fails the run (allow it in tests/ci_skips.yml only with a "
                       f"reason and what would remove it): {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport() -> object:
    outcome = yield
    _fail_unallowed_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report() -> object:
    """The same for a whole module skipped while it is collected (importorskip, allow_module_level)."""
    outcome = yield
    _fail_unallowed_skip(outcome.get_result())


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
