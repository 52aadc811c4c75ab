"""Connections kept out of SQLAlchemy's pool and lent for the hot path's driver statements.

Borrowing a connection from SQLAlchemy's async pool and giving it back costs more CPU than the
decision's read on it: a greenlet hop each way, the pool's bookkeeping and events, and a task
that shields the close (0.15–0.2 ms a request, measured in-process: docs/decision.md,
"Benchmark"). A lender keeps up to ``size`` connections checked out and lends them in turn,
each to one caller at a time, the most recently used first (its buffers are warm).

A connection comes back as SQLAlchemy would take it back: with no transaction (one the
caller's statement began through SQLAlchemy is rolled back; a caller running its own BEGIN on
the driver ends it itself, as the group commit does). One that died (invalidated, by
``shared.store.driver`` or SQLAlchemy), that could not be reset, or that is older than the
pool's recycle age goes back to SQLAlchemy instead, which discards or recycles it; the next
caller opens another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.store.db import POOL_RECYCLE_S

log = logging.getLogger(__name__)


class ConnectionLender:
    def __init__(self, engine: AsyncEngine, size: int, max_age_s: float = POOL_RECYCLE_S) -> None:
        if size < 1:
            raise ValueError("a lender needs at least one connection")
        self._engine = engine
        self._max_age_s = max_age_s
        self._slots = asyncio.Semaphore(size)
        self._idle: list[tuple[AsyncConnection, float]] = []
        self._closed = False

    @property
    def idle(self) -> int:
        return len(self._idle)

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """A connection for the caller alone until the block ends (waits while all are lent)."""
        if self._closed:
            raise RuntimeError("the lender is closed")
        async with self._slots:
            if self._idle:
                connection, opened = self._idle.pop()
            else:
                connection = await self._engine.connect().start()
                opened = time.monotonic()
            try:
                yield connection
            finally:
                await self._give_back(connection, opened)

    async def _give_back(self, connection: AsyncConnection, opened: float) -> None:
        if (
            not self._closed
            and not connection.invalidated
            and not connection.closed
            and time.monotonic() - opened < self._max_age_s
        ):
            try:
                if connection.in_transaction():
                    await connection.rollback()
            except BaseException:
                # Lost, or interrupted mid-rollback: SQLAlchemy discards it on close.
                await _close(connection)
                raise
            if not connection.invalidated:
                self._idle.append((connection, opened))
                return
        await _close(connection)

    async def close(self) -> None:
        """Give every idle connection back to the pool; those lent go back as they return."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection, _ in idle:
            await _close(connection)


async def _close(connection: AsyncConnection) -> None:
    try:
        await connection.close()
    except Exception:
        # Already broken: SQLAlchemy has discarded what it could; nothing left to give back.
        log.warning("a lent connection could not be closed", exc_info=True)
