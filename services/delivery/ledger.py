"""The deliveries ledger: written before a send, so nothing is sent twice, and every failure
stays visible (``GET /v1/deliveries?status=dead``) and replayable (``nbv deliveries replay``)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from shared.scheduler import schedule
from shared.store.db import upsert
from shared.store.models import Delivery, utcnow

SEND_JOB = "delivery.send"


class Status(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # a retry is scheduled
    DEAD = "dead"  # out of retries, or refused for good; replayable
    SKIPPED = "skipped"  # no channel the person allows


SENDABLE = (Status.PENDING.value, Status.FAILED.value)


class DeliveryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    decision_id: str
    user_id: str
    account_id: str
    element_id: str
    requested_channel: str
    channel: str | None
    status: str
    attempts: int
    last_error: str | None
    reason: str
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    next_attempt_at: datetime | None


def delivery_key(decision_id: str, element_id: str, channel: str) -> str:
    """The idempotency key: one delivery per decision × element × requested channel."""
    return f"{decision_id}:{element_id}:{channel}"


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Exponential with jitter (half fixed, half random), so receivers that come back are not
    hit by every sender at the same instant."""
    ceiling = min(max_s, base_s * 2 ** max(0, attempt - 1))
    jitter = rng.uniform(0, ceiling / 2) if rng else random.uniform(0, ceiling / 2)
    return float(ceiling / 2 + jitter)


async def insert_new(
    session: AsyncSession, dialect: str, rows: Sequence[dict[str, Any]]
) -> set[str]:
    """Insert the rows whose key is new; returns those keys (the others were seen before)."""
    if not rows:
        return set()
    stmt = upsert(dialect, Delivery, rows, ["id"]).returning(Delivery.id)
    return set((await session.execute(stmt)).scalars())


async def schedule_send(
    session: AsyncSession,
    dialect: str,
    delivery_id: str,
    due_at: datetime,
    attempt: str,
    *,
    run: str = "0",
) -> None:
    """Queue one send attempt. The key names the run (0, or a replay) and the attempt, so a job
    re-run after a crash schedules the same retry again (a no-op), never a second chain."""
    await schedule(
        session,
        dialect,
        key=f"{SEND_JOB}:{delivery_id}:{attempt}",
        kind=SEND_JOB,
        due_at=due_at,
        payload={"delivery_id": delivery_id, "run": run},
    )


async def list_deliveries(
    session: AsyncSession,
    *,
    status: str | None = None,
    user_id: str | None = None,
    decision_id: str | None = None,
    limit: int = 100,
) -> list[DeliveryOut]:
    query = select(Delivery)
    if status:
        query = query.where(Delivery.status == status)
    if user_id:
        query = query.where(Delivery.user_id == user_id)
    if decision_id:
        query = query.where(Delivery.decision_id == decision_id)
    rows = await session.scalars(query.order_by(Delivery.updated_at.desc()).limit(limit))
    return [DeliveryOut.model_validate(r) for r in rows]


async def replay(
    session: AsyncSession, dialect: str, *, ids: Sequence[str] = (), all_dead: bool = False
) -> list[str]:
    """Re-queue dead deliveries with a fresh set of attempts; returns their ids. Only dead
    ones: a failed delivery already has its retry queued, and a second chain could send twice."""
    if not ids and not all_dead:
        return []
    query = select(Delivery.id).where(Delivery.status == Status.DEAD.value)
    if ids:
        query = query.where(Delivery.id.in_(list(ids)))
    chosen = list((await session.scalars(query.with_for_update())).all())
    if not chosen:
        return []
    now = utcnow()
    await session.execute(
        update(Delivery)
        .where(Delivery.id.in_(chosen))
        .values(status=Status.PENDING.value, attempts=0, next_attempt_at=now, updated_at=now)
    )
    run = f"replay-{uuid.uuid4().hex[:8]}"
    for delivery_id in chosen:
        await schedule_send(session, dialect, delivery_id, now, f"{run}:1", run=run)
    return chosen


def retry_at(now: datetime, attempt: int, base_s: float, max_s: float) -> datetime:
    return now + timedelta(seconds=backoff_s(attempt, base_s, max_s))
