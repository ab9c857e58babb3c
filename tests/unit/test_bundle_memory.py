"""Build and verify stream: a big layer never sits in memory (peak RSS of the CLI child stays bounded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.images import write_big_layer, write_oci_layout_with_layer_files

LAYER = 300 * 1024 * 1024
RSS_LIMIT_MB = 150


# A fresh wrapper process whose only child is the CLI: its RUSAGE_CHILDREN peak is the CLI's own.
_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:], check=False).returncode\n"
    "sys.stderr.write('\\nMAXRSS_KB %d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(rc)\n"
)


def _run_measured(argv: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the CLI in a fresh child and return it with its own peak RSS in MiB."""
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], capture_output=True, text=True, timeout=300,
                          check=False)
    kb = int(proc.stderr.rsplit("MAXRSS_KB ", 1)[1].split()[0])
    return proc, kb / 1024


@pytest.mark.slow
def test_big_layer_build_and_verify_stay_bounded(tmp_path: Path, keypair) -> None:  # type: ignore[no-untyped-def]
    layer = tmp_path / "layer.tar"
    digest, size = write_big_layer(layer, LAYER)
    layout = write_oci_layout_with_layer_files(tmp_path / "oci", "test/big:1", "amd64", [layer])
    model = tmp_path / "app.yml"
    model.write_text(yaml.safe_dump({"apiVersion": "offline.delivery/v1", "kind": "Application", "name": "big",
                                     "version": "1.0.0", "components": {"big": {"image": "test/big:1"}}}))
    cli = [sys.executable, "-m", "bundle_builder.cli"]
    build, rss = _run_measured([*cli, "build", str(model), "-o", str(tmp_path / "out"), "--images-from",
                                f"oci:{layout}", "--sign-key", str(keypair[0]), "--json"])
    assert build.returncode == 0, build.stderr
    assert rss < RSS_LIMIT_MB, f"build peak RSS {rss:.0f} MiB"
    result = json.loads(build.stdout)
    assert result["bytes_bundled"] > size and digest  # the layer is in there
    verify, rss = _run_measured([*cli, "verify", result["path"], "--pub", str(keypair[1]), "--json"])
    assert verify.returncode == 0, verify.stderr
    assert rss < RSS_LIMIT_MB, f"verify peak RSS {rss:.0f} MiB"
    assert json.loads(verify.stdout)["bytes_checked"] == result["bytes_bundled"]
    os.unlink(result["path"])
