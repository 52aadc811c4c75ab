"""The projector's rows on PostgreSQL (services/ingest/view_rows.py): what it stores is exactly
the event-by-event fold of what it was given, its in-memory rows never hide a change someone
else made, and a batch that fails leaves nothing half-applied in memory."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select, update

from services.ingest.projector import Projector
from services.ingest.view import (
    AccountState,
    UserState,
    ViewConfig,
    apply_event,
    new_account,
    new_user,
    refresh_scores,
)
from shared.bus import Record
from shared.envelope import EVENT_ADAPTER, Event, encode
from shared.runtime import Runtime
from shared.settings import BusKind, Settings
from shared.store.db import migrate
from shared.store.models import AccountView, UserView
from tests.factories import event
from tests.harness import fresh_database

pytestmark = pytest.mark.integration

BASE = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=12)
SLOW = settings(
    max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None
)


@pytest.fixture
async def migrated(pg_admin_url: str) -> AsyncIterator[str]:
    async with fresh_database(pg_admin_url) as url:
        await migrate(url)
        yield url


def _runtime(url: str, data_dir: Path, cache_rows: int = 1_000) -> Runtime:
    # The embedded bus carries the triggers; the store is PostgreSQL.
    return Runtime.from_settings(
        Settings(
            bus=BusKind.EMBEDDED,
            database_url=url,
            data_dir=data_dir,
            projector_cache_rows=cache_rows,
        )
    )


def _records(events: Sequence[Event]) -> list[Record]:
    return [Record("events", 0, i, e.account_id, encode(e), 0, ()) for i, e in enumerate(events)]


async def _rows(rt: Runtime, prefix: str) -> dict[str, dict[str, Any]]:
    """The stored views whose ids start with ``prefix``, as the states they hold."""
    async with rt.engine.connect() as conn:
        users = (
            await conn.execute(
                select(UserView.__table__).where(UserView.user_id.startswith(prefix))
            )
        ).mappings()
        found: dict[str, dict[str, Any]] = {
            f"user:{r['user_id']}": UserState.model_validate(dict(r)).model_dump() for r in users
        }
        accounts = (
            await conn.execute(
                select(AccountView.__table__).where(AccountView.account_id.startswith(prefix))
            )
        ).mappings()
        found |= {
            f"account:{r['account_id']}": AccountState.model_validate(dict(r)).model_dump()
            for r in accounts
        }
    return found


def _reference(batches: Sequence[Sequence[Event]]) -> dict[str, dict[str, Any]]:
    """The fold by hand, one event at a time: each id once, each batch in (time, id) order,
    the scores of the accounts a batch touched refreshed at its end."""
    config = ViewConfig()
    users: dict[str, UserState] = {}
    accounts: dict[str, AccountState] = {}
    seen: set[str] = set()
    for batch in batches:
        fresh = [e for e in {e.id: e for e in batch}.values() if e.id not in seen]
        seen |= {e.id for e in fresh}
        last: dict[str, Event] = {}
        for e in sorted(fresh, key=lambda e: (e.time, e.id)):
            account = accounts.get(e.account_id)
            if account is None:
                account = accounts[e.account_id] = new_account(e)
            user = None
            if e.user_id:
                user = users.get(e.user_id)
                if user is None:
                    user = users[e.user_id] = new_user(e)
                    account.user_count += 1
            apply_event(account, user, e, config)
            last[e.account_id] = e
        for account_id, cause in last.items():
            refresh_scores(accounts[account_id], cause, config)
    return {f"user:{k}": v.model_dump() for k, v in users.items()} | {
        f"account:{k}": v.model_dump() for k, v in accounts.items()
    }


TYPES = {
    "track": "product.track",
    "page": "product.page",
    "identify": "user.identify",
    "nps": "survey.nps",
    "csat": "survey.csat",
    "ticket": "support.ticket_opened",
    "solved": "support.ticket_solved",
    "invoice": "billing.invoice_paid",
    "failed": "billing.payment_failed",
    "response": "nbv.response",
    "subscription": "billing.subscription_updated",
    "role": "crm.contact_role",
}


def _payload(draw: st.DrawFn, kind: str, user: str, i: int) -> dict[str, Any]:
    if kind == "track":
        return {
            "event": draw(st.sampled_from(["run", "save", "quiz_completed"])),
            "feature_area": draw(st.sampled_from(["core", "reports", None])),
            "properties": {"score": draw(st.integers(0, 100)), "milestone": draw(st.booleans())},
        }
    if kind == "page":
        return {"name": "home", "feature_area": "reports"}
    if kind == "identify":
        role = draw(st.sampled_from(["admin", "champion", None]))
        return {"email": f"{user}-{i}@example.com", "role": role, "timezone": "Europe/Paris"}
    if kind == "nps":
        return {"score": draw(st.integers(0, 10))}
    if kind == "csat":
        return {"score": draw(st.integers(1, 5))}
    if kind in ("ticket", "solved"):
        return {"ticket_id": f"t{i % 4}", "priority": "high"}
    if kind in ("invoice", "failed"):
        return {"invoice_id": f"i{i}", "amount": 10.5, "attempt_count": 2}
    if kind == "response":
        return {
            "decision_id": f"d{i}",
            "element_id": draw(st.sampled_from(["tour", "guide"])),
            "outcome": draw(st.sampled_from(["shown", "clicked", "completed", "dismissed"])),
        }
    if kind == "subscription":
        return {
            "plan": draw(st.sampled_from(["pro", "team"])),
            "status": draw(st.sampled_from(["active", "past_due", "canceled"])),
            "mrr": draw(st.sampled_from([0.0, 99.5, 1234.0])),
        }
    return {"role": "champion", "change": draw(st.sampled_from(["assigned", "removed", "left"]))}


@st.composite
def histories(draw: st.DrawFn) -> list[Event]:
    """A mix of every kind the view folds, for three people in two accounts, ids unique to
    the example (examples share a database)."""
    prefix = f"p{uuid.uuid4().hex[:8]}-"
    events: list[Event] = []
    for i in range(draw(st.integers(1, 40))):
        user = draw(st.sampled_from(["u1", "u2", "u3"]))
        kind = draw(st.sampled_from(["track", "track", *TYPES]))
        data: dict[str, Any] = {
            "id": f"{prefix}e{i}",
            "source": "prop",
            "type": TYPES[kind],
            # Over four days, some late: windows, buckets and "newest wins" all get exercised.
            "time": BASE + timedelta(minutes=draw(st.integers(0, 4 * 24 * 60)), microseconds=i),
            "account_id": prefix + ("a2" if user == "u3" else "a1"),
            "payload": _payload(draw, kind, user, i),
        }
        if kind != "subscription":
            data["user_id"] = prefix + user
        events.append(EVENT_ADAPTER.validate_python(data))
    return events


def _split(events: Sequence[Event], cuts: Sequence[int]) -> list[list[Event]]:
    bounds = sorted({0, len(events), *(c % (len(events) + 1) for c in cuts)})
    return [list(events[a:b]) for a, b in itertools.pairwise(bounds)]


async def _project(
    url: str, data_dir: Path, batches: Sequence[Sequence[Event]], cache_rows: int
) -> None:
    rt = _runtime(url, data_dir, cache_rows)
    await rt.bus.start()
    try:
        projector = Projector(rt)
        for batch in batches:
            await projector.handle(_records(batch))
    finally:
        await rt.bus.stop()
        await rt.engine.dispose()


@SLOW
@given(histories(), st.lists(st.integers(0, 40), max_size=4), st.randoms())
def test_stored_rows_are_the_event_by_event_fold(
    migrated: str, tmp_path: Path, events: list[Event], cuts: list[int], rnd: Any
) -> None:
    """Invariant: whatever the batches (each redelivered in part, as after a crash), every
    column of every row the projector stores, through its cache, its version checks and its
    column-array upsert, equals the plain event-by-event fold of the same batches; and a
    projector without a cache stores the same."""
    batches = _split(events, cuts)
    delivered: list[list[Event]] = []
    for i, batch in enumerate(batches):
        again = [e for e in itertools.chain(*batches[:i]) if rnd.random() < 0.3]
        delivered.append(batch + again)
    prefix = events[0].id.split("-")[0] + "-"

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        await _project(migrated, tmp_path, delivered, cache_rows=1_000)
        rt = _runtime(migrated, tmp_path)
        try:
            cached = await _rows(rt, prefix)
            # Again without a cache, under other ids: the same fold must come out.
            other = f"q{prefix[1:]}"
            renamed = [
                [
                    e.model_copy(
                        update={
                            "id": e.id.replace(prefix, other),
                            "account_id": e.account_id.replace(prefix, other),
                            "user_id": e.user_id and e.user_id.replace(prefix, other),
                        }
                    )
                    for e in batch
                ]
                for batch in delivered
            ]
            await _project(migrated, tmp_path, renamed, cache_rows=0)
            uncached = {
                k.replace(other, prefix): _rename(v, other, prefix)
                for k, v in (await _rows(rt, other)).items()
            }
        finally:
            await rt.engine.dispose()
        return cached, uncached

    cached, uncached = asyncio.run(run())
    expected = _reference(delivered)
    assert cached == expected
    assert uncached == expected


def _rename(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, dict):
        return {_rename(k, old, new): _rename(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_rename(v, old, new) for v in value]
    return value


async def _u1_and_acme(rt: Runtime) -> tuple[UserView | None, AccountView | None]:
    async with rt.sessions() as session:
        return await session.get(UserView, "u1"), await session.get(AccountView, "acme")


def _track(n: int, start: int, user: str = "u1") -> list[Event]:
    return [
        event("product.track", {"event": "run"}, account="acme", user=user, minutes=start + i)
        for i in range(n)
    ]


async def test_a_row_someone_else_changed_is_reloaded_not_overwritten(
    migrated: str, tmp_path: Path
) -> None:
    """Invariant: the cache never writes back a row that changed under it. An erasure deletes
    the person's row and edits the account between two batches; the second batch starts the
    person afresh and keeps the account edit, where a blind cache would restore both."""
    rt = _runtime(migrated, tmp_path)
    await rt.bus.start()
    try:
        projector = Projector(rt)
        await projector.handle(_records(_track(5, 0)))
        async with rt.sessions() as session, session.begin():
            await session.execute(delete(UserView).where(UserView.user_id == "u1"))
            await session.execute(
                update(AccountView).where(AccountView.account_id == "acme").values(name="Acme")
            )
        await projector.handle(_records(_track(3, 10)))
        user, account = await _u1_and_acme(rt)
    finally:
        await rt.bus.stop()
        await rt.engine.dispose()
    assert user is not None and user.event_count == 3
    assert account is not None and account.name == "Acme" and account.event_count == 8


async def test_a_failed_batch_leaves_nothing_half_applied_in_memory(
    migrated: str, tmp_path: Path
) -> None:
    """Invariant: a batch whose transaction fails after the fold (here: publishing its triggers)
    is rolled back in the store *and* in the projector's memory, so its retry counts each
    event once."""
    rt = _runtime(migrated, tmp_path)
    await rt.bus.start()
    try:
        projector = Projector(rt)
        await projector.handle(_records(_track(4, 0)))
        detractor = event("survey.nps", {"score": 2}, account="acme", user="u1", minutes=30)
        batch = _records([*_track(3, 10), detractor])
        publish = rt.bus.publish
        calls = 0

        async def flaky(topic: str, messages: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ConnectionError("broker away")
            await publish(topic, messages)

        rt.bus.publish = flaky  # type: ignore[method-assign]
        with pytest.raises(ConnectionError):
            await projector.handle(batch)
        await projector.handle(batch)  # the worker's retry
        user, account = await _u1_and_acme(rt)
    finally:
        await rt.bus.stop()
        await rt.engine.dispose()
    assert calls == 2
    assert user is not None and user.event_count == 8 and user.last_nps == 2
    assert account is not None and account.event_count == 8
