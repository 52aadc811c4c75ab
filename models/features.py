"""Features of a (person in context × Value Element) pair, shared by serving and training.

The column order is part of a model artifact's contract: ``FEATURES`` is saved with every
model and checked when it loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import numpy.typing as npt

KINDS = (
    "walkthrough",
    "guide",
    "video",
    "case_study",
    "workbook",
    "quiz",
    "webinar",
    "human_touch",
)
STAGES = ("onboard", "engage", "monitor", "grow", "renew")
ROLES = ("end_user", "admin", "champion", "economic_buyer")

FEATURES: tuple[str, ...] = (
    "tenure_days",
    "days_since_seen",
    "log_events",
    "feature_breadth",
    "nps",
    "is_detractor",
    "open_tickets",
    "days_to_renewal",
    "n_achieved",
    "n_dismissed",
    "log_usage_7d",
    "usage_wow_change",
    "health_score",
    "sophistication",
    "past_due",
    "log_mrr",
    *(f"role_{r}" for r in ROLES),
    *(f"stage_now_{s}" for s in STAGES),
    "value_weight",
    "effort_minutes",
    *(f"kind_{k}" for k in KINDS),
    *(f"stage_{s}" for s in STAGES),
    "stage_match",
    "role_match",
    "area_usage",
    "rule_score",
)
INDEX = {name: i for i, name in enumerate(FEATURES)}


@dataclass(frozen=True)
class Context:
    """What the decision knows about the person right now (a snapshot of the view)."""

    now: datetime
    role: str | None
    first_seen: datetime
    last_seen: datetime
    event_count: int
    feature_usage: dict[str, int] = field(default_factory=dict)
    last_nps: int | None = None
    open_tickets: int = 0
    renewal_date: datetime | None = None
    n_achieved: int = 0
    n_dismissed: int = 0
    # From the richer view when it offers them (neutral defaults otherwise).
    usage_7d: float = 0.0
    usage_prev_7d: float = 0.0
    health_score: float | None = None  # 0..100
    sophistication: float | None = None  # 0..1
    past_due: bool = False
    mrr: float | None = None

    @property
    def usage_wow_change(self) -> float:
        """Week-over-week usage change in [-1, +inf); 0 when there is no previous week."""
        if self.usage_prev_7d <= 0:
            return 0.0
        return (self.usage_7d - self.usage_prev_7d) / self.usage_prev_7d

    @property
    def tenure_days(self) -> float:
        return max(0.0, (self.now - self.first_seen).total_seconds() / 86_400)

    @property
    def days_since_seen(self) -> float:
        return max(0.0, (self.now - self.last_seen).total_seconds() / 86_400)

    @property
    def days_to_renewal(self) -> float | None:
        if self.renewal_date is None:
            return None
        return (self.renewal_date - self.now).total_seconds() / 86_400

    def stage(self) -> str:
        """The lifecycle stage the person is in now (documented in docs/decision.md)."""
        to_renewal = self.days_to_renewal
        if to_renewal is not None and 0 <= to_renewal <= 120:
            return "renew"
        if (self.last_nps is not None and self.last_nps <= 6) or self.days_since_seen >= 14:
            return "monitor"
        if self.tenure_days < 30:
            return "onboard"
        if len(self.feature_usage) >= 4:
            return "grow"
        return "engage"


@dataclass(frozen=True)
class ElementFacts:
    """The element attributes the features use (kept apart from the library's schema)."""

    kind: str
    stage: str
    roles: Sequence[str]
    value_weight: float
    effort_minutes: int
    feature_area: str | None


def context_vector(ctx: Context) -> dict[str, float]:
    stage_now = ctx.stage()
    to_renewal = ctx.days_to_renewal
    values: dict[str, float] = {
        "tenure_days": ctx.tenure_days,
        "days_since_seen": ctx.days_since_seen,
        "log_events": math.log1p(ctx.event_count),
        "feature_breadth": float(len(ctx.feature_usage)),
        "nps": float(ctx.last_nps) if ctx.last_nps is not None else -1.0,
        "is_detractor": float(ctx.last_nps is not None and ctx.last_nps <= 6),
        "open_tickets": float(ctx.open_tickets),
        "days_to_renewal": to_renewal if to_renewal is not None else 999.0,
        "n_achieved": float(ctx.n_achieved),
        "n_dismissed": float(ctx.n_dismissed),
        "log_usage_7d": math.log1p(max(0.0, ctx.usage_7d)),
        "usage_wow_change": ctx.usage_wow_change,
        "health_score": ctx.health_score if ctx.health_score is not None else -1.0,
        "sophistication": ctx.sophistication if ctx.sophistication is not None else -1.0,
        "past_due": float(ctx.past_due),
        "log_mrr": math.log1p(max(0.0, ctx.mrr or 0.0)),
    }
    for r in ROLES:
        values[f"role_{r}"] = float(ctx.role == r)
    for s in STAGES:
        values[f"stage_now_{s}"] = float(stage_now == s)
    return values


def prior_factors(ctx: Context, el: ElementFacts) -> tuple[float, list[tuple[str, float]]]:
    """The prior's success odds (stage fit × need ÷ effort) and the factors it multiplied."""
    factors: list[tuple[str, float]] = []
    stage_fit = 1.0 if el.stage == ctx.stage() else 0.4
    factors.append(("stage_fit", stage_fit))
    need = 1.0
    if ctx.last_nps is not None and ctx.last_nps <= 6 and el.kind == "human_touch":
        need += 1.0
        factors.append(("need_detractor", 1.0))
    if ctx.open_tickets > 0 and el.kind in ("guide", "walkthrough", "video"):
        need += 0.5
        factors.append(("need_tickets", 0.5))
    if el.feature_area and ctx.feature_usage.get(el.feature_area, 0) == 0:
        need += 0.25
        factors.append(("need_unused_area", 0.25))
    if ctx.usage_wow_change <= -0.5 and el.stage in ("monitor", "engage"):
        need += 0.5
        factors.append(("need_usage_drop", 0.5))
    effort = 1 + el.effort_minutes / 60
    factors.append(("effort", 1 / effort))
    return stage_fit * need / effort, factors


def rule_score(ctx: Context, el: ElementFacts) -> float:
    """The documented prior: value × stage fit × need, discounted by effort."""
    odds, _ = prior_factors(ctx, el)
    return el.value_weight * odds


def build_matrix(ctx: Context, elements: Sequence[ElementFacts]) -> npt.NDArray[np.float64]:
    base = context_vector(ctx)
    stage_now = ctx.stage()
    rows = np.zeros((len(elements), len(FEATURES)), dtype=np.float64)
    context_cols = [INDEX[name] for name in base]
    rows[:, context_cols] = [base[name] for name in base]
    for i, el in enumerate(elements):
        row = rows[i]
        row[INDEX["value_weight"]] = el.value_weight
        row[INDEX["effort_minutes"]] = float(el.effort_minutes)
        row[INDEX[f"kind_{el.kind}"]] = 1.0
        row[INDEX[f"stage_{el.stage}"]] = 1.0
        row[INDEX["stage_match"]] = float(el.stage == stage_now)
        row[INDEX["role_match"]] = float(not el.roles or ctx.role in el.roles)
        row[INDEX["area_usage"]] = (
            math.log1p(ctx.feature_usage.get(el.feature_area, 0)) if el.feature_area else 0.0
        )
        row[INDEX["rule_score"]] = rule_score(ctx, el)
    return rows
