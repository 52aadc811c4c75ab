"""Time-based triggers from the durable scheduler (shared/scheduler.py).

Job keys are the idempotency keys, and a job's trigger is published with its key as the
trigger's id, so a job re-run after a crash is ignored downstream:

- per account, written by the projector in the batch's transaction:
  ``renewal:<account>:<renewal date>:<days>`` (180/120/90 days before renewal) and
  ``onboarding:<account>:<contract date>`` (30 days after the contract was signed);
- calendar sweeps, each scheduling its successor when it runs (and seeded when the service
  starts): ``usage-sweep:<day>`` after each UTC day (usage down week over week, inactive N days,
  for every user active in the last weeks), ``month-start:<YYYY-MM>`` and
  ``quarter-start:<YYYY>Q<n>`` (one trigger per paying account).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.ingest import windows
from services.ingest.retention import RAW_EVENT_PURGE, RetentionPurge, schedule_purge
from services.ingest.triggers import Trigger, TriggerName, to_message
from services.ingest.view import PAYING, AccountState, UserState
from shared.runtime import Runtime
from shared.scheduler import Job, JobHandler, SchedulerWorker
from shared.store.db import upsert
from shared.store.models import AccountView, ScheduledJob, UserView

log = logging.getLogger(__name__)

RENEWAL = "ingest.renewal"
ONBOARDING = "ingest.onboarding"
USAGE_SWEEP = "ingest.usage_sweep"
MONTH_START = "ingest.month_start"
QUARTER_START = "ingest.quarter_start"
SWEEP_PAGE = 1_000
# A notice whose moment passed more than this long ago (e.g. during a replay) is not sent.
STALE = timedelta(days=1)
# After two idle weeks both weeks are empty: the week-over-week change no longer moves.
WATCH_DAYS = 14


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def _job(key: str, kind: str, due_at: datetime, payload: dict[str, Any]) -> dict[str, Any]:
    return {"key": key, "kind": kind, "due_at": due_at, "payload": payload}


def account_jobs(
    account: AccountState, renewal_days: Sequence[int], onboarding_days: int, now: datetime
) -> list[dict[str, Any]]:
    """The per-account timers an account's current billing state calls for."""
    jobs: list[dict[str, Any]] = []
    if account.renewal_date is not None and account.subscription_status in PAYING:
        renewal = account.renewal_date.date().isoformat()
        for days in renewal_days:
            due = account.renewal_date - timedelta(days=days)
            if due >= now - STALE:
                jobs.append(
                    _job(
                        f"renewal:{account.account_id}:{renewal}:{days}",
                        RENEWAL,
                        due,
                        {"account_id": account.account_id, "renewal": renewal, "days": days},
                    )
                )
    if account.contract_signed_at is not None:
        due = account.contract_signed_at + timedelta(days=onboarding_days)
        if due >= now - STALE:
            signed = account.contract_signed_at.date().isoformat()
            jobs.append(
                _job(
                    f"onboarding:{account.account_id}:{signed}",
                    ONBOARDING,
                    due,
                    {"account_id": account.account_id, "days": onboarding_days},
                )
            )
    return jobs


def calendar_jobs(now: datetime) -> list[dict[str, Any]]:
    """The next run of each calendar sweep (seeded at start; each run schedules its successor)."""
    today = now.date()
    return [
        _sweep_job(today),
        _month_job(_next_month(today)),
        _quarter_job(_next_quarter(today)),
    ]


def _sweep_job(day: date) -> dict[str, Any]:
    return _job(
        f"usage-sweep:{day.isoformat()}",
        USAGE_SWEEP,
        _midnight(day + timedelta(days=1)),
        {"day": day.isoformat()},
    )


def _next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def _next_quarter(day: date) -> date:
    first_month = 3 * ((day.month - 1) // 3) + 1
    start = date(day.year, first_month, 1)
    for _ in range(3):
        start = _next_month(start)
    return start


def _month_job(first: date) -> dict[str, Any]:
    label = first.strftime("%Y-%m")
    return _job(f"month-start:{label}", MONTH_START, _midnight(first), {"label": label})


def _quarter_job(first: date) -> dict[str, Any]:
    label = f"{first.year}Q{(first.month - 1) // 3 + 1}"
    return _job(f"quarter-start:{label}", QUARTER_START, _midnight(first), {"label": label})


async def add_jobs(session: AsyncSession, dialect: str, jobs: Sequence[dict[str, Any]]) -> None:
    """Schedule jobs whose keys are new; an existing key (already planned or done) is kept."""
    unique = list({j["key"]: j for j in jobs}.values())
    if unique:
        await session.execute(upsert(dialect, ScheduledJob, unique, ["key"]))


def usage_crossings(
    user: UserState, day: date, drop_pct: float, inactivity_days: int
) -> list[Trigger]:
    """What the end of ``day`` means for a user: usage dropped or inactivity reached."""
    found: list[Trigger] = []
    at = _midnight(day + timedelta(days=1))
    wow = windows.week_over_week(user.daily_usage, day)
    before = windows.week_over_week(user.daily_usage, day - timedelta(days=1))
    if wow is not None and wow <= -drop_pct and (before is None or before > -drop_pct):
        found.append(
            Trigger(
                name=TriggerName.USAGE_DROP,
                reason=f"usage {wow:+.0f} % week over week",
                account_id=user.account_id,
                user_id=user.user_id,
                cause_event_id=f"usage-sweep:{day.isoformat()}",
                time=at,
                key=f"usage_drop:{user.user_id}:{day.isoformat()}",
            )
        )
    if user.last_active is not None:
        last = user.last_active.date()
        if (day - last).days == inactivity_days:
            found.append(
                Trigger(
                    name=TriggerName.INACTIVE,
                    reason=f"no product usage for {inactivity_days} days",
                    account_id=user.account_id,
                    user_id=user.user_id,
                    cause_event_id=f"usage-sweep:{day.isoformat()}",
                    time=at,
                    key=f"inactive:{user.user_id}:{last.isoformat()}:{inactivity_days}",
                )
            )
    return found


class IngestScheduler:
    """Runs the ingest's timers and publishes what they find as triggers."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        s = runtime.settings
        handlers: dict[str, JobHandler] = {
            RENEWAL: self._renewal,
            ONBOARDING: self._onboarding,
            USAGE_SWEEP: self._usage_sweep,
            MONTH_START: self._calendar(TriggerName.MONTH_START, _month_job, _next_month),
            QUARTER_START: self._calendar(TriggerName.QUARTER_START, _quarter_job, _next_quarter),
            RAW_EVENT_PURGE: RetentionPurge(runtime).run,
        }
        self.worker = SchedulerWorker(runtime.sessions, handlers, poll_s=s.ingest_scheduler_poll_s)

    async def start(self, now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        async with self._rt.sessions() as session, session.begin():
            await add_jobs(session, self._rt.dialect, calendar_jobs(now))
            await schedule_purge(session, self._rt.dialect, now.date())
        await self.worker.start()

    async def stop(self) -> None:
        await self.worker.stop()

    async def _publish(self, triggers: Sequence[Trigger]) -> None:
        if triggers:
            await self._rt.bus.publish(
                self._rt.topic("triggers"), [to_message(t) for t in triggers]
            )

    async def _account(self, account_id: str) -> AccountState | None:
        async with self._rt.sessions() as session:
            row = await session.get(AccountView, account_id)
        return None if row is None else AccountState.model_validate(row, from_attributes=True)

    async def _renewal(self, job: Job) -> None:
        account = await self._account(str(job.payload["account_id"]))
        renewal = str(job.payload["renewal"])
        if (
            account is None
            or account.renewal_date is None
            or account.renewal_date.date().isoformat() != renewal
            or account.subscription_status not in PAYING
        ):
            return  # the renewal moved or the subscription ended: a newer job (if any) stands
        days = int(job.payload["days"])
        await self._publish(
            [
                # renewal_180 / renewal_120 / renewal_90 with the default notice days
                _account_trigger(
                    job,
                    account.account_id,
                    f"renewal_{days}",
                    f"renewal on {renewal}, {days} days ahead",
                )
            ]
        )

    async def _onboarding(self, job: Job) -> None:
        account = await self._account(str(job.payload["account_id"]))
        if account is None or account.subscription_status not in PAYING:
            return
        await self._publish(
            [
                _account_trigger(
                    job,
                    account.account_id,
                    TriggerName.ONBOARDING_30D,
                    f"{job.payload['days']} days since the contract was signed",
                )
            ]
        )

    async def _usage_sweep(self, job: Job) -> None:
        s = self._rt.settings
        day = date.fromisoformat(str(job.payload["day"]))
        since = _midnight(day - timedelta(days=max(WATCH_DAYS, s.inactivity_days) + 1))
        after = ""
        while True:
            async with self._rt.sessions() as session:
                rows = (
                    await session.scalars(
                        select(UserView)
                        .where(UserView.last_active >= since, UserView.user_id > after)
                        .order_by(UserView.user_id)
                        .limit(SWEEP_PAGE)
                    )
                ).all()
                users = [UserState.model_validate(r, from_attributes=True) for r in rows]
            if not users:
                break
            found: list[Trigger] = []
            for user in users:
                found += usage_crossings(user, day, s.usage_drop_pct, s.inactivity_days)
            await self._publish(found)
            after = users[-1].user_id
        async with self._rt.sessions() as session, session.begin():
            await add_jobs(session, self._rt.dialect, [_sweep_job(day + timedelta(days=1))])

    def _calendar(
        self,
        name: str,
        make: Callable[[date], dict[str, Any]],
        successor: Callable[[date], date],
    ) -> JobHandler:
        async def run(job: Job) -> None:
            label = str(job.payload["label"])
            after = ""
            while True:
                async with self._rt.sessions() as session:
                    ids = (
                        await session.scalars(
                            select(AccountView.account_id)
                            .where(
                                AccountView.subscription_status.in_(PAYING),
                                AccountView.account_id > after,
                            )
                            .order_by(AccountView.account_id)
                            .limit(SWEEP_PAGE)
                        )
                    ).all()
                if not ids:
                    break
                await self._publish(
                    [
                        _account_trigger(
                            job,
                            a,
                            str(name),
                            f"{name.replace('_', ' ')} {label}",
                            key=f"{job.key}:{a}",
                        )
                        for a in ids
                    ]
                )
                after = ids[-1]
            async with self._rt.sessions() as session, session.begin():
                next_first = successor(job.due_at.date())
                await add_jobs(session, self._rt.dialect, [make(next_first)])

        return run


def _account_trigger(
    job: Job, account_id: str, name: str, reason: str, key: str | None = None
) -> Trigger:
    """An account-level trigger fired by a scheduled job, published under the job's key."""
    return Trigger(
        name=name,
        reason=reason,
        account_id=account_id,
        user_id=None,
        cause_event_id=job.key,
        time=job.due_at,
        key=key or job.key,
    )
