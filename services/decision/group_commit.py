"""Deciding and logging a batch of requests in one transaction: the decisions are read, made,
logged and published together, and committed once.

On PostgreSQL the transaction begins with the erasure fence, before the read (one round trip
for both), so the read itself proves that nobody in it was erased: an erasure that committed
before the fence was granted is in the read's snapshot (the person is not found, and answered
as unknown), and one that comes later waits for the commit, then erases what was logged. The
log's insert needs no look-up in the erasure ledger, and the decision path has one queue (the
batcher's) and one connection: before, a request's decisions were read outside any
transaction, then handed to a writer task that took the fence, checked the ledger and logged
them, which cost a second wait and a round trip (docs/decision.md, "Benchmark").

The statements run on the driver (asyncpg), in a transaction this module begins and ends
itself: SQLAlchemy's would add a round trip (its own BEGIN) and does not know of this one, so
whatever reads on the connection meanwhile reads on the driver too (``shared.store.driver``).

A decision is logged, then published, then committed: its answer is sent only once it is
logged and published, or refused if that failed (the publish comes after the insert so that a
decision the log refuses is never published). If the commit itself fails after the publish,
the decision was published and not logged, the one window left (the delivery side ignores a
decision it cannot find, and the request gets an error).

On SQLite (embedded mode) the read stays outside the write transaction (a read-then-write
transaction there fails when another connection wrote in between); the write checks the
erasure ledger instead and drops the decisions of people erased since the read.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.decision.decision_log import write_decisions, write_decisions_pg
from services.decision.engine import Decided, DecisionRequest, UnknownUser
from services.ingest.erasure import BEGIN_FENCED_SQL, ErasureGuard
from shared.metrics import DECISION_COMMIT_BATCH
from shared.store import driver as store_driver
from shared.store.lending import GENERIC_PLANS, ConnectionLender

log = logging.getLogger(__name__)

DecideMany = Callable[
    [AsyncConnection, Sequence[DecisionRequest]], Awaitable[list[Decided | UnknownUser]]
]
Publish = Callable[[Sequence[Decided]], Awaitable[None]]


class DecisionCommitter:
    def __init__(
        self,
        engine: AsyncEngine,
        pseudonym_key: bytes | None,
        decide_many: DecideMany,
        publish: Publish,
        connections: int,
    ) -> None:
        self._engine = engine
        # None: nobody can have been erased (erasure is refused without a key).
        self._guard = ErasureGuard(key=pseudonym_key)
        self._decide_many = decide_many
        self._publish = publish
        # On PostgreSQL, each batch runs on a lent connection (shared.store.lending) with
        # generic plans: its statements find people by key. SQLite's small pool (15) is left
        # to SQLAlchemy: the embedded process's other services share it.
        self._connections = (
            ConnectionLender(engine, connections, settings=GENERIC_PLANS)
            if engine.dialect.name == "postgresql"
            else None
        )

    async def decide(self, requests: Sequence[DecisionRequest]) -> list[Decided | UnknownUser]:
        """Decide ``requests`` (``DecisionEngine.decide_many``), log and publish the
        decisions, commit; in order, UnknownUser for a person the view does not know (or who
        was erased since the read, on SQLite). Raises what deciding or writing raised: then
        nothing of the batch is logged."""
        if self._connections is None:
            return await self._decide_then_write(requests)
        async with self._fenced() as (connection, driver):
            results = await self._decide_many(connection, requests)
            decided = [r for r in results if isinstance(r, Decided)]
            if decided:
                DECISION_COMMIT_BATCH.observe(len(decided))
                await write_decisions_pg(
                    driver, [d.log for d in decided], [c for d in decided for c in d.contacts]
                )
                await self._publish(decided)
        return results

    async def close(self) -> None:
        """After the last decision: the lent connections go back to the pool."""
        if self._connections is not None:
            await self._connections.close()

    @contextlib.asynccontextmanager
    async def _fenced(self) -> AsyncIterator[tuple[AsyncConnection, Any]]:
        """A transaction that holds the erasure fence, committed when the block ends: the
        connection, and the asyncpg connection under it."""
        assert self._connections is not None
        async with self._connections.connect() as connection:
            driver: Any = await store_driver.driver_connection(connection)
            try:
                await driver.execute(BEGIN_FENCED_SQL)
                yield connection, driver
                await driver.execute("COMMIT")
            except BaseException:
                # SQLAlchemy knows nothing of this transaction: end it here, or discard the
                # connection if it cannot be (lost, or interrupted mid-statement).
                try:
                    if driver.is_in_transaction():
                        await driver.execute("ROLLBACK")
                except BaseException:
                    await connection.invalidate()
                else:
                    if driver.is_closed():
                        await connection.invalidate()
                raise

    async def _decide_then_write(
        self, requests: Sequence[DecisionRequest]
    ) -> list[Decided | UnknownUser]:
        async with self._engine.connect() as connection:
            results = await self._decide_many(connection, requests)
        decided = [r for r in results if isinstance(r, Decided)]
        if not decided:
            return results
        DECISION_COMMIT_BATCH.observe(len(decided))
        async with self._engine.connect() as connection, connection.begin():
            erased = await self._guard.erased(connection, {d.message.user_id for d in decided})
            kept = [d for d in decided if d.message.user_id not in erased]
            await write_decisions(
                connection, [d.log for d in kept], [c for d in kept for c in d.contacts]
            )
            await self._publish(kept)
        return [
            UnknownUser(r.message.user_id)
            if isinstance(r, Decided) and r.message.user_id in erased
            else r
            for r in results
        ]
