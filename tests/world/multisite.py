"""Several world sites driven from one controller: one site's jump host also joins the other sites' networks.

Every site network stays `--internal` (no way out); connecting the jump container to a second internal network
only lets that one controller reach both sites, as a delivery engineer's laptop on a hub link would. The merged
inventory prefixes host names with the site (`e2e-ma-node1`) and puts the site's identity into each site
group's vars: `offline_delivery_site` (which hosts form a site: their repo host, secrets and placement) and
`offline_delivery_repo_host` (the address the site's clients reach their repo at).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml

from .hostimages import WORLD_MOUNT
from .site import JUMP, Site, group_name, inventory
from .util import WorldError, docker, log

MERGED_INVENTORY = "multisite.yml"


def connect_jump(controller: Site, others: Sequence[Site]) -> None:
    """Attach `controller`'s jump host to each other site's internal network (idempotent)."""
    jump = controller.container(JUMP)
    for other in others:
        if _attached(jump, other.network):
            continue
        docker("network", "connect", other.network, jump, timeout=60).check(
            f"connecting {jump} to the network {other.network} of site {other.name}")


def disconnect_jump(controller: Site, others: Sequence[Site]) -> None:
    """Detach the jump host again, so each site can be taken down on its own (a network with an endpoint
    of another site cannot be removed). Missing containers or networks are fine: this runs in teardown."""
    jump = controller.container(JUMP)
    for other in others:
        if _attached(jump, other.network):
            res = docker("network", "disconnect", "-f", other.network, jump, timeout=60)
            if res.rc != 0:
                log(f"could not disconnect {jump} from {other.network}: {res.output.strip()}")


def _attached(container: str, network: str) -> bool:
    res = docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", container, timeout=30)
    return res.rc == 0 and f'"{network}"' in res.stdout


def site_label(site: Site) -> str:
    """The value of `offline_delivery_site` for a world site: its inventory group name."""
    return group_name(site.name)


def merged_inventory(sites: Sequence[Site], local: bool = False) -> dict:
    """One inventory holding every site (host names `<site>-<host>`): key paths as a jump host sees them, or
    with `local` as this machine does (it reaches the internal networks' IPs too, e.g. for ansible-runner)."""
    keys = {s.name: str(s.key_path) if local else f"{WORLD_MOUNT}/{s.name}/{s.key_path.name}" for s in sites}
    doc = inventory(list(sites), keys, prefix_hosts=True)
    children = doc["all"]["children"]
    for site in sites:
        repos = [h for h in site.info()["hosts"] if "offline_repo" in h["groups"]]
        if len(repos) != 1:
            raise WorldError(f"site {site.name}: a merged inventory needs exactly one offline_repo host, "
                             f"found {[h['name'] for h in repos]}")
        children[group_name(site.name)]["vars"].update({
            "offline_delivery_site": site_label(site),
            "offline_delivery_repo_host": repos[0]["ip"],
        })
    return doc


def write_merged_inventory(controller: Site, sites: Sequence[Site]) -> str:
    """Write the merged inventory into the controller site's state dir; return its path in the jump host."""
    path: Path = controller.state_dir / MERGED_INVENTORY
    path.write_text(yaml.safe_dump(merged_inventory(sites), sort_keys=False))
    return f"{WORLD_MOUNT}/{controller.name}/{MERGED_INVENTORY}"
