"""Read-time figures of the single customer view, as of a moment (``now`` for the API).

The stored state holds counts per day and raw facts; windows, tenure, days to renewal,
sophistication and the scores are derived here so they are right at the moment they are read.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Literal

from pydantic import BaseModel

from services.ingest import health, windows
from services.ingest.health import Score
from services.ingest.view import AccountState, UserState, ViewConfig

Level = Literal["novice", "intermediate", "expert"]
# Distinct events in an area and uses of it at which breadth / depth reach 1.0.
TARGET_AREA_EVENTS = 5
TARGET_AREA_USES = 50
TARGET_SUPPORT_QUESTIONS = 3


class Usage(BaseModel):
    events_1d: int
    events_7d: int
    events_28d: int
    active_days_7d: int
    active_days_28d: int
    week_over_week_pct: float | None


class Sophistication(BaseModel):
    score: float
    level: Level
    breadth: float
    depth: float
    quiz: float | None
    support_questions: int


class UserSummary(BaseModel):
    as_of: datetime
    usage: Usage
    feature_breadth: int
    feature_depth: dict[str, int]
    days_since_seen: float
    tenure_days: float
    sophistication: dict[str, Sophistication]
    csat_average: float | None
    achieved: list[str]
    pending: list[str]
    dismissed: list[str]


class UserViewOut(UserState):
    summary: UserSummary


class AccountSummary(BaseModel):
    as_of: datetime
    usage: Usage
    daily_active_users_7d: float
    open_tickets: int
    tickets_30d: int
    worst_open_priority: str | None
    days_to_renewal: float | None
    tenure_days: float
    csat_average: float | None
    health: Score
    engagement: Score


class AccountViewOut(AccountState):
    summary: AccountSummary


def usage(daily: dict[str, int], now: datetime) -> Usage:
    today = now.date()
    return Usage(
        events_1d=windows.total(daily, today, 1),
        events_7d=windows.total(daily, today, 7),
        events_28d=windows.total(daily, today, 28),
        active_days_7d=windows.active_days(daily, today, 7),
        active_days_28d=windows.active_days(daily, today, 28),
        week_over_week_pct=windows.week_over_week(daily, today),
    )


def sophistication(user: UserState) -> dict[str, Sophistication]:
    """Per feature area: 40 % breadth, 40 % depth, 20 % quiz results (breadth/depth mean when
    no quiz), minus up to 0.1 for support questions about the area."""
    result: dict[str, Sophistication] = {}
    areas = set(user.area_events) | set(user.quiz_scores) | set(user.support_questions)
    for area in sorted(areas):
        events = user.area_events.get(area, {})
        breadth = min(1.0, len(events) / TARGET_AREA_EVENTS)
        depth = min(1.0, math.log1p(sum(events.values())) / math.log1p(TARGET_AREA_USES))
        quiz_sum, quiz_n = user.quiz_scores.get(area, [0.0, 0.0])
        quiz = quiz_sum / quiz_n if quiz_n else None
        questions = user.support_questions.get(area, 0)
        score = (
            0.4 * breadth
            + 0.4 * depth
            + 0.2 * (quiz if quiz is not None else (breadth + depth) / 2)
        )
        score -= 0.1 * min(1.0, questions / TARGET_SUPPORT_QUESTIONS)
        score = round(max(0.0, min(1.0, score)), 3)
        level: Level = "novice" if score < 0.34 else "intermediate" if score < 0.67 else "expert"
        result[area] = Sophistication(
            score=score,
            level=level,
            breadth=round(breadth, 3),
            depth=round(depth, 3),
            quiz=None if quiz is None else round(quiz, 3),
            support_questions=questions,
        )
    return result


def pending(user: UserState) -> list[str]:
    """Offered (shown, clicked or snoozed) and neither completed nor dismissed since."""
    return sorted(
        e
        for e, at in user.offered.items()
        if e not in user.achieved and (e not in user.dismissed or at > user.dismissed[e])
    )


def _days(delta_seconds: float) -> float:
    return round(delta_seconds / 86_400, 2)


def user_summary(user: UserState, now: datetime) -> UserSummary:
    return UserSummary(
        as_of=now,
        usage=usage(user.daily_usage, now),
        feature_breadth=len(user.area_events),
        feature_depth={a: sum(e.values()) for a, e in sorted(user.area_events.items())},
        days_since_seen=_days((now - user.last_seen).total_seconds()),
        tenure_days=_days((now - user.first_seen).total_seconds()),
        sophistication=sophistication(user),
        csat_average=round(user.csat_sum / user.csat_count, 2) if user.csat_count else None,
        achieved=sorted(user.achieved),
        pending=pending(user),
        dismissed=sorted(user.dismissed),
    )


def account_summary(account: AccountState, now: datetime, config: ViewConfig) -> AccountSummary:
    ranks = [health.PRIORITY_RANK.get(p, 1) for p in account.open_tickets.values()]
    worst = max(ranks, default=None)
    by_rank = {v: k for k, v in health.PRIORITY_RANK.items()}
    started = account.contract_signed_at or account.first_seen
    h = health.health(
        account, now, config.health_weights, config.health_red_below, config.health_green_from
    )
    return AccountSummary(
        as_of=now,
        usage=usage(account.daily_usage, now),
        daily_active_users_7d=round(
            windows.total(account.daily_active_users, now.date(), 7) / 7, 2
        ),
        open_tickets=len(account.open_tickets),
        tickets_30d=windows.total(account.tickets_daily, now.date(), 30),
        worst_open_priority=None if worst is None else by_rank[worst],
        days_to_renewal=(
            None
            if account.renewal_date is None
            else _days((account.renewal_date - now).total_seconds())
        ),
        tenure_days=_days((now - started).total_seconds()),
        csat_average=(
            round(account.csat_sum / account.csat_count, 2) if account.csat_count else None
        ),
        health=h,
        engagement=health.engagement(account, now, config.engagement_weights),
    )
