"""Erasure on real PostgreSQL and Kafka: a person built through the real ingest path, decided
for, delivered to (in-app and email) and answering, is erased by ``DELETE /v1/users/{id}``. No
text or JSON column of any table then holds their id, email or name (a generic scan, so a table
added later is covered), the decision log keeps its rows under the pseudonym, and replaying the
events topic from offset 0 does not bring them back. The logs never name them."""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.ingest.projector import Projector
from shared.envelope import Channel, decode
from shared.logging import RedactingJsonFormatter
from shared.runtime import Runtime
from shared.settings import Settings
from shared.store.models import (
    AccountView,
    DecisionRow,
    Intervention,
    ProcessedEvent,
    ScheduledJob,
    UserView,
)
from tests.delivery_support import SmtpSink, decision, delivery_settings, nbv, publish_decisions
from tests.harness import auth_headers, eventually

pytestmark = pytest.mark.integration

TEXT_COLUMNS = text(
    "SELECT table_name, column_name FROM information_schema.columns "
    "WHERE table_schema = 'public' "
    "AND data_type IN ('text', 'character varying', 'character', 'json', 'jsonb')"
)


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Everything NBV logged meanwhile, as the services write it (JSON, redacted); not the
    test's own HTTP client, whose request lines name the URLs it calls."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(lambda r: not r.name.startswith(("httpx", "httpcore")))
    handler.setFormatter(RedactingJsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def traces(engine: AsyncEngine, needles: list[str]) -> dict[str, int]:
    """``table.column`` → rows whose text mentions any needle, over every text/JSON column of
    every table in the database (whatever the models say)."""
    found: dict[str, int] = {}
    async with engine.connect() as conn:
        for table, column in (await conn.execute(TEXT_COLUMNS)).all():
            for needle in needles:
                n = await conn.scalar(
                    text(f'SELECT count(*) FROM "{table}" WHERE CAST("{column}" AS text) LIKE :p'),
                    {"p": f"%{needle}%"},
                )
                if n:
                    found[f"{table}.{column}"] = found.get(f"{table}.{column}", 0) + int(n)
    return found


async def scalar(engine: AsyncEngine, stmt: Any) -> Any:
    async with engine.connect() as conn:
        return await conn.scalar(stmt)


def dropped_total() -> float:
    return REGISTRY.get_sample_value("nbv_erased_events_dropped_total") or 0.0


async def test_erasure_leaves_no_trace_keeps_the_decision_log_and_survives_replay(
    kafka_settings: Settings, smtp: SmtpSink, json_logs: io.StringIO
) -> None:
    tag = uuid.uuid4().hex[:10]
    user, other, account = f"erase-me-{tag}", f"keep-{tag}", f"acme-{tag}"
    email, name = f"ana.{tag}@example.org", f"Ana Lima {tag}"
    settings = delivery_settings(kafka_settings, smtp_port=smtp.port)
    store = create_async_engine(settings.resolved_database_url)
    try:
        async with (
            nbv(settings) as app,
            httpx.AsyncClient(base_url=app.url, timeout=10, headers=auth_headers()) as http,
        ):
            # ---------------------------------------------------- the person, through ingest
            segment_calls: list[tuple[str, dict[str, Any]]] = [
                ("/v1/segment/group", {"userId": user, "groupId": account}),
                (
                    "/v1/segment/identify",
                    {
                        "userId": user,
                        "traits": {"email": email, "name": name, "role": "admin"},
                        "context": {"groupId": account, "timezone": "UTC"},
                    },
                ),
                (
                    "/v1/batch",
                    {
                        "batch": [
                            {
                                "type": "track",
                                "userId": user,
                                "event": f"report_built_{i}",
                                "properties": {"feature_area": "reporting"},
                            }
                            for i in range(3)
                        ]
                    },
                ),
            ]
            for path, body in segment_calls:
                r = await http.post(path, json=body)
                assert r.status_code == 200, r.text
            other_calls: list[tuple[str, dict[str, Any]]] = [
                (
                    "/v1/crm/contacts",
                    {"account_id": account, "user_id": user, "role": "champion", "email": email},
                ),
                (
                    "/v1/surveys/responses",
                    {"account_id": account, "user_id": user, "kind": "nps", "score": 9},
                ),
                (
                    "/v1/events",
                    {
                        "source": "app",
                        "type": "product.track",
                        "account_id": account,
                        "user_id": other,
                        "payload": {"event": "report_built", "feature_area": "reporting"},
                    },
                ),
            ]
            for path, body in other_calls:
                r = await http.post(path, json=body)
                assert r.status_code == 202, r.text
            await eventually(
                lambda: http.get(f"/v1/users/{user}/view"),
                lambda r: (
                    r.status_code == 200
                    and r.json()["email"] == email
                    and r.json()["last_nps"] == 9
                    and "champion" in r.json()["crm_roles"]
                ),
                what="the person's view",
            )
            await eventually(
                lambda: http.get(f"/v1/users/{other}/view"),
                lambda r: r.status_code == 200,
                what="the other person's view",
            )

            # ------------------------- a decision, its inbox card and the person's response
            r = await http.get("/v1/next-best-value", params={"user_id": user, "limit": 2})
            assert r.status_code == 200, r.text
            decided = r.json()
            assert decided["items"], decided
            first = decided["items"][0]["element_id"]
            await eventually(
                lambda: http.get(f"/v1/users/{user}/inbox"),
                lambda r: bool(r.json()["items"]),
                what="the inbox card",
            )
            r = await http.post(
                "/v1/responses",
                json={
                    "user_id": user,
                    "decision_id": decided["decision_id"],
                    "element_id": first,
                    "outcome": "clicked",
                },
            )
            assert r.status_code == 202, r.text
            await eventually(
                lambda: scalar(
                    store,
                    select(func.count())
                    .select_from(Intervention)
                    .where(Intervention.user_id == user),
                ),
                lambda n: n == 1,
                what="the response label",
            )

            # ------------------------ an email sent, and one waiting for quiet hours to end
            await publish_decisions(
                app.settings, [decision(user, Channel.EMAIL, account_id=account)]
            )
            await eventually(lambda: _sent(smtp), lambda n: n == 1, what="the email")
            assert email in str(smtp.messages[0]["To"])
            now = datetime.now(UTC)
            quiet = {
                "start": (now - timedelta(hours=1)).strftime("%H:%M"),
                "end": (now + timedelta(hours=2)).strftime("%H:%M"),
                "timezone": "UTC",
            }
            r = await http.put(f"/v1/users/{user}/preferences", json={"quiet_hours": quiet})
            assert r.status_code == 200, r.text
            waiting = decision(user, Channel.EMAIL, account_id=account, element_id="setup-guide")
            await publish_decisions(app.settings, [waiting])
            pending = await eventually(
                lambda: http.get("/v1/deliveries", params={"user_id": user, "status": "pending"}),
                lambda r: len(r.json()) == 1,
                what="the pending email",
            )
            pending_id = pending.json()[0]["id"]
            assert await _send_jobs(store, pending_id) == 1

            # The scan finds the person wherever they are (it would catch a new table too).
            before = await traces(store, [user, email, name])
            for where in (
                "user_views.user_id",
                "user_views.email",
                "account_views.contacts",
                "user_accounts.user_id",
                "decisions.user_id",
                "contacts.user_id",
                "inbox_items.user_id",
                "deliveries.user_id",
                "interventions.user_id",
                "channel_preferences.user_id",
            ):
                assert where in before, (where, before)

            # ------------------------------------------------------------------- erase
            r = await http.delete(f"/v1/users/{user}")
            assert r.status_code == 200, r.text
            report = r.json()
            alias = report["pseudonym"]
            assert report["known"] is True and alias.startswith("erased:") and user not in alias
            deleted = report["deleted"]
            assert deleted["user_views"] == 1 and deleted["user_accounts"] == 1
            assert deleted["inbox_items"] >= 1 and deleted["channel_preferences"] == 1
            assert deleted["deliveries"] >= 3  # the in-app card's, the email sent, the pending
            assert deleted["scheduled_jobs"] >= 2  # both sends' jobs (the pending one's too)
            assert report["pseudonymised"]["decisions"] >= 1
            assert report["pseudonymised"]["interventions"] == 1
            assert report["updated"] == {"account_views": 1}

            assert await traces(store, [user, email, name]) == {}
            assert (await http.get(f"/v1/users/{user}/view")).status_code == 404
            assert (await http.get(f"/v1/users/{user}/inbox")).json()["items"] == []
            # The pending email will never go out: its job is gone with its ledger row.
            assert await _send_jobs(store, pending_id) == 0
            # The decision log stays, under the pseudonym, for training and metrics.
            row = await scalar(
                store, select(DecisionRow.user_id).where(DecisionRow.id == decided["decision_id"])
            )
            assert row == alias
            label = await scalar(
                store,
                select(Intervention.outcome).where(
                    Intervention.user_id == alias,
                    Intervention.decision_id == decided["decision_id"],
                ),
            )
            assert label == "clicked"
            account_row = (await http.get(f"/v1/accounts/{account}/view")).json()
            assert user not in account_row["contacts"].values()

            again = await http.delete(f"/v1/users/{user}")
            assert again.status_code == 200
            assert again.json()["known"] is False
            assert not any(again.json()["deleted"].values())
            assert not any(again.json()["pseudonymised"].values())

        # --------------------------------------------------- replay the topic from offset 0
        # The documented replay (docs/operations.md): empty what the projector derived, then a
        # consumer group reads the events topic from the start.
        async with store.begin() as conn:
            await conn.execute(text("TRUNCATE user_views, account_views, user_accounts"))
            await conn.execute(text("DELETE FROM processed_events WHERE consumer = 'projector'"))
        on_topic = await _event_ids(settings)
        drops_before = dropped_total()
        rt = Runtime.from_settings(settings)
        await rt.bus.start()
        worker = rt.worker(
            topics=["events"], group="projector-replay", handler=Projector(rt).handle
        )
        await worker.start()
        try:
            await eventually(
                lambda: scalar(
                    store,
                    select(func.count())
                    .select_from(ProcessedEvent)
                    .where(ProcessedEvent.consumer == "projector"),
                ),
                lambda n: n == len(on_topic),
                timeout=60,
                what="the replay",
            )
        finally:
            await worker.stop()
            await rt.bus.stop()
            await rt.engine.dispose()

        assert await scalar(store, select(UserView.user_id).where(UserView.user_id == other))
        assert await scalar(store, select(AccountView.account_id)) == account
        assert await traces(store, [user, email, name]) == {}
        # The person's events were all dropped (group, identify, 3 tracks, CRM, NPS, response).
        assert dropped_total() - drops_before == 8
    finally:
        await store.dispose()

    logged = json_logs.getvalue()
    assert '"message": "person erased"' in logged
    assert '"message": "events of erased people dropped"' in logged
    assert user not in logged and email not in logged and name not in logged


async def _sent(smtp: SmtpSink) -> int:
    return len(smtp.messages)


async def _send_jobs(store: AsyncEngine, delivery_id: str) -> int:
    return int(
        await scalar(
            store,
            select(func.count())
            .select_from(ScheduledJob)
            .where(
                ScheduledJob.payload["delivery_id"].as_string() == delivery_id,
                ScheduledJob.status == "pending",
            ),
        )
        or 0
    )


async def _event_ids(settings: Settings) -> set[str]:
    """The distinct event ids on the events topic (what a replay has to get through)."""
    rt = Runtime.from_settings(settings)
    await rt.bus.start()
    consumer = rt.bus.consumer([rt.topic("events")], f"count-{uuid.uuid4().hex[:6]}")
    await consumer.start()
    ids: set[str] = set()
    try:
        quiet = 0
        while quiet < 3:
            records = await consumer.fetch(500, 1_000)
            quiet = 0 if records else quiet + 1
            ids.update(decode(r.value).id for r in records)
    finally:
        await consumer.stop()
        await rt.bus.stop()
        await rt.engine.dispose()
    return ids
