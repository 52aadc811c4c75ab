from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from shared.envelope import EVENT_ADAPTER, NpsEvent, TrackEvent, decode, encode
from tests.factories import event


def _raw(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "e-1",
        "source": "app",
        "type": "product.track",
        "time": "2026-11-01T09:00:00+02:00",
        "account_id": "acme",
        "user_id": "u1",
        "payload": {"event": "project_created", "feature_area": "core"},
    }
    base.update(over)
    return base


def test_typed_payload_and_utc_time() -> None:
    parsed = EVENT_ADAPTER.validate_python(_raw())
    assert isinstance(parsed, TrackEvent)
    assert parsed.payload.event == "project_created"
    assert parsed.time == datetime(2026, 11, 1, 7, 0, tzinfo=UTC)
    assert parsed.time.utcoffset() == timedelta(0)


def test_roundtrip_keeps_everything() -> None:
    original = event("survey.nps", {"score": 3, "comment": "slow"})
    assert decode(encode(original)) == original
    assert isinstance(decode(encode(original)), NpsEvent)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"type": "product.unknown"}, "type"),
        ({"user_id": None}, "user_id"),
        ({"time": "2026-11-01T09:00:00"}, "time"),
        ({"account_id": ""}, "account_id"),
        ({"payload": {"feature_area": "core"}}, "event"),
        ({"payload": {"event": "x", "colour": "red"}}, "colour"),
        ({"type": "survey.nps", "payload": {"score": 11}}, "score"),
    ],
)
def test_bad_input_names_the_field(override: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        EVENT_ADAPTER.validate_python(_raw(**override))
    said = [".".join(str(p) for p in e["loc"]) + " " + e["msg"] for e in info.value.errors()]
    assert any(field in text for text in said), said


def test_account_level_events_need_no_user() -> None:
    parsed = EVENT_ADAPTER.validate_python(
        _raw(type="billing.subscription_updated", user_id=None, payload={"plan": "pro"})
    )
    assert parsed.user_id is None


def test_default_id_is_unique_and_time_is_aware() -> None:
    data = _raw()
    del data["id"]
    del data["time"]
    a, b = EVENT_ADAPTER.validate_python(data), EVENT_ADAPTER.validate_python(data)
    assert a.id != b.id
    assert a.time.tzinfo is not None
    assert a.time.astimezone(UTC) <= datetime.now(UTC)
