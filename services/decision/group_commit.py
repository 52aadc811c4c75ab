"""Group commit of the decision log: the decisions of concurrent requests are logged, published
and committed together, in one transaction per batch instead of one per decision.

A request decides on its own (one read, outside any transaction), hands its decisions over, and
waits until they are committed: its answer is still sent only once its decisions are logged
and published, or refused if that failed. Up to two writer tasks drain the queue, each taking
everything queued when it starts a transaction; while they write, the next batch gathers. So
under load a transaction carries many decisions (its round trips, the fence, the erasure check
and the Kafka produce request are shared), and a decision that arrives during a write starts
its own at once instead of waiting for that one to finish (a second writer halves the wait).

Erasure: the reads take no lock, so a person may be erased between a request's read and the
write. The writer takes the erasure fence and then checks the ledger (a later statement, so a
fresh snapshot that sees any erasure that committed meanwhile) and drops such decisions; the
request then answers as for an unknown person.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from services.decision.decision_log import write_decisions, write_decisions_unless_erased
from services.decision.engine import Decided
from services.ingest.erasure import BEGIN_FENCED_SQL, ErasureGuard, pseudonym
from shared.metrics import DECISION_COMMIT_BATCH
from shared.store import driver as store_driver
from shared.store.lending import GENERIC_PLANS, ConnectionLender

log = logging.getLogger(__name__)

Publish = Callable[[Sequence[Decided]], Awaitable[None]]


@dataclass
class _Pending:
    decided: Sequence[Decided]
    # The people erased meanwhile (their decisions were dropped), or the write's error.
    done: asyncio.Future[set[str]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class DecisionCommitter:
    def __init__(
        self,
        engine: AsyncEngine,
        pseudonym_key: bytes | None,
        publish: Publish,
        max_decisions: int = 200,
        writers: int = 2,
    ) -> None:
        self._engine = engine
        # None: nobody can have been erased (erasure is refused without a key).
        self._key = pseudonym_key
        self._guard = ErasureGuard(key=pseudonym_key)
        self._publish = publish
        # Bounds a transaction's size (its statement's JSON, the produce request).
        self._max = max_decisions
        self._queue: deque[_Pending] = deque()
        self._max_writers = writers
        self._writers: set[asyncio.Task[None]] = set()
        # Each writer's transaction runs on a lent connection (shared.store.lending).
        self._connections = ConnectionLender(
            engine,
            writers,
            settings=GENERIC_PLANS if engine.dialect.name == "postgresql" else None,
        )

    async def commit(self, decided: Sequence[Decided]) -> set[str]:
        """Log, publish and commit ``decided``; returns the people whose decisions were
        dropped because they were erased since. Raises what the write raised."""
        if not decided:
            return set()
        pending = _Pending(decided)
        self._queue.append(pending)
        if len(self._writers) < self._max_writers:
            writer = asyncio.create_task(self._drain(), name="decision-log-writer")
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        return await pending.done

    async def close(self) -> None:
        """After the last commit: the writers' connections go back to the pool."""
        await self._connections.close()

    async def _drain(self) -> None:
        while self._queue:
            batch = [self._queue.popleft()]
            size = len(batch[0].decided)
            while self._queue and size + len(self._queue[0].decided) <= self._max:
                size += len(self._queue[0].decided)
                batch.append(self._queue.popleft())
            await self._write_batch(batch)

    async def _write_batch(self, batch: list[_Pending]) -> None:
        try:
            erased = await self._write([d for p in batch for d in p.decided])
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0], exc)
                return
            # One request's bad decision must not fail the others: each on its own.
            log.warning("decision log batch failed; writing its requests one by one")
            for pending in batch:
                try:
                    _settle(pending, await self._write(pending.decided))
                except Exception as one:
                    _settle(pending, one)
            return
        for pending in batch:
            _settle(pending, erased)

    async def _write(self, decided: Sequence[Decided]) -> set[str]:
        DECISION_COMMIT_BATCH.observe(len(decided))
        if self._engine.dialect.name == "postgresql":
            return await self._write_pg(decided)
        async with self._engine.connect() as connection, connection.begin():
            users = {d.message.user_id for d in decided}
            erased = await self._guard.erased(connection, users)
            kept = [d for d in decided if d.message.user_id not in erased]
            await write_decisions(
                connection,
                [d.log for d in kept],
                [c for d in kept for c in d.contacts],
            )
            await self._publish(kept)
        return erased

    async def _write_pg(self, decided: Sequence[Decided]) -> set[str]:
        """Three round trips on the driver: BEGIN with the fence, the inserts that leave out
        the erased, COMMIT (with the publish before it). SQLAlchemy's transaction would add
        two (its own BEGIN; the ledger lookup in a statement of its own)."""
        users = {d.message.user_id for d in decided}
        pseudonyms = {u: pseudonym(self._key, u) for u in users} if self._key else {}
        async with self._connections.connect() as connection:
            driver = await store_driver.driver_connection(connection)
            try:
                await driver.execute(BEGIN_FENCED_SQL)
                erased = await write_decisions_unless_erased(
                    driver,
                    [d.log for d in decided],
                    [c for d in decided for c in d.contacts],
                    pseudonyms,
                )
                await self._publish([d for d in decided if d.message.user_id not in erased])
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
        return erased


def _settle(pending: _Pending, outcome: set[str] | BaseException) -> None:
    if pending.done.done():  # the request was cancelled (client gone)
        return
    if isinstance(outcome, BaseException):
        pending.done.set_exception(outcome)
    else:
        pending.done.set_result(outcome)
