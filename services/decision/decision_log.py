"""Writing a decision to the log: its ``decisions`` row and one ``contacts`` row per offered item
(the history the contact policy counts), in the caller's transaction.

On PostgreSQL both go in one statement, one round trip: the decision row is inserted by a
data-modifying CTE (always run to completion, referenced or not) and the contacts come from one
JSON parameter through ``json_populate_recordset``, so the statement's shape does not depend on
the number of items; it is compiled once and run on the driver (shared.store.driver). SQLite
(embedded mode) has no data-modifying CTEs: two Core inserts. Core, not the ORM: the log is
write-only here and the unit of work would only add cost.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Insert, Table, bindparam, func, insert, literal_column, select
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.store import driver
from shared.store.driver import DriverStatement
from shared.store.models import Contact, DecisionRow


def _table(model: type[Any]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


_DECISIONS = _table(DecisionRow)
_CONTACTS = _table(Contact)
_INSERT_DECISION = insert(_DECISIONS)
_INSERT_CONTACTS = insert(_CONTACTS)


def _one_statement() -> Insert:
    decision = (
        insert(_DECISIONS)
        .values({c.name: bindparam(f"decision_{c.name}", type_=c.type) for c in _DECISIONS.c})
        .cte("logged_decision")
    )
    names = [c.name for c in _CONTACTS.c]
    records = func.json_populate_recordset(
        literal_column(f"NULL::{_CONTACTS.name}"), bindparam("contacts", type_=JSON)
    ).table_valued(*names)
    return (
        insert(_CONTACTS)
        .from_select(names, select(*(records.c[n] for n in names)))
        .add_cte(decision)
    )


_INSERT_BOTH = _one_statement()
# Compiled by the engine's own dialect (its JSON serialiser), on first use.
_COMPILED: dict[str, DriverStatement] = {}


async def write_decision(
    connection: AsyncConnection, decision: dict[str, Any], contacts: list[dict[str, Any]]
) -> None:
    """``decision``: the ``decisions`` columns; ``contacts``: the ``contacts`` rows (maybe
    none). On the session's connection: Core statements need none of the ORM's machinery."""
    if connection.dialect.name == "postgresql":
        params = {f"decision_{k}": v for k, v in decision.items()}
        params["contacts"] = [{**c, "at": _iso(c["at"])} for c in contacts]
        statement = _COMPILED.get("postgresql")
        if statement is None:
            statement = _COMPILED["postgresql"] = DriverStatement(_INSERT_BOTH, connection.dialect)
        await driver.execute(connection, statement, params)
        return
    await connection.execute(_INSERT_DECISION, decision)
    if contacts:
        await connection.execute(_INSERT_CONTACTS, contacts)


def _iso(at: datetime) -> str:
    # json_populate_recordset parses the text into the timestamptz column, to the microsecond.
    return at.isoformat()
