#!/bin/sh
# PostgreSQL 15 for the poll app, with the conventions of the usual postgres images:
#  - the password from POSTGRES_PASSWORD, or from the file POSTGRES_PASSWORD_FILE names (a compose secret,
#    /run/secrets/db_password); it never appears on a command line;
#  - first start (empty $PGDATA): initdb with superuser $POSTGRES_USER, database $POSTGRES_DB, password (scram)
#    login over TCP, then every *.sql file of /docker-entrypoint-initdb.d in name order, run by psql over the
#    unix socket of a server that listens on nothing else;
#  - every start: the role's password set again from the secret (a kept secret keeps working);
#  - the server runs as the image's postgres user (setpriv: under systemd RootDirectory= the host's User=
#    lookup would not know the image's users), its unix socket in /tmp (the image's /run/postgresql is not
#    there on a systemd host, where /run is a fresh tmpfs), so health checks use `pg_isready -h /tmp`.
set -eu

: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${POSTGRES_PORT:=5432}"
bin=/usr/lib/postgresql/15/bin
initdir=/docker-entrypoint-initdb.d

if [ -z "${POSTGRES_PASSWORD:-}" ] && [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
    POSTGRES_PASSWORD=$(tr -d '\r\n' < "$POSTGRES_PASSWORD_FILE")
fi
if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "poll-db: no password: set POSTGRES_PASSWORD_FILE (a secret file) or POSTGRES_PASSWORD" >&2
    exit 1
fi

as_postgres() {
    if [ "$(id -u)" = 0 ]; then
        setpriv --reuid=postgres --regid=postgres --init-groups "$@"
    else
        "$@"
    fi
}
sql_literal() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/''/g")"; }
sql_ident() { printf '"%s"' "$(printf '%s' "$1" | sed 's/"/""/g')"; }

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    echo "poll-db: initialising $PGDATA"
    umask 077
    pwfile=$(mktemp /tmp/poll-db-pw.XXXXXX)
    trap 'rm -f "$pwfile"' EXIT
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    [ "$(id -u)" = 0 ] && chown postgres "$pwfile"
    as_postgres "$bin/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --no-locale >/dev/null
    rm -f "$pwfile"
    trap - EXIT
    cat >> "$PGDATA/pg_hba.conf" <<HBA
# poll: password login from any address (the network is the app's own)
host all all 0.0.0.0/0 scram-sha-256
host all all ::/0 scram-sha-256
HBA
    cat >> "$PGDATA/postgresql.conf" <<CONF
# poll
listen_addresses = '*'
unix_socket_directories = '/tmp'
CONF
    # A private server for the init scripts: the unix socket only, so nobody connects half-way.
    as_postgres "$bin/pg_ctl" -D "$PGDATA" -w -t 60 -o "-c listen_addresses='' -p $POSTGRES_PORT" start >/dev/null
    psql() { as_postgres /usr/bin/psql -v ON_ERROR_STOP=1 -q -X -h /tmp -p "$POSTGRES_PORT" -U "$POSTGRES_USER" "$@"; }
    if [ "$POSTGRES_DB" != postgres ]; then
        echo "CREATE DATABASE $(sql_ident "$POSTGRES_DB")" | psql -d postgres
    fi
    for f in "$initdir"/*.sql; do
        [ -e "$f" ] || continue
        echo "poll-db: running $f"
        # read as root (the file may be 0400 root), fed to psql on stdin
        psql -d "$POSTGRES_DB" < "$f"
    done
    as_postgres "$bin/pg_ctl" -D "$PGDATA" -w -t 60 -m fast stop >/dev/null
fi

echo "ALTER ROLE $(sql_ident "$POSTGRES_USER") PASSWORD $(sql_literal "$POSTGRES_PASSWORD")" |
    as_postgres "$bin/postgres" --single -D "$PGDATA" postgres >/dev/null

echo "poll-db: starting postgres on port $POSTGRES_PORT"
if [ "$(id -u)" = 0 ]; then
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$bin/postgres" -D "$PGDATA" -p "$POSTGRES_PORT"
fi
exec "$bin/postgres" -D "$PGDATA" -p "$POSTGRES_PORT"
