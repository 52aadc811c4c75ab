"""Stripe webhooks: the signature scheme and the mapping of subscriptions and invoices."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from services.ingest.adapters import Unmappable
from services.ingest.adapters.stripe import SignatureError, monthly_amount, sign, to_event, verify

SECRET = "whsec_test"
NOW = 1_790_000_000


def subscription_event(kind: str = "customer.subscription.created", **obj) -> dict[str, Any]:
    base = {
        "id": "sub_1",
        "object": "subscription",
        "customer": "cus_1",
        "status": "active",
        "current_period_end": NOW + 30 * 86_400,
        "metadata": {"account_id": "acme"},
        "items": {
            "data": [
                {
                    "quantity": 10,
                    "price": {
                        "id": "price_1",
                        "nickname": "pro",
                        "unit_amount": 1200,
                        "recurring": {"interval": "year", "interval_count": 1},
                    },
                }
            ]
        },
    }
    base.update(obj)
    return {"id": "evt_1", "type": kind, "created": NOW, "data": {"object": base}}


def test_a_good_signature_verifies() -> None:
    body = b'{"id": "evt_1"}'
    verify(body, sign(body, SECRET, NOW), SECRET, 300, NOW + 10)
    # Stripe may send several v1 signatures while a secret is rolled.
    good = sign(body, SECRET, NOW).split(",")[1]
    verify(body, f"t={NOW},v1=deadbeef,{good}", SECRET, 300, NOW)


@pytest.mark.parametrize(
    ("header", "now", "match"),
    [
        (None, NOW, "missing"),
        ("v1=abc", NOW, "needs t= and v1="),
        ("t=x,v1=abc", NOW, "malformed"),
        ("BAD", NOW, "needs"),
    ],
)
def test_malformed_headers_are_refused(header: str | None, now: int, match: str) -> None:
    with pytest.raises(SignatureError, match=match):
        verify(b"{}", header, SECRET, 300, now)


def test_a_tampered_body_or_wrong_secret_is_refused() -> None:
    header = sign(b'{"amount": 1}', SECRET, NOW)
    with pytest.raises(SignatureError, match="does not match"):
        verify(b'{"amount": 2}', header, SECRET, 300, NOW)
    with pytest.raises(SignatureError, match="does not match"):
        verify(b'{"amount": 1}', header, "whsec_other", 300, NOW)


def test_a_stale_signature_is_refused() -> None:
    body = b"{}"
    with pytest.raises(SignatureError, match="tolerance"):
        verify(body, sign(body, SECRET, NOW - 301), SECRET, 300, NOW)


def test_subscription_created_maps_plan_mrr_and_renewal() -> None:
    e = to_event(subscription_event())
    assert e is not None and e.type == "billing.subscription_updated"
    p = e.payload
    assert e.id == "evt_1" and e.account_id == "acme" and e.user_id is None
    assert p.plan == "pro" and p.status == "active"
    assert p.mrr == 10.0  # 10 seats x 12.00 a year = 10.00 a month  # type: ignore[union-attr]
    assert p.renewal_date == datetime.fromtimestamp(NOW + 30 * 86_400, UTC)
    assert e.time == datetime.fromtimestamp(NOW, UTC)


def test_deleted_subscription_is_canceled_and_account_may_come_from_the_customer() -> None:
    e = to_event(
        subscription_event(
            "customer.subscription.deleted",
            metadata={},
            customer={"id": "cus_1", "metadata": {"account_id": "globex"}},
        )
    )
    assert e is not None and e.account_id == "globex"
    assert e.payload.status == "canceled" and e.payload.customer_id == "cus_1"  # type: ignore[union-attr]


def test_period_end_on_items_in_newer_api_versions() -> None:
    raw = subscription_event(current_period_end=None)
    raw["data"]["object"]["items"]["data"][0]["current_period_end"] = NOW + 86_400
    e = to_event(raw)
    assert e is not None
    assert e.payload.renewal_date == datetime.fromtimestamp(NOW + 86_400, UTC)  # type: ignore[union-attr]


def test_invoices_paid_and_failed() -> None:
    invoice = {
        "id": "in_1",
        "amount_paid": 12000,
        "amount_due": 12000,
        "currency": "eur",
        "attempt_count": 2,
        "parent": {
            "subscription_details": {"subscription": "sub_1", "metadata": {"account_id": "acme"}}
        },
    }
    paid = to_event(
        {"id": "evt_2", "type": "invoice.paid", "created": NOW, "data": {"object": invoice}}
    )
    failed = to_event(
        {
            "id": "evt_3",
            "type": "invoice.payment_failed",
            "created": NOW,
            "data": {"object": invoice},
        }
    )
    assert paid is not None and paid.type == "billing.invoice_paid"
    assert paid.payload.amount == 120.0 and paid.payload.subscription_id == "sub_1"
    assert failed is not None and failed.type == "billing.payment_failed"
    assert failed.payload.attempt_count == 2


def test_missing_account_and_unknown_types() -> None:
    with pytest.raises(Unmappable) as err:
        to_event(subscription_event(metadata={}))
    assert err.value.field == "data.object.metadata.account_id"
    assert (
        to_event({"id": "evt_9", "type": "charge.refunded", "created": NOW, "data": {"object": {}}})
        is None
    )
    with pytest.raises(Unmappable, match="created"):
        to_event({"id": "evt_9", "type": "invoice.paid", "data": {"object": {}}})


def test_monthly_amount_normalises_intervals() -> None:
    def item(amount: int, interval: str, count: int = 1, qty: int = 1) -> dict[str, object]:
        return {
            "quantity": qty,
            "price": {
                "unit_amount": amount,
                "recurring": {"interval": interval, "interval_count": count},
            },
        }

    assert monthly_amount(item(5000, "month")) == 50.0
    assert monthly_amount(item(5000, "month", count=2)) == 25.0
    assert round(monthly_amount(item(1000, "week")), 2) == round(10 * 52 / 12, 2)
    assert json.dumps(monthly_amount(item(0, "year"))) == "0.0"
