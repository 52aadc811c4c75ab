"""Properties of the view folding, through the projector and its idempotency ledger (embedded
store): a redelivered event changes nothing, and the order events arrive in (within the
lateness window) does not change the order-insensitive parts of the view."""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from services.ingest.projector import Projector
from shared.bus import Record
from shared.envelope import EVENT_ADAPTER, Event, encode
from shared.runtime import Runtime
from shared.settings import BusKind, Settings
from shared.store.db import migrate
from shared.store.models import AccountView, UserView

BASE = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=6)
SLOW = settings(
    max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None
)
# Fields every order of arrival must agree on: counts and sums (and per-day buckets, the
# events all being inside the lateness window).
USER_FIELDS = (
    "event_count",
    "event_counts",
    "track_events",
    "feature_usage",
    "daily_usage",
    "area_events",
    "tickets_opened",
    "csat_sum",
    "csat_count",
    "first_seen",
    "last_seen",
)
ACCOUNT_FIELDS = (
    "event_count",
    "user_count",
    "daily_usage",
    "feature_usage",
    "tickets_total",
    "csat_sum",
    "csat_count",
    "invoices_paid",
    "payment_failures",
    "first_seen",
    "last_seen",
)


@st.composite
def histories(draw: st.DrawFn) -> list[Event]:
    n = draw(st.integers(1, 40))
    events: list[Event] = []
    for i in range(n):
        # A person belongs to one account (as in the product): u1, u2 to a1, u3 to a2.
        user = draw(st.sampled_from(["u1", "u2", "u3"]))
        account = "a2" if user == "u3" else "a1"
        kind = draw(
            st.sampled_from(["track", "track", "csat", "ticket", "invoice", "failed", "page"])
        )
        type_, payload = {
            "track": (
                "product.track",
                {"event": draw(st.sampled_from(["run", "save"])), "feature_area": "core"},
            ),
            "page": ("product.page", {"name": "home", "feature_area": "reports"}),
            "csat": ("survey.csat", {"score": draw(st.integers(1, 5))}),
            "ticket": ("support.ticket_opened", {"ticket_id": f"t{i}"}),
            "invoice": ("billing.invoice_paid", {"invoice_id": f"i{i}", "amount": 10.0}),
            "failed": ("billing.payment_failed", {"invoice_id": f"f{i}"}),
        }[kind]
        # Distinct times: "newest wins" fields are then order-free too.
        at = BASE + timedelta(minutes=draw(st.integers(0, 300)), microseconds=i)
        events.append(
            EVENT_ADAPTER.validate_python(
                {
                    "id": f"e{i}-{uuid.uuid4().hex[:6]}",
                    "source": "prop",
                    "type": type_,
                    "time": at,
                    "account_id": account,
                    "user_id": user,
                    "payload": payload,
                }
            )
        )
    return events


def _records(events: Sequence[Event]) -> list[Record]:
    return [Record("events", 0, i, e.account_id, encode(e), 0, ()) for i, e in enumerate(events)]


async def _fold(tmp: Path, batches: Sequence[Sequence[Event]]) -> dict[str, Any]:
    """Run the batches through a fresh projector and store; return the view rows."""
    settings_ = Settings(bus=BusKind.EMBEDDED, data_dir=tmp / uuid.uuid4().hex)
    settings_.data_dir.mkdir(parents=True)
    await migrate(settings_.resolved_database_url)
    rt = Runtime.from_settings(settings_)
    await rt.bus.start()
    try:
        projector = Projector(rt)
        for batch in batches:
            if batch:
                await projector.handle(_records(batch))
        async with rt.sessions() as session:
            users = (await session.scalars(select(UserView))).all()
            accounts = (await session.scalars(select(AccountView))).all()
            return {
                "users": {
                    u.user_id: {c.name: getattr(u, c.name) for c in UserView.__table__.columns}
                    for u in users
                },
                "accounts": {
                    a.account_id: {
                        c.name: getattr(a, c.name) for c in AccountView.__table__.columns
                    }
                    for a in accounts
                },
            }
    finally:
        await rt.bus.stop()
        await rt.engine.dispose()


def _split(events: Sequence[Event], cuts: Sequence[int]) -> list[list[Event]]:
    bounds = sorted({0, len(events), *(c % (len(events) + 1) for c in cuts)})
    return [list(events[a:b]) for a, b in itertools.pairwise(bounds)]


@SLOW
@given(histories(), st.lists(st.integers(0, 40), max_size=4), st.randoms())
def test_redelivered_events_change_nothing(
    tmp_path_factory: Any, events: list[Event], cuts: list[int], rnd: random.Random
) -> None:
    """Invariant: delivering every batch again, and redelivering earlier events inside later
    batches (at-least-once after a crash), gives exactly the view of one delivery: every
    column of every user and account row is equal."""
    tmp = tmp_path_factory.mktemp("fold")
    once = _split(events, cuts)
    seen: list[Event] = []
    redelivered: list[list[Event]] = []
    for batch in once:
        dupes = [e for e in seen if rnd.random() < 0.3]
        mixed = batch + dupes
        rnd.shuffle(mixed)
        redelivered.append(mixed)
        redelivered.append(list(batch))  # the whole batch again, as after a lost commit
        seen += batch
    a = asyncio.run(_fold(tmp, once))
    b = asyncio.run(_fold(tmp, redelivered))
    assert a == b


@SLOW
@given(histories(), st.lists(st.integers(0, 40), max_size=4), st.randoms())
def test_arrival_order_does_not_change_order_free_fields(
    tmp_path_factory: Any, events: list[Event], cuts: list[int], rnd: random.Random
) -> None:
    """Invariant: the same events, arriving in another order and other batches (all within
    the lateness window), give the same counts, sums, day buckets and first/last seen."""
    tmp = tmp_path_factory.mktemp("order")
    shuffled = list(events)
    rnd.shuffle(shuffled)
    a = asyncio.run(_fold(tmp, _split(events, cuts)))
    b = asyncio.run(_fold(tmp, _split(shuffled, cuts[::-1])))
    assert a["users"].keys() == b["users"].keys()
    assert a["accounts"].keys() == b["accounts"].keys()
    for uid, row in a["users"].items():
        assert {f: row[f] for f in USER_FIELDS} == {f: b["users"][uid][f] for f in USER_FIELDS}
    for aid, row in a["accounts"].items():
        other = b["accounts"][aid]
        assert {f: row[f] for f in ACCOUNT_FIELDS} == {f: other[f] for f in ACCOUNT_FIELDS}
