#!/usr/bin/env bash
# Start (or reuse) a throwaway PostgreSQL server for the integration suite.
#
#   eval "$(.ci/postgres.sh)"          # start; exports SPECTRAWATCH_TEST_POSTGRES_URL
#   .ci/postgres.sh stop               # stop it (data dir kept; `clean` removes it)
#
# Idempotent: installs the Debian `postgresql` package only when no server binaries are found,
# reuses a cluster already running on the port, and creates the role/database only if missing.
# The server listens on 127.0.0.1 only, with a data dir under /tmp and durability settings off
# (fsync, synchronous_commit): it is a test fixture, not a database to keep.
# Only the `export ...` line goes to stdout; everything else goes to stderr.
#
# Environment: SPECTRAWATCH_PG_PORT (54329), SPECTRAWATCH_PG_DATA (/tmp/spectrawatch-pg-<port>),
# SPECTRAWATCH_PG_USER/PASSWORD/DB (spectrawatch).
set -euo pipefail

PORT="${SPECTRAWATCH_PG_PORT:-54329}"
DATA="${SPECTRAWATCH_PG_DATA:-/tmp/spectrawatch-pg-${PORT}}"
ROLE="${SPECTRAWATCH_PG_USER:-spectrawatch}"
PASSWORD="${SPECTRAWATCH_PG_PASSWORD:-spectrawatch}"
DB="${SPECTRAWATCH_PG_DB:-spectrawatch}"
SOCKDIR="${DATA}/socket"

log() { echo "postgres.sh: $*" >&2; }

find_bindir() {
  local dir
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [[ -n "${dir}" && -x "${dir}/initdb" ]]; then
    echo "${dir}"
  elif command -v initdb >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
  fi
}

BINDIR="$(find_bindir)"
if [[ -z "${BINDIR}" ]]; then
  if [[ "$(id -u)" -ne 0 ]]; then
    log "PostgreSQL is not installed and this is not root: apt-get install postgresql first"
    exit 1
  fi
  log "installing PostgreSQL from Debian packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends postgresql >&2
  BINDIR="$(find_bindir)"
fi
# PgBouncer (transaction pooling tests in test_postgres_ops.py; they skip without it): the
# Debian package, its service not started (the tests run their own on a free port).
if [[ "${1:-start}" == "start" && "$(id -u)" -eq 0 ]] && ! command -v pgbouncer >/dev/null \
    && [[ ! -x /usr/sbin/pgbouncer ]]; then
  log "installing PgBouncer from Debian packages"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pgbouncer >&2 \
    || log "PgBouncer could not be installed: its tests will skip"
  if command -v invoke-rc.d >/dev/null; then invoke-rc.d pgbouncer stop >/dev/null 2>&1 || true; fi
fi

# PostgreSQL refuses to run as root: use the package's `postgres` account then.
if [[ "$(id -u)" -eq 0 ]]; then
  RUNAS=(runuser -u postgres --)
  id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
else
  RUNAS=()
fi
pg() { "${RUNAS[@]}" "${BINDIR}/$1" "${@:2}"; }

case "${1:-start}" in
  stop)
    if [[ -f "${DATA}/PG_VERSION" ]]; then pg pg_ctl -D "${DATA}" -m fast -w stop >&2 || true; fi
    exit 0
    ;;
  clean)
    if [[ -f "${DATA}/PG_VERSION" ]]; then pg pg_ctl -D "${DATA}" -m fast -w stop >&2 || true; fi
    rm -rf "${DATA}"
    exit 0
    ;;
  start) ;;
  *) log "usage: $0 [start|stop|clean]"; exit 2 ;;
esac

if [[ ! -f "${DATA}/PG_VERSION" ]]; then
  log "initialising a cluster in ${DATA}"
  mkdir -p "${DATA}"
  [[ "$(id -u)" -eq 0 ]] && chown postgres: "${DATA}"
  chmod 700 "${DATA}"
  pg initdb -D "${DATA}" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >&2
fi
mkdir -p "${SOCKDIR}"
[[ "$(id -u)" -eq 0 ]] && chown postgres: "${SOCKDIR}"

if pg pg_ctl -D "${DATA}" status >/dev/null 2>&1; then
  log "reusing the server already running from ${DATA}"
else
  log "starting on 127.0.0.1:${PORT}"
  pg pg_ctl -D "${DATA}" -l "${DATA}/server.log" -w -t 60 start -o \
    "-p ${PORT} -c listen_addresses=127.0.0.1 -k ${SOCKDIR} -c fsync=off \
     -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" >&2
fi

psql_admin() {
  pg psql -h "${SOCKDIR}" -p "${PORT}" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt "$@"
}
if [[ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '${ROLE}'")" != "1" ]]; then
  log "creating role ${ROLE}"
  psql_admin -c "CREATE ROLE \"${ROLE}\" LOGIN CREATEDB PASSWORD '${PASSWORD}'" >&2
fi
if [[ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '${DB}'")" != "1" ]]; then
  log "creating database ${DB}"
  psql_admin -c "CREATE DATABASE \"${DB}\" OWNER \"${ROLE}\"" >&2
fi

echo "export SPECTRAWATCH_TEST_POSTGRES_URL=postgresql+psycopg://${ROLE}:${PASSWORD}@127.0.0.1:${PORT}/${DB}"
