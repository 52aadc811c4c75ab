"""A synthetic B2B SaaS world: accounts, people, their latent needs, and how they respond.

Everything here is ground truth the real system never sees directly: it only sees the events
this world emits (product usage by feature area, support tickets, billing, surveys, CRM
changes) and the responses people report. All randomness comes from seeded ``random.Random``
instances, one per concern, so the same seed yields the same world and the same event ids
whichever policy is being tested (common random numbers for a fair comparison).

What drives a response (``respond_probabilities``) is the hidden fit of an element to the
person *now*: their need in the element's feature area (how much the area matters to their job
× how far they are from mastering it, plus the projects they are in the middle of), the fit with
their true lifecycle stage and role, the effort against their skill, and their taste for the
kind of help; damped by fatigue (cards seen in the last days), by seeing the very same card
again, and by a preference for e-mail over in-app. Needs move: people learn by doing and by
completing elements, forget a little, start projects in new areas, and new people join.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from models.features import AREAS, KINDS

# How much each role cares about each area: needs are only real where the job is.
RELEVANCE: dict[str, dict[str, float]] = {
    "end_user": {"core": 1.0, "collaboration": 0.9, "automation": 0.6, "reporting": 0.4},
    "admin": {"admin": 1.0, "integrations": 0.9, "api": 0.8, "billing": 0.5, "core": 0.4},
    "champion": {
        "core": 0.8,
        "collaboration": 0.9,
        "automation": 0.8,
        "reporting": 0.8,
        "integrations": 0.5,
    },
    "economic_buyer": {"reporting": 1.0, "billing": 0.9, "admin": 0.3},
}
# Which kinds of help each role tends to take up.
KIND_TASTE: dict[str, dict[str, float]] = {
    "end_user": {"video": 1.4, "walkthrough": 1.3, "quiz": 0.9, "guide": 0.6, "webinar": 0.5},
    "admin": {"guide": 1.4, "walkthrough": 0.9, "video": 0.6, "webinar": 0.8, "workbook": 0.6},
    "champion": {"workbook": 1.3, "walkthrough": 1.1, "webinar": 1.0, "guide": 0.9, "quiz": 0.8},
    "economic_buyer": {"case_study": 1.5, "guide": 0.7, "workbook": 0.8, "video": 0.9},
}

PLANS: dict[str, dict[str, Any]] = {
    "starter": {"mrr": (200.0, 900.0), "users": (2, 4), "share": 0.5, "hiring": 0.03},
    "growth": {"mrr": (1_500.0, 6_000.0), "users": (4, 8), "share": 0.35, "hiring": 0.08},
    "enterprise": {"mrr": (10_000.0, 40_000.0), "users": (8, 14), "share": 0.15, "hiring": 0.2},
}
# What a person needs at a given time is mostly what they are working on: projects start in
# the areas their job uses, last a few weeks, and make the area's need jump (they struggle with
# it, use it more, ask support about it). The rest is a background need where they are weak.
PROJECT_RATE = 0.35
PROJECT_END = 0.25  # weekly chance a project ends on its own
MAX_PROJECTS = 2
PROJECT_NEED = 0.7
BACKGROUND_NEED = 0.2
# People differ in what kind of help they take up (lognormal spread around their role's taste).
TASTE_SPREAD = 0.45
# How readily people put off a card that is for them but not needed now ("later").
LATER = 0.4
# Cards of no use to the person now (utility below USELESS) cost some of their trust in the
# cards; a completed one gives some back.
USELESS = 0.08
TRUST_LOST = 0.93
TRUST_REGAINED = 0.1
# How much likelier a person is to close a card for each time they have looked at it already:
# the same card in the widget session after session is the first thing people clear away.
TIRED_OF_IT = 0.12
# Product milestones people reach by themselves once good enough in the area, by stage.
MILESTONE_SKILL = {"onboard": 0.45, "engage": 0.7, "grow": 0.9}
# Share of fatigue left after a day without cards.
FATIGUE_KEPT_PER_DAY = 0.7


@dataclass
class Person:
    user_id: str
    account_id: str
    role: str
    sophistication: dict[str, float]
    need: dict[str, float]
    kind_taste: dict[str, float]
    prefers_in_app: bool
    activity: float  # mean sessions per week
    tenure_weeks: int
    satisfaction: float = 0.0
    fatigue: float = 0.0  # cards seen lately, fading day by day
    trust: float = 1.0  # how much attention they still give the cards at all
    active: bool = True
    shown: dict[str, int] = field(default_factory=dict)
    completed: set[str] = field(default_factory=set)
    projects: set[str] = field(default_factory=set)  # areas of the projects under way
    milestones: set[str] = field(default_factory=set)  # product milestones reached
    tickets: list[str] = field(default_factory=list)  # open support tickets

    def true_stage(self, weeks_to_renewal: int) -> str:
        if 0 <= weeks_to_renewal <= 8:
            return "renew"
        if self.satisfaction < -0.3:
            return "monitor"
        if self.tenure_weeks < 4:
            return "onboard"
        relevant = [a for a in RELEVANCE[self.role] if RELEVANCE[self.role][a] >= 0.5]
        if relevant and min(self.sophistication[a] for a in relevant) > 0.55:
            return "grow"
        return "engage"


@dataclass
class Account:
    account_id: str
    name: str
    plan: str
    mrr: float
    age_weeks: int
    renewal_week: int  # simulated week of the next renewal
    people: list[Person]
    churned: bool = False
    renewed: int = 0
    tickets: int = 0
    hired: int = 0


def _clip(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return min(hi, max(lo, x))


def need_of(role: str, sophistication: float, area: str) -> float:
    """A person needs help where the area matters to their job and they are not yet good at it."""
    return RELEVANCE[role].get(area, 0.1) * (1.0 - sophistication)


def background_need(p: Person, area: str) -> float:
    return BACKGROUND_NEED * need_of(p.role, p.sophistication[area], area)


def start_project(rng: random.Random, p: Person) -> None:
    areas = [a for a in RELEVANCE[p.role] if a not in p.projects]
    if not areas or len(p.projects) >= MAX_PROJECTS:
        return
    area = rng.choices(areas, weights=[RELEVANCE[p.role][a] for a in areas])[0]
    p.projects.add(area)
    p.need[area] = _clip(max(p.need[area], background_need(p, area)) + PROJECT_NEED)


def new_person(rng: random.Random, user_id: str, account_id: str, role: str, tenure: int) -> Person:
    # Skill grows with time in the areas the job uses; elsewhere people stay beginners.
    aptitude = rng.gauss(1.0, 0.3)
    soph = {
        a: _clip(
            rng.gauss(0.1, 0.08) + aptitude * 0.025 * min(tenure, 24) * RELEVANCE[role].get(a, 0.1)
        )
        for a in AREAS
    }
    taste = {k: KIND_TASTE[role].get(k, 0.5) * rng.lognormvariate(0.0, TASTE_SPREAD) for k in KINDS}
    p = Person(
        user_id=user_id,
        account_id=account_id,
        role=role,
        sophistication=soph,
        need={a: BACKGROUND_NEED * need_of(role, soph[a], a) for a in AREAS},
        kind_taste=taste,
        prefers_in_app=rng.random() < (0.75 if role in ("end_user", "champion") else 0.45),
        activity=rng.uniform(1.0, 4.0) if role != "economic_buyer" else rng.uniform(0.4, 1.5),
        tenure_weeks=tenure,
    )
    # Someone new is onboarding onto the product: that is their project.
    if tenure < 4 or rng.random() < PROJECT_RATE:
        start_project(rng, p)
    return p


def new_account(rng: random.Random, seed: int, index: int, age: int, renewal_week: int) -> Account:
    plans = list(PLANS)
    plan = rng.choices(plans, weights=[PLANS[p]["share"] for p in plans])[0]
    lo, hi = PLANS[plan]["users"]
    account_id = f"sim-{seed}-acct-{index:04d}"
    people: list[Person] = []
    roles = ["champion", "admin", "economic_buyer"] + ["end_user"] * (rng.randint(lo, hi) - 1)
    for j, role in enumerate(roles):
        tenure = max(0, age - rng.randint(0, min(age, 20)))
        people.append(new_person(rng, f"{account_id}-u{j:03d}", account_id, role, tenure))
    return Account(
        account_id=account_id,
        name=f"Simulated Co {index}",
        plan=plan,
        mrr=round(rng.uniform(*PLANS[plan]["mrr"]), 2),
        age_weeks=age,
        renewal_week=renewal_week,
        people=people,
    )


def build_world(seed: int, n_accounts: int) -> list[Account]:
    rng = random.Random(f"world:{seed}")
    return [
        new_account(rng, seed, i, age=rng.randint(0, 40), renewal_week=rng.randint(2, 30))
        for i in range(n_accounts)
    ]


@dataclass(frozen=True)
class Fit:
    """The element facts the response model reads (from the library, by element id)."""

    kind: str
    stage: str
    feature_area: str | None
    roles: tuple[str, ...]
    effort_minutes: int
    value_weight: float


def _area(p: Person, el: Fit) -> str:
    """The area an element works on; one without an area meets the person's biggest need."""
    if el.feature_area in p.need:
        return el.feature_area
    return max(AREAS, key=lambda a: p.need[a])


def relevance(p: Person, el: Fit) -> float:
    """How much the element is for this person at all (whatever they need now), in [0, 1]."""
    role_fit = 1.0 if not el.roles or p.role in el.roles else 0.3
    area = RELEVANCE[p.role].get(el.feature_area, 0.05) if el.feature_area else 0.5
    return role_fit * area


def utility(p: Person, el: Fit, weeks_to_renewal: int) -> float:
    """How much this element helps this person right now, in [0, ~1.5]: the hidden truth."""
    area = _area(p, el)
    need = p.need[area]
    if el.feature_area is None:
        need *= 0.6  # generic help fits a need less well than help made for it
    stage_fit = 1.0 if el.stage == p.true_stage(weeks_to_renewal) else 0.55
    role_fit = 1.0 if not el.roles or p.role in el.roles else 0.3
    # Beginners only finish short things; experts tolerate effort but gain little from basics.
    s = p.sophistication[area]
    effort_fit = math.exp(-el.effort_minutes / (15.0 + 60.0 * s))
    taste = p.kind_taste.get(el.kind, 0.5)
    return need * stage_fit * role_fit * (0.35 + 0.65 * effort_fit) * taste


def respond_probabilities(
    p: Person, element_id: str, el: Fit, weeks_to_renewal: int
) -> tuple[float, float, float, float]:
    """(P(completed), P(clicked only), P(dismissed), P(put off until later)) of a card the
    person looks at; the rest of the time they let it be."""
    u = utility(p, el, weeks_to_renewal)
    seen = p.shown.get(element_id, 0)
    fatigue = 1.0 / (1.0 + 0.12 * p.fatigue)
    repeat = 0.6**seen
    channel = 1.0 if p.prefers_in_app else 0.65
    engaged = _clip((0.03 + 0.9 * u) * fatigue * repeat * channel * p.trust, 0.0, 0.95)
    complete = engaged * _clip(0.2 + 0.8 * u, 0.0, 0.9)
    clicked = engaged - complete
    # People dismiss what is not for them (an area their job does not use, another role's
    # task), for good; what is for them but not now they leave or put off, until they have
    # seen it too often.
    dismissed = (1 - engaged) * _clip(
        0.03 + 0.35 * (1.0 - relevance(p, el)) + TIRED_OF_IT * seen, 0, 0.8
    )
    later = (1 - engaged - dismissed) * LATER * relevance(p, el)
    return complete, clicked, dismissed, later


def on_seen(p: Person, element_id: str, el: Fit | None = None, weeks_to_renewal: int = 99) -> None:
    """The person looked at the card. A card seen for the first time adds to fatigue; one that
    is of no use to them now also teaches them to skip the cards (trust regrows with useful
    ones)."""
    if element_id not in p.shown:
        p.fatigue += 1.0
        if el is not None and utility(p, el, weeks_to_renewal) < USELESS:
            p.trust *= TRUST_LOST
    p.shown[element_id] = p.shown.get(element_id, 0) + 1


def on_completed(p: Person, el: Fit) -> None:
    area = _area(p, el)
    p.sophistication[area] = _clip(p.sophistication[area] + 0.3 * (1 - p.sophistication[area]))
    p.need[area] *= 0.4  # the help met most of the need
    p.projects.discard(area)  # and unblocked the project
    p.satisfaction = _clip(p.satisfaction + 0.15 * el.value_weight, -1.0, 1.0)
    p.trust = min(1.0, p.trust + TRUST_REGAINED)


def daily_rest(p: Person) -> None:
    p.fatigue *= FATIGUE_KEPT_PER_DAY


def weekly_drift(rng: random.Random, p: Person) -> None:
    """Needs move: people learn by doing, forget a little, finish projects and start new ones."""
    p.tenure_weeks += 1
    for a in AREAS:
        # Practice in the areas the job uses; a little forgetting elsewhere.
        practice = 0.02 * RELEVANCE[p.role].get(a, 0.0) + (0.04 if a in p.projects else 0.0)
        p.sophistication[a] = _clip(p.sophistication[a] + practice + rng.gauss(-0.005, 0.02))
    for area in sorted(p.projects):
        if rng.random() < PROJECT_END:
            p.projects.discard(area)
    for a in AREAS:
        floor = background_need(p, a)
        if a in p.projects:
            p.need[a] = _clip(max(0.8 * p.need[a], floor + 0.5 * PROJECT_NEED))
        else:
            p.need[a] = _clip(floor + 0.4 * max(0.0, p.need[a] - floor))
    if rng.random() < PROJECT_RATE:
        start_project(rng, p)
    unmet = sum(p.need.values()) / len(AREAS)
    p.satisfaction = _clip(p.satisfaction - 0.12 * (unmet - 0.15) - 0.01 * p.fatigue, -1.0, 1.0)


def milestones_reached(
    rng: random.Random, p: Person, milestones: Sequence[tuple[str, str, str]]
) -> list[str]:
    """The product milestones (achieved events of elements: event, area, stage) the person
    reaches by themselves now that they are good enough in the area."""
    reached: list[str] = []
    for event, area, stage in milestones:
        skill = MILESTONE_SKILL.get(stage)
        if event in p.milestones or skill is None:
            continue
        if p.sophistication.get(area, 0.0) > skill + rng.gauss(0.0, 0.1):
            p.milestones.add(event)
            reached.append(event)
    return reached
