"""The bus for single-process mode: a durable log in one SQLite file.

Each topic is one ordered partition (so every key keeps its order), records survive a
restart, and a consumer group resumes from the offset it last committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import aiosqlite

from shared import tracing
from shared.bus.base import Bus, Consumer, Message, Record

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    topic TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    headers TEXT NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (topic, "offset")
);
CREATE TABLE IF NOT EXISTS commits (
    grp TEXT NOT NULL,
    topic TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    PRIMARY KEY (grp, topic)
);
"""


class EmbeddedConsumer(Consumer):
    def __init__(self, bus: EmbeddedBus, topics: Sequence[str], group: str) -> None:
        self._bus = bus
        self._topics = list(topics)
        self._group = group
        self._positions: dict[str, int] = {}

    async def start(self) -> None:
        self._positions = await self._bus._committed(self._group, self._topics)

    async def fetch(self, max_records: int, timeout_ms: int) -> list[Record]:
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            records = await self._bus._read(self._positions, max_records)
            if records:
                for r in records:
                    self._positions[r.topic] = max(self._positions[r.topic], r.offset + 1)
                return records
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            await self._bus._wait_for_append(remaining)

    async def commit(self) -> None:
        await self._bus._commit(self._group, self._positions)

    async def stop(self) -> None:
        return None

    async def lag(self) -> dict[tuple[str, int], int]:
        committed = await self._bus._committed(self._group, self._topics)
        return {
            (t, 0): max(0, self._bus._next_offset.get(t, 0) - committed[t]) for t in self._topics
        }


class EmbeddedBus(Bus):
    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._next_offset: dict[str, int] = {}
        self._appended = asyncio.Event()

    async def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self._path)
        # WAL + synchronous=NORMAL survives a process crash; only power loss can drop the tail.
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.executescript(_SCHEMA)
        await self._db.commit()
        async with self._db.execute(
            'SELECT topic, MAX("offset") + 1 FROM records GROUP BY topic'
        ) as cur:
            self._next_offset = {str(t): int(o) for t, o in await cur.fetchall()}

    async def stop(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("bus not started")
        return self._db

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        if not messages:
            return
        db = self._conn()
        messages = tracing.inject(messages)
        now = int(time.time() * 1000)
        async with self._lock:
            start = self._next_offset.get(topic, 0)
            rows = [
                (
                    topic,
                    start + i,
                    m.key,
                    m.value,
                    json.dumps([[k, v.decode("latin-1")] for k, v in m.headers]),
                    now,
                )
                for i, m in enumerate(messages)
            ]
            await db.executemany(
                'INSERT INTO records (topic, "offset", key, value, headers, ts) '
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            await db.commit()
            self._next_offset[topic] = start + len(messages)
        # Wake every waiting consumer; each re-reads from its own position.
        self._appended.set()
        self._appended = asyncio.Event()

    async def _wait_for_append(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._appended.wait(), timeout=timeout_s)

    async def _read(self, positions: dict[str, int], max_records: int) -> list[Record]:
        db = self._conn()
        records: list[Record] = []
        for topic, position in positions.items():
            if self._next_offset.get(topic, 0) <= position:
                continue
            async with db.execute(
                'SELECT "offset", key, value, headers, ts FROM records '
                'WHERE topic = ? AND "offset" >= ? ORDER BY "offset" LIMIT ?',
                (topic, position, max_records - len(records)),
            ) as cur:
                for offset, key, value, headers, ts in await cur.fetchall():
                    records.append(
                        Record(
                            topic=topic,
                            partition=0,
                            offset=int(offset),
                            key=str(key),
                            value=bytes(value),
                            timestamp_ms=int(ts),
                            headers=tuple((k, v.encode("latin-1")) for k, v in json.loads(headers)),
                        )
                    )
            if len(records) >= max_records:
                break
        return records

    async def _committed(self, group: str, topics: Sequence[str]) -> dict[str, int]:
        db = self._conn()
        positions = dict.fromkeys(topics, 0)
        async with db.execute('SELECT topic, "offset" FROM commits WHERE grp = ?', (group,)) as cur:
            for topic, offset in await cur.fetchall():
                if topic in positions:
                    positions[str(topic)] = int(offset)
        return positions

    async def _commit(self, group: str, positions: dict[str, int]) -> None:
        db = self._conn()
        async with self._lock:
            await db.executemany(
                'INSERT INTO commits (grp, topic, "offset") VALUES (?, ?, ?) '
                'ON CONFLICT (grp, topic) DO UPDATE SET "offset" = excluded."offset"',
                [(group, t, o) for t, o in positions.items()],
            )
            await db.commit()

    async def purge(self, before_ms: int, limit: int) -> int:
        """The retention of the embedded log. The newest record of each topic is kept: the next
        offset is read back from it on start, and offsets must never be handed out twice."""
        db = self._conn()
        async with self._lock:
            cur = await db.execute(
                "DELETE FROM records WHERE rowid IN (SELECT r.rowid FROM records r "
                'WHERE r.ts < ? AND r."offset" < (SELECT MAX("offset") FROM records m '
                "WHERE m.topic = r.topic) LIMIT ?)",
                (before_ms, limit),
            )
            await db.commit()
        return max(0, cur.rowcount)

    def consumer(self, topics: Sequence[str], group: str) -> Consumer:
        return EmbeddedConsumer(self, topics, group)

    async def ready(self) -> bool:
        return self._db is not None
