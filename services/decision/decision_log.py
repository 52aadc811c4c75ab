"""Writing decisions to the log: their ``decisions`` rows and one ``contacts`` row per offered
item (the history the contact policy counts), in the caller's transaction.

On PostgreSQL all of them go in one statement, one round trip, whatever their number: both
tables are filled by ``jsonb_populate_recordset`` from one JSON parameter each (the decisions by
a data-modifying CTE, always run to completion), so the statement's shape never changes. It
runs on the driver (asyncpg).
SQLite (embedded mode) has no data-modifying CTEs: two Core inserts. Core, not the ORM: the log
is write-only here and the unit of work would only add cost.

A decision's ``candidates``, as stored: one entry per element that reached the ranker (its
``element_id``, ``excluded_by`` — None, or the cap that turned it away after ranking —
``detail``, ``channel`` and its scores), and one per reason that excluded elements before
ranking, with those elements: ``{"excluded_by", "detail", "element_ids": [...]}``. Readers see
one entry per element (``expand_candidates``); rows logged before the grouping already have that
shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.store import driver
from shared.store.db import json_dumps
from shared.store.models import Contact, DecisionRow


def _table(model: type[Any]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


_DECISIONS = _table(DecisionRow)
_CONTACTS = _table(Contact)
_INSERT_DECISION = insert(_DECISIONS)
_INSERT_CONTACTS = insert(_CONTACTS)


def expand_candidates(stored: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per element, in the stored order (a group's elements where the group is)."""
    out: list[dict[str, Any]] = []
    for entry in stored:
        ids = entry.get("element_ids")
        if ids is None:
            out.append(entry)
            continue
        out.extend(
            {"element_id": i, "excluded_by": entry["excluded_by"], "detail": entry["detail"]}
            for i in ids
        )
    return out


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
        await write_decisions_pg(raw, decisions, contacts)
        return
    await connection.execute(_INSERT_DECISION, list(decisions))
    if contacts:
        await connection.execute(_INSERT_CONTACTS, list(contacts))


def _columns(table: Table) -> str:
    return ", ".join(f'"{c.name}"' for c in table.c)


# The statement on PostgreSQL: both inserts. $1, $2: the decisions and the contacts as JSON
# arrays, parsed once as jsonb (as json, each row's documents were parsed again into their jsonb
# columns: a third more of the database's CPU for the insert).
INSERT_SQL = f"""
WITH logged AS (
    INSERT INTO {_DECISIONS.name} ({_columns(_DECISIONS)})
    SELECT {_columns(_DECISIONS)} FROM jsonb_populate_recordset(NULL::{_DECISIONS.name}, $1::jsonb)
)
INSERT INTO {_CONTACTS.name} ({_columns(_CONTACTS)})
SELECT {_columns(_CONTACTS)} FROM jsonb_populate_recordset(NULL::{_CONTACTS.name}, $2::jsonb)
"""


async def write_decisions_pg(
    driver_connection: Any,
    decisions: Sequence[dict[str, Any]],
    contacts: Sequence[dict[str, Any]],
) -> None:
    """On an asyncpg connection, in its transaction: log the decisions. Their timestamps go
    as ISO 8601 text, which PostgreSQL parses to the microsecond."""
    await driver_connection.execute(INSERT_SQL, json_dumps(decisions), json_dumps(contacts))
