"""The projector on real PostgreSQL and Kafka: idempotent, and nothing lost across a crash."""

from __future__ import annotations

import asyncio
import random

import pytest
from sqlalchemy import func, select

from services.ingest.projector import Projector
from shared.bus import Message
from shared.envelope import encode
from shared.runtime import Runtime
from shared.settings import Settings
from shared.store.db import migrate
from shared.store.models import AccountView, ProcessedEvent, UserView
from tests.factories import event

pytestmark = pytest.mark.integration


async def _count_applied(rt: Runtime) -> int:
    async with rt.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(ProcessedEvent)) or 0)


async def test_crash_mid_stream_loses_nothing_and_counts_once(kafka_settings: Settings) -> None:
    await migrate(kafka_settings.resolved_database_url)
    rt = Runtime.from_settings(kafka_settings.model_copy(update={"consumer_batch_size": 100}))
    await rt.bus.start()
    total = 3_000
    rng = random.Random(5)
    events = [
        event(
            "product.track",
            {"event": "task_done", "feature_area": rng.choice(["core", "automation"])},
            account=f"acct-{i % 40}",
            user=f"user-{i % 400}",
            minutes=i,
        )
        for i in range(total)
    ]
    # Some producers retry: duplicates on the log must not count twice.
    duplicated = events + events[:200]
    await rt.bus.publish(rt.topic("events"), [Message(e.account_id, encode(e)) for e in duplicated])

    projector = Projector(rt)
    first = rt.worker(topics=["events"], group="projector", handler=projector.handle)
    await first.start()
    while await _count_applied(rt) < total // 4:
        await asyncio.sleep(0.05)
    # Crash: the task dies wherever it is, nothing is committed on the way out.
    assert first._task is not None
    first._task.cancel()
    await asyncio.gather(first._task, return_exceptions=True)
    await first._consumer.stop()  # type: ignore[union-attr]
    applied_before_restart = await _count_applied(rt)
    assert 0 < applied_before_restart < total

    second = rt.worker(topics=["events"], group="projector", handler=projector.handle)
    await second.start()
    for _ in range(600):
        if await _count_applied(rt) == total:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1)  # let any redelivered tail arrive, it must change nothing
    await second.stop()

    async with rt.sessions() as session:
        user_events = await session.scalar(select(func.sum(UserView.event_count)))
        account_events = await session.scalar(select(func.sum(AccountView.event_count)))
        users = await session.scalar(select(func.count()).select_from(UserView))
    assert await _count_applied(rt) == total
    assert user_events == total and account_events == total
    assert users == 400
    await rt.bus.stop()
    await rt.engine.dispose()
