"""Build the small signed bundle a molecule scenario's repo host imports (offline_repo, container_runtime,
systemd_host): one tiny test image and the debian-12/amd64 closures of the given package profiles. base and repo
are always added: the repo host installs its own tools (nginx, gpg, the registry) from them.

Usage: make_bundle.py OUT_DIR PROFILE[,PROFILE...]
Writes OUT_DIR/bundle/mini-1.0.0.bundle, OUT_DIR/vendor.pub and OUT_DIR/vendor.fingerprint (what the site pins in
offline_delivery_vendor_keys); does nothing when they exist."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.images import TestImage, rootfs_layer, write_oci_layout  # noqa: E402

APP = """\
apiVersion: offline.delivery/v1
kind: Application
name: mini
version: 1.0.0
components:
  web:
    image: mini/web:1.0.0
    ports: [{port: 8080}]
"""


def main(out: Path, profiles: list[str]) -> None:
    bundle = out / "bundle" / "mini-1.0.0.bundle"
    if bundle.exists() and (out / "vendor.pub").exists() and (out / "vendor.fingerprint").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    image = TestImage("mini/web:1.0.0", "amd64", [rootfs_layer({"bin/busybox": b"busybox-amd64"}, arch="amd64")])
    write_oci_layout(out / "oci", [image])
    (out / "app.yml").write_text(APP)
    cli = str(Path(sys.executable).with_name("bundle-builder"))
    wanted = ",".join(dict.fromkeys(["base", "repo", *profiles]))
    subprocess.run([cli, "keygen", str(out / "vendor")], check=True, timeout=60, stdout=subprocess.DEVNULL)
    printed = subprocess.run([cli, "fingerprint", str(out / "vendor.pub")], check=True, timeout=60,
                             capture_output=True, text=True).stdout
    (out / "vendor.fingerprint").write_text(printed.split()[0] + "\n")
    subprocess.run([cli, "build", str(out / "app.yml"), "-o", str(out / "bundle"), "--images-from",
                    f"oci:{out / 'oci'}", "--platform", "linux/amd64", "--sign-key", str(out / "vendor.key"),
                    "--packages", "debian-12", "--package-profiles", wanted], check=True, timeout=1800)


if __name__ == "__main__":
    main(Path(sys.argv[1]), [p for p in (sys.argv[2] if len(sys.argv) > 2 else "").split(",") if p])
