"""Retention of raw events (docs/privacy.md): nothing keeps them longer than
NBV_RAW_EVENT_RETENTION_DAYS.

Raw events live in the events topic — on Kafka its ``retention.ms``, set from the same setting
when NBV creates the topic (shared/bus), deletes them — and, in embedded mode, in the embedded
log. What the store keeps per raw event is its id in the idempotency ledger
(``processed_events``). A durable daily job (``raw-event-purge:<day>``, scheduling its
successor when it runs) deletes ledger rows and embedded-log records older than the retention,
in bounded batches (one short transaction each), so it never holds locks for long. A ledger row
goes only once its event has left the topic too (it was processed after it was published), so
nothing it deduplicates can be redelivered from there any more.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import delete, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from shared.metrics import RAW_EVENTS_PURGED
from shared.runtime import Runtime
from shared.scheduler import Job, schedule
from shared.store.models import ProcessedEvent

log = logging.getLogger(__name__)

RAW_EVENT_PURGE = "ingest.raw_event_purge"


@dataclass(frozen=True)
class Purged:
    ledger: int
    log: int


async def _purge_ledger(runtime: Runtime, cutoff: datetime, batch: int) -> int:
    total = 0
    while True:
        oldest = (
            select(ProcessedEvent.consumer, ProcessedEvent.event_id)
            .where(ProcessedEvent.processed_at < cutoff)
            .limit(batch)
        )
        stmt = delete(ProcessedEvent).where(
            tuple_(ProcessedEvent.consumer, ProcessedEvent.event_id).in_(oldest)
        )
        async with runtime.sessions() as session, session.begin():
            conn = await session.connection()
            n = int((await conn.execute(stmt)).rowcount or 0)
        total += n
        RAW_EVENTS_PURGED.labels("ledger").inc(n)
        if n < batch:
            return total


async def _purge_log(runtime: Runtime, cutoff: datetime, batch: int) -> int:
    before_ms = int(cutoff.timestamp() * 1000)
    total = 0
    while True:
        n = await runtime.bus.purge(before_ms, batch)
        total += n
        RAW_EVENTS_PURGED.labels("log").inc(n)
        if n < batch:
            return total


async def purge_raw_events(
    runtime: Runtime, now: datetime, *, retention_days: int, batch: int
) -> Purged:
    """Delete what is older than the retention (0: keep everything), ``batch`` rows at a time."""
    if retention_days <= 0:
        return Purged(0, 0)
    cutoff = now - timedelta(days=retention_days)
    return Purged(
        ledger=await _purge_ledger(runtime, cutoff, batch),
        log=await _purge_log(runtime, cutoff, batch),
    )


def purge_job_key(day: date) -> str:
    return f"raw-event-purge:{day.isoformat()}"


async def schedule_purge(session: AsyncSession, dialect: str, day: date) -> None:
    """The purge after ``day`` (at the next UTC midnight); a no-op if it is already planned."""
    await schedule(
        session,
        dialect,
        key=purge_job_key(day),
        kind=RAW_EVENT_PURGE,
        due_at=datetime.combine(day + timedelta(days=1), time(0), tzinfo=UTC),
        payload={"day": day.isoformat()},
    )


class RetentionPurge:
    """The scheduler handler: purge, then plan the next day's run."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    async def run(self, job: Job) -> None:
        s = self._rt.settings
        purged = await purge_raw_events(
            self._rt,
            datetime.now(UTC),
            retention_days=s.raw_event_retention_days,
            batch=s.retention_purge_batch,
        )
        log.info(
            "raw events purged",
            extra={
                "retention_days": s.raw_event_retention_days,
                "ledger_rows": purged.ledger,
                "log_records": purged.log,
            },
        )
        async with self._rt.sessions() as session, session.begin():
            await schedule_purge(session, self._rt.dialect, job.due_at.date())
