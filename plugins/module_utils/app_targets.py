# Copyright: offline.delivery contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The host-level target kinds and the runtime that implements each (the k8s target runs from the
controller against a cluster, see app_k8s). Standard library only."""

from __future__ import annotations

from typing import Any

from .app_compose import ComposeRuntime
from .app_runtime import Runtime
from .app_systemd import SystemdRuntime

RUNTIMES = {"compose": ComposeRuntime, "systemd": SystemdRuntime}
HOST_TARGETS = sorted(RUNTIMES)


def runtime_for(kind: str, app: str, **kwargs: Any) -> Runtime:
    return RUNTIMES[kind](app, **kwargs)
