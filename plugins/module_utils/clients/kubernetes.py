# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A small Kubernetes API client on the standard library (http.client + ssl + subprocess).

Enough for the k8s target, from the kubeconfigs users have (as a dict: the caller parses the YAML):

- credentials: client certificates, a bearer token or token file, and ``exec`` credential plugins
  (``client.authentication.k8s.io/v1`` and ``v1beta1``: kubelogin, aws/gke/azure helpers, a site's own
  script), re-run when the credential they gave expires or the server answers 401;
- cluster: CA, ``insecure-skip-tls-verify``, ``tls-server-name``, ``proxy-url`` (an HTTP proxy, CONNECT
  for https);
- refused with a message saying what to use instead: the legacy ``auth-provider`` (oidc, gcp, azure),
  ``username``/``password``, impersonation (``as``), socks5 and https proxies.

Server-side apply (``PATCH`` with ``application/apply-patch+yaml`` and a JSON body, field manager
``offline-delivery``); get, list by label selector, delete; a bounded wait. Kinds of the table below need no
request to find their path; any other kind is looked up once per API group version (API discovery).
Every error names the method, the object and the API server's own message; no error or log carries a token
or what an exec plugin printed on stdout.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.parse
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, TypeVar

FIELD_MANAGER = "offline-delivery"
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"

# kind -> (apiVersion, plural, namespaced): the kinds the k8s target renders or reads, known without discovery.
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
    "Job": ("batch/v1", "jobs", True),
}

EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
EXEC_TIMEOUT = 60.0          # seconds an exec credential plugin may take (it must not wait for a person)
EXEC_REFRESH_MARGIN = 10.0   # re-run the plugin this many seconds before its credential expires
_STDERR_TAIL = 600

T = TypeVar("T")


class K8sError(RuntimeError):
    """An API request failed or a wait ran out; ``status`` is the HTTP status (0 when none was received)."""

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def _path(api_version: str, plural: str, namespaced: bool, kind: str, namespace: Optional[str],
          name: Optional[str]) -> str:
    prefix = "/api/%s" % api_version if "/" not in api_version else "/apis/%s" % api_version
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


_RFC3339 = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(\.\d+)?([Zz]|[+-]\d\d:\d\d)\Z")


def parse_rfc3339(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 timestamp (``2026-01-02T03:04:05Z``, ``...05.123+01:00``)."""
    match = _RFC3339.match(text.strip()) if isinstance(text, str) else None
    if not match:
        raise ValueError("not an RFC 3339 timestamp: %r" % (text,))
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction = float(match.group(7) or 0)
    zone = match.group(8)
    offset = 0 if zone in ("Z", "z") else (1 if zone[0] == "+" else -1) * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    moment = datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.timezone.utc)
    return moment.timestamp() + fraction - offset


# -- exec credential plugins ---------------------------------------------------------------------------------

class Credential:
    """What an exec plugin returned: a token and/or a client certificate (PEM), until ``expires`` (epoch)."""

    def __init__(self, token: Optional[str], cert_pem: Optional[bytes], key_pem: Optional[bytes],
                 expires: Optional[float]) -> None:
        self.token = token
        self.cert_pem = cert_pem
        self.key_pem = key_pem
        self.expires = expires

    def __repr__(self) -> str:  # never the token or the key
        return "Credential(token=%s, cert=%s, expires=%r)" % ("yes" if self.token else "no",
                                                              "yes" if self.cert_pem else "no", self.expires)


class ExecPlugin:
    """A kubeconfig ``users[].user.exec`` credential plugin, run where the client runs.

    The command gets the kubeconfig's ``args`` and ``env`` (added to this process's environment) and
    ``KUBERNETES_EXEC_INFO`` (the ExecCredential request: ``spec.interactive`` false, and with
    ``provideClusterInfo`` the cluster), no stdin, at most ``timeout`` seconds. Its stdout must be an
    ExecCredential of the same apiVersion. The credential is kept until its ``expirationTimestamp``
    (less ``EXEC_REFRESH_MARGIN``) or until ``invalidate()`` (the server answered 401).
    """

    def __init__(self, user: str, spec: Mapping[str, Any], *, cluster_info: Optional[Mapping[str, Any]] = None,
                 timeout: float = EXEC_TIMEOUT, run: Callable[..., Any] = subprocess.run,
                 clock: Callable[[], float] = time.time) -> None:
        self.user = user
        what = "kubeconfig: user %r: exec" % user
        if not isinstance(spec, Mapping):
            raise K8sError("%s must be a mapping" % what)
        self.api_version = spec.get("apiVersion") or ""
        if self.api_version == "client.authentication.k8s.io/v1alpha1":
            raise K8sError("%s: apiVersion client.authentication.k8s.io/v1alpha1 was removed in Kubernetes 1.24; "
                           "use client.authentication.k8s.io/v1 (or v1beta1) and a plugin version that speaks it"
                           % what)
        if self.api_version not in EXEC_API_VERSIONS:
            raise K8sError("%s: apiVersion %r is not one of %s" % (what, self.api_version, ", ".join(EXEC_API_VERSIONS)))
        command = spec.get("command")
        if not isinstance(command, str) or not command:
            raise K8sError("%s: command is required (the plugin's program)" % what)
        if "/" in command and not os.path.isabs(command):
            raise K8sError("%s: the command path %r is relative; the modules receive the parsed kubeconfig, not its "
                           "location, so give an absolute path or a program name found in PATH" % (what, command))
        args = spec.get("args") or []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise K8sError("%s: args must be a list of strings" % what)
        env = {}
        for item in spec.get("env") or []:
            if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or "value" not in item:
                raise K8sError("%s: every env entry needs a name and a value" % what)
            env[item["name"]] = str(item["value"])
        mode = spec.get("interactiveMode") or "IfAvailable"
        if mode not in ("Never", "IfAvailable", "Always"):
            raise K8sError("%s: interactiveMode %r is not Never, IfAvailable or Always" % (what, mode))
        if mode == "Always":
            raise K8sError("%s: interactiveMode Always needs a person at a terminal, which a deploy does not have; "
                           "configure the plugin for non-interactive use (e.g. a cached or service-account "
                           "credential) and set interactiveMode IfAvailable or Never" % what)
        self.command = command
        self.args = list(args)
        self.env = env
        self.install_hint = str(spec.get("installHint") or "").strip()
        self.cluster_info = dict(cluster_info) if (spec.get("provideClusterInfo") and cluster_info) else None
        self.timeout = timeout
        self._run = run
        self._clock = clock
        self._cached: Optional[Credential] = None
        self.runs = 0

    def __repr__(self) -> str:
        return "ExecPlugin(user=%r, command=%r)" % (self.user, self.command)

    def exec_info(self) -> Dict[str, Any]:
        """The ExecCredential request the plugin gets in ``KUBERNETES_EXEC_INFO``."""
        spec: Dict[str, Any] = {"interactive": False}
        if self.cluster_info is not None:
            spec["cluster"] = self.cluster_info
        return {"apiVersion": self.api_version, "kind": "ExecCredential", "spec": spec}

    def invalidate(self) -> None:
        self._cached = None

    def credential(self) -> Credential:
        cached = self._cached
        if cached is not None and (cached.expires is None or self._clock() < cached.expires - EXEC_REFRESH_MARGIN):
            return cached
        self._cached = self._execute()
        return self._cached

    def _fail(self, problem: str) -> K8sError:
        return K8sError("kubeconfig user %r: the exec credential plugin %r %s" % (self.user, self.command, problem))

    def _execute(self) -> Credential:
        environment = dict(os.environ)
        environment.update(self.env)
        environment["KUBERNETES_EXEC_INFO"] = json.dumps(self.exec_info(), sort_keys=True, separators=(",", ":"))
        self.runs += 1
        try:
            done = self._run([self.command] + self.args, env=environment, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=self.timeout, check=False)
        except FileNotFoundError as exc:
            hint = (": " + self.install_hint) if self.install_hint else ""
            raise self._fail("is not installed on the host that runs the deploy (not found%s)%s" % (
                "" if os.path.isabs(self.command) else " in PATH", hint)) from exc
        except subprocess.TimeoutExpired as exc:
            raise self._fail("did not finish within %.0fs (a plugin must not wait for input: a deploy has no "
                             "terminal)" % self.timeout) from exc
        except OSError as exc:
            raise self._fail("cannot be run: %s" % (exc.strerror or exc)) from exc
        stderr = (done.stderr or b"").decode("utf-8", "replace").strip()
        if done.returncode != 0:
            tail = stderr[-_STDERR_TAIL:] if stderr else "no message on stderr"
            raise self._fail("failed (exit status %d): %s" % (done.returncode, tail))
        return self._parse(done.stdout or b"")

    def _parse(self, out: bytes) -> Credential:
        # What the plugin printed is a secret: errors say what is wrong with it, never what it is.
        try:
            doc = json.loads(out.decode("utf-8"))
        except ValueError:
            raise self._fail("printed no JSON ExecCredential on stdout (%d bytes)" % len(out)) from None
        if not isinstance(doc, dict) or doc.get("kind") != "ExecCredential":
            raise self._fail("printed JSON that is not an ExecCredential (kind %r)"
                             % (doc.get("kind") if isinstance(doc, dict) else type(doc).__name__))
        if doc.get("apiVersion") != self.api_version:
            raise self._fail("answered with apiVersion %r, but the kubeconfig asks for %r"
                             % (doc.get("apiVersion"), self.api_version))
        status = doc.get("status")
        if not isinstance(status, dict):
            raise self._fail("printed an ExecCredential without status")
        token = status.get("token") or None
        cert, key = status.get("clientCertificateData"), status.get("clientKeyData")
        if bool(cert) != bool(key):
            missing = ("clientCertificateData", "clientKeyData") if cert else ("clientKeyData", "clientCertificateData")
            raise self._fail("returned %s without %s" % missing)
        if not token and not cert:
            raise self._fail("returned neither a token nor clientCertificateData and clientKeyData")
        if (token is not None and not isinstance(token, str)) or (cert and not (isinstance(cert, str)
                                                                                and isinstance(key, str))):
            raise self._fail("returned a token or certificate that is not a string")
        expires = None
        if status.get("expirationTimestamp"):
            try:
                expires = parse_rfc3339(status["expirationTimestamp"])
            except ValueError as exc:
                raise self._fail("returned a bad expirationTimestamp: %s" % exc) from None
        return Credential(token, cert.encode("utf-8") if cert else None, key.encode("utf-8") if key else None,
                          expires)


# -- transport ------------------------------------------------------------------------------------------------

class _TLSConnection(http.client.HTTPSConnection):
    """HTTPS that checks the server certificate against ``server_hostname`` (the kubeconfig's
    ``tls-server-name``, else the server's host), also through a CONNECT tunnel."""

    def __init__(self, host: str, port: int, *, timeout: float, context: ssl.SSLContext, server_hostname: str) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._od_context = context
        self._server_hostname = server_hostname

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)   # TCP, and the proxy's CONNECT when a tunnel is set
        self.sock = self._od_context.wrap_socket(self.sock, server_hostname=self._server_hostname)


def _proxy(proxy_url: str) -> Tuple[str, int, Dict[str, str]]:
    parts = urllib.parse.urlsplit(proxy_url)
    if parts.scheme != "http" or not parts.hostname:
        raise K8sError("kubeconfig: proxy-url %r: only http:// proxies are supported (CONNECT for an https API "
                       "server); for socks5 or an https proxy, run the deploy where the API server is reachable "
                       "through an http proxy or directly" % _no_password(proxy_url))
    headers = {}
    if parts.username is not None:
        pair = "%s:%s" % (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
    return parts.hostname, parts.port or 80, headers


def _no_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="%s:***@%s" % (parts.username, parts.netloc.rpartition("@")[2])))


def _refuse_unsupported_user(name: str, user: Mapping[str, Any]) -> None:
    if user.get("auth-provider"):
        provider = (user["auth-provider"] or {}).get("name", "?") if isinstance(user["auth-provider"], Mapping) else "?"
        raise K8sError(
            "kubeconfig: user %r uses auth-provider %r, which the k8s target does not support (kubectl removed "
            "gcp and azure in 1.26; oidc is the legacy form): use an exec credential plugin instead, e.g. for "
            "OIDC kubelogin (`exec: {apiVersion: client.authentication.k8s.io/v1, command: kubectl, args: "
            "[oidc-login, get-token, --oidc-issuer-url=..., --oidc-client-id=...], interactiveMode: Never}` "
            "with a token it can refresh without a browser), for GKE gke-gcloud-auth-plugin, for AKS kubelogin "
            "convert-kubeconfig" % (name, provider))
    if user.get("username") or user.get("password"):
        raise K8sError("kubeconfig: user %r uses username/password (basic auth), which Kubernetes removed in 1.19: "
                       "use a client certificate, a token or an exec credential plugin" % name)
    for key in ("as", "as-uid", "as-groups", "as-user-extra"):
        if user.get(key):
            raise K8sError("kubeconfig: user %r impersonates (%s), which the k8s target does not do: give it a "
                           "user whose own credentials have the rights the deploy needs" % (name, key))


class K8sClient:
    """One API server. Connections are short-lived (one per request), so nothing leaks between calls."""

    def __init__(self, server: str, *, ca_pem: Optional[bytes] = None, cert_pem: Optional[bytes] = None,
                 key_pem: Optional[bytes] = None, token: Optional[str] = None, insecure: bool = False,
                 timeout: float = 30.0, field_manager: str = FIELD_MANAGER, tls_server_name: Optional[str] = None,
                 proxy_url: Optional[str] = None, exec_plugin: Optional[ExecPlugin] = None) -> None:
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
        self.tls_server_name = tls_server_name or None
        self.proxy = _proxy(proxy_url) if proxy_url else None
        self.exec_plugin = exec_plugin
        self._ca_pem, self._insecure = ca_pem, insecure
        self._contexts: Dict[Tuple[bytes, bytes], ssl.SSLContext] = {}
        self._discovered: Dict[str, Dict[str, Tuple[str, bool]]] = {}
        # The kubeconfig's own certificate loads now, so a broken one is reported before any request.
        self.context = self._context_for(cert_pem, key_pem, "kubeconfig") if self.scheme == "https" else None

    def _context_for(self, cert_pem: Optional[bytes], key_pem: Optional[bytes], source: str) -> ssl.SSLContext:
        cache_key = (cert_pem or b"", key_pem or b"")
        if cache_key not in self._contexts:
            if len(self._contexts) >= 4:   # an exec plugin that rotates its certificate: keep a few, not all
                self._contexts.clear()
            self._contexts[cache_key] = self._ssl_context(self._ca_pem, cert_pem, key_pem, self._insecure, source)
        return self._contexts[cache_key]

    @staticmethod
    def _ssl_context(ca_pem: Optional[bytes], cert_pem: Optional[bytes], key_pem: Optional[bytes],
                     insecure: bool, source: str = "kubeconfig") -> ssl.SSLContext:
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
                raise K8sError("%s: the client certificate and key do not load: %s" % (source, exc)) from exc
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return context

    @classmethod
    def from_kubeconfig(cls, config: Mapping[str, Any], *, context: Optional[str] = None,
                        timeout: float = 30.0, exec_timeout: float = EXEC_TIMEOUT) -> "K8sClient":
        """A client for ``context`` (default: ``current-context``) of a parsed kubeconfig.

        ``*-data`` fields are base64 PEM; file fields (``certificate-authority``, ``client-certificate``,
        ``client-key``, ``tokenFile``) and an exec plugin's ``command`` given as a path must be absolute.
        """
        if not isinstance(config, Mapping):
            raise K8sError("kubeconfig: expected a mapping (the parsed YAML), got %s" % type(config).__name__)
        name = context or config.get("current-context")
        if not name:
            raise K8sError("kubeconfig: no current-context and no context given")
        ctx = _named(config.get("contexts"), name, "contexts")
        cluster = _named(config.get("clusters"), ctx.get("cluster", ""), "clusters")
        user_name = ctx.get("user") or ""
        user = _named(config.get("users"), user_name, "users") if user_name else {}
        if not cluster.get("server"):
            raise K8sError("kubeconfig: cluster %r has no server" % ctx.get("cluster"))
        _refuse_unsupported_user(user_name, user)

        def blob(data_key: str, file_key: str, section: Mapping[str, Any], what: str) -> Optional[bytes]:
            if section.get(data_key):
                return _pem(section[data_key], data_key)
            if section.get(file_key):
                return _read(section[file_key], what, data_key)
            return None

        ca_pem = blob("certificate-authority-data", "certificate-authority", cluster, "CA")
        token = user.get("token")
        if not token and user.get("tokenFile"):
            token = _read(user["tokenFile"], "token file", "token").decode("utf-8").strip()
        plugin = None
        if user.get("exec"):
            plugin = ExecPlugin(user_name, user["exec"], cluster_info=_cluster_info(cluster, ca_pem),
                                timeout=exec_timeout)
        return cls(cluster["server"], ca_pem=ca_pem,
                   cert_pem=blob("client-certificate-data", "client-certificate", user, "client certificate"),
                   key_pem=blob("client-key-data", "client-key", user, "client key"),
                   token=token, insecure=bool(cluster.get("insecure-skip-tls-verify")), timeout=timeout,
                   tls_server_name=cluster.get("tls-server-name"), proxy_url=cluster.get("proxy-url"),
                   exec_plugin=plugin)

    # -- transport ----------------------------------------------------------------------------------

    def _connection(self, context: Optional[ssl.SSLContext]) -> http.client.HTTPConnection:
        if self.scheme == "https":
            if context is None:
                raise K8sError("internal: an https connection needs a TLS context")
            server_hostname = self.tls_server_name or self.host
            if self.proxy:
                host, port, headers = self.proxy[0], self.proxy[1], self.proxy[2]
                conn: http.client.HTTPConnection = _TLSConnection(host, port, timeout=self.timeout, context=context,
                                                                  server_hostname=server_hostname)
                conn.set_tunnel(self._netloc_host(), self.port, headers=headers)
                return conn
            return _TLSConnection(self.host, self.port, timeout=self.timeout, context=context,
                                  server_hostname=server_hostname)
        if self.proxy:
            return http.client.HTTPConnection(self.proxy[0], self.proxy[1], timeout=self.timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _netloc_host(self) -> str:
        return "[%s]" % self.host if ":" in self.host else self.host

    def _credentials(self) -> Tuple[Optional[str], Optional[ssl.SSLContext]]:
        token, context = self.token, self.context
        if self.exec_plugin is not None:
            cred = self.exec_plugin.credential()
            token = cred.token or token
            if cred.cert_pem and self.scheme == "https":
                context = self._context_for(cred.cert_pem, cred.key_pem,
                                            "the exec credential plugin %r" % self.exec_plugin.command)
        return token, context

    def request(self, method: str, path: str, *, body: Optional[Mapping[str, Any]] = None,
                query: Optional[Mapping[str, str]] = None, content_type: str = "application/json",
                what: str = "", raw: bool = False) -> Tuple[int, Dict[str, Any]]:
        """Send one request; returns (status, decoded JSON body, or {"text": body} when ``raw``).
        Raises K8sError when the server cannot be reached. A 401 with an exec plugin's credential runs the
        plugin again and retries once (the credential may have been revoked or rotated early)."""
        status, data_in = self._send(method, path, body, query, content_type, what)
        if status == 401 and self.exec_plugin is not None:
            self.exec_plugin.invalidate()
            status, data_in = self._send(method, path, body, query, content_type, what)
        if raw:
            return status, {"text": data_in.decode("utf-8", "replace")}
        try:
            decoded = json.loads(data_in.decode("utf-8")) if data_in else {}
        except ValueError:
            decoded = {"message": data_in[:300].decode("utf-8", "replace")}
        return status, decoded if isinstance(decoded, dict) else {"items": decoded}

    def _send(self, method: str, path: str, body: Optional[Mapping[str, Any]], query: Optional[Mapping[str, str]],
              content_type: str, what: str) -> Tuple[int, bytes]:
        url = self.base_path + path
        if query:
            url += "?" + urllib.parse.urlencode(sorted(query.items()))
        headers = {"Accept": "application/json", "User-Agent": "offline-delivery"}
        data = None
        if body is not None:
            data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
            headers["Content-Type"] = content_type
        token, context = self._credentials()
        if token:
            headers["Authorization"] = "Bearer " + token
        conn = self._connection(context)
        if self.proxy and self.scheme == "http":   # a plain proxy forwards by absolute URL
            url = "http://%s:%d%s" % (self._netloc_host(), self.port, url)
            headers.update(self.proxy[2])
        try:
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            data_in = resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException) as exc:
            via = " through the proxy %s:%d" % self.proxy[:2] if self.proxy else ""
            raise K8sError("%s %s: cannot reach the API server %s%s: %s; check the kubeconfig's server and "
                           "that the cluster is up" % (method, what or path, self.server, via, exc)) from exc
        finally:
            conn.close()
        return status, data_in

    def _checked(self, method: str, path: str, what: str, ok: Tuple[int, ...] = (200, 201), **kwargs: Any
                 ) -> Tuple[int, Dict[str, Any]]:
        status, body = self.request(method, path, what=what, **kwargs)
        if status not in ok:
            message = body.get("message") or body.get("reason") or "no message"
            raise K8sError("%s %s: HTTP %d %s: %s" % (method, what, status, body.get("reason", ""), message),
                           status=status, reason=str(body.get("reason", "")))
        return status, body

    # -- kinds ---------------------------------------------------------------------------------------

    def resource(self, kind: str, api_version: Optional[str] = None) -> Tuple[str, str, bool]:
        """(apiVersion, plural, namespaced) of a kind: from the table, else from API discovery (one
        request per group version, kept for the client's life)."""
        if kind in KINDS and (api_version is None or api_version == KINDS[kind][0]):
            return KINDS[kind]
        if kind in KINDS and api_version:   # another version of a known kind: same plural and scope
            return api_version, KINDS[kind][1], KINDS[kind][2]
        if not api_version:
            raise K8sError("kind %s is not in the client's table (%s): give its apiVersion so the client can look "
                           "it up on the API server" % (kind, ", ".join(sorted(KINDS))))
        if api_version not in self._discovered:
            path = "/api/%s" % api_version if "/" not in api_version else "/apis/%s" % api_version
            status, body = self._checked("GET", path, "discovery of %s" % api_version, ok=(200, 404))
            if status == 404:
                raise K8sError("the API server has no API %s (kind %s): is the CustomResourceDefinition or the "
                               "API service installed, and is the version served?" % (api_version, kind),
                               status=404, reason="NotFound")
            found: Dict[str, Tuple[str, bool]] = {}
            for item in body.get("resources") or []:
                if isinstance(item, dict) and "/" not in item.get("name", "/") and item.get("kind"):
                    found.setdefault(item["kind"], (item["name"], bool(item.get("namespaced"))))
            self._discovered[api_version] = found
        found = self._discovered[api_version]
        if kind not in found:
            raise K8sError("the API server's %s has no kind %s (it has: %s)" % (
                api_version, kind, ", ".join(sorted(found)) or "none"), status=404, reason="NotFound")
        plural, namespaced = found[kind]
        return api_version, plural, namespaced

    def path(self, kind: str, *, namespace: Optional[str] = None, name: Optional[str] = None,
             api_version: Optional[str] = None) -> str:
        """The API path of a kind's collection (or of one object with ``name``); a cluster-scoped kind
        ignores ``namespace``."""
        version, plural, namespaced = self.resource(kind, api_version)
        return _path(version, plural, namespaced, kind, namespace, name)

    # -- API ----------------------------------------------------------------------------------------

    def version(self) -> Dict[str, Any]:
        return self._checked("GET", "/version", "the server version")[1]

    def get(self, kind: str, name: str, namespace: Optional[str] = None, *,
            api_version: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """The object, or None when it does not exist."""
        path = self.path(kind, namespace=namespace, name=name, api_version=api_version)
        status, body = self._checked("GET", path, "%s %s/%s" % (kind, namespace or "", name), ok=(200, 404))
        return None if status == 404 else body

    def list(self, kind: str, namespace: Optional[str] = None, *, label_selector: str = "",
             api_version: Optional[str] = None) -> List[Dict[str, Any]]:
        """Objects of a kind (in a namespace), filtered by a label selector, sorted by name."""
        version = self.resource(kind, api_version)[0]
        path = self.path(kind, namespace=namespace, api_version=version)
        query = {"labelSelector": label_selector} if label_selector else None
        body = self._checked("GET", path, "%s list in %s" % (kind, namespace or "the cluster"), query=query)[1]
        items = body.get("items") or []
        for item in items:  # a list's items carry no kind/apiVersion
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", version)
        return sorted(items, key=lambda o: o.get("metadata", {}).get("name", ""))

    def apply(self, obj: Mapping[str, Any], *, force: bool = True, dry_run: bool = False) -> Dict[str, Any]:
        """Server-side apply: the API server merges ``obj`` as the fields owned by our field manager.

        ``force`` takes over fields another manager set (e.g. a hand ``kubectl edit``): the model is the truth.
        """
        meta = obj.get("metadata") or {}
        kind, name, namespace = obj.get("kind", ""), meta.get("name", ""), meta.get("namespace")
        path = self.path(kind, namespace=namespace, name=name, api_version=obj.get("apiVersion"))
        query = {"fieldManager": self.field_manager}
        if force:
            query["force"] = "true"
        if dry_run:
            query["dryRun"] = "All"
        return self._checked("PATCH", path, "apply %s %s/%s" % (kind, namespace or "", name), body=obj,
                             query=query, content_type=APPLY_CONTENT_TYPE)[1]

    def pod_log(self, namespace: str, pod: str, *, lines: int = 30, previous: bool = False) -> str:
        """The last ``lines`` of a pod's (first container's) output; "" when there is none."""
        path = self.path("Pod", namespace=namespace, name=pod) + "/log"
        query = {"tailLines": str(lines)}
        if previous:
            query["previous"] = "true"
        status, body = self.request("GET", path, query=query, what="log of pod %s/%s" % (namespace, pod), raw=True)
        return body.get("text", "") if status == 200 else ""

    def delete(self, kind: str, name: str, namespace: Optional[str] = None, *,
               propagation: str = "Background", api_version: Optional[str] = None) -> bool:
        """Delete an object; False when it was already gone."""
        path = self.path(kind, namespace=namespace, name=name, api_version=api_version)
        status, _body = self._checked("DELETE", path, "delete %s %s/%s" % (kind, namespace or "", name),
                                      ok=(200, 202, 404), body={"kind": "DeleteOptions", "apiVersion": "v1",
                                                                "propagationPolicy": propagation})
        return status != 404


def _cluster_info(cluster: Mapping[str, Any], ca_pem: Optional[bytes]) -> Dict[str, Any]:
    """The ``spec.cluster`` of an exec plugin's ExecCredential request (``provideClusterInfo: true``)."""
    info: Dict[str, Any] = {"server": cluster.get("server")}
    for key in ("tls-server-name", "insecure-skip-tls-verify", "proxy-url", "disable-compression"):
        if cluster.get(key):
            info[key] = cluster[key]
    if ca_pem:
        info["certificate-authority-data"] = base64.b64encode(ca_pem).decode("ascii")
    for ext in cluster.get("extensions") or []:
        if isinstance(ext, Mapping) and ext.get("name") == "client.authentication.k8s.io/exec":
            info["config"] = ext.get("extension")
    return info


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
