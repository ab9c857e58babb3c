# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one architecture map of the product: Debian names are canonical; kernel (``uname -m``, Ansible's
``ansible_facts.architecture``) and OCI names are aliases. The builder, the roles (filter
``offline.delivery.debian_arch``) and the site read it here."""

from __future__ import annotations

ARCH_ALIASES = {
    "amd64": "amd64",
    "x86_64": "amd64",
    "x86-64": "amd64",
    "arm64": "arm64",
    "aarch64": "arm64",
    "arm64/v8": "arm64",
}


def debian_arch(name: str) -> str | None:
    """``amd64``/``arm64`` for any alias (``x86_64``, ``aarch64``, ``linux/arm64``...), None when unknown."""
    key = str(name).strip().lower()
    if key.startswith("linux/"):
        key = key[len("linux/"):]
    return ARCH_ALIASES.get(key)
