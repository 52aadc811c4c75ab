"""A crash between recording a delivery and sending it: the send job a dead process had claimed
is claimed again once its lease runs out, and the message goes out (once) after the restart."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import create_async_engine

from services.delivery.ledger import SEND_JOB, delivery_key
from shared.envelope import Channel
from shared.settings import Settings
from shared.store.db import migrate
from shared.store.models import Delivery, ScheduledJob, UserView
from tests.delivery_support import SmtpSink, decision, delivery_settings, nbv
from tests.harness import auth_headers, eventually

pytestmark = pytest.mark.integration


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


async def test_a_pending_send_left_by_a_crash_goes_out_after_restart(
    kafka_settings: Settings, smtp: SmtpSink
) -> None:
    settings = delivery_settings(kafka_settings, smtp_port=smtp.port)
    await migrate(settings.database_url)
    d = decision("u1", Channel.EMAIL)
    key = delivery_key(d.decision_id, "video-tour", "email")
    now = datetime.now(UTC)
    engine = create_async_engine(settings.database_url)
    # What a process that died mid-send leaves behind: the ledger row still pending and its
    # job claimed ("running") under a lease that has since run out.
    async with engine.begin() as conn:
        await conn.execute(
            insert(UserView).values(
                user_id="u1",
                account_id="acme",
                email="ana@example.com",
                first_seen=now,
                last_seen=now,
                event_counts={},
                track_events={},
                feature_usage={},
                achieved={},
                dismissed={},
            )
        )
        await conn.execute(
            insert(Delivery).values(
                id=key,
                decision_id=d.decision_id,
                user_id="u1",
                account_id="acme",
                element_id="video-tour",
                requested_channel="email",
                channel="email",
                status="pending",
                attempts=0,
                reason="",
                payload=d.model_dump(mode="json"),
                created_at=now,
                updated_at=now,
                next_attempt_at=now,
            )
        )
        await conn.execute(
            insert(ScheduledJob).values(
                key=f"{SEND_JOB}:{key}:0:1",
                kind=SEND_JOB,
                due_at=now,
                payload={"delivery_id": key, "run": "0"},
                status="running",
                attempts=1,
                locked_until=now - timedelta(seconds=1),
            )
        )
    await engine.dispose()

    async with nbv(settings) as app, httpx.AsyncClient(timeout=10, headers=auth_headers()) as http:

        async def status() -> str:
            return str((await http.get(f"{app.url}/v1/deliveries/{key}")).json()["status"])

        await eventually(status, lambda s: s == "sent", what="the resend")
        assert [str(m["X-NBV-Delivery-Id"]).strip() for m in smtp.messages] == [key]
