"""Time-based triggers: what gets scheduled, and the durable scheduler firing them once."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from sqlalchemy import select

from services.ingest.projector import Projector
from services.ingest.schedule import (
    IngestScheduler,
    account_jobs,
    calendar_jobs,
    usage_crossings,
)
from services.ingest.view import apply_event, new_account, new_user
from shared.bus import Record
from shared.envelope import TriggerEvent, decode, encode
from shared.runtime import Runtime
from shared.settings import Settings
from shared.store.db import migrate
from shared.store.models import ScheduledJob
from tests.factories import T0, event


def test_account_jobs_for_renewal_and_onboarding() -> None:
    renewal = T0 + timedelta(days=200)
    e = event(
        "billing.subscription_updated",
        {"plan": "pro", "renewal_date": renewal.isoformat()},
        user=None,
    )
    account = new_account(e)
    apply_event(account, None, e)
    jobs = {j["key"]: j for j in account_jobs(account, [180, 120, 90], 30, now=T0)}
    assert set(jobs) == {
        "renewal:acme:2027-05-20:180",
        "renewal:acme:2027-05-20:120",
        "renewal:acme:2027-05-20:90",
        "onboarding:acme:2026-11-01",
    }
    assert jobs["renewal:acme:2027-05-20:90"]["due_at"] == renewal - timedelta(days=90)
    assert jobs["onboarding:acme:2026-11-01"]["due_at"] == T0 + timedelta(days=30)
    # Replayed long after: notices whose moment has passed are not scheduled.
    late = account_jobs(account, [180, 120, 90], 30, now=renewal - timedelta(days=100))
    assert [j["key"] for j in late] == ["renewal:acme:2027-05-20:90"]


def test_calendar_jobs_roll_over_years() -> None:
    keys = [j["key"] for j in calendar_jobs(datetime(2026, 12, 15, tzinfo=UTC))]
    assert keys == ["usage-sweep:2026-12-15", "month-start:2027-01", "quarter-start:2027Q1"]
    keys = [j["key"] for j in calendar_jobs(datetime(2026, 2, 1, tzinfo=UTC))]
    assert keys[1:] == ["month-start:2026-03", "quarter-start:2026Q2"]


def test_usage_drop_and_inactivity_crossings() -> None:
    events = [
        event("product.track", {"event": "x"}, at=T0 + timedelta(days=d, minutes=m))
        for d in range(7)
        for m in range(4)
    ]
    user = new_user(events[0])
    account = new_account(events[0])
    for e in events:
        apply_event(account, user, e)
    fired = {
        d: [t.name for t in usage_crossings(user, (T0 + timedelta(days=d)).date(), 50, 7)]
        for d in range(6, 20)
    }
    # Usage stops after day 6: on day 11 the last 7 days hold 8 events against 20 before.
    assert fired[10] == [] and fired[11] == ["usage_drop"]
    assert fired[13] == ["inactive"]  # last active day 6, 7 days later
    assert sum(len(v) for v in fired.values()) == 2
    (drop,) = usage_crossings(user, date(2026, 11, 12), 50, 7)
    assert drop.id == "usage_drop:u1:2026-11-12" and drop.user_id == "u1"


async def test_scheduled_renewal_fires_once_across_runs(embedded_settings: Settings) -> None:
    rt = Runtime.from_settings(embedded_settings)  # creates the data directory
    await migrate(embedded_settings.resolved_database_url)
    await rt.bus.start()
    try:
        renewal = datetime.now(UTC) + timedelta(days=100)
        sub = event(
            "billing.subscription_updated",
            {"plan": "pro", "renewal_date": renewal.isoformat()},
            user=None,
            at=datetime.now(UTC),
        )
        await Projector(rt).handle([Record("events", 0, 0, "acme", encode(sub), 0)])
        async with rt.sessions() as session:
            keys = set(await session.scalars(select(ScheduledJob.key)))
        renewal_day = renewal.date().isoformat()
        assert f"renewal:acme:{renewal_day}:90" in keys
        # 180 and 120 days before renewal are already past: not scheduled.
        assert f"renewal:acme:{renewal_day}:120" not in keys

        scheduler = IngestScheduler(rt)
        due = renewal - timedelta(days=89)
        assert await scheduler.worker.run_due(now=due) == 1  # the 90-day notice
        assert await scheduler.worker.run_due(now=due) == 0  # done jobs never run again

        consumer = rt.bus.consumer([rt.topic("triggers")], "t")
        await consumer.start()
        records = await consumer.fetch(100, 200)
        triggers = [decode(r.value) for r in records]
        names = sorted(t.payload.trigger for t in triggers if isinstance(t, TriggerEvent))
        assert names == ["contract_signed", "renewal_90"]
        ids = [t.id for t in triggers]
        assert f"renewal:acme:{renewal_day}:90" in ids and len(ids) == len(set(ids))
    finally:
        await rt.bus.stop()
        await rt.engine.dispose()
