#!/bin/sh
# Create the cluster on first start (as the official image does: POSTGRES_USER, POSTGRES_PASSWORD,
# POSTGRES_DB), then run the server in the foreground on 127.0.0.1:$PGPORT only.
set -eu
data=/var/lib/postgresql/data
if [ ! -s "$data/PG_VERSION" ]; then
  pw=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pw"
  initdb --pgdata="$data" --username="$POSTGRES_USER" --pwfile="$pw" --encoding=UTF8 --locale=C --auth-local=trust \
    --auth-host=scram-sha-256 > /dev/null
  rm -f "$pw"
  pg_ctl --pgdata="$data" --options="-c listen_addresses='' -c unix_socket_directories=/tmp" --wait start > /dev/null
  psql --host=/tmp --username="$POSTGRES_USER" --dbname=postgres --quiet \
    --command="CREATE DATABASE \"$POSTGRES_DB\""
  pg_ctl --pgdata="$data" --wait stop > /dev/null
fi
exec postgres -D "$data" -c listen_addresses=127.0.0.1 -c port="${PGPORT:-5432}" -c unix_socket_directories=/tmp
