# Copyright: offline.delivery contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""A release as the lifecycle needs it, read from the site repository: its model and its images, and the
site's secrets for the app, kept beside the repository on the repo host. Standard library only."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

from ..app.model import ModelError, generate_secret, load_model
from ..app.state import app_dir
from ..bundle.format import MAX_MANIFEST_SIZE
from ..common.files import write_private
from ..common.names import SEMVER_RE, name_problem, version_problem
from ..bundle.trust import site_version
from .have import DEFAULT_KEY_DIR
from .patch import PatchError, site_public_key, verify_site_release
from .repo import SITE_ORIGIN, RepoError, SiteRepo


def semver_key(version: str) -> Tuple[Any, ...]:
    """Order by Semantic Versioning precedence: a pre-release sorts before its release. Semantic Versioning
    ignores build metadata; a site release ``<v>+site.<n>`` (site/patch.py) sorts right after its vendor release
    ``<v>`` and before the vendor's next version, by ``n``: 1.0.0 < 1.0.0+site.1 < 1.0.0+site.2 < 1.0.1."""
    match = SEMVER_RE.match(version)
    if not match:
        return (-1, version)
    major, minor, patch, pre = match.group(1), match.group(2), match.group(3), match.group(4)
    pre_key: Tuple[Any, ...] = (1,) if pre is None else (0,) + tuple(
        (0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    site = site_version(version)
    return (int(major), int(minor), int(patch), pre_key, site[1] if site else 0)


def read_release(repo: SiteRepo, name: str, version: Optional[str] = None,
                 site_key_dir: str = DEFAULT_KEY_DIR) -> Dict[str, Any]:
    """``{name, version, model, images, platforms, manifest_digest, patch}`` of an imported release; ``version``
    None picks the newest one (``semver_key``: a site release of the newest vendor release counts). Every byte
    read is checked against the digest that names it; a site release also against the site key in
    ``site_key_dir`` (``patch``: its patch record; None for a vendor release)."""
    for problem in (name_problem(name, "app name"), version and version_problem(version)):
        if problem:
            raise RepoError(problem)
    releases = [r for r in repo.catalog()["releases"] if r["name"] == name]
    if not releases:
        raise RepoError("no release of %s in the site repository %s; import its bundle first "
                        "(playbook offline.delivery.import)" % (name, repo.root))
    if version is None:
        version = max((r["version"] for r in releases), key=semver_key)
    record = next((r for r in releases if r["version"] == version), None)
    if record is None:
        raise RepoError("%s %s is not in the site repository %s (imported: %s); import its bundle first" %
                        (name, version, repo.root, ", ".join(sorted((r["version"] for r in releases), key=semver_key))))
    patch = None
    if record.get("origin") == SITE_ORIGIN:
        try:
            patch = verify_site_release(repo, record, site_public_key(site_key_dir))
        except PatchError as exc:
            raise RepoError(str(exc)) from None
    manifest = repo.release_manifest(name, version)
    model_desc = manifest["model"]
    model_bytes = repo.read_blob(model_desc["digest"], size=model_desc["size"], limit=MAX_MANIFEST_SIZE,
                                 where=f"the model of {name} {version}")
    try:
        model = load_model(json.loads(model_bytes.decode("utf-8")), source="%s %s (site repository)" % (name, version))
    except (ValueError, ModelError) as exc:
        raise RepoError("the model of %s %s in the site repository is invalid: %s" % (name, version, exc)) from None
    return {"name": name, "version": version, "model": model, "images": manifest["images"],
            "platforms": manifest["platforms"], "manifest_digest": record["manifestDigest"], "patch": patch}


def ensure_secrets(state_dir: str, app: str, specs: Mapping[str, Mapping[str, Any]]) -> Tuple[Dict[str, str], list]:
    """The site's secrets of ``app`` (generated on first need, then kept for good, also when a release stops
    naming one, so a rollback finds it): returns (all secrets, names generated now). File 0600 in a 0700 dir."""
    path = os.path.join(app_dir(state_dir, app), "secrets.json")
    try:
        with open(path, "rb") as fh:
            secrets = json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        secrets = {}
    except (OSError, ValueError) as exc:
        raise RepoError("%s cannot be read (%s); restore it from a backup: generating new secrets would lock "
                        "the running components out of their data" % (path, exc)) from None
    generated = sorted(name for name in specs if name not in secrets)
    for name in generated:
        secrets[name] = generate_secret(specs[name])
    if generated or not os.path.exists(path):
        write_private(path, json.dumps(secrets, sort_keys=True, indent=1).encode("utf-8") + b"\n")
    return secrets, generated
