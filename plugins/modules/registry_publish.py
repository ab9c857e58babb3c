#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: registry_publish
short_description: Push the images of imported releases from the site repository into the site registry
version_added: 0.1.0
description:
  - For each component image of each selected release of the offline repository at O(repo_root), pushes the
    config and layer blobs (those the registry has are skipped; a blob already pushed to another repository
    of the registry is mounted, not uploaded again), then each per-platform manifest by digest, then the
    multi-platform OCI index under the image's tag. Manifests are pushed with their exact bytes, so the
    digests in the registry are the ones the release names.
  - The repository and tag come from the image reference of the app model (V(shop/api:1.0.0) is pushed as
    V(<registry>/shop/api:1.0.0)); a registry host written in the reference is dropped. A reference with a
    digest and no tag is pushed by the index digest.
  - Everything is read and checked in the repository first; a blob missing from it fails naming the blob
    and nothing is pushed.
  - Idempotent by digest - when an image's tag already resolves to its index digest, nothing of that image
    is pushed.
  - Needs nothing but Python 3 on the host that runs it (normally the repo host, next to the registry).
author:
  - offline.delivery developers (@offline-delivery)
extends_documentation_fragment:
  - offline.delivery.attributes
  - offline.delivery.repo
attributes:
  check_mode:
    support: full
    details: Reads the repository and asks the registry what it has (HEAD requests only); reports what would
      be pushed, pushes nothing.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  registry:
    description:
      - The registry as V(host:port), without a scheme.
    type: str
    required: true
  releases:
    description:
      - Releases to publish, each as V(name:version). Default - every release in the repository's catalog.
    type: list
    elements: str
  insecure:
    description:
      - Plain HTTP (the site registry on the site network). V(false) uses HTTPS, verified against O(ca_file)
        or the system's CAs.
    type: bool
    default: true
  ca_file:
    description:
      - PEM file of the CA that signed the registry's certificate (with O(insecure=false)).
    type: path
  timeout:
    description:
      - Seconds any single connect, read or write with the registry may take.
    type: int
    default: 60
seealso:
  - module: offline.delivery.bundle_import
"""

EXAMPLES = r"""
- name: Publish every imported release into the site registry
  offline.delivery.registry_publish:
    registry: "{{ offline_delivery_repo_host }}:5000"

- name: Publish one release into a registry with TLS
  offline.delivery.registry_publish:
    registry: registry.site.example:443
    releases:
      - shop:1.1.0
    insecure: false
    ca_file: /etc/offline-delivery/site-ca.pem
"""

RETURN = r"""
images:
  description: One entry per component image of each release, in release and component order.
  returned: success
  type: list
  elements: dict
  contains:
    release:
      description: The release as V(name:version).
      type: str
    component:
      description: Component of the release.
      type: str
    reference:
      description: Image reference of the model.
      type: str
    repository:
      description: Repository in the registry.
      type: str
    tag:
      description: Tag pushed (null for a digest-only reference).
      type: str
    index:
      description: Digest of the image's OCI index, which the tag resolves to afterwards.
      type: str
    changed:
      description: Whether anything of this image was (or in check mode would be) pushed.
      type: bool
    msg:
      description: What was done and why.
      type: str
    blobs_pushed:
      description: Blobs uploaded.
      type: int
    blobs_mounted:
      description: Blobs mounted from another repository of the registry.
      type: int
    blobs_present:
      description: Blobs the registry already had.
      type: int
    manifests_pushed:
      description: Per-platform manifests pushed.
      type: int
    index_pushed:
      description: Whether the index was pushed under the tag.
      type: bool
    bytes_pushed:
      description: Bytes of the uploaded blobs.
      type: int
    pushed:
      description: What was pushed, as V(blob <digest>), V(manifest <digest> (<platform>)), V(index <digest>).
      type: list
      elements: str
bytes_pushed:
  description: Bytes uploaded over all images.
  returned: success
  type: int
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.clients.registry import RegistryClient, RegistryError
from ..module_utils.site.publish import parse_release, publish_releases
from ..module_utils.site.repo import REPO_ROOT_OPTION, RepoError, SiteRepo


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "repo_root": dict(REPO_ROOT_OPTION),
            "registry": {"type": "str", "required": True},
            "releases": {"type": "list", "elements": "str"},
            "insecure": {"type": "bool", "default": True},
            "ca_file": {"type": "path"},
            "timeout": {"type": "int", "default": 60},
        },
        supports_check_mode=True,
    )
    params = module.params
    repo = SiteRepo(params["repo_root"])
    if not repo.exists():
        module.fail_json(msg=f"{repo.root} is not an offline repository (no catalog.json or blobs); import a "
                             "bundle with offline.delivery.bundle_import first")
    try:
        releases = None if params["releases"] is None else [parse_release(r) for r in params["releases"]]
        with RegistryClient(params["registry"], insecure=params["insecure"], ca_file=params["ca_file"],
                            timeout=float(params["timeout"])) as client:
            results = publish_releases(repo, client, releases, check_mode=module.check_mode)
    except (RegistryError, RepoError, OSError) as exc:
        module.fail_json(msg=f"publish to {params['registry']}: {exc}")
    images = [r.as_dict() for r in results]
    changed = [r for r in results if r.changed]
    verb = "would push" if module.check_mode else "pushed"
    msg = (f"{verb} {len(changed)} of {len(results)} images" if changed
           else f"all {len(results)} images are published already")
    module.exit_json(changed=bool(changed), msg=msg, images=images,
                     bytes_pushed=sum(r.bytes_pushed for r in results))


if __name__ == "__main__":
    main()
