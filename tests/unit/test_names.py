"""The rules for names that become paths (plugins/module_utils/common/names.py), and the anchoring of every validating
regular expression of the product: `$` also matches before a trailing newline, so ``"shop\\n"`` passed
``^[a-z0-9-]+$`` — every anchored pattern ends in ``\\Z`` instead."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from offline_delivery_core.common.names import name_problem, version_problem

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["shop", "a", "db-2", "x" * 40])
def test_good_names(name: str) -> None:
    assert name_problem(name) is None


@pytest.mark.parametrize("name", ["", "Shop", "-a", "a-", "a_b", "a/b", "..", "../../usr", "x" * 41, "shop\n",
                                  "shop\r", None, 3])
def test_bad_names(name: object) -> None:
    assert name_problem(name, "app name")


@pytest.mark.parametrize("version", ["1.0.0", "1.2.3-rc.1", "1.0.0+site.1", "10.20.30"])
def test_good_versions(version: str) -> None:
    assert version_problem(version) is None


@pytest.mark.parametrize("version", ["", "1.0", "v1.0.0", "1.0.0\n", "1.0.0/../x", "../1.0.0", "01.0.0",
                                     "1.0.0+" + "a" * 200])
def test_bad_versions(version: str) -> None:
    assert version_problem(version)


def _patterns() -> list[tuple[str, int, str]]:
    found = []
    for path in sorted([*ROOT.glob("plugins/module_utils/**/*.py"), *ROOT.glob("bundle_builder/*.py"),
                        *ROOT.glob("offline_delivery_cli/*.py"), *ROOT.glob("offline_delivery_common/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "compile"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "re" and node.args):
                arg = node.args[0]
                last = arg.right if isinstance(arg, ast.BinOp) else arg.values[-1] if isinstance(arg, ast.JoinedStr) else arg
                if isinstance(last, ast.Constant) and isinstance(last.value, str):
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno}", node.lineno, last.value))
    return found


def test_no_anchored_pattern_ends_in_dollar() -> None:
    patterns = _patterns()
    assert len(patterns) > 30, "the scan found too few patterns to mean anything"
    dollar = [where for where, _, text in patterns if text.endswith("$") and not text.endswith("\\$")]
    assert not dollar, f"end these patterns in \\Z, not $ ($ matches before a trailing newline): {dollar}"
