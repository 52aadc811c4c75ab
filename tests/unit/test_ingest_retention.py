"""Retention of raw events: the purge deletes what is older than the retention, in bounded
batches, from the idempotency ledger and the embedded log; keeps the rest; plans its next run;
and the events topic is created with the matching retention."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, time, timedelta

import pytest
from sqlalchemy import func, insert, select

from services.ingest.retention import (
    RAW_EVENT_PURGE,
    RetentionPurge,
    purge_job_key,
    purge_raw_events,
)
from services.ingest.schedule import IngestScheduler
from shared.bus import Message, topic_configs
from shared.runtime import Runtime
from shared.scheduler import Job
from shared.settings import Settings
from shared.store.db import migrate
from shared.store.models import ProcessedEvent, ScheduledJob

DAY_MS = 86_400_000


@pytest.fixture
async def rt(embedded_settings: Settings) -> AsyncIterator[Runtime]:
    runtime = Runtime.from_settings(embedded_settings)
    await migrate(embedded_settings.resolved_database_url)
    await runtime.bus.start()
    try:
        yield runtime
    finally:
        await runtime.bus.stop()
        await runtime.engine.dispose()


async def _ledger(rt: Runtime) -> set[str]:
    async with rt.sessions() as session:
        return set(await session.scalars(select(ProcessedEvent.event_id)))


async def _log(rt: Runtime, topic: str) -> list[bytes]:
    consumer = rt.bus.consumer([topic], f"reader-{datetime.now(UTC).timestamp()}")
    await consumer.start()
    return [r.value for r in await consumer.fetch(100, 50)]


async def test_purge_deletes_only_what_is_older_than_the_retention_in_batches(
    rt: Runtime,
) -> None:
    now = datetime.now(UTC)
    old = [f"old-{i}" for i in range(7)]
    recent = ["recent-1", "recent-2"]
    async with rt.sessions() as session, session.begin():
        await session.execute(
            insert(ProcessedEvent),
            [
                {"consumer": "projector", "event_id": e, "processed_at": now - timedelta(days=91)}
                for e in old
            ]
            + [
                {"consumer": "projector", "event_id": e, "processed_at": now - timedelta(days=89)}
                for e in recent
            ],
        )

    purged = await purge_raw_events(rt, now, retention_days=90, batch=2)

    # 7 rows 2 at a time: four statements, the last one short.
    assert purged.ledger == 7
    assert await _ledger(rt) == set(recent)
    # Nothing older is left: running again finds nothing.
    assert (await purge_raw_events(rt, now, retention_days=90, batch=2)).ledger == 0


async def test_zero_days_keeps_everything(rt: Runtime) -> None:
    now = datetime.now(UTC)
    async with rt.sessions() as session, session.begin():
        await session.execute(
            insert(ProcessedEvent),
            [{"consumer": "p", "event_id": "ancient", "processed_at": now - timedelta(days=900)}],
        )
    await rt.bus.publish("events", [Message("k", b"e")])
    purged = await purge_raw_events(rt, now + timedelta(days=900), retention_days=0, batch=10)
    assert (purged.ledger, purged.log) == (0, 0)
    assert await _ledger(rt) == {"ancient"}
    assert await _log(rt, "events") == [b"e"]


async def test_embedded_log_is_purged_but_keeps_each_topics_newest_record_and_offsets(
    embedded_settings: Settings,
) -> None:
    rt = Runtime.from_settings(embedded_settings)
    await migrate(embedded_settings.resolved_database_url)
    await rt.bus.start()
    try:
        await rt.bus.publish("events", [Message("k", f"e{i}".encode()) for i in range(5)])
        await rt.bus.publish("triggers", [Message("k", b"t0"), Message("k", b"t1")])
        consumer = rt.bus.consumer(["events"], "projector")
        await consumer.start()
        assert len(await consumer.fetch(100, 50)) == 5
        await consumer.commit()
        # 91 days on, everything is past a 90-day retention.
        later = datetime.now(UTC) + timedelta(days=91)
        purged = await purge_raw_events(rt, later, retention_days=90, batch=2)
        assert purged.log == 4 + 1
        assert await _log(rt, "events") == [b"e4"]
        assert await _log(rt, "triggers") == [b"t1"]
    finally:
        await rt.bus.stop()

    # After a restart, offsets continue where they were: the committed group sees only the new.
    rt = Runtime.from_settings(embedded_settings)
    await rt.bus.start()
    try:
        await rt.bus.publish("events", [Message("k", b"e5")])
        consumer = rt.bus.consumer(["events"], "projector")
        await consumer.start()
        records = await consumer.fetch(100, 50)
        assert [(r.offset, r.value) for r in records] == [(5, b"e5")]
    finally:
        await rt.bus.stop()
        await rt.engine.dispose()


async def test_the_purge_is_a_daily_durable_job_that_plans_its_successor(rt: Runtime) -> None:
    today = datetime.now(UTC).date()
    scheduler = IngestScheduler(rt)
    await scheduler.start()  # seeds the first run
    await scheduler.stop()
    async with rt.sessions() as session:
        job = await session.get(ScheduledJob, purge_job_key(today))
    assert job is not None and job.kind == RAW_EVENT_PURGE
    assert job.due_at == datetime.combine(today + timedelta(days=1), time(0), UTC)

    await RetentionPurge(rt).run(Job(job.key, job.kind, job.due_at, dict(job.payload), attempts=1))
    async with rt.sessions() as session:
        planned = await session.scalar(
            select(func.count())
            .select_from(ScheduledJob)
            .where(ScheduledJob.key == purge_job_key(today + timedelta(days=1)))
        )
    assert planned == 1


def test_the_events_topic_is_created_with_the_retention() -> None:
    settings = Settings(topic_prefix="x.", raw_event_retention_days=30)
    assert topic_configs(settings) == {"x.events": {"retention.ms": str(30 * DAY_MS)}}
    forever = Settings(topic_prefix="x.", raw_event_retention_days=0)
    assert topic_configs(forever) == {"x.events": {"retention.ms": "-1"}}
    assert Settings().raw_event_retention_days == 90
