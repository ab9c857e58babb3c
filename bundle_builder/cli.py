"""``bundle-builder``: keygen, fingerprint, from-compose, build, inspect, verify, sbom, diff, fleet, jumpkit.

Exit codes: the one contract of both commands (README.md, "Exit codes"), kept by
``offline_delivery_common.exits.run_command``: 0 ok; 1 a check failed (bad signature, damaged blob, a refused
status file, ...); 2 bad usage or input (argparse's own code: bad or missing arguments, a named file that is
missing or cannot be used); 130 interrupted.
With ``--json`` stdout holds only the JSON document; progress and messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from offline_delivery_core.bundle import format as bundle_format
from offline_delivery_core.bundle import ed25519
from offline_delivery_core.bundle import trust
from offline_delivery_core.bundle.format import BundleError
from offline_delivery_common.exits import EXIT_FAILED, EXIT_OK, UsageError, run_command

from .progress import human_size, make_progress

# build/signing (cryptography, docker, PyYAML) are imported by the commands that need them: verify and
# inspect then start fast, which matters for their throughput on small bundles.


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _err(message: str) -> None:
    sys.stderr.write(message.rstrip("\n") + "\n")


def _need_bundle(path: str) -> None:
    """Bad input (exit 2) when nothing bundle-like is at ``path``."""
    try:
        bundle_format.resolve_bundle_path(path)
    except BundleError as exc:
        raise UsageError(str(exc)) from None


# ----------------------------------------------------------------------------------------------------------
# keygen / from-compose


def cmd_keygen(args: argparse.Namespace) -> int:
    from . import signing

    try:
        key, pub = signing.keygen(args.prefix)
    except (signing.SigningError, OSError) as exc:
        raise UsageError(str(exc)) from None
    _err(f"wrote {key} (private, mode 0600: keep it secret) and {pub} (give this one to the sites)")
    print(f"fingerprint {trust.fingerprint(_load_pubs([str(pub)])[0])}  (sites pin it in offline_delivery_vendor_keys; "
          "tell it to them over a channel other than the media)")
    return EXIT_OK


def cmd_fingerprint(args: argparse.Namespace) -> int:
    """What a site pins: read it to the site's engineer over the phone, they compare it with the key on the media."""
    for path, raw in zip(args.pub, _load_pubs(args.pub)):
        print(f"{trust.fingerprint(raw)}  {path}")
    return EXIT_OK


def cmd_from_compose(args: argparse.Namespace) -> int:
    import yaml

    from offline_delivery_common.inputs import read_yaml

    from . import compose

    path = Path(args.file)
    data = read_yaml(path)
    try:
        model, report = compose.from_compose(data, name=args.name, version=args.version,
                                             base_dir=path.resolve().parent)
    except ValueError as exc:  # ModelError is a ValueError
        raise UsageError(f"{path}: {exc}") from None
    for line in report:
        _err(line)
    text = yaml.safe_dump(model, sort_keys=False)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        _err(f"wrote {args.output}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------
# build


def _comma_list(values: list[str]) -> list[str]:
    """Repeatable options that also take comma-separated values."""
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def _platform_list(values: list[str]) -> list[str]:
    return _comma_list(values) or ["linux/amd64"]


def _load_pubs(paths: list[str] | None) -> list[bytes]:
    """Raw Ed25519 public keys from PEM files (the stdlib reader the sites use)."""
    try:
        return ed25519.load_public_key_files(paths or [])
    except ed25519.Ed25519KeyError as exc:
        raise UsageError(str(exc)) from None


def cmd_build(args: argparse.Namespace) -> int:
    from . import build, signing
    from .sbom import default_cache_dir as sbom_cache_dir

    if not args.sign_key and not args.unsigned:
        raise UsageError("give --sign-key KEY (from 'bundle-builder keygen'), or --unsigned to build without a signature")
    if args.sign_key and args.unsigned:
        raise UsageError("--sign-key and --unsigned exclude each other")
    base_pub = _load_pubs(args.base_pub) if args.base_pub else None
    have_pub = _load_pubs(args.have_pub) if args.have_pub else None
    out = Path(args.output)
    made = [d for d in (out, *out.parents) if not d.exists()]
    out.mkdir(parents=True, exist_ok=True)
    try:
        # the same build_bundle as the bundle_export module: every check of the inputs (the have-file's site
        # signature too) is made there, not here
        result = build.build_bundle(
            args.model, out, image_sources=args.images_from or [], platforms=_platform_list(args.platform),
            sign_key=None if args.unsigned else args.sign_key, base=args.base, have=args.have,
            volume_size=args.volume_size, progress=make_progress(args.json), base_pub=base_pub,
            have_pub=have_pub, packages=args.packages,
            package_profiles=_comma_list(args.package_profiles) or None, files=args.file,
            compression=build.Compression(args.compress, args.compress_level, args.compress_threads),
            scan_cache=sbom_cache_dir())
    except (build.BuildError, signing.SigningError) as exc:
        for d in made:  # a refused build leaves no empty output directory behind
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise UsageError(str(exc)) from None
    if args.json:
        _print_json(result.to_json())
        return EXIT_OK
    signed = f"signed by key {result.signed_keyid[:16]}…" if result.signed_keyid else "UNSIGNED"
    packed = result.compression
    if packed.get("blobs"):
        signed += f"; {packed['blobs']} blobs ({human_size(packed['bytes'])}) zstd-compressed, level {packed['level']}"
    _err(f"built {result.path} ({human_size(result.size)}{f', {result.parts} parts' if result.parts else ''}, {signed})")
    _err(f"  manifest {result.manifest_digest}")
    _err(f"  {result.blobs_bundled} of {result.blobs_total} blobs carried ({human_size(result.bytes_bundled)} of "
         f"{human_size(result.bytes_total)}); {len(result.omitted)} omitted by the delta "
         f"({human_size(result.omitted_bytes)})")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------
# inspect


def _summary(path: str, head: bundle_format.BundleHead) -> dict[str, Any]:
    summary = bundle_format.summarize_manifest(head.manifest)
    summary.update(path=path, manifest_digest=head.manifest_digest, signed=head.signature is not None,
                   keyid=head.keyid)
    return summary


def _delta_text(delta: dict[str, Any] | None) -> str:
    if delta is None:
        return "none (a full bundle)"
    if "base" in delta:
        b = delta["base"]
        return f"against base {b.get('name')} {b.get('version')} (manifest {b['manifest']})"
    h = delta["have"]
    return f"against have-file {h.get('file', '?')} ({h.get('blobs', '?')} digests, {h['digest']})"


def cmd_inspect(args: argparse.Namespace) -> int:
    _need_bundle(args.bundle)
    head = bundle_format.read_head(args.bundle)
    summary = _summary(args.bundle, head)
    if args.json:
        _print_json({**summary, "manifest": head.manifest})
        return EXIT_OK
    lines = [
        f"bundle:     {args.bundle}",
        f"release:    {summary['name']} {summary['version']}",
        f"builder:    {summary['builder']['name']} {summary['builder']['version']}",
        f"platforms:  {', '.join(summary['platforms'])}",
        f"manifest:   {summary['manifest_digest']}",
        "signature:  " + (f"ed25519, key {summary['keyid']} (not checked here: use 'verify --pub')"
                          if summary["signed"] else "none (unsigned bundle)"),
        f"delta:      {_delta_text(summary['delta'])}",
        f"blobs:      {summary['blobs']} ({human_size(summary['bytes'])}); carried {summary['bundled_blobs']} "
        f"({human_size(summary['bundled_bytes'])}); omitted {summary['omitted_blobs']} "
        f"({human_size(summary['omitted_bytes'])})",
        "components:",
    ]
    for comp, image in sorted(summary["images"].items()):
        lines.append(f"  {comp}: {image['reference']} (index {image['index']})")
        for plat, digest in sorted(image["manifests"].items()):
            lines.append(f"    {plat}: {digest}")
    lines.append("packages:" + ("" if summary["packages"] else "   none"))
    for key, pset in summary["packages"].items():
        lines.append(f"  {key}: {pset['files']} files ({human_size(pset['bytes'])}), profiles "
                     f"{', '.join(pset['profiles'])}")
    lines.append("files:" + ("" if summary["files"] else "      none"))
    for key, f in summary["files"].items():
        lines.append(f"  {key}: {f['name']} {f['version']} ({human_size(f['size'])}, mode {f['mode']}) {f['digest']}")
    sbom = summary["sbom"]
    lines.append("sbom:       " + (f"CycloneDX JSON, {human_size(sbom['size'])}, {sbom['digest']} ('bundle-builder sbom' "
                                   "writes it)" if sbom else "none (built before bundles carried one)"))
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------
# verify


def _verify_keys(args: argparse.Namespace) -> list[bytes] | None:
    """``--pub`` keys (None with ``--integrity-only``) of verify and sbom; the bundle must exist."""
    if not args.pub and not args.integrity_only:
        raise UsageError("give --pub KEY (the vendor's public key), or --integrity-only to check the blobs "
                         "without trusting any signature")
    keys = _load_pubs(args.pub) if args.pub else None
    _need_bundle(args.bundle)
    return keys


def cmd_verify(args: argparse.Namespace) -> int:
    keys = _verify_keys(args)
    progress = make_progress(args.json)
    try:
        if args.media:
            bundle_format.check_media(args.bundle)
        result = bundle_format.verify_bundle(
            args.bundle, keys,
            progress=(lambda done, total: progress(done, total, "verifying")) if progress else None)
    except BundleError as exc:
        if args.json:
            _print_json({"ok": False, "bundle": args.bundle, "error": exc.reason, "member": exc.member,
                         "offset": exc.offset})
        else:
            _err(f"FAILED: {args.bundle}: {exc.reason}")
            if exc.member is not None:
                _err(f"  member: {exc.member}")
            if exc.offset is not None:
                _err(f"  offset: {exc.offset}")
        return EXIT_FAILED
    m = result.manifest
    doc = {"ok": True, "bundle": args.bundle, "name": m["name"], "version": m["version"],
           "manifest_digest": result.manifest_digest, "signed": result.signed, "keyid": result.keyid,
           "signature_checked": result.signature_checked, "blobs_checked": result.blobs_checked,
           "bytes_checked": result.bytes_checked, "bytes_stored": result.bytes_stored,
           "format": m["schemaVersion"], "blobs_omitted": result.blobs_omitted,
           "bytes_omitted": result.bytes_omitted, "delta": m["delta"]}
    if args.json:
        _print_json(doc)
        return EXIT_OK
    sig = (f"signature OK (key {result.keyid})" if result.signature_checked
           else "signature NOT checked (--integrity-only)")
    sys.stdout.write(f"OK: {m['name']} {m['version']}: {sig}; {result.blobs_checked} blobs "
                     f"({human_size(result.bytes_checked)}) re-hashed")
    if result.blobs_omitted:
        sys.stdout.write(f"; {result.blobs_omitted} blobs ({human_size(result.bytes_omitted)}) omitted, "
                         f"delta {_delta_text(m['delta'])}")
    sys.stdout.write("\n")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------
# sbom


def cmd_sbom(args: argparse.Namespace) -> int:
    """The release's SBOM, written only once the whole bundle verified (the same check as ``verify``)."""
    keys = _verify_keys(args)
    result = bundle_format.verify_bundle(args.bundle, keys)
    desc = bundle_format.sbom_descriptor(result.manifest)
    if desc is None:
        raise BundleError(f"{result.manifest['name']} {result.manifest['version']} carries no SBOM: it was built "
                          "before bundles carried one; rebuild it with this bundle-builder")
    # read again, checked against the digest of the manifest just verified: the same bytes or an error
    sbom = bundle_format.read_blob(args.bundle, desc["digest"])
    if args.output == "-":
        sys.stdout.buffer.write(sbom)  # the blob's exact bytes: sha256sum gives the manifest's digest
        sys.stdout.buffer.flush()
    else:
        Path(args.output).write_bytes(sbom)
        _err(f"wrote {args.output} (CycloneDX, {human_size(len(sbom))}; {result.manifest['name']} "
             f"{result.manifest['version']}, signature {'OK' if result.signature_checked else 'NOT checked'})")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------
# diff


def _model_of(path: str, head: bundle_format.BundleHead) -> dict[str, Any]:
    data = bundle_format.read_blob(path, head.manifest["model"]["digest"])
    return json.loads(data)


def bundle_diff(old_path: str, new_path: str) -> dict[str, Any]:
    """Components added/removed/changed/unchanged (by config and by image digest per platform) and what a
    delta of NEW against OLD would carry."""
    from offline_delivery_core.app import model as app_model

    old_head, new_head = bundle_format.read_head(old_path), bundle_format.read_head(new_path)
    result = app_model.diff_models(_model_of(old_path, old_head), _model_of(new_path, new_head))
    old_images, new_images = old_head.manifest["images"], new_head.manifest["images"]
    image_changes: dict[str, dict[str, dict[str, str | None]]] = {}
    for comp in sorted(set(old_images) & set(new_images)):
        old_m, new_m = old_images[comp]["manifests"], new_images[comp]["manifests"]
        per = {p: {"old": old_m.get(p), "new": new_m.get(p)} for p in sorted(set(old_m) | set(new_m))
               if old_m.get(p) != new_m.get(p)}
        if per:
            image_changes[comp] = per
            fields = result["changed"].setdefault(comp, [])
            fields.extend(f"image@{p}" for p in per if f"image@{p}" not in fields)
    result["unchanged"] = sorted(c for c in result["unchanged"] if c not in result["changed"])
    result["images"] = image_changes
    result["files"] = files_diff(old_head.manifest.get("files", {}), new_head.manifest.get("files", {}))
    old_digests = {b["digest"] for b in old_head.manifest["blobs"]}
    always = {new_head.manifest["model"]["digest"]}  # a delta always carries the model and the SBOM
    always |= {b["digest"] for b in new_head.manifest["blobs"] if bundle_format.SBOM_USED_BY in b["usedBy"]}
    carried = [b for b in new_head.manifest["blobs"] if b["digest"] not in old_digests or b["digest"] in always]
    result["delta"] = {"blobs": len(carried), "bytes": sum(b["size"] for b in carried),
                       "full_blobs": len(new_head.manifest["blobs"]),
                       "full_bytes": sum(b["size"] for b in new_head.manifest["blobs"])}
    result["old"] = {"name": old_head.manifest["name"], "version": old_head.manifest["version"],
                     "manifest_digest": old_head.manifest_digest}
    result["new"] = {"name": new_head.manifest["name"], "version": new_head.manifest["version"],
                     "manifest_digest": new_head.manifest_digest}
    return result


def files_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Carried files (``<name>/<arch>``) added, removed and changed (version or bytes) between two manifests."""
    def short(entry: dict[str, Any]) -> dict[str, Any]:
        return {k: entry[k] for k in ("version", "digest", "size")}

    return {"added": {k: short(new[k]) for k in sorted(set(new) - set(old))},
            "removed": {k: short(old[k]) for k in sorted(set(old) - set(new))},
            "changed": {k: {"old": short(old[k]), "new": short(new[k])} for k in sorted(set(old) & set(new))
                        if short(old[k]) != short(new[k])}}


def _files_lines(files: dict[str, Any]) -> list[str]:
    lines = [f"file {k}: added {v['version']} ({v['digest']})" for k, v in files["added"].items()]
    lines += [f"file {k}: removed {v['version']} ({v['digest']})" for k, v in files["removed"].items()]
    lines += [f"file {k}: {c['old']['version']} -> {c['new']['version']} ({c['old']['digest']} -> {c['new']['digest']})"
              for k, c in files["changed"].items()]
    return lines


def cmd_diff(args: argparse.Namespace) -> int:
    _need_bundle(args.old)
    _need_bundle(args.new)
    d = bundle_diff(args.old, args.new)
    if args.json:
        _print_json(d)
        return EXIT_OK
    lines = [f"{d['old']['name']} {d['old']['version']} -> {d['new']['name']} {d['new']['version']}",
             f"added:     {', '.join(d['added']) or '-'}",
             f"removed:   {', '.join(d['removed']) or '-'}",
             "changed:   " + ("; ".join(f"{c} ({', '.join(f)})" for c, f in sorted(d["changed"].items())) or "-"),
             f"unchanged: {', '.join(d['unchanged']) or '-'}"]
    for comp, env in sorted(d.get("env_defaults", {}).items()):
        for key, change in sorted(env.items()):
            lines.append(f"env default {comp}.{key}: {change.get('old')!r} -> {change.get('new')!r}")
    for comp, per in sorted(d["images"].items()):
        for plat, change in per.items():
            lines.append(f"image {comp} {plat}: {change['old']} -> {change['new']}")
    lines.extend(_files_lines(d["files"]))
    lines.append(f"a delta of the new bundle against the old carries {d['delta']['blobs']} blobs, "
                 f"{human_size(d['delta']['bytes'])} (full bundle: {d['delta']['full_blobs']} blobs, "
                 f"{human_size(d['delta']['full_bytes'])})")
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------
# Parser and entry point


# ----------------------------------------------------------------------------------------------------------
# fleet


def cmd_fleet(args: argparse.Namespace) -> int:
    """Sites' signed status reports -> the fleet table; exit 1 when a file was refused (it is not shown)."""
    from offline_delivery_common import fleet_table

    try:
        keys = fleet_table.load_site_keys(args.site_keys)
        report = fleet_table.fleet(args.status, keys, latest=args.latest or [])
    except fleet_table.FleetError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        _print_json(report.as_dict())
    else:
        sys.stdout.write(fleet_table.format_table(report.rows))
    for old, newer in report.superseded:
        _err(f"note: {old} is an older report of the same site as {newer}; not shown")
    for path, why in report.refused:
        _err(f"REFUSED {path}: {why}")
    return EXIT_FAILED if report.refused else EXIT_OK


def cmd_jumpkit(args: argparse.Namespace) -> int:
    from . import jumpkit, signing

    out = Path(args.output)
    try:
        manifest = jumpkit.write_kit(out, Path(args.key), args.python, args.arch)
    except (jumpkit.KitError, signing.SigningError) as exc:
        raise UsageError(str(exc)) from None
    for line in jumpkit.summary(manifest, out):
        _err(line)
    pub = ed25519.load_public_key_pem((out / jumpkit.PUBLIC_KEY).read_bytes())
    print(f"on the jump host: python3 {out.name}/{jumpkit.INSTALLER} --pin {trust.fingerprint(pub)}")
    return EXIT_OK


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bundle-builder", description="Build, inspect and verify offline delivery bundles.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("keygen", help="make an ed25519 key pair: PREFIX.key (0600) and PREFIX.pub")
    s.add_argument("prefix")
    s.set_defaults(func=cmd_keygen)

    s = sub.add_parser("fingerprint", help="print the fingerprint of public keys (what a site pins)")
    s.add_argument("pub", nargs="+", help="public key files (PEM)")
    s.set_defaults(func=cmd_fingerprint)

    s = sub.add_parser("from-compose", help="convert a docker-compose file into an app model (app.yml)")
    s.add_argument("file")
    s.add_argument("--name", required=True)
    s.add_argument("--version", required=True)
    s.add_argument("-o", "--output", required=True, help="app.yml to write ('-' for stdout)")
    s.set_defaults(func=cmd_from_compose)

    s = sub.add_parser("build", help="build <name>-<version>.bundle from app.yml and images")
    s.add_argument("model", help="app.yml")
    s.add_argument("-o", "--output", required=True, help="output directory")
    s.add_argument("--images-from", action="append", metavar="SOURCE",
                   help="docker | archive:PATH (docker save tar) | oci:PATH (OCI layout); repeatable, searched in order")
    s.add_argument("--platform", action="append", default=[], help="e.g. linux/amd64,linux/arm64 (default linux/amd64)")
    s.add_argument("--sign-key", help="ed25519 private key (PEM, from 'keygen')")
    s.add_argument("--unsigned", action="store_true", help="build without a signature")
    s.add_argument("--base", help="previous bundle: omit the blobs it holds (delta)")
    s.add_argument("--base-pub", action="append", help="check the --base bundle's signature with this public key")
    s.add_argument("--have", help='have-file {"blobs": ["sha256:..."]}: omit the blobs a site holds (delta)')
    s.add_argument("--have-pub", action="append", help="check the --have file's site signature with this "
                   "(pinned) site public key, <site>.have.pub from the offline.delivery.have playbook")
    s.add_argument("--volume-size", help="split into parts of this size (e.g. 4G, 700M)")
    s.add_argument("--packages", action="append", default=[], metavar="DISTRO",
                   help="carry the OS packages site hosts need for this distro release, for every --platform "
                        "architecture (e.g. debian-12; repeatable; see docs/packages.md)")
    s.add_argument("--package-profiles", action="append", default=[], metavar="P1,P2",
                   help="which package profiles (base, compose, repo, systemd; default: all of the distro's)")
    s.add_argument("--file", action="append", default=[], metavar="NAME[@VERSION]/ARCH=PATH",
                   help="carry a binary for the site's file tree (http://<repo>:8080/files/NAME/VERSION/ARCH/NAME), "
                        "e.g. k3s@v1.30.2+k3s1/amd64=./k3s; ARCH is one of the --platform architectures, VERSION "
                        "defaults to the release's version; repeatable (see docs/k3s.md)")
    s.add_argument("--compress", choices=["zstd", "none"], default="zstd",
                   help="how blobs travel: zstd (default; each blob whose sample shrinks, content addresses "
                        "unchanged) or none (format 1, faster to build, bigger)")
    s.add_argument("--compress-level", type=int, default=3, metavar="N", help="zstd level 1-19 (default 3)")
    s.add_argument("--compress-threads", type=int, default=0, metavar="N",
                   help="zstd worker threads (default 0: one per CPU; the bundle's bytes are the same for any N)")
    s.add_argument("--json", action="store_true", help="print a JSON summary on stdout, no progress")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("inspect", help="show a bundle's manifest summary (no verification)")
    s.add_argument("bundle", help="bundle file, its .parts.json or first part")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_inspect)

    for command, func, what in (("verify", cmd_verify, "check the signature and re-hash every blob"),
                                ("sbom", cmd_sbom, "verify a bundle, then write its SBOM (CycloneDX 1.5 JSON)")):
        s = sub.add_parser(command, help=what)
        s.add_argument("bundle", help="bundle file, its .parts.json or first part")
        s.add_argument("--pub", action="append", help="trusted public key (PEM); repeatable")
        s.add_argument("--integrity-only", action="store_true", help="check blobs without checking the signature")
        s.set_defaults(func=func)
    s = sub.choices["verify"]
    s.add_argument("--json", action="store_true")
    s.add_argument("--media", action="store_true", help="also check each part of a split bundle against the "
                   "sha256 in its parts.json first (a media check; the blob digests prove the content without it)")
    s = sub.choices["sbom"]
    s.add_argument("-o", "--output", default="-", help="file to write (default: stdout); its sha256 is the "
                   "SBOM blob's digest in the signed manifest")

    s = sub.add_parser("diff", help="what changed between two bundles, and the size of a delta")
    s.add_argument("old")
    s.add_argument("new")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_diff)

    s = sub.add_parser("fleet", help="read sites' signed status reports and print the fleet table")
    s.add_argument("status", nargs="+", metavar="STATUS", help="<site>.status.json from the offline.delivery."
                   "site_status playbook")
    s.add_argument("--site-keys", required=True, metavar="DIR", help="directory of the pinned site public keys, "
                   "<site>.pub (or <site>.have.pub / <site>.status.pub); a file signed otherwise is refused")
    s.add_argument("--latest", action="append", metavar="[APP=]VERSION", help="the version sites should run "
                   "(default: the newest any file names); repeatable")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_fleet)

    s = sub.add_parser("jumpkit", help="write the signed kit a bare Debian jump host installs ansible-core, the "
                       "collection and offline-delivery from (docs/jump-host.md)")
    s.add_argument("output", help="new directory to write the kit to")
    s.add_argument("--python", action="append", default=[], metavar="3.X", help="a jump host Python (Debian 12: "
                   "3.11, Debian 13: 3.13); repeatable")
    s.add_argument("--arch", action="append", default=[], choices=["amd64", "arm64"], help="repeatable")
    s.add_argument("--key", required=True, help="ed25519 private key (PEM, from 'keygen') that signs the kit")
    s.set_defaults(func=cmd_jumpkit)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)  # exits 2 on bad usage
    # a damaged bundle found while inspecting or diffing it is a failed check (1), not bad usage
    return run_command(f"bundle-builder {args.command}", lambda: args.func(args), failures=(BundleError,))


if __name__ == "__main__":
    sys.exit(main())
