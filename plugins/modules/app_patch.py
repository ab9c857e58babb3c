#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: app_patch
short_description: Record a field fix of one component as a site release signed by the site key
version_added: 0.2.0
description:
  - On the repo host, adds O(files) and removes O(remove) as one new layer (a tar, gzip or uncompressed, written by the collection's own
    code, without Docker or any build tool) on top of O(component)'s image in release O(base) of the site repository,
    for every platform the release carries (new config with the layer's diff_id and a history entry, new
    manifest, new index), and records the site release C(<vendor version>+site.<n>) in the site repository, a
    release manifest like the vendor's with the new image (reference C(<repository>:<tag>-site.<n>)) and the
    patch record (component, files with their sha256, removed paths, who, when, base release), signed by the site key.
  - The images are not pushed here; M(offline.delivery.registry_publish) publishes the site release's images.
  - The same patch again (base, component, files, paths, modes, removals) finds the site release already made and changes
    nothing.
  - Standard library only, except the signature (python3-cryptography, installed on the repo host by the import).
author:
  - offline.delivery developers (@offline-delivery)
extends_documentation_fragment:
  - offline.delivery.attributes
  - offline.delivery.repo
attributes:
  check_mode:
    support: full
    details: Checks the inputs and says which site release would be recorded, writing nothing.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  name:
    description: Application name.
    type: str
    required: true
  base:
    description: The release to patch (a vendor release or a site release of one), in the site repository.
    type: str
    required: true
  component:
    description: The component whose image gets the files.
    type: str
    required: true
  files:
    description:
      - The files to add, each a file on the repo host (O(files[].src)) and its path in the image
        (O(files[].path), absolute, without C(..)), at most 64 files, 256 MiB each, 512 MiB in all.
      - A patch adds at least one file or removes at least one path (O(remove)).
    type: list
    elements: dict
    default: []
    suboptions:
      src:
        description: The file on the repo host.
        type: path
        required: true
      path:
        description: Its absolute path in the image.
        type: str
        required: true
      mode:
        description: Its mode in the image.
        type: str
        default: "0644"
        choices: ["0644", "0755", "0600", "0700", "0444", "0555"]
  remove:
    description:
      - Absolute paths to remove from the image (a file or a directory), at most 64; each becomes an OCI
        whiteout in the new layer, which every target honours. A path the patch also adds, or a directory a
        file it adds is under, is refused.
    type: list
    elements: str
    default: []
  author:
    description: Who made the patch (recorded in the site release, the image's history and the status report).
    type: str
    required: true
  note:
    description: Why (recorded with the patch).
    type: str
    default: ""
  compress:
    description: Write the layer gzip-compressed (C(true)) or as a plain tar.
    type: bool
    default: true
  key_dir:
    description: Directory of the site key (the have-list's and the status report's); made on first use.
    type: path
    default: /etc/offline-delivery/have-signing
seealso:
  - module: offline.delivery.registry_publish
  - module: offline.delivery.app_release
"""

EXAMPLES = r"""
- name: A new shop_api.py in the shop's api, on top of 1.0.0
  offline.delivery.app_patch:
    name: shop
    base: 1.0.0
    component: api
    files:
      - {src: /var/lib/offline-delivery/patch/shop_api.py, path: /opt/shop-api/shop_api.py}
    author: alice
    note: rounding of totals
  register: patch
"""

RETURN = r"""
version:
  description: The site release, C(<vendor version>+site.<n>).
  returned: always
  type: str
reference:
  description: The patched component's image reference in the site registry.
  returned: always
  type: str
patch:
  description: The patch record (component, files, layer, image, by, at, note, base); null in check mode.
  returned: always
  type: dict
manifest_digest:
  description: sha256 of the site release's manifest.
  returned: when recorded
  type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.bundle.format import BundleError
from ..module_utils.site.have import DEFAULT_KEY_DIR
from ..module_utils.site.patch import MODES, PatchError, make_patch
from ..module_utils.site.repo import REPO_ROOT_OPTION, RepoError, SiteRepo


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "base": {"type": "str", "required": True},
            "component": {"type": "str", "required": True},
            "files": {"type": "list", "elements": "dict", "default": [], "options": {
                "src": {"type": "path", "required": True},
                "path": {"type": "str", "required": True},
                "mode": {"type": "str", "default": "0644", "choices": list(MODES)},
            }},
            "remove": {"type": "list", "elements": "str", "default": []},
            "author": {"type": "str", "required": True},
            "note": {"type": "str", "default": ""},
            "compress": {"type": "bool", "default": True},
            "key_dir": {"type": "path", "default": DEFAULT_KEY_DIR},
            "repo_root": dict(REPO_ROOT_OPTION),
        },
        supports_check_mode=True,
    )
    p = module.params
    try:
        res = make_patch(SiteRepo(p["repo_root"]), p["name"], p["component"], p["files"], base_version=p["base"],
                         author=p["author"], note=p["note"], key_dir=p["key_dir"], compress=p["compress"],
                         remove=p["remove"], check_mode=module.check_mode)
    except (PatchError, RepoError, BundleError, OSError) as exc:
        module.fail_json(msg=f"patch of {p['name']} {p['base']} component {p['component']}: {exc}")
    module.exit_json(**res.as_dict())


if __name__ == "__main__":
    main()
