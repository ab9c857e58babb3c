#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: app_uninstall
short_description: Remove an application's components from a host, keeping its data unless asked
version_added: 0.2.0
description:
  - Stops and removes every component of the app on this host (containers or systemd units and their files).
    Volumes stay unless O(remove_data=true). The host's state keeps the history and the kept releases, and the
    site's secrets stay on the repo host, so a later install finds its data and passwords again.
author:
  - offline.delivery developers (@offline-delivery)
extends_documentation_fragment:
  - offline.delivery.attributes
  - offline.delivery.app_host
attributes:
  check_mode:
    support: full
    details: Reports what would be removed.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  remove_data:
    description: Also delete the app's volumes on this host. Cannot be undone.
    type: bool
    default: false
  actor:
    description: Who runs the change, recorded in the history.
    type: str
    default: ansible
  lock_timeout:
    description:
      - Seconds to wait for another deploy, rollback or uninstall of the app on this host to finish (one change
        at a time per app and host; a killed controller can leave one running on the host).
    type: int
    default: 600
seealso:
  - module: offline.delivery.app_deploy
"""

EXAMPLES = r"""
- name: Remove the shop from this host, keeping its data
  offline.delivery.app_uninstall:
    app: shop
    target: compose
"""

RETURN = r"""
removed:
  description: The components removed.
  returned: always
  type: list
  elements: str
data_removed:
  description: Whether the volumes were deleted.
  returned: always
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.app.engine import uninstall
from ..module_utils.app.runtime import DeployError
from ..module_utils.app.state import AppState, StateError, app_lock
from ..module_utils.targets.kinds import APP_HOST_OPTIONS, runtime_for_params


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **APP_HOST_OPTIONS,
            "remove_data": {"type": "bool", "default": False},
            "actor": {"type": "str", "default": "ansible"},
            "lock_timeout": {"type": "int", "default": 600},
        },
        required_if=[("target", "k8s", ("kubeconfig",))],
        supports_check_mode=True,
    )
    p = module.params
    try:
        runtime = runtime_for_params(p, lambda argv: module.run_command(argv, check_rc=False))
        if module.check_mode:
            result = uninstall(runtime, AppState(p["state_dir"], p["app"]), keep_data=not p["remove_data"],
                               actor=p["actor"], check_mode=True)
        else:
            with app_lock(p["state_dir"], p["app"], "this host", p["lock_timeout"]):
                result = uninstall(runtime, AppState(p["state_dir"], p["app"]), keep_data=not p["remove_data"],
                                   actor=p["actor"], check_mode=False)
    except (DeployError, StateError, OSError) as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
