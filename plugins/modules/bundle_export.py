#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: bundle_export
short_description: Build a signed offline.delivery bundle from an application model and its images
version_added: 0.1.0
description:
  - Builds C(<name>-<version>.bundle) (or its split parts) in O(dest) from an C(app.yml) and the images it
    names, exactly as C(bundle-builder build) does - it is the same code.
  - Idempotent by content - the bundle is built into a staging directory beside O(dest) and put in place
    only when its manifest digest (or the split into parts) differs from the bundle already there. The same
    inputs always give a byte-identical manifest.
  - Runs where the images are - usually the build host (C(delegate_to)) - and needs the C(offline-delivery)
    Python package there, the way docker modules need the docker SDK. It must be the collection's own version
    (C(pip install offline-delivery==<collection version>)); the module fails naming both versions otherwise.
  - Every check C(bundle-builder build) makes of its inputs is made here too, by the same code - the have-file
    and its site signature (O(have_pub)), OS package distros and profiles, carried files.
author:
  - offline.delivery developers (@offline-delivery)
extends_documentation_fragment:
  - offline.delivery.attributes
attributes:
  check_mode:
    support: full
    details: Builds into a staging directory to learn the manifest, then discards it.
  diff_mode:
    support: none
  idempotent:
    support: full
requirements:
  - offline-delivery (the Python package of this collection, provides bundle_builder), the same version as the collection
options:
  model:
    description: The application model (C(app.yml)).
    type: path
    required: true
  dest:
    description: Directory the bundle is written to. Created when missing.
    type: path
    required: true
  images_from:
    description:
      - Where to find the images - V(docker) (the local engine), V(archive:PATH) (a C(docker save) tar) or
        V(oci:PATH) (an OCI image layout). Searched in order for each image and platform.
    type: list
    elements: str
    required: true
  platforms:
    description: Platforms every image must be bundled for.
    type: list
    elements: str
    default: [linux/amd64]
  sign_key:
    description:
      - The vendor's ed25519 private key (PEM, from C(bundle-builder keygen)); must not be readable by group
        or others.
      - Required unless O(unsigned=true).
    type: path
  unsigned:
    description: Build without a signature. A site refuses such a bundle; for tests only.
    type: bool
    default: false
  base:
    description: A previous bundle of the release the site has; blobs it holds are left out (a delta).
    type: path
  base_pub:
    description: Public keys to check the signature of O(base) with.
    type: list
    elements: path
  have:
    description: 'A site''s have-file (C({"blobs": ["sha256:..."]})); blobs it lists are left out (a delta).'
    type: path
  have_pub:
    description:
      - The site's public keys, pinned by the vendor (C(<site>.have.pub) from the C(offline.delivery.have)
        playbook, confirmed with the site over another channel).
      - When given, the module refuses a O(have) file that carries no valid signature by one of them, naming
        the key that signed it or saying the list was modified after it was signed. Needs O(have).
      - Without it the have-file's signature is not checked, as with C(bundle-builder build) without C(--have-pub).
    type: list
    elements: path
    version_added: 0.2.0
  volume_size:
    description: Split the bundle into parts of this size (for example V(4G), V(700M)).
    type: str
  compress:
    description:
      - How blobs travel, as C(bundle-builder build --compress). V(zstd) compresses each blob whose sample
        shrinks (format 2; content addresses unchanged, the site stores blobs uncompressed); V(none) writes
        format 1 (faster to build, bigger, readable by collections before format 2).
    type: str
    choices: [zstd, none]
    default: zstd
    version_added: 0.2.0
  compress_level:
    description: zstd level, 1-19.
    type: int
    default: 3
    version_added: 0.2.0
  compress_threads:
    description: zstd worker threads; V(0) is one per CPU. The bundle's bytes are the same for any count.
    type: int
    default: 0
    version_added: 0.2.0
  packages:
    description:
      - Distro releases (for example V(debian-12)) whose OS packages the site's hosts need; their closures are
        carried for every architecture of O(platforms), as C(bundle-builder build --packages) does.
      - The Debian archives are read from the package cache of the user the module runs as.
    type: list
    elements: str
    default: []
    version_added: 0.2.0
  package_profiles:
    description:
      - Which package profiles to carry (V(base), V(compose), V(repo), V(systemd)); default all of the distro's.
      - Used only with O(packages).
    type: list
    elements: str
    version_added: 0.2.0
  files:
    description:
      - Binaries carried for the site's file tree, each as V(NAME[@VERSION]/ARCH=PATH), for example
        V(k3s@v1.30.2+k3s1/amd64=/srv/bin/k3s); as C(bundle-builder build --file).
      - ARCH must be the architecture of one of O(platforms); VERSION defaults to the release's version; one
        file per name and architecture.
    type: list
    elements: str
    default: []
    version_added: 0.2.0
"""

EXAMPLES = r"""
- name: Build shop 1.1.0 for both platforms, as a delta against what the site has
  offline.delivery.bundle_export:
    model: apps/shop/app.yml
    dest: /srv/bundles
    images_from: [docker, "oci:/srv/images/shop"]
    platforms: [linux/amd64, linux/arm64]
    sign_key: /etc/offline-delivery/vendor.key
    have: /srv/sites/plant-7/have.json
    have_pub: [/srv/sites/plant-7/pinned/plant-7.have.pub]
    volume_size: 4G
  delegate_to: build-host

- name: Build shop 1.0.0 with the OS packages and a k3s binary for the site
  offline.delivery.bundle_export:
    model: apps/shop/app.yml
    dest: /srv/bundles
    images_from: [docker]
    platforms: [linux/amd64, linux/arm64]
    sign_key: /etc/offline-delivery/vendor.key
    packages: [debian-12]
    package_profiles: [base, compose, repo]
    files:
      - k3s@v1.30.2+k3s1/amd64=/srv/bin/k3s
      - k3s@v1.30.2+k3s1/arm64=/srv/bin/k3s-arm64
  delegate_to: build-host
"""

RETURN = r"""
bundle:
  description: What was built (also when nothing changed).
  returned: success
  type: dict
  contains:
    path:
      description: The bundle file, or its C(.parts.json) when split.
      type: str
    files:
      description: Every file of the bundle.
      type: list
      elements: str
    manifest_digest:
      description: sha256 of the manifest; equal for equal inputs.
      type: str
    blobs_total:
      description: Blobs of the release.
      type: int
    blobs_bundled:
      description: Blobs this bundle carries (fewer for a delta).
      type: int
    bytes_bundled:
      description: Bytes of the blobs it carries.
      type: int
    size:
      description: Bytes of the bundle file(s).
      type: int
    omitted:
      description: Digests a delta leaves out.
      type: list
      elements: str
previous_manifest_digest:
  description: Manifest digest of the bundle that was in O(dest) before, if any.
  returned: success
  type: str
"""

import sys
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.offline.delivery.plugins.module_utils.common.version import COLLECTION_VERSION

# The builder is the pip-installed offline-delivery package, not this collection's files: it may be another
# version. Its version is read first, so a mismatch is reported as one even when its other modules do not
# import (an older package's layout).
try:
    import bundle_builder
except ImportError:
    BUILDER_VERSION = None
    BUILDER_IMPORT_ERROR = traceback.format_exc()
else:
    BUILDER_VERSION = str(getattr(bundle_builder, "__version__", "unknown"))
    try:
        from bundle_builder.build import BuildError, Compression
        from bundle_builder.export import export_bundle
        from bundle_builder.sbom import default_cache_dir as sbom_cache_dir
        from bundle_builder.signing import SigningError
        from offline_delivery_core.bundle.ed25519 import Ed25519KeyError, load_public_key_files
    except ImportError:
        BUILDER_IMPORT_ERROR = traceback.format_exc()
    else:
        BUILDER_IMPORT_ERROR = None


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "model": {"type": "path", "required": True},
            "dest": {"type": "path", "required": True},
            "images_from": {"type": "list", "elements": "str", "required": True},
            "platforms": {"type": "list", "elements": "str", "default": ["linux/amd64"]},
            "sign_key": {"type": "path", "no_log": False},
            "unsigned": {"type": "bool", "default": False},
            "base": {"type": "path"},
            "base_pub": {"type": "list", "elements": "path"},
            "have": {"type": "path"},
            "have_pub": {"type": "list", "elements": "path"},
            "volume_size": {"type": "str"},
            "compress": {"type": "str", "choices": ["zstd", "none"], "default": "zstd"},
            "compress_level": {"type": "int", "default": 3},
            "compress_threads": {"type": "int", "default": 0},
            "packages": {"type": "list", "elements": "str", "default": []},
            "package_profiles": {"type": "list", "elements": "str"},
            "files": {"type": "list", "elements": "str", "default": []},
        },
        required_one_of=[("sign_key", "unsigned")],
        mutually_exclusive=[("sign_key", "unsigned"), ("base", "have")],
        required_by={"have_pub": "have"},
        supports_check_mode=True,
    )
    problem = builder_problem()
    if problem:
        trace = {"exception": BUILDER_IMPORT_ERROR} if BUILDER_IMPORT_ERROR else {}
        module.fail_json(msg=problem, builder_version=BUILDER_VERSION, collection_version=COLLECTION_VERSION,
                         **trace)
    p = module.params
    try:
        # the same build_bundle, with the same arguments, as bundle-builder build: its checks are the CLI's
        result = export_bundle(
            p["model"], p["dest"], check_mode=module.check_mode, image_sources=p["images_from"],
            platforms=p["platforms"], sign_key=None if p["unsigned"] else p["sign_key"], base=p["base"],
            have=p["have"], volume_size=p["volume_size"],
            base_pub=load_public_key_files(p["base_pub"]) if p["base_pub"] else None,
            have_pub=load_public_key_files(p["have_pub"]) if p["have_pub"] else None,
            packages=p["packages"], package_profiles=p["package_profiles"] or None, files=p["files"],
            compression=Compression(p["compress"], p["compress_level"], p["compress_threads"]),
            scan_cache=sbom_cache_dir())
    except (BuildError, SigningError, Ed25519KeyError, ValueError, OSError) as exc:
        module.fail_json(msg=f"bundle from {p['model']} not built: {exc}")
    module.exit_json(changed=result.changed, msg=result.msg, bundle=result.to_json(),
                     previous_manifest_digest=result.previous_manifest_digest)


def builder_problem() -> str | None:
    """Why the installed builder cannot be used (None when it can): absent, another version, or broken."""
    pip = f"{sys.executable} -m pip install 'offline-delivery=={COLLECTION_VERSION}'"
    if BUILDER_VERSION is None:
        return missing_required_lib(f"offline-delivery=={COLLECTION_VERSION} (bundle_builder)") + f" Run: {pip}"
    if BUILDER_VERSION != COLLECTION_VERSION:
        return (f"the offline-delivery Python package where this module runs is version {BUILDER_VERSION} "
                f"({bundle_builder.__file__}), the offline.delivery collection is {COLLECTION_VERSION}: they build "
                f"one bundle format together and must be the same version. Run: {pip}")
    if BUILDER_IMPORT_ERROR:
        return (f"the offline-delivery Python package {BUILDER_VERSION} ({bundle_builder.__file__}) is incomplete "
                f"(see the exception); reinstall it: {pip}")
    return None


if __name__ == "__main__":
    main()
