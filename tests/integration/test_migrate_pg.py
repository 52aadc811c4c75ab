"""Several processes starting at once on a fresh database migrate it exactly once."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from shared.store.db import alembic_config, migrate
from tests.harness import NBV, fresh_database

pytestmark = pytest.mark.integration

MIGRATION_LOCK_ID = 4_242_001  # shared/store/migrations/env.py


def _migrate_in_processes(url: str, n: int) -> list[subprocess.CompletedProcess[str]]:
    env = {**os.environ, "NBV_DATABASE_URL": url, "NBV_LOG_LEVEL": "WARNING"}
    procs = [
        subprocess.Popen(
            [*NBV, "migrate"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(n)
    ]
    return [
        subprocess.CompletedProcess(p.args, p.wait(timeout=120), p.communicate()[0]) for p in procs
    ]


async def _schema_state(url: str) -> tuple[int, int]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
            # pg_locks is the whole server's: only the migration lock on this database counts.
            locks = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND objid = :id AND database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
                {"id": MIGRATION_LOCK_ID},
            )
    finally:
        await engine.dispose()
    return len(versions), int(locks or 0)


async def test_processes_migrating_a_fresh_database_at_once_all_succeed(
    pg_admin_url: str,
) -> None:
    # Several rounds: the race this guards against (a waiter let in between the first
    # migrator's unlock and its commit) needs the waiter scheduled in that gap.
    for _ in range(3):
        async with fresh_database(pg_admin_url) as url:
            results = await asyncio.to_thread(_migrate_in_processes, url, 3)
            for result in results:
                assert result.returncode == 0, result.stdout[-3000:]
            # One version row, and nobody left holding the migration lock.
            assert await _schema_state(url) == (1, 0)


async def test_migrations_started_together_in_one_process_all_succeed(pg_url: str) -> None:
    # Alembic keeps its running context in module globals: two upgrades in threads of one
    # process would tear each other's down, so migrate() runs them one at a time.
    await asyncio.gather(*(migrate(pg_url) for _ in range(3)))
    assert await _schema_state(pg_url) == (1, 0)


async def _compression(url: str) -> dict[str, str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT attname, attcompression::text FROM pg_attribute "
                    "WHERE attrelid = 'decisions'::regclass "
                    "AND attname IN ('context', 'candidates', 'chosen')"
                )
            )
            return {str(name): str(method) for name, method in rows}
    finally:
        await engine.dispose()


async def test_the_decision_log_is_compressed_with_lz4_and_back_on_downgrade(pg_url: str) -> None:
    await migrate(pg_url)
    lz4 = {"context": "l", "candidates": "l", "chosen": "l"}
    assert await _compression(pg_url) == lz4
    await asyncio.to_thread(command.downgrade, alembic_config(pg_url), "0002")
    assert await _compression(pg_url) == {"context": "", "candidates": "", "chosen": ""}
    await migrate(pg_url)
    assert await _compression(pg_url) == lz4
