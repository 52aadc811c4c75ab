"""Erasure on the embedded store: what each table loses or keeps, idempotency, unknown ids,
the projector dropping an erased person's events on a replay, and the HTTP answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from pydantic import SecretStr
from sqlalchemy import delete, func, select

from services.ingest.erasure import ErasureGuard, erase_user, pseudonym
from services.ingest.projector import Projector
from shared.bus import Record
from shared.envelope import Event, encode
from shared.runtime import Runtime
from shared.settings import Settings
from shared.store.db import migrate
from shared.store.models import (
    AccountView,
    ChannelPreference,
    Contact,
    DecisionRow,
    Delivery,
    Erasure,
    InboxItem,
    Intervention,
    ProcessedEvent,
    ScheduledJob,
    UserAccount,
    UserView,
)
from tests.factories import event
from tests.ingest_support import ingest

KEY = b"pseudonym-test"
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def history() -> list[Event]:
    """u1 (to be erased) and u2 at acme; u1 is the champion and answered a card."""
    return [
        event("user.identify", {"email": "ana@example.com", "name": "Ana Lima"}, user="u1"),
        event("account.group", {"name": "Acme"}, user="u1", minutes=1),
        event("product.track", {"event": "run", "feature_area": "core"}, user="u1", minutes=2),
        event("crm.contact_role", {"role": "champion"}, user="u1", minutes=3),
        event(
            "nbv.response",
            {"decision_id": "d1", "element_id": "tour", "outcome": "clicked"},
            user="u1",
            minutes=4,
            id_="d1:tour:clicked",
        ),
        event("user.identify", {"email": "bo@example.com"}, user="u2", minutes=5),
        event("product.track", {"event": "run"}, user="u2", minutes=6),
    ]


def records(events: list[Event]) -> list[Record]:
    return [Record("events", 0, i, e.account_id, encode(e), 0) for i, e in enumerate(events)]


@pytest.fixture
async def rt(embedded_settings: Settings) -> AsyncIterator[Runtime]:
    runtime = Runtime.from_settings(
        embedded_settings.model_copy(update={"pseudonym_secret": SecretStr(KEY.decode())})
    )
    await migrate(embedded_settings.resolved_database_url)
    await runtime.bus.start()
    try:
        yield runtime
    finally:
        await runtime.bus.stop()
        await runtime.engine.dispose()


async def seed_rest(rt: Runtime) -> None:
    """What the decision and delivery services write for u1 (and one thing for u2)."""
    async with rt.sessions() as s, s.begin():
        for user, decision in (("u1", "d1"), ("u2", "d2")):
            s.add(
                DecisionRow(
                    id=decision,
                    user_id=user,
                    account_id="acme",
                    created_at=NOW,
                    policy="greedy",
                    model_version="prior",
                    context={"stage": "onboard"},
                    candidates=[{"element_id": "tour"}],
                    chosen=[{"element_id": "tour"}],
                )
            )
            s.add(
                Contact(
                    decision_id=decision,
                    element_id="tour",
                    user_id=user,
                    account_id="acme",
                    channel="in_app",
                    at=NOW,
                )
            )
        s.add(
            InboxItem(
                id="card-1",
                user_id="u1",
                account_id="acme",
                element_id="tour",
                decision_id="d1",
                rank=1,
                score=0.5,
                content={"title": "Tour"},
                status="clicked",
            )
        )
        s.add(
            Delivery(
                id="d1:tour:email",
                decision_id="d1",
                user_id="u1",
                account_id="acme",
                element_id="tour",
                requested_channel="email",
                channel="email",
                status="pending",
                payload={"user_id": "u1"},
            )
        )
        s.add(ChannelPreference(user_id="u1", channels={"email": True}))
        for key, kind, payload in (
            ("delivery.send:d1:tour:email:0:1", "delivery.send", {"delivery_id": "d1:tour:email"}),
            ("delivery.unsnooze:card-1:x", "delivery.unsnooze", {"card_id": "card-1"}),
            ("playbook:adoption:u1:t1:day1", "playbook_step", {"user_id": "u1"}),
            ("playbook:adoption:u2:t1:day1", "playbook_step", {"user_id": "u2"}),
        ):
            s.add(ScheduledJob(key=key, kind=kind, due_at=NOW, payload=payload))
        for event_id in ("usage_drop:u1:2026-11-30", "usage_drop:u10:2026-11-30"):
            s.add(ProcessedEvent(consumer="decision-triggers", event_id=event_id))


async def count(rt: Runtime, model: type, **where: str) -> int:
    async with rt.sessions() as s:
        stmt = select(func.count()).select_from(model)
        for column, value in where.items():
            stmt = stmt.where(getattr(model, column) == value)
        return int(await s.scalar(stmt) or 0)


async def test_erasure_deletes_pseudonymises_and_is_idempotent(rt: Runtime) -> None:
    await Projector(rt).handle(records(history()))
    await seed_rest(rt)
    alias = pseudonym(KEY, "u1")

    async with rt.sessions() as s, s.begin():
        report = await erase_user(s, rt.dialect, KEY, "u1", NOW)

    assert report.known and report.pseudonym == alias and alias.startswith("erased:")
    assert {table: n for table, n in report.deleted.items() if n} == {
        "scheduled_jobs": 3,  # the send, the unsnooze and the playbook step; not u2's step
        "processed_events": 1,  # usage_drop:u1:…, not usage_drop:u10:…
        "user_views": 1,
        "inbox_items": 1,
        "deliveries": 1,
        "channel_preferences": 1,
        "user_accounts": 1,
    }
    assert report.pseudonymised == {"decisions": 1, "contacts": 1, "interventions": 1}
    assert report.updated == {"account_views": 1}

    assert await count(rt, UserView, user_id="u1") == 0
    assert await count(rt, UserView, user_id="u2") == 1
    assert await count(rt, UserAccount) == 0
    assert await count(rt, DecisionRow, user_id=alias) == 1
    assert await count(rt, DecisionRow, user_id="u2") == 1
    assert await count(rt, Intervention, user_id=alias) == 1
    assert await count(rt, Contact, user_id=alias) == 1
    assert await count(rt, ScheduledJob) == 1  # u2's step only
    assert await count(rt, ProcessedEvent, event_id="usage_drop:u10:2026-11-30") == 1
    async with rt.sessions() as s:
        account = await s.get(AccountView, "acme")
    assert account is not None
    assert "u1" not in account.contacts.values() and account.user_count == 1
    assert account.event_count == len(history())  # anonymous counts stay

    async with rt.sessions() as s, s.begin():
        again = await erase_user(s, rt.dialect, KEY, "u1", NOW)
    assert not again.known
    assert not any(again.deleted.values()) and not any(again.pseudonymised.values())
    assert not any(again.updated.values())
    assert await count(rt, Erasure) == 1


async def test_an_unknown_id_is_recorded_and_its_events_never_projected(rt: Runtime) -> None:
    async with rt.sessions() as s, s.begin():
        report = await erase_user(s, rt.dialect, KEY, "ghost", NOW)
    assert not report.known and not any(report.deleted.values())
    # The person's events were still on their way: they are dropped, not projected.
    await Projector(rt).handle(
        records([event("user.identify", {"email": "g@example.com"}, user="ghost")])
    )
    assert await count(rt, UserView) == 0


async def test_a_replay_does_not_bring_an_erased_person_back(rt: Runtime) -> None:
    log = records(history())
    await Projector(rt).handle(log)
    async with rt.sessions() as s, s.begin():
        await erase_user(s, rt.dialect, KEY, "u1", NOW)
    # The documented replay: empty the view and the projector's ledger, read from offset 0.
    async with rt.sessions() as s, s.begin():
        for model in (UserView, AccountView, UserAccount):
            await s.execute(delete(model))
        await s.execute(delete(ProcessedEvent).where(ProcessedEvent.consumer == "projector"))
    projector = Projector(rt)
    for i in range(0, len(log), 3):  # other batch boundaries
        await projector.handle(log[i : i + 3])

    assert await count(rt, UserView, user_id="u1") == 0
    assert await count(rt, UserView, user_id="u2") == 1
    async with rt.sessions() as s:
        account = await s.get(AccountView, "acme")
    assert account is not None and account.contacts == {} and account.user_count == 1
    # Every event was claimed: a redelivery is as cheap as ever.
    assert await count(rt, ProcessedEvent, consumer="projector") == len(log)


async def test_the_guard_without_a_key_lets_everything_through(
    embedded_settings: Settings,
) -> None:
    guard = ErasureGuard(embedded_settings)
    rt = Runtime.from_settings(embedded_settings)
    await migrate(embedded_settings.resolved_database_url)
    try:
        async with rt.sessions() as s:
            events = history()
            assert await guard.admit(s, events) == events
    finally:
        await rt.engine.dispose()


async def test_delete_route_answers_200_503_and_422(embedded_settings: Settings) -> None:
    async with ingest(embedded_settings) as ing:
        r = await ing.http.delete("/v1/users/u1")
        assert r.status_code == 503 and "NBV_PSEUDONYM_SECRET" in r.json()["message"]
    configured = embedded_settings.model_copy(update={"signing_secret": SecretStr("s")})
    async with ingest(configured) as ing:
        r = await ing.http.delete("/v1/users/nobody")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["known"] is False and body["pseudonym"] == pseudonym(b"s", "nobody")
        assert set(body["deleted"]) >= {"user_views", "inbox_items", "deliveries"}
        r = await ing.http.delete("/v1/users/not%20an%20id")
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "user_id"
