"""Properties of the source adapters (Segment, Stripe, support desk, surveys, CRM).

Well-formed input maps to a valid envelope event that survives the bus unchanged, keeps the
source's ids and timestamps, and maps to the same idempotency key when the source delivers it
again (later). Arbitrary JSON is either refused by the route's body model (a 422) or by the
adapter with ``Unmappable`` (a 422 naming the field): no other exception, so no path to a 5xx.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.ingest.adapters import Unmappable, crm, segment, stripe, support, surveys
from shared.envelope import EVENT_ADAPTER, decode, encode
from tests.property.strategies import aware_times, identifiers, json_scalars

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RECEIVED = datetime(2100, 1, 1, tzinfo=UTC)  # after every generated timestamp
LATER = RECEIVED + timedelta(hours=5)  # a re-delivery, hours later

json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
# What breaks mappers: any JSON, over-long text, numbers out of every range.
junk = (
    json_values
    | st.text(min_size=190, max_size=400)
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from([-1, 0, 1e308, -1e-320, 2**63, "", " ", "²", "１"])
)
segment_ids = st.from_regex(r"[A-Za-z0-9._:@\-]{1,40}", fullmatch=True)
# Any text a source may use as an id: NBV hashes what is outside its alphabet (a blank one is
# refused: test_a_blank_segment_message_id_is_refused_by_name).
any_ids = segment_ids | st.text(min_size=1, max_size=40).filter(str.strip)


def _containers(value: Any) -> Iterator[dict[str, Any]]:
    """Every object in a JSON tree."""
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from _containers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _containers(v)


@st.composite
def damaged(
    draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]], keys: Sequence[str] = ()
) -> dict[str, Any]:
    """A well-formed payload with one or two values anywhere in it (or keys the adapter reads
    that it lacked) replaced by junk: mostly the right shape is where mappers trip."""
    raw = copy.deepcopy(draw(valid))
    for _ in range(draw(st.integers(1, 2))):
        target = draw(st.sampled_from(list(_containers(raw))))
        present = sorted(target)
        # Mostly a value that is there; sometimes one the adapter looks for but was left out.
        if present and (not keys or draw(st.integers(0, 3))):
            key = draw(st.sampled_from(present))
        else:
            key = draw(st.sampled_from(sorted(keys)))
        target[key] = draw(junk)
    return raw


def _roundtrips(event: Any) -> None:
    """A valid envelope event, unchanged by the trip through the bus."""
    again = decode(encode(event))
    assert again == EVENT_ADAPTER.validate_python(event.model_dump())
    assert encode(again) == encode(event)


def refused_cleanly(validate: Callable[[Any], Any], adapt: Callable[[Any], Any], raw: Any) -> None:
    """The route's path for ``raw``: its body model may refuse it (ValidationError: a 422),
    then the adapter may refuse it (Unmappable: a 422 naming the field). Anything else the
    adapter raises — a ValidationError of its own included — would be a 500."""
    try:
        body = validate(raw)
    except (ValidationError, Unmappable):
        return
    with contextlib.suppress(Unmappable):
        adapt(body)


# ----------------------------------------------------------------------------- Segment


def _segment_events(body: segment.SegmentBatch, received: datetime = RECEIVED) -> Any:
    return segment.to_events(
        list(body.batch), received_at=received, known={}, sent_at=body.sent_at, context=body.context
    )


def _segment(raw: Any, received: datetime = RECEIVED) -> Any:
    return _segment_events(segment.SegmentBatch.model_validate(raw), received)


@st.composite
def segment_messages(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["track", "identify", "group", "page", "screen"]))
    message: dict[str, Any] = {"type": kind, "userId": draw(segment_ids)}
    if draw(st.booleans()):
        message["messageId"] = draw(any_ids)
    if draw(st.booleans()):
        message["timestamp"] = draw(aware_times).isoformat()
    context: dict[str, Any] = {"groupId": draw(segment_ids)}
    if draw(st.booleans()):
        context["traits"] = {"email": draw(st.emails()), "name": draw(st.text(max_size=30))}
    if draw(st.booleans()):
        context["timezone"] = draw(st.sampled_from(["UTC", "Europe/Paris"]))
    message["context"] = context
    properties = st.dictionaries(
        st.sampled_from(["feature_area", "featureArea", "title", "path", "x"]),
        json_scalars,
        max_size=2,
    )
    if kind == "track":
        message["event"] = draw(st.text(min_size=1, max_size=200))
        message["properties"] = draw(properties)
    elif kind == "identify":
        message["traits"] = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "email": st.emails(),
                    "name": st.text(max_size=200),
                    "firstName": st.text(max_size=30),
                    "role": st.sampled_from(["admin", "champion", "CTO"]),
                    "timezone": st.sampled_from(["UTC", "Asia/Tokyo"]),
                },
            )
        )
    elif kind == "group":
        message["groupId"] = draw(segment_ids)
        message["traits"] = draw(
            st.fixed_dictionaries(
                {}, optional={"name": st.text(max_size=200), "plan": st.text(max_size=100)}
            )
        )
    else:
        message["name"] = draw(st.none() | st.text(max_size=200))
        message["properties"] = draw(properties)
    return message


# Fields the adapter reads that a valid message may lack.
SEGMENT_KEYS = (
    "type",
    "userId",
    "anonymousId",
    "messageId",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "context",
    "groupId",
    "traits",
    "properties",
    "event",
    "name",
    "category",
    "email",
    "firstName",
    "lastName",
    "role",
    "timezone",
    "plan",
    "feature_area",
    "featureArea",
    "title",
)


@FAST
@given(segment_messages())
def test_segment_message_maps_to_a_valid_event_keeping_ids_and_time(
    message: dict[str, Any],
) -> None:
    (event,) = _segment({"batch": [message]})
    _roundtrips(event)
    assert event.source == segment.SOURCE
    assert event.user_id == message["userId"]
    group = message["groupId"] if message["type"] == "group" else message["context"]["groupId"]
    assert event.account_id == group
    if "messageId" in message and segment._ID.match(message["messageId"]):
        assert event.id == message["messageId"]
    if "timestamp" in message:
        assert event.time == datetime.fromisoformat(message["timestamp"]).astimezone(UTC)
    else:
        assert event.time == RECEIVED


@FAST
@given(segment_messages(), st.text(alphabet=" \t\n\r\u3000", min_size=1, max_size=5))
def test_a_blank_segment_message_id_is_refused_by_name(message: dict[str, Any], blank: str) -> None:
    message["messageId"] = blank
    try:
        _segment({"batch": [message]})
    except Unmappable as exc:
        assert exc.field == "messageId"
    else:
        raise AssertionError("a blank messageId was accepted")


@FAST
@given(segment_messages())
def test_segment_redelivery_maps_to_the_same_key(message: dict[str, Any]) -> None:
    """The same message delivered again hours later (a library retry) keeps its id, with or
    without a messageId, and its time when it has a timestamp."""
    (first,) = _segment({"batch": [message]}, RECEIVED)
    (again,) = _segment(json.loads(json.dumps({"batch": [message]})), LATER)
    assert again.id == first.id
    if "timestamp" in message:
        assert again == first


@FAST
@given(
    damaged(
        st.lists(segment_messages(), min_size=1, max_size=3).map(
            lambda batch: {"batch": batch, "context": {}, "sentAt": RECEIVED.isoformat()}
        ),
        SEGMENT_KEYS,
    )
    | json_values
    | json_values.map(lambda m: {"batch": [m]})
)
def test_segment_any_json_is_refused_with_a_validation_error_only(raw: Any) -> None:
    refused_cleanly(segment.SegmentBatch.model_validate, _segment_events, raw)


# ------------------------------------------------------------------------------ Stripe

cents = st.integers(0, 10**9)


@st.composite
def stripe_events(draw: st.DrawFn) -> dict[str, Any]:
    account = draw(identifiers)
    kind = draw(st.sampled_from([*stripe.SUBSCRIPTION_TYPES, *stripe.INVOICE_TYPES]))
    if kind in stripe.SUBSCRIPTION_TYPES:
        obj: dict[str, Any] = {
            "id": "sub_" + draw(identifiers),
            "object": "subscription",
            "status": draw(st.sampled_from(["active", "trialing", "past_due", "canceled"])),
            "customer": "cus_" + draw(identifiers),
            "metadata": {"account_id": account},
            "current_period_end": draw(st.integers(0, 4_000_000_000)),
            "items": {
                "data": [
                    {
                        "price": {
                            "unit_amount": draw(cents),
                            "nickname": draw(st.none() | st.text(min_size=1, max_size=30)),
                            "recurring": {
                                "interval": draw(st.sampled_from(["day", "week", "month", "year"])),
                                "interval_count": draw(st.integers(1, 12)),
                            },
                        },
                        "quantity": draw(st.integers(1, 100)),
                    }
                    for _ in range(draw(st.integers(0, 3)))
                ]
            },
        }
    else:
        obj = {
            "id": "in_" + draw(identifiers),
            "object": "invoice",
            "amount_paid": draw(cents),
            "amount_due": draw(cents),
            "currency": "usd",
            "attempt_count": draw(st.integers(0, 5)),
            "subscription": "sub_" + draw(identifiers),
            "metadata": {"account_id": account},
        }
    return {
        "id": "evt_" + draw(identifiers),
        "type": kind,
        "created": draw(st.integers(0, 4_000_000_000)),
        "data": {"object": obj},
    }


STRIPE_KEYS = (
    "id",
    "type",
    "created",
    "data",
    "object",
    "status",
    "customer",
    "metadata",
    "account_id",
    "items",
    "price",
    "plan",
    "recurring",
    "quantity",
    "unit_amount",
    "amount",
    "interval",
    "interval_count",
    "nickname",
    "lookup_key",
    "current_period_end",
    "parent",
    "subscription_details",
    "subscription",
    "amount_paid",
    "amount_due",
    "attempt_count",
    "currency",
)


@FAST
@given(stripe_events())
def test_stripe_event_maps_to_a_valid_event_keeping_ids_and_time(raw: dict[str, Any]) -> None:
    event = stripe.to_event(raw)
    assert event is not None
    _roundtrips(event)
    assert event.id == raw["id"]
    assert event.account_id == raw["data"]["object"]["metadata"]["account_id"]
    assert event.time == datetime.fromtimestamp(raw["created"], UTC)
    # Stripe retries deliver the same event (same id) again: the same envelope.
    assert stripe.to_event(json.loads(json.dumps(raw))) == event


def _json_object(raw: Any) -> dict[str, Any]:
    # The Stripe route parses the body itself: it must be a JSON object.
    if not isinstance(raw, dict):
        raise Unmappable("body", "must be a JSON object")
    return raw


@FAST
@given(damaged(stripe_events(), STRIPE_KEYS) | json_values)
def test_stripe_any_json_is_refused_with_a_validation_error_only(raw: Any) -> None:
    refused_cleanly(_json_object, stripe.to_event, raw)


# ------------------------------------------------------------------------ support desk

_SUPPORT_TYPES = [
    "ticket.created",
    "zen:event-type:ticket.created",
    "ticket.updated",
    "ticket.priority_changed",
    "ticket.status_changed",
    "ticket.solved",
    "ticket.satisfaction_rating_changed",
]


@st.composite
def support_hooks(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(_SUPPORT_TYPES))
    detail: dict[str, Any] = {
        "id": draw(identifiers | st.integers(0, 10**9).map(str)),
        "priority": draw(st.sampled_from(["low", "NORMAL", "high", "Urgent"])),
        "status": draw(st.sampled_from(["open", "SOLVED", "closed", "pending"])),
        "subject": draw(st.none() | st.text(max_size=60)),
        "tags": draw(st.lists(st.sampled_from(["area:reports", "area:", "vip"]), max_size=3)),
        "organization": {"external_id": draw(identifiers)},
        "requester": {"external_id": draw(st.none() | identifiers)},
    }
    if kind == "ticket.satisfaction_rating_changed" or draw(st.booleans()):
        detail["satisfaction_rating"] = {
            "score": draw(st.sampled_from(["good", "bad", "3", 5, 1])),
            "comment": draw(st.none() | st.text(max_size=40)),
        }
    hook: dict[str, Any] = {"id": draw(identifiers), "type": kind, "detail": detail}
    if draw(st.booleans()):
        hook["time"] = draw(aware_times).isoformat()
    return hook


SUPPORT_KEYS = (
    "id",
    "type",
    "time",
    "detail",
    "priority",
    "status",
    "subject",
    "tags",
    "organization",
    "requester",
    "external_id",
    "satisfaction_rating",
    "score",
    "comment",
)


def _support(raw: Any, received: datetime = RECEIVED) -> Any:
    return support.to_event(support.SupportWebhook.model_validate(raw), received)


@FAST
@given(support_hooks())
def test_support_hook_maps_to_a_valid_event_keeping_ids_and_time(raw: dict[str, Any]) -> None:
    event = _support(raw)
    _roundtrips(event)
    assert event.id == raw["id"]
    assert event.account_id == raw["detail"]["organization"]["external_id"]
    assert event.user_id == raw["detail"]["requester"]["external_id"]
    assert event.payload.ticket_id == raw["detail"]["id"]
    if "time" in raw:
        assert event.time == datetime.fromisoformat(raw["time"]).astimezone(UTC)
        assert _support(raw, LATER) == event
    else:
        assert event.time == RECEIVED
        assert _support(raw, LATER).id == event.id


@FAST
@given(damaged(support_hooks(), SUPPORT_KEYS) | json_values)
# A superscript two is a digit to str.isdigit, but no number to int(): it was a 500.
@example(
    {
        "id": "zd-1",
        "type": "ticket.csat",
        "detail": {
            "id": "7",
            "organization": {"external_id": "acme"},
            "satisfaction_rating": {"score": "²"},
        },
    }
)
def test_support_any_json_is_refused_with_a_validation_error_only(raw: Any) -> None:
    refused_cleanly(
        support.SupportWebhook.model_validate, lambda hook: support.to_event(hook, RECEIVED), raw
    )


# ----------------------------------------------------------------------- surveys, CRM


def _optional(draw: st.DrawFn, raw: dict[str, Any], **fields: st.SearchStrategy[Any]) -> None:
    for key, strategy in fields.items():
        if draw(st.booleans()):
            raw[key] = draw(strategy)


@st.composite
def survey_answers(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["nps", "csat"]))
    answer: dict[str, Any] = {
        "account_id": draw(identifiers),
        "user_id": draw(identifiers),
        "kind": kind,
        "score": draw(st.integers(0, 10) if kind == "nps" else st.integers(1, 5)),
    }
    _optional(
        draw,
        answer,
        id=identifiers,
        time=aware_times.map(lambda t: t.isoformat()),
        comment=st.text(max_size=100),
        ticket_id=identifiers,
    )
    return answer


@st.composite
def crm_changes(draw: st.DrawFn) -> dict[str, Any]:
    change: dict[str, Any] = {
        "account_id": draw(identifiers),
        "user_id": draw(identifiers),
        "role": draw(st.sampled_from(["champion", "economic_buyer", "admin"])),
        "change": draw(st.sampled_from(["assigned", "removed", "left"])),
    }
    _optional(
        draw,
        change,
        id=identifiers,
        time=aware_times.map(lambda t: t.isoformat()),
        email=st.emails(),
        name=st.text(max_size=100),
    )
    return change


def _survey(raw: Any) -> Any:
    return surveys.to_event(surveys.SurveyResponse.model_validate(raw))


def _crm(raw: Any) -> Any:
    return crm.to_event(crm.ContactChange.model_validate(raw))


@FAST
@given(st.tuples(st.just(_survey), survey_answers()) | st.tuples(st.just(_crm), crm_changes()))
def test_survey_and_crm_map_to_valid_events_keeping_ids_time_and_key(
    case: tuple[Callable[[Any], Any], dict[str, Any]],
) -> None:
    parse, raw = case
    event = parse(raw)
    _roundtrips(event)
    assert event.account_id == raw["account_id"] and event.user_id == raw["user_id"]
    again = parse(json.loads(json.dumps(raw)))
    # A retry of the same body is the same event id, whether or not the sender named one.
    assert again.id == event.id
    if "id" in raw:
        assert event.id == raw["id"]
    if "time" in raw:
        assert event.time == datetime.fromisoformat(raw["time"]).astimezone(UTC)
        assert again == event


CRM_SURVEY_KEYS = (
    "id",
    "time",
    "account_id",
    "user_id",
    "kind",
    "score",
    "comment",
    "ticket_id",
    "role",
    "change",
    "email",
    "name",
)


@FAST
@given(damaged(survey_answers() | crm_changes(), CRM_SURVEY_KEYS) | json_values)
def test_survey_and_crm_any_json_is_refused_with_a_validation_error_only(raw: Any) -> None:
    refused_cleanly(surveys.SurveyResponse.model_validate, surveys.to_event, raw)
    refused_cleanly(crm.ContactChange.model_validate, crm.to_event, raw)
