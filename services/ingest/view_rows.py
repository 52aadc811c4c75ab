"""The projector's view rows: loaded and written a whole batch at a time, and kept in memory.

A projector's consumer-group partitions are its own, so the user and account rows it folds are
almost always the ones it wrote last. On PostgreSQL it keeps them in a bounded LRU cache with
the row version (``xmin``) it wrote, and a batch re-reads only what changed since: one narrow
query returns the versions of the touched rows (locking them for the batch), and a row whose
version differs — written by anyone else (an erasure, another projector after a rebalance, a
restored backup) — or that is gone is loaded again. Nothing rests on rebalance callbacks.

Rows are *checked out* of the cache for a batch (the fold mutates them in place) and *checked
in* only after the batch committed; a batch that fails leaves its rows out, so the next one
loads what the store really holds.

Writes are one statement per table per batch: on PostgreSQL an ``INSERT … SELECT … ON
CONFLICT DO UPDATE … RETURNING xmin`` whose parameters are the columns, each one JSON array of
that column's values (see ``_prepare_postgres``). SQLite (embedded mode) loads every batch and
writes through SQLAlchemy's cached multi-row upsert.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Generic, TypeVar

import orjson
from cachetools import LRUCache
from pydantic import BaseModel
from sqlalchemy import JSON, String, Table, literal_column, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from services.ingest.view import AccountState, UserState
from shared.store.models import AccountView, Base, UserView

S = TypeVar("S", bound=BaseModel)

_PG = postgresql.dialect()  # type: ignore[no-untyped-call]
_VERSION = "row_version"


def _table(model: type[Base]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


class _Table(Generic[S]):
    """One view table: its rows as states, how to read and write them, and the cache."""

    def __init__(self, table: Table, key: str, state: type[S], capacity: int, dialect: str) -> None:
        self.table = table
        self.key = key
        self.state = state
        self.capacity = capacity
        self.dialect = dialect
        self.cache: LRUCache[str, tuple[S, str]] = LRUCache(maxsize=max(1, capacity))
        self.columns = [c.name for c in table.columns]
        unknown = set(self.columns) - set(state.model_fields)
        if unknown:
            raise TypeError(f"{state.__name__} lacks columns of {table.name}: {sorted(unknown)}")
        # Field values live in a model's __dict__: reading them from there is a C-level lookup
        # per column rather than an attribute access each.
        self._values = itemgetter(*self.columns)
        self._key_column = table.c[key]
        if dialect == "postgresql":
            self._prepare_postgres()
        else:
            insert = sqlite.insert(table)
            self._upsert = insert.on_conflict_do_update(
                index_elements=[key],
                set_={c: insert.excluded[c] for c in self.columns if c != key},
            )

    @property
    def caching(self) -> bool:
        # Row versions are what make the cache safe; SQLite has none to compare.
        return self.dialect == "postgresql" and self.capacity > 0

    def _prepare_postgres(self) -> None:
        quote = _PG.identifier_preparer.quote
        name = quote(self.table.name)
        key = quote(self.key)
        names = ", ".join(quote(c) for c in self.columns)
        updates = ", ".join(
            f"{quote(c)} = excluded.{quote(c)}" for c in self.columns if c != self.key
        )
        # One parameter per column, its values for every row as one JSON array: orjson writes
        # it in one call, and PostgreSQL splits it with its streaming JSON parser and casts the
        # elements to the column's type. (A native array parameter costs asyncpg a few type
        # checks per element; one JSON document of whole rows costs PostgreSQL twice the CPU.)
        selected: list[str] = []
        for i, column in enumerate(self.table.columns, start=1):
            if isinstance(column.type, JSON):
                selected.append(f"json_array_elements(${i}::text::json)::jsonb")
            else:
                # Strings stay text here: the insert's own cast refuses an over-long value,
                # where an explicit cast to varchar(n) would silently cut it.
                type_ = "text" if isinstance(column.type, String) else column.type.compile(_PG)
                selected.append(f"json_array_elements_text(${i}::text::json)::{type_}")
        # Set-returning functions in one select list run in lockstep: row n takes element n
        # of every column's array.
        self.upsert_sql = (
            f"INSERT INTO {name} ({names}) SELECT {', '.join(selected)} "
            f"ON CONFLICT ({key}) DO UPDATE SET {updates} "
            f"RETURNING {key}, xmin::text"
        )
        keys = "ANY(ARRAY(SELECT json_array_elements_text(CAST({} AS text)::json)))"
        # Locked for the batch: nobody changes a row between this check and the write.
        self._versions_sql = (
            f"SELECT {key}, xmin::text FROM {name} WHERE {key} = {keys.format('$1')} "
            f"ORDER BY {key} FOR NO KEY UPDATE"
        )
        self._load_stmt = (
            select(self.table, literal_column("xmin::text").label(_VERSION))
            .where(text(f"{name}.{key} = {keys.format(':keys')}"))
            .order_by(self._key_column)
            .with_for_update(key_share=True)
        )

    async def checkout(self, conn: AsyncConnection, keys: Collection[str]) -> dict[str, S]:
        """The current states of ``keys`` that have a row; taken out of the cache."""
        found: dict[str, S] = {}
        missing: list[str] = list(keys)
        if self.caching:
            cached = {k: entry for k in keys if (entry := self.cache.pop(k, None)) is not None}
            if cached:
                keys_json = orjson.dumps(sorted(cached)).decode()
                result = await conn.exec_driver_sql(self._versions_sql, (keys_json,))
                current = dict(result.tuples().all())
                for k, (state, version) in cached.items():
                    if current.get(k) == version:
                        found[k] = state
                missing = [k for k in keys if k not in found]
        if missing:
            found.update(await self._load(conn, missing))
        return found

    async def _load(self, conn: AsyncConnection, keys: list[str]) -> dict[str, S]:
        if self.dialect == "postgresql":
            rows = await conn.execute(
                self._load_stmt, {"keys": orjson.dumps(sorted(keys)).decode()}
            )
        else:
            rows = await conn.execute(select(self.table).where(self._key_column.in_(keys)))
        states: dict[str, S] = {}
        for row in rows.mappings():
            values = dict(row)
            values.pop(_VERSION, None)
            states[values[self.key]] = self.state.model_validate(values)
        return states

    async def write(self, conn: AsyncConnection, states: Sequence[S]) -> dict[str, str]:
        """Upsert every state (in key order); the new row versions, by key."""
        if not states:
            return {}
        if self.dialect != "postgresql":
            rows = [{c: getattr(s, c) for c in self.columns} for s in states]
            await conn.execute(self._upsert, rows)
            return {}
        result = await conn.exec_driver_sql(self.upsert_sql, self.parameters(states))
        return dict(result.tuples().all())

    def parameters(self, states: Sequence[S]) -> tuple[str, ...]:
        """The parameters of ``upsert_sql``: per column, its values as a JSON array."""
        columns = zip(*(self._values(s.__dict__) for s in states), strict=True)
        return tuple(orjson.dumps(c, option=orjson.OPT_NAIVE_UTC).decode() for c in columns)

    def checkin(self, states: Sequence[S], versions: dict[str, str]) -> None:
        if not self.caching:
            return
        for state in states:
            key = getattr(state, self.key)
            version = versions.get(key)
            if version is not None:
                self.cache[key] = (state, version)


@dataclass
class Written:
    """What a batch wrote; checked in to the cache once the batch has committed."""

    users: Sequence[UserState] = ()
    accounts: Sequence[AccountState] = ()
    user_versions: dict[str, str] = field(default_factory=dict)
    account_versions: dict[str, str] = field(default_factory=dict)


class ViewRows:
    def __init__(self, dialect: str, cache_rows: int) -> None:
        self.users = _Table(_table(UserView), "user_id", UserState, cache_rows, dialect)
        self.accounts = _Table(_table(AccountView), "account_id", AccountState, cache_rows, dialect)

    async def checkout(
        self, conn: AsyncConnection, user_ids: Collection[str], account_ids: Collection[str]
    ) -> tuple[dict[str, UserState], dict[str, AccountState]]:
        # Accounts, then users, each in key order. Two projectors share a row only around a
        # rebalance (or for a person seen under two accounts): the second waits for the first
        # to commit, then finds a new version and reloads; a deadlock is retried by the worker.
        accounts = await self.accounts.checkout(conn, account_ids)
        users = await self.users.checkout(conn, user_ids) if user_ids else {}
        return users, accounts

    async def write(
        self,
        conn: AsyncConnection,
        users: Sequence[UserState],
        accounts: Sequence[AccountState],
    ) -> Written:
        account_versions = await self.accounts.write(conn, accounts)
        user_versions = await self.users.write(conn, users)
        return Written(users, accounts, user_versions, account_versions)

    def checkin(self, written: Written) -> None:
        self.accounts.checkin(written.accounts, written.account_versions)
        self.users.checkin(written.users, written.user_versions)
