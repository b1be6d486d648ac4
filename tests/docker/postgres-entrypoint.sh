#!/bin/sh
# Create the cluster on first start (as the official image does), then run the server in the foreground.
set -eu
data=/var/lib/postgresql/data
if [ ! -s "$data/PG_VERSION" ]; then
  pw=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pw"
  initdb --pgdata="$data" --username="$POSTGRES_USER" --pwfile="$pw" --auth=scram-sha-256 >/dev/null
  rm -f "$pw"
  echo "CREATE DATABASE \"$POSTGRES_DB\";" | postgres --single -D "$data" postgres >/dev/null
fi
exec postgres -D "$data" -c listen_addresses=127.0.0.1 -c port="${PGPORT:-5432}" -c unix_socket_directories=/tmp
