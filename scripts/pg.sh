#!/usr/bin/env bash
# A throwaway PostgreSQL server for tests and CI: a real server, in a temporary folder, on
# 127.0.0.1 and a free port, with password authentication.
#
#   bash scripts/pg.sh ensure        install PostgreSQL with apt-get if its server programs are
#                                    missing; print the folder holding initdb and pg_ctl
#   bash scripts/pg.sh start DIR     initialise and start a server whose files live in DIR (made
#                                    if missing; the folders above it must be open to the
#                                    postgres user, e.g. a folder in /tmp); print its URL,
#                                    postgresql://specbound:PASSWORD@127.0.0.1:PORT/specbound
#   bash scripts/pg.sh stop DIR      stop it (DIR is left for the caller to delete)
#
# initdb and pg_ctl refuse to run as root: as root they run as the `postgres` user, which then
# owns DIR. Exits non-zero, saying why, when no server can be had: a test that needs one fails.
set -euo pipefail

find_bin() {
  local initdb
  initdb=$(command -v initdb 2>/dev/null || true)
  if [ -z "$initdb" ]; then
    initdb=$(ls -1d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
  fi
  [ -n "$initdb" ] && dirname "$(readlink -f "$initdb")"
}

ensure() {
  local bin
  bin=$(find_bin || true)
  if [ -z "$bin" ]; then
    echo "PostgreSQL server programs not found; installing with apt-get ..." >&2
    if ! command -v apt-get >/dev/null; then
      echo "error: no initdb on this machine and no apt-get to install PostgreSQL" >&2
      exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    bin=$(find_bin || true)
    if [ -z "$bin" ]; then
      echo "error: apt-get installed postgresql but no initdb was found" >&2
      exit 1
    fi
  fi
  echo "$bin"
}

as_owner() {  # run a server program as the data folder's owner
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

start() {
  local dir=$1 bin port password
  bin=$(ensure)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
    chown postgres "$dir"
  fi
  chmod 700 "$dir"
  password=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')
  printf '%s\n' "$password" > "$dir/pw"
  [ "$(id -u)" = 0 ] && chown postgres "$dir/pw"
  as_owner "$bin/initdb" -D "$dir/data" -U specbound --pwfile="$dir/pw" \
    --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --no-instructions >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
  rm -f "$dir/pw"
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c fsync=off -c max_connections=200" \
    start >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
  as_owner "$bin/psql" -h "$dir" -p "$port" -U specbound -d postgres -q -c "CREATE DATABASE specbound" >/dev/null
  echo "postgresql://specbound:$password@127.0.0.1:$port/specbound"
}

stop() {
  local dir bin
  dir=$(cd "$1" && pwd)
  bin=$(find_bin)
  as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
}

case "${1:-}" in
  ensure) ensure ;;
  start) start "${2:?usage: pg.sh start DIR}" ;;
  stop) stop "${2:?usage: pg.sh stop DIR}" ;;
  *) echo "usage: bash scripts/pg.sh ensure | start DIR | stop DIR" >&2; exit 2 ;;
esac
