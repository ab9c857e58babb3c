#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: repo_have
short_description: Write the site's signed have-list (every blob its repository holds, per release)
version_added: 0.2.0
description:
  - Writes O(dest), the have-file C(bundle-builder build --have) reads
    (C(application/vnd.offline-delivery.have.v1+json)), extended with the site name, the releases of the
    catalog (name, version, manifest digest) and an Ed25519 signature by the site, as canonical JSON.
  - Lists a blob only when a release names it and it is present with the size its manifest gives, so a
    bundle built against the list never leaves out a blob the site cannot really use.
  - The site key (C(site-have.key), PKCS8 PEM, mode 0600, in O(key_dir), mode 0700) is made on first use
    and never leaves the repo host; its public half is written as C(site-have.pub) beside it and next to
    O(dest) (C(<site>.have.pub)). The vendor must pin that public key to trust the list (docs/fleet.md).
  - No timestamps, so nothing is written when the repository did not change.
  - Standard library only (the signer is pure Python).
author:
  - offline.delivery developers (@offline-delivery)
extends_documentation_fragment:
  - offline.delivery.attributes
  - offline.delivery.repo
attributes:
  check_mode:
    support: full
    details: Reports whether the list (or the site key) would be written, writing nothing.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  site:
    description: Name of the site, recorded in the list (letters, digits, C(.), C(_), C(-)).
    type: str
    required: true
  dest:
    description: Where to write the list; default C(/var/lib/offline-delivery/have/<site>.have.json).
    type: path
  key_dir:
    description: Directory of the site's signing key.
    type: path
    default: /etc/offline-delivery/have-signing
seealso:
  - module: offline.delivery.bundle_import
"""

EXAMPLES = r"""
- name: Export what this site holds
  offline.delivery.repo_have:
    site: north
  register: have
"""

RETURN = r"""
path:
  description: The have-list written.
  returned: success
  type: str
pub_path:
  description: The site's public key, next to the list (C(<site>.have.pub)).
  returned: success
  type: str
keyid:
  description: Hex sha256 of the site's raw public key (null in check mode before the key exists).
  returned: success
  type: str
key_created:
  description: Whether the site key was made by this run (or would be, in check mode).
  returned: success
  type: bool
site:
  description: Site name recorded.
  returned: success
  type: str
releases:
  description: The releases listed (C(name), C(version), C(manifestDigest)).
  returned: success
  type: list
  elements: dict
blobs:
  description: Number of blob digests listed.
  returned: success
  type: int
missing:
  description: Blobs a release names that the repository lacks (or holds with a wrong size); not listed.
  returned: success
  type: int
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.site.have import DEFAULT_KEY_DIR, HaveError, export_have
from ..module_utils.site.repo import REPO_ROOT_OPTION, RepoError


def main() -> None:
    module = AnsibleModule(
        argument_spec={"repo_root": dict(REPO_ROOT_OPTION), "site": {"type": "str", "required": True},
                       "dest": {"type": "path"}, "key_dir": {"type": "path", "default": DEFAULT_KEY_DIR}},
        supports_check_mode=True,
    )
    site = module.params["site"]
    dest = module.params["dest"] or os.path.join("/var/lib/offline-delivery/have", f"{site}.have.json")
    try:
        res = export_have(module.params["repo_root"], site, dest, module.params["key_dir"],
                          check_mode=module.check_mode)
    except (HaveError, RepoError, OSError) as exc:
        module.fail_json(msg=f"have-list of site {site} ({dest}): {exc}")
    verb = "would write" if module.check_mode else "wrote"
    msg = (f"{len(res.releases)} releases, {res.blobs} blobs" + (f", {res.missing} missing" if res.missing else "")
           + (f"; {verb} {dest}" if res.changed else "; already current")
           + ("; site key made" if res.key_created and not module.check_mode else ""))
    module.exit_json(msg=msg, **res.as_dict())


if __name__ == "__main__":
    main()
