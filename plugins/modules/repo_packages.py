#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: repo_packages
short_description: Stage a throwaway apt source of an imported release's package blobs on the repo host
version_added: 0.1.0
description:
  - Picks the newest imported release that carries OS packages for O(distro)/O(arch) with all of
    O(profiles), and makes O(dest) a flat apt source of its verified package blobs (hard links named by file
    name, C(Packages) = the release's apt index blob for that distro/arch).
  - This is how the repo host installs its own tools (nginx, gpg, the registry) before any signed apt
    repository exists. The blobs were checked against the vendor-signed manifest on import, so the source can
    be used with C([trusted=yes]) and a private apt configuration, for one install.
  - Fails, saying which bundle to import, when no imported release fits.
author:
  - offline.delivery developers (@offline-delivery)
extends_documentation_fragment:
  - offline.delivery.attributes
  - offline.delivery.repo
attributes:
  check_mode:
    support: full
    details: Selects the release and reports whether O(dest) would change, writing nothing.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  distro:
    description:
      - Distro key of the host, for example C(debian-12).
    type: str
    required: true
  arch:
    description:
      - Debian architecture of the host (C(amd64), C(arm64)).
    type: str
    required: true
  profiles:
    description:
      - Package profiles the release must carry.
    type: list
    elements: str
    default: [base, repo]
  dest:
    description:
      - Directory to make the apt source in (on the file system of O(repo_root) for hard links).
    type: path
    required: true
seealso:
  - module: offline.delivery.repo_apt_publish
"""

EXAMPLES = r"""
- name: Stage the repo host's own packages
  offline.delivery.repo_packages:
    distro: debian-12
    arch: amd64
    dest: /srv/offline-delivery/bootstrap-apt/debian-12-amd64
  register: repo_pkgs
"""

RETURN = r"""
release:
  description: The release (C(name version)) whose packages were staged.
  returned: success
  type: str
dest:
  description: The staged apt source directory.
  returned: success
  type: str
packages:
  description: Package names in the staged source.
  returned: success
  type: list
  elements: str
profiles:
  description: Profiles the release carries for this distro/arch.
  returned: success
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.site.apt import AptRepoError, package_sets, select_package_set, stage_bootstrap_source
from ..module_utils.site.repo import REPO_ROOT_OPTION


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "repo_root": dict(REPO_ROOT_OPTION),
            "distro": {"type": "str", "required": True},
            "arch": {"type": "str", "required": True},
            "profiles": {"type": "list", "elements": "str", "default": ["base", "repo"]},
            "dest": {"type": "path", "required": True},
        },
        supports_check_mode=True,
    )
    p = module.params
    try:
        pset = select_package_set(package_sets(p["repo_root"]), p["distro"], p["arch"], p["profiles"])
        changed = stage_bootstrap_source(p["repo_root"], pset, p["dest"], check_mode=module.check_mode)
    except (AptRepoError, OSError) as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=changed, release=pset.release, dest=p["dest"], profiles=pset.profiles,
                     packages=sorted({e["package"] for e in pset.entries}),
                     msg=f"{len(pset.entries)} package files of {pset.release} for {p['distro']}/{p['arch']}")


if __name__ == "__main__":
    main()
