"""Stripe-format billing webhooks: signature check and mapping into the envelope.

Verified like Stripe's own libraries do: the ``Stripe-Signature`` header carries ``t=<unix
time>`` and one or more ``v1=<hex>``; a ``v1`` must equal HMAC-SHA256(secret, "<t>.<raw body>")
and ``t`` must be within the tolerance of now. Anything else is refused before the body is
even parsed.

Mapped event types (others are acknowledged and ignored, as Stripe expects):
``customer.subscription.created|updated|deleted`` → ``billing.subscription_updated`` (plan,
status, MRR, renewal date = ``current_period_end``), ``invoice.paid`` →
``billing.invoice_paid``, ``invoice.payment_failed`` → ``billing.payment_failed``. The NBV
account is ``metadata.account_id`` of the subscription / invoice (or of the subscription
details on an invoice, or of an expanded customer).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.ingest.adapters import Unmappable
from shared.envelope import (
    Identifier,
    InboundEvent,
    InvoicePaidEvent,
    InvoicePayload,
    PaymentFailedEvent,
    SubscriptionEvent,
    SubscriptionPayload,
)

SOURCE = "stripe"
SUBSCRIPTION_TYPES = (
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
)
INVOICE_TYPES = ("invoice.paid", "invoice.payment_failed")
# Months per billing interval, to turn any price into monthly recurring revenue.
_MONTHS = {"day": 12 / 365, "week": 12 / 52, "month": 1.0, "year": 12.0}
_KNOWN_STATUSES = {
    "active",
    "trialing",
    "past_due",
    "canceled",
    "incomplete",
    "incomplete_expired",
    "unpaid",
    "paused",
}


class SignatureError(ValueError):
    """A webhook whose signature is missing, wrong or too old (answered with 400)."""


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """A ``Stripe-Signature`` header for ``body`` (what Stripe sends; used by tests and tools)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(body: bytes, header: str | None, secret: str, tolerance_s: int, now: float) -> None:
    if not header:
        raise SignatureError("missing Stripe-Signature header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError as exc:
                raise SignatureError("Stripe-Signature has a malformed timestamp") from exc
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureError("Stripe-Signature needs t= and v1=")
    expected = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    if not any(hmac.compare_digest(expected, c) for c in candidates):
        raise SignatureError("Stripe-Signature does not match the body")
    if abs(now - timestamp) > tolerance_s:
        raise SignatureError(f"Stripe-Signature timestamp outside the {tolerance_s} s tolerance")


# The last second of year 9999: later Unix times are no datetime.
_MAX_UNIX = 253_402_300_799


class StripeEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: Identifier
    type: str = Field(min_length=1)
    created: int = Field(ge=0, le=_MAX_UNIX)
    data: dict[str, Any]


# Stripe objects are read where they are, field by field; a field of the wrong shape is a 422
# naming it, never an exception of the mapping code.
_OBJECT = "data.object"


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _objects(value: object, field: str) -> list[Mapping[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise Unmappable(field, "must be a list of objects")
    return value


def _number(value: object, field: str, default: float = 0.0) -> float:
    """A finite, non-negative number (``default`` when absent)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unmappable(field, "must be a number")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise Unmappable(field, "must be a finite number, 0 or more")
    return number


def _metadata_account(*objects: object) -> str | None:
    for obj in objects:
        meta = _mapping(_mapping(obj).get("metadata"))
        if meta.get("account_id"):
            return str(meta["account_id"])
    return None


def _id(value: object) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("id")
    return str(value) if value else None


def monthly_amount(item: Mapping[str, Any], field: str = f"{_OBJECT}.items.data[]") -> float:
    price = _mapping(item.get("price") or item.get("plan"))
    amount = _number(price.get("unit_amount", price.get("amount")), f"{field}.price.unit_amount")
    recurring = _mapping(price.get("recurring")) or price
    interval = recurring.get("interval", "month")
    count = _number(recurring.get("interval_count"), f"{field}.price.recurring.interval_count")
    if count and (count < 1 or count != int(count)):
        raise Unmappable(f"{field}.price.recurring.interval_count", "must be a whole number ≥ 1")
    months = _MONTHS.get(str(interval), 1.0) * (count or 1)
    quantity = _number(item.get("quantity"), f"{field}.quantity") or 1
    return amount * quantity / 100 / months


def _plan_name(sub: Mapping[str, Any], items: list[Mapping[str, Any]]) -> str:
    for item in items:
        price = _mapping(item.get("price") or item.get("plan"))
        for key in ("nickname", "lookup_key", "id"):
            if price.get(key):
                return str(price[key])[:100]
    plan = _mapping(sub.get("plan"))
    return str(plan.get("nickname") or plan.get("id") or "unknown")[:100]


def _period_end(sub: Mapping[str, Any], items: list[Mapping[str, Any]]) -> datetime | None:
    # Newer API versions moved current_period_end from the subscription onto its items.
    ends = [sub.get("current_period_end")] + [i.get("current_period_end") for i in items]
    stamps = [e for e in ends if isinstance(e, int | float) and not isinstance(e, bool)]
    if not stamps:
        return None
    if not all(0 <= s <= _MAX_UNIX for s in stamps):
        raise Unmappable(f"{_OBJECT}.current_period_end", "not a Unix time in years 1970–9999")
    return datetime.fromtimestamp(max(stamps), UTC)


def _subscription(event: StripeEvent, obj: Mapping[str, Any], at: datetime) -> SubscriptionEvent:
    account = _metadata_account(obj, obj.get("customer"))
    if account is None:
        raise Unmappable(f"{_OBJECT}.metadata.account_id", "subscription has no NBV account id")
    items = _objects(_mapping(obj.get("items")).get("data"), f"{_OBJECT}.items.data")
    status = str(obj.get("status") or "active")
    if event.type == "customer.subscription.deleted":
        status = "canceled"
    if status not in _KNOWN_STATUSES:
        raise Unmappable(f"{_OBJECT}.status", f"unknown subscription status {status!r}")
    mrr = round(sum(monthly_amount(i) for i in items), 2)
    if not math.isfinite(mrr):
        raise Unmappable(f"{_OBJECT}.items", "amounts out of range")
    return SubscriptionEvent(
        id=event.id,
        source=SOURCE,
        type="billing.subscription_updated",
        time=at,
        account_id=account,
        payload=SubscriptionPayload(
            plan=_plan_name(obj, items),
            status=status,
            mrr=mrr,
            renewal_date=_period_end(obj, items),
            subscription_id=_id(obj.get("id")),
            customer_id=_id(obj.get("customer")),
        ),
    )


def _invoice(
    event: StripeEvent, obj: Mapping[str, Any], at: datetime
) -> InvoicePaidEvent | PaymentFailedEvent:
    parent = _mapping(_mapping(obj.get("parent")).get("subscription_details"))
    details = _mapping(obj.get("subscription_details"))
    account = _metadata_account(obj, details, parent, obj.get("customer"))
    if account is None:
        raise Unmappable(f"{_OBJECT}.metadata.account_id", "invoice has no NBV account id")
    paid = event.type == "invoice.paid"
    amount_field = "amount_paid" if paid else "amount_due"
    cents = _number(obj.get(amount_field), f"{_OBJECT}.{amount_field}")
    attempts = _number(obj.get("attempt_count"), f"{_OBJECT}.attempt_count")
    payload = InvoicePayload(
        invoice_id=str(obj.get("id") or event.id),
        amount=cents / 100,
        currency=obj.get("currency"),
        attempt_count=int(min(attempts, 2**31)),
        subscription_id=_id(obj.get("subscription") or parent.get("subscription")),
    )
    common: dict[str, Any] = {"id": event.id, "source": SOURCE, "time": at, "account_id": account}
    if paid:
        return InvoicePaidEvent(type="billing.invoice_paid", payload=payload, **common)
    return PaymentFailedEvent(type="billing.payment_failed", payload=payload, **common)


def to_event(raw: Mapping[str, Any]) -> InboundEvent | None:
    """A verified Stripe event → an envelope event; None for a type NBV does not use."""
    try:
        event = StripeEvent.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise Unmappable(".".join(str(p) for p in first["loc"]) or "body", first["msg"]) from exc
    obj = event.data.get("object")
    if not isinstance(obj, Mapping):
        raise Unmappable("data.object", "must be an object")
    at = datetime.fromtimestamp(event.created, UTC)
    try:
        if event.type in SUBSCRIPTION_TYPES:
            return _subscription(event, obj, at)
        if event.type in INVOICE_TYPES:
            return _invoice(event, obj, at)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise Unmappable(f"data.object ({field})", first["msg"]) from exc
    return None
