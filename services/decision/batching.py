"""Decisions of concurrent requests made together: one read for all their people, one scoring
and one explaining call per model (``DecisionEngine.decide_many``), one transaction that logs
and publishes them all (``services.decision.group_commit``).

A request hands its decision over and waits for it. Up to ``readers`` tasks take what is
queued, each everything queued when it starts (at most ``max_batch``), and decide and log it
in one transaction. Nothing waits for a batch to fill: alone, a request is decided at once, as
its own batch; under load, requests that arrive while a batch is decided form the next one.
A database round trip costs the decision service about as much CPU as decoding the rows of a
dozen people, and a LightGBM call about as much for one row as for dozens, so under load a
decision costs less CPU than alone (docs/decision.md, "Benchmark").

One reader runs whenever requests wait; a further one starts only once ``backlog`` requests
are waiting. Started for every request that found a reader busy, readers split a moderate load
into batches of one or two, each paying the five round trips and their CPU: at half the peak
rate that cost 12 % more CPU per decision than one reader's larger batches, on two vCPUs that
the database and the broker share. Near the peak the queue passes the backlog and the batches
overlap their waits on the database, as before.

A person asked for again while their earlier request is still queued waits for the next
batch, so that one batch never holds the same person twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from services.decision.engine import Decided, DecisionRequest, UnknownUser
from shared.metrics import DECISION_READ_BATCH

log = logging.getLogger(__name__)

DecideMany = Callable[[Sequence[DecisionRequest]], Awaitable[list[Decided | UnknownUser]]]
# Whether a batch's failure is everyone's (the database or the broker unavailable): then its
# requests all get it at once rather than each waiting for its own attempt to fail the same way.
Shared = Callable[[Exception], bool]


def _never(exc: Exception) -> bool:
    return False


@dataclass
class _Pending:
    request: DecisionRequest
    done: asyncio.Future[Decided] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class DecisionBatcher:
    def __init__(
        self,
        decide_many: DecideMany,
        max_batch: int = 32,
        readers: int = 3,
        shared_failure: Shared = _never,
        backlog: int = 1,
    ) -> None:
        if max_batch < 1 or readers < 1 or backlog < 1:
            raise ValueError("a batcher needs a batch of at least one, one reader and a backlog")
        self._decide_many = decide_many
        self._shared_failure = shared_failure
        self._max_batch = max_batch
        self._max_readers = readers
        self._backlog = backlog
        self._queue: deque[_Pending] = deque()
        self._readers: set[asyncio.Task[None]] = set()

    async def decide(self, request: DecisionRequest) -> Decided:
        """The decision for ``request``, logged; raises UnknownUser for a person the view does
        not know, or what deciding or logging raised."""
        pending = _Pending(request)
        self._queue.append(pending)
        if not self._readers or (
            len(self._readers) < self._max_readers and len(self._queue) >= self._backlog
        ):
            reader = asyncio.create_task(self._drain(), name="decision-reader")
            self._readers.add(reader)
            reader.add_done_callback(self._readers.discard)
        return await pending.done

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        people: set[str] = set()
        later: list[_Pending] = []
        while self._queue and len(batch) < self._max_batch:
            pending = self._queue.popleft()
            if pending.done.done():
                continue  # its request was cancelled (client gone)
            if pending.request.user_id in people:
                later.append(pending)
                continue
            people.add(pending.request.user_id)
            batch.append(pending)
        self._queue.extendleft(reversed(later))
        return batch

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._take()
                if not batch:
                    continue
                try:
                    await self._decide(batch)
                except BaseException as exc:
                    # Whatever stops this reader (shutdown, a bug outside the decision), the
                    # requests it took must not wait for ever.
                    for pending in batch:
                        _settle(pending, exc)
                    raise
        finally:
            # At once, not in the task's done callback (which runs later): a request queued
            # in between would find this reader still counted, and start none.
            self._readers.discard(cast("asyncio.Task[None]", asyncio.current_task()))

    async def _decide(self, batch: list[_Pending]) -> None:
        DECISION_READ_BATCH.observe(len(batch))
        try:
            results = await self._decide_many([p.request for p in batch])
        except Exception as exc:
            if len(batch) == 1 or self._shared_failure(exc):
                for pending in batch:
                    _settle(pending, exc)
                return
            # One person's decision must not fail the others': each on its own.
            log.warning("decision batch failed; deciding its requests one by one")
            for pending in batch:
                await self._decide([pending])
            return
        for pending, result in zip(batch, results, strict=True):
            _settle(pending, result)


def _settle(pending: _Pending, outcome: Decided | BaseException) -> None:
    if pending.done.done():  # the request was cancelled (client gone), or already answered
        return
    if isinstance(outcome, asyncio.CancelledError):
        pending.done.cancel()
    elif isinstance(outcome, BaseException):
        pending.done.set_exception(outcome)
    else:
        pending.done.set_result(outcome)
