"""Correlation ids that follow one piece of work across HTTP, Kafka and the logs.

A *trace context* holds a trace id (one per request or per timer firing) and the ids of the
event, decision and delivery the work is about. It lives in a contextvar, so:

- the HTTP middleware starts one per request (from ``X-Request-ID`` or ``traceparent``, else a
  fresh id) and echoes the trace id back in ``X-Request-ID``;
- the bus copies it into the Kafka headers of every message it publishes (``nbv-trace-id``,
  ``nbv-event-id``, ``nbv-decision-id``, ``nbv-delivery-id``);
- the consumer worker restores it from the headers of the records it hands to a handler;
- the logging filter writes it into every log line.

So ``grep <trace id>`` over all services' logs tells one event's whole story: the request that
accepted it, the projector that folded it, the decision it caused, the delivery of that decision.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

from shared.bus.base import Message, Record

TRACE_HEADER = "nbv-trace-id"
EVENT_HEADER = "nbv-event-id"
DECISION_HEADER = "nbv-decision-id"
DELIVERY_HEADER = "nbv-delivery-id"
REQUEST_ID_HTTP = "x-request-id"
TRACEPARENT_HTTP = "traceparent"

# Header name → TraceContext attribute.
_HEADERS = {
    TRACE_HEADER: "trace_id",
    EVENT_HEADER: "event_id",
    DECISION_HEADER: "decision_id",
    DELIVERY_HEADER: "delivery_id",
}
# Ids arrive from clients and end up in headers and logs: accept only short, plain tokens so a
# caller cannot inject log lines, huge values or personal data through them.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
# A batch of thousands of records must not make one log line huge.
MAX_BATCH_IDS = 20


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str | None = None
    event_id: str | None = None
    decision_id: str | None = None
    delivery_id: str | None = None
    # Set while a consumer handles a batch that mixes several traces: each record's own context
    # by message key (keys are account ids on every topic), so what a handler publishes for an
    # account carries the trace of that account's record.
    by_key: Mapping[str, TraceContext] = field(default_factory=dict, compare=False)
    # The distinct trace ids of such a batch, for the log line (capped at MAX_BATCH_IDS).
    batch_trace_ids: tuple[str, ...] = ()

    def ids(self) -> dict[str, str]:
        """The single ids that are set, as log fields."""
        found = {
            "trace_id": self.trace_id,
            "event_id": self.event_id,
            "decision_id": self.decision_id,
            "delivery_id": self.delivery_id,
        }
        return {k: v for k, v in found.items() if v is not None}


_current: ContextVar[TraceContext | None] = ContextVar("nbv_trace", default=None)


def current() -> TraceContext | None:
    return _current.get()


def current_trace_id() -> str | None:
    ctx = _current.get()
    return ctx.trace_id if ctx is not None else None


def new_trace_id() -> str:
    # 32 hex digits: also a valid W3C trace id, so it can be handed on in a traceparent.
    return uuid.uuid4().hex


def safe_id(value: str | bytes | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    value = value.strip()
    return value if _SAFE_ID.match(value) else None


@contextmanager
def use(ctx: TraceContext | None) -> Iterator[TraceContext | None]:
    """Make ``ctx`` the current context for the block, then restore the previous one."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


@contextmanager
def bind(
    *,
    trace_id: str | None = None,
    event_id: str | None = None,
    decision_id: str | None = None,
    delivery_id: str | None = None,
) -> Iterator[TraceContext]:
    """Add ids to the current context for the block (a trace id is made up if there is none).

    For services: ``with tracing.bind(delivery_id=d.id, decision_id=d.decision_id): ...`` so the
    log lines and messages of that block carry those ids.
    """
    base = _current.get() or TraceContext()
    ctx = replace(
        base,
        trace_id=trace_id or base.trace_id or new_trace_id(),
        event_id=event_id or base.event_id,
        decision_id=decision_id or base.decision_id,
        delivery_id=delivery_id or base.delivery_id,
    )
    with use(ctx):
        yield ctx


# ------------------------------------------------------------------------------------ HTTP


def from_http_headers(headers: Mapping[str, str]) -> TraceContext:
    """The trace of an incoming request: its ``X-Request-ID``, else the trace id of its W3C
    ``traceparent``, else a fresh id. ``headers`` must have lower-case names (as in ASGI)."""
    trace_id = safe_id(headers.get(REQUEST_ID_HTTP))
    if trace_id is None:
        match = _TRACEPARENT.match(headers.get(TRACEPARENT_HTTP, "").strip().lower())
        if match and match.group(1) != "0" * 32:
            trace_id = match.group(1)
    return TraceContext(trace_id=trace_id or new_trace_id())


# ------------------------------------------------------------------------------------ Kafka


def from_headers(headers: Iterable[tuple[str, bytes]]) -> TraceContext:
    values: dict[str, str] = {}
    for name, raw in headers:
        attr = _HEADERS.get(name)
        if attr is not None:
            value = safe_id(raw)
            if value is not None:
                values[attr] = value
    return TraceContext(
        trace_id=values.get("trace_id"),
        event_id=values.get("event_id"),
        decision_id=values.get("decision_id"),
        delivery_id=values.get("delivery_id"),
    )


def for_records(records: Sequence[Record]) -> TraceContext:
    """The context to handle ``records`` in: the record's own for one record (or for a batch
    that is all one trace); for a mixed batch, no single ids but each record's by its key."""
    contexts = [from_headers(r.headers) for r in records]
    if not contexts:
        return TraceContext()
    if len(set(contexts)) == 1:
        return contexts[0]
    by_key: dict[str, TraceContext] = {}
    for record, ctx in zip(records, contexts, strict=True):
        # The latest record of a key wins: what a handler publishes for a key follows from it.
        by_key[record.key] = ctx
    trace_ids = list(dict.fromkeys(c.trace_id for c in contexts if c.trace_id is not None))
    # One request's events batched together still share its trace id.
    common = trace_ids[0] if len(trace_ids) == 1 else None
    return TraceContext(
        trace_id=common, by_key=by_key, batch_trace_ids=tuple(trace_ids[:MAX_BATCH_IDS])
    )


def _for_message(ctx: TraceContext | None, key: str) -> TraceContext:
    if ctx is None:
        return TraceContext(trace_id=new_trace_id())
    own = ctx.by_key.get(key)
    if own is not None:
        ctx = own
    if ctx.trace_id is None:
        # Work that was not started by a traced request or record (a timer, a replay of
        # records published before tracing existed) starts a trace of its own here.
        ctx = replace(ctx, trace_id=new_trace_id())
    return ctx


def inject(messages: Sequence[Message]) -> list[Message]:
    """The messages with the current context's ids added to their headers. Headers the caller
    set win: a service knows better which decision a message is about than the context does."""
    ctx = _current.get()
    out: list[Message] = []
    # A call's messages share one context (or one per key) and mostly their header names, so
    # the headers to add are worked out once per (context, names): publishing a 1,000-event
    # request must not cost thousands of lookups. The context is kept with its entry, so its
    # id() cannot be reused by another one meanwhile.
    added: dict[tuple[int, frozenset[str]], tuple[TraceContext, tuple[tuple[str, bytes], ...]]]
    added = {}
    for message in messages:
        present = frozenset(name for name, _ in message.headers)
        ids = _for_message(ctx, message.key)
        entry = added.get((id(ids), present))
        if entry is None or entry[0] is not ids:
            extra = tuple(
                (name, value.encode())
                for name, attr in _HEADERS.items()
                if name not in present and (value := getattr(ids, attr)) is not None
            )
            added[(id(ids), present)] = (ids, extra)
        else:
            extra = entry[1]
        out.append(
            Message(message.key, message.value, message.headers + extra) if extra else message
        )
    return out
