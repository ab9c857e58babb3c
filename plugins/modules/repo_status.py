#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: repo_status
short_description: Write the site's signed status report (releases held, what every target runs and how)
version_added: 0.2.0
description:
  - Writes O(dest) (C(application/vnd.offline-delivery.site-status.v1+json), canonical JSON) on the site's
    repo host - the site name, the releases of its repository (name, version, manifest digest, imported at),
    for each target host given in O(hosts) its facts (distribution, version, architecture), free space where
    the app state and data live, and per app the running release, each component's health and the last
    O(history) changes - signed with the site key of the have-list (M(offline.delivery.repo_have)).
  - Copies only named fields of each app status (no site overrides, env values, error texts or plans).
  - The collection time and free space change on every run and do not count as a change. The file is
    rewritten when anything else differs from the report already at O(dest), or when that report is older
    than O(refresh) seconds; otherwise it is kept and the module reports no change.
  - The site's public key is written next to O(dest) as C(<site>.status.pub) (the same key as
    C(<site>.have.pub)). Standard library only.
author:
  - offline.delivery developers (@offline-delivery)
extends_documentation_fragment:
  - offline.delivery.attributes
  - offline.delivery.repo
attributes:
  check_mode:
    support: full
    details: Reports whether the report (or the site key) would be written, writing nothing.
  diff_mode:
    support: none
  idempotent:
    support: full
    details: Within O(refresh) seconds of the last write, an unchanged site gives no change.
options:
  site:
    description: Name of the site, recorded in the report (letters, digits, C(.), C(_), C(-)).
    type: str
    required: true
  hosts:
    description:
      - The site's targets, host name to C(apps) (app name to the C(status) of M(offline.delivery.app_status)),
        C(facts) (C(distribution), C(distribution_version), C(architecture)) and C(free_mib) (path to free MiB).
      - A host given as null did not answer; it is recorded as unreachable.
    type: dict
    required: true
  dest:
    description: Where to write the report; default C(/var/lib/offline-delivery/status/<site>.status.json).
    type: path
  key_dir:
    description: Directory of the site's signing key (shared with M(offline.delivery.repo_have)).
    type: path
    default: /etc/offline-delivery/have-signing
  history:
    description: How many of the latest history entries of each app and host to keep.
    type: int
    default: 5
  refresh:
    description: Age in seconds after which an unchanged report is written again with a new collection time
      (0 writes it on every run).
    type: int
    default: 3600
seealso:
  - module: offline.delivery.app_status
  - module: offline.delivery.repo_have
"""

EXAMPLES = r"""
- name: Sign the site's status report
  offline.delivery.repo_status:
    site: north
    hosts:
      node1:
        apps:
          shop: "{{ hostvars['node1'].shop_status.status }}"
        facts:
          distribution: Debian
          distribution_version: "12.7"
          architecture: x86_64
        free_mib:
          /var/lib/offline-delivery: 20480
  register: report
"""

RETURN = r"""
path:
  description: The report on the repo host.
  returned: success
  type: str
pub_path:
  description: The site's public key next to it (C(<site>.status.pub)).
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
collected_at:
  description: The collection time of the report now at O(dest) (an older one when it was kept).
  returned: success
  type: str
hosts:
  description: Number of target hosts in the report.
  returned: success
  type: int
not_answering:
  description: Hosts recorded as not answering (unreachable, or their status failed).
  returned: success
  type: list
  elements: str
unhealthy:
  description: C(host/app) pairs installed but not healthy.
  returned: success
  type: list
  elements: str
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.site.have import DEFAULT_KEY_DIR
from ..module_utils.site.repo import REPO_ROOT_OPTION, RepoError
from ..module_utils.site.status import DEFAULT_HISTORY, DEFAULT_REFRESH, StatusError, export_status


def main() -> None:
    module = AnsibleModule(
        argument_spec={"repo_root": dict(REPO_ROOT_OPTION), "site": {"type": "str", "required": True},
                       "hosts": {"type": "dict", "required": True}, "dest": {"type": "path"},
                       "key_dir": {"type": "path", "default": DEFAULT_KEY_DIR},
                       "history": {"type": "int", "default": DEFAULT_HISTORY},
                       "refresh": {"type": "int", "default": DEFAULT_REFRESH}},
        supports_check_mode=True,
    )
    p = module.params
    site = p["site"]
    dest = p["dest"] or os.path.join("/var/lib/offline-delivery/status", f"{site}.status.json")
    try:
        res = export_status(p["repo_root"], site, p["hosts"], dest, p["key_dir"], refresh=p["refresh"],
                            history=p["history"], check_mode=module.check_mode)
    except (StatusError, RepoError, OSError) as exc:
        module.fail_json(msg=f"status report of site {site} ({dest}): {exc}")
    verb = "would write" if module.check_mode else "wrote"
    parts = [f"{res.hosts} hosts"]
    if res.not_answering:
        parts.append(f"not answering: {', '.join(res.not_answering)}")
    if res.unhealthy:
        parts.append(f"not healthy: {', '.join(res.unhealthy)}")
    msg = "; ".join(parts) + (f"; {verb} {dest}" if res.changed else f"; unchanged since {res.collected_at}")
    module.exit_json(msg=msg, **res.as_dict())


if __name__ == "__main__":
    main()
