# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    """Which vendor keys a module trusts, shared by bundle_import, bundle_info and repo_sync
    (spec: ``trust.TRUST_OPTIONS``; docs/site-repo.md, "Trusted vendor keys")."""

    DOCUMENTATION = r"""
options:
  trusted_keys:
    description:
      - Public key files (PEM) that may carry a vendor key, on the media or kept in the site's trusted directory.
      - A file counts only when its fingerprint is in O(pinned_keys) and not in O(revoked_keys); every other
        file is refused and listed with its fingerprint in RV(refused_keys).
    type: list
    elements: path
    default: []
  pinned_keys:
    description:
      - The vendor keys this site trusts, set out of band in the inventory (C(offline_delivery_vendor_keys)).
      - Each entry has C(fingerprint), C(sha256:) followed by 64 hex digits (C(bundle-builder fingerprint KEY.pub)
        prints it), and C(apps), the applications the key may sign, or C([*]) for any.
      - Required for a signature check; without a pin no key is trusted.
    type: list
    elements: dict
    default: []
  revoked_keys:
    description:
      - Fingerprints refused even when they are also pinned (a lost or retired key).
    type: list
    elements: str
    default: []
"""
