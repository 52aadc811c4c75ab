"""Properties of the envelope: what it accepts survives the trip through the bus unchanged,
and what it refuses, it refuses with the location of the problem."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.envelope import EVENT_ADAPTER, EVENT_TYPES, decode, encode
from tests.property.strategies import USER_TYPES, event_dicts

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(event_dicts())
def test_accepted_event_round_trips_through_encode_decode(data: dict[str, Any]) -> None:
    event = EVENT_ADAPTER.validate_python(data)
    raw = encode(event)
    again = decode(raw)
    assert again == event
    # A second trip is byte-identical: what a consumer re-publishes is what it read.
    assert encode(again) == raw
    # The instant is kept, the zone normalised to UTC.
    assert again.time.utcoffset() is not None
    assert again.time.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def _errors(raw: bytes) -> list[tuple[str, ...]]:
    with pytest.raises(ValidationError) as info:
        decode(raw)
    return [tuple(str(p) for p in e["loc"]) for e in info.value.errors()]


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


@FAST
@given(event_dicts(), st.sampled_from(["id", "source", "account_id", "time", "payload"]))
def test_missing_envelope_field_is_refused_at_that_field(data: dict[str, Any], field: str) -> None:
    if field in ("id", "time"):
        # These have defaults (the producer may leave them to us): never an error.
        del data[field]
        decode(_json(data))
        return
    del data[field]
    locs = _errors(_json(data))
    assert any(loc[-1] == field for loc in locs), locs


@FAST
@given(event_dicts(types=tuple(sorted(USER_TYPES))))
def test_user_event_without_user_is_refused_at_user_id(data: dict[str, Any]) -> None:
    del data["user_id"]
    locs = _errors(_json(data))
    assert any(loc[-1] == "user_id" for loc in locs), locs


@FAST
@given(event_dicts(), st.text(min_size=1, max_size=30))
def test_unknown_type_is_refused_at_type(data: dict[str, Any], new_type: str) -> None:
    assume(new_type not in EVENT_TYPES)
    data["type"] = new_type
    with pytest.raises(ValidationError) as info:
        decode(_json(data))
    (error,) = info.value.errors()
    assert error["type"] == "union_tag_invalid"
    assert "type" in str(error["ctx"]["discriminator"])


@FAST
@given(
    event_dicts(),
    st.sampled_from(["id", "account_id"]),
    st.sampled_from(["", "has space", "slash/no", "x" * 201, "é"]),
)
def test_bad_identifier_is_refused_at_that_field(
    data: dict[str, Any], field: str, bad: str
) -> None:
    data[field] = bad
    locs = _errors(_json(data))
    assert any(loc[-1] == field for loc in locs), locs


@FAST
@given(event_dicts(), st.text(min_size=1, max_size=20))
def test_unknown_field_is_refused_where_it_is(data: dict[str, Any], extra: str) -> None:
    in_payload = len(extra) % 2 == 0
    target = data["payload"] if in_payload else data
    assume(extra not in target)
    target[extra] = 1
    locs = _errors(_json(data))
    assert any(loc[-1] == extra and (("payload" in loc) == in_payload) for loc in locs), locs


@FAST
@given(event_dicts(types=("survey.nps", "survey.csat")), st.integers())
def test_score_out_of_range_is_refused_at_payload_score(data: dict[str, Any], score: int) -> None:
    low, high = (0, 10) if data["type"] == "survey.nps" else (1, 5)
    assume(not low <= score <= high)
    data["payload"]["score"] = score
    locs = _errors(_json(data))
    assert any(loc[-2:] == ("payload", "score") for loc in locs), locs


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_decode(raw: bytes) -> None:
    """Garbage is a ValidationError (which the worker dead-letters), never anything else."""
    with contextlib.suppress(ValidationError):
        decode(raw)
