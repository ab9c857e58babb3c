#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: bundle_export
short_description: Build a signed offline.delivery bundle from an application model and its images
version_added: 0.1.0
description:
  - Builds C(<name>-<version>.bundle) (or its split parts) in O(dest) from an C(app.yml) and the images it
    names, exactly as C(bundle-builder build) does - it is the same code.
  - Idempotent by content - the bundle is built into a staging directory beside O(dest) and put in place
    only when its manifest digest (or the split into parts) differs from the bundle already there. The same
    inputs always give a byte-identical manifest.
  - Runs where the images are - usually the build host (C(delegate_to)) - and needs the C(offline-delivery)
    Python package there (C(pip install offline-delivery)), the way docker modules need the docker SDK.
author:
  - offline.delivery developers (@offline-delivery)
extends_documentation_fragment:
  - offline.delivery.attributes
attributes:
  check_mode:
    support: full
    details: Builds into a staging directory to learn the manifest, then discards it.
  diff_mode:
    support: none
  idempotent:
    support: full
requirements:
  - offline-delivery (the Python package of this collection, provides bundle_builder)
options:
  model:
    description: The application model (C(app.yml)).
    type: path
    required: true
  dest:
    description: Directory the bundle is written to. Created when missing.
    type: path
    required: true
  images_from:
    description:
      - Where to find the images - V(docker) (the local engine), V(archive:PATH) (a C(docker save) tar) or
        V(oci:PATH) (an OCI image layout). Searched in order for each image and platform.
    type: list
    elements: str
    required: true
  platforms:
    description: Platforms every image must be bundled for.
    type: list
    elements: str
    default: [linux/amd64]
  sign_key:
    description:
      - The vendor's ed25519 private key (PEM, from C(bundle-builder keygen)); must not be readable by group
        or others.
      - Required unless O(unsigned=true).
    type: path
  unsigned:
    description: Build without a signature. A site refuses such a bundle; for tests only.
    type: bool
    default: false
  base:
    description: A previous bundle of the release the site has; blobs it holds are left out (a delta).
    type: path
  base_pub:
    description: Public keys to check the signature of O(base) with.
    type: list
    elements: path
  have:
    description: 'A site''s have-file (C({"blobs": ["sha256:..."]})); blobs it lists are left out (a delta).'
    type: path
  volume_size:
    description: Split the bundle into parts of this size (for example V(4G), V(700M)).
    type: str
"""

EXAMPLES = r"""
- name: Build shop 1.1.0 for both platforms, as a delta against what the site has
  offline.delivery.bundle_export:
    model: apps/shop/app.yml
    dest: /srv/bundles
    images_from: [docker, "oci:/srv/images/shop"]
    platforms: [linux/amd64, linux/arm64]
    sign_key: /etc/offline-delivery/vendor.key
    have: /srv/sites/plant-7/have.json
    volume_size: 4G
  delegate_to: build-host
"""

RETURN = r"""
bundle:
  description: What was built (also when nothing changed).
  returned: success
  type: dict
  contains:
    path:
      description: The bundle file, or its C(.parts.json) when split.
      type: str
    files:
      description: Every file of the bundle.
      type: list
      elements: str
    manifest_digest:
      description: sha256 of the manifest; equal for equal inputs.
      type: str
    blobs_total:
      description: Blobs of the release.
      type: int
    blobs_bundled:
      description: Blobs this bundle carries (fewer for a delta).
      type: int
    bytes_bundled:
      description: Bytes of the blobs it carries.
      type: int
    size:
      description: Bytes of the bundle file(s).
      type: int
    omitted:
      description: Digests a delta leaves out.
      type: list
      elements: str
previous_manifest_digest:
  description: Manifest digest of the bundle that was in O(dest) before, if any.
  returned: success
  type: str
"""

import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    from bundle_builder.build import BuildError
    from bundle_builder.export import export_bundle
    from bundle_builder.signing import SigningError
    from offline_delivery_core.bundle.ed25519 import load_public_key_files
except ImportError:
    BUILDER_IMPORT_ERROR = traceback.format_exc()
else:
    BUILDER_IMPORT_ERROR = None


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "model": {"type": "path", "required": True},
            "dest": {"type": "path", "required": True},
            "images_from": {"type": "list", "elements": "str", "required": True},
            "platforms": {"type": "list", "elements": "str", "default": ["linux/amd64"]},
            "sign_key": {"type": "path", "no_log": False},
            "unsigned": {"type": "bool", "default": False},
            "base": {"type": "path"},
            "base_pub": {"type": "list", "elements": "path"},
            "have": {"type": "path"},
            "volume_size": {"type": "str"},
        },
        required_one_of=[("sign_key", "unsigned")],
        mutually_exclusive=[("sign_key", "unsigned"), ("base", "have")],
        supports_check_mode=True,
    )
    if BUILDER_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("offline-delivery (bundle_builder)"),
                         exception=BUILDER_IMPORT_ERROR)
    p = module.params
    try:
        base_pub = load_public_key_files(p["base_pub"]) if p["base_pub"] else None
        result = export_bundle(
            p["model"], p["dest"], check_mode=module.check_mode, image_sources=p["images_from"],
            platforms=p["platforms"], sign_key=None if p["unsigned"] else p["sign_key"], base=p["base"],
            have=p["have"], volume_size=p["volume_size"], base_pub=base_pub)
    except (BuildError, SigningError, ValueError, OSError) as exc:
        module.fail_json(msg=f"bundle from {p['model']} not built: {exc}")
    module.exit_json(changed=result.changed, msg=result.msg, bundle=result.to_json(),
                     previous_manifest_digest=result.previous_manifest_digest)


if __name__ == "__main__":
    main()
