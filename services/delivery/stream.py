"""The live inbox: server-sent events pushing a person's cards as they land or change."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

from fastapi import Request

from services.delivery.inbox import InboxCard, Notifier, list_cards
from shared.metrics import INBOX_STREAMS
from shared.runtime import Runtime

# Streams are rotated now and then (the browser's EventSource reconnects by itself), so proxies
# with idle limits and a server shutting down never hold a connection for long.
MAX_STREAM_S = 300.0


def sse(event: str, data: str, event_id: str | None = None) -> str:
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
    return head + "".join(f"data: {line}\n" for line in data.splitlines()) + "\n"


async def card_events(
    runtime: Runtime, notifier: Notifier, request: Request, user_id: str
) -> AsyncIterator[str]:
    settings = runtime.settings
    sent: dict[str, tuple[str, str]] = {}  # card id -> (updated_at, status) last pushed
    started = last_write = time.monotonic()
    INBOX_STREAMS.inc()
    try:
        async with notifier.subscribe(user_id) as wake:
            yield "retry: 2000\n\n"
            while time.monotonic() - started < MAX_STREAM_S:
                wake.clear()  # before reading, so a change during the read wakes us again
                async with runtime.sessions() as session:
                    cards = await list_cards(session, user_id)
                for chunk in _diff(sent, cards):
                    yield chunk
                    last_write = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), settings.inbox_stream_poll_s)
                if await request.is_disconnected():
                    return
                if time.monotonic() - last_write >= settings.inbox_stream_keepalive_s:
                    yield ": keep-alive\n\n"
                    last_write = time.monotonic()
    finally:
        INBOX_STREAMS.dec()


def _diff(sent: dict[str, tuple[str, str]], cards: list[InboxCard]) -> list[str]:
    out: list[str] = []
    current = {c.id for c in cards}
    for card in reversed(cards):  # oldest first, so the newest ends up on top
        version = (card.updated_at.isoformat(), card.status)
        if sent.get(card.id) != version:
            sent[card.id] = version
            out.append(sse("card", card.model_dump_json(), card.id))
    for gone in [c for c in sent if c not in current]:
        del sent[gone]
        out.append(sse("remove", json.dumps({"id": gone})))
    return out
