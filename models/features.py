"""Features of a (person in context × Value Element) pair, shared by serving and training.

The column order is part of a model artifact's contract: ``FEATURES`` is saved with every
model and checked when it loads.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

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
# The product's feature areas, as the tracking plan names them (``feature_area`` of product
# events, support tickets and library elements). An element outside these has no area column.
AREAS = (
    "core",
    "integrations",
    "automation",
    "reporting",
    "admin",
    "api",
    "collaboration",
    "billing",
)
# "Never" for the days-since features: far beyond any contact-history horizon.
NEVER_DAYS = 999.0
# The person's answers to earlier cards, as rates. A handful of cards says little, so a
# person's overall rate is shrunk towards a population prior, and their rate for one kind of
# element towards their own overall rate (``RESPONSE_PRIOR_CARDS`` pseudo-cards each): a kind
# they have not seen yet reads as their average, one they always ignored drifts down from it
# as the evidence grows. The priors are round figures of the rates the lift bench's arms log
# (a card is engaged with — clicked or completed — about one time in five, completed one in
# ten, dismissed one in ten); they only set where an unknown person starts.
RESPONSE_PRIOR_CARDS = 2.0
PRIOR_ENGAGED = 0.2
PRIOR_COMPLETED = 0.1
PRIOR_DISMISSED = 0.1

# The person's answers to earlier cards (``Context.kind_responses``): overall (context
# columns), then for the element's kind (element columns).
RESPONSE_CONTEXT = ("cards_seen", "engaged_rate", "completed_rate", "dismissed_rate")
RESPONSE_KIND = (
    "kind_seen",
    "kind_engaged_rate",
    "kind_completed_rate",
    "kind_dismissed_rate",
    "kind_taste",
)
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
    "offers_7d",
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
    *(f"area_{a}" for a in AREAS),
    "area_share",
    "area_sophistication",
    "area_questions",
    "times_offered",
    "days_since_offered",
    "area_achieved",
    "area_dismissed",
    "kind_achieved",
    "kind_dismissed",
    "area_usage_7d",
    "area_share_7d",
    "area_trend",
    "days_since_area_question",
    *RESPONSE_CONTEXT,
    *RESPONSE_KIND,
    # The element's stage against the person's situation, which ``stage_match`` reduces to
    # one stage by fixed thresholds: days to renewal for a renew-stage element, days since
    # first seen for an onboarding one (NEVER_DAYS for elements of other stages).
    "renew_days",
    "onboard_days",
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
    # Per feature area, from the view: its sophistication score (0..1, services.ingest.summary)
    # and the support tickets the person opened about it.
    area_sophistication: dict[str, float] = field(default_factory=dict)
    area_questions: dict[str, int] = field(default_factory=dict)
    # Per feature area, what is under way now: product usage in the last 7 days and in the 7
    # before, and days since the person's newest support ticket about it (absent: none kept).
    area_usage_7d: dict[str, int] = field(default_factory=dict)
    area_usage_prev_7d: dict[str, int] = field(default_factory=dict)
    area_question_days: dict[str, float] = field(default_factory=dict)
    # From the decision log's contacts within the contact-history horizon: element id ->
    # (times offered to this person, days since the last offer); and all offers in 7 days.
    offer_history: dict[str, tuple[int, float]] = field(default_factory=dict)
    offers_7d: int = 0
    # How the person answered earlier offers, by the feature area and by the kind of the
    # elements: (achieved, dismissed) counts.
    area_outcomes: dict[str, tuple[int, int]] = field(default_factory=dict)
    kind_outcomes: dict[str, tuple[int, int]] = field(default_factory=dict)
    # How the person answered the cards they saw, by kind of element, from the view's newest
    # responses: (cards seen, engaged with: clicked or completed, completed, dismissed).
    kind_responses: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    @property
    def usage_wow_change(self) -> float:
        """Week-over-week usage change in [-1, +inf); 0 when there is no previous week."""
        if self.usage_prev_7d <= 0:
            return 0.0
        return (self.usage_7d - self.usage_prev_7d) / self.usage_prev_7d

    @property
    def responses_overall(self) -> tuple[int, int, int, int]:
        """``kind_responses`` summed over the kinds."""
        totals = [0, 0, 0, 0]
        for counts in self.kind_responses.values():
            for j, n in enumerate(counts):
                totals[j] += n
        return totals[0], totals[1], totals[2], totals[3]

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
    element_id: str = ""  # keys the person's offer history


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
        "offers_7d": float(ctx.offers_7d),
    }
    for r in ROLES:
        values[f"role_{r}"] = float(ctx.role == r)
    for s in STAGES:
        values[f"stage_now_{s}"] = float(stage_now == s)
    seen, engaged, completed, dismissed = ctx.responses_overall
    values["cards_seen"] = float(seen)
    values["engaged_rate"] = _shrunk(engaged, seen, PRIOR_ENGAGED)
    values["completed_rate"] = _shrunk(completed, seen, PRIOR_COMPLETED)
    values["dismissed_rate"] = _shrunk(dismissed, seen, PRIOR_DISMISSED)
    return values


def _shrunk(hits: float, cards: float, prior: float) -> float:
    """``hits / cards`` with RESPONSE_PRIOR_CARDS pseudo-cards at rate ``prior``."""
    return (hits + RESPONSE_PRIOR_CARDS * prior) / (cards + RESPONSE_PRIOR_CARDS)


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


def build_matrix(
    ctx: Context, elements: Sequence[ElementFacts], base: Mapping[str, float] | None = None
) -> npt.NDArray[np.float64]:
    """One row per element. Filled column by column: the per-context parts of the prior and
    of the area features are computed once, not once per element (this runs on every
    decision, over every eligible element). ``base``: ``context_vector(ctx)``, if the caller
    has it already; the element columns derived from context columns (the kind's rates, the
    stage against renewal and tenure) read them from it, so the export, which passes the
    logged ones, rebuilds them exactly."""
    n = len(elements)
    rows = np.zeros((n, len(FEATURES)), dtype=np.float64)
    if not n:
        return rows
    if base is None:
        base = context_vector(ctx)
    rows[:, _columns_of(tuple(base))] = np.fromiter(base.values(), np.float64, len(base))
    stage_now = ctx.stage()
    usage = ctx.feature_usage
    total_usage = sum(usage.values())
    total_recent = sum(ctx.area_usage_7d.values())
    # The prior's needs that depend on the person only (see prior_factors).
    detractor = ctx.last_nps is not None and ctx.last_nps <= 6
    tickets = ctx.open_tickets > 0
    usage_drop = ctx.usage_wow_change <= -0.5
    index = np.arange(n)
    rows[index, [INDEX[f"kind_{el.kind}"] for el in elements]] = 1.0
    rows[index, [INDEX[f"stage_{el.stage}"] for el in elements]] = 1.0
    area_rows = [i for i, el in enumerate(elements) if f"area_{el.feature_area}" in INDEX]
    rows[area_rows, [INDEX[f"area_{elements[i].feature_area}"] for i in area_rows]] = 1.0
    # The area (kind) columns depend on the element only through its area (kind): once per
    # area (kind) met.
    by_area: dict[str | None, tuple[float, ...]] = {}
    by_kind: dict[str, tuple[float, ...]] = {}
    rates = (base["engaged_rate"], base["completed_rate"], base["dismissed_rate"])
    # The stage against the situation, from the context columns (as logged, in the export).
    renew_days, onboard_days = base["days_to_renewal"], base["tenure_days"]
    values: list[tuple[float, ...]] = []
    for el in elements:
        area = el.feature_area
        of_area = by_area.get(area)
        if of_area is None:
            of_area = by_area[area] = _area_columns(ctx, area, total_usage, total_recent)
        of_kind = by_kind.get(el.kind)
        if of_kind is None:
            of_kind = by_kind[el.kind] = _kind_columns(ctx, el.kind, rates)
        need = 1.0
        if detractor and el.kind == "human_touch":
            need += 1.0
        if tickets and el.kind in ("guide", "walkthrough", "video"):
            need += 0.5
        if area and not usage.get(area, 0):
            need += 0.25
        if usage_drop and el.stage in ("monitor", "engage"):
            need += 0.5
        stage_fit = 1.0 if el.stage == stage_now else 0.4
        kind_achieved, kind_dismissed = ctx.kind_outcomes.get(el.kind, (0, 0))
        values.append(
            (  # in the order of _ELEMENT_COLUMNS
                el.value_weight,
                el.effort_minutes,
                el.stage == stage_now,
                not el.roles or ctx.role in el.roles,
                el.value_weight * (stage_fit * need / (1 + el.effort_minutes / 60)),
                *ctx.offer_history.get(el.element_id, (0, NEVER_DAYS)),
                kind_achieved,
                kind_dismissed,
                *of_area,
                *of_kind,
                renew_days if el.stage == "renew" else NEVER_DAYS,
                onboard_days if el.stage == "onboard" else NEVER_DAYS,
            )
        )
    # Flattened first: numpy converts rows of mixed bools, ints and floats at half the speed.
    rows[:, _ELEMENT_INDEX] = np.fromiter(
        itertools.chain.from_iterable(values), np.float64, n * len(_ELEMENT_INDEX)
    ).reshape(n, len(_ELEMENT_INDEX))
    return rows


@functools.lru_cache(maxsize=16)
def _columns_of(names: tuple[str, ...]) -> npt.NDArray[np.intp]:
    # The context columns' positions: the same few key orders on every decision.
    return np.array([INDEX[name] for name in names], dtype=np.intp)


def _kind_columns(ctx: Context, kind: str, rates: tuple[float, float, float]) -> tuple[float, ...]:
    """The kind's response columns (in the order of _ELEMENT_COLUMNS): the person's rates for
    the kind, each shrunk towards their overall rate (``rates``: engaged, completed,
    dismissed), and the engaged rate relative to the overall one — the person's own taste for
    the kind, apart from how much attention they give cards at all (trust, the channel, being
    busy scale every kind alike)."""
    seen, engaged, completed, dismissed = ctx.kind_responses.get(kind, (0, 0, 0, 0))
    engaged_rate = _shrunk(engaged, seen, rates[0])
    return (
        seen,
        engaged_rate,
        _shrunk(completed, seen, rates[1]),
        _shrunk(dismissed, seen, rates[2]),
        engaged_rate / rates[0] if rates[0] > 0 else 1.0,
    )


def _area_columns(
    ctx: Context, area: str | None, total_usage: float, total_recent: float
) -> tuple[float, ...]:
    """The area columns of an element of ``area`` (in the order of _ELEMENT_COLUMNS)."""
    achieved, dismissed = ctx.area_outcomes.get(area or "", (0, 0))
    if not area:
        return (0.0, 0.0, 0.0, 0, achieved, dismissed, 0.0, 0.0, 0.0, NEVER_DAYS)
    used = ctx.feature_usage.get(area, 0)
    week = ctx.area_usage_7d.get(area, 0)
    return (
        math.log1p(used),
        used / total_usage if total_usage else 0.0,
        ctx.area_sophistication.get(area, 0.0),
        ctx.area_questions.get(area, 0),
        achieved,
        dismissed,
        math.log1p(week),
        week / total_recent if week else 0.0,
        math.log1p(week) - math.log1p(ctx.area_usage_prev_7d.get(area, 0)),
        min(ctx.area_question_days.get(area, NEVER_DAYS), NEVER_DAYS),
    )


# The per-element columns build_matrix fills, in the order it computes them: the element's
# own, then those of its area.
_ELEMENT_COLUMNS = (
    "value_weight",
    "effort_minutes",
    "stage_match",
    "role_match",
    "rule_score",
    "times_offered",
    "days_since_offered",
    "kind_achieved",
    "kind_dismissed",
    "area_usage",
    "area_share",
    "area_sophistication",
    "area_questions",
    "area_achieved",
    "area_dismissed",
    "area_usage_7d",
    "area_share_7d",
    "area_trend",
    "days_since_area_question",
    *RESPONSE_KIND,
    "renew_days",
    "onboard_days",
)
_ELEMENT_INDEX = np.array([INDEX[name] for name in _ELEMENT_COLUMNS], dtype=np.intp)


def offer_history(ctx: Context, offers: Iterable[tuple[str, datetime]]) -> Context:
    """``ctx`` with the person's offer history: ``offers`` are (element id, when offered), from
    the decision log's contacts (every channel) within the contact-history horizon."""
    counts: dict[str, int] = {}
    last: dict[str, datetime] = {}
    recent = 0
    for element_id, at in offers:
        counts[element_id] = counts.get(element_id, 0) + 1
        if element_id not in last or at > last[element_id]:
            last[element_id] = at
        if (ctx.now - at).total_seconds() < 7 * 86_400:
            recent += 1
    history = {
        e: (n, max(0.0, (ctx.now - last[e]).total_seconds() / 86_400)) for e, n in counts.items()
    }
    return replace(ctx, offer_history=history, offers_7d=recent)


def past_outcomes(
    ctx: Context,
    achieved: Iterable[str],
    dismissed: Iterable[str],
    elements: Mapping[str, ElementFacts],
    responses: Iterable[Mapping[str, Any]] = (),
) -> Context:
    """``ctx`` with the person's earlier answers (element ids they achieved and dismissed)
    counted by feature area and by kind of element, and their ``responses`` (the view's
    newest: {decision_id, element_id, outcome, …}) counted per card (a decision's element) by
    kind; ids not in ``elements`` are skipped."""
    by_area: dict[str, list[int]] = {}
    by_kind: dict[str, list[int]] = {}
    for column, ids in ((0, achieved), (1, dismissed)):
        for element_id in ids:
            el = elements.get(element_id)
            if el is None:
                continue
            if el.feature_area:
                by_area.setdefault(el.feature_area, [0, 0])[column] += 1
            by_kind.setdefault(el.kind, [0, 0])[column] += 1
    return replace(
        ctx,
        area_outcomes={k: (v[0], v[1]) for k, v in by_area.items()},
        kind_outcomes={k: (v[0], v[1]) for k, v in by_kind.items()},
        kind_responses=kind_responses(responses, elements),
    )


def kind_responses(
    responses: Iterable[Mapping[str, Any]], elements: Mapping[str, ElementFacts]
) -> dict[str, tuple[int, int, int, int]]:
    """Per kind of element: (cards seen, engaged with, completed, dismissed). A card is one
    element of one decision, whatever number of responses it got (shown, then clicked, then
    completed counts once in each column it reached)."""
    # One pass over the responses (this runs on every decision): each card's outcomes as bits.
    cards: dict[tuple[object, object], int] = {}
    card, bit_of = cards.get, _OUTCOME_BITS.get
    for r in responses:
        bit = bit_of(r["outcome"], 0)
        if bit:
            key = (r["decision_id"], r["element_id"])
            cards[key] = card(key, 0) | bit
    out: dict[str, list[int]] = {}
    for (_, element_id), bits in cards.items():
        el = elements.get(str(element_id))
        if el is None:
            continue
        counts = out.get(el.kind)
        if counts is None:
            counts = out[el.kind] = [0, 0, 0, 0]
        counts[0] += 1
        counts[1] += bits & _ENGAGED > 0
        counts[2] += bits & _COMPLETED > 0
        counts[3] += bits & _DISMISSED > 0
    return {k: (v[0], v[1], v[2], v[3]) for k, v in out.items()}


# A card's responses as bits; any of these says the person saw it. A snooze does not: a client
# may snooze cards it never displayed (the simulator's random arm snoozes those it did not pick).
_COMPLETED, _DISMISSED, _CLICKED, _SHOWN = 1, 2, 4, 8
_ENGAGED = _COMPLETED | _CLICKED
_OUTCOME_BITS: dict[object, int] = {
    "completed": _COMPLETED,
    "dismissed": _DISMISSED,
    "clicked": _CLICKED,
    "shown": _SHOWN,
}
