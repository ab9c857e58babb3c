# -*- coding: utf-8 -*-
# Copyright: offline.delivery contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The collection's version, known at run time.

A module runs from an AnsiballZ payload that carries module_utils but not galaxy.yml, so the version is a
constant here; tests/unit/test_versions.py keeps it equal to galaxy.yml's (and to ``bundle_builder.__version__``).
``bundle_export`` compares it with the pip-installed ``offline-delivery`` package it builds with.
"""
from __future__ import annotations

COLLECTION_VERSION = "0.2.0"
