"""The decision: read the view, apply the rules, rank, explore, log, and say why."""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from models.features import INDEX, Context, ElementFacts, build_matrix, context_vector
from models.ranker import Ranker
from services.decision.library import ValueElement
from services.decision.policy import EpsilonGreedy
from services.decision.rules import evaluate
from services.ingest.view import AccountState, UserState
from shared.contracts import DecidedItem, DecisionMessage
from shared.envelope import Channel, Role
from shared.metrics import DECISION_DURATION, DECISIONS, EXCLUSIONS
from shared.store.models import AccountView, DecisionRow, UserView


class UnknownUser(LookupError):
    pass


@dataclass(frozen=True)
class Decided:
    message: DecisionMessage
    row: DecisionRow


def facts(e: ValueElement) -> ElementFacts:
    return ElementFacts(
        kind=e.kind.value,
        stage=e.stage.value,
        roles=[r.value for r in e.roles],
        value_weight=e.value_weight,
        effort_minutes=e.effort_minutes,
        feature_area=e.feature_area,
    )


def context_of(user: UserState, account: AccountState | None, now: datetime) -> Context:
    return Context(
        now=now,
        role=user.role,
        first_seen=user.first_seen,
        last_seen=user.last_seen,
        event_count=user.event_count,
        feature_usage=user.feature_usage,
        last_nps=user.last_nps,
        open_tickets=len(account.open_tickets) if account else 0,
        renewal_date=account.renewal_date if account else None,
        n_achieved=len(user.achieved),
        n_dismissed=len(user.dismissed),
    )


def explain(element: ValueElement, ctx: Context, row: list[float]) -> str:
    parts = []
    stage = ctx.stage()
    if element.stage.value == stage:
        parts.append(f"fits the {stage} stage")
    if ctx.role and element.roles:
        parts.append(f"made for the {ctx.role.replace('_', ' ')} role")
    if row[INDEX["is_detractor"]] and element.kind.value == "human_touch":
        parts.append(f"last NPS was {ctx.last_nps}")
    if ctx.open_tickets and element.kind.value in ("guide", "walkthrough", "video"):
        parts.append(f"{ctx.open_tickets} open support ticket(s)")
    if element.feature_area and not ctx.feature_usage.get(element.feature_area):
        parts.append(f"{element.feature_area} not used yet")
    parts.append(f"value weight {element.value_weight:g}")
    return "; ".join(parts)


class DecisionEngine:
    def __init__(self, ranker: Ranker, epsilon: float, seed: int | None = None) -> None:
        self.ranker = ranker
        self.policy = EpsilonGreedy(epsilon, random.Random(seed))
        self.elements: list[ValueElement] = []

    async def decide(
        self,
        session: AsyncSession,
        user_id: str,
        *,
        channel: Channel | None,
        limit: int,
        trigger: str | None = None,
    ) -> Decided:
        """Decide and add the decision log row to the session (the caller commits)."""
        started = time.perf_counter()
        user_row = await session.get(UserView, user_id)
        if user_row is None:
            raise UnknownUser(user_id)
        user = UserState.model_validate(user_row, from_attributes=True)
        account_row = await session.get(AccountView, user.account_id)
        account = (
            AccountState.model_validate(account_row, from_attributes=True) if account_row else None
        )
        now = datetime.now(UTC)
        ctx = context_of(user, account, now)
        verdicts = evaluate(self.elements, user, channel)
        eligible = [v.element for v in verdicts if v.excluded_by is None]
        for v in verdicts:
            if v.excluded_by:
                EXCLUSIONS.labels(v.excluded_by).inc()
        ranker = self.ranker  # one model for the whole decision, even if swapped meanwhile
        matrix = build_matrix(ctx, [facts(e) for e in eligible])
        scores = ranker.score(matrix).tolist() if eligible else []
        picks = self.policy.choose(scores, limit)
        decision_id = str(uuid.uuid4())
        items = []
        for rank, pick in enumerate(picks, start=1):
            element = eligible[pick.index]
            item_channel = channel or element.channels[0]
            items.append(
                DecidedItem(
                    element_id=element.id,
                    rank=rank,
                    channel=item_channel,
                    score=round(scores[pick.index], 6),
                    propensity=round(pick.propensity, 6),
                    reason=explain(element, ctx, matrix[pick.index].tolist()),
                    content=element.content(),
                )
            )
            DECISIONS.labels(element.id, item_channel.value, ranker.version).inc()
        message = DecisionMessage(
            decision_id=decision_id,
            user_id=user.user_id,
            account_id=user.account_id,
            role=Role(user.role) if user.role else None,
            created_at=now,
            trigger=trigger,
            model_version=ranker.version,
            items=items,
        )
        score_of = {e.id: scores[i] for i, e in enumerate(eligible)}
        row = DecisionRow(
            id=decision_id,
            user_id=user.user_id,
            account_id=user.account_id,
            created_at=now,
            channel=channel.value if channel else None,
            trigger=trigger,
            policy=self.policy.name,
            model_version=ranker.version,
            context={"stage": ctx.stage(), "features": context_vector(ctx)},
            candidates=[
                {
                    "element_id": v.element.id,
                    "excluded_by": v.excluded_by,
                    "detail": v.detail,
                    "score": score_of.get(v.element.id),
                }
                for v in verdicts
            ],
            chosen=[
                {
                    "element_id": i.element_id,
                    "rank": i.rank,
                    "score": i.score,
                    "propensity": i.propensity,
                    "channel": i.channel.value,
                }
                for i in items
            ],
        )
        session.add(row)
        DECISION_DURATION.observe(time.perf_counter() - started)
        return Decided(message, row)
