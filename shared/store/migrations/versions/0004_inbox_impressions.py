"""impression capping for in-app cards

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 14:10:00.000000

Two columns on the inbox (services/delivery/inbox.py): how many times a card was reported shown
since it was offered, and why it was closed when the delivery service withdrew it after
``NBV_INAPP_IMPRESSION_CAP`` impressions without an answer. Existing cards start at 0
impressions: a card already open gets the full number of impressions before it is withdrawn.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("inbox_items", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("impressions", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("closed_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inbox_items", schema=None) as batch_op:
        batch_op.drop_column("closed_reason")
        batch_op.drop_column("impressions")
