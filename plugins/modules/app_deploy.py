#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: app_deploy
short_description: Install, upgrade or roll back an application release on one host, health-gated
version_added: 0.2.0
description:
  - Makes this host run its components of a release - as a Docker Compose project (O(target=compose)) or as
    systemd services over unpacked image root filesystems (O(target=systemd)).
  - Plans first by comparing each component's fingerprint (image, env, config files, ports, volumes, health)
    with what runs; only added and changed components are started, level by level in dependency order, each
    level waited on with the model's health checks. Unchanged components keep running untouched.
  - A fingerprint is an HMAC-SHA256 (C(hmac-sha256:<hex>)) keyed with this host's random fingerprint key,
    C(<state_dir>/fingerprint.key) (made once, 0600). It is written into unit files, container labels, k8s
    annotations and this module's result, and reveals nothing of the secrets and overrides it covers.
  - When a health check fails, the release that ran before is put back (O(auto_rollback)), and the module fails
    naming the component and why. Volumes (data) are never removed.
  - Records the current and previous release, the site overrides, and a history (when, by whom, what changed)
    in C(<state_dir>/apps/<app>/state.json) (0600).
author:
  - offline.delivery developers (@offline-delivery)
extends_documentation_fragment:
  - offline.delivery.attributes
  - offline.delivery.app_host
attributes:
  check_mode:
    support: full
    details: Returns the plan (components added, changed, removed, unchanged; model changes) and changes nothing.
  diff_mode:
    support: full
    details: The components with their image and fingerprint before and after.
  idempotent:
    support: full
options:
  action:
    description:
      - V(deploy) installs or upgrades to O(version) with O(model) and O(images).
      - V(rollback) goes back to O(version), or when omitted to the release that ran before; its model and
        images come from this host's state.
    type: str
    choices: [deploy, rollback]
    default: deploy
  version:
    description: The release version. Required for O(action=deploy).
    type: str
  model:
    description: The release's normalised model (from M(offline.delivery.app_release)). Required for O(action=deploy).
    type: dict
  images:
    description: The release's images (from M(offline.delivery.app_release)). Required for O(action=deploy).
    type: dict
  host:
    description: This host's name in O(placement).
    type: str
    required: true
  platform:
    description: This host's platform, for example V(linux/amd64).
    type: str
    required: true
  placement:
    description:
      - Component name to the list of hosts that run it. Required for O(action=deploy); a rollback reuses the
        placement the release was deployed with.
    type: dict
  addresses:
    description: Host name to the address other hosts reach it at (for dependencies placed on other hosts).
    type: dict
    default: {}
  secrets:
    description: The site's secrets of the app (from M(offline.delivery.app_secrets)).
    type: dict
    default: {}
  overrides:
    description:
      - Site overrides of env values - component name to a mapping of variable name to value. Omitted, the
        overrides recorded at the last deploy are kept.
      - Not logged (a value may be a credential); Ansible then hides every occurrence of an override value in
        what the module returns, so a very short value (V(1)) also masks parts of versions or fingerprints there.
    type: dict
  modules:
    description:
      - The site's choice of the model's optional modules - module name to V(true) (runs) or V(false) (stopped
        and removed, its data kept). Merged over the choices recorded at the last deploy; a module the site never
        chose runs when the model's C(default) says so.
      - A choice that leaves a running component without a dependency is refused, naming both; so is a module the
        release does not have.
    type: dict
  registry:
    description: The site registry, C(host:port).
    type: str
    required: true
  registry_ca:
    description:
      - The site CA certificate on this host (PEM file). With O(target=systemd), the image pull verifies the registry
        over HTTPS against this CA only; omitted, it pulls over plain HTTP. Compose hosts trust the CA through
        C(/etc/docker/certs.d), k8s clusters through their own registry configuration (docs/site-repo.md "TLS").
    type: path
  health_timeout:
    description: Upper bound in seconds on the wait for one component to become healthy, or for a job to complete.
    type: int
    default: 300
  health_scale:
    description:
      - Multiplies each component's health budget (its start period plus every retry, from the model) and the
        time each run of its health check may take, for a host slower than the vendor's timings assume (a small
        ARM board, an emulated host). The budget is still at most O(health_timeout). A component that never
        becomes healthy is found that many times later. On the k8s target the kubelet runs the checks with the
        model's own time limits; only the wait for the rollout is stretched.
    type: float
    default: 1.0
  snapshot:
    description:
      - Before an upgrade that changes anything, stop the components with volumes and snapshot their volumes
        into C(<state_dir>/apps/<app>/snapshots/<running version>/).
    type: bool
    default: false
  restore_snapshot:
    description: With O(action=rollback), restore the volumes from the snapshot of the release rolled back to.
    type: bool
    default: false
  auto_rollback:
    description: On a failed health gate, put back the release that ran before.
    type: bool
    default: true
  actor:
    description: Who runs the change, recorded in the history.
    type: str
    default: ansible
  patch:
    description:
      - The patch record of a site release (M(offline.delivery.app_release)'s C(patch)), when O(version) is one; its
        component, files with their sha256, who and when go into the history entry.
    type: dict
  storage_class:
    description: With O(target=k8s), the storage class of the volume claims (default the cluster's default).
    type: str
  lock_timeout:
    description:
      - Seconds to wait for another deploy, rollback or uninstall of the app on this host to finish (one change
        at a time per app and host; a killed controller can leave one running on the host).
    type: int
    default: 600
seealso:
  - module: offline.delivery.app_release
  - module: offline.delivery.app_secrets
  - module: offline.delivery.app_status
"""

EXAMPLES = r"""
- name: Deploy shop 1.1.0 on this compose host
  offline.delivery.app_deploy:
    app: shop
    version: "{{ shop_release.release.version }}"
    model: "{{ shop_release.release.model }}"
    images: "{{ shop_release.release.images }}"
    target: compose
    host: "{{ inventory_hostname }}"
    platform: linux/amd64
    placement: {db: [node1], redis: [node1], api: [node1], gateway: [node1]}
    registry: 10.0.0.2:5000
    secrets: "{{ shop_secrets.secrets }}"
  no_log: true
"""

RETURN = r"""
action:
  description: V(deploy) or V(rollback) (also after an automatic rollback, the module fails instead).
  returned: always
  type: str
version:
  description: The release this host runs now (in check mode, would run).
  returned: always
  type: str
version_before:
  description: The release that ran before.
  returned: always
  type: str
plan:
  description: Component names by what the deploy does with them.
  returned: always
  type: dict
  contains:
    added:
      description: New components.
      type: list
      elements: str
    changed:
      description: Components whose fingerprint changed; restarted.
      type: list
      elements: str
    unchanged:
      description: Left running untouched.
      type: list
      elements: str
    removed:
      description: Components the release no longer has here; stopped, data kept.
      type: list
      elements: str
    restarted:
      description: Unchanged but not running; started again.
      type: list
      elements: str
components:
  description: Per component on this host, its image reference and fingerprint.
  returned: always
  type: dict
model_diff:
  description: What changed between the models of the two releases (see docs/app-model.md).
  returned: when another release ran before
  type: dict
health:
  description: Component to V(healthy) after the gate (a job - V(completed)).
  returned: success, not in check mode
  type: dict
modules:
  description: The model's optional modules, each V(true) when it runs on this site.
  returned: on deploy
  type: dict
"""

import contextlib
import getpass

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.app.engine import Engine, Target
from ..module_utils.app.model import ModelError
from ..module_utils.app.runtime import DeployError
from ..module_utils.app.state import AppState, StateError, app_lock
from ..module_utils.targets.kinds import APP_HOST_OPTIONS, runtime_for_params


def _short(fp: str) -> str:
    """A fingerprint for the diff: its scheme and 12 hex digits."""
    scheme, _sep, digest = fp.rpartition(":")
    return "%s:%s" % (scheme, digest[:12]) if scheme else fp[:12]


def _diff(engine: Engine, result: dict) -> dict:
    before_rec = engine.state.current
    before = ""
    if before_rec:
        kept = engine.state.release(before_rec["version"]) or {"images": {}}
        before = "release: %s\n" % before_rec["version"] + "".join(
            "%s: %s %s\n" % (name, kept["images"].get(name, {}).get("reference", "?"), _short(fp))
            for name, fp in sorted(before_rec["fingerprints"].items()))
    after = "release: %s\n" % result["version"] + "".join(
        "%s: %s %s\n" % (name, c["image"], _short(c["fingerprint"]))
        for name, c in sorted(result["components"].items()))
    for comp, changes in sorted((result.get("model_diff") or {}).get("env_defaults", {}).items()):
        for key, change in sorted(changes.items()):
            after += "env default %s.%s: %s -> %s\n" % (comp, key, change["old"], change["new"])
    return {"before": before, "after": after, "before_header": "state.json", "after_header": "release"}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **APP_HOST_OPTIONS,
            "action": {"type": "str", "choices": ["deploy", "rollback"], "default": "deploy"},
            "version": {"type": "str"},
            "model": {"type": "dict"},
            "images": {"type": "dict"},
            "storage_class": {"type": "str"},
            "host": {"type": "str", "required": True},
            "platform": {"type": "str", "required": True},
            "placement": {"type": "dict"},
            "addresses": {"type": "dict", "default": {}},
            "secrets": {"type": "dict", "default": {}, "no_log": True},
            "overrides": {"type": "dict", "no_log": True},
            "modules": {"type": "dict"},
            "registry": {"type": "str", "required": True},
            "registry_ca": {"type": "path"},
            "health_timeout": {"type": "int", "default": 300},
            "health_scale": {"type": "float", "default": 1.0},
            "snapshot": {"type": "bool", "default": False},
            "restore_snapshot": {"type": "bool", "default": False},
            "auto_rollback": {"type": "bool", "default": True},
            "actor": {"type": "str", "default": "ansible"},
            "patch": {"type": "dict"},
            "lock_timeout": {"type": "int", "default": 600},
        },
        required_if=[("action", "deploy", ("version", "model", "images", "placement")),
                     ("target", "k8s", ("kubeconfig",))],
        supports_check_mode=True,
    )
    p = module.params

    def run(argv):
        return module.run_command(argv, check_rc=False)

    engine = None
    try:
        with contextlib.ExitStack() as stack:
            if not module.check_mode:  # one change at a time; check mode only reads
                stack.enter_context(app_lock(p["state_dir"], p["app"], p["host"], p["lock_timeout"]))
            state = AppState(p["state_dir"], p["app"])
            if state.data["target"] not in (None, p["target"]):
                module.fail_json(msg="%s runs on %s as target %s, not %s: uninstall it first to change the target"
                                 % (p["app"], p["host"], state.data["target"], p["target"]))
            runtime = runtime_for_params(p, run, storage_class=p["storage_class"], registry=p["registry"],
                                         secrets=p["secrets"])
            target = Target(host=p["host"], platform=p["platform"], placement=p["placement"],
                            addresses=p["addresses"], registry=p["registry"], secrets=p["secrets"])
            engine = Engine(runtime, state, target, health_cap=p["health_timeout"],
                            actor=p["actor"] or getpass.getuser(), check_mode=module.check_mode)
            if p["action"] == "deploy":
                result = engine.deploy(version=p["version"], model=p["model"], images=p["images"],
                                       overrides=p["overrides"], snapshot=p["snapshot"],
                                       auto_rollback=p["auto_rollback"], modules=p["modules"], patch=p["patch"])
            else:
                result = engine.rollback(version=p["version"], restore=p["restore_snapshot"])
    except (DeployError, ModelError, StateError, OSError) as exc:
        module.fail_json(msg=str(exc), messages=engine.messages if engine else [])
    if module._diff:
        result["diff"] = _diff(engine, result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
