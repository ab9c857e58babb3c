# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    """The site repository's root, shared by every module that reads or writes it (action group ``repo``)."""

    DOCUMENTATION = r"""
options:
  repo_root:
    description:
      - Root directory of the site's offline repository (blobs, release records, catalog). M(offline.delivery.bundle_import)
        creates it when missing.
    type: path
    default: /srv/offline-delivery
"""
