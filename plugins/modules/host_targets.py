#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: host_targets
short_description: Say which target kinds a host can take and what it lacks for the others
version_added: 0.2.0
description:
  - Reads the host (os-release, python, systemd, commands, overlayfs, zstd, Docker) and reports, per target kind
    (C(compose), C(systemd), C(k8s)), whether the host can take it and what is missing.
  - The systemd target needs no package of the collection, so any distro family qualifies when it has systemd
    247 or newer, python3 3.9 or newer, util-linux (mount, umount, nsenter), coreutils (cp, timeout),
    overlayfs and the zstd command or libzstd (docs/systemd-target.md "Hosts that are not Debian").
  - The compose target needs the Docker engine with Compose v2 running; the k8s target only python3.
  - Changes nothing; the app role's preflight runs it on every target host.
author:
  - offline.delivery developers (@offline-delivery)
extends_documentation_fragment:
  - offline.delivery.attributes
attributes:
  check_mode:
    support: full
    details: Reads only.
  diff_mode:
    support: none
  idempotent:
    support: full
options: {}
seealso:
  - module: offline.delivery.app_deploy
"""

EXAMPLES = r"""
- name: What can this host run
  offline.delivery.host_targets:
  register: host_targets

- name: Refuse a systemd host that lacks something
  ansible.builtin.assert:
    that: host_targets.targets.systemd.ok
    fail_msg: "{{ host_targets.targets.systemd.missing | join('; ') }}"
"""

RETURN = r"""
targets:
  description: Per target kind (compose, systemd, k8s), C(ok) and the list C(missing) (what to provide, in words).
  returned: always
  type: dict
found:
  description:
    - What was found - C(distro) (os-release ID-VERSION_ID), C(distro_like), C(python), C(package_manager)
      (C(apt) or empty), C(systemd_booted), C(systemd) (version), C(overlay), C(zstd), C(commands) (name to path,
      empty when absent).
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.targets.hostcheck import host_report


def main() -> None:
    module = AnsibleModule(argument_spec={}, supports_check_mode=True)
    report = host_report(run=lambda argv: module.run_command(argv, check_rc=False))
    module.exit_json(changed=False, **report)


if __name__ == "__main__":
    main()
