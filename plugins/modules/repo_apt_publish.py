#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: repo_apt_publish
short_description: Publish the site's signed apt repositories from the releases in the offline repository
version_added: 0.1.0
description:
  - Creates the site's apt signing key with gpg when there is none (ed25519, no passphrase so the repo host
    signs unattended; the private key stays in O(signing_home), mode 0700, and never leaves the host), and
    exports its public part to O(www_dir)C(/keys/) as C(<key_name>.gpg) (binary, for C(signed-by=)) and
    C(<key_name>.asc).
  - For every distro release (for example C(debian-12)) that some imported release carries OS packages for,
    makes the flat apt repository O(www_dir)C(/apt/<distro>/) - hard links to the package blobs, C(Packages)
    and C(Packages.gz) as the union of the apt index blobs of every imported release, a C(Release) file with
    SHA256 sums, and C(InRelease) plus C(Release.gpg) signed with the site key.
  - Everything is derived from the catalog; with an unchanged catalog and key nothing is written and nothing
    is re-signed. Two different files of the same name in two releases are an error naming both releases.
  - Needs python3 and gpg/gpgv on the repo host.
author:
  - offline.delivery developers (@offline-delivery)
extends_documentation_fragment:
  - offline.delivery.attributes
  - offline.delivery.repo
attributes:
  check_mode:
    support: full
    details: Reports what would be linked, written and signed, writing nothing and creating no key.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  www_dir:
    description:
      - Directory the site's web server serves; default C(<repo_root>/www). Must be on the file system of
        O(repo_root) for hard links (otherwise packages are copied).
    type: path
  signing_home:
    description:
      - gpg home directory holding the site key. Created 0700 when missing.
    type: path
    default: /etc/offline-delivery/apt-signing
  key_uid:
    description:
      - User id of a newly created key.
    type: str
    default: offline-delivery site archive key
  key_name:
    description:
      - Base name of the exported public key files under C(keys/).
    type: str
    default: offline-delivery-archive
  distros:
    description:
      - Distro releases to publish; default every distro some imported release carries packages for.
    type: list
    elements: str
seealso:
  - module: offline.delivery.bundle_import
  - module: offline.delivery.repo_packages
"""

EXAMPLES = r"""
- name: Publish the site apt repositories
  offline.delivery.repo_apt_publish:
    repo_root: /srv/offline-delivery
  register: apt_publish
"""

RETURN = r"""
key:
  description: The site key.
  returned: success
  type: dict
  contains:
    fingerprint:
      description: Fingerprint of the signing key (empty in check mode before the key exists).
      type: str
    created:
      description: Whether the key was (or in check mode would be) created by this run.
      type: bool
    public_files:
      description: Paths of the exported public key files.
      type: list
      elements: str
distros:
  description: One entry per published distro release.
  returned: success
  type: list
  elements: dict
  contains:
    distro:
      description: Distro key, for example C(debian-12).
      type: str
    packages:
      description: Package files in the repository.
      type: int
    arches:
      description: Architectures with packages.
      type: list
      elements: str
    releases:
      description: Releases (C(name version)) whose packages the repository holds.
      type: list
      elements: str
    files_changed:
      description: Package links added, replaced or removed.
      type: int
    index_changed:
      description: Whether Packages, Packages.gz or Release changed.
      type: bool
    signed:
      description: Whether the Release file was (or would be) signed again.
      type: bool
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.site.apt import (AptRepoError, create_key, export_public, package_sets, publish_distro,
                                     signing_key, stop_agent, write_if_changed)
from ..module_utils.site.repo import REPO_ROOT_OPTION


def _publish_key(module: AnsibleModule, home: str, keys_dir: str, name: str) -> tuple[str | None, bool, bool,
                                                                                      list[str]]:
    """Ensure the site key exists and its public part is exported; (fingerprint, created, changed, files)."""
    fpr, created = signing_key(home), False
    if fpr is None:
        if module.check_mode:
            return None, True, True, []
        fpr, created = create_key(home, module.params["key_uid"]), True
    if not module.check_mode:
        os.makedirs(keys_dir, mode=0o755, exist_ok=True)
    changed = created
    files = []
    for suffix, armor in ((".gpg", False), (".asc", True)):
        path = os.path.join(keys_dir, name + suffix)
        changed |= write_if_changed(path, export_public(home, fpr, armor=armor), check_mode=module.check_mode)
        files.append(path)
    return fpr, created, changed, files


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "repo_root": dict(REPO_ROOT_OPTION),
            "www_dir": {"type": "path"},
            "signing_home": {"type": "path", "default": "/etc/offline-delivery/apt-signing"},
            # a user id like "site archive key", not a secret
            "key_uid": {"type": "str", "default": "offline-delivery site archive key", "no_log": False},
            "key_name": {"type": "str", "default": "offline-delivery-archive"},
            "distros": {"type": "list", "elements": "str"},
        },
        supports_check_mode=True,
    )
    p = module.params
    www = p["www_dir"] or os.path.join(p["repo_root"], "www")
    home = p["signing_home"]
    try:
        sets = package_sets(p["repo_root"])
        distros = p["distros"] or sorted({s.distro for s in sets})
        unknown = [d for d in distros if not any(s.distro == d for s in sets)]
        if unknown:
            module.fail_json(msg=f"no imported release carries OS packages for {', '.join(unknown)}; import a "
                                 f"bundle built with --packages {unknown[0]}")
        fpr, created, changed, files = _publish_key(module, home, os.path.join(www, "keys"), p["key_name"])
        keyring = os.path.join(www, "keys", p["key_name"] + ".gpg")
        results = [publish_distro(p["repo_root"], www, d, sets, home=home, fpr=fpr, keyring=keyring,
                                  check_mode=module.check_mode) for d in distros]
    except (AptRepoError, OSError) as exc:
        module.fail_json(msg=f"apt repository under {www}: {exc}")
    finally:
        stop_agent(home)
    changed |= any(r.changed for r in results)
    summary = ", ".join(f"{r.distro}: {r.packages} packages" + (" (re-signed)" if r.signed else "")
                        for r in results) or "no distro to publish"
    module.exit_json(changed=changed, msg=summary,
                     key={"fingerprint": fpr or "", "created": created, "public_files": files},
                     distros=[r.as_dict() for r in results])


if __name__ == "__main__":
    main()
