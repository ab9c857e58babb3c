#!/bin/sh
# PostgreSQL 15 for the shop.
#  - First start (empty $PGDATA): initdb with superuser $POSTGRES_USER and password $POSTGRES_PASSWORD,
#    password (scram) auth over TCP, then create database $POSTGRES_DB.
#  - Every start: set the role's password from $POSTGRES_PASSWORD again (so a kept secret keeps working
#    and a rotated one takes effect), then run postgres in the foreground.
# The server runs as the image's postgres user via setpriv, because under systemd RootDirectory= the
# host's User= lookup would not know the image's users. The password never appears on a command line.
set -eu

: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${POSTGRES_PORT:=5432}"
bin=/usr/lib/postgresql/15/bin

# The password comes from POSTGRES_PASSWORD, or from the file named by POSTGRES_PASSWORD_FILE
# (compose secrets are mounted as /run/secrets/NAME).
if [ -z "${POSTGRES_PASSWORD:-}" ] && [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
    POSTGRES_PASSWORD=$(tr -d '\r\n' < "$POSTGRES_PASSWORD_FILE")
fi
if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "shop-db: no password: set POSTGRES_PASSWORD (the model injects \${secrets.db_password}) or POSTGRES_PASSWORD_FILE" >&2
    exit 1
fi

# Run a command as postgres (no-op when the container already runs as a non-root user).
as_postgres() {
    if [ "$(id -u)" = 0 ]; then
        setpriv --reuid=postgres --regid=postgres --init-groups "$@"
    else
        "$@"
    fi
}

# SQL string/identifier quoting: double the quote character.
sql_literal() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/''/g")"; }
sql_ident() { printf '"%s"' "$(printf '%s' "$1" | sed 's/"/""/g')"; }

# Statements in single-user mode (no network, no password needed); output is the server's echo.
single_user() { as_postgres "$bin/postgres" --single -D "$PGDATA" postgres >/dev/null; }

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    echo "shop-db: initialising $PGDATA"
    umask 077
    pwfile=$(mktemp /tmp/shop-db-pw.XXXXXX)
    trap 'rm -f "$pwfile"' EXIT
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    [ "$(id -u)" = 0 ] && chown postgres "$pwfile"
    as_postgres "$bin/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --no-locale >/dev/null
    rm -f "$pwfile"
    trap - EXIT
    cat >> "$PGDATA/pg_hba.conf" <<HBA
# shop: password login from any address (the network is the app's own)
host all all 0.0.0.0/0 scram-sha-256
host all all ::/0 scram-sha-256
HBA
    cat >> "$PGDATA/postgresql.conf" <<CONF
# shop
listen_addresses = '*'
unix_socket_directories = '/tmp'
CONF
    if [ "$POSTGRES_DB" != postgres ]; then
        echo "CREATE DATABASE $(sql_ident "$POSTGRES_DB")" | single_user
    fi
fi

echo "ALTER ROLE $(sql_ident "$POSTGRES_USER") PASSWORD $(sql_literal "$POSTGRES_PASSWORD")" | single_user

echo "shop-db: starting postgres on port $POSTGRES_PORT"
if [ "$(id -u)" = 0 ]; then
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$bin/postgres" -D "$PGDATA" -p "$POSTGRES_PORT"
fi
exec "$bin/postgres" -D "$PGDATA" -p "$POSTGRES_PORT"
