"""CLI of the test world: `python -m tests.world up|down|status|inventory|exec|build|prepare|pin|fresh-check|env|collections|prune`.

Exit codes: 0 ok, 1 a step failed (the message says which and what to do), 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from .ansible_cores import NEWEST_JUMP_SUITE
from .hostimages import current_image_tags, ensure_host_image, ensure_jump_image, remove_stale_images
from .extra_collections import DEFAULT_COLLECTIONS, ensure_collections
from .rootfs import DEFAULT_SUITE, RootfsRecipe
from .site import DEFAULT_HOSTS, JUMP, HostSpec, Site, inventory, sites_present, status
from .util import WorldError, state_root

DEFAULT_SITE = os.environ.get("OD_WORLD_SITE", "dev")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.world", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="build (cached) images and start a site")
    up.add_argument("site", nargs="?", default=DEFAULT_SITE)
    up.add_argument("--host", action="append", dest="hosts", metavar="NAME[:ARCH[:G1+G2]]",
                    help="a target host (repeatable); default: "
                         + ", ".join(f"{h.name}:{h.arch}:{'+'.join(h.groups)}" for h in DEFAULT_HOSTS))
    up.add_argument("--suite", default=DEFAULT_SUITE, help="Debian suite of the hosts (default %(default)s)")
    up.add_argument("--keep-on-failure", action="store_true", help="leave a failed site for debugging")
    up.add_argument("--json", action="store_true", help="print site.json")

    down = sub.add_parser("down", help="remove a site (containers, volumes, network, state)")
    down.add_argument("sites", nargs="*", default=[])
    down.add_argument("--all", action="store_true", help="every site on this engine")

    st = sub.add_parser("status", help="containers of a site (or of all sites) and their systemd state")
    st.add_argument("site", nargs="?")
    st.add_argument("--json", action="store_true")

    inv = sub.add_parser("inventory", help="print the inventory of one site, or of several merged")
    inv.add_argument("sites", nargs="+")
    inv.add_argument("--local", action="store_true", help="key paths for this machine instead of the jump host")

    ex = sub.add_parser("exec", help="run a command in the jump host (default) or a target host")
    ex.add_argument("site")
    ex.add_argument("--host", default=JUMP)
    ex.add_argument("--timeout", type=float, default=3600)
    ex.add_argument("command", nargs="*", help="the command, after -- (e.g. exec dev -- ansible all -m ping)")

    build = sub.add_parser("build", help="build (or reuse) the host and jump images only")
    build.add_argument("--arch", default="amd64,arm64")
    build.add_argument("--suite", default=DEFAULT_SUITE)

    prep = sub.add_parser("prepare", help="build (or reuse) everything the test suites use, each step timed: host "
                                          "and jump images, the shop's and poll's images, collections, the k8s cluster's "
                                          "programs and node image (scripts/test runs it before the suites)")
    prep.add_argument("--suite", default=DEFAULT_SUITE)

    pin = sub.add_parser("pin", help="pin a vendor key in a site's inventory (group_vars), as its engineer does after "
                                      "comparing the fingerprint out of band; prints the fingerprint")
    pin.add_argument("site")
    pin.add_argument("pub", type=Path, help="the vendor's public key file")
    pin.add_argument("--apps", default="*", help="comma-separated applications it may sign (default: any)")

    fresh = sub.add_parser("fresh-check", help="scripts/bootstrap's packages + smoke steps in a pristine Debian 12 "
                                               "root filesystem (tests/world/fresh.py)")
    fresh.add_argument("--bootstrap", type=Path, help="another bootstrap script to try (default: scripts/bootstrap)")

    env = sub.add_parser("env", help="print OD_WORLD_IMAGE_<ARCH>=tag lines (building if needed), e.g. for molecule")
    env.add_argument("--arch", default="amd64,arm64")
    env.add_argument("--suite", default=DEFAULT_SUITE)

    colls = sub.add_parser("collections", help="print a collections path with community.docker and ansible.posix "
                                               "(from the `ansible` wheel on PyPI; Galaxy is unreachable)")
    colls.add_argument("names", nargs="*", default=list(DEFAULT_COLLECTIONS))

    prune = sub.add_parser("prune", help="remove od-world images of older recipes")
    prune.add_argument("--suite", action="append", default=[], help="suites whose current images to keep")
    return p


def _cmd_up(args: argparse.Namespace) -> int:
    hosts = [HostSpec.parse(h) for h in args.hosts] if args.hosts else list(DEFAULT_HOSTS)
    info = Site(args.site, hosts, suite=args.suite).up(keep_on_failure=args.keep_on_failure)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        site = Site(args.site, hosts)
        for host in info["hosts"]:
            print(f"{host['name']:<10} {host['arch']:<6} {host['ip']:<16} {','.join(host['groups'])}")
        print(f"inventory: {site.inventory_path} (jump host) / {site.local_inventory_path} (this machine)")
        print(f"try: python -m tests.world exec {args.site} -- ansible all -m ansible.builtin.ping")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    names = sites_present() if args.all else (args.sites or [DEFAULT_SITE])
    if args.all and state_root().exists():
        names = sorted(set(names) | {p.name for p in state_root().iterdir() if p.is_dir()})
    for name in names:
        for item in Site(name, hosts=()).down():
            print(f"{name}: removed {item}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    names = [args.site] if args.site else sites_present()
    report = {name: status(name) for name in names}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not names:
        print("no site is up")
    for name, rows in report.items():
        print(f"site {name}:")
        for r in rows:
            print(f"  {r['host']:<10} {r['arch']:<6} {r['state']:<10} systemd={r['systemd']:<10} {r['container']}")
    return 0


def _cmd_inventory(args: argparse.Namespace) -> int:
    sites = [Site.load(n) for n in args.sites]
    if args.local:
        keys = {s.name: str(s.key_path) for s in sites}
    else:
        keys = {s.name: f"/root/world/{s.name}/{s.key_path.name}" for s in sites}
    print(yaml.safe_dump(inventory(sites, keys, prefix_hosts=len(sites) > 1), sort_keys=False), end="")
    return 0


def _cmd_exec(args: argparse.Namespace) -> int:
    command = args.command
    if not command:
        raise WorldError("exec: give the command after --, e.g. exec dev -- ansible all -m ping")
    result = Site.load(args.site).exec(args.host, command, timeout=args.timeout)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.rc


def _cmd_build(args: argparse.Namespace) -> int:
    for arch in args.arch.split(","):
        image = ensure_host_image(RootfsRecipe(arch=arch, suite=args.suite))
        print(image.tag)
        if arch == "amd64":
            print(ensure_jump_image(image))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    """The slow, cached builds, outside any test's timeout; a warm cache makes each step a look-up."""
    from . import awx_path, shop_images
    from .k8s.cluster import ensure_artifacts, ensure_node_image

    steps = (
        ("host images amd64 + arm64 and the jump image",
         lambda: _cmd_build(argparse.Namespace(arch="amd64,arm64", suite=args.suite))),
        (f"the {NEWEST_JUMP_SUITE} jump image (the newest claimed ansible-core; the parity flow's)",
         lambda: _cmd_build(argparse.Namespace(arch="amd64", suite=NEWEST_JUMP_SUITE))),
        ("the shop's images amd64 + arm64", lambda: shop_images.build_all(shop_images.ARCHES)),
        ("the poll app's images amd64 + arm64 (the shop's base and package layers)",
         lambda: shop_images.build_all(shop_images.ARCHES, app="poll")),
        ("collections for the jump host", lambda: ensure_collections(tuple(DEFAULT_COLLECTIONS))),
        ("the k8s cluster's programs (from Go modules) and node image",
         lambda: print(ensure_node_image(ensure_artifacts(), args.suite))),
        ("the AWX path's receptor node image and execution environment (Debian 13)",
         lambda: print(ensure_host_image(awx_path.NODE_RECIPE).tag, awx_path.ensure_ee_image().archive)),
    )
    started = time.monotonic()
    for what, step in steps:
        print(f"prepare: {what} ...", flush=True)
        t0 = time.monotonic()
        step()
        print(f"prepare: {what}: done in {time.monotonic() - t0:.0f} s", flush=True)
    print(f"prepare: everything ready in {time.monotonic() - started:.0f} s", flush=True)
    return 0


def _cmd_pin(args: argparse.Namespace) -> int:
    print(Site.load(args.site).pin_vendor_key(args.pub, [a.strip() for a in args.apps.split(",") if a.strip()]))
    return 0


def _cmd_fresh_check(args: argparse.Namespace) -> int:
    from .fresh import fresh_check

    result = fresh_check(args.bootstrap)
    print(result.output, end="")
    print(f"fresh-machine check: {'ok' if result.ok else 'FAILED'} in {result.seconds:.0f} s")
    return 0 if result.ok else 1


def _cmd_env(args: argparse.Namespace) -> int:
    for arch in args.arch.split(","):
        image = ensure_host_image(RootfsRecipe(arch=arch, suite=args.suite))
        print(f"OD_WORLD_IMAGE_{arch.upper()}={image.tag}")
        if arch == "amd64":
            print(f"OD_WORLD_IMAGE_JUMP={ensure_jump_image(image)}")
    return 0


def _cmd_collections(args: argparse.Namespace) -> int:
    print(ensure_collections(tuple(args.names)))
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    for tag in remove_stale_images(keep=current_image_tags(tuple(args.suite or [DEFAULT_SUITE]))):
        print(f"removed {tag}")
    return 0


COMMANDS = {"up": _cmd_up, "down": _cmd_down, "status": _cmd_status, "inventory": _cmd_inventory,
            "exec": _cmd_exec, "build": _cmd_build, "prepare": _cmd_prepare, "pin": _cmd_pin, "fresh-check": _cmd_fresh_check,
            "env": _cmd_env, "collections": _cmd_collections,
            "prune": _cmd_prune}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` is a command for `exec`, options included (argparse would eat them).
    tail: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    if args.cmd == "exec":
        args.command = [*args.command, *tail]
    elif tail:
        _parser().error(f"`--` and a command are only for exec, got: {' '.join(tail)}")
    try:
        return COMMANDS[args.cmd](args)
    except WorldError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
