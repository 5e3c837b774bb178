#!/bin/bash
# The official postgres image's contract, for the stand-in image: on first start initialise PGDATA
# with superuser POSTGRES_USER (default postgres) whose password is POSTGRES_PASSWORD (required; read
# from a pipe, never a command line) and create POSTGRES_DB (default: the user's name); then run
# postgres in the foreground as the postgres user, listening on every interface with password
# (scram-sha-256) authentication; local socket connections (pg_isready, healthchecks) are trusted.
set -euo pipefail
if [ "${1:-postgres}" != postgres ]; then
    exec "$@"
fi
shift || true
: "${PGDATA:=/var/lib/postgresql/data}"
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" postgres "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgres: POSTGRES_PASSWORD is not set; refusing to create a database without a password" >&2
        exit 1
    fi
    echo "postgres: initialising $PGDATA (user $user, database $db)"
    initdb --username="$user" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") --encoding=UTF8 \
        --auth-local=trust --auth-host=scram-sha-256 -D "$PGDATA" >/dev/null
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$db" != postgres ]; then
        pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
        psql -v ON_ERROR_STOP=1 --username="$user" --dbname=postgres --set=db="$db" \
            <<< 'CREATE DATABASE :"db";' >/dev/null
        pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    fi
fi
exec postgres -c listen_addresses='*' "$@"
