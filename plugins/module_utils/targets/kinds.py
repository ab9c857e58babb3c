# Copyright: offline.delivery contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Target kinds and the runtime that implements each. compose and systemd run on the host itself; a k8s
target is a cluster, driven from where its kubeconfig is (app_k8s). Standard library only."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ..app.runtime import DeployError, Runtime
from ..clients.kubernetes import K8sClient, K8sError
from ..common.names import name_problem
from .compose import ComposeRuntime
from .k8s import K8sRenderError, K8sRuntime, RenderOptions
from .systemd import SystemdRuntime

HOST_RUNTIMES = {"compose": ComposeRuntime, "systemd": SystemdRuntime}
TARGETS = sorted(HOST_RUNTIMES) + ["k8s"]

# The options of the modules that act on an app where it runs (doc fragment offline.delivery.app_host).
APP_HOST_OPTIONS = {
    "app": {"type": "str", "required": True},
    "target": {"type": "str", "choices": TARGETS, "required": True},
    "state_dir": {"type": "path", "default": "/var/lib/offline-delivery"},
    "apps_dir": {"type": "path", "default": "/srv/offline-delivery-apps"},
    "kubeconfig": {"type": "dict", "no_log": True},
    "namespace": {"type": "str"},
}


def runtime_for(kind: str, app: str, *, k8s: Optional[Mapping[str, Any]] = None, registry_ca: Optional[str] = None,
                **kwargs: Any) -> Runtime:
    """The runtime of ``kind``. For k8s, ``k8s`` holds the parsed kubeconfig (``config``) and its path
    (``path``), ``namespace`` (default: the app's name), ``storage_class``, ``registry`` and ``secrets``.
    ``registry_ca``: the site CA file (TLS) the systemd target's registry client verifies the registry against;
    compose and k8s hosts trust it through their engine's own configuration (docs/site-repo.md "TLS")."""
    problem = name_problem(app, "app name")  # it names directories, units and a namespace
    if problem:
        raise DeployError(problem)
    if kind != "k8s":
        extra = {"registry_ca": registry_ca} if kind == "systemd" and registry_ca else {}
        return HOST_RUNTIMES[kind](app, **kwargs, **extra)
    if not k8s or not k8s.get("config"):
        raise DeployError("target k8s needs a kubeconfig (host variable offline_delivery_kubeconfig)")
    try:
        client = K8sClient.from_kubeconfig(k8s["config"])
        options = RenderOptions(namespace=k8s.get("namespace") or app, registry=k8s.get("registry") or "",
                                storage_class=k8s.get("storage_class"))
        return K8sRuntime(app, client=client, options=options,
                          secret_values=list((k8s.get("secrets") or {}).values()), **kwargs)
    except (K8sError, K8sRenderError) as exc:
        raise DeployError("k8s target (%s): %s" % (k8s.get("path") or "kubeconfig", exc)) from exc


def runtime_for_params(params: Mapping[str, Any], run: Any, **k8s: Any) -> Runtime:
    """:func:`runtime_for` from a module's parameters (``APP_HOST_OPTIONS``, and ``health_scale`` and
    ``registry_ca`` where the module has them); ``k8s`` adds what only a deploy passes to the k8s target
    (``storage_class``, ``registry``, ``secrets``)."""
    return runtime_for(params["target"], params["app"], apps_dir=params["apps_dir"], state_dir=params["state_dir"],
                       run=run, registry_ca=params.get("registry_ca"), health_scale=params.get("health_scale", 1.0),
                       k8s={"config": params["kubeconfig"], "namespace": params["namespace"], **k8s})
