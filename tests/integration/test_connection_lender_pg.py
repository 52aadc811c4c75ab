"""A lender's session settings on real PostgreSQL connections: set on those it lends, reset
before a connection goes back to SQLAlchemy's pool."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.store.db import create_engine
from shared.store.lending import GENERIC_PLANS, ConnectionLender

pytestmark = pytest.mark.integration


async def _mode(connection: AsyncConnection) -> str:
    value = await connection.scalar(text("SHOW plan_cache_mode"))
    await connection.rollback()
    return str(value)


async def test_lent_connections_plan_generically_and_the_pool_gets_them_back_reset(
    pg_url: str,
) -> None:
    engine = create_engine(pg_url, pool_size=1)
    try:
        lender = ConnectionLender(engine, size=1, max_age_s=3600, settings=GENERIC_PLANS)
        async with lender.connect() as lent:
            assert await _mode(lent) == "force_generic_plan"
            await lent.execute(text("select 1"))  # left in a transaction: rolled back on return
        async with lender.connect() as again:
            assert again is lent
            assert await _mode(again) == "force_generic_plan"
        await lender.close()
        # The pool's one connection is the one the lender had: back to the default.
        async with engine.connect() as pooled:
            assert await _mode(pooled) == "auto"

        old = ConnectionLender(engine, size=1, max_age_s=0.0, settings=GENERIC_PLANS)
        async with old.connect() as lent:
            assert await _mode(lent) == "force_generic_plan"
            await lent.execute(text("select 1"))
        async with engine.connect() as pooled:
            assert await _mode(pooled) == "auto"
    finally:
        await engine.dispose()


async def test_settings_are_refused_where_they_cannot_be_reset() -> None:
    engine = create_engine("sqlite+aiosqlite:///:memory:")
    try:
        with pytest.raises(ValueError, match="PostgreSQL"):
            ConnectionLender(engine, size=1, settings=GENERIC_PLANS)
    finally:
        await engine.dispose()
