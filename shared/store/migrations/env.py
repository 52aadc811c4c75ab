"""Alembic environment: async engines, and an advisory lock so concurrent starts don't race."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from shared.store.models import Base

_LOCK_ID = 4_242_001


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # A transaction-level lock, taken in the migrations' own transaction: it is released
        # by that transaction's commit (or rollback), atomically. A session lock released by
        # hand before the commit let a waiting process in while the schema it would see was
        # still uncommitted: it found no version table, ran the migrations again and failed on
        # the first one's tables; and an unlock after a failed statement failed itself, hiding
        # the real error. The waiter's next statement sees the committed version.
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    # The lock's statement began the connection's transaction, so Alembic treats it as the
    # caller's and leaves committing it to us.
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()


async def _main() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = create_async_engine(url, poolclass=pool.NullPool)
    async with engine.connect() as conn:
        await conn.run_sync(_run)
    await engine.dispose()


asyncio.run(_main())
