"""Shared by the poll app's three roles (web, worker, migrate): settings, stores, privileges.

Connection info comes from the environment: under docker compose from the compose file (service names as
hosts), once converted by ``bundle-builder from-compose`` from the exports of db and redis (``${host}``), so
the same image runs on a compose host, a bare systemd host and Kubernetes. The database password is read
from the file named by ``DB_PASSWORD_FILE`` (a compose secret, mounted at /run/secrets/db_password) or from
``DB_PASSWORD``. The file is readable by root only: every role reads it as root, then drops to
``POLL_UID:POLL_GID`` (65534, nobody) before it talks to anyone.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import psycopg2
import redis

VOTES_KEY = "poll:votes"
VERSION = os.environ.get("POLL_VERSION", "1.0.0")


def version_at_least(wanted: str, version: str = VERSION) -> bool:
    def parts(text: str) -> tuple[int, ...]:
        return tuple(int(p) for p in text.split("+", 1)[0].split("-", 1)[0].split("."))
    return parts(version) >= parts(wanted)


# 1.1.0 adds votes.voter (migration 2); web and worker of 1.1.0+ write and show it.
HAS_VOTER = version_at_least("1.1.0")


def log(role: str, message: str) -> None:
    print(f"poll-{role}: {message}", file=sys.stderr, flush=True)


def fail(role: str, message: str, code: int = 1) -> NoReturn:
    log(role, message)
    raise SystemExit(code)


@dataclass(frozen=True)
class Settings:
    db_host: str
    db_port: int
    db_user: str
    db_name: str
    db_password: str
    redis_host: str
    redis_port: int
    web_port: int
    uid: int
    gid: int

    @classmethod
    def from_env(cls, role: str, need_redis: bool = True) -> "Settings":
        env = os.environ
        password = env.get("DB_PASSWORD", "")
        if not password and env.get("DB_PASSWORD_FILE"):
            try:
                with open(env["DB_PASSWORD_FILE"], encoding="utf-8") as handle:
                    password = handle.read().strip("\r\n")
            except OSError as exc:
                fail(role, f"cannot read the db password from DB_PASSWORD_FILE={env['DB_PASSWORD_FILE']}: {exc}")
        required = ["DB_HOST", "DB_USER", "DB_NAME"] + (["REDIS_HOST"] if need_redis else [])
        missing = [key for key in required if not env.get(key)]
        if not password:
            missing.append("DB_PASSWORD or DB_PASSWORD_FILE")
        if missing:
            fail(role, f"missing environment: {', '.join(missing)}")
        return cls(
            db_host=env["DB_HOST"], db_port=int(env.get("DB_PORT", "5432")), db_user=env["DB_USER"],
            db_name=env["DB_NAME"], db_password=password,
            redis_host=env.get("REDIS_HOST", ""), redis_port=int(env.get("REDIS_PORT", "6379")),
            web_port=int(env.get("POLL_WEB_PORT", "8090")),
            uid=int(env.get("POLL_UID", "65534")), gid=int(env.get("POLL_GID", "65534")),
        )

    def db(self) -> Any:
        return psycopg2.connect(host=self.db_host, port=self.db_port, user=self.db_user, password=self.db_password,
                                dbname=self.db_name, connect_timeout=5)

    def redis(self) -> redis.Redis:
        return redis.Redis(host=self.redis_host, port=self.redis_port, socket_timeout=5, socket_connect_timeout=5)


def drop_privileges(settings: Settings) -> None:
    """From root to the app's own user (nothing to do when started as that user already)."""
    if os.getuid() != 0:
        return
    os.setgroups([])
    os.setgid(settings.gid)
    os.setuid(settings.uid)


def identity() -> str:
    """Who this process is: two instances of one component differ (container hostname, or the pid)."""
    return f"{socket.gethostname()}/{os.getpid()}"


def dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, default=str).encode()
