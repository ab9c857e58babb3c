"""Install the offline.delivery jump-host kit from the media: ``python3 /media/kit/install.py --pin sha256:<hex>``.

Shipped in the kit as install.py (bundle_builder/jumpkit.py writes it); standard library only, no network. In
order, before anything is written: the kit's vendor key must have the pinned fingerprint (an unpinned key is
refused with its fingerprint printed, to compare with the vendor's over a channel you trust); kit.sig must be
that key's signature of kit.json (checked by the kit's ed25519.py, the collection's own verifier); every file
kit.json lists is copied to a private staging directory and must have its size and sha256. Then: a venv at
--prefix (``python3 -m venv --without-pip``: a bare Debian python3 has no ensurepip), the wheels for this host's
Python and architecture installed with the kit's own pip wheel (``--no-index``), the collection installed with
that venv's ansible-galaxy on --collections-path. A second run of the same kit changes nothing and says so; a
failed run leaves an earlier install as it was. docs/jump-host.md.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

KIT_FORMAT = "offline-delivery-jumpkit/1"
STAMP = "offline-delivery-kit.json"
EXIT_FAILED, EXIT_USAGE = 1, 2


class KitRefused(Exception):
    """The kit is not installed: the message names the file and what to do."""


def _kit_module(kit, name):
    """A module the kit carries from the collection: ed25519 (plugins/module_utils/bundle/ed25519.py, the
    signature check) or arch (plugins/module_utils/common/arch.py, the architecture names)."""
    sys.path.insert(0, kit)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _read(kit, name):
    path = os.path.join(kit, name)
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise KitRefused(f"{path}: cannot read ({exc.strerror}); is {kit} the jump-host kit?") from None


def verify(kit, pin):
    """The kit's manifest (a dict) once kit.sig is the pinned key's signature of kit.json."""
    ed25519 = _kit_module(kit, "ed25519")
    pub_path = os.path.join(kit, "vendor.pub")
    try:
        raw = ed25519.load_public_key_pem(_read(kit, "vendor.pub"), source=pub_path)
    except ed25519.Ed25519KeyError as exc:
        raise KitRefused(str(exc)) from None
    fingerprint = "sha256:" + ed25519.public_key_id(raw)
    if pin is None:
        raise KitRefused(f"{pub_path}: key {fingerprint} is not pinned. Compare this fingerprint with the vendor's "
                         "over a channel you trust (not these media), then run again with --pin " + fingerprint)
    if pin != fingerprint:
        raise KitRefused(f"{pub_path}: key {fingerprint} is not the pinned key {pin}: the kit was signed by "
                         "another key; refuse these media or get the right fingerprint from the vendor")
    data = _read(kit, "kit.json")
    sig_path = os.path.join(kit, "kit.sig")
    try:
        doc = json.loads(_read(kit, "kit.sig"))
        keyid, sig = doc["keyid"], base64.b64decode(doc["sig"], validate=True)
        ok = doc.get("alg") == "ed25519"
    except (ValueError, KeyError, TypeError):
        raise KitRefused(f"{sig_path}: not a signature document; the kit is damaged") from None
    if not ok or keyid != ed25519.public_key_id(raw) or not ed25519.verify(raw, data, sig):
        raise KitRefused(f"{sig_path}: not a signature of kit.json by the pinned key {pin}: kit.json or kit.sig was "
                         "modified after signing; refuse these media and get a fresh copy")
    manifest = json.loads(data)
    if manifest.get("format") != KIT_FORMAT:
        raise KitRefused(f"{os.path.join(kit, 'kit.json')}: format {manifest.get('format')!r}, this installer "
                         f"reads {KIT_FORMAT}")
    return manifest


def target_of(manifest, kit):
    """The kit's target for this host's Python and architecture."""
    python = "%d.%d" % sys.version_info[:2]
    arch = _kit_module(kit, "arch").debian_arch(platform.machine()) or platform.machine()
    for target in manifest["targets"]:
        if target["python"] == python and target["arch"] == arch:
            return target
    have = ", ".join(f"Python {t['python']} {t['arch']}" for t in manifest["targets"])
    raise KitRefused(f"{os.path.join(kit, 'kit.json')}: no wheels for Python {python} on {arch} in this kit "
                     f"(it has: {have}); ask the vendor for a kit built with --python {python} --arch {arch}")


def stage(kit, manifest, target, dest):
    """Copy the files this install uses into ``dest``, checking each one's size and sha256 on the way: pip and
    ansible-galaxy then read only checked bytes, whatever happens to the media meanwhile."""
    wanted = [f for f in manifest["files"]
              if f["path"].startswith(target["dir"] + "/") or f["path"] == manifest["collection"]["file"]]
    for entry in manifest["files"]:
        path = os.path.join(kit, entry["path"])
        if os.path.isabs(entry["path"]) or ".." in entry["path"].split("/"):
            raise KitRefused(f"{os.path.join(kit, 'kit.json')}: file path {entry['path']!r} leaves the kit")
        digest = hashlib.sha256()
        size = 0
        out = None
        if entry in wanted:
            os.makedirs(os.path.dirname(os.path.join(dest, entry["path"])), exist_ok=True)
            out = open(os.path.join(dest, entry["path"]), "wb")  # pylint: disable=consider-using-with
        try:
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):  # pylint: disable=cell-var-from-loop
                    digest.update(chunk)
                    size += len(chunk)
                    if out:
                        out.write(chunk)
        except OSError as exc:
            raise KitRefused(f"{path}: cannot read ({exc.strerror}); the media are incomplete") from None
        finally:
            if out:
                out.close()
        if size != entry["size"] or digest.hexdigest() != entry["sha256"]:
            raise KitRefused(f"{path}: size {size} sha256:{digest.hexdigest()} is not what the signed kit.json "
                             f"says (size {entry['size']} sha256:{entry['sha256']}): the file was damaged or "
                             "tampered with; nothing was installed")


def _run(argv, what):
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if proc.returncode != 0:
        raise KitRefused(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")


def install(staged, manifest, target, prefix, collections):
    """venv + wheels + collection; an earlier install at ``prefix`` is kept aside and put back on failure."""
    old = None
    if os.path.lexists(prefix):
        if not os.path.isfile(os.path.join(prefix, STAMP)):
            raise KitRefused(f"{prefix} exists and is not an install of this kit (no {STAMP}): choose another "
                             "--prefix, or remove it yourself; nothing was changed")
        old = prefix + ".previous"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(prefix, old)
    try:
        _run([sys.executable, "-m", "venv", "--without-pip", prefix], f"python3 -m venv --without-pip {prefix}")
        wheels = os.path.join(staged, target["dir"])
        python = os.path.join(prefix, "bin", "python")
        pip = os.path.join(wheels, target["pip"], "pip")  # a pip wheel runs as a zip: no ensurepip needed
        _run([python, pip, "install", "-q", "--no-index", "--no-cache-dir", "--disable-pip-version-check",
              "--find-links", wheels, *sorted(os.path.join(wheels, w) for w in os.listdir(wheels))],
             "pip install --no-index of the kit's wheels")
        _run([os.path.join(prefix, "bin", "ansible-galaxy"), "collection", "install", "--offline", "--force",
              "-p", collections, os.path.join(staged, manifest["collection"]["file"])],
             "ansible-galaxy collection install of the kit's collection")
    except BaseException:
        shutil.rmtree(prefix, ignore_errors=True)
        if old:
            os.rename(old, prefix)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="install.py", description="Install ansible-core, the offline.delivery "
                                "collection and the offline-delivery command from this kit (no network).")
    p.add_argument("--pin", help="the vendor key's fingerprint, sha256:<hex>, as the vendor told you out of band")
    p.add_argument("--prefix", default="/opt/offline-delivery", help="the venv (default /opt/offline-delivery)")
    p.add_argument("--collections-path", default="/usr/share/ansible/collections",
                   help="where the collection goes (default /usr/share/ansible/collections, on ansible's "
                        "default collections path)")
    args = p.parse_args(argv)
    kit = os.path.dirname(os.path.abspath(__file__))
    prefix = os.path.abspath(args.prefix)
    try:
        manifest = verify(kit, args.pin)
        target = target_of(manifest, kit)
        kit_sha = hashlib.sha256(_read(kit, "kit.json")).hexdigest()
        stamp_path = os.path.join(prefix, STAMP)
        collection_dir = os.path.join(args.collections_path, "ansible_collections", "offline", "delivery")
        try:
            with open(stamp_path, encoding="utf-8") as fh:
                stamp = json.load(fh)
        except (OSError, ValueError):
            stamp = {}
        if (stamp.get("kit_sha256") == kit_sha and stamp.get("collections_path") == args.collections_path
                and os.path.isfile(os.path.join(collection_dir, "MANIFEST.json"))):
            print(f"nothing to do: kit {manifest['version']} (kit.json sha256:{kit_sha}) is already installed "
                  f"in {prefix}")
        else:
            with tempfile.TemporaryDirectory(prefix="od-kit-") as staged:
                stage(kit, manifest, target, staged)
                install(staged, manifest, target, prefix, args.collections_path)
            with open(stamp_path, "w", encoding="utf-8") as fh:
                json.dump({"kit_sha256": kit_sha, "version": manifest["version"], "pin": args.pin,
                           "ansible_core": target["ansible_core"], "collections_path": args.collections_path},
                          fh, indent=1, sort_keys=True)
            print(f"installed: kit {manifest['version']}, ansible-core {target['ansible_core']} "
                  f"(Python {target['python']} {target['arch']}) in {prefix}, the collection offline.delivery in "
                  f"{collection_dir}")
    except KitRefused as exc:
        sys.stderr.write(f"REFUSED: {exc}\n")
        return EXIT_FAILED
    print(f"next: . {prefix}/bin/activate   (puts ansible-playbook and offline-delivery on PATH)\n"
          "then, with the site's inventory (docs/fleet.md), import the first bundle:\n"
          "  ansible-playbook -i inventory.yml offline.delivery.import "
          "-e offline_delivery_bundle_src=/media/<app>-<version>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
