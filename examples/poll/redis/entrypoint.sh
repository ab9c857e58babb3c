#!/bin/sh
# Redis for the poll app: the vote queue, no persistence (a vote in flight is lost with the process, as
# with any in-memory queue), no password (the network is the app's own). Listens on $REDIS_PORT (6379).
# Privileges are dropped with setpriv inside the image (see db/entrypoint.sh for why).
set -eu
set -- /usr/bin/redis-server --port "${REDIS_PORT:-6379}" --bind 0.0.0.0 --protected-mode no \
    --save "" --appendonly no --dir /tmp --logfile ""
if [ "$(id -u)" = 0 ]; then
    exec setpriv --reuid=redis --regid=redis --init-groups "$@"
fi
exec "$@"
