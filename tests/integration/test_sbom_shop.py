"""The SBOM of a real bundle: two shop images (api, redis; built from Debian packages by
tests/world/shop_images.py, cached) for amd64, built with bundle-builder, checked against CycloneDX's schema
and, per image, against what dpkg-query itself reads from the image's unpacked root filesystem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from bundle_builder import cli
from offline_delivery_core.bundle.format import read_head, sbom_descriptor
from tests.world import shop_images

pytestmark = pytest.mark.slow

APP = """\
apiVersion: offline.delivery/v1
kind: Application
name: shopsbom
version: 1.0.0
components:
  api:
    image: shop/api:1.0.0
  redis:
    image: shop/redis:1.0.0
"""


def _dpkg_query(root: Path) -> set[tuple[str, str, str]]:
    out = subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f",
                          "${Package}\t${Version}\t${Architecture}\t${db:Status-Abbrev}\n"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return {tuple(line.split("\t")[:3]) for line in out.splitlines()  # type: ignore[misc]
            if line.split("\t")[3][1:2] == "i"}  # installed (ii, hi), not config-files or half-installed


def _arch(purl: str) -> str:
    return purl.split("?arch=", 1)[1].split("&", 1)[0]


def test_shop_images_sbom_matches_dpkg(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0 or shutil.which("dpkg-query") is None:
        pytest.skip("building the shop images needs root (mmdebstrap, overlayfs, chroot) and dpkg-query")
    layout = shop_images.build_shop_images(shop_images.ARCHES)
    (tmp_path / "app.yml").write_text(APP)
    out = tmp_path / "out"
    assert cli.main(["build", str(tmp_path / "app.yml"), "-o", str(out), "--images-from", f"oci:{layout}",
                     "--platform", "linux/amd64", "--unsigned", "--json"]) == 0
    bundle = json.loads(capsys.readouterr().out)["path"]
    assert cli.main(["sbom", bundle, "--integrity-only", "-o", str(tmp_path / "sbom.json")]) == 0
    data = (tmp_path / "sbom.json").read_bytes()
    assert len(data) == sbom_descriptor(read_head(bundle).manifest)["size"]  # type: ignore[index]
    assert JsonStrictValidator(SchemaVersion.V1_5).validate_str(data.decode()) is None
    doc = json.loads(data)
    comps = {c["bom-ref"]: c for c in doc["components"]}
    deps = {d["ref"]: d["dependsOn"] for d in doc["dependencies"]}
    for component, ref in (("api", "shop/api:1.0.0"), ("redis", "shop/redis:1.0.0")):
        root = tmp_path / component
        shop_images.unpack_image(layout, ref, "amd64", root)
        expected = _dpkg_query(root)
        listed = {(comps[r]["name"], comps[r]["version"], _arch(r)) for r in deps[f"image:{component}@linux/amd64"]
                  if r.startswith("pkg:deb/")}
        assert listed == expected and len(expected) > 50, component
        assert "os:debian@12" in deps[f"image:{component}@linux/amd64"]
        assert all("distro=debian-12" in r for r in deps[f"image:{component}@linux/amd64"] if r.startswith("pkg:"))
