#!/usr/bin/env bash
# Local infrastructure for tests and local runs: a real PostgreSQL and a real Kafka broker on
# loopback (see postgres.sh and kafka.sh beside this file).
#
#   deploy/local/infra.sh up|down|status|env
#
# up      start both in parallel, wait for both, write $NBV_STATE_DIR/infra.env
# down    stop both
# status  exit 0 when both answer
# env     print infra.env (export lines; use: eval "$(deploy/local/infra.sh env)")
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd -- "$SCRIPT_DIR/../.." && pwd -P)"
STATE_DIR="${NBV_STATE_DIR:-$REPO_ROOT/.nbv}"
ENV_FILE="$STATE_DIR/infra.env"

log() { printf '[nbv-infra] %s\n' "$*" >&2; }
die() { printf '[nbv-infra] ERROR: %s\n' "$*" >&2; exit 1; }

write_env() {
  mkdir -p "$STATE_DIR"
  local tmp="$ENV_FILE.tmp.$$"
  {
    printf 'export NBV_DATABASE_URL=%s\n' "$("$SCRIPT_DIR/postgres.sh" url)"
    printf 'export NBV_KAFKA_BOOTSTRAP=%s\n' "$("$SCRIPT_DIR/kafka.sh" bootstrap)"
  } >"$tmp"
  mv -f "$tmp" "$ENV_FILE"
}

cmd_up() {
  local t0=$SECONDS pg_rc=0 kafka_rc=0 pg_pid kafka_pid
  log "starting PostgreSQL and Kafka (state $STATE_DIR)"
  "$SCRIPT_DIR/postgres.sh" start </dev/null &
  pg_pid=$!
  "$SCRIPT_DIR/kafka.sh" start </dev/null &
  kafka_pid=$!
  wait "$pg_pid" || pg_rc=$?
  wait "$kafka_pid" || kafka_rc=$?
  [ "$pg_rc" -eq 0 ] || log "PostgreSQL failed to start (exit $pg_rc)"
  [ "$kafka_rc" -eq 0 ] || log "Kafka failed to start (exit $kafka_rc)"
  if [ "$pg_rc" -ne 0 ] || [ "$kafka_rc" -ne 0 ]; then die "infra up failed"; fi
  write_env
  log "up in $((SECONDS - t0))s; env in $ENV_FILE:"
  sed 's/^/[nbv-infra]   /' "$ENV_FILE" >&2
}

cmd_down() {
  local rc=0
  "$SCRIPT_DIR/kafka.sh" stop || rc=1
  "$SCRIPT_DIR/postgres.sh" stop || rc=1
  return "$rc"
}

cmd_status() {
  local rc=0
  "$SCRIPT_DIR/postgres.sh" status || rc=3
  "$SCRIPT_DIR/kafka.sh" status || rc=3
  return "$rc"
}

cmd_env() {
  [ -f "$ENV_FILE" ] || write_env
  cat "$ENV_FILE"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) printf 'usage: %s up|down|status|env\n' "$0" >&2; exit 2 ;;
esac
