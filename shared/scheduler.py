"""A durable scheduler in the store: timers that survive restarts and fire once.

Jobs are claimed with a lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several instances
share the work); a job whose runner died is claimed again when its lease runs out. Handlers must
be idempotent under that re-run: publish under the job's key, which consumers deduplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.logging import log_ref
from shared.metrics import SCHEDULER_BACKLOG, SCHEDULER_JOBS
from shared.store.db import upsert
from shared.store.models import ScheduledJob

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    key: str
    kind: str
    due_at: datetime
    payload: dict[str, Any]
    attempts: int


JobHandler = Callable[[Job], Awaitable[None]]


async def schedule(
    session: AsyncSession,
    dialect: str,
    *,
    key: str,
    kind: str,
    due_at: datetime,
    payload: dict[str, Any] | None = None,
) -> bool:
    """Add a job unless one with this key exists; True if it was added."""
    stmt = upsert(
        dialect,
        ScheduledJob,
        [{"key": key, "kind": kind, "due_at": due_at, "payload": payload or {}}],
        ["key"],
    ).returning(ScheduledJob.key)
    return (await session.execute(stmt)).first() is not None


async def cancel(session: AsyncSession, keys: Iterable[str]) -> int:
    """Cancel pending jobs (e.g. the remaining steps of a playbook); returns how many."""
    result = await session.execute(
        update(ScheduledJob)
        .where(ScheduledJob.key.in_(list(keys)), ScheduledJob.status == "pending")
        .values(status="cancelled", finished_at=datetime.now(UTC))
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


class SchedulerWorker:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        handlers: dict[str, JobHandler],
        *,
        poll_s: float = 1.0,
        lease: timedelta = timedelta(minutes=2),
        batch: int = 100,
        max_attempts: int = 10,
    ) -> None:
        self._sessions = sessions
        self._handlers = handlers
        self._poll_s = poll_s
        self._lease = lease
        self._batch = batch
        self._max_attempts = max_attempts
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def run_due(self, now: datetime | None = None) -> int:
        """Claim and run what is due; returns the number of jobs run."""
        now = now or datetime.now(UTC)
        jobs = await self._claim(now)
        for job in jobs:
            await self._run_one(job)
        await self._report_backlog(now)
        return len(jobs)

    async def _claim(self, now: datetime) -> list[Job]:
        due = (
            select(ScheduledJob.key)
            .where(
                ScheduledJob.due_at <= now,
                # Only the kinds this worker can run: several workers (one per service) share
                # the table, and a job claimed by a worker without its handler would stall.
                ScheduledJob.kind.in_(list(self._handlers)),
                (ScheduledJob.status == "pending")
                | ((ScheduledJob.status == "running") & (ScheduledJob.locked_until < now)),
            )
            .order_by(ScheduledJob.due_at)
            .limit(self._batch)
            .with_for_update(skip_locked=True)
        )
        async with self._sessions() as session, session.begin():
            keys = list((await session.scalars(due)).all())
            if not keys:
                return []
            rows = (
                await session.scalars(
                    update(ScheduledJob)
                    .where(ScheduledJob.key.in_(keys))
                    .values(
                        status="running",
                        locked_until=now + self._lease,
                        attempts=ScheduledJob.attempts + 1,
                    )
                    .returning(ScheduledJob)
                )
            ).all()
            return [Job(r.key, r.kind, r.due_at, dict(r.payload), r.attempts) for r in rows]

    async def _run_one(self, job: Job) -> None:
        handler = self._handlers.get(job.kind)
        status, error = "done", None
        try:
            if handler is None:
                raise LookupError(f"no handler for job kind {job.kind!r}")
            await handler(job)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:2000]
            # Retried on the next lease expiry; given up after max_attempts (kept, visible).
            status = "failed" if job.attempts >= self._max_attempts else "running"
            log.warning(
                "job failed", extra={"job_ref": log_ref(job.key), "kind": job.kind, "error": error}
            )
        SCHEDULER_JOBS.labels(job.kind, "ok" if error is None else "error").inc()
        async with self._sessions() as session, session.begin():
            values: dict[str, Any] = {"status": status, "last_error": error}
            if status != "running":
                values["finished_at"] = datetime.now(UTC)
            await session.execute(
                update(ScheduledJob).where(ScheduledJob.key == job.key).values(**values)
            )

    async def _report_backlog(self, now: datetime) -> None:
        async with self._sessions() as session:
            backlog = await session.scalar(
                select(func.count())
                .select_from(ScheduledJob)
                .where(ScheduledJob.due_at <= now, ScheduledJob.status.in_(("pending", "running")))
            )
        SCHEDULER_BACKLOG.set(backlog or 0)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                ran = await self.run_due()
            except Exception:
                log.exception("scheduler pass failed")
                ran = 0
            if ran < self._batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=self._poll_s)
