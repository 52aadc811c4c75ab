"""Running playbooks on the durable scheduler: one job per step, keyed
``playbook:<name>:<user>:<trigger id>:<step>`` (so a replayed trigger schedules nothing twice),
and cancelling a person's remaining steps when a cancel trigger arrives."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.decision.arbitration import decision_facts
from services.decision.engine import context_of
from services.decision.playbooks import Playbook, step_key, step_prefix
from services.ingest.view import AccountState, UserState
from shared.scheduler import cancel, schedule
from shared.store.models import AccountView, ScheduledJob, UserView

STEP_JOB = "playbook_step"


class StepJob(BaseModel):
    """The payload of a step job: everything the step needs, fixed when it was scheduled."""

    playbook: str
    step: str
    user_id: str
    account_id: str
    trigger: str
    trigger_id: str
    element: str
    channel: str | None
    owner: str
    sla_hours: int | None


async def audience(
    session: AsyncSession,
    playbook: Playbook,
    user_ids: Sequence[str],
    trigger: str,
    now: datetime,
) -> list[UserState]:
    """The people among ``user_ids`` the playbook's audience admits, given their view now."""
    rows = (await session.scalars(select(UserView).where(UserView.user_id.in_(user_ids)))).all()
    accounts: dict[str, AccountState | None] = {}
    admitted: list[UserState] = []
    for row in sorted(rows, key=lambda r: r.user_id):
        user = UserState.model_validate(row, from_attributes=True)
        if user.account_id not in accounts:
            acc = await session.get(AccountView, user.account_id)
            accounts[user.account_id] = (
                AccountState.model_validate(acc, from_attributes=True) if acc else None
            )
        account = accounts[user.account_id]
        facts = decision_facts(context_of(user, account, now), account, trigger)
        if playbook.audience.admits(user.role, facts):
            admitted.append(user)
    return admitted


async def start_playbook(
    session: AsyncSession,
    dialect: str,
    playbook: Playbook,
    user: UserState,
    *,
    trigger: str,
    trigger_id: str,
    now: datetime,
) -> int:
    """Schedule every step for the person; returns how many were new."""
    added = 0
    for step in playbook.steps:
        payload = StepJob(
            playbook=playbook.name,
            step=step.name,
            user_id=user.user_id,
            account_id=user.account_id,
            trigger=trigger,
            trigger_id=trigger_id,
            element=step.element,
            channel=step.channel.value if step.channel else None,
            owner=step.owner,
            sla_hours=step.sla_hours or playbook.sla_hours,
        )
        added += await schedule(
            session,
            dialect,
            key=step_key(playbook.name, user.user_id, trigger_id, step.name),
            kind=STEP_JOB,
            due_at=now + timedelta(hours=step.delay_hours),
            payload=payload.model_dump(),
        )
    return added


async def cancel_playbook(session: AsyncSession, playbook: str, user_ids: Sequence[str]) -> int:
    """Cancel the pending steps of this playbook for these people; returns how many."""
    keys: list[str] = []
    for user_id in user_ids:
        keys.extend(
            (
                await session.scalars(
                    select(ScheduledJob.key).where(
                        ScheduledJob.kind == STEP_JOB,
                        ScheduledJob.status == "pending",
                        ScheduledJob.key.startswith(
                            step_prefix(playbook, user_id), autoescape=True
                        ),
                    )
                )
            ).all()
        )
    return await cancel(session, keys) if keys else 0


def step_label(job: StepJob) -> str:
    return f"playbook:{job.playbook}:{job.step}"
