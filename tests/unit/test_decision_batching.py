"""The decision batcher: concurrent requests are decided together, each gets its own answer,
one person is never twice in a batch, and one bad request does not fail the others."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import pytest

from services.decision.batching import DecisionBatcher
from services.decision.engine import Decided, DecisionRequest, UnknownUser


class FakeEngine:
    """Decides a request as the string ``user_id:channel``; knows everyone but ``ghost``;
    raises for ``boom`` (bad data) and ``down`` (the store unavailable); each call is
    recorded, and may be held until released."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.hold: asyncio.Event | None = None

    async def decide_many(self, requests: Sequence[DecisionRequest]) -> list[Decided | UnknownUser]:
        self.calls.append([r.user_id for r in requests])
        if self.hold is not None:
            await self.hold.wait()
        if any(r.user_id == "boom" for r in requests):
            raise RuntimeError("bad data")
        if any(r.user_id == "down" for r in requests):
            raise ConnectionError("the store is down")
        out: list[Any] = []
        for r in requests:
            out.append(
                UnknownUser(r.user_id) if r.user_id == "ghost" else f"{r.user_id}:{r.channel}"
            )
        return cast(list[Decided | UnknownUser], out)


def _request(user_id: str) -> DecisionRequest:
    return DecisionRequest(user_id, None, 3)


async def _held(
    fake: FakeEngine, *users: str
) -> tuple[DecisionBatcher, list[asyncio.Task[Decided]], asyncio.Event]:
    """One reader, deciding ``users`` as its first batch, held until the event is set."""
    fake.hold = hold = asyncio.Event()
    batcher = DecisionBatcher(fake.decide_many, readers=1)
    taken = [asyncio.ensure_future(batcher.decide(_request(u))) for u in users]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return batcher, taken, hold


async def test_concurrent_requests_share_a_batch_and_each_gets_its_answer() -> None:
    fake = FakeEngine()
    batcher = DecisionBatcher(fake.decide_many, max_batch=32, readers=1)
    users = [f"u{i}" for i in range(10)]
    answers = await asyncio.gather(*(batcher.decide(_request(u)) for u in users))
    assert [str(a) for a in answers] == [f"{u}:None" for u in users]
    # All were queued before the reader ran: one batch.
    assert fake.calls == [users]


async def test_a_lone_request_is_decided_at_once() -> None:
    fake = FakeEngine()
    batcher = DecisionBatcher(fake.decide_many)
    assert str(await batcher.decide(_request("solo"))) == "solo:None"
    assert fake.calls == [["solo"]]


async def test_a_request_right_after_the_reader_finished_starts_another() -> None:
    # The awaiting request resumes before the finished reader's done callbacks run: the next
    # request must not count that reader as still running.
    fake = FakeEngine()
    batcher = DecisionBatcher(fake.decide_many, readers=1)
    assert str(await batcher.decide(_request("a"))) == "a:None"
    async with asyncio.timeout(2):  # inline: wait_for would run it in a task of its own, later
        assert str(await batcher.decide(_request("b"))) == "b:None"
    assert fake.calls == [["a"], ["b"]]


async def test_requests_arriving_during_a_batch_form_the_next_one() -> None:
    fake = FakeEngine()
    batcher, (first,), hold = await _held(fake, "a")
    later = [asyncio.ensure_future(batcher.decide(_request(u))) for u in ("b", "c", "d")]
    await asyncio.sleep(0)
    hold.set()
    await asyncio.gather(first, *later)
    assert fake.calls == [["a"], ["b", "c", "d"]]


async def test_a_second_batch_starts_only_once_the_backlog_waits() -> None:
    fake = FakeEngine()
    fake.hold = hold = asyncio.Event()
    batcher = DecisionBatcher(fake.decide_many, readers=3, backlog=3)
    first = asyncio.ensure_future(batcher.decide(_request("a")))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the one reader took "a" and is held in its batch
    waiting = [asyncio.ensure_future(batcher.decide(_request(u))) for u in ("b", "c")]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert fake.calls == [["a"]] and len(batcher._readers) == 1  # two waiting: below the backlog
    third = asyncio.ensure_future(batcher.decide(_request("d")))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert fake.calls == [["a"], ["b", "c", "d"]]  # the third waiting one started a second reader
    hold.set()
    answers = await asyncio.gather(first, *waiting, third)
    assert [str(x) for x in answers] == ["a:None", "b:None", "c:None", "d:None"]


async def test_batches_are_bounded_and_readers_work_in_parallel() -> None:
    fake = FakeEngine()
    batcher = DecisionBatcher(fake.decide_many, max_batch=4, readers=2)
    users = [f"u{i}" for i in range(10)]
    answers = await asyncio.gather(*(batcher.decide(_request(u)) for u in users))
    assert [str(a) for a in answers] == [f"{u}:None" for u in users]
    assert [len(c) for c in fake.calls] == [4, 4, 2]
    assert sorted(u for c in fake.calls for u in c) == sorted(users)


async def test_one_person_is_never_twice_in_a_batch() -> None:
    fake = FakeEngine()
    batcher = DecisionBatcher(fake.decide_many, readers=1)
    answers = await asyncio.gather(
        *(batcher.decide(_request(u)) for u in ("a", "b", "a", "c", "a"))
    )
    assert [str(a) for a in answers] == ["a:None", "b:None", "a:None", "c:None", "a:None"]
    assert fake.calls == [["a", "b", "c"], ["a"], ["a"]]


async def test_an_unknown_person_gets_unknown_user_and_the_others_their_answers() -> None:
    fake = FakeEngine()
    batcher = DecisionBatcher(fake.decide_many, readers=1)
    results = await asyncio.gather(
        *(batcher.decide(_request(u)) for u in ("a", "ghost", "b")), return_exceptions=True
    )
    assert str(results[0]) == "a:None" and str(results[2]) == "b:None"
    assert isinstance(results[1], UnknownUser) and results[1].user_id == "ghost"


async def test_a_failing_request_fails_alone() -> None:
    fake = FakeEngine()
    batcher = DecisionBatcher(fake.decide_many, readers=1)
    results = await asyncio.gather(
        *(batcher.decide(_request(u)) for u in ("a", "boom", "b")), return_exceptions=True
    )
    assert str(results[0]) == "a:None" and str(results[2]) == "b:None"
    assert isinstance(results[1], RuntimeError)
    # The batch failed as a whole, then each request was decided on its own.
    assert fake.calls == [["a", "boom", "b"], ["a"], ["boom"], ["b"]]


async def test_a_failure_of_the_whole_batch_is_everyone_s_at_once() -> None:
    fake = FakeEngine()
    batcher = DecisionBatcher(
        fake.decide_many, readers=1, shared_failure=lambda e: isinstance(e, ConnectionError)
    )
    outcomes = await asyncio.gather(
        *(batcher.decide(_request(u)) for u in ("a", "down", "b")), return_exceptions=True
    )
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    assert fake.calls == [["a", "down", "b"]]  # not tried again one by one


async def test_a_cancelled_request_is_left_out() -> None:
    fake = FakeEngine()
    batcher, (first,), hold = await _held(fake, "a")
    gone = asyncio.ensure_future(batcher.decide(_request("gone")))
    kept = asyncio.ensure_future(batcher.decide(_request("kept")))
    await asyncio.sleep(0)
    gone.cancel()
    hold.set()
    assert str(await first) == "a:None" and str(await kept) == "kept:None"
    assert fake.calls == [["a"], ["kept"]]


def test_a_batcher_needs_room() -> None:
    fake = FakeEngine()
    with pytest.raises(ValueError):
        DecisionBatcher(fake.decide_many, max_batch=0)


async def test_requests_taken_by_a_reader_that_stops_are_not_left_waiting() -> None:
    fake = FakeEngine()
    batcher, waiting, _ = await _held(fake, "a", "b")
    (reader,) = batcher._readers
    reader.cancel()  # e.g. the service shutting down mid-batch
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
