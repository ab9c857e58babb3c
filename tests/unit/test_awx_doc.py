"""docs/awx.md against the code it describes: the playbooks a job template can select exist and AWX's project scan
lists them, every survey variable is one the playbooks or roles read, the JSON examples parse."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "awx.md").read_text(encoding="utf-8")
# awx/main/utils/ansible.py (valid_playbook_re): how AWX decides that a project file is a playbook
AWX_PLAYBOOK_LINE = re.compile(r"^\s*?-?\s*?(?:hosts|include|import_playbook):\s*?.*?$")


def section(title: str) -> str:
    start = DOC.index(f"## {title}")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end if end > 0 else None]


def table_first_column(text: str) -> list[str]:
    return re.findall(r"^\| `([^`]+)`", text, flags=re.M)


def collection_text() -> str:
    files = [*REPO.glob("playbooks/*.yml"), *REPO.glob("roles/*/defaults/*.yml"), *REPO.glob("roles/*/tasks/*.yml"),
             *REPO.glob("roles/*/templates/*.j2")]
    return "\n".join(p.read_text(encoding="utf-8") for p in files)


def test_every_playbook_in_the_table_exists_and_awx_lists_it() -> None:
    listed = [p for p in re.findall(r"`(playbooks/[a-z_]+\.yml)`", section("2. The project"))
              if p != "playbooks/site_layout.yml"]
    assert len(listed) >= 10
    for path in listed:
        lines = (REPO / path).read_text(encoding="utf-8").splitlines()
        assert any(AWX_PLAYBOOK_LINE.match(line) for line in lines), f"AWX would not list {path}"


def test_every_survey_variable_is_read_by_the_collection() -> None:
    variables = table_first_column(section("3. Variables for surveys and extra variables"))
    assert "app_version" in variables and "offline_delivery_app_hosts" in variables
    text = collection_text()
    missing = [v for v in variables if not re.search(rf"\b{re.escape(v)}\b", text)]
    assert not missing, f"docs/awx.md names variables no playbook or role reads: {missing}"


@pytest.mark.parametrize("block", re.findall(r"```json\n(.*?)```", DOC, flags=re.S))
def test_json_examples_parse(block: str) -> None:
    doc = json.loads(block)
    for question in doc.get("spec", []):
        assert question["variable"] in table_first_column(section("3. Variables for surveys and extra variables"))
