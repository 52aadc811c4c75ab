#!/usr/bin/env bash
# Until the first release, the schema is one migration (0001) generated from the models.
# After editing shared/store/models.py, run this to regenerate it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
rm -f shared/store/migrations/versions/0001_initial.py
.venv/bin/python - "$tmp/gen.sqlite" <<'PY'
import sys
from alembic import command
from shared.store.db import alembic_config
command.revision(alembic_config(f"sqlite+aiosqlite:///{sys.argv[1]}"), message="initial",
                 autogenerate=True, rev_id="0001")
PY
f=shared/store/migrations/versions/0001_initial.py
sed -i 's/astext_type=Text()/astext_type=sa.Text()/g' "$f"
.venv/bin/ruff check --fix -q "$f" || true
.venv/bin/ruff format -q "$f"
echo "[nbv] regenerated $f"
