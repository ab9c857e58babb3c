"""A tiny HTTP CONNECT proxy on loopback, for the kubeconfig `proxy-url` tests (unit and e2e).

It records every CONNECT (target and Proxy-Authorization header), refuses a wrong or missing credential with
407 when `credential` is set, resolves target host names through `hosts` first (as a real proxy resolves
names the client cannot), and pipes bytes both ways. Nothing else: no plain forwarding, no TLS of its own.
"""
from __future__ import annotations

import base64
import select
import socket
import socketserver
import threading
from typing import Dict, List, Optional


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        proxy: ConnectProxy = self.server.proxy  # type: ignore[attr-defined]
        client = self.request
        client.settimeout(30)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = client.recv(4096)
            if not chunk:
                return
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        method, target = (lines[0].split(" ") + ["", ""])[:2]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        record = {"method": method, "target": target, "proxy-authorization": headers.get("proxy-authorization")}
        proxy.requests.append(record)
        if method != "CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        if proxy.credential is not None and headers.get("proxy-authorization") != proxy.expected_header():
            client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            return
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        try:
            upstream = socket.create_connection((proxy.hosts.get(host, host), int(port)), timeout=15)
        except (OSError, ValueError) as exc:
            record["error"] = str(exc)
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self._pipe(client, upstream)

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        sockets = [a, b]
        try:
            while True:
                readable, _, broken = select.select(sockets, [], sockets, 30)
                if broken or not readable:
                    return
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (b if sock is a else a).sendall(data)
        except OSError:
            return
        finally:
            b.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class ConnectProxy:
    """``with ConnectProxy(credential="user:pw", hosts={"api.invalid": "10.0.0.5"}) as proxy: proxy.url``"""

    def __init__(self, credential: Optional[str] = None, hosts: Optional[Dict[str, str]] = None) -> None:
        self.credential = credential
        self.hosts = dict(hosts or {})
        self.requests: List[Dict[str, Optional[str]]] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def expected_header(self) -> str:
        return "Basic " + base64.b64encode((self.credential or "").encode()).decode()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """``http://user:pw@127.0.0.1:PORT`` (the credential URL-quoted as a kubeconfig would carry it)."""
        if self.credential is None:
            return "http://127.0.0.1:%d" % self.port
        from urllib.parse import quote
        user, _, password = self.credential.partition(":")
        return "http://%s:%s@127.0.0.1:%d" % (quote(user, safe=""), quote(password, safe=""), self.port)

    def __enter__(self) -> "ConnectProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
