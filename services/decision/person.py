"""What a decision reads about people, in one round trip for as many as are read together: each
one's view and their account's, the preference centre, and the contact history the policy
counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ARRAY, Column, Dialect, Select, String, Table, any_, bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.decision.contact_policy import History, history_entries, parse_history
from services.ingest.view import AccountState, UserState
from shared.store import driver
from shared.store.driver import DriverStatement
from shared.store.models import AccountView, ChannelPreference, UserView


@dataclass(frozen=True)
class Person:
    user: UserState
    account: AccountState | None
    # The preference centre's channel switches and quiet hours (None: no preferences saved).
    channels: dict[str, Any] | None
    quiet_hours: dict[str, Any] | None
    # Recent offers, open cards and deliveries, withdrawn cards (read in the same statement).
    history: History


def _table(model: type[Any]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


def _fields(table: Table, state: type[UserState | AccountState]) -> list[Column[Any]]:
    # The view's columns the state holds (all of them, as the projector writes every field).
    return [c for c in table.columns if c.name in state.model_fields]


class _Statement:
    """The statement for one dialect, built once (SQLAlchemy then reuses its compiled form; on
    PostgreSQL it runs on the driver: shared.store.driver), and where each table's columns sit
    in its rows."""

    def __init__(self, dialect: Dialect) -> None:
        users, accounts = _table(UserView), _table(AccountView)
        preferences = _table(ChannelPreference)
        self.user_columns = [c.name for c in _fields(users, UserState)]
        self.account_columns = [c.name for c in _fields(accounts, AccountState)]
        # Null when the outer join found no account.
        self.account_key = self.account_columns.index("account_id")
        # PostgreSQL: one array parameter, so the statement is the same (and prepared once)
        # whatever the number of people; elsewhere an IN list expanded per call.
        wanted = (
            users.c.user_id == any_(bindparam("user_ids", type_=ARRAY(String)))
            if dialect.name == "postgresql"
            else users.c.user_id.in_(bindparam("user_ids", expanding=True))
        )
        self.statement: Select[Any] = (
            select(
                *_fields(users, UserState),
                *_fields(accounts, AccountState),
                preferences.c.user_id,
                preferences.c.channels,
                preferences.c.quiet_hours,
                history_entries(dialect.name, users.c.user_id),
            )
            .select_from(users)
            .outerjoin(accounts, accounts.c.account_id == users.c.account_id)
            .outerjoin(preferences, preferences.c.user_id == users.c.user_id)
            .where(wanted)
        )
        self.driver = (
            DriverStatement(self.statement, dialect) if dialect.name == "postgresql" else None
        )


_STATEMENTS: dict[str, _Statement] = {}


async def read_persons(
    connection: AsyncConnection, user_ids: Sequence[str], since: datetime
) -> dict[str, Person]:
    """The people the view knows among ``user_ids``, by id, with their offers since ``since``
    and their open cards or deliveries. ``connection``: the session's, in its transaction, or
    one with none (the statement is one snapshot)."""
    if not user_ids:
        return {}
    dialect = connection.dialect
    shape = _STATEMENTS.get(dialect.name)
    if shape is None:
        shape = _STATEMENTS[dialect.name] = _Statement(dialect)
    params = {"user_ids": list(user_ids), "since": since}
    if shape.driver is not None:
        rows: Sequence[Any] = await driver.fetch(connection, shape.driver, params)
    else:
        rows = (await connection.execute(shape.statement, params)).all()
    people = (_person(shape, tuple(row)) for row in rows)
    return {p.user.user_id: p for p in people}


def _person(shape: _Statement, values: tuple[Any, ...]) -> Person:
    n_user, n_account = len(shape.user_columns), len(shape.account_columns)
    user = UserState.model_validate(dict(zip(shape.user_columns, values[:n_user], strict=True)))
    account_values = values[n_user : n_user + n_account]
    account = (
        AccountState.model_validate(dict(zip(shape.account_columns, account_values, strict=True)))
        if account_values[shape.account_key] is not None
        else None
    )
    preference_user, channels, quiet_hours, entries = values[n_user + n_account :]
    return Person(
        user=user,
        account=account,
        channels=channels if preference_user is not None else None,
        quiet_hours=quiet_hours,
        history=parse_history(entries),
    )
