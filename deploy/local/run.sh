#!/usr/bin/env bash
# Quick start: NBV in one process (embedded store and event log), on http://127.0.0.1:8000.
# With --kafka: the same three services against the local PostgreSQL and Kafka (started here).
# The API needs a key: the first run makes a quick-start admin key, kept in .nbv/quickstart.key
# (mode 600) and used as NBV_ADMIN_KEY unless that is set already (docs/security.md).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
bash deploy/local/bootstrap.sh
state="${NBV_STATE_DIR:-$root/.nbv}"
if [[ "${1:-}" == "--kafka" ]]; then
  shift
  bash deploy/local/infra.sh up
  # shellcheck disable=SC1091
  source "$state/infra.env"
  export NBV_BUS=kafka
fi
if [[ -z "${NBV_ADMIN_KEY:-}" ]]; then
  keyfile="$state/quickstart.key"
  if [[ ! -s "$keyfile" ]]; then
    mkdir -p "$state"
    (umask 077 && .venv/bin/nbv keys generate >"$keyfile.tmp")
    mv "$keyfile.tmp" "$keyfile"
  fi
  chmod 600 "$keyfile"
  NBV_ADMIN_KEY="$(<"$keyfile")"
  export NBV_ADMIN_KEY
  shown="${keyfile#"$root"/}"
  printf '[nbv] admin API key in %s; send it with every request, e.g.\n' "$shown"
  printf '[nbv]   export NBV_KEY=$(cat %s)\n' "$shown"
  printf '[nbv]   curl -H "Authorization: Bearer $NBV_KEY" localhost:%s/v1/admin/keys\n' \
    "${NBV_PORT:-8000}"
fi
exec .venv/bin/nbv run "$@"
