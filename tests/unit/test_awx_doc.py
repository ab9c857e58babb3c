"""docs/awx.md against the code it describes: the playbooks a job template can select exist and AWX's project scan
lists them, every survey variable is one the playbooks (or the roles they run) really read, the JSON examples parse.

"Really read" means a variable of a Jinja expression Ansible evaluates: in a templated string (``{{ }}``/``{% %}``), a
bare condition (``when``, ``that``, ``failed_when``, ``changed_when``, ``until``) or a role template. The YAML is
loaded, so a comment or prose that merely names a variable does not count."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import jinja2
import jinja2.meta
import jinja2.nodes
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "awx.md").read_text(encoding="utf-8")
# awx/main/utils/ansible.py (valid_playbook_re): how AWX decides that a project file is a playbook
AWX_PLAYBOOK_LINE = re.compile(r"^\s*?-?\s*?(?:hosts|include|import_playbook):\s*?.*?$")
# Keys whose string values Ansible evaluates as bare Jinja expressions (no braces).
CONDITION_KEYS = {"when", "that", "failed_when", "changed_when", "until"}
ROLE_INCLUDES = {f"{ns}{verb}_role" for ns in ("", "ansible.builtin.", "ansible.legacy.")
                 for verb in ("include", "import")}
PLAYBOOK_IMPORTS = {f"{ns}import_playbook" for ns in ("", "ansible.builtin.", "ansible.legacy.")}


class _AnyName(dict):  # type: ignore[type-arg]
    """Filters and tests by any name (Ansible's own are not loaded here): only the variables matter."""

    def get(self, key: Any, default: Any = None) -> Any:
        return super().get(key, lambda *a, **k: None)


JINJA = jinja2.Environment()
JINJA.filters = _AnyName(JINJA.filters)
JINJA.tests = _AnyName(JINJA.tests)


def section(title: str) -> str:
    start = DOC.index(f"## {title}")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end if end > 0 else None]


def table_first_column(text: str) -> list[str]:
    return re.findall(r"^\| `([^`]+)`", text, flags=re.M)


# -- the variables Ansible reads -------------------------------------------------------------------------

def template_reads(source: str) -> set[str]:
    """Variables a Jinja template reads: its free names, plus ``hostvars[h]['x']`` / ``hostvars[h].x`` and
    ``vars['x']`` (a variable read through another host's or the play's variable mapping)."""
    ast = JINJA.parse(source)
    names = set(jinja2.meta.find_undeclared_variables(ast))

    def through_mapping(node: jinja2.nodes.Node) -> bool:
        return (isinstance(node, jinja2.nodes.Name) and node.name == "vars") or (
            isinstance(node, jinja2.nodes.Getitem) and isinstance(node.node, jinja2.nodes.Name)
            and node.node.name == "hostvars")

    for node in ast.find_all((jinja2.nodes.Getitem, jinja2.nodes.Getattr)):
        if not through_mapping(node.node):
            continue
        if isinstance(node, jinja2.nodes.Getattr):
            names.add(node.attr)
        elif isinstance(node.arg, jinja2.nodes.Const) and isinstance(node.arg.value, str):
            names.add(node.arg.value)
    return names


def _strings(data: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(key, string) for every string value in loaded YAML; list items keep their parent's key."""
    if isinstance(data, str):
        yield key, data
    elif isinstance(data, dict):
        for k, v in data.items():
            yield from _strings(v, str(k))
    elif isinstance(data, list):
        for item in data:
            yield from _strings(item, key)


def yaml_reads(data: Any) -> set[str]:
    """Variables read by the Jinja in loaded YAML (comments are gone by then)."""
    names: set[str] = set()
    for key, text in _strings(data):
        if key in CONDITION_KEYS:
            names |= template_reads("{{ %s }}" % text)
        elif "{{" in text or "{%" in text:
            names |= template_reads(text)
    return names


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _walk(data: Any) -> Iterator[dict[str, Any]]:
    if isinstance(data, dict):
        yield data
        for v in data.values():
            yield from _walk(v)
    elif isinstance(data, list):
        for item in data:
            yield from _walk(item)


def _roles_named(data: Any) -> set[str]:
    """The roles a loaded playbook or task file runs: ``roles:`` entries and include_role/import_role."""
    found: set[str] = set()
    for node in _walk(data):
        for key, value in node.items():
            if key in ROLE_INCLUDES:
                found.add(value if isinstance(value, str) else value["name"])
            elif key == "roles" and isinstance(value, list):
                found |= {r if isinstance(r, str) else r.get("role") or r["name"] for r in value}
    return {name.rsplit(".", 1)[-1] for name in found}


def role_reads(role: str, root: Path = REPO, seen: set[str] | None = None) -> set[str]:
    """Variables read by a role (its tasks, handlers, defaults, vars and templates) and the roles it runs."""
    seen = set() if seen is None else seen
    if role in seen:
        return set()
    seen.add(role)
    base = root / "roles" / role
    assert base.is_dir(), f"role {role} is run but roles/{role} does not exist"
    names: set[str] = set()
    for sub in ("tasks", "handlers", "defaults", "vars"):
        for path in sorted((base / sub).glob("*.yml")):
            data = _load(path)
            names |= yaml_reads(data)
            for other in _roles_named(data):
                names |= role_reads(other, root, seen)
    for path in sorted((base / "templates").glob("*.j2")):
        names |= template_reads(path.read_text(encoding="utf-8"))
    return names


def playbook_reads(path: Path, root: Path = REPO) -> set[str]:
    """Variables read by a playbook, the playbooks it imports and the roles it runs."""
    data = _load(path)
    names = yaml_reads(data)
    for play in data:
        for key in PLAYBOOK_IMPORTS & set(play):
            names |= playbook_reads(path.parent / play[key], root)
    seen: set[str] = set()
    for role in _roles_named(data):
        names |= role_reads(role, root, seen)
    return names


def collection_reads(root: Path = REPO) -> set[str]:
    names: set[str] = set()
    for path in sorted((root / "playbooks").glob("*.yml")):
        names |= playbook_reads(path, root)
    return names


def test_reads_are_jinja_not_comments_or_prose(tmp_path: Path) -> None:
    """A name in a comment, a task name or a plain string is not read; a templated, conditional, asserted,
    hostvars, role-default or role-template use is."""
    (tmp_path / "playbooks").mkdir()
    (tmp_path / "playbooks" / "main.yml").write_text(
        "# app_in_a_comment is only mentioned here\n"
        "- name: Mentions app_in_prose in a name\n"
        "  hosts: \"{{ app_in_hosts | default('all') }}\"\n"
        "  tasks:\n"
        "    - name: Print  # app_in_a_trailing_comment\n"
        "      ansible.builtin.debug:\n"
        "        msg: \"app_in_plain_text {{ app_in_msg }} {{ hostvars[h]['app_in_hostvars'] }}\"\n"
        "      when: app_in_when | bool\n"
        "    - ansible.builtin.assert:\n"
        "        that: [app_in_that is defined]\n"
        "    - ansible.builtin.include_role:\n"
        "        name: offline.delivery.r\n", encoding="utf-8")
    role = tmp_path / "roles" / "r"
    (role / "defaults").mkdir(parents=True)
    (role / "templates").mkdir()
    (role / "defaults" / "main.yml").write_text("r_unread_default: 1\nr_x: \"{{ app_in_default }}\"\n",
                                                encoding="utf-8")
    (role / "templates" / "t.j2").write_text("{# app_in_jinja_comment #}{{ app_in_template }}\n", encoding="utf-8")
    reads = collection_reads(tmp_path)
    assert {"app_in_hosts", "app_in_msg", "app_in_hostvars", "app_in_when", "app_in_that", "app_in_default",
            "app_in_template"} <= reads
    assert not reads & {"app_in_a_comment", "app_in_prose", "app_in_a_trailing_comment", "app_in_plain_text",
                        "r_unread_default", "app_in_jinja_comment"}


def test_every_playbook_in_the_table_exists_and_awx_lists_it() -> None:
    listed = [p for p in re.findall(r"`(playbooks/[a-z_]+\.yml)`", section("2. The project"))
              if p != "playbooks/site_layout.yml"]
    assert len(listed) >= 10
    for path in listed:
        lines = (REPO / path).read_text(encoding="utf-8").splitlines()
        assert any(AWX_PLAYBOOK_LINE.match(line) for line in lines), f"AWX would not list {path}"


def test_every_survey_variable_is_read_by_the_playbooks() -> None:
    variables = table_first_column(section("3. Variables for surveys and extra variables"))
    assert "app_version" in variables and "offline_delivery_app_hosts" in variables
    reads = collection_reads()
    missing = [v for v in variables if v not in reads]
    assert not missing, f"docs/awx.md names variables no playbook (nor a role it runs) reads: {missing}"


@pytest.mark.parametrize("block", re.findall(r"```json\n(.*?)```", DOC, flags=re.S))
def test_json_examples_parse(block: str) -> None:
    doc = json.loads(block)
    for question in doc.get("spec", []):
        assert question["variable"] in table_first_column(section("3. Variables for surveys and extra variables"))
