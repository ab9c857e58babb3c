#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: repo_sync
short_description: Pull one release from a hub's repository into the site's offline repository
version_added: 0.2.0
description:
  - Runs on the site's repo host. Fetches the release's C(manifest.json) and C(manifest.sig) from the hub's
    read-only repository (served by the hub's nginx under C(/repo/), see docs/sync.md) and accepts it only
    when it is signed by one of the site's own O(trusted_keys) - a hub is trusted no more than a carried disk.
  - Fetches only the blobs this repository lacks, one by one into its staging area, with HTTP Range requests,
    so a transfer that was interrupted resumes where it stopped (a partial file is re-hashed before it is
    continued). Every blob is checked for size and sha256 on arrival; a wrong blob is refused naming its
    digest and URL, its staged data is discarded and nothing is published.
  - Then publishes the release exactly as M(offline.delivery.bundle_import) does (release record, catalog
    replaced last). Run the offline_repo role afterwards to publish apt repository, file tree and images
    (playbook C(offline.delivery.sync) does).
  - A release already in the repository with all its blobs reports no change and sends nothing.
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
    details: Fetches and verifies the signed manifest, reports the blobs and bytes that would be sent, writes nothing.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  hub:
    description:
      - URL of the hub, C(http://HOST:PORT), or of its served repository (default path C(/repo/)).
      - C(https://HOST:PORT) for a hub with its TLS option on (O(hub_ca)).
      - Environment proxies are not used and redirects are refused.
    type: str
    required: true
  hub_ca:
    description:
      - PEM text of the CA certificate of a hub with its TLS option on (the hub repo host's
        C(/etc/offline-delivery/tls/site-ca.crt)), carried to the site out of band like a vendor key.
      - The hub's certificate is then verified against this CA alone, not the machine's CAs, and O(hub) must be
        an C(https://) URL. Without it, an C(https://) hub is verified against the machine's CAs.
      - This is transport only. The release is still accepted only with a signature by a trusted key, and every blob by
        its digest.
    type: str
  name:
    description: Name of the application release to sync.
    type: str
    required: true
  version:
    description: Version of the release to sync.
    type: str
    required: true
  bandwidth_limit:
    description:
      - Average bytes per second the blob transfer may use, such as C(10M), C(512K) or C(1048576)
        (K, M and G are 1024-based); C(0) means no limit.
    type: str
    default: "0"
  timeout:
    description:
      - Seconds any single network wait (connect, each read) may take before the sync stops; what arrived
        stays staged, and running again resumes.
    type: int
    default: 30
  lock_timeout:
    description:
      - Seconds to wait for an import or another sync of the same release to finish.
    type: int
    default: 600
  imported_by:
    description:
      - Recorded in the release record and the catalog, followed by C(via sync from <hub>).
    type: str
    default: ansible
seealso:
  - module: offline.delivery.bundle_import
"""

EXAMPLES = r"""
- name: Sync shop 1.1.0 from the provincial hub, at most 10 MiB/s
  offline.delivery.repo_sync:
    hub: http://hub-repo.example:8080
    name: shop
    version: 1.1.0
    trusted_keys: "{{ query('ansible.builtin.fileglob', '/etc/offline-delivery/trusted/*.pub') }}"
    pinned_keys: "{{ offline_delivery_vendor_keys }}"
    bandwidth_limit: 10M
  register: shop_sync
"""

RETURN = r"""
refused_keys:
  description: Key files that were not used, each with its fingerprint and why (not pinned, revoked).
  returned: always
  type: list
  elements: dict
release:
  description: The release and what the sync did.
  returned: success
  type: dict
  contains:
    name:
      description: Application name.
      type: str
    version:
      description: Application version.
      type: str
    hub:
      description: URL of the hub's served repository.
      type: str
    manifest_digest:
      description: sha256 of the release manifest.
      type: str
    blobs_total:
      description: Blobs the release consists of.
      type: int
    blobs_missing:
      description: Blobs of the release this repository lacked before the sync.
      type: int
    bytes_missing:
      description: Their bytes.
      type: int
    blobs_sent:
      description: Blobs transferred (wholly or in part) by this run.
      type: int
    bytes_sent:
      description: Bytes transferred from the hub by this run.
      type: int
    bytes_resumed:
      description: Bytes an earlier, interrupted run had staged (re-hashed, not sent again).
      type: int
    blobs_new:
      description: Blobs the publish added to the repository.
      type: int
    bytes_new:
      description: Bytes the publish added to the repository.
      type: int
    seconds:
      description: Duration of the sync.
      type: float
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.bundle.format import BundleError
from ..module_utils.bundle.trust import TRUST_OPTIONS, module_trust
from ..module_utils.site.repo import REPO_ROOT_OPTION, RepoError, SiteRepo
from ..module_utils.site.sync import SyncError, SyncInterrupted, parse_rate, sync_release


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "hub": {"type": "str", "required": True},
            "hub_ca": {"type": "str"},
            "name": {"type": "str", "required": True},
            "version": {"type": "str", "required": True},
            "repo_root": dict(REPO_ROOT_OPTION),
            **TRUST_OPTIONS,
            "bandwidth_limit": {"type": "str", "default": "0"},
            "timeout": {"type": "int", "default": 30},
            "lock_timeout": {"type": "int", "default": 600},
            "imported_by": {"type": "str", "default": "ansible"},
        },
        supports_check_mode=True,
    )
    params = module.params
    what = f"sync of {params['name']} {params['version']} from {params['hub']}"
    trust = module_trust(module)
    if params["timeout"] < 1:
        module.fail_json(msg="timeout must be at least 1 second")
    try:
        result = sync_release(SiteRepo(params["repo_root"]), params["hub"], params["name"], params["version"], trust.keys,
                              bandwidth_limit=parse_rate(params["bandwidth_limit"]), timeout=params["timeout"],
                              check_mode=module.check_mode, imported_by=params["imported_by"],
                              lock_timeout=params["lock_timeout"], signers=trust.signers,
                              hub_ca=params["hub_ca"])
    except SyncInterrupted as exc:
        module.fail_json(msg=f"{what} interrupted, nothing published: {exc}", refused_keys=trust.refused)
    except (SyncError, BundleError, RepoError, OSError) as exc:
        module.fail_json(msg=f"{what} refused, repository unchanged: {exc}", refused_keys=trust.refused)
    release = result.as_dict()
    module.exit_json(changed=release.pop("changed"), msg=release.pop("msg"), release=release, refused_keys=trust.refused)


if __name__ == "__main__":
    main()
