"""The loop across all three channels, through a real NBV process on Kafka + PostgreSQL with a
real SMTP server and a real webhook receiver: decisions become an email, a CSM alert and an
in-app card; the person's (and the CSM's) responses flow back and change the next decision."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.settings import Settings
from tests.delivery_support import (
    SIGNING_SECRET,
    WEBHOOK_SECRET,
    SmtpSink,
    WebhookReceiver,
    serve,
)
from tests.factories import event_json
from tests.harness import ServiceProcess, auth_headers, eventually, free_port

pytestmark = pytest.mark.integration
PUBLIC = "https://nbv.example.test"  # behind a gateway; the test talks to the process directly


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture
async def hook() -> AsyncIterator[tuple[WebhookReceiver, str]]:
    receiver = WebhookReceiver(healthy=True)
    async with serve(receiver.app(), free_port()) as url:
        yield receiver, f"{url}/hook"


async def test_email_webhook_and_card_responses_change_the_next_decision(
    kafka_settings: Settings,
    smtp: SmtpSink,
    hook: tuple[WebhookReceiver, str],
    tmp_path: Path,
) -> None:
    receiver, hook_url = hook
    hour = datetime.now(UTC).hour
    env = {
        "NBV_BUS": "kafka",
        "NBV_DATABASE_URL": kafka_settings.database_url,
        "NBV_KAFKA_BOOTSTRAP": kafka_settings.kafka_bootstrap,
        "NBV_TOPIC_PREFIX": kafka_settings.topic_prefix,
        "NBV_DATA_DIR": str(tmp_path / "data"),
        "NBV_EXPLORATION_EPSILON": "0",
        "NBV_CONSUMER_POLL_MS": "50",
        "NBV_DELIVERY_POLL_S": "0.1",
        "NBV_PUBLIC_URL": PUBLIC,
        "NBV_SIGNING_SECRET": SIGNING_SECRET,
        "NBV_SMTP_HOST": "127.0.0.1",
        "NBV_SMTP_PORT": str(smtp.port),
        "NBV_SMTP_FROM": "Acme CS <cs@example.com>",
        "NBV_CSM_WEBHOOK_URL": hook_url,
        "NBV_WEBHOOK_SECRET": WEBHOOK_SECRET,
        # The contact policy's caps, default quiet hours and post-dismissal suppression would
        # (rightly) hold back a second email or alert today; this test is about the loop, so
        # they are set out of its way.
        "NBV_DISMISSAL_SUPPRESSION_HOURS": "0",
        "NBV_CONTACT_CAP_PER_DAY": '{"email": 5, "csm": 5, "in_app": 30}',
        "NBV_CONTACT_CAP_PER_WEEK": '{"email": 10, "csm": 10, "in_app": 100}',
        "NBV_QUIET_HOURS_START": f"{(hour + 6) % 24:02d}:00",
        "NBV_QUIET_HOURS_END": f"{(hour + 8) % 24:02d}:00",
    }
    proc = ServiceProcess(["run"], env, tmp_path, "nbv")
    try:
        await proc.wait_ready()
        await _loop(proc.url, smtp, receiver)
    finally:
        assert proc.stop(), proc.log_tail()


async def _loop(url: str, smtp: SmtpSink, receiver: WebhookReceiver) -> None:
    async with httpx.AsyncClient(timeout=15, headers=auth_headers()) as http:
        events = [
            event_json(
                "user.identify", {"role": "champion", "email": "ana@example.com", "name": "Ana"}
            ),
            event_json("billing.subscription_updated", {"plan": "pro", "mrr": 990.0}, user=None),
        ]
        assert (
            await http.post(f"{url}/v1/events/batch", json={"events": events})
        ).status_code == 202
        await eventually(lambda: http.get(f"{url}/v1/users/u1/view"), lambda r: r.is_success)

        async def decide(channel: str) -> dict[str, Any]:
            r = await http.get(
                f"{url}/v1/next-best-value",
                params={"user_id": "u1", "channel": channel, "limit": 1},
            )
            assert r.status_code == 200, r.text
            return dict(r.json())

        async def respond(d: dict[str, Any], outcome: str, channel: str) -> None:
            body = {
                "user_id": "u1",
                "decision_id": d["decision_id"],
                "element_id": d["items"][0]["element_id"],
                "outcome": outcome,
                "channel": channel,
            }
            r = await http.post(f"{url}/v1/responses", json=body)
            assert r.status_code == 202, r.text

        async def view() -> dict[str, Any]:
            return dict((await http.get(f"{url}/v1/users/u1/view")).json())

        email_d, csm_d, card_d = await decide("email"), await decide("csm"), await decide("in_app")
        email_el, csm_el, card_el = (d["items"][0]["element_id"] for d in (email_d, csm_d, card_d))

        # 1. The three deliveries arrive. (Playbooks may add their own alerts and emails for
        #    this person; the checks follow these decisions' ledger keys.)
        async def delivered(d: dict[str, Any]) -> dict[str, Any]:
            r = await http.get(f"{url}/v1/deliveries", params={"decision_id": d["decision_id"]})
            rows = r.json()
            return dict(rows[0]) if rows and rows[0]["status"] == "sent" else {}

        def received_once(delivery_id: str) -> bool:
            mails = [str(m["X-NBV-Delivery-Id"]).strip() for m in smtp.messages]
            return (mails + receiver.delivery_ids).count(delivery_id) == 1

        for d, channel in ((email_d, "email"), (csm_d, "csm"), (card_d, "in_app")):
            row = await _sent(delivered, d, f"{channel} delivery")
            assert row["channel"] == channel
            if channel != "in_app":
                await _once(received_once, row["id"])
        inbox = (await http.get(f"{url}/v1/users/u1/inbox")).json()["items"]
        assert card_el in [i["element_id"] for i in inbox]
        msg = next(
            m for m in smtp.messages if email_d["decision_id"] in str(m["X-NBV-Delivery-Id"])
        )
        assert msg["To"] == "Ana <ana@example.com>"
        # (a long header is folded on the wire; strip the fold's leading space)
        assert str(msg["X-NBV-Delivery-Id"]).strip().startswith(email_d["decision_id"])

        # A trigger reaches the CSM too, with no request behind it: the signed contract (the
        # subscription event above) fired contract_signed, whose onboarding playbook's first
        # step is a CSM alert for the champion.
        async def triggered() -> list[str]:
            return [
                a.get("trigger") or "" for a in receiver.received if a["who"]["user_id"] == "u1"
            ]

        await eventually(
            triggered,
            lambda t: "playbook:onboarding:csm-welcome" in t,
            what="onboarding playbook alert",
        )
        alert = next(a for a in receiver.received if a["decision_id"] == csm_d["decision_id"])
        assert alert["element_id"] == csm_el and alert["who"]["name"] == "Ana"
        assert alert["view_url"] == f"{PUBLIC}/v1/users/u1/view"

        # 2. Responses: Ana clicks the email's tracked link and completes it; the CSM reports
        #    the call done; Ana dismisses the in-app card.
        html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
        link = re.findall(r'href="(' + re.escape(PUBLIC) + r'/v1/t/[^"]+)"', html)[0]
        hop = await http.get(link.replace(PUBLIC, url))
        assert hop.status_code == 302
        await respond(email_d, "completed", "email")
        await respond(csm_d, "completed", "csm")
        await respond(card_d, "dismissed", "in_app")

        seen = await eventually(
            view,
            lambda v: (
                {email_el, csm_el} <= set(v.get("achieved", {}))
                and card_el in v.get("dismissed", {})
            ),
            what="responses in the view",
        )
        assert seen["event_counts"].get("nbv.response", 0) >= 4  # clicked + three answers

        # 3. The next decision on each channel has moved on, says why, and is delivered once.
        for channel, element, rule in (
            ("email", email_el, "achieved"),
            ("csm", csm_el, "achieved"),
            ("in_app", card_el, "dismissed"),
        ):
            nxt = await decide(channel)
            assert nxt["items"], f"no {channel} element offered next"
            assert element not in [i["element_id"] for i in nxt["items"]]
            log = (await http.get(f"{url}/v1/decisions/{nxt['decision_id']}")).json()
            assert {c["element_id"]: c["excluded_by"] for c in log["candidates"]}[element] == rule
            row = await _sent(delivered, nxt, f"next {channel}")
            if channel != "in_app":
                await _once(received_once, row["id"])

        ledger = (await http.get(f"{url}/v1/deliveries", params={"user_id": "u1"})).json()
        assert ledger and not [r for r in ledger if r["status"] in ("dead", "failed")]
        mails = [str(m["X-NBV-Delivery-Id"]).strip() for m in smtp.messages]
        assert len(mails) == len(set(mails))
        assert len(receiver.delivery_ids) == len(set(receiver.delivery_ids))


async def _sent(
    delivered: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    decision: dict[str, Any],
    what: str,
) -> dict[str, Any]:
    return await eventually(lambda: delivered(decision), bool, what=what)


async def _once(received_once: Callable[[str], bool], delivery_id: str) -> None:
    async def probe() -> bool:
        return received_once(delivery_id)

    await eventually(probe, bool, what=f"{delivery_id} received once")
