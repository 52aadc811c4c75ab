import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.store.db import create_engine
from shared.store.lending import ConnectionLender


@pytest.fixture
async def engine(tmp_path: Path):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'lend.sqlite'}")
    yield engine
    await engine.dispose()


async def _checked_out(engine: AsyncEngine) -> int:
    return int(engine.sync_engine.pool.checkedout())  # type: ignore[attr-defined]


async def test_a_connection_is_lent_again_and_comes_back_without_a_transaction(
    engine: AsyncEngine,
) -> None:
    lender = ConnectionLender(engine, size=2)
    async with lender.connect() as first:
        await first.execute(text("select 1"))  # SQLAlchemy begins a transaction here
        assert first.in_transaction()
    assert lender.idle == 1
    async with lender.connect() as again:
        assert again is first
        assert not again.in_transaction()
    assert await _checked_out(engine) == 1  # kept out of the pool
    await lender.close()
    assert lender.idle == 0
    assert await _checked_out(engine) == 0
    with pytest.raises(RuntimeError, match="closed"):
        async with lender.connect():
            pass


async def test_a_dead_or_old_connection_goes_back_to_the_pool(engine: AsyncEngine) -> None:
    lender = ConnectionLender(engine, size=1)
    async with lender.connect() as first:
        await first.invalidate()
    assert lender.idle == 0
    async with lender.connect() as second:
        assert second is not first
        await second.execute(text("select 1"))

    old = ConnectionLender(engine, size=1, max_age_s=0.0)
    async with old.connect():
        pass
    assert old.idle == 0
    await lender.close()
    assert await _checked_out(engine) == 0


async def test_an_error_in_the_block_still_gives_the_connection_back(engine: AsyncEngine) -> None:
    lender = ConnectionLender(engine, size=1)
    with pytest.raises(LookupError):
        async with lender.connect() as connection:
            await connection.execute(text("select 1"))
            raise LookupError("unknown user")
    assert lender.idle == 1
    await lender.close()


async def test_at_most_size_connections_are_lent_at_once(engine: AsyncEngine) -> None:
    lender = ConnectionLender(engine, size=2)
    inside = 0
    most = 0

    async def borrow() -> None:
        nonlocal inside, most
        async with lender.connect() as connection:
            inside += 1
            most = max(most, inside)
            await connection.execute(text("select 1"))
            await asyncio.sleep(0.01)
            inside -= 1

    await asyncio.gather(*(borrow() for _ in range(6)))
    assert most == 2
    assert lender.idle == 2
    await lender.close()
    with pytest.raises(ValueError):
        ConnectionLender(engine, size=0)
