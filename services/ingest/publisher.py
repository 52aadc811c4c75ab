"""Publishing accepted events to the events topic, keyed by account (one account stays in order).

Nothing is acknowledged to a sender before the bus has durably stored every event of the
request; on failure the sender gets a 503 and retries with the same ids, which the projector
deduplicates.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Annotated

from fastapi import HTTPException, status
from pydantic import BaseModel, Field, TypeAdapter

from shared.bus import Message
from shared.envelope import InboundEvent, encode
from shared.metrics import EVENTS_INGESTED
from shared.runtime import Runtime

log = logging.getLogger(__name__)

INBOUND_ADAPTER: TypeAdapter[InboundEvent] = TypeAdapter(
    Annotated[InboundEvent, Field(discriminator="type")]
)


class Accepted(BaseModel):
    accepted: int
    ids: list[str]


def to_messages(events: Sequence[InboundEvent]) -> list[Message]:
    published_ms = str(int(time.time() * 1000)).encode()
    return [
        Message(
            key=e.account_id,
            value=encode(e),
            headers=(("nbv-event-id", e.id.encode()), ("nbv-published-ms", published_ms)),
        )
        for e in events
    ]


async def publish(runtime: Runtime, events: Sequence[InboundEvent]) -> Accepted:
    try:
        await runtime.bus.publish(runtime.topic("events"), to_messages(events))
    except Exception as exc:
        log.exception("publish failed")
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "event log unavailable") from exc
    # Counted per (source, type) rather than per event: a label lookup takes a lock.
    for (source, type_), n in Counter((e.source, e.type) for e in events).items():
        EVENTS_INGESTED.labels(source, type_).inc(n)
    return Accepted(accepted=len(events), ids=[e.id for e in events])
