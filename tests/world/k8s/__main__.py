"""CLI: `python -m tests.world.k8s up|down|status SITE`, `build` (binaries and node image only).

Exit codes: 0 ok, 1 a step failed (the message says which and what to do), 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..rootfs import DEFAULT_SUITE
from ..util import WorldError
from .cluster import Cluster, ensure_artifacts, ensure_node_image


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.world.k8s", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, text in (("up", "start (or keep) the cluster in an existing site"),
                       ("down", "remove the cluster of a site (the site stays)"),
                       ("status", "print cluster.json and the nodes")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("site")
        if name == "up":
            cmd.add_argument("--keep-on-failure", action="store_true", help="leave a failed node for debugging")
    build = sub.add_parser("build", help="build (or reuse) the binaries and the node image")
    build.add_argument("--suite", default=DEFAULT_SUITE)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "build":
            print(ensure_node_image(ensure_artifacts(), args.suite))
        elif args.cmd == "up":
            info = Cluster(args.site).up(keep_on_failure=args.keep_on_failure)
            print(json.dumps(info, indent=2))
            print(f"try: KUBECONFIG={info['kubeconfig']} kubectl get nodes   "
                  f"(in the jump host: KUBECONFIG={info['jump_kubeconfig']})")
        elif args.cmd == "down":
            for item in Cluster(args.site).down():
                print(f"{args.site}: removed {item}")
        else:
            cluster = Cluster(args.site)
            print(json.dumps(cluster.info(), indent=2))
            res = cluster.kubectl("get", "nodes", "-o", "wide")
            print(res.output, end="")
            return 0 if res.rc == 0 else 1
    except WorldError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
