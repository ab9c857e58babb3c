# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    """Where an app runs on a host (or a cluster), shared by app_deploy, app_status and app_uninstall
    (spec: ``app_targets.APP_HOST_OPTIONS``)."""

    DOCUMENTATION = r"""
options:
  app:
    description: Application name.
    type: str
    required: true
  target:
    description: How this host runs components.
    type: str
    choices: [compose, systemd, k8s]
    required: true
  state_dir:
    description: The host's state directory.
    type: path
    default: /var/lib/offline-delivery
  apps_dir:
    description: Where application trees live.
    type: path
    default: /srv/offline-delivery-apps
  kubeconfig:
    description:
      - With O(target=k8s), the cluster's kubeconfig, parsed (the role reads the file named by the host variable
        C(offline_delivery_kubeconfig) on the controller). Certificates and keys must be embedded (C(*-data)).
    type: dict
  namespace:
    description: With O(target=k8s), the namespace (default the app's name).
    type: str
"""
