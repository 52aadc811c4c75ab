"""Engine, sessions, migrations and the one dialect-portable upsert."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import orjson
from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from shared.store.models import Base

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
# Pooled connections are replaced at this age, so one that a firewall or proxy silently dropped
# while idle is not used for long (see create_engine on why there is no pre-ping).
POOL_RECYCLE_S = 1800


def json_dumps(value: Any) -> str:
    """JSON columns' serializer: orjson (the decision log's candidates are the hot write),
    falling back to the standard library for what orjson refuses (integers over 64 bits).
    Datetimes become ISO 8601 text (``isoformat``) either way."""
    try:
        return orjson.dumps(value, option=_ORJSON_OPTIONS).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, default=_isoformat)


def _isoformat(value: Any) -> str:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_loads(text: str | bytes) -> Any:
    """JSON columns' deserializer (the views are read on every decision), with the same
    fallback for numbers orjson cannot hold."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def create_engine(url: str, pool_size: int = 10) -> AsyncEngine:
    parsed = make_url(url)
    json_codec: dict[str, Any] = {"json_serializer": json_dumps, "json_deserializer": json_loads}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # One writer at a time is SQLite's rule; a generous busy timeout queues writers.
        return create_async_engine(url, connect_args={"timeout": 30}, **json_codec)
    # No pool_pre_ping: with asyncpg it costs three round trips (BEGIN, a ping, ROLLBACK) per
    # checkout, more than a decision's own queries. A connection that died (PostgreSQL
    # restarted) fails its first statement instead; SQLAlchemy then invalidates the whole pool,
    # so the next checkouts reconnect, and the failure is transient everywhere: an HTTP 503 the
    # client retries (docs/reliability.md), a consumer batch retried by the worker.
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=POOL_RECYCLE_S,
        pool_timeout=10,
        connect_args={"timeout": 10, "command_timeout": 30},
        **json_codec,
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def dialect_insert(dialect: str, table: type[Base]) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT (PostgreSQL and SQLite alike)."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def upsert(
    dialect: str,
    table: type[Base],
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    update: Sequence[str] | None = None,
) -> Any:
    """INSERT … ON CONFLICT (keys) DO UPDATE the ``update`` columns (or DO NOTHING)."""
    stmt = dialect_insert(dialect, table).values(list(rows))
    if not update:
        return stmt.on_conflict_do_nothing(index_elements=list(keys))
    return stmt.on_conflict_do_update(
        index_elements=list(keys), set_={c: stmt.excluded[c] for c in update}
    )


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


# Alembic keeps the running migration's context in module globals (``alembic.context``), so
# two upgrades in threads of one process would tear down each other's; processes are kept
# apart by the advisory lock in migrations/env.py.
_MIGRATING = threading.Lock()


def _upgrade(url: str) -> None:
    with _MIGRATING:
        command.upgrade(alembic_config(url), "head")


async def migrate(url: str) -> None:
    """Bring the schema to the newest revision (safe to run from several processes at once)."""
    await asyncio.to_thread(_upgrade, url)


async def ping(engine: AsyncEngine) -> bool:
    try:
        async with asyncio.timeout(3), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception:
        return False
    return True
