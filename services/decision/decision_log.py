"""Writing decisions to the log: their ``decisions`` rows and one ``contacts`` row per offered
item (the history the contact policy counts), in the caller's transaction.

On PostgreSQL all of them go in one statement, one round trip, whatever their number: both
tables are filled by ``jsonb_populate_recordset`` from one JSON parameter each (the decisions by
a data-modifying CTE, always run to completion), so the statement's shape never changes. It
runs on the driver (asyncpg), and leaves out the people found in the erasure ledger when it is
given their pseudonyms (the group committer, which took the fence in the statement before).
SQLite (embedded mode) has no data-modifying CTEs: two Core inserts. Core, not the ORM: the log
is write-only here and the unit of work would only add cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.store import driver
from shared.store.db import json_dumps
from shared.store.models import Contact, DecisionRow, Erasure


def _table(model: type[Any]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


_DECISIONS = _table(DecisionRow)
_CONTACTS = _table(Contact)
_INSERT_DECISION = insert(_DECISIONS)
_INSERT_CONTACTS = insert(_CONTACTS)


async def write_decisions(
    connection: AsyncConnection,
    decisions: Sequence[dict[str, Any]],
    contacts: Sequence[dict[str, Any]],
) -> None:
    """``decisions``: rows of ``decisions`` columns; ``contacts``: rows of ``contacts`` (maybe
    none). In the connection's transaction, which took the erasure fence before its reads."""
    if not decisions:
        return
    if connection.dialect.name == "postgresql":
        raw = await driver.driver_connection(connection)
        await write_decisions_unless_erased(raw, decisions, contacts, {})
        return
    await connection.execute(_INSERT_DECISION, list(decisions))
    if contacts:
        await connection.execute(_INSERT_CONTACTS, list(contacts))


def _columns(table: Table) -> str:
    return ", ".join(f'"{c.name}"' for c in table.c)


# The statement on PostgreSQL: the inserts, leaving out the people found in the erasure ledger,
# whose ids it returns. It runs after the erasure fence, in a later statement of the
# transaction, so its snapshot sees every erasure that committed before the fence was granted.
# $1, $2: the decisions and the contacts as JSON arrays, parsed once as jsonb (as json, each
# row's documents were parsed again into their jsonb columns: a third more of the database's CPU
# for the insert); $3, $4: the people and their pseudonyms, in the same order.
UNLESS_ERASED_SQL = f"""
WITH blocked AS (
    SELECT t.user_id
    FROM unnest($3::text[], $4::text[]) AS t(user_id, pseudonym)
    JOIN {Erasure.__tablename__} AS e ON e.pseudonym = t.pseudonym
), logged AS (
    INSERT INTO {_DECISIONS.name} ({_columns(_DECISIONS)})
    SELECT {_columns(_DECISIONS)} FROM jsonb_populate_recordset(NULL::{_DECISIONS.name}, $1::jsonb)
    WHERE user_id NOT IN (SELECT user_id FROM blocked)
), contacted AS (
    INSERT INTO {_CONTACTS.name} ({_columns(_CONTACTS)})
    SELECT {_columns(_CONTACTS)} FROM jsonb_populate_recordset(NULL::{_CONTACTS.name}, $2::jsonb)
    WHERE user_id NOT IN (SELECT user_id FROM blocked)
)
SELECT DISTINCT user_id FROM blocked
"""


async def write_decisions_unless_erased(
    driver_connection: Any,
    decisions: Sequence[dict[str, Any]],
    contacts: Sequence[dict[str, Any]],
    pseudonyms: dict[str, str],
) -> set[str]:
    """On an asyncpg connection in a transaction that holds the erasure fence: log the
    decisions except those of erased people (``pseudonyms``: user id → pseudonym; empty when
    nobody can have been erased, or when the fence preceded the reads); returns the erased
    among them. JSON parses the timestamps to the microsecond."""
    rows = await driver_connection.fetch(
        UNLESS_ERASED_SQL,
        json_dumps([{**d, "created_at": d["created_at"].isoformat()} for d in decisions]),
        json_dumps([{**c, "at": c["at"].isoformat()} for c in contacts]),
        list(pseudonyms),
        list(pseudonyms.values()),
    )
    return {r[0] for r in rows}
