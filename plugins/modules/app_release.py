#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: app_release
short_description: Read an imported release (model and images) from the site's offline repository
version_added: 0.2.0
description:
  - Returns the application model and the image digests of a release imported by M(offline.delivery.bundle_import),
    for the deploy of that release on the site's hosts. Every byte read is checked against its digest.
  - Runs on the repo host. Reads only.
author:
  - offline.delivery developers (@offline-delivery)
extends_documentation_fragment:
  - offline.delivery.attributes
  - offline.delivery.repo
attributes:
  check_mode:
    support: full
    details: Reads only.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  name:
    description: Application name.
    type: str
    required: true
  version:
    description:
      - The release to read. Omitted, the newest imported release (Semantic Versioning precedence; a site
        release C(<v>+site.<n>) sorts after C(<v>) and before the vendor's next version).
    type: str
  site_key_dir:
    description:
      - Where the site key is (its public half C(site-have.pub)); a site release (a field fix made on site with
        M(offline.delivery.app_patch)) is read only when its manifest is signed by that key.
    type: path
    default: /etc/offline-delivery/have-signing
seealso:
  - module: offline.delivery.app_deploy
"""

EXAMPLES = r"""
- name: Read shop 1.1.0 from the site repository
  offline.delivery.app_release:
    name: shop
    version: 1.1.0
  register: shop_release
"""

RETURN = r"""
release:
  description: The release.
  returned: success
  type: dict
  contains:
    name:
      description: Application name.
      type: str
    version:
      description: Release version.
      type: str
    model:
      description: The normalised application model.
      type: dict
    images:
      description: Per component, the image reference, its OCI index digest and the manifest digest per platform.
      type: dict
    platforms:
      description: Platforms the release carries.
      type: list
      elements: str
    manifest_digest:
      description: sha256 of the release manifest.
      type: str
    patch:
      description: A site release's patch record (component, files with their sha256, who, when, base release);
        null for a vendor release.
      type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.site.have import DEFAULT_KEY_DIR
from ..module_utils.site.release import read_release
from ..module_utils.site.repo import REPO_ROOT_OPTION, RepoError, SiteRepo


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "version": {"type": "str"},
            "site_key_dir": {"type": "path", "default": DEFAULT_KEY_DIR},
            "repo_root": dict(REPO_ROOT_OPTION),
        },
        supports_check_mode=True,
    )
    params = module.params
    try:
        release = read_release(SiteRepo(params["repo_root"]), params["name"], params["version"],
                               params["site_key_dir"])
    except (RepoError, OSError) as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=False, release=release)


if __name__ == "__main__":
    main()
