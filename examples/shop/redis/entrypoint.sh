#!/bin/sh
# Redis for the shop: a cache of counters, so no persistence; listens on $REDIS_PORT (6379).
# With REDIS_PASSWORD set (the model injects ${secrets.redis_password}), or REDIS_PASSWORD_FILE naming a
# file holding it (compose secrets), clients must authenticate.
# The password goes into a 0600 config file, never onto the command line (visible in ps).
# Privileges are dropped inside the image with setpriv: under systemd RootDirectory= the host's
# User= lookup would not know the image's users.
set -eu

if [ -z "${REDIS_PASSWORD:-}" ] && [ -n "${REDIS_PASSWORD_FILE:-}" ]; then
    REDIS_PASSWORD=$(tr -d '\r\n' < "$REDIS_PASSWORD_FILE")
fi

umask 077
conf=$(mktemp /tmp/redis.XXXXXX)
cat > "$conf" <<CONF
port ${REDIS_PORT:-6379}
bind 0.0.0.0
protected-mode no
daemonize no
save ""
appendonly no
dir /tmp
logfile ""
CONF
if [ -n "${REDIS_PASSWORD:-}" ]; then
    printf 'requirepass "%s"\n' "$REDIS_PASSWORD" >> "$conf"
fi

if [ "$(id -u)" = 0 ]; then
    chown redis:redis "$conf"
    exec setpriv --reuid=redis --regid=redis --init-groups /usr/bin/redis-server "$conf"
fi
exec /usr/bin/redis-server "$conf"
