"""Builders for test events (one place, so tests state only what matters to them)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.envelope import EVENT_ADAPTER, Event

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


def event(
    type_: str,
    payload: dict[str, Any],
    *,
    account: str = "acme",
    user: str | None = "u1",
    at: datetime | None = None,
    minutes: float = 0,
    id_: str | None = None,
) -> Event:
    data: dict[str, Any] = {
        "id": id_ or str(uuid.uuid4()),
        "source": "test",
        "type": type_,
        "time": (at or T0) + timedelta(minutes=minutes),
        "account_id": account,
        "payload": payload,
    }
    if user is not None:
        data["user_id"] = user
    return EVENT_ADAPTER.validate_python(data)


def event_json(type_: str, payload: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """The same event as a JSON-ready dict, for HTTP tests."""
    return event(type_, payload, **kw).model_dump(mode="json")
