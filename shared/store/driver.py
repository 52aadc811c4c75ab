"""Hot-path statements run on the driver (asyncpg) connection of a SQLAlchemy connection.

A statement is still written with SQLAlchemy and compiled by its PostgreSQL dialect, once; only
its execution skips SQLAlchemy's per-call machinery (execution context, bind and result
processing, the greenlet hop), which on the decision path costs about as much CPU as
asyncpg's own work (docs/decision.md, "Benchmark"). It runs on the connection, and so in the
transaction, of the session or connection it is given: SQLAlchemy still owns the connection,
BEGIN, COMMIT and ROLLBACK. A read may also run on a connection with no transaction (the
decision's read: one statement, one snapshot, no BEGIN and COMMIT round trips).

Parameters go through their types' bind processing, as SQLAlchemy would (JSON serialised,
UTC datetimes checked). Rows come back as asyncpg records, unprocessed: timestamptz as aware UTC
datetimes, JSON decoded by the codecs SQLAlchemy registered on the connection
(``shared.store.db.json_loads``). Errors are asyncpg's own (``PostgresError``, ``OSError``),
which the HTTP layer and the workers classify like SQLAlchemy's (``shared.worker.is_transient``);
a connection that died here fails the rollback that follows, where SQLAlchemy discards it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from asyncpg.exceptions import PostgresError
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler


class DriverStatement:
    """``statement`` compiled for ``dialect`` (asyncpg's), with its parameters in order."""

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        self.sql = str(compiled)
        names = compiled.positiontup or []
        constants = {k for k, b in compiled.binds.items() if not b.required or b.value is not None}
        if constants & set(names):
            # Values SQLAlchemy would fill in itself: render them as literals instead.
            raise ValueError(f"statement has constant parameters: {sorted(constants & set(names))}")
        self.names: Sequence[str] = tuple(names)
        self.processors: Sequence[Callable[[Any], Any] | None] = tuple(
            compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in names
        )

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        return [
            params[name] if process is None else process(params[name])
            for name, process in zip(self.names, self.processors, strict=True)
        ]


async def driver_connection(connection: AsyncConnection) -> Any:
    """The asyncpg connection under ``connection``, checked as the statements here check it."""
    driver: Any = (await connection.get_raw_connection()).driver_connection
    # SQLAlchemy begins lazily, at the first statement it runs itself; a statement run here
    # before that would commit on its own, outside the caller's transaction. Only a connection
    # on which SQLAlchemy has begun nothing runs statements on their own (``fetch``).
    if connection.in_transaction() and not driver.is_in_transaction():
        raise RuntimeError("run a statement through SQLAlchemy first: no transaction has begun")
    return driver


async def fetch(
    connection: AsyncConnection, statement: DriverStatement, params: Mapping[str, Any]
) -> list[Any]:
    """The rows (asyncpg records). In the connection's transaction, or on their own (one
    consistent snapshot) when SQLAlchemy has begun none on it."""
    driver = await driver_connection(connection)
    try:
        rows: list[Any] = await driver.fetch(statement.sql, *statement.args(params))
    except PostgresError:
        raise  # the server refused the statement; the connection is fine
    except BaseException:
        if not connection.in_transaction():
            # Lost, or interrupted mid-statement (cancelled): outside a transaction no
            # rollback follows to fail, so SQLAlchemy would hand the connection to the next
            # request as it is. Discard it here.
            await connection.invalidate()
        raise
    return rows
