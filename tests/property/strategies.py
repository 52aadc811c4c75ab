"""Hypothesis strategies for valid events: every type, every optional field sometimes absent."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import strategies as st

from shared.envelope import Channel, Outcome, Role

identifiers = st.from_regex(r"[A-Za-z0-9._:@\-]{1,40}", fullmatch=True)
short_text = st.text(max_size=40)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | short_text
)
json_dicts = st.dictionaries(st.text(max_size=15), json_scalars, max_size=4)
# Any zone the sender likes; the envelope normalises to UTC without changing the instant.
aware_times = st.datetimes(
    min_value=datetime(2000, 1, 2),
    max_value=datetime(2099, 12, 31),
    timezones=st.sampled_from([UTC, ZoneInfo("Asia/Kolkata"), ZoneInfo("America/New_York")]),
)
money = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)


def _opt(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | s


def _fixed(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A payload dict whose None values are sometimes left out entirely."""
    return st.fixed_dictionaries(fields).flatmap(
        lambda d: st.sets(st.sampled_from(sorted(d)) if d else st.nothing()).map(
            lambda drop: {k: v for k, v in d.items() if not (v is None and k in drop)}
        )
    )


ticket = _fixed(
    ticket_id=identifiers,
    priority=st.sampled_from(["low", "normal", "high", "urgent"]),
    subject=_opt(short_text),
    feature_area=_opt(short_text),
)
invoice = _fixed(
    invoice_id=st.text(min_size=1, max_size=50),
    amount=money,
    currency=_opt(st.sampled_from(["usd", "eur"])),
    attempt_count=st.integers(0, 20),
    subscription_id=_opt(identifiers),
)

PAYLOADS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "product.track": _fixed(
        event=st.text(min_size=1, max_size=60),
        feature_area=_opt(short_text),
        properties=json_dicts,
    ),
    "user.identify": _fixed(
        email=_opt(st.emails()),
        name=_opt(st.text(max_size=200)),
        role=_opt(st.sampled_from([r.value for r in Role])),
        timezone=_opt(st.sampled_from(["UTC", "Europe/Paris", "America/New_York"])),
    ),
    "billing.subscription_updated": _fixed(
        plan=st.text(min_size=1, max_size=100),
        status=st.sampled_from(["active", "trialing", "past_due", "canceled", "paused"]),
        mrr=money,
        renewal_date=_opt(aware_times),
        subscription_id=_opt(identifiers),
        customer_id=_opt(identifiers),
    ),
    "support.ticket_opened": ticket,
    "support.ticket_solved": ticket,
    "support.ticket_updated": ticket,
    "survey.nps": _fixed(score=st.integers(0, 10), comment=_opt(short_text)),
    "survey.csat": _fixed(
        score=st.integers(1, 5), ticket_id=_opt(identifiers), comment=_opt(short_text)
    ),
    "nbv.response": _fixed(
        decision_id=identifiers,
        element_id=identifiers,
        outcome=st.sampled_from([o.value for o in Outcome]),
        channel=st.sampled_from([c.value for c in Channel]),
    ),
    "nbv.trigger": _fixed(
        trigger=st.text(min_size=1, max_size=100), reason=short_text, cause_event_id=identifiers
    ),
    "product.page": _fixed(
        name=st.text(min_size=1, max_size=60),
        category=_opt(short_text),
        feature_area=_opt(short_text),
        properties=json_dicts,
    ),
    "account.group": _fixed(
        name=_opt(st.text(max_size=200)), plan=_opt(st.text(max_size=100)), traits=json_dicts
    ),
    "billing.invoice_paid": invoice,
    "billing.payment_failed": invoice,
    "crm.contact_role": _fixed(
        role=st.sampled_from([r.value for r in Role]),
        change=st.sampled_from(["assigned", "removed", "left"]),
        email=_opt(st.emails()),
        name=_opt(short_text),
    ),
}
USER_TYPES = frozenset(
    {"product.track", "user.identify", "survey.nps", "product.page", "crm.contact_role"}
    | {"nbv.response"}
)


@st.composite
def event_dicts(draw: st.DrawFn, types: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A JSON-ready dict of a valid event."""
    type_ = draw(st.sampled_from(types or tuple(PAYLOADS)))
    data: dict[str, Any] = {
        "id": draw(identifiers),
        "source": draw(st.text(min_size=1, max_size=30)),
        "type": type_,
        "time": draw(aware_times).isoformat(),
        "account_id": draw(identifiers),
        "payload": draw(PAYLOADS[type_]),
    }
    if type_ in USER_TYPES or draw(st.booleans()):
        data["user_id"] = draw(identifiers)
    for key in ("renewal_date",):
        if isinstance(data["payload"].get(key), datetime):
            data["payload"][key] = data["payload"][key].isoformat()
    return data
