"""per-area recency in the user view

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 18:50:00.000000

Two JSON columns for the view's per-area recency (services/ingest/view.py): area -> UTC day ->
product usage, and area -> time of the newest support ticket. Existing rows get empty objects:
the recency fills in from the next events (a replay rebuilds it from the event log).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
_COLUMNS = ("area_daily_usage", "area_last_question")


def upgrade() -> None:
    with op.batch_alter_table("user_views", schema=None) as batch_op:
        for name in _COLUMNS:
            batch_op.add_column(sa.Column(name, _JSON, server_default="{}", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("user_views", schema=None) as batch_op:
        for name in reversed(_COLUMNS):
            batch_op.drop_column(name)
