#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: bundle_import
short_description: Verify a bundle and publish its release into the site's offline repository
version_added: 0.1.0
description:
  - Checks the bundle's signature against the site's trusted vendor keys, streams every member through sha256
    with bounded memory, and only when every byte is proven publishes the release into the repository at
    O(repo_root) - blobs, release record and catalog. The catalog is replaced atomically last, so a release
    appears whole or not at all, and a failed import leaves the repository as it was.
  - Blobs the repository already holds are not written again; importing the same release again reports no
    change. A published release never changes - the same name and version with another manifest is refused.
  - A delta bundle whose omitted blobs are not in the repository is refused before anything is written,
    naming the missing blobs.
  - Needs nothing but Python 3 on the repo host.
author:
  - offline.delivery developers (@offline-delivery)
extends_documentation_fragment:
  - offline.delivery.attributes
  - offline.delivery.repo
  - offline.delivery.vendor_trust
attributes:
  check_mode:
    support: full
    details: Verifies the whole bundle and reports what would be imported, writing nothing.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  path:
    description:
      - The bundle file on the repo host, the C(.parts.json) of a split bundle, or any of its parts.
    type: path
    required: true
  lock_timeout:
    description:
      - Seconds to wait for another import into the same repository to finish.
    type: int
    default: 600
  imported_by:
    description:
      - Recorded in the release record and the catalog.
    type: str
    default: ansible
seealso:
  - module: offline.delivery.bundle_info
"""

EXAMPLES = r"""
- name: Import the carried bundle into the site repository
  offline.delivery.bundle_import:
    path: /srv/incoming/shop-1.1.0.bundle.parts.json
    trusted_keys:
      - /srv/incoming/keys/vendor.pub
    pinned_keys:
      - fingerprint: sha256:8a3d2b0c54e6f1a79d0e4b6c3f2a1908e7d6c5b4a3928170f6e5d4c3b2a19087
        apps: [shop]
  register: shop_import
"""

RETURN = r"""
pinned_key_files:
  description: The key files whose fingerprint the site pins (the import keeps them for later syncs).
  returned: success
  type: list
  elements: dict
refused_keys:
  description: Key files that were not used, each with its fingerprint and why (not pinned, revoked).
  returned: always
  type: list
  elements: dict
release:
  description: The release and what the import did.
  returned: success
  type: dict
  contains:
    name:
      description: Application name.
      type: str
    version:
      description: Application version.
      type: str
    manifest_digest:
      description: sha256 of the release manifest.
      type: str
    components:
      description: Components of the release.
      type: list
      elements: str
    platforms:
      description: Platforms of its images.
      type: list
      elements: str
    blobs_total:
      description: Blobs the release consists of.
      type: int
    blobs_new:
      description: Blobs this import added to the repository.
      type: int
    bytes_new:
      description: Bytes this import added to the repository.
      type: int
    bytes_verified:
      description: Bytes of the bundle that were re-hashed.
      type: int
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.bundle.format import BundleError
from ..module_utils.bundle.trust import TRUST_OPTIONS, module_trust
from ..module_utils.site.repo import REPO_ROOT_OPTION, RepoError, SiteRepo, import_bundle


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "repo_root": dict(REPO_ROOT_OPTION),
            **TRUST_OPTIONS,
            "lock_timeout": {"type": "int", "default": 600},
            "imported_by": {"type": "str", "default": "ansible"},
        },
        supports_check_mode=True,
    )
    params = module.params
    trust = module_trust(module)
    try:
        result = import_bundle(SiteRepo(params["repo_root"]), params["path"], trust.keys,
                               check_mode=module.check_mode, imported_by=params["imported_by"],
                               lock_timeout=params["lock_timeout"], signers=trust.signers)
    except (BundleError, RepoError, OSError) as exc:
        module.fail_json(msg=f"import of {params['path']} refused, repository unchanged: {exc}",
                         refused_keys=trust.refused)
    release = result.as_dict()
    module.exit_json(changed=release.pop("changed"), msg=release.pop("msg"), release=release,
                     pinned_key_files=trust.accepted, refused_keys=trust.refused)


if __name__ == "__main__":
    main()
