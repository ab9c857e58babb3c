#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: app_status
short_description: Report what release of an application a host runs and how each component is doing
version_added: 0.2.0
description:
  - Reads the host's state of the app (current and previous release, overrides, history) and checks each
    component once - present, running, as deployed (same fingerprint), healthy by the model's health check.
  - The status names the env variables the site overrides but never their values (they may be credentials, and
    the status goes into reports that leave the site); the values stay in the host's 0600 state.
  - Changes nothing.
author:
  - offline.delivery developers (@offline-delivery)
extends_documentation_fragment:
  - offline.delivery.attributes
  - offline.delivery.app_host
attributes:
  check_mode:
    support: full
    details: Reads only.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  history:
    description: How many of the latest history entries to return.
    type: int
    default: 10
  health_scale:
    description:
      - Multiplies the time each health check may take, for a host slower than the vendor's timings assume
        (as O(offline.delivery.app_deploy#module:health_scale) does for a deploy).
    type: float
    default: 1.0
seealso:
  - module: offline.delivery.app_deploy
"""

EXAMPLES = r"""
- name: How is the shop doing here
  offline.delivery.app_status:
    app: shop
    target: compose
  register: shop_status
"""

RETURN = r"""
status:
  description: The host's view of the app.
  returned: always
  type: dict
  contains:
    installed:
      description: Whether a release of the app runs here.
      type: bool
    version:
      description: The current release.
      type: str
    previous_version:
      description: The release before it.
      type: str
    overridden:
      description: Per component, the names of the env variables the site overrides (never the values).
      type: dict
    healthy:
      description: Every component present, running, as deployed and healthy.
      type: bool
    components:
      description: Per component - running, started_at, as_deployed, healthy, reason.
      type: dict
    history:
      description: The latest changes (when, by whom, action, from, to, result).
      type: list
      elements: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.app.engine import host_status
from ..module_utils.app.runtime import DeployError
from ..module_utils.app.state import AppState, StateError
from ..module_utils.targets.kinds import APP_HOST_OPTIONS, runtime_for_params


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **APP_HOST_OPTIONS,
            "history": {"type": "int", "default": 10},
            "health_scale": {"type": "float", "default": 1.0},
        },
        required_if=[("target", "k8s", ("kubeconfig",))],
        supports_check_mode=True,
    )
    p = module.params
    try:
        runtime = runtime_for_params(p, lambda argv: module.run_command(argv, check_rc=False))
        status = host_status(runtime, AppState(p["state_dir"], p["app"]), history=p["history"])
    except (DeployError, StateError, OSError) as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=False, status=status)


if __name__ == "__main__":
    main()
