"""Segment-spec messages → envelope events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import TypeAdapter, ValidationError

from services.ingest.adapters import Unmappable
from services.ingest.adapters.segment import SegmentBatch, SegmentMessage, to_event

RECEIVED = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
MESSAGE: TypeAdapter[SegmentMessage] = TypeAdapter(SegmentMessage)


def msg(**data):
    return MESSAGE.validate_python(data)


def test_track_with_context_group_id() -> None:
    e = to_event(
        msg(
            type="track",
            userId="u1",
            event="Report Built",
            messageId="m-1",
            timestamp="2026-11-20T11:00:00Z",
            context={"groupId": "acme"},
            properties={"feature_area": "reporting", "rows": 10},
        ),
        received_at=RECEIVED,
        known={},
    )
    assert (e.id, e.type, e.account_id, e.user_id) == ("m-1", "product.track", "acme", "u1")
    assert e.payload.feature_area == "reporting"  # type: ignore[union-attr]
    assert e.time == datetime(2026, 11, 20, 11, tzinfo=UTC)


def test_account_from_a_prior_group_call_and_anonymous_users() -> None:
    e = to_event(
        msg(type="page", anonymousId="a b c", name="Pricing", messageId="m-2"),
        received_at=RECEIVED,
        known={"anon:h:" + __import__("hashlib").sha256(b"a b c").hexdigest()[:40]: "acme"},
    )
    assert e.account_id == "acme" and e.user_id is not None and e.user_id.startswith("anon:h:")
    assert e.type == "product.page"


def test_no_account_anywhere_is_refused_naming_the_field() -> None:
    with pytest.raises(Unmappable) as err:
        to_event(msg(type="track", userId="u1", event="x"), received_at=RECEIVED, known={})
    assert err.value.field == "context.groupId"


def test_someone_is_required() -> None:
    with pytest.raises(ValidationError, match="userId or anonymousId"):
        msg(type="track", event="x")


def test_clock_skew_is_corrected_with_sent_at() -> None:
    # The device clock is 2 h ahead: it stamped 14:00 and sent at 14:05; received 12:05.
    received = datetime(2026, 11, 20, 12, 5, tzinfo=UTC)
    e = to_event(
        msg(
            type="track",
            userId="u1",
            event="x",
            timestamp="2026-11-20T14:00:00Z",
            sentAt="2026-11-20T14:05:00Z",
            context={"groupId": "acme"},
        ),
        received_at=received,
        known={},
    )
    assert e.time == datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def test_future_timestamps_are_capped_and_missing_ones_take_the_received_time() -> None:
    future = to_event(
        msg(type="track", userId="u", event="x", timestamp="2030-01-01T00:00:00Z"),
        received_at=RECEIVED,
        known={"u": "acme"},
    )
    assert future.time == RECEIVED
    now = to_event(msg(type="track", userId="u", event="x"), received_at=RECEIVED, known={"u": "a"})
    assert now.time == RECEIVED


def test_message_id_is_the_idempotency_key_or_a_content_hash() -> None:
    body = {"type": "track", "userId": "u", "event": "x", "timestamp": "2026-11-20T11:00:00Z"}
    first = to_event(msg(**body), received_at=RECEIVED, known={"u": "a"})
    again = to_event(msg(**body), received_at=RECEIVED + timedelta(seconds=5), known={"u": "a"})
    assert first.id == again.id and first.id.startswith("seg:")


def test_identify_traits_and_group() -> None:
    ident = to_event(
        msg(
            type="identify",
            userId="u1",
            traits={
                "email": "ana@example.com",
                "firstName": "Ana",
                "lastName": "Li",
                "role": "admin",
            },
            context={"groupId": "acme", "timezone": "Europe/Paris"},
        ),
        received_at=RECEIVED,
        known={},
    )
    p = ident.payload
    assert (p.email, p.name, p.role, p.timezone) == (  # type: ignore[union-attr]
        "ana@example.com",
        "Ana Li",
        "admin",
        "Europe/Paris",
    )
    title = to_event(
        msg(type="identify", userId="u1", traits={"role": "CTO"}),
        received_at=RECEIVED,
        known={"u1": "a"},
    )
    assert title.payload.role is None  # type: ignore[union-attr]
    group = to_event(
        msg(type="group", userId="u1", groupId="acme", traits={"name": "Acme", "plan": "pro"}),
        received_at=RECEIVED,
        known={},
    )
    assert group.type == "account.group" and group.account_id == "acme"
    assert group.payload.name == "Acme"


def test_batch_body_with_shared_context_and_sent_at() -> None:
    batch = SegmentBatch.model_validate(
        {
            "batch": [
                {
                    "type": "track",
                    "userId": "u1",
                    "event": "x",
                    "timestamp": "2026-11-20T11:00:00Z",
                },
                {"type": "screen", "userId": "u1", "name": "Home"},
            ],
            "sentAt": "2026-11-20T11:00:00Z",
            "context": {"groupId": "acme"},
        }
    )
    events = [
        to_event(m, received_at=RECEIVED, known={}, sent_at=batch.sent_at, context=batch.context)
        for m in batch.batch
    ]
    assert [e.type for e in events] == ["product.track", "product.page"]
    assert all(e.account_id == "acme" for e in events)
    assert events[0].time == RECEIVED  # sent the moment it happened


def test_unknown_message_types_are_refused() -> None:
    with pytest.raises(ValidationError):
        SegmentBatch.model_validate(
            {"batch": [{"type": "alias", "userId": "u", "previousId": "p"}]}
        )
