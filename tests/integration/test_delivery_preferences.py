"""The preference centre over HTTP, and channel choice honouring it, on Kafka + PostgreSQL;
plus the live inbox stream (server-sent events)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from shared.envelope import Channel
from shared.settings import Settings
from shared.store.db import upsert
from shared.store.models import ValueElementRow
from tests.delivery_support import SmtpSink, decision, delivery_settings, nbv, publish_decisions
from tests.factories import event_json
from tests.harness import auth_headers, eventually

pytestmark = pytest.mark.integration


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


async def _element(url: str, element_id: str, kind: str, channels: list[str]) -> None:
    """A library element whose allowed channels the fallback walks through."""
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        spec = {"id": element_id, "kind": kind, "channels": channels}
        await conn.execute(
            upsert(
                "postgresql",
                ValueElementRow,
                [{"id": element_id, "library_version": 1, "spec": spec, "active": False}],
                ["id"],
            )
        )
    await engine.dispose()


async def _delivery(http: httpx.AsyncClient, url: str, decision_id: str) -> dict[str, Any]:
    async def probe() -> list[dict[str, Any]]:
        r = await http.get(f"{url}/v1/deliveries", params={"decision_id": decision_id})
        return list(r.json())

    rows = await eventually(probe, bool, what=f"delivery of {decision_id}")
    return rows[0]


async def test_preferences_decide_the_channel(kafka_settings: Settings, smtp: SmtpSink) -> None:
    settings = delivery_settings(kafka_settings, smtp_port=smtp.port)
    async with nbv(settings) as app, httpx.AsyncClient(timeout=10, headers=auth_headers()) as http:
        prefs_url = f"{app.url}/v1/users/u1/preferences"
        assert (await http.get(prefs_url)).json()["channels"] == {}
        bad = await http.put(
            prefs_url,
            json={"quiet_hours": {"start": "22:00", "end": "07:00", "timezone": "Mars/X"}},
        )
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "quiet_hours.timezone"
        bad = await http.put(prefs_url, json={"channels": {"fax": True}})
        assert bad.status_code == 422 and "channels" in bad.json()["errors"][0]["field"]

        await http.post(
            f"{app.url}/v1/events",
            json=event_json("user.identify", {"email": "ana@example.com", "timezone": "UTC"}),
        )
        await eventually(
            lambda: http.get(f"{app.url}/v1/users/u1/view"), lambda r: r.status_code == 200
        )
        await _element(settings.database_url, "webinar-x", "webinar", ["email", "in_app"])
        await _element(settings.database_url, "only-mail", "guide", ["email"])

        # Email off: the element's next allowed channel (in-app) is used.
        saved = await http.put(prefs_url, json={"channels": {"email": False}})
        assert saved.status_code == 200 and saved.json()["channels"] == {"email": False}
        d1 = decision("u1", Channel.EMAIL, element_id="webinar-x", kind="webinar")
        # Email and in-app both off: nowhere to go, skipped with the reason.
        d2 = decision("u1", Channel.EMAIL, element_id="only-mail", kind="guide")
        await publish_decisions(app.settings, [d1])
        row = await _delivery(http, app.url, d1.decision_id)
        assert row["channel"] == "in_app" and "email disabled" in row["reason"]
        await http.put(prefs_url, json={"channels": {"email": False, "in_app": False}})
        await publish_decisions(app.settings, [d2])
        row = await _delivery(http, app.url, d2.decision_id)
        assert row["status"] == "skipped" and row["channel"] is None
        assert "in_app disabled" in row["reason"]

        # Opted out of webinars: skipped, even though email is allowed again.
        await http.put(prefs_url, json={"opted_out_kinds": ["webinar"]})
        d3 = decision("u1", Channel.EMAIL, element_id="webinar-x", kind="webinar")
        await publish_decisions(app.settings, [d3])
        row = await _delivery(http, app.url, d3.decision_id)
        assert row["status"] == "skipped" and "opted out of webinar" in row["reason"]

        # Quiet hours right now: the email waits for their end.
        now = datetime.now(UTC)
        window = {
            "start": (now - timedelta(hours=1)).strftime("%H:%M"),
            "end": (now + timedelta(hours=2)).strftime("%H:%M"),
            "timezone": "UTC",
        }
        await http.put(prefs_url, json={"quiet_hours": window})
        d4 = decision("u1", Channel.EMAIL, element_id="only-mail", kind="guide")
        await publish_decisions(app.settings, [d4])
        row = await _delivery(http, app.url, d4.decision_id)
        assert row["status"] == "pending" and "quiet hours" in row["reason"]
        due = datetime.fromisoformat(row["next_attempt_at"])
        assert timedelta(hours=1) < due - now <= timedelta(hours=2, minutes=1)
        await asyncio.sleep(0.5)
        assert smtp.messages == []
        assert (await http.get(prefs_url)).json()["quiet_hours"]["timezone"] == "UTC"


async def test_inbox_stream_pushes_cards_as_they_land(kafka_settings: Settings) -> None:
    settings = delivery_settings(kafka_settings)
    async with nbv(settings) as app, httpx.AsyncClient(timeout=10, headers=auth_headers()) as http:
        events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

        async def listen() -> None:
            async with http.stream("GET", f"{app.url}/v1/users/u7/inbox/stream") as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                kind = ""
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        await events.put((kind, json.loads(line[6:])))

        task = asyncio.create_task(listen())
        try:
            d = decision("u7", Channel.IN_APP, element_id="first-card")
            await asyncio.sleep(0.3)
            await publish_decisions(app.settings, [d])
            kind, card = await asyncio.wait_for(events.get(), 20)
            assert kind == "card" and card["element_id"] == "first-card"
            assert card["content"]["what"] and card["status"] == "pending"
            # A dismissal closes the card: the stream says remove.
            r = await http.post(
                f"{app.url}/v1/responses",
                json={
                    "user_id": "u7",
                    "decision_id": d.decision_id,
                    "element_id": "first-card",
                    "outcome": "dismissed",
                },
            )
            assert r.status_code == 202
            kind, gone = await asyncio.wait_for(events.get(), 5)
            assert kind == "remove" and gone["id"] == card["id"]
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
