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
from operator import attrgetter
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
    published = ("nbv-published-ms", str(int(time.time() * 1000)).encode())
    # Built with tuple.__new__: the named tuple's own __new__ is a Python function, and the
    # intake makes one message per accepted event.
    return [
        _message(Message, (e.account_id, encode(e), (("nbv-event-id", e.id.encode()), published)))
        for e in events
    ]


_message = tuple.__new__
_source_and_type = attrgetter("source", "type")


async def publish(runtime: Runtime, events: Sequence[InboundEvent]) -> Accepted:
    try:
        await runtime.bus.publish(runtime.topic("events"), to_messages(events))
    except Exception as exc:
        log.exception("publish failed")
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "event log unavailable") from exc
    # Counted per (source, type) rather than per event: a label lookup takes a lock.
    for (source, type_), n in Counter(map(_source_and_type, events)).items():
        EVENTS_INGESTED.labels(source, type_).inc(n)
    return Accepted(accepted=len(events), ids=[e.id for e in events])
