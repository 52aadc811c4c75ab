"""A synthetic B2B SaaS world: accounts, people, their latent needs, and what they do each week.

Everything here is ground truth the real system never sees directly: it only sees the events
this world emits (product usage, support, billing, surveys, CRM changes). All randomness comes
from one seeded ``random.Random`` per concern, so the same seed yields the same world and the
same event ids whichever policy is being tested (common random numbers for a fair comparison).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from models.features import KINDS

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
# Which kinds of help each role tends to take up (the part a learner can pick up from role).
KIND_TASTE: dict[str, dict[str, float]] = {
    "end_user": {"video": 1.4, "walkthrough": 1.3, "quiz": 0.9, "guide": 0.6, "webinar": 0.5},
    "admin": {"guide": 1.4, "walkthrough": 0.9, "video": 0.6, "webinar": 0.8, "workbook": 0.6},
    "champion": {"workbook": 1.3, "walkthrough": 1.1, "webinar": 1.0, "guide": 0.9, "quiz": 0.8},
    "economic_buyer": {"case_study": 1.5, "guide": 0.7, "workbook": 0.8, "video": 0.9},
}

PLANS: dict[str, dict[str, Any]] = {
    "starter": {"mrr": (200.0, 900.0), "users": (2, 4), "share": 0.5},
    "growth": {"mrr": (1_500.0, 6_000.0), "users": (4, 8), "share": 0.35},
    "enterprise": {"mrr": (10_000.0, 40_000.0), "users": (8, 14), "share": 0.15},
}


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
    fatigue: float = 0.0
    active: bool = True
    shown: dict[str, int] = field(default_factory=dict)
    completed: set[str] = field(default_factory=set)

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


def _clip(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return min(hi, max(lo, x))


def need_of(role: str, sophistication: float, area: str) -> float:
    """A person needs help where the area matters to their job and they are not yet good at it."""
    return RELEVANCE[role].get(area, 0.1) * (1.0 - sophistication)


def new_person(rng: random.Random, user_id: str, account_id: str, role: str, tenure: int) -> Person:
    base = _clip(rng.gauss(0.15 + 0.03 * min(tenure, 20), 0.12), 0.0, 0.9)
    soph = {a: _clip(base + rng.gauss(0, 0.15)) for a in AREAS}
    taste = {k: KIND_TASTE[role].get(k, 0.5) * rng.uniform(0.8, 1.25) for k in KINDS}
    return Person(
        user_id=user_id,
        account_id=account_id,
        role=role,
        sophistication=soph,
        need={a: need_of(role, soph[a], a) for a in AREAS},
        kind_taste=taste,
        prefers_in_app=rng.random() < (0.75 if role in ("end_user", "champion") else 0.45),
        activity=rng.uniform(1.0, 4.0) if role != "economic_buyer" else rng.uniform(0.4, 1.5),
        tenure_weeks=tenure,
    )


def build_world(seed: int, n_accounts: int) -> list[Account]:
    rng = random.Random(f"world:{seed}")
    accounts: list[Account] = []
    plans = list(PLANS)
    for i in range(n_accounts):
        plan = rng.choices(plans, weights=[PLANS[p]["share"] for p in plans])[0]
        lo, hi = PLANS[plan]["users"]
        account_id = f"sim-{seed}-acct-{i:04d}"
        age = rng.randint(0, 60)
        people: list[Person] = []
        roles = ["champion", "admin", "economic_buyer"] + ["end_user"] * (rng.randint(lo, hi) - 1)
        for j, role in enumerate(roles):
            tenure = max(0, age - rng.randint(0, min(age, 20)))
            people.append(new_person(rng, f"{account_id}-u{j:03d}", account_id, role, tenure))
        accounts.append(
            Account(
                account_id=account_id,
                name=f"Simulated Co {i}",
                plan=plan,
                mrr=round(rng.uniform(*PLANS[plan]["mrr"]), 2),
                age_weeks=age,
                renewal_week=rng.randint(2, 30),
                people=people,
            )
        )
    return accounts


@dataclass(frozen=True)
class Fit:
    """The element facts the response model reads (from the library, by element id)."""

    kind: str
    stage: str
    feature_area: str | None
    roles: tuple[str, ...]
    effort_minutes: int
    value_weight: float


def utility(p: Person, el: Fit, weeks_to_renewal: int) -> float:
    """How much this element helps this person right now, in [0, ~1.5]: the hidden truth."""
    area = el.feature_area or "core"
    need = p.need[area]
    stage_fit = 1.0 if el.stage == p.true_stage(weeks_to_renewal) else 0.55
    role_fit = 1.0 if not el.roles or p.role in el.roles else 0.3
    # Beginners only finish short things; experts tolerate effort but gain little from basics.
    s = p.sophistication[area]
    effort_fit = math.exp(-el.effort_minutes / (15.0 + 60.0 * s))
    taste = p.kind_taste.get(el.kind, 0.5)
    return need * stage_fit * role_fit * (0.35 + 0.65 * effort_fit) * taste


def respond_probabilities(
    p: Person, element_id: str, el: Fit, weeks_to_renewal: int
) -> tuple[float, float, float]:
    """(P(completed), P(clicked only), P(dismissed)); the rest is 'shown' and ignored."""
    u = utility(p, el, weeks_to_renewal)
    fatigue = 1.0 / (1.0 + 0.12 * p.fatigue)
    repeat = 0.6 ** p.shown.get(element_id, 0)
    channel = 1.0 if p.prefers_in_app else 0.65
    engaged = _clip((0.08 + 0.9 * u) * fatigue * repeat * channel, 0.0, 0.95)
    complete = engaged * _clip(0.25 + 0.7 * u, 0.0, 0.9)
    clicked = engaged - complete
    # In-app cards are mostly ignored rather than dismissed (dismissal is permanent here).
    dismissed = _clip((1 - engaged) * (0.02 + 0.1 * (1 - min(u, 1.0)) + 0.01 * p.fatigue), 0, 0.4)
    return complete, clicked, dismissed


def on_completed(p: Person, el: Fit) -> None:
    area = el.feature_area or "core"
    p.sophistication[area] = _clip(p.sophistication[area] + 0.35 * (1 - p.sophistication[area]))
    p.need[area] = need_of(p.role, p.sophistication[area], area) * 0.7
    p.satisfaction = _clip(p.satisfaction + 0.15 * el.value_weight, -1.0, 1.0)


def weekly_drift(rng: random.Random, p: Person) -> None:
    """Needs move: people learn by doing, forget, and new needs appear."""
    p.tenure_weeks += 1
    p.fatigue *= 0.5
    for a in AREAS:
        s = _clip(p.sophistication[a] + rng.gauss(0.01, 0.03))
        p.sophistication[a] = s
        shock = 0.3 if rng.random() < 0.04 else 0.0  # a new project, a new feature released
        p.need[a] = _clip(0.7 * p.need[a] + 0.3 * need_of(p.role, s, a) + shock)
    unmet = sum(p.need.values()) / len(AREAS)
    p.satisfaction = _clip(p.satisfaction - 0.12 * (unmet - 0.2) - 0.01 * p.fatigue, -1.0, 1.0)
