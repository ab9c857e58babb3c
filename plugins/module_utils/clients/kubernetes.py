# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A small Kubernetes API client on the standard library (http.client + ssl).

Enough for the k8s target: a kubeconfig (as a dict: the caller parses the YAML) with client certificates,
a bearer token and/or a CA; server-side apply (``PATCH`` with ``application/apply-patch+yaml`` and a JSON
body, field manager ``offline-delivery``); get, list by label selector, delete; and a bounded wait.
Every error names the method, the object and the API server's own message.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import ssl
import tempfile
import time
import urllib.parse
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, TypeVar

FIELD_MANAGER = "offline-delivery"
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"

# kind -> (apiVersion, plural, namespaced): the kinds the k8s target renders or reads.
KINDS: Dict[str, Tuple[str, str, bool]] = {
    "Namespace": ("v1", "namespaces", False),
    "Secret": ("v1", "secrets", True),
    "ConfigMap": ("v1", "configmaps", True),
    "Service": ("v1", "services", True),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims", True),
    "PersistentVolume": ("v1", "persistentvolumes", False),
    "Pod": ("v1", "pods", True),
    "Event": ("v1", "events", True),
    "Node": ("v1", "nodes", False),
    "Deployment": ("apps/v1", "deployments", True),
    "StatefulSet": ("apps/v1", "statefulsets", True),
    "ReplicaSet": ("apps/v1", "replicasets", True),
    "ControllerRevision": ("apps/v1", "controllerrevisions", True),
}

T = TypeVar("T")


class K8sError(RuntimeError):
    """An API request failed or a wait ran out; ``status`` is the HTTP status (0 when none was received)."""

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def resource_path(kind: str, *, namespace: Optional[str] = None, name: Optional[str] = None,
                  api_version: Optional[str] = None) -> str:
    """``/api/v1/namespaces/shop/services/db`` for a kind the client knows."""
    if kind not in KINDS:
        raise K8sError("kind %s is not one the k8s target manages (known: %s)" % (kind, ", ".join(sorted(KINDS))))
    default_version, plural, namespaced = KINDS[kind]
    version = api_version or default_version
    prefix = "/api/%s" % version if "/" not in version else "/apis/%s" % version
    if namespaced:
        if not namespace:
            raise K8sError("%s %s: a namespace is required" % (kind, name or ""))
        prefix += "/namespaces/%s" % urllib.parse.quote(namespace, safe="")
    path = "%s/%s" % (prefix, plural)
    if name:
        path += "/" + urllib.parse.quote(name, safe="")
    return path


def _pem(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (ValueError, TypeError) as exc:
        raise K8sError("kubeconfig: %s is not base64 (%s)" % (what, exc)) from exc


def _read(path: str, what: str, data_key: str) -> bytes:
    # The modules get the parsed kubeconfig, not the file it came from: a relative path has nothing to be
    # relative to (resolving it from the module's working directory would read some other file).
    if not os.path.isabs(path):
        raise K8sError("kubeconfig: the %s path %r is relative; the modules receive the parsed kubeconfig, not "
                       "its location, so give an absolute path or embed the file (%s)" % (what, path, data_key))
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise K8sError("kubeconfig: cannot read %s %s: %s" % (what, path, exc.strerror or exc)) from exc


def _named(items: object, name: str, what: str) -> dict:
    for item in items or []:  # type: ignore[union-attr]
        if isinstance(item, dict) and item.get("name") == name:
            return item.get(what.rstrip("s")) or {}
    raise K8sError("kubeconfig: no %s named %r" % (what.rstrip("s"), name))


class K8sClient:
    """One API server. Connections are short-lived (one per request), so nothing leaks between calls."""

    def __init__(self, server: str, *, ca_pem: Optional[bytes] = None, cert_pem: Optional[bytes] = None,
                 key_pem: Optional[bytes] = None, token: Optional[str] = None, insecure: bool = False,
                 timeout: float = 30.0, field_manager: str = FIELD_MANAGER) -> None:
        parts = urllib.parse.urlsplit(server)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise K8sError("kubeconfig: server %r must be an https:// (or http://) URL" % server)
        self.server = server.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.field_manager = field_manager
        self.context = self._ssl_context(ca_pem, cert_pem, key_pem, insecure) if self.scheme == "https" else None

    @staticmethod
    def _ssl_context(ca_pem: Optional[bytes], cert_pem: Optional[bytes], key_pem: Optional[bytes],
                     insecure: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=ca_pem.decode("ascii") if ca_pem else None)
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if cert_pem and key_pem:
            # ssl only loads a client key from a file: write both to a private directory and remove it at once.
            tmp = tempfile.mkdtemp(prefix="od-k8s-")
            try:
                cert_file, key_file = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
                for path, data in ((cert_file, cert_pem), (key_file, key_pem)):
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as handle:
                        handle.write(data)
                context.load_cert_chain(cert_file, key_file)
            except ssl.SSLError as exc:
                raise K8sError("kubeconfig: the client certificate and key do not load: %s" % exc) from exc
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return context

    @classmethod
    def from_kubeconfig(cls, config: Mapping[str, Any], *, context: Optional[str] = None,
                        timeout: float = 30.0) -> "K8sClient":
        """A client for ``context`` (default: ``current-context``) of a parsed kubeconfig.

        ``*-data`` fields are base64 PEM; file fields (``certificate-authority``, ``client-certificate``,
        ``client-key``, ``tokenFile``) must be absolute paths.
        """
        if not isinstance(config, Mapping):
            raise K8sError("kubeconfig: expected a mapping (the parsed YAML), got %s" % type(config).__name__)
        name = context or config.get("current-context")
        if not name:
            raise K8sError("kubeconfig: no current-context and no context given")
        ctx = _named(config.get("contexts"), name, "contexts")
        cluster = _named(config.get("clusters"), ctx.get("cluster", ""), "clusters")
        user = _named(config.get("users"), ctx.get("user", ""), "users") if ctx.get("user") else {}
        if not cluster.get("server"):
            raise K8sError("kubeconfig: cluster %r has no server" % ctx.get("cluster"))

        def blob(data_key: str, file_key: str, section: Mapping[str, Any], what: str) -> Optional[bytes]:
            if section.get(data_key):
                return _pem(section[data_key], data_key)
            if section.get(file_key):
                return _read(section[file_key], what, data_key)
            return None

        token = user.get("token")
        if not token and user.get("tokenFile"):
            token = _read(user["tokenFile"], "token file", "token").decode("utf-8").strip()
        return cls(cluster["server"],
                   ca_pem=blob("certificate-authority-data", "certificate-authority", cluster, "CA"),
                   cert_pem=blob("client-certificate-data", "client-certificate", user, "client certificate"),
                   key_pem=blob("client-key-data", "client-key", user, "client key"),
                   token=token, insecure=bool(cluster.get("insecure-skip-tls-verify")), timeout=timeout)

    # -- transport ----------------------------------------------------------------------------------

    def request(self, method: str, path: str, *, body: Optional[Mapping[str, Any]] = None,
                query: Optional[Mapping[str, str]] = None, content_type: str = "application/json",
                what: str = "", raw: bool = False) -> Tuple[int, Dict[str, Any]]:
        """Send one request; returns (status, decoded JSON body, or {"text": body} when ``raw``).
        Raises K8sError when the server cannot be reached."""
        url = self.base_path + path
        if query:
            url += "?" + urllib.parse.urlencode(sorted(query.items()))
        headers = {"Accept": "application/json", "User-Agent": "offline-delivery"}
        data = None
        if body is not None:
            data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        if self.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=self.context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            data_in = resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException) as exc:
            raise K8sError("%s %s: cannot reach the API server %s: %s; check the kubeconfig's server and "
                           "that the cluster is up" % (method, what or path, self.server, exc)) from exc
        finally:
            conn.close()
        if raw:
            return status, {"text": data_in.decode("utf-8", "replace")}
        try:
            decoded = json.loads(data_in.decode("utf-8")) if data_in else {}
        except ValueError:
            decoded = {"message": data_in[:300].decode("utf-8", "replace")}
        return status, decoded if isinstance(decoded, dict) else {"items": decoded}

    def _checked(self, method: str, path: str, what: str, ok: Tuple[int, ...] = (200, 201), **kwargs: Any
                 ) -> Tuple[int, Dict[str, Any]]:
        status, body = self.request(method, path, what=what, **kwargs)
        if status not in ok:
            message = body.get("message") or body.get("reason") or "no message"
            raise K8sError("%s %s: HTTP %d %s: %s" % (method, what, status, body.get("reason", ""), message),
                           status=status, reason=str(body.get("reason", "")))
        return status, body

    # -- API ----------------------------------------------------------------------------------------

    def version(self) -> Dict[str, Any]:
        return self._checked("GET", "/version", "the server version")[1]

    def get(self, kind: str, name: str, namespace: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """The object, or None when it does not exist."""
        path = resource_path(kind, namespace=namespace, name=name)
        status, body = self._checked("GET", path, "%s %s/%s" % (kind, namespace or "", name), ok=(200, 404))
        return None if status == 404 else body

    def list(self, kind: str, namespace: Optional[str] = None, *, label_selector: str = "") -> List[Dict[str, Any]]:
        """Objects of a kind (in a namespace), filtered by a label selector, sorted by name."""
        path = resource_path(kind, namespace=namespace)
        query = {"labelSelector": label_selector} if label_selector else None
        body = self._checked("GET", path, "%s list in %s" % (kind, namespace or "the cluster"), query=query)[1]
        items = body.get("items") or []
        for item in items:  # a list's items carry no kind/apiVersion
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", KINDS[kind][0])
        return sorted(items, key=lambda o: o.get("metadata", {}).get("name", ""))

    def apply(self, obj: Mapping[str, Any], *, force: bool = True, dry_run: bool = False) -> Dict[str, Any]:
        """Server-side apply: the API server merges ``obj`` as the fields owned by our field manager.

        ``force`` takes over fields another manager set (e.g. a hand ``kubectl edit``): the model is the truth.
        """
        meta = obj.get("metadata") or {}
        kind, name, namespace = obj.get("kind", ""), meta.get("name", ""), meta.get("namespace")
        path = resource_path(kind, namespace=namespace, name=name, api_version=obj.get("apiVersion"))
        query = {"fieldManager": self.field_manager}
        if force:
            query["force"] = "true"
        if dry_run:
            query["dryRun"] = "All"
        return self._checked("PATCH", path, "apply %s %s/%s" % (kind, namespace or "", name), body=obj,
                             query=query, content_type=APPLY_CONTENT_TYPE)[1]

    def pod_log(self, namespace: str, pod: str, *, lines: int = 30, previous: bool = False) -> str:
        """The last ``lines`` of a pod's (first container's) output; "" when there is none."""
        path = resource_path("Pod", namespace=namespace, name=pod) + "/log"
        query = {"tailLines": str(lines)}
        if previous:
            query["previous"] = "true"
        status, body = self.request("GET", path, query=query, what="log of pod %s/%s" % (namespace, pod), raw=True)
        return body.get("text", "") if status == 200 else ""

    def delete(self, kind: str, name: str, namespace: Optional[str] = None, *,
               propagation: str = "Background") -> bool:
        """Delete an object; False when it was already gone."""
        path = resource_path(kind, namespace=namespace, name=name)
        status, _body = self._checked("DELETE", path, "delete %s %s/%s" % (kind, namespace or "", name),
                                      ok=(200, 202, 404), body={"kind": "DeleteOptions", "apiVersion": "v1",
                                                                "propagationPolicy": propagation})
        return status != 404


def wait_for(check: Callable[[], Tuple[bool, T]], *, timeout: float, interval: float, what: str,
             clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``check`` until it returns (True, value) or ``timeout`` seconds pass (then K8sError with the last
    value, which should say why it is not done)."""
    deadline = clock() + timeout
    while True:
        done, value = check()
        if done:
            return value
        if clock() + interval > deadline:
            raise K8sError("timed out after %.0fs waiting for %s: %s" % (timeout, what, value))
        sleep(interval)
