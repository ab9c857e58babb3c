"""Shared plumbing of the shop API, the same in every release: settings, storage, JSON over HTTP.

Orders live in PostgreSQL; Redis keeps a counter of orders placed. Connection info comes from the
environment, which the delivery tool fills from the ``exports`` of the db and redis components.
A new connection is opened per request so the API recovers by itself when a store restarts.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable

import psycopg2
import redis

ORDERS_PLACED_KEY = "shop:orders_placed"
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Settings:
    port: int
    db_host: str
    db_port: int
    db_user: str
    db_password: str
    db_name: str
    redis_host: str
    redis_port: int
    redis_password: str | None
    currency: str
    page_size: int

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        for key in ("DB_PASSWORD", "REDIS_PASSWORD"):
            # KEY_FILE names a file holding the value (compose secrets live in /run/secrets/).
            if not env.get(key) and env.get(f"{key}_FILE"):
                with open(env[f"{key}_FILE"], encoding="utf-8") as handle:
                    env[key] = handle.read().strip("\r\n")
        missing = [key for key in ("DB_HOST", "DB_USER", "DB_PASSWORD", "DB_NAME", "REDIS_HOST") if not env.get(key)]
        if missing:
            raise SystemExit(f"shop-api: missing environment {', '.join(missing)} (injected from the db/redis exports)")
        return cls(
            port=int(env.get("SHOP_API_PORT", "8000")),
            db_host=env["DB_HOST"],
            db_port=int(env.get("DB_PORT", "5432")),
            db_user=env["DB_USER"],
            db_password=env["DB_PASSWORD"],
            db_name=env["DB_NAME"],
            redis_host=env["REDIS_HOST"],
            redis_port=int(env.get("REDIS_PORT", "6379")),
            redis_password=env.get("REDIS_PASSWORD") or None,
            currency=env.get("SHOP_CURRENCY", "EUR"),
            page_size=max(1, int(env.get("SHOP_PAGE_SIZE", "20"))),
        )


class Store:
    """Orders in PostgreSQL, the placed-orders counter in Redis."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._schema_ready = False

    def db(self) -> Any:
        s = self.settings
        conn = psycopg2.connect(host=s.db_host, port=s.db_port, user=s.db_user, password=s.db_password,
                                dbname=s.db_name, connect_timeout=3)
        if not self._schema_ready:
            with conn, conn.cursor() as cur:
                cur.execute(
                    "CREATE TABLE IF NOT EXISTS orders ("
                    " id BIGSERIAL PRIMARY KEY,"
                    " item TEXT NOT NULL,"
                    " quantity INTEGER NOT NULL CHECK (quantity > 0),"
                    " created_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
            self._schema_ready = True
        return conn

    def redis(self) -> redis.Redis:
        s = self.settings
        return redis.Redis(host=s.redis_host, port=s.redis_port, password=s.redis_password,
                           socket_timeout=3, socket_connect_timeout=3)

    def check(self) -> dict[str, str]:
        """Probe both stores; raises on the first failure."""
        conn = self.db()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchone()
        finally:
            conn.close()
        self.redis().ping()
        return {"db": "ok", "redis": "ok"}

    def add_order(self, item: str, quantity: int) -> dict[str, Any]:
        conn = self.db()
        try:
            with conn, conn.cursor() as cur:
                cur.execute("INSERT INTO orders (item, quantity) VALUES (%s, %s) RETURNING id, created_at",
                            (item, quantity))
                order_id, created = cur.fetchone()
        finally:
            conn.close()
        placed = self.redis().incr(ORDERS_PLACED_KEY)
        return {"id": order_id, "item": item, "quantity": quantity, "created_at": created.isoformat(),
                "placed_total": placed}

    def list_orders(self, limit: int) -> list[dict[str, Any]]:
        return [
            {"id": row[0], "item": row[1], "quantity": row[2], "created_at": row[3].isoformat()}
            for row in self.query("SELECT id, item, quantity, created_at FROM orders ORDER BY id DESC LIMIT %s",
                                  (limit,))
        ]

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = self.db()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        finally:
            conn.close()

    def placed_total(self) -> int:
        return int(self.redis().get(ORDERS_PLACED_KEY) or 0)


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_order(body: bytes) -> tuple[str, int]:
    """Validate a POST /orders body: ``{"item": non-empty string, "quantity": positive integer}``."""
    try:
        data = json.loads(body or b"null")
    except ValueError as exc:
        raise HttpError(400, f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HttpError(400, 'body must be a JSON object like {"item": "tea", "quantity": 2}')
    item, quantity = data.get("item"), data.get("quantity", 1)
    if not isinstance(item, str) or not item.strip() or len(item) > 200:
        raise HttpError(400, "item: expected a non-empty string of at most 200 characters")
    if isinstance(quantity, bool) or not isinstance(quantity, int) or not 0 < quantity <= 10000:
        raise HttpError(400, "quantity: expected an integer from 1 to 10000")
    return item.strip(), quantity


Route = Callable[["JsonHandler"], tuple[int, Any]]


class JsonHandler(BaseHTTPRequestHandler):
    """Dispatches (method, path) to a route returning (status, JSON-able body)."""

    routes: dict[tuple[str, str], Route] = {}
    store: Store
    server_version = "shop-api"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise HttpError(413, f"body larger than {MAX_BODY} bytes")
        return self.rfile.read(length)

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        route = self.routes.get((method, path))
        try:
            if route is None:
                known = sorted(f"{m} {p}" for m, p in self.routes)
                raise HttpError(404, f"no route {method} {path}; known: {', '.join(known)}")
            status, body = route(self)
        except HttpError as exc:
            status, body = exc.status, {"error": str(exc)}
        except (psycopg2.Error, redis.RedisError) as exc:
            status, body = 503, {"error": f"store unavailable: {type(exc).__name__}: {str(exc).strip()}"}
        self._send(status, body)

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body, sort_keys=True).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        # One line per request on stderr (the container log / the journal), without the timestamp.
        print(f"{self.address_string()} {format % args}", flush=True)


def serve(version: str, routes: dict[tuple[str, str], Route]) -> None:
    """Run the API on 0.0.0.0:$SHOP_API_PORT until killed (SIGTERM ends the process)."""
    from http.server import ThreadingHTTPServer

    settings = Settings.from_env()
    handler = type("Handler", (JsonHandler,), {"routes": routes, "store": Store(settings)})
    server = ThreadingHTTPServer(("0.0.0.0", settings.port), handler)
    server.daemon_threads = True
    print(f"shop-api {version} listening on :{settings.port} (db {settings.db_host}:{settings.db_port}, "
          f"redis {settings.redis_host}:{settings.redis_port})", flush=True)
    server.serve_forever()
