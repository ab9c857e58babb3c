"""What `ansible-galaxy collection build` puts into the collection tarball: none of what .gitignore names.

The test world keeps its SSH private keys under .world/, runs leave ansible-runner artifacts and reports in the
working directory: none of it may ship. A scratch tree gets the real galaxy.yml and one file for every
.gitignore entry, and the built tarball must hold none of them.
"""
from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ignored_samples() -> list[tuple[str, str]]:
    """(what the entry names, a file it matches) for each .gitignore entry: a file inside a directory entry."""
    samples = []
    for line in (ROOT / ".gitignore").read_text().splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = entry.strip("/").replace("*", "x")
        samples.append((path, f"{path}/sample.txt" if entry.endswith("/") else path))
    return samples


def test_a_built_collection_holds_nothing_gitignore_names(tmp_path: Path) -> None:
    galaxy = shutil.which("ansible-galaxy")
    if not galaxy:
        pytest.skip("ansible-galaxy is not installed")
    tree = tmp_path / "tree"
    (tree / "meta").mkdir(parents=True)
    shutil.copy(ROOT / "galaxy.yml", tree / "galaxy.yml")
    shutil.copy(ROOT / "meta" / "runtime.yml", tree / "meta" / "runtime.yml")
    (tree / "README.md").write_text("scratch\n")
    (tree / "plugins" / "modules").mkdir(parents=True)
    (tree / "plugins" / "modules" / "kept.py").write_text("# shipped\n")
    samples = _ignored_samples() + [(".world", ".world/site/id_ed25519")]
    assert len(samples) > 10, samples
    for _, sample in samples:
        (tree / sample).parent.mkdir(parents=True, exist_ok=True)
        (tree / sample).write_text("must not ship\n")
    res = subprocess.run([galaxy, "collection", "build", "--output-path", str(tmp_path / "out"), str(tree)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    (tarball,) = (tmp_path / "out").glob("*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert "plugins/modules/kept.py" in names
    shipped = sorted({path for path, _ in samples for n in names if n == path or n.startswith(path + "/")})
    assert not shipped, f"galaxy.yml build_ignore misses {shipped}: add them"


def test_no_two_test_modules_share_a_name() -> None:
    """The test directories are not packages: pytest imports each test file by its base name, so a second
    `test_x.py` elsewhere stops the whole session at collection."""
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(ROOT)} and {path.relative_to(ROOT)}")
        seen.setdefault(path.name, path)
    assert not clashes, f"rename one of each: {clashes}"
