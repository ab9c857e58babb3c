# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters the roles and playbooks use: placing components on a site's hosts, and a host's architecture."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

from ansible_collections.offline.delivery.plugins.module_utils.common.arch import debian_arch as _debian_arch


def app_placement(model, groups, app_hosts):
    """Component -> sorted list of the hosts that run it."""
    hosts = list(app_hosts)
    if not hosts:
        raise AnsibleFilterError("app_placement: no hosts run the application (check the compose and systemd groups)")
    placement = {}
    for name, comp in sorted(model["components"].items()):
        group = (comp.get("placement") or {}).get("group")
        if not group:
            placement[name] = sorted(hosts)
            continue
        if group not in groups:
            raise AnsibleFilterError("component %s is placed on inventory group %r, which the inventory does not "
                                     "have; add the group (with the hosts that should run %s)" % (name, group, name))
        chosen = sorted(h for h in groups[group] if h in hosts)
        if not chosen:
            raise AnsibleFilterError("component %s is placed on group %r, but none of its hosts (%s) runs the "
                                     "application here (%s)" % (name, group, ", ".join(groups[group]) or "none",
                                                                ", ".join(sorted(hosts))))
        placement[name] = chosen
    return placement


def site_hosts(hosts, hostvars, site):
    """The hosts among ``hosts`` that belong to ``site`` (host variable offline_delivery_site, default ``site``)."""
    return [h for h in hosts if (hostvars[h].get("offline_delivery_site") or "site") == site]


def host_addresses(hosts, hostvars):
    """Host name -> the address other hosts reach it at (its ansible_host, else its name)."""
    return {h: hostvars[h].get("ansible_host") or h for h in hosts}


def debian_arch(machine):
    """``amd64``/``arm64`` for a machine name (``ansible_facts.architecture``: x86_64, aarch64) or an alias;
    an empty string for an architecture the product does not support."""
    return _debian_arch(machine) or ""


class FilterModule:
    def filters(self):
        return {"app_placement": app_placement, "site_hosts": site_hosts, "host_addresses": host_addresses,
                "debian_arch": debian_arch}
