"""The ingest's source endpoints end to end in embedded mode: HTTP → event log → view."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from services.ingest.adapters.stripe import sign
from shared.settings import Settings
from shared.store.models import ProcessedEvent
from tests.harness import TEST_ADMIN_KEY
from tests.ingest_support import Ingest, ingest

SECRET = "whsec_unit"


def settings_for(embedded_settings: Settings) -> Settings:
    return embedded_settings.model_copy(
        update={
            "stripe_webhook_secret": Settings(stripe_webhook_secret=SECRET).stripe_webhook_secret
        }
    )


async def _applied(ing: Ingest) -> int:
    async with ing.rt.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(ProcessedEvent)) or 0)


async def test_segment_group_then_track_without_group_id(embedded_settings: Settings) -> None:
    async with ingest(embedded_settings) as ing:
        r = await ing.http.post(
            "/v1/segment/group",
            json={"userId": "u1", "groupId": "acme", "traits": {"name": "Acme"}},
            auth=(TEST_ADMIN_KEY, ""),
        )
        assert r.status_code == 200 and r.json()["success"] is True
        r = await ing.http.post(
            "/v1/batch",
            json={
                "batch": [
                    {"type": "identify", "userId": "u1", "traits": {"role": "champion"}},
                    {
                        "type": "track",
                        "userId": "u1",
                        "event": "Report Built",
                        "messageId": "m-7",
                        "properties": {"feature_area": "reporting"},
                    },
                ]
            },
        )
        assert r.status_code == 200, r.text
        # The same message again (a client retry) changes nothing.
        again = await ing.http.post(
            "/v1/track", json={"userId": "u1", "event": "Report Built", "messageId": "m-7"}
        )
        assert again.status_code == 200
        view = await ing.wait_view("users", "u1", lambda v: v["event_count"] == 3, "3 events")
        assert view["role"] == "champion" and view["account_id"] == "acme"
        assert view["summary"]["usage"]["events_1d"] == 1
        account = await ing.wait_view("accounts", "acme", lambda v: v["name"] == "Acme", "name")
        assert account["summary"]["health"]["components"]["usage_breadth"]["value"] > 0


async def test_segment_identify_before_group_in_one_batch(embedded_settings: Settings) -> None:
    async with ingest(embedded_settings) as ing:
        r = await ing.http.post(
            "/v1/batch",
            json={
                "batch": [
                    {"type": "identify", "userId": "u9", "traits": {"email": "u9@example.com"}},
                    {"type": "group", "userId": "u9", "groupId": "globex"},
                ]
            },
        )
        assert r.status_code == 200, r.text
        view = await ing.wait_view("users", "u9", lambda v: v["event_count"] == 2, "2 events")
        assert view["account_id"] == "globex"


async def test_segment_refusals_name_the_field(embedded_settings: Settings) -> None:
    async with ingest(embedded_settings) as ing:
        r = await ing.http.post("/v1/segment/track", json={"userId": "stranger", "event": "x"})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "context.groupId"
        r = await ing.http.post(
            "/v1/segment/batch",
            json={
                "batch": [
                    {"type": "track", "userId": "u", "event": "x", "context": {"groupId": "a"}},
                    {"type": "track", "userId": "nobody", "event": "x"},
                ]
            },
        )
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "batch[1].context.groupId"
        r = await ing.http.post("/v1/segment/track", json={"event": "x"})
        assert r.status_code == 422 and "userId or anonymousId" in r.json()["message"]


def _stripe_body(event_id: str = "evt_1") -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "type": "customer.subscription.created",
            "created": int(time.time()),
            "data": {
                "object": {
                    "id": "sub_1",
                    "customer": "cus_1",
                    "status": "active",
                    "current_period_end": int(
                        (datetime.now(UTC) + timedelta(days=365)).timestamp()
                    ),
                    "metadata": {"account_id": "acme"},
                    "items": {
                        "data": [
                            {
                                "quantity": 1,
                                "price": {
                                    "nickname": "pro",
                                    "unit_amount": 50000,
                                    "recurring": {"interval": "month"},
                                },
                            }
                        ]
                    },
                }
            },
        }
    ).encode()


async def test_stripe_webhook_signature_gate(embedded_settings: Settings) -> None:
    async with ingest(settings_for(embedded_settings)) as ing:
        body = _stripe_body()
        stale = sign(body, SECRET, int(time.time()) - 301)
        forged = sign(body, "whsec_attacker", int(time.time()))
        for header in (stale, forged, None):
            headers = {"content-type": "application/json"}
            if header:
                headers["stripe-signature"] = header
            r = await ing.http.post("/v1/webhooks/stripe", content=body, headers=headers)
            assert r.status_code == 400, r.text
        good = {"stripe-signature": sign(body, SECRET, int(time.time()))}
        r = await ing.http.post("/v1/webhooks/stripe", content=body, headers=good)
        assert r.status_code == 200 and r.json() == {
            "received": True,
            "ignored": False,
            "id": "evt_1",
        }
        view = await ing.wait_view("accounts", "acme", lambda v: v["plan"] == "pro", "plan")
        assert view["mrr"] == 500.0 and view["subscription_id"] == "sub_1"
        assert 364 <= view["summary"]["days_to_renewal"] <= 365
        # Only the verified one was ever stored.
        assert await _applied(ing) == 1


async def test_stripe_without_a_secret_is_unavailable(embedded_settings: Settings) -> None:
    async with ingest(embedded_settings) as ing:
        r = await ing.http.post("/v1/webhooks/stripe", content=b"{}")
        assert r.status_code == 503 and "NBV_STRIPE_WEBHOOK_SECRET" in r.json()["message"]


async def test_support_survey_and_crm_endpoints(embedded_settings: Settings) -> None:
    async with ingest(embedded_settings) as ing:
        ticket = {
            "id": "zd-1",
            "type": "ticket.created",
            "detail": {
                "id": 7,
                "priority": "URGENT",
                "organization": {"external_id": "acme"},
                "requester": {"external_id": "u1"},
            },
        }
        assert (await ing.http.post("/v1/webhooks/support", json=ticket)).status_code == 202
        r = await ing.http.post(
            "/v1/surveys/responses",
            json={"id": "s-1", "account_id": "acme", "user_id": "u1", "kind": "nps", "score": 3},
        )
        assert r.status_code == 202
        r = await ing.http.post(
            "/v1/surveys/responses", json={"account_id": "acme", "kind": "nps", "score": 30}
        )
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "score"
        r = await ing.http.post(
            "/v1/crm/contacts",
            json={"id": "c-1", "account_id": "acme", "user_id": "u1", "role": "champion"},
        )
        assert r.status_code == 202
        account = await ing.wait_view(
            "accounts", "acme", lambda v: v["contacts"] and v["last_nps"] == 3, "all three"
        )
        assert account["open_tickets"] == {"7": "urgent"}
        assert account["summary"]["worst_open_priority"] == "urgent"
        user = await ing.view("users", "u1")
        assert user is not None and user["role"] == "champion" and user["tickets_opened"] == 1
