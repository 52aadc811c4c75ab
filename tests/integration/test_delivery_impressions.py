"""Impression capping of in-app cards, on Kafka + PostgreSQL: a card shown again and again
without an answer is withdrawn (after a grace period, so it never vanishes under the person's
eyes), an answer in time keeps it, and a new offer of the element opens it again."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import create_async_engine

from services.delivery.responses import WITHDRAW_JOB
from shared.contracts import DecisionMessage
from shared.envelope import Channel
from shared.settings import Settings
from shared.store.models import ScheduledJob
from tests.delivery_support import decision, delivery_settings, nbv, publish_decisions
from tests.harness import auth_headers, eventually

pytestmark = pytest.mark.integration


async def _cards(http: httpx.AsyncClient, url: str, user: str) -> dict[str, dict[str, Any]]:
    r = await http.get(f"{url}/v1/users/{user}/inbox", params={"include_closed": "true"})
    return {c["element_id"]: c for c in r.json()["items"]}


async def _card(
    http: httpx.AsyncClient, url: str, d: DecisionMessage, element: str
) -> dict[str, Any]:
    async def probe() -> dict[str, Any]:
        return (await _cards(http, url, d.user_id)).get(element, {})

    return await eventually(
        probe, lambda c: c.get("decision_id") == d.decision_id, what=f"card of {d.decision_id}"
    )


async def _respond(
    http: httpx.AsyncClient, url: str, d: DecisionMessage, element: str, outcome: str
) -> str:
    r = await http.post(
        f"{url}/v1/responses",
        json={
            "user_id": d.user_id,
            "decision_id": d.decision_id,
            "element_id": element,
            "outcome": outcome,
        },
    )
    assert r.status_code == 202, r.text
    return str(r.json()["status"])


async def _grace_passes(database_url: str) -> None:
    """The hour the last impression stays on screen, passed at once; returns once the
    withdrawals have run."""
    engine = create_async_engine(database_url)
    withdrawals = ScheduledJob.kind == WITHDRAW_JOB
    async with engine.begin() as conn:
        await conn.execute(
            update(ScheduledJob)
            .where(withdrawals, ScheduledJob.status == "pending")
            .values(due_at=datetime.now(UTC))
        )

    async def statuses() -> list[str]:
        async with engine.connect() as conn:
            return list(await conn.scalars(select(ScheduledJob.status).where(withdrawals)))

    await eventually(statuses, lambda s: bool(s) and set(s) == {"done"}, what="withdrawals")
    await engine.dispose()


async def test_a_card_shown_three_times_unanswered_is_withdrawn_until_offered_again(
    kafka_settings: Settings,
) -> None:
    settings = delivery_settings(kafka_settings)
    assert settings.inapp_impression_cap == 3  # the default
    async with (
        nbv(settings, ["delivery"]) as app,
        httpx.AsyncClient(timeout=10, headers=auth_headers()) as http,
    ):
        d = decision("u-imp", Channel.IN_APP, element_id="tour")
        await publish_decisions(app.settings, [d])
        await _card(http, app.url, d, "tour")
        # Each page view reports the card shown; the label is one, the impressions add up.
        assert await _respond(http, app.url, d, "tour", "shown") == "shown"
        assert await _respond(http, app.url, d, "tour", "shown") == "shown"
        assert await _respond(http, app.url, d, "tour", "shown") == "shown"
        card = (await _cards(http, app.url, "u-imp"))["tour"]
        assert card["impressions"] == 3 and card["status"] == "shown"
        # The third impression is on screen now: the card stays until the grace has passed.
        await _grace_passes(settings.database_url)

        async def probe() -> dict[str, Any]:
            return (await _cards(http, app.url, "u-imp"))["tour"]

        card = await eventually(probe, lambda c: c["status"] == "expired", what="withdrawal")
        assert card["closed_reason"] == "impression cap: shown 3 times without an answer"
        opened = await http.get(f"{app.url}/v1/users/u-imp/inbox")
        assert opened.json()["items"] == []
        # A stale page's late report changes nothing.
        assert await _respond(http, app.url, d, "tour", "shown") == "expired"
        # A new offer of the element (after the decision service's cool-down) opens it again,
        # counting impressions from zero.
        again = decision("u-imp", Channel.IN_APP, element_id="tour")
        await publish_decisions(app.settings, [again])
        card = await _card(http, app.url, again, "tour")
        assert card["status"] == "pending" and card["impressions"] == 0
        assert card["closed_reason"] is None


async def test_an_answer_keeps_the_card_and_a_cap_of_zero_never_withdraws(
    kafka_settings: Settings,
) -> None:
    settings = delivery_settings(kafka_settings, inapp_impression_cap=2)
    async with (
        nbv(settings, ["delivery"]) as app,
        httpx.AsyncClient(timeout=10, headers=auth_headers()) as http,
    ):
        started = decision("u-ans", Channel.IN_APP, element_id="tour")
        later = decision("u-ans", Channel.IN_APP, element_id="quiz")
        await publish_decisions(app.settings, [started, later])
        await _card(http, app.url, started, "tour")
        await _card(http, app.url, later, "quiz")
        for _ in range(2):
            await _respond(http, app.url, started, "tour", "shown")
            await _respond(http, app.url, later, "quiz", "shown")
        # Both reached the cap; within the grace the person starts one and puts off the other.
        assert await _respond(http, app.url, started, "tour", "clicked") == "clicked"
        assert await _respond(http, app.url, later, "quiz", "snoozed") == "snoozed"
        await _grace_passes(settings.database_url)
        cards = await _cards(http, app.url, "u-ans")
        assert cards["tour"]["status"] == "clicked" and cards["quiz"]["status"] == "snoozed"

    off = delivery_settings(kafka_settings, inapp_impression_cap=0)
    async with (
        nbv(off, ["delivery"]) as app,
        httpx.AsyncClient(timeout=10, headers=auth_headers()) as http,
    ):
        d = decision("u-off", Channel.IN_APP, element_id="tour")
        await publish_decisions(app.settings, [d])
        await _card(http, app.url, d, "tour")
        for _ in range(5):
            assert await _respond(http, app.url, d, "tour", "shown") == "shown"
        card = (await _cards(http, app.url, "u-off"))["tour"]
        assert card["impressions"] == 5 and card["status"] == "shown"
