"""meta/execution-environment.yml: an ansible-builder (schema 3) definition of an AWX execution environment that
carries this collection, and at the same time the file ansible-builder's introspection reads from the installed
collection. Checked without any image: `ansible-builder create` writes the build context; the context's own
galaxy step and introspection script then run here as the image build would run them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
EE_FILE = REPO / "meta" / "execution-environment.yml"


def tool(name: str) -> str | None:
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, **env})
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_definition_names_the_collection_at_its_galaxy_version() -> None:
    ee = yaml.safe_load(EE_FILE.read_text(encoding="utf-8"))
    version = yaml.safe_load((REPO / "galaxy.yml").read_text(encoding="utf-8"))["version"]
    assert ee["version"] == 3 and ee["images"]["base_image"]["name"]
    assert ee["dependencies"]["galaxy"]["collections"] == [
        {"name": f"collection/offline-delivery-{version}.tar.gz", "type": "file"}], "bump it with galaxy.yml"
    # The introspection of the installed collection takes dependencies.python/.system only as file paths
    # relative to the collection root; an inline list crashes it (TypeError in the image build).
    for entry in ("python", "system"):
        value = ee["dependencies"].get(entry)
        assert value is None or (isinstance(value, str) and (REPO / value).is_file()), (entry, value)


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ansible-builder create` on the definition, with a collection tarball where the definition expects it."""
    builder, galaxy = tool("ansible-builder"), tool("ansible-galaxy")
    if not builder:
        pytest.skip("ansible-builder is not installed (pip install ansible-builder) - the definition was not built")
    assert galaxy, "ansible-galaxy missing: install ansible-core"
    work = tmp_path_factory.mktemp("ee")
    # A small collection with this one's galaxy.yml and meta/: what the introspection reads from it.
    col = work / "col"
    (col / "meta").mkdir(parents=True)
    for name in ("galaxy.yml", "README.md", "meta/runtime.yml", "meta/execution-environment.yml"):
        shutil.copy(REPO / name, col / name)
    (work / "meta").mkdir()
    shutil.copy(EE_FILE, work / "meta" / EE_FILE.name)
    run([galaxy, "collection", "build", "--output-path", str(work / "dist"), str(col)], work)
    run([builder, "create", "-f", "meta/execution-environment.yml", "-c", "ctx"], work)
    return work / "ctx"


def test_ansible_builder_writes_a_context_carrying_the_collection(context: Path) -> None:
    version = yaml.safe_load((REPO / "galaxy.yml").read_text(encoding="utf-8"))["version"]
    containerfile = next(p for p in (context / "Containerfile", context / "Dockerfile") if p.exists()).read_text()
    base = yaml.safe_load(EE_FILE.read_text(encoding="utf-8"))["images"]["base_image"]["name"]
    assert f'ARG EE_BASE_IMAGE="{base}"' in containerfile
    assert (context / "_build" / "collection" / f"offline-delivery-{version}.tar.gz").is_file()
    assert "ansible-galaxy collection install" in containerfile and "COPY _build /build" in containerfile


def test_the_galaxy_stage_installs_it_and_the_introspection_accepts_it(context: Path, tmp_path: Path) -> None:
    """What the image build runs, here: the galaxy stage's install (in /build = _build) and the builder stage's
    introspection over the installed collections, which reads the collection's meta/execution-environment.yml."""
    galaxy = tool("ansible-galaxy")
    assert galaxy
    colls = tmp_path / "collections"
    run([galaxy, "collection", "install", "--force", "-r", "requirements.yml", "-p", str(colls)], context / "_build",
        ANSIBLE_COLLECTIONS_PATH=str(colls))
    installed = colls / "ansible_collections" / "offline" / "delivery"
    assert (installed / "meta" / "execution-environment.yml").is_file()
    proc = run([sys.executable, str(context / "_build" / "scripts" / "introspect.py"), "introspect", str(colls)],
               tmp_path)
    assert yaml.safe_load(proc.stdout) == {"python": [], "system": []}, proc.stdout
