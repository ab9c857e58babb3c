"""The poll app: one image, three roles chosen by the first argument.

  web      HTTP on $POLL_WEB_PORT (8090): POST /vote {"choice": "a"} queues the vote in Redis,
           GET /results counts the votes in PostgreSQL, GET /healthz checks both stores and its run files
  worker   takes votes off the Redis list (BRPOP) and stores them, naming itself in each row; touches a
           heartbeat file in /tmp every loop
  migrate  a one-shot job: applies the schema migrations of this release, records its run, exits 0 (or
           non-zero when a migration fails: nothing of the failed run is kept)
  tally    the optional "reports" module (a compose profile): every few seconds writes the counts to
           $POLL_TALLY_DIR/summary.json (a volume), so the counts outlive the module being turned off
  check-web, check-worker, check-tally   health checks (exec): exit 0 when healthy

The release is the image's POLL_VERSION: 1.1.0 adds votes.voter (migration 2); 1.2.0's migration 3 is
broken on purpose (it references a table that does not exist), so its deploy fails on the migrate job.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from poll_common import (HAS_VOTER, VERSION, VOTES_KEY, Settings, drop_privileges, dumps, fail, identity, log,
                         version_at_least)

RUN_DIR = "/run/poll"
TALLY_EVERY = 5
TALLY_MAX_AGE = 30
HEARTBEAT = "/tmp/poll-worker.heartbeat"
HEARTBEAT_MAX_AGE = 20
MAX_BODY = 16 * 1024

# (id, release that introduced it, what it does, SQL). Migrations are additive ("expand" only): an older
# release keeps working on a newer schema, so a rollback needs no down-migration and loses no data.
MIGRATIONS = (
    (1, "1.0.0", "votes table",
     "CREATE TABLE IF NOT EXISTS votes (id BIGSERIAL PRIMARY KEY, choice TEXT NOT NULL,"
     " worker TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())"),
    (2, "1.1.0", "votes.voter",
     "ALTER TABLE votes ADD COLUMN IF NOT EXISTS voter TEXT"),
    (3, "1.2.0", "votes.choice references choices",   # broken on purpose: the table is "choices"
     "ALTER TABLE votes ADD CONSTRAINT votes_choice_known FOREIGN KEY (choice) REFERENCES choice_list (name)"),
)


# ---------------------------------------------------------------------------------------------- migrate

def migrate() -> int:
    settings = Settings.from_env("migrate", need_redis=False)
    drop_privileges(settings)
    mine = [m for m in MIGRATIONS if version_at_least(m[1])]
    conn = None
    for attempt in range(30):
        try:
            conn = settings.db()
            break
        except Exception as exc:  # the db may still be starting when the job is started on its own
            log("migrate", f"db not reachable yet ({exc}); retrying ({attempt + 1}/30)")
            time.sleep(2)
    if conn is None:
        fail("migrate", "db not reachable after 60 s")
    current = 0
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(20)")   # one migration run at a time
            cur.execute("CREATE TABLE IF NOT EXISTS schema_migrations (id INTEGER PRIMARY KEY, release TEXT NOT NULL,"
                        " description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            cur.execute("CREATE TABLE IF NOT EXISTS migrate_runs (id BIGSERIAL PRIMARY KEY, release TEXT NOT NULL,"
                        " applied TEXT NOT NULL, ran_by TEXT NOT NULL, ran_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            cur.execute("SELECT id FROM schema_migrations")
            done = {row[0] for row in cur.fetchall()}
            applied = []
            for number, release, what, sql in mine:
                if number in done:
                    continue
                current = number
                cur.execute(sql)
                cur.execute("INSERT INTO schema_migrations (id, release, description) VALUES (%s, %s, %s)",
                            (number, release, what))
                applied.append(str(number))
            cur.execute("INSERT INTO migrate_runs (release, applied, ran_by) VALUES (%s, %s, %s)",
                        (VERSION, ",".join(applied) or "-", identity()))
    except Exception as exc:
        fail("migrate", f"release {VERSION}: migration {current} failed, nothing applied: "
                        f"{str(exc).strip().splitlines()[0]}", code=3)
    finally:
        conn.close()
    log("migrate", f"release {VERSION}: schema up to date (applied: {', '.join(applied) or 'nothing new'})")
    return 0


# ----------------------------------------------------------------------------------------------- worker

def worker() -> int:
    settings = Settings.from_env("worker")
    drop_privileges(settings)
    me = identity()
    log("worker", f"{me} (release {VERSION}) waiting for votes")
    # As a container's PID 1 the process has no default SIGTERM action: without a handler a stop would wait
    # for the runtime's kill, and a worker being replaced would go on taking votes meanwhile. The vote in hand
    # is stored first; the blocking pop returns within 2 s.
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    conn = store = None
    while not stopping:
        with open(HEARTBEAT, "w", encoding="utf-8") as handle:
            handle.write(f"{me} {time.time():.0f}\n")
        try:
            store = store or settings.redis()
            conn = conn or settings.db()
            item = store.brpop([VOTES_KEY], timeout=2)
            if item is None:
                continue
            vote = json.loads(item[1])
            with conn, conn.cursor() as cur:
                if HAS_VOTER:
                    cur.execute("INSERT INTO votes (choice, worker, voter) VALUES (%s, %s, %s)",
                                (vote["choice"], me, vote.get("voter")))
                else:
                    cur.execute("INSERT INTO votes (choice, worker) VALUES (%s, %s)", (vote["choice"], me))
            time.sleep(0.05)   # lets the other instances take their share of a burst
        except Exception as exc:
            log("worker", f"{type(exc).__name__}: {exc}; reconnecting")
            for resource in (conn, store):
                try:
                    resource and resource.close()
                except Exception:
                    pass
            conn = store = None
            time.sleep(1)
    log("worker", f"{me} stopping")
    return 0


def check_worker() -> int:
    try:
        age = time.time() - os.stat(HEARTBEAT).st_mtime
    except OSError as exc:
        print(f"no heartbeat: {exc}")
        return 1
    print(f"heartbeat {age:.0f} s ago")
    return 0 if age <= HEARTBEAT_MAX_AGE else 1


# -------------------------------------------------------------------------------------------------- web

class Web(BaseHTTPRequestHandler):
    settings: Settings
    run_files: tuple[str, ...] = ()
    server_version = "poll-web"

    def log_message(self, fmt: str, *args: Any) -> None:
        log("web", fmt % args)

    def reply(self, status: int, body: Any) -> None:
        data = dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        try:
            if self.path == "/healthz":
                self.healthz()
            elif self.path == "/results":
                self.reply(200, self.results())
            elif self.path == "/version":
                self.reply(200, {"version": VERSION})
            else:
                self.reply(404, {"error": f"no route {self.path}"})
        except Exception as exc:
            self.reply(500, {"error": f"{type(exc).__name__}: {exc}"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/vote":
            self.reply(404, {"error": f"no route {self.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(min(length, MAX_BODY)) or b"{}")
            choice = str(body.get("choice", ""))
            conn = self.settings.db()
            try:
                with conn, conn.cursor() as cur:
                    cur.execute("SELECT 1 FROM choices WHERE name = %s", (choice,))
                    known = cur.fetchone() is not None
            finally:
                conn.close()
            if not known:
                self.reply(400, {"error": f"unknown choice {choice!r}"})
                return
            vote = {"choice": choice}
            if HAS_VOTER and body.get("voter"):
                vote["voter"] = str(body["voter"])[:100]
            self.settings.redis().lpush(VOTES_KEY, dumps(vote))
            self.reply(202, {"queued": vote})
        except Exception as exc:
            self.reply(500, {"error": f"{type(exc).__name__}: {exc}"})

    def healthz(self) -> None:
        problems = [f"{path} is gone" for path in self.run_files if not os.path.exists(path)]
        try:
            self.settings.redis().ping()
        except Exception as exc:
            problems.append(f"redis: {exc}")
        try:
            conn = self.settings.db()
            conn.close()
        except Exception as exc:
            problems.append(f"db: {str(exc).strip()}")
        self.reply(503 if problems else 200, {"status": "; ".join(problems) or "ok", "version": VERSION})

    def results(self) -> dict:
        conn = self.settings.db()
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SELECT c.name, c.label, count(v.id) FROM choices c LEFT JOIN votes v ON v.choice = c.name"
                            " GROUP BY c.name, c.label ORDER BY c.name")
                counts = {name: {"label": label, "votes": n} for name, label, n in cur.fetchall()}
                cur.execute("SELECT worker, count(*) FROM votes GROUP BY worker ORDER BY worker")
                workers = dict(cur.fetchall())
                cur.execute("SELECT release, applied, ran_by, ran_at FROM migrate_runs ORDER BY id")
                runs = [{"release": r, "applied": a, "by": b, "at": t} for r, a, b, t in cur.fetchall()]
                cur.execute("SELECT max(id) FROM schema_migrations")
                schema = cur.fetchone()[0]
                result = {"version": VERSION, "schema": schema, "counts": counts,
                          "total": sum(c["votes"] for c in counts.values()), "workers": workers,
                          "migrate_runs": runs}
                if HAS_VOTER:
                    cur.execute("SELECT voter, choice FROM votes WHERE voter IS NOT NULL ORDER BY id")
                    result["voters"] = {voter: choice for voter, choice in cur.fetchall()}
                return result
        finally:
            conn.close()


def web() -> int:
    settings = Settings.from_env("web")
    # A pid file under /run and a scratch file under /tmp, as many daemons keep: the component must be able to
    # write both on every target, as its own (unprivileged) user.
    try:
        os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
        os.chown(RUN_DIR, settings.uid, settings.gid)
    except OSError as exc:
        fail("web", f"cannot prepare {RUN_DIR}: {exc}")
    drop_privileges(settings)
    try:
        pid_file = os.path.join(RUN_DIR, "web.pid")
        with open(pid_file, "w", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()}\n")
        with tempfile.NamedTemporaryFile("w", prefix="poll-web-", dir="/tmp", delete=False) as scratch:
            scratch.write(f"started {time.time():.0f}\n")
    except OSError as exc:
        fail("web", f"cannot write the pid file or the scratch file: {exc}")
    Web.settings = settings
    Web.run_files = (pid_file, scratch.name)
    server = ThreadingHTTPServer(("0.0.0.0", settings.web_port), Web)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))   # PID 1 in a container: see worker()
    log("web", f"release {VERSION} on port {settings.web_port} (pid file {pid_file}, scratch {scratch.name})")
    server.serve_forever()
    return 0


def check_web() -> int:
    port = os.environ.get("POLL_WEB_PORT", "8090")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as answer:
            print(answer.read().decode())
            return 0
    except Exception as exc:
        print(f"unhealthy: {exc}")
        return 1


# ------------------------------------------------------------------------------------------------ tally

def tally_dir() -> str:
    return os.environ.get("POLL_TALLY_DIR", "/var/lib/poll-tally")


def tally() -> int:
    settings = Settings.from_env("tally", need_redis=False)
    directory = tally_dir()
    try:   # a fresh volume belongs to root: hand it to the app's user before dropping to it
        os.makedirs(directory, mode=0o755, exist_ok=True)
        os.chown(directory, settings.uid, settings.gid)
    except OSError as exc:
        fail("tally", f"cannot prepare {directory}: {exc}")
    drop_privileges(settings)
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))   # PID 1: see worker()
    log("tally", f"release {VERSION}: writing the counts to {directory}/summary.json every {TALLY_EVERY} s")
    conn = None
    while not stopping:
        try:
            conn = conn or settings.db()
            with conn, conn.cursor() as cur:
                cur.execute("SELECT choice, count(*) FROM votes GROUP BY choice ORDER BY choice")
                counts = {choice: count for choice, count in cur.fetchall()}
            summary = {"counts": counts, "total": sum(counts.values()), "at": round(time.time()), "by": identity()}
            with tempfile.NamedTemporaryFile("wb", dir=directory, delete=False) as handle:
                handle.write(dumps(summary) + b"\n")
            os.replace(handle.name, os.path.join(directory, "summary.json"))
        except Exception as exc:
            log("tally", f"{type(exc).__name__}: {exc}; retrying")
            conn = None
        time.sleep(TALLY_EVERY)
    return 0


def check_tally() -> int:
    try:
        age = time.time() - os.stat(os.path.join(tally_dir(), "summary.json")).st_mtime
    except OSError as exc:
        print(f"no summary: {exc}")
        return 1
    print(f"summary written {age:.0f} s ago")
    return 0 if age <= TALLY_MAX_AGE else 1


ROLES = {"web": web, "worker": worker, "migrate": migrate, "tally": tally, "check-web": check_web,
         "check-worker": check_worker, "check-tally": check_tally}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ROLES:
        print(f"usage: poll {{{'|'.join(ROLES)}}}", file=sys.stderr)
        return 2
    return ROLES[argv[0]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
