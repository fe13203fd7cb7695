# shellcheck shell=bash
# Throwaway Postgres for tests: initdb + pg_ctl in a temp dir, on a free loopback
# port, stopped on exit. Source this file, then call `pg_throwaway_start`; it
# exports STACYVM_POSTGRES_TEST_DSN and registers `pg_throwaway_stop`.

pg_bindir() {
  local d
  for d in "${PG_BINDIR:-}" /usr/lib/postgresql/*/bin; do
    [ -n "$d" ] && [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
  return 1
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

pg_throwaway_start() {
  local bindir
  if ! bindir=$(pg_bindir); then
    if [ "${CI:-}" = "true" ] || [ "$(id -u)" = 0 ]; then
      echo "postgres server binaries not found; installing postgresql" >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
      bindir=$(pg_bindir) || { echo "initdb still not found" >&2; return 1; }
    else
      echo "postgres server binaries (initdb, pg_ctl) not found" >&2
      return 1
    fi
  fi
  PG_TMP=$(mktemp -d /tmp/stacyvm-pg.XXXXXX)
  PG_PORT=$(free_port)
  local run=()
  if [ "$(id -u)" = 0 ]; then
    # initdb and postgres refuse to run as root.
    chown postgres "$PG_TMP"
    run=(runuser -u postgres --)
  fi
  "${run[@]}" "$bindir/initdb" -D "$PG_TMP/data" -A trust -U stacyvm --no-sync >"$PG_TMP/initdb.log" 2>&1 \
    || { cat "$PG_TMP/initdb.log" >&2; return 1; }
  "${run[@]}" "$bindir/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/server.log" -w -t 30 \
    -o "-p $PG_PORT -k $PG_TMP -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" \
    start >/dev/null || { cat "$PG_TMP/server.log" >&2; return 1; }
  PG_CTL_RUN=("${run[@]}" "$bindir/pg_ctl" -D "$PG_TMP/data" -m fast -w stop)
  export STACYVM_POSTGRES_TEST_DSN="postgres://stacyvm@127.0.0.1:$PG_PORT/postgres"
  echo "throwaway postgres on 127.0.0.1:$PG_PORT ($PG_TMP)" >&2
}

pg_throwaway_stop() {
  if [ -n "${PG_TMP:-}" ] && [ -d "$PG_TMP/data" ]; then
    "${PG_CTL_RUN[@]}" >/dev/null 2>&1 || true
    rm -rf "$PG_TMP"
  fi
}
