#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: repo_files_publish
short_description: Publish the binaries carried in the imported releases as the site's file tree
version_added: 0.2.0
description:
  - Makes O(www_dir)C(/files/<name>/<version>/<arch>/<name>) for every file (manifest section C(files), from
    C(bundle-builder build --file)) of every release in the site repository's catalog, as a hard link to its
    blob (a copy only when O(www_dir) is on another file system), and writes O(www_dir)C(/files/index.json)
    listing name, version, arch, digest, size, mode, url (relative to C(index.json)), the releases
    carrying each file and the import time of the newest of them (C(importedAt)).
  - Links no imported release carries any more are removed. Nothing is written when nothing differs.
  - The same name, version and arch with other bytes in two releases is an error naming both releases.
  - Standard library only.
author:
  - offline.delivery developers (@offline-delivery)
extends_documentation_fragment:
  - offline.delivery.attributes
  - offline.delivery.repo
attributes:
  check_mode:
    support: full
    details: Reports the links and the index that would change, writing nothing.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  www_dir:
    description:
      - Directory the site's web server serves; default C(<repo_root>/www). Must be on the file system of
        O(repo_root) for hard links (otherwise files are copied).
    type: path
seealso:
  - module: offline.delivery.bundle_import
  - module: offline.delivery.repo_apt_publish
"""

EXAMPLES = r"""
- name: Publish the carried binaries under http://<repo>:8080/files/
  offline.delivery.repo_files_publish:
    repo_root: /srv/offline-delivery
  register: files_publish
"""

RETURN = r"""
files:
  description: Every file the tree serves (the entries of C(index.json)).
  returned: success
  type: list
  elements: dict
  contains:
    name:
      description: File name (also its name on the site).
      type: str
    version:
      description: Version given at build time (the release's version when none was given).
      type: str
    arch:
      description: Architecture, for example C(amd64).
      type: str
    digest:
      description: C(sha256:<hex>) of the bytes.
      type: str
    size:
      description: Bytes.
      type: int
    mode:
      description: C(0755) for an executable, else C(0644) (what a client should install it with).
      type: str
    url:
      description: Path relative to C(index.json), C(<name>/<version>/<arch>/<name>).
      type: str
    releases:
      description: Releases (C(name version)) carrying this file.
      type: list
      elements: str
    importedAt:
      description: Import time (UTC, ISO 8601) of the newest release carrying this file; clients pick the newest version by it.
      type: str
links_changed:
  description: Paths under C(files/) added, replaced or removed.
  returned: success
  type: list
  elements: str
index_changed:
  description: Whether C(index.json) changed.
  returned: success
  type: bool
index:
  description: Path of C(index.json).
  returned: success
  type: str
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.site.files import FilesError, publish_files
from ..module_utils.site.repo import REPO_ROOT_OPTION


def main() -> None:
    module = AnsibleModule(
        argument_spec={"repo_root": dict(REPO_ROOT_OPTION), "www_dir": {"type": "path"}},
        supports_check_mode=True,
    )
    root = module.params["repo_root"]
    www = module.params["www_dir"] or os.path.join(root, "www")
    try:
        result = publish_files(root, www, check_mode=module.check_mode)
    except (FilesError, OSError) as exc:
        module.fail_json(msg=f"file tree under {www}/files: {exc}")
    verb = "would change" if module.check_mode else "changed"
    msg = f"{len(result.files)} files served" + (
        f"; {verb}: {len(result.links_changed)} links" + (", index.json" if result.index_changed else "")
        if result.changed else "; nothing to change")
    module.exit_json(changed=result.changed, msg=msg, **result.as_dict())


if __name__ == "__main__":
    main()
