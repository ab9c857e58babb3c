"""The layer rules of plugins/module_utils (docs/architecture.md "Layers"), checked on the imports themselves.

Each subpackage may import only the ones listed for it: the OCI and Kubernetes clients and the target
runtimes never reach site-repository or bundle code, so what a module ships to a target host is the target's
code and nothing of the repo host. The modules that run on target hosts are checked by the closure of what
they import (what AnsiballZ puts in their payload).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_UTILS = ROOT / "plugins" / "module_utils"

# subpackage -> the subpackages it may import (itself included)
ALLOWED = {
    "common": {"common"},
    "bundle": {"common", "bundle"},
    "clients": {"common", "clients"},
    "app": {"common", "app"},
    "targets": {"common", "clients", "app", "targets"},
    "site": {"common", "bundle", "clients", "app", "site"},
}
# modules that run on the hosts an application runs on (or the k8s deploy host): they must not carry
# repo-host code (site/) or the bundle reader (bundle/)
TARGET_HOST_MODULES = ("app_deploy", "app_status", "app_uninstall", "app_k8s_manifests", "host_targets")


def _module_name(path: Path) -> str:
    rel = path.relative_to(MODULE_UTILS).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


def _imports(path: Path, package: str) -> set[str]:
    """The module_utils modules ``path`` imports (relative imports resolved against ``package``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package else []
            base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if node.module is None:  # from . import x  /  from ..pkg import x
                found.update(f"{target}.{alias.name}".strip(".") for alias in node.names)
            else:
                found.add(target)
    return found


@functools.lru_cache(maxsize=1)
def _core_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(MODULE_UTILS.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = _imports(path, package)
    return graph


def test_every_file_sits_in_a_known_subpackage() -> None:
    for path in MODULE_UTILS.rglob("*.py"):
        rel = path.relative_to(MODULE_UTILS)
        assert rel.parts[0] in ALLOWED or rel == Path("__init__.py"), f"{rel}: not in a subpackage of {sorted(ALLOWED)}"


@pytest.mark.parametrize("importer, imported", sorted(
    (name, dep) for name, deps in _core_graph().items() for dep in deps))
def test_imports_point_one_way(importer: str, imported: str) -> None:
    src, dst = importer.split(".")[0], imported.split(".")[0]
    assert dst in ALLOWED.get(src, set()), f"plugins/module_utils/{importer} imports {imported}: {src}/ may " \
        f"import only {sorted(ALLOWED[src])}"


def _closure(start: set[str], graph: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(graph.get(name, set()))
    return seen


def _module_imports(module: str) -> set[str]:
    path = ROOT / "plugins" / "modules" / f"{module}.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("module_utils.") \
                and node.level == 2:
            found.add(node.module[len("module_utils."):])
    assert found, f"{module}: no module_utils import found (the check would prove nothing)"
    return found


@pytest.mark.parametrize("module", TARGET_HOST_MODULES)
def test_target_host_modules_carry_no_repo_host_code(module: str) -> None:
    shipped = _closure(_module_imports(module), _core_graph())
    wrong = sorted(m for m in shipped if m.split(".")[0] in ("site", "bundle"))
    assert not wrong, f"plugins/modules/{module}.py ships {wrong} to the target host"


def test_the_rule_catches_a_wrong_import(tmp_path: Path) -> None:
    """The checker itself: a clients/ file importing site/ is seen as such."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..site.repo import SiteRepo\nfrom . import registry\nfrom ..common.digests import x\n")
    assert _imports(probe, "clients") == {"site.repo", "clients.registry", "common.digests"}
