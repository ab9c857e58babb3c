"""Every YAML file of the collection parses: ansible-lint reports a file it cannot load only as a warning
(load-failure), so a broken argument spec or task file would otherwise pass the lint step."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted(p for d in ("roles", "playbooks", "meta", "molecule", "inventories", "examples", "changelogs")
               for p in (ROOT / d).rglob("*") if p.suffix in (".yml", ".yaml") and p.is_file())


def test_the_collection_has_yaml_files() -> None:
    assert len(FILES) > 40


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_yaml_parses(path: Path) -> None:
    list(yaml.safe_load_all(path.read_text()))
