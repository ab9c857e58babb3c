#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: bundle_info
short_description: Inspect and verify an offline.delivery bundle
version_added: 0.1.0
description:
  - Reads the signed manifest of a bundle (a single file, a split set, or one of its parts) and reports the
    release it carries - name, version, platforms, components and their images, blobs and sizes, delta base.
  - With O(verify=true) it checks the ed25519 signature against the trusted public keys B(before) trusting
    anything in the manifest, then re-hashes every blob with bounded memory. Any flipped bit, missing or extra
    member, truncation or unsafe tar member fails the module with the member, offset and what to do.
  - Needs nothing but Python 3 on the host where it runs, so it can check a bundle on the site's repo host.
author:
  - offline.delivery developers (@offline-delivery)
extends_documentation_fragment:
  - offline.delivery.attributes
  - offline.delivery.vendor_trust
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  path:
    description:
      - The bundle file, the C(.parts.json) of a split bundle, or any of its C(.partNNN) files.
    type: path
    required: true
  verify:
    description:
      - Check the signature and re-hash every bundled blob. Without it only the manifest is read.
    type: bool
    default: true
  require_signature:
    description:
      - Refuse a bundle whose manifest is not signed by a key of O(trusted_keys) that O(pinned_keys) pins for
        the bundle's application. Only set it to V(false) to look at a bundle of unknown origin; such a bundle
        must never be imported.
    type: bool
    default: true
notes:
  - A delta bundle lists blobs it does not carry (C(bundled=false)); they are counted in RV(bundle.omitted_blobs)
    and must already be in the site repository when the bundle is imported.
seealso:
  - module: offline.delivery.bundle_export
"""

EXAMPLES = r"""
- name: Verify the bundle carried to the site before importing it
  offline.delivery.bundle_info:
    path: /srv/incoming/shop-1.1.0.bundle
    trusted_keys:
      - /srv/incoming/keys/vendor.pub
    pinned_keys:
      - fingerprint: sha256:8a3d2b0c54e6f1a79d0e4b6c3f2a1908e7d6c5b4a3928170f6e5d4c3b2a19087
        apps: [shop]
  register: shop_bundle

- name: Show what it carries
  ansible.builtin.debug:
    msg: "{{ shop_bundle.bundle.name }} {{ shop_bundle.bundle.version }}: {{ shop_bundle.bundle.components | join(', ') }}"

- name: Read the manifest of a split bundle without re-hashing the blobs
  offline.delivery.bundle_info:
    path: /media/usb/shop-1.1.0.bundle.parts.json
    verify: false
    require_signature: false
"""

RETURN = r"""
refused_keys:
  description: Key files that were not used, each with its fingerprint and why (not pinned, revoked).
  returned: when O(require_signature=true)
  type: list
  elements: dict
bundle:
  description: What the bundle carries.
  returned: success
  type: dict
  contains:
    name:
      description: Application name.
      type: str
      sample: shop
    version:
      description: Application version.
      type: str
      sample: 1.1.0
    manifest_digest:
      description: sha256 of the exact manifest bytes; identifies the release.
      type: str
    platforms:
      description: Platforms every image was built for.
      type: list
      elements: str
      sample: [linux/amd64, linux/arm64]
    components:
      description: Component names of the application model.
      type: list
      elements: str
    images:
      description: Per component, the image reference and its digest per platform.
      type: dict
    blobs:
      description: Number of blobs the release consists of.
      type: int
    bytes:
      description: Total size of the release's blobs.
      type: int
    bundled_blobs:
      description: Blobs this bundle file carries.
      type: int
    bundled_bytes:
      description: Bytes of the blobs this bundle file carries.
      type: int
    omitted_blobs:
      description: Blobs a delta expects the site to hold already.
      type: int
    delta:
      description: The base (release or have-list) of a delta bundle, or null.
      type: dict
    sbom:
      description:
        - The release's SBOM (CycloneDX 1.5 JSON), a blob of the signed manifest - C(digest), C(size),
          C(mediaType) - or null for a bundle built before bundles carried one.
        - C(bundle-builder sbom) writes it; an import copies it to C(releases/<name>/<version>/sbom.cdx.json).
      type: dict
    signed:
      description: Whether the bundle carries a signature.
      type: bool
    keyid:
      description: sha256 of the raw public key that signed the manifest (hex).
      type: str
verified:
  description: True when the signature and every blob were checked.
  returned: success
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.bundle.format import BundleError, read_head, summarize_manifest, verify_bundle
from ..module_utils.bundle.trust import TRUST_OPTIONS, check_signer, module_trust


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "verify": {"type": "bool", "default": True},
            **TRUST_OPTIONS,
            "require_signature": {"type": "bool", "default": True},
        },
        supports_check_mode=True,
    )
    params = module.params
    trust = module_trust(module) if params["require_signature"] else None
    keys, signers = (trust.keys, trust.signers) if trust else (None, None)
    refused = trust.refused if trust else []
    try:
        if params["verify"]:
            result = verify_bundle(params["path"], keys)
            manifest, digest, keyid, signed = (result.manifest, result.manifest_digest, result.keyid,
                                               result.signed)
        else:
            head = read_head(params["path"], keys)
            manifest, digest, keyid, signed = (head.manifest, head.manifest_digest, head.keyid,
                                               head.signature is not None)
        check_signer(signers, keyid, manifest["name"])
    except (BundleError, OSError) as exc:
        module.fail_json(msg=f"bundle {params['path']}: {exc}", refused_keys=refused)
    summary = summarize_manifest(manifest)
    summary.update(manifest_digest=digest, keyid=keyid, signed=signed)
    module.exit_json(changed=False, bundle=summary, verified=bool(params["verify"] and keys is not None),
                     refused_keys=refused)


if __name__ == "__main__":
    main()
