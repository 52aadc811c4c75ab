"""the decision log's JSON compressed with lz4

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 07:00:00.000000

Every decision writes a candidates document of about 11 kB (its JSON text; every element of
the library with its verdict or its scores), which PostgreSQL compresses when it stores it.
pglz, the default, cost the database about a fifth of its CPU per decision under the decision
benchmark (0.54 against 0.44 ms with lz4, docs/decision.md "Benchmark"), for documents 15 %
smaller. Only where the server has lz4 (PostgreSQL 14 or later, built with it, as the
distributions' and the official images' are); rows already written keep their compression.
"""

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("context", "candidates", "chosen")


def _has_lz4() -> bool:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    supported = bind.scalar(
        text(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
        )
    )
    return bool(supported)


def _compress(method: str) -> None:
    if _has_lz4():
        changes = ", ".join(f"ALTER COLUMN {c} SET COMPRESSION {method}" for c in _COLUMNS)
        op.execute(f"ALTER TABLE decisions {changes}")


def upgrade() -> None:
    _compress("lz4")


def downgrade() -> None:
    _compress("default")
