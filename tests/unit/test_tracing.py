"""Trace context: from HTTP headers, into Kafka headers on publish, back out of records in the
consumer worker, and onward to what the handler publishes. Also the worker's lag reporting,
which runs on its own timer."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from pathlib import Path

import httpx
from fastapi import FastAPI

from shared import tracing
from shared.bus import Consumer, Message, Record
from shared.bus.embedded import EmbeddedBus
from shared.http import TracingMiddleware
from shared.metrics import CONSUMER_LAG
from shared.worker import ConsumerWorker

HEX32 = re.compile(r"^[0-9a-f]{32}$")


def _record(key: str, headers: dict[str, str], offset: int = 0) -> Record:
    return Record(
        topic="t",
        partition=0,
        offset=offset,
        key=key,
        value=b"{}",
        timestamp_ms=0,
        headers=tuple((k, v.encode()) for k, v in headers.items()),
    )


def test_http_trace_comes_from_request_id_then_traceparent_else_is_new() -> None:
    assert tracing.from_http_headers({"x-request-id": "req-42"}).trace_id == "req-42"
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert (
        tracing.from_http_headers({"traceparent": parent}).trace_id
        == "4bf92f3577b34da6a3ce929d0e0e4736"
    )
    # X-Request-ID is what the caller will see echoed, so it wins over traceparent.
    both = {"x-request-id": "req-42", "traceparent": parent}
    assert tracing.from_http_headers(both).trace_id == "req-42"
    generated = tracing.from_http_headers({}).trace_id
    assert generated is not None and HEX32.match(generated)


def test_unsafe_request_ids_are_replaced_not_trusted() -> None:
    for bad in ("a\nfake log line", "x" * 129, "jane@example.com", "", "   "):
        trace_id = tracing.from_http_headers({"x-request-id": bad}).trace_id
        assert trace_id is not None and HEX32.match(trace_id), bad
    zero = "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
    assert tracing.from_http_headers({"traceparent": zero}).trace_id != "0" * 32


def test_bind_adds_ids_and_restores_the_previous_context() -> None:
    assert tracing.current() is None
    with tracing.bind(trace_id="t1", event_id="e1") as outer:
        assert outer.trace_id == "t1"
        with tracing.bind(decision_id="d1") as inner:
            assert (inner.trace_id, inner.event_id, inner.decision_id) == ("t1", "e1", "d1")
        assert tracing.current() == outer
    assert tracing.current() is None
    with tracing.bind(delivery_id="v1") as fresh:
        assert fresh.trace_id is not None and HEX32.match(fresh.trace_id)


def test_inject_adds_context_ids_but_explicit_headers_win() -> None:
    with tracing.bind(trace_id="t1", event_id="e1", decision_id="d-context"):
        [msg] = tracing.inject([Message("acct", b"v", (("nbv-decision-id", b"d-own"),))])
    headers = dict(msg.headers)
    assert headers["nbv-trace-id"] == b"t1"
    assert headers["nbv-event-id"] == b"e1"
    assert headers["nbv-decision-id"] == b"d-own"
    assert [k for k, _ in msg.headers].count("nbv-decision-id") == 1
    assert "nbv-delivery-id" not in headers


def test_messages_published_outside_any_trace_start_their_own() -> None:
    a, b = tracing.inject([Message("k", b"1"), Message("k", b"2")])
    ids = {dict(a.headers)["nbv-trace-id"], dict(b.headers)["nbv-trace-id"]}
    assert len(ids) == 2 and all(HEX32.match(i.decode()) for i in ids)


def test_a_mixed_batch_hands_each_key_its_own_trace() -> None:
    records = [
        _record("acct-1", {"nbv-trace-id": "t1", "nbv-event-id": "e1"}, 0),
        _record("acct-2", {"nbv-trace-id": "t2", "nbv-event-id": "e2"}, 1),
        _record("acct-3", {}, 2),
    ]
    ctx = tracing.for_records(records)
    assert ctx.trace_id is None and ctx.event_id is None
    assert ctx.batch_trace_ids == ("t1", "t2")
    with tracing.use(ctx):
        one, two, three = tracing.inject([Message(k, b"") for k in ("acct-1", "acct-2", "acct-3")])
    assert dict(one.headers)["nbv-trace-id"] == b"t1"
    assert dict(one.headers)["nbv-event-id"] == b"e1"
    assert dict(two.headers)["nbv-trace-id"] == b"t2"
    assert dict(three.headers)["nbv-trace-id"] not in (b"t1", b"t2")


def test_one_requests_events_batched_together_keep_its_trace_id() -> None:
    records = [
        _record("a", {"nbv-trace-id": "t1", "nbv-event-id": "e1"}, 0),
        _record("b", {"nbv-trace-id": "t1", "nbv-event-id": "e2"}, 1),
    ]
    ctx = tracing.for_records(records)
    assert (ctx.trace_id, ctx.event_id) == ("t1", None)
    single = tracing.for_records(records[:1])
    assert (single.trace_id, single.event_id) == ("t1", "e1")
    assert tracing.from_headers([("nbv-trace-id", b"bad\nid")]).trace_id is None


def test_a_key_takes_its_latest_records_trace_and_the_log_keeps_every_trace_id() -> None:
    records = [
        _record("acct-1", {"nbv-trace-id": "t1", "nbv-event-id": "e1"}, 0),
        _record("acct-2", {"nbv-trace-id": "t2", "nbv-event-id": "e2"}, 1),
        _record("acct-1", {"nbv-trace-id": "t3", "nbv-event-id": "e3"}, 2),
        _record("acct-2", {"nbv-trace-id": "bad id", "nbv-event-id": "e4"}, 3),
    ]
    ctx = tracing.for_records(records)
    assert ctx.trace_id is None
    assert ctx.batch_trace_ids == ("t1", "t2", "t3")
    assert (ctx.by_key["acct-1"].trace_id, ctx.by_key["acct-1"].event_id) == ("t3", "e3")
    assert (ctx.by_key["acct-2"].trace_id, ctx.by_key["acct-2"].event_id) == (None, "e4")


def test_records_that_differ_only_outside_the_trace_headers_share_one_context() -> None:
    records = [
        _record("a", {"nbv-trace-id": "t1", "nbv-decision-id": "d1", "nbv-published-ms": "1"}),
        _record("b", {"nbv-trace-id": "t1", "nbv-decision-id": "d1", "nbv-published-ms": "2"}),
    ]
    ctx = tracing.for_records(records)
    assert (ctx.trace_id, ctx.decision_id, dict(ctx.by_key)) == ("t1", "d1", {})


async def test_ids_travel_request_to_bus_to_worker_to_next_topic(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus.sqlite")
    await bus.start()
    app = FastAPI()
    app.add_middleware(TracingMiddleware)

    @app.post("/events/{event_id}")
    async def accept(event_id: str) -> dict[str, str | None]:
        # One account per event: within a batch, what a handler publishes is attributed to
        # the latest record of the same key.
        headers = (("nbv-event-id", event_id.encode()),)
        await bus.publish("events", [Message(f"acct-{event_id}", b"{}", headers)])
        return {"trace": tracing.current_trace_id()}

    seen: list[tracing.TraceContext | None] = []

    async def project(records: Sequence[Record]) -> None:
        seen.append(tracing.current())
        await bus.publish("triggers", [Message(r.key, b"{}") for r in records])

    worker = ConsumerWorker(
        bus=bus, topics=["events"], group="g", handler=project, dead_letter_topic="dlq", poll_ms=20
    )
    await worker.start()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            response = await client.post("/events/e-1", headers={"X-Request-ID": "req-abc"})
            assert response.headers["x-request-id"] == "req-abc"
            assert response.json() == {"trace": "req-abc"}
            generated = await client.post("/events/e-2")
            assert HEX32.match(generated.headers["x-request-id"])
        downstream = bus.consumer(["triggers"], "check")
        await downstream.start()
        got: list[Record] = []
        for _ in range(100):
            got += await downstream.fetch(10, 20)
            if len(got) >= 2:
                break
    finally:
        await worker.stop()
        await bus.stop()
    first = dict(got[0].headers)
    assert first["nbv-trace-id"] == b"req-abc"
    assert first["nbv-event-id"] == b"e-1"
    assert dict(got[1].headers)["nbv-trace-id"] == generated.headers["x-request-id"].encode()
    # The handler ran in the records' context: alone, or as one of a batch's traces.
    assert any(c and "req-abc" in (c.trace_id, *c.batch_trace_ids) for c in seen), seen


async def test_lag_is_reported_on_a_timer_even_while_the_handler_is_stuck(
    tmp_path: Path,
) -> None:
    bus = EmbeddedBus(tmp_path / "bus.sqlite")
    await bus.start()
    release = asyncio.Event()

    async def stuck(records: Sequence[Record]) -> None:
        await release.wait()

    worker = ConsumerWorker(
        bus=bus,
        topics=["lagged"],
        group="lag-test",
        handler=stuck,
        dead_letter_topic="dlq",
        poll_ms=20,
        lag_interval_s=0.05,
    )

    def lag() -> float | None:
        for metric in CONSUMER_LAG.collect():
            for sample in metric.samples:
                if sample.labels == {"group": "lag-test", "topic": "lagged", "partition": "0"}:
                    return sample.value
        return None

    await worker.start()
    try:
        await bus.publish("lagged", [Message("k", b"x")] * 3)
        for _ in range(100):
            if lag() == 3:
                break
            await asyncio.sleep(0.02)
        assert lag() == 3
        release.set()
        for _ in range(100):
            if lag() == 0:
                break
            await asyncio.sleep(0.02)
        assert lag() == 0
    finally:
        release.set()
        await worker.stop()
        await bus.stop()


class _ScriptedLag(Consumer):
    """A consumer whose partitions change between lag reports (a rebalance)."""

    def __init__(self, reports: list[dict[tuple[str, int], int]]) -> None:
        self.reports = reports

    async def start(self) -> None:
        return None

    async def fetch(self, max_records: int, timeout_ms: int) -> list[Record]:
        await asyncio.sleep(timeout_ms / 1000)
        return []

    async def commit(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def lag(self) -> dict[tuple[str, int], int]:
        if len(self.reports) > 1:
            return self.reports.pop(0)
        return self.reports[0]


async def test_lag_of_partitions_moved_to_another_member_is_withdrawn(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus.sqlite")
    consumer = _ScriptedLag([{("t", 0): 5, ("t", 1): 7}, {("t", 1): 2}])
    bus.consumer = lambda topics, group: consumer  # type: ignore[method-assign]

    async def noop(records: Sequence[Record]) -> None:
        return None

    worker = ConsumerWorker(
        bus=bus,
        topics=["t"],
        group="rebalanced",
        handler=noop,
        dead_letter_topic="dlq",
        poll_ms=10,
        lag_interval_s=0.02,
    )

    def reported() -> dict[str, float]:
        return {
            s.labels["partition"]: s.value
            for m in CONSUMER_LAG.collect()
            for s in m.samples
            if s.labels["group"] == "rebalanced"
        }

    await worker.start()
    try:
        for _ in range(100):
            if reported() == {"1": 2}:
                break
            await asyncio.sleep(0.02)
    finally:
        await worker.stop()
    assert reported() == {"1": 2}
