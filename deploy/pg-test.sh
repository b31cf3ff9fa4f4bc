#!/usr/bin/env bash
# A throw-away PostgreSQL server for the tests, without systemd:
#   deploy/pg-test.sh start   initdb (as user postgres) + pg_ctl start on 127.0.0.1:$PGPORT
#   deploy/pg-test.sh stop
# Prints nothing but errors; the URL is postgres://postgres@127.0.0.1:$PGPORT/postgres.
set -euo pipefail
PGPORT="${PGPORT:-55432}"
PGDATA="${PGDATA:-/tmp/anatomy-node-pg}"
bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"

as_postgres() {
    if [[ "$(id -un)" == postgres ]]; then "$@"; elif [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}

case "${1:-}" in
start)
    if [[ ! -f "$PGDATA/PG_VERSION" ]]; then
        mkdir -p "$PGDATA"
        chown postgres:postgres "$PGDATA" 2>/dev/null || sudo chown postgres:postgres "$PGDATA"
        as_postgres "$bin/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 >/dev/null
    fi
    if ! as_postgres "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
        as_postgres "$bin/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w -t 60 \
            -o "-p $PGPORT -k $PGDATA -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=on" start >/dev/null
    fi
    ;;
stop)
    as_postgres "$bin/pg_ctl" -D "$PGDATA" -m fast stop >/dev/null 2>&1 || true
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
