#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: app_k8s_manifests
short_description: Render a release of an application to Kubernetes manifests
version_added: 0.1.0
description:
  - Renders the normalised application model of a release (as read by M(offline.delivery.app_release)) into
    Kubernetes objects - per component a Deployment, or a StatefulSet with a PersistentVolumeClaim per volume;
    a Service; a NodePort or LoadBalancer Service for published ports; a ConfigMap for config files; a Secret
    for every env value and config file that holds a site secret (never inline). A component of kind job
    becomes a Job named after its fingerprint (a changed job is a new Job that C(kubectl apply) creates and
    runs), without a Service.
  - Images are pinned as C(<registry>/<reference>@<index digest>). Every object carries the
    C(app.kubernetes.io/*) labels and an C(offline.delivery/spec-fingerprint) annotation that changes exactly
    when the component's spec does. The fingerprint is an HMAC keyed with this host's fingerprint key
    (C(<state_dir>/fingerprint.key), made once, 0600), so it reveals nothing of the secrets and site overrides
    it covers to whoever may read the objects.
  - The objects are checked across each other (selectors, Service ports, Secret and ConfigMap references,
    volume mounts) and the module fails naming every problem. Schema validation for a Kubernetes version is
    done with C(kubernetes-validate --strict) on the written directory (see docs/kubernetes.md).
  - With O(dest) the manifests are written as one JSON file per object (C(NNN-kind-name.json), applied in
    that order) into a 0700 directory with 0600 files; files of an earlier render that are no longer wanted are
    removed. Without O(dest) nothing is written.
  - Needs nothing but Python 3 where it runs.
author:
  - offline.delivery developers (@offline-delivery)
extends_documentation_fragment:
  - offline.delivery.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  model:
    description:
      - The application model of the release (normalised, as returned by M(offline.delivery.app_release) in
        C(release.model); a raw C(app.yml) mapping is accepted too and validated).
    type: dict
    required: true
  images:
    description:
      - Per component, the release's image record (C(release.images)) - at least C(index), the OCI index digest
        of the component's image in the site registry.
    type: dict
    required: true
  registry:
    description:
      - The site registry as the cluster's nodes reach it, C(host:port).
    type: str
    required: true
  secrets:
    description:
      - The site's generated secret values for the app (M(offline.delivery.app_secrets)).
    type: dict
    required: true
  overrides:
    description:
      - Site overrides of env values, per component, for example C(api) mapped to C(SHOP_CURRENCY=CHF).
      - Not logged (a value may be a credential); Ansible then hides every occurrence of an override value in
        what the module returns.
    type: dict
    default: {}
  modules:
    description:
      - The site's choice of the model's optional modules, module name to V(true) or V(false); a module not
        named runs when the model's C(default) says so. The manifests hold the components that run.
    type: dict
    default: {}
  state_dir:
    description:
      - Where this host keeps its fingerprint key (C(fingerprint.key)), the state directory of
        M(offline.delivery.app_deploy). Made on the first render that is not in check mode.
    type: path
    default: /var/lib/offline-delivery
  namespace:
    description:
      - Namespace of every object. Defaults to the application name.
    type: str
  include_namespace:
    description:
      - Put a Namespace object first.
    type: bool
    default: true
  storage_class:
    description:
      - C(storageClassName) of the PersistentVolumeClaims; omitted, the cluster's default storage class.
    type: str
  volume_sizes:
    description:
      - Storage request per volume name (the model has no sizes); others get C(1Gi).
    type: dict
    default: {}
  publish_type:
    description:
      - Service type for published ports. V(NodePort) works on every cluster; V(LoadBalancer) needs a load
        balancer implementation (e.g. MetalLB) on site.
    type: str
    choices: [NodePort, LoadBalancer]
    default: NodePort
  node_port_range:
    description:
      - The cluster's C(--service-node-port-range) as a list of first and last port. A published port inside it becomes the
        node port itself; outside it the cluster allocates one.
    type: list
    elements: int
    default: [30000, 32767]
  labels:
    description:
      - Extra labels for every object (not C(app.kubernetes.io/*)).
    type: dict
    default: {}
  dest:
    description:
      - Directory to write the manifests into. Omitted, they are only returned.
    type: path
notes:
  - Secret values are never returned; RV(manifests) shows their length instead.
seealso:
  - module: offline.delivery.app_release
  - module: offline.delivery.app_secrets
"""

EXAMPLES = r"""
- name: Render shop 1.1.0 for the cluster into a directory
  offline.delivery.app_k8s_manifests:
    model: "{{ shop_release.release.model }}"
    images: "{{ shop_release.release.images }}"
    registry: repo.site:5000
    secrets: "{{ shop_secrets.secrets }}"
    overrides:
      api: {SHOP_CURRENCY: CHF}
    storage_class: local-path
    dest: /var/lib/offline-delivery/k8s/shop
  no_log: true
"""

RETURN = r"""
manifests:
  description: The objects in apply order, Secret values redacted.
  returned: success
  type: list
  elements: dict
fingerprints:
  description: Component -> the spec fingerprint its objects carry.
  returned: success
  type: dict
files:
  description: With O(dest), the file names C(written), C(removed) and C(unchanged).
  returned: when dest is given
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.app.model import ModelError, load_model, select_modules
from ..module_utils.app.state import StateError, fingerprint_key
from ..module_utils.targets.k8s import (FINGERPRINT_ANNOTATION, K8sRenderError, check_manifests, component_of, redact,
                                        render_manifests, write_manifest_dir)


def _digests(module: AnsibleModule, images: dict) -> dict:
    digests = {}
    for name, image in images.items():
        index = image.get("index") if isinstance(image, dict) else None
        if not isinstance(index, str):
            module.fail_json(msg="images.%s: no 'index' digest; pass release.images from offline.delivery.app_release"
                             % name)
        digests[name] = index
    return digests


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "model": {"type": "dict", "required": True},
            "images": {"type": "dict", "required": True},
            "registry": {"type": "str", "required": True},
            "secrets": {"type": "dict", "required": True, "no_log": True},
            "overrides": {"type": "dict", "default": {}, "no_log": True},
            "modules": {"type": "dict", "default": {}},
            "state_dir": {"type": "path", "default": "/var/lib/offline-delivery"},
            "namespace": {"type": "str"},
            "include_namespace": {"type": "bool", "default": True},
            "storage_class": {"type": "str"},
            "volume_sizes": {"type": "dict", "default": {}},
            "publish_type": {"type": "str", "choices": ["NodePort", "LoadBalancer"], "default": "NodePort"},
            "node_port_range": {"type": "list", "elements": "int", "default": [30000, 32767]},
            "labels": {"type": "dict", "default": {}},
            "dest": {"type": "path"},
        },
        supports_check_mode=True,
    )
    p = module.params
    if len(p["node_port_range"]) != 2 or p["node_port_range"][0] > p["node_port_range"][1]:
        module.fail_json(msg="node_port_range: give [first, last], e.g. [30000, 32767]")
    try:
        key = fingerprint_key(p["state_dir"], create=not module.check_mode)
        model = select_modules(load_model(p["model"], source="model"), p["modules"], asked=p["modules"])[0]
        objects = render_manifests(
            model, namespace=p["namespace"] or model["name"], secrets={k: str(v) for k, v in p["secrets"].items()},
            overrides=p["overrides"], registry=p["registry"], image_digests=_digests(module, p["images"]),
            storage_class=p["storage_class"], labels=p["labels"], volume_sizes=p["volume_sizes"],
            publish_type=p["publish_type"], node_port_range=tuple(p["node_port_range"]),
            include_namespace=p["include_namespace"], fingerprint_key=key)
    except (ModelError, K8sRenderError, StateError) as exc:
        module.fail_json(msg=str(exc))
    problems = check_manifests(objects)
    if problems:
        module.fail_json(msg="the rendered manifests are inconsistent (a renderer bug; please report): "
                         + "; ".join(problems), problems=problems)
    result = {
        "changed": False,
        "manifests": redact(objects),
        "fingerprints": {component_of(o): o["metadata"]["annotations"][FINGERPRINT_ANNOTATION]
                         for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")},
    }
    if p["dest"]:
        try:
            files = write_manifest_dir(objects, p["dest"], check_mode=module.check_mode)
        except OSError as exc:
            module.fail_json(msg="cannot write the manifests into %s: %s" % (p["dest"], exc))
        result["files"] = files
        result["changed"] = bool(files["written"] or files["removed"])
    module.exit_json(**result)


if __name__ == "__main__":
    main()
