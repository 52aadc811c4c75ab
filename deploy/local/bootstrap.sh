#!/usr/bin/env bash
# Create .venv with NBV and its dev tools installed (skipped when already up to date).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
say() { printf '[nbv] %s\n' "$*"; }

python="${NBV_PYTHON:-}"
if [[ -z "$python" ]]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 13)))'; then
      python="$candidate"
      break
    fi
  done
fi
[[ -n "$python" ]] || { echo "[nbv] Python 3.11 or 3.12 is required" >&2; exit 1; }

if [[ ! -x .venv/bin/python ]]; then
  if ! "$python" -m venv .venv 2>/dev/null; then
    say "installing python3-venv"
    sudo_cmd=""; [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq python3-venv
    rm -rf .venv && "$python" -m venv .venv
  fi
fi

stamp=".venv/.nbv-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  say "installing Python dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
