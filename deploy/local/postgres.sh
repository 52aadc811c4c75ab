#!/usr/bin/env bash
# A real PostgreSQL server of our own (not the system cluster) on loopback, for tests and local runs.
#
#   deploy/local/postgres.sh start|stop|restart|status|url|reset
#
# start   install PostgreSQL with apt if missing, initdb on first use, start, wait until ready,
#         ensure role nbv/nbv (superuser) and databases nbv + nbv_test. Reuses a server already
#         answering on the port (exit 0).
# stop    fast shutdown of our cluster (never touches a server this script did not start).
# status  exit 0 when the port answers (pg_isready), 3 otherwise.
# url     prints postgresql+asyncpg://nbv:nbv@127.0.0.1:<port>/nbv
# reset   stop and delete the cluster's data dir (next start runs initdb again).
#
# Env: NBV_PG_PORT (55432), NBV_STATE_DIR (<repo>/.nbv), NBV_PG_START_TIMEOUT (60).
# As root the server runs as user postgres (it refuses root); the cluster lives in
# $NBV_STATE_DIR/pg, or in /var/tmp/nbv-<hash>/pg when user postgres cannot reach that path.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd -- "$SCRIPT_DIR/../.." && pwd -P)"

PORT="${NBV_PG_PORT:-55432}"
STATE_DIR="${NBV_STATE_DIR:-$REPO_ROOT/.nbv}"
START_TIMEOUT="${NBV_PG_START_TIMEOUT:-60}"
PG_USER=nbv
PG_PASSWORD=nbv
DATABASES=(nbv nbv_test)

log() { printf '[nbv-infra] postgres: %s\n' "$*" >&2; }
die() { printf '[nbv-infra] postgres: ERROR: %s\n' "$*" >&2; exit 1; }

IS_ROOT=0
[ "$(id -u)" -eq 0 ] && IS_ROOT=1

as_root() {
  if [ "$IS_ROOT" = 1 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else die "need root (or sudo) to run: $*"
  fi
}

# Debian's server binaries: /usr/lib/postgresql/<newest>/bin (not whatever is first on PATH).
find_bindir() {
  local d best=""
  for d in /usr/lib/postgresql/*/bin; do
    if [ ! -x "$d/initdb" ] || [ ! -x "$d/pg_ctl" ] || [ ! -x "$d/postgres" ]; then continue; fi
    if [ -z "$best" ] || [ "$(basename "$(dirname "$d")")" -gt "$(basename "$(dirname "$best")")" ] 2>/dev/null; then
      best="$d"
    fi
  done
  [ -n "$best" ] && printf '%s\n' "$best"
}

ensure_server() {
  BINDIR="$(find_bindir || true)"
  if [ -z "$BINDIR" ]; then
    command -v apt-get >/dev/null 2>&1 || die "no PostgreSQL server found and no apt-get to install one"
    log "PostgreSQL server not found; installing with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    BINDIR="$(find_bindir || true)"
    [ -n "$BINDIR" ] || die "apt-get install postgresql did not provide /usr/lib/postgresql/*/bin/initdb"
  fi
}

# Where the cluster lives, and who runs it.
RUN_AS=()
choose_dirs() {
  PG_DIR="$STATE_DIR/pg"
  if [ "$IS_ROOT" = 1 ]; then
    id -u postgres >/dev/null 2>&1 || die "user postgres does not exist (is the postgresql package installed?)"
    RUN_AS=(runuser -u postgres --)
    mkdir -p "$STATE_DIR"
    if ! runuser -u postgres -- test -x "$STATE_DIR"; then
      local hash
      hash="$(printf '%s' "$STATE_DIR" | sha256sum | cut -c1-12)"
      PG_DIR="/var/tmp/nbv-$hash/pg"
      log "user postgres cannot traverse $STATE_DIR; using $PG_DIR"
      mkdir -p "/var/tmp/nbv-$hash"
      chmod 755 "/var/tmp/nbv-$hash"
    fi
  fi
  DATA_DIR="$PG_DIR/data"
  SOCK_DIR="$PG_DIR/run"
  # A Unix socket path must stay under ~107 bytes; a deep checkout gets a short one in /tmp.
  if [ "${#SOCK_DIR}" -gt 80 ]; then
    SOCK_DIR="/tmp/nbv-pg-$(id -u)-$(printf '%s' "$PG_DIR" | sha256sum | cut -c1-12)"
  fi
  LOG_FILE="$PG_DIR/postgres.log"
}

# Run a command as the cluster owner, from a directory that user can read.
# fd 9 (our lock) is closed so a server started from here does not hold it.
pgrun() { (cd / && "${RUN_AS[@]}" "$@" 9>&-); }

log_tail() {
  if [ -f "$LOG_FILE" ]; then
    printf '[nbv-infra] postgres: ---- last 40 lines of %s ----\n' "$LOG_FILE" >&2
    tail -n 40 "$LOG_FILE" >&2 || true
    printf '[nbv-infra] postgres: ----\n' >&2
  fi
}

is_ready() { "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 2 >/dev/null 2>&1; }

# Is the server in our data dir running? (pg_ctl status: 0 running, 3 not running, 4 no data dir)
ours_running() { [ -f "$DATA_DIR/PG_VERSION" ] && pgrun "$BINDIR/pg_ctl" -D "$DATA_DIR" status >/dev/null 2>&1; }

write_conf() {
  # Regenerated on every start (port or paths may change); included from postgresql.conf.
  pgrun tee "$DATA_DIR/nbv.conf" >/dev/null <<EOF
# Written by deploy/local/postgres.sh on every start; edits here are lost.
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$SOCK_DIR'
max_connections = 200
shared_buffers = 64MB
# Durability stays on (fsync, synchronous_commit, full_page_writes: defaults).
log_line_prefix = '%m [%p] %q%u@%d '
log_min_messages = warning
log_timezone = 'UTC'
timezone = 'UTC'
EOF
}

init_cluster() {
  log "initdb in $DATA_DIR ($("$BINDIR/postgres" --version))"
  rm -rf "$DATA_DIR"
  mkdir -p "$PG_DIR"
  if [ "$IS_ROOT" = 1 ]; then chown postgres:postgres "$PG_DIR"; fi
  pgrun mkdir -p "$DATA_DIR" "$SOCK_DIR"
  pgrun chmod 700 "$DATA_DIR"
  if ! pgrun "$BINDIR/initdb" -D "$DATA_DIR" -U postgres -E UTF8 --no-locale \
        --auth-local=trust --auth-host=scram-sha-256 >"$PG_DIR/initdb.log" 2>&1; then
    cat "$PG_DIR/initdb.log" >&2
    die "initdb failed"
  fi
  printf "\ninclude_if_exists = 'nbv.conf'\n" | pgrun tee -a "$DATA_DIR/postgresql.conf" >/dev/null
}

psql_admin() {
  pgrun "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCK_DIR" -p "$PORT" -U postgres -d postgres "$@"
}

ensure_role_and_dbs() {
  psql_admin <<SQL
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
    CREATE ROLE $PG_USER LOGIN SUPERUSER PASSWORD '$PG_PASSWORD';
  END IF;
END
\$\$;
SQL
  local db
  for db in "${DATABASES[@]}"; do
    if [ -z "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
      psql_admin -c "CREATE DATABASE $db OWNER $PG_USER"
      log "created database $db"
    fi
  done
}

cmd_start() {
  ensure_server
  choose_dirs
  if is_ready; then
    if ours_running; then
      log "already running on 127.0.0.1:$PORT (cluster $DATA_DIR)"
      ensure_role_and_dbs
    else
      log "127.0.0.1:$PORT already answers; reusing it (not started by this script)"
    fi
    return 0
  fi
  local t0=$SECONDS
  if [ ! -f "$DATA_DIR/PG_VERSION" ]; then
    init_cluster
  fi
  if [ "$IS_ROOT" = 1 ]; then
    chown postgres:postgres "$PG_DIR"
  fi
  pgrun mkdir -p "$SOCK_DIR"
  write_conf
  log "starting PostgreSQL on 127.0.0.1:$PORT (data $DATA_DIR)"
  if [ -f "$LOG_FILE" ]; then pgrun mv -f "$LOG_FILE" "$LOG_FILE.1"; fi
  if ! pgrun "$BINDIR/pg_ctl" -D "$DATA_DIR" -l "$LOG_FILE" -w -t "$START_TIMEOUT" start >/dev/null; then
    log_tail
    die "pg_ctl start failed (port $PORT taken by something else? see $LOG_FILE)"
  fi
  local deadline=$((SECONDS + START_TIMEOUT))
  until is_ready; do
    if [ "$SECONDS" -ge "$deadline" ]; then log_tail; die "not ready after ${START_TIMEOUT}s"; fi
    sleep 0.3
  done
  if ! ensure_role_and_dbs; then
    log_tail
    die "could not create role/databases"
  fi
  log "ready on 127.0.0.1:$PORT ($((SECONDS - t0))s)"
}

cmd_stop() {
  ensure_server
  choose_dirs
  if ours_running; then
    log "stopping (cluster $DATA_DIR)"
    if ! pgrun "$BINDIR/pg_ctl" -D "$DATA_DIR" -m fast -w -t 60 stop >/dev/null; then
      log_tail
      die "pg_ctl stop failed"
    fi
    log "stopped"
  elif is_ready; then
    log "127.0.0.1:$PORT is served by a server this script did not start; leaving it alone"
  else
    log "not running"
  fi
}

cmd_status() {
  ensure_server
  choose_dirs
  if is_ready; then
    if ours_running; then
      log "running on 127.0.0.1:$PORT (cluster $DATA_DIR)"
    else
      log "127.0.0.1:$PORT answers (not started by this script)"
    fi
    return 0
  fi
  log "not running (cluster $DATA_DIR)"
  return 3
}

cmd_reset() {
  cmd_stop
  log "deleting $PG_DIR"
  rm -rf "$PG_DIR"
}

# One start/stop/reset at a time per state dir (e.g. parallel test workers calling start).
take_lock() {
  mkdir -p "$STATE_DIR"
  exec 9>"$STATE_DIR/.pg.lock"
  if command -v flock >/dev/null 2>&1 && ! flock -w 300 9; then die "timed out waiting for $STATE_DIR/.pg.lock"; fi
}

case "${1:-}" in
  start) take_lock; cmd_start ;;
  stop) take_lock; cmd_stop ;;
  restart) take_lock; cmd_stop; cmd_start ;;
  status) cmd_status ;;
  url) printf 'postgresql+asyncpg://%s:%s@127.0.0.1:%s/nbv\n' "$PG_USER" "$PG_PASSWORD" "$PORT" ;;
  reset) take_lock; cmd_reset ;;
  *) printf 'usage: %s start|stop|restart|status|url|reset\n' "$0" >&2; exit 2 ;;
esac
