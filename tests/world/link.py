"""A link between two world sites: an `--internal` docker network of its own joining one host of each site
(e.g. a hub's repo host and a city's repo host), as a provincial hub's line to a city would.

Nothing else of either site changes: both site networks stay as the world builds them, the jump hosts are not
on the link, and the link has no way out. It carries its own label (`offline-delivery.world.link=<name>`),
not the site label, so taking a site down never trips over it; `remove` detaches its hosts and deletes it.
"""
from __future__ import annotations

from typing import Sequence

from .site import Site
from .util import LABEL, WorldError, docker, log

LINK_LABEL = f"{LABEL}.link"


class Link:
    """The network `od-<name>-link` between hosts of different sites."""

    def __init__(self, name: str, ends: Sequence[tuple[Site, str]]) -> None:
        self.name = name
        self.ends = list(ends)

    @property
    def network(self) -> str:
        return f"od-{self.name}-link"

    def up(self) -> dict[str, str]:
        """Create the network (replacing a leftover of a killed run) and attach every end; returns the IP of
        each end on the link, keyed `<site>-<host>`."""
        self.remove()
        docker("network", "create", "--internal", "--label", f"{LINK_LABEL}={self.name}", self.network,
               timeout=60).check(f"creating the link network {self.network}")
        try:
            for site, host in self.ends:
                docker("network", "connect", self.network, site.container(host), timeout=60).check(
                    f"connecting {site.container(host)} to the link {self.network}")
            return self.ips()
        except BaseException:
            self.remove()
            raise

    def ips(self) -> dict[str, str]:
        result: dict[str, str] = {}
        fmt = "{{(index .NetworkSettings.Networks \"%s\").IPAddress}}" % self.network
        for site, host in self.ends:
            out = docker("inspect", "--format", fmt, site.container(host), timeout=30)
            ip = out.check(f"reading the link IP of {site.container(host)}").stdout.strip()
            if not ip:
                raise WorldError(f"{site.container(host)} has no address on {self.network}")
            result[f"{site.name}-{host}"] = ip
        return result

    def remove(self) -> None:
        """Detach whatever is attached and delete the network; a missing network or container is fine."""
        ids = docker("network", "ls", "-q", "--filter", f"label={LINK_LABEL}={self.name}", timeout=60)
        for net in ids.check(f"listing the link network {self.network}").stdout.split():
            attached = docker("network", "inspect", "--format", "{{range .Containers}}{{.Name}} {{end}}", net,
                              timeout=30)
            for container in attached.stdout.split():
                docker("network", "disconnect", "-f", net, container, timeout=60)
            res = docker("network", "rm", net, timeout=60)
            if res.rc != 0:
                log(f"could not remove the link network {net}: {res.output.strip()}")
