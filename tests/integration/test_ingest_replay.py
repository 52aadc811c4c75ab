"""The customer view on real PostgreSQL and Kafka: a replay from offset 0 into an empty database
rebuilds the same view (with other batch boundaries), redelivery changes nothing, and a record
that validates but cannot be processed goes to the dead-letter topic while the stream goes on."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from services.ingest.projector import Projector
from shared.bus import Message
from shared.envelope import Event, encode
from shared.runtime import Runtime
from shared.settings import Settings
from shared.store.db import migrate
from shared.store.models import AccountView, ProcessedEvent, UserView
from tests.factories import T0, event
from tests.harness import eventually, fresh_database

pytestmark = pytest.mark.integration


@pytest.fixture
async def second_db(pg_admin_url: str) -> AsyncIterator[str]:
    async with fresh_database(pg_admin_url) as url:
        yield url


def mixed_events(n: int, seed: int = 11) -> list[Event]:
    rng = random.Random(seed)
    out: list[Event] = []
    for i in range(n):
        user = f"user-{i % 31}"
        account = f"acct-{i % 31 % 7}"  # a user belongs to one account
        # In order over 40 days, with one in ten arriving up to 2 days late.
        at = T0 + timedelta(days=40 * i / n)
        if rng.random() < 0.1:
            at -= timedelta(hours=rng.uniform(1, 48))
        r = rng.random()
        if r < 0.7:
            area = rng.choice(["core", "reporting", "automation"])
            out.append(
                event(
                    "product.track",
                    {"event": rng.choice(["a", "b", "c"]), "feature_area": area},
                    account=account,
                    user=user,
                    at=at,
                )
            )
        elif r < 0.78:
            out.append(
                event(
                    "user.identify",
                    {"email": f"{user}-{i}@example.com", "role": "admin"},
                    account=account,
                    user=user,
                    at=at,
                )
            )
        elif r < 0.84:
            out.append(
                event("survey.nps", {"score": rng.randrange(11)}, account=account, user=user, at=at)
            )
        elif r < 0.9:
            out.append(
                event(
                    "support.ticket_opened",
                    {"ticket_id": f"t{i}", "priority": rng.choice(["low", "high"])},
                    account=account,
                    user=user,
                    at=at,
                )
            )
        elif r < 0.95:
            out.append(
                event(
                    "nbv.response",
                    {
                        "decision_id": f"d{i}",
                        "element_id": rng.choice(["tour", "guide"]),
                        "outcome": rng.choice(["shown", "clicked", "completed", "dismissed"]),
                    },
                    account=account,
                    user=user,
                    at=at,
                )
            )
        else:
            out.append(
                event(
                    "billing.subscription_updated",
                    {
                        "plan": rng.choice(["pro", "team"]),
                        "status": rng.choice(["active", "past_due"]),
                        "mrr": float(rng.randrange(100, 900)),
                    },
                    account=account,
                    user=None,
                    at=at,
                )
            )
    return out


async def snapshot(rt: Runtime) -> dict[str, Any]:
    async with rt.engine.connect() as conn:
        users = {
            r["user_id"]: dict(r)
            for r in (await conn.execute(select(UserView.__table__))).mappings()
        }
        accounts = {
            r["account_id"]: dict(r)
            for r in (await conn.execute(select(AccountView.__table__))).mappings()
        }
    return {"users": users, "accounts": accounts}


async def applied(rt: Runtime) -> int:
    async with rt.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(ProcessedEvent)) or 0)


async def project(rt: Runtime, group: str, expected: int) -> None:
    worker = rt.worker(topics=["events"], group=group, handler=Projector(rt).handle)
    await worker.start()
    try:
        await eventually(lambda: applied(rt), lambda n: n >= expected, timeout=60, what="applied")
        await asyncio.sleep(0.5)  # any redelivered tail must change nothing
    finally:
        await worker.stop()


async def test_replay_from_offset_zero_rebuilds_an_identical_view(
    kafka_settings: Settings, second_db: str
) -> None:
    events = mixed_events(1_500)
    first_settings = kafka_settings.model_copy(update={"consumer_batch_size": 700})
    await migrate(first_settings.resolved_database_url)
    rt = Runtime.from_settings(first_settings)
    await rt.bus.start()
    try:
        # Producers retry: a tenth of the events is on the log twice.
        log = events + events[::10]
        await rt.bus.publish(rt.topic("events"), [Message(e.account_id, encode(e)) for e in log])
        await project(rt, "projector", len(events))
        original = await snapshot(rt)
        assert await applied(rt) == len(events)
        assert sum(u["event_count"] for u in original["users"].values()) == sum(
            1 for e in events if e.user_id
        )
    finally:
        await rt.bus.stop()
        await rt.engine.dispose()

    # An empty database, a new consumer group from offset 0, other batch boundaries.
    replay_settings = kafka_settings.model_copy(
        update={"database_url": second_db, "consumer_batch_size": 97}
    )
    await migrate(second_db)
    replay = Runtime.from_settings(replay_settings)
    await replay.bus.start()
    try:
        await project(replay, "projector-replay", len(events))
        rebuilt = await snapshot(replay)
    finally:
        await replay.bus.stop()
        await replay.engine.dispose()

    assert rebuilt["users"].keys() == original["users"].keys()
    for key, row in original["users"].items():
        assert rebuilt["users"][key] == row, key
    for key, row in original["accounts"].items():
        assert rebuilt["accounts"][key] == row, key
    # Late events are in their own day's bucket, not the day they arrived.
    for user_id in ("user-3", "user-17"):
        expected = Counter(
            e.time.date().isoformat()
            for e in events
            if e.user_id == user_id and e.type == "product.track"
        )
        assert original["users"][user_id]["daily_usage"] == dict(expected)


async def test_a_record_that_fails_processing_is_dead_lettered_and_the_stream_goes_on(
    kafka_settings: Settings,
) -> None:
    await migrate(kafka_settings.resolved_database_url)
    rt = Runtime.from_settings(kafka_settings)
    await rt.bus.start()
    try:
        good_before = event("product.track", {"event": "a"}, account="acme", user="u1")
        # Valid by the schema, but the renewal notices would fall before year 1.
        poison = event(
            "billing.subscription_updated",
            {"plan": "pro", "renewal_date": "0001-02-01T00:00:00Z"},
            account="acme",
            user=None,
            minutes=1,
        )
        good_after = event("product.track", {"event": "b"}, account="acme", user="u1", minutes=2)
        await rt.bus.publish(
            rt.topic("events"),
            [Message("acme", encode(e)) for e in (good_before, poison, good_after)],
        )
        await project(rt, "projector", 2)
        async with rt.sessions() as session:
            user = await session.get(UserView, "u1")
            account = await session.get(AccountView, "acme")
        assert user is not None and user.track_events == {"a": 1, "b": 1}
        assert account is not None and account.plan is None  # the poison left no trace

        consumer = rt.bus.consumer([rt.topic("dead-letter")], "dlq-reader")
        await consumer.start()
        try:
            records = await eventually(
                lambda: consumer.fetch(10, 500), lambda r: len(r) == 1, what="one dead letter"
            )
        finally:
            await consumer.stop()
        headers = dict(records[0].headers)
        assert b"OverflowError" in headers["nbv-dlq-reason"]
        assert records[0].value == encode(poison)
    finally:
        await rt.bus.stop()
        await rt.engine.dispose()
