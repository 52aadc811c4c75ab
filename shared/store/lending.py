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

On PostgreSQL a lender can give its connections session settings (``settings``), reset before
a connection goes back to the pool, so that nothing else runs with them. The decision service
sets ``plan_cache_mode = force_generic_plan``: its hot statements find people by primary key,
which plans the same whatever the values, yet PostgreSQL's default kept planning them anew on
every execution (its generic estimate for ``user_id = ANY($1)`` never beat a custom plan), and
the planning cost the server four times the execution: 0.47 against 0.115 ms of PostgreSQL CPU
for one person's read (docs/decision.md, "Benchmark").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.store.db import POOL_RECYCLE_S
from shared.store.driver import driver_connection

log = logging.getLogger(__name__)


_SETTING = re.compile(r"[a-z_][a-z0-9_.]*")

# For connections that run only statements whose plan does not depend on their values.
GENERIC_PLANS = {"plan_cache_mode": "force_generic_plan"}


class ConnectionLender:
    def __init__(
        self,
        engine: AsyncEngine,
        size: int,
        max_age_s: float = POOL_RECYCLE_S,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a lender needs at least one connection")
        if settings and engine.dialect.name != "postgresql":
            raise ValueError("session settings are for PostgreSQL connections")
        if any(not _SETTING.fullmatch(name) for name in settings or ()):
            raise ValueError(f"not a setting name: {sorted(settings or ())}")
        self._engine = engine
        self._settings = dict(settings or {})
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
                connection = await self._open()
                opened = time.monotonic()
            try:
                yield connection
            finally:
                await self._give_back(connection, opened)

    async def _open(self) -> AsyncConnection:
        connection = await self._engine.connect().start()
        if self._settings:
            try:
                driver = await driver_connection(connection)
                for name, value in self._settings.items():
                    # Outside any transaction: set for the session at once.
                    await driver.fetchval("SELECT set_config($1, $2, false)", name, value)
            except BaseException:
                await _discard(connection)
                raise
        return connection

    async def _release(self, connection: AsyncConnection) -> None:
        """Back to SQLAlchemy's pool, without this lender's settings."""
        if self._settings and not connection.invalidated and not connection.closed:
            try:
                if connection.in_transaction():
                    await connection.rollback()  # RESET in a transaction would roll back too
                driver = await driver_connection(connection)
                await driver.execute("; ".join(f"RESET {name}" for name in self._settings))
            except BaseException:
                await _discard(connection)
                raise
        await _close(connection)

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
                # Lost, or interrupted mid-rollback: never to the pool with this lender's
                # settings (SQLAlchemy discards an invalidated connection on close).
                await (_discard if self._settings else _close)(connection)
                raise
            if not connection.invalidated:
                self._idle.append((connection, opened))
                return
        await self._release(connection)

    async def close(self) -> None:
        """Give every idle connection back to the pool; those lent go back as they return."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection, _ in idle:
            with contextlib.suppress(Exception):  # a failed reset discarded it: nothing to do
                await self._release(connection)


async def _discard(connection: AsyncConnection) -> None:
    with contextlib.suppress(Exception):
        await connection.invalidate()
    await _close(connection)


async def _close(connection: AsyncConnection) -> None:
    try:
        await connection.close()
    except Exception:
        # Already broken: SQLAlchemy has discarded what it could; nothing left to give back.
        log.warning("a lent connection could not be closed", exc_info=True)
