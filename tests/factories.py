"""Builders for test events and training logs (one place, so tests state only what matters to
them)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]

from models.features import FEATURES
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


def log_table(rows: Sequence[Mapping[str, object]], features: np.ndarray) -> pa.Table:
    """A training log as `models.export` writes it: one row per candidate, FEATURES as
    columns; ``shown_after_h`` only when every row has it."""
    cols: dict[str, object] = {
        name: [r[name] for r in rows]
        for name in (
            "decision_id",
            "user_id",
            "element_id",
            "model_version",
            "label",
            "reward",
            "propensity",
            "shown",
            "lever",
            "rank",
            "completed_after_h",
        )
    }
    if all("shown_after_h" in r for r in rows):
        cols["shown_after_h"] = [r["shown_after_h"] for r in rows]
    cols["decided_at"] = pa.array(
        [r["decided_at"] for r in rows], type=pa.timestamp("us", tz="UTC")
    )
    for j, name in enumerate(FEATURES):
        cols[name] = features[:, j]
    return pa.table(cols)
