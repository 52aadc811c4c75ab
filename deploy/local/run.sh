#!/usr/bin/env bash
# Quick start: NBV in one process (embedded store and event log), on http://127.0.0.1:8000.
# With --kafka: the same three services against the local PostgreSQL and Kafka (started here).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
bash deploy/local/bootstrap.sh
if [[ "${1:-}" == "--kafka" ]]; then
  shift
  bash deploy/local/infra.sh up
  # shellcheck disable=SC1091
  source "${NBV_STATE_DIR:-$root/.nbv}/infra.env"
  export NBV_BUS=kafka
fi
exec .venv/bin/nbv run "$@"
