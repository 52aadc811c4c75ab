"""Backfills from a file: NDJSON or CSV rows of envelope events, sent in batches.

Rows are validated as they are read; the first invalid row stops the import with its line
number and the field at fault (batches before it were sent and are safe to send again). A row
without an ``id`` gets one derived from its content, so re-running an import after a failure
sends the same ids, which the projector deduplicates.

CSV columns: ``id, source, type, time, account_id, user_id`` and either a ``payload`` column
holding JSON or ``payload.<field>`` columns (values parsed as JSON when they are JSON, else
kept as text).
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import ValidationError

from services.ingest.publisher import INBOUND_ADAPTER, to_messages
from shared.bus import Bus
from shared.envelope import InboundEvent

log = logging.getLogger(__name__)

Format = Literal["ndjson", "csv"]
Sender = Callable[[list[InboundEvent]], Awaitable[None]]


class ImportError_(ValueError):
    """A row that cannot be imported, or a batch the service refused for good."""


@dataclass(frozen=True)
class Row:
    line: int
    data: dict[str, Any]
    raw: str
    size: int


def detect_format(path: Path) -> Format:
    return "csv" if path.suffix.lower() == ".csv" else "ndjson"


def _cell(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def _csv_row(record: dict[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    payload: dict[str, Any] = {}
    for key, value in record.items():
        if key is None or value in (None, ""):
            continue
        if key == "payload":
            payload.update(json.loads(value))
        elif key.startswith("payload."):
            payload[key.removeprefix("payload.")] = _cell(value)
        else:
            data[key] = value
    data["payload"] = payload
    return data


def read_rows(path: Path, fmt: Format) -> Iterator[Row]:
    with path.open("rb") as fh:
        if fmt == "ndjson":
            for number, raw_bytes in enumerate(fh, start=1):
                raw = raw_bytes.decode()
                if not raw.strip():
                    continue
                try:
                    data = json.loads(raw)
                except ValueError as exc:
                    raise ImportError_(f"line {number}: not valid JSON ({exc})") from exc
                if not isinstance(data, dict):
                    raise ImportError_(f"line {number}: expected a JSON object")
                yield Row(number, data, raw, len(raw_bytes))
            return
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
        reader = csv.DictReader(text)
        for record in reader:
            raw = json.dumps(record, sort_keys=True)
            try:
                data = _csv_row(record)
            except ValueError as exc:
                raise ImportError_(f"line {reader.line_num}: payload is not JSON") from exc
            yield Row(reader.line_num, data, raw, len(raw) + 1)


def to_event(row: Row) -> InboundEvent:
    data = dict(row.data)
    if not data.get("id"):
        data["id"] = "import:" + hashlib.sha256(row.raw.strip().encode()).hexdigest()[:40]
    data.setdefault("source", "import")
    try:
        return INBOUND_ADAPTER.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "row"
        raise ImportError_(f"line {row.line}: {field}: {first['msg']}") from exc


def http_sender(
    client: httpx.AsyncClient, *, attempts: int = 6, base_delay_s: float = 0.5
) -> Sender:
    """POST batches to a running ingest; retries 5xx and network errors with backoff."""

    async def send(events: list[InboundEvent]) -> None:
        body = {"events": [e.model_dump(mode="json") for e in events]}
        for attempt in range(attempts):
            try:
                resp = await client.post("/v1/events/batch", json=body)
            except httpx.TransportError as exc:
                failure = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 202:
                    return
                if resp.status_code < 500 and resp.status_code != 429:
                    raise ImportError_(f"refused ({resp.status_code}): {resp.text[:500]}")
                failure = f"HTTP {resp.status_code}"
            delay = base_delay_s * 2**attempt * (1 + random.random() / 2)
            log.warning("batch not accepted, retrying", extra={"error": failure, "delay": delay})
            await asyncio.sleep(delay)
        raise ImportError_(f"gave up after {attempts} attempts: {failure}")

    return send


def bus_sender(bus: Bus, topic: str) -> Sender:
    async def send(events: list[InboundEvent]) -> None:
        await bus.publish(topic, to_messages(events))

    return send


async def run_import(
    path: Path,
    send: Sender,
    *,
    fmt: Format | None = None,
    batch_size: int = 1_000,
    progress: Callable[[int], object] = lambda _: None,
) -> int:
    """Send every row of ``path``; ``progress`` gets the bytes read. Returns rows sent."""
    batch: list[InboundEvent] = []
    pending_bytes = 0
    sent = 0
    for row in read_rows(path, fmt or detect_format(path)):
        batch.append(to_event(row))
        pending_bytes += row.size
        if len(batch) >= batch_size:
            await send(batch)
            sent += len(batch)
            progress(pending_bytes)
            batch, pending_bytes = [], 0
    if batch:
        await send(batch)
        sent += len(batch)
        progress(pending_bytes)
    return sent
