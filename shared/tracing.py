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
from operator import itemgetter

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
    whose records all carry the same trace headers); for a mixed batch, no single ids but each
    key's latest record's context by its key, and the batch's distinct trace ids."""
    if not records:
        return TraceContext()
    first = _trace_headers(records[0].headers)
    if len(records) == 1:
        return from_headers(first)
    # Parsing a record's headers costs ~5 µs and a projector batch holds tens of thousands of
    # records: only the latest record of each key is parsed (it is the one by_key keeps), and
    # the trace ids are gathered raw and validated once per distinct value.
    latest: dict[str, Record] = {}
    raw_traces: dict[bytes, None] = {}
    uniform = True
    for record in records:
        latest[record.key] = record
        for name, value in record.headers:
            if name == TRACE_HEADER:
                raw_traces[value] = None
        # Compared only until the first difference (the second record, in most batches).
        if uniform and _trace_headers(record.headers) != first:
            uniform = False
    if uniform:
        return from_headers(first)
    by_key = {key: from_headers(record.headers) for key, record in latest.items()}
    trace_ids = [t for raw in raw_traces if (t := safe_id(raw)) is not None]
    trace_ids = list(dict.fromkeys(trace_ids))  # b"x" and b" x" are one id
    # One request's events batched together still share its trace id.
    common = trace_ids[0] if len(trace_ids) == 1 else None
    return TraceContext(
        trace_id=common, by_key=by_key, batch_trace_ids=tuple(trace_ids[:MAX_BATCH_IDS])
    )


def _trace_headers(headers: Iterable[tuple[str, bytes]]) -> tuple[tuple[str, bytes], ...]:
    return tuple(h for h in headers if h[0] in _HEADERS)


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
    # A request's context is the same for all its messages: worked out once, not per message.
    shared = ctx if ctx is not None and not ctx.by_key and ctx.trace_id is not None else None
    out: list[Message] = []
    # A call's messages share one context (or one per key) and mostly their header names, so
    # the headers to add are worked out once per (context, names): publishing a 1,000-event
    # request must not cost thousands of lookups. The context is kept with its entry, so its
    # id() cannot be reused by another one meanwhile.
    added: dict[
        tuple[int, tuple[str, ...]], tuple[TraceContext, tuple[tuple[str, bytes], ...]]
    ] = {}
    for message in messages:
        names = tuple(map(_header_name, message.headers))
        ids = shared if shared is not None else _for_message(ctx, message.key)
        entry = added.get((id(ids), names))
        if entry is None or entry[0] is not ids:
            extra = tuple(
                (name, value.encode())
                for name, attr in _HEADERS.items()
                if name not in names and (value := getattr(ids, attr)) is not None
            )
            added[(id(ids), names)] = (ids, extra)
        else:
            extra = entry[1]
        out.append(
            _message(Message, (message.key, message.value, message.headers + extra))
            if extra
            else message
        )
    return out


_header_name = itemgetter(0)
# The named tuple's own __new__ is a Python function; this builds the same tuple in C.
_message = tuple.__new__
