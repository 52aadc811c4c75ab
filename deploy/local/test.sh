#!/usr/bin/env bash
# The test command: installs what the tests need (Python deps, PostgreSQL, Kafka), starts the
# real PostgreSQL and Kafka broker if none is running, then lint, type-check and the suite.
# Extra arguments go to pytest (e.g. deploy/local/test.sh -k loop).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
say() { printf '[nbv] %s\n' "$*"; }

bash deploy/local/bootstrap.sh

# Tools some tests drive for real: promtool/prometheus (alert rules, metrics lint, scraping)
# and headless Chromium (the in-app widget as a person sees it).
missing=()
command -v promtool >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  sudo_cmd=""; [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null && sudo_cmd="sudo"
  # policy-rc.d keeps the package's own server from starting on :9090.
  if [[ -z "$sudo_cmd" && $(id -u) -eq 0 && ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

bash deploy/local/infra.sh up
# shellcheck disable=SC1091
source "${NBV_STATE_DIR:-$root/.nbv}/infra.env"
export NBV_TEST_DATABASE_URL="$NBV_DATABASE_URL" NBV_TEST_KAFKA_BOOTSTRAP="$NBV_KAFKA_BOOTSTRAP"
export NBV_REQUIRE_INFRA=1
unset NBV_DATABASE_URL NBV_KAFKA_BOOTSTRAP

say "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
say "mypy"
.venv/bin/mypy .
say "pytest"
.venv/bin/python -m pytest -q "$@"
