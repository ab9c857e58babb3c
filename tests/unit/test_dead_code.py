"""No dead code in the product's libraries: every public top-level function, class or constant of
plugins/module_utils/**/*.py and bundle_builder/*.py is used by some product file (plugins/, bundle_builder/,
or pyproject.toml's entry points) besides its definition. Tests do not count as users: a helper that only its
tests call proves nothing about the product.

A use is resolved to the file that defines the name, not matched by the bare name: `from M import n`,
`M_alias.n` after `import M as M_alias` / `from pkg import M`, or `n` read in the defining file itself.
"""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
# Absolute import roots of the product's own code: pyproject.toml's package-dir (offline_delivery_core is
# plugins/module_utils), and the collection's own name.
ROOTS = {name: REPO / d for name, d in _PYPROJECT["tool"]["setuptools"]["package-dir"].items()}
ROOTS["ansible_collections.offline.delivery"] = REPO
DEFINERS = sorted([*(REPO / "plugins" / "module_utils").rglob("*.py"), *(REPO / "bundle_builder").glob("*.py"),
                   *(REPO / "offline_delivery_cli").glob("*.py"), *(REPO / "offline_delivery_common").glob("*.py")])
USERS = sorted({*(REPO / "plugins").rglob("*.py"), *(p for d in ROOTS.values() if d != REPO for p in d.rglob("*.py"))})

# Dead names tolerated for now (empty since issue #15): the test fails on any dead name not listed here,
# and on a listed name that is used or gone again. Delete dead code (and the tests that only test it).
KNOWN_UNUSED: set[str] = set()


def _module_file(parts: list[str], base: Path) -> Path | None:
    target = base.joinpath(*parts)
    if target.with_suffix(".py").is_file():
        return target.with_suffix(".py")
    if (target / "__init__.py").is_file():
        return target / "__init__.py"
    return None


def _resolve(module: str | None, level: int, path: Path) -> Path | None:
    parts = module.split(".") if module else []
    if level:
        base = path.parent
        for _ in range(level - 1):
            base = base.parent
        return _module_file(parts, base)
    for root, base in ROOTS.items():
        if module == root or (module or "").startswith(root + "."):
            return _module_file((module or "")[len(root) + 1:].split(".") if module != root else [], base)
    return None


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def public_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


Def = tuple[Path, str]  # (file, top-level name)


def _user(stmt: ast.stmt) -> str | None:
    """The top-level name a statement defines (its uses are that name's), or None for module-level code."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return stmt.name
    if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return stmt.target.id
    return None


def uses(path: Path) -> set[tuple[Def | None, Def]]:
    """(user, used) edges of `path`: the top-level name of `path` whose code uses (or None: module-level code
    uses) a top-level name of the product (a name of `path` itself or of a file it imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported: dict[str, Def] = {}   # local name -> the definition it imports
    modules: dict[str, Path] = {}   # local (dotted) name -> the module file it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(node.module, node.level, path)
            if source is None:
                continue
            for alias in node.names:
                sub = _module_file([alias.name], source.parent) if source.name == "__init__.py" else None
                if sub is not None:
                    modules[alias.asname or alias.name] = sub
                else:
                    imported[alias.asname or alias.name] = (source, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                source = _resolve(alias.name, 0, path)
                if source is not None:
                    modules[alias.asname or alias.name] = source
    edges: set[tuple[Def | None, Def]] = set()
    read: set[str] = set()
    for stmt in tree.body:
        name = _user(stmt)
        user = (path, name) if name else None
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Store):
                read.add(node.id)
                edges.add((user, imported.get(node.id, (path, node.id))))
            elif isinstance(node, ast.Attribute) and _dotted(node.value) in modules:
                edges.add((user, (modules[_dotted(node.value)], node.attr)))  # type: ignore[index]
    # An import nothing in the file reads is a re-export or done for its effect: count it as a use.
    edges.update((None, d) for local, d in imported.items() if local not in read)
    return {(u, d) for u, d in edges if u != d}


def entry_points() -> set[Def]:
    """pyproject.toml's console scripts (`module:function`) that resolve to a product file."""
    found = set()
    for target in _PYPROJECT["project"].get("scripts", {}).values():
        module, _, name = target.partition(":")
        source = _resolve(module, 0, REPO / "pyproject.toml")
        if source is not None:
            found.add((source, name))
    return found


def live_definitions() -> set[Def]:
    """Top-level names of DEFINERS reachable from a root: module-level code, any definition outside DEFINERS
    (modules, filters), or an entry point. A name that only dead code uses is dead too."""
    edges = set().union(*(uses(p) for p in USERS)) | {(None, d) for d in entry_points()}
    definers = set(DEFINERS)
    live: set[Def] = set()
    while True:
        grown = live | {d for u, d in edges if u is None or u[0] not in definers or u in live}
        if grown == live:
            return live
        live = grown


def dead_names() -> set[str]:
    live = live_definitions()
    return {f"{p.relative_to(REPO)}:{name}" for p in DEFINERS for name in public_names(p) if (p, name) not in live}


def test_every_public_name_is_used_by_the_product() -> None:
    dead = dead_names()
    assert sorted(dead - KNOWN_UNUSED) == [], "defined but never used by the product (tests do not count)"
    assert sorted(KNOWN_UNUSED - dead) == [], "used (or gone) now: remove from KNOWN_UNUSED"


def test_the_check_sees_uses_and_dead_chains(tmp_path: Path) -> None:
    """The check itself: each kind of use is seen, and a name only a dead name uses is dead too."""
    live = live_definitions()
    mu = REPO / "plugins" / "module_utils"
    assert (mu / "bundle" / "format.py", "blob_path") in live          # from ..bundle.format import blob_path
    assert (REPO / "bundle_builder" / "cli.py", "main") in live        # pyproject.toml entry point
    assert (REPO / "bundle_builder" / "build.py", "build_bundle") in live  # build.build_bundle after `import`
    probe = tmp_path / "probe.py"
    probe.write_text("def a():\n    return b()\n\n\ndef b():\n    return 1\n\n\nC = 2\nprint(C)\n")
    edges = uses(probe)
    assert ((probe, "a"), (probe, "b")) in edges and (None, (probe, "C")) in edges
    assert public_names(probe) == {"a", "b", "C"}
    assert not [p for p in USERS if p.relative_to(REPO).parts[0] in ("tests", "bench", "examples")]
