"""Idempotent export: build a bundle and put it in place only when its manifest differs from what is there.

Used by the ``offline.delivery.bundle_export`` module. The bundle is built by the same ``build_bundle`` as
the CLI's, into a staging directory beside the destination (same filesystem, so putting it in place is a
rename). Idempotence is judged by the manifest digest — the content — never by timestamps.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offline_delivery_core.bundle.format import BundleError, read_head

from .build import BuildResult, build_bundle


@dataclass
class ExportResult:
    changed: bool
    msg: str
    bundle: BuildResult
    previous_manifest_digest: str | None

    def to_json(self) -> dict[str, Any]:
        return self.bundle.to_json()


def _existing(dest: Path, name: str, version: str) -> tuple[list[Path], str | None]:
    """Files of the bundle of this name/version already in ``dest`` and their manifest digest (None when
    absent or unreadable: then they are replaced)."""
    stem = f"{name}-{version}.bundle"
    files = sorted(p for p in dest.glob(f"{stem}*") if p.name == stem or p.name.startswith(stem + ".part"))
    if not files:
        return [], None
    head_path = dest / (stem + ".parts.json") if (dest / (stem + ".parts.json")).exists() else dest / stem
    try:
        return files, read_head(str(head_path)).manifest_digest
    except (BundleError, OSError):
        return files, None


def export_bundle(model: str | Path, dest: str | Path, *, check_mode: bool = False,
                  **build_args: Any) -> ExportResult:
    """Build into ``dest`` unless an identical bundle (same manifest digest) is already there."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=dest))
    try:
        result = build_bundle(model, staging, **build_args)
        old_files, old_digest = _existing(dest, result.name, result.version)
        what = f"{result.name} {result.version}"
        staged_files, result.files = result.files, [dest / f.name for f in result.files]
        result.path = dest / result.path.name
        # Same content in the same files (a new --volume-size gives the same manifest in other files).
        if old_digest == result.manifest_digest and sorted(old_files) == sorted(result.files):
            return ExportResult(False, f"{what} is up to date ({result.manifest_digest})", result, old_digest)
        why = ("new bundle" if not old_files else "the existing bundle is unreadable" if old_digest is None
               else f"content changed (was {old_digest})" if old_digest != result.manifest_digest
               else "split into other parts")
        if check_mode:
            return ExportResult(True, f"{what} would be written: {why}", result, old_digest)
        for old in old_files:
            old.unlink()
        for staged in staged_files:
            staged.rename(dest / staged.name)
        return ExportResult(True, f"{what} written: {why}", result, old_digest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
