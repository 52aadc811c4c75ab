"""Drive a running NBV through its public HTTP APIs with the simulated world.

Each simulated week: billing, support, survey and CRM events, then each active person's
sessions; every session posts its product events, asks ``GET /v1/next-best-value`` for a card,
and reports what the person did with it (``POST /v1/responses``). The person's response is drawn
from the world's hidden response model; a completion also emits the element's achieved event.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel

from models.simulator.events import (
    Json,
    billing_events,
    champion_change,
    iso,
    onboarding_events,
    person_week_events,
)
from models.simulator.world import (
    Account,
    Fit,
    Person,
    build_world,
    on_completed,
    respond_probabilities,
    weekly_drift,
)
from services.decision.library import DEFAULT_LIBRARY, load_library

Policy = Literal["api", "random"]
MAX_BATCH = 500
RANDOM_LIMIT = 20
# How likely a person is to consider the card in each slot of the in-app list.
ATTENTION = (1.0, 0.6, 0.4)


class WeekSummary(BaseModel):
    week: int
    active_users: int
    sessions: int
    decisions: int
    empty: int
    clicked: int
    completed: int
    dismissed: int
    retained_users: float
    retained_accounts: float
    mean_satisfaction: float
    model_versions: dict[str, int]

    @property
    def success_rate(self) -> float:
        """Completed value elements per active user-week."""
        return self.completed / self.active_users if self.active_users else 0.0

    def line(self) -> str:
        versions = ",".join(f"{k}:{v}" for k, v in sorted(self.model_versions.items()))
        return (
            f"week {self.week:>2}  users {self.active_users:>4}  sessions {self.sessions:>4}  "
            f"decisions {self.decisions:>4}  clicked {self.clicked:>3}  "
            f"completed {self.completed:>3}  dismissed {self.dismissed:>3}  "
            f"success/user-wk {self.success_rate:.3f}  "
            f"retained {self.retained_users:.2f}  satisfaction {self.mean_satisfaction:+.2f}  "
            f"[{versions}]"
        )


@dataclass
class _Tally:
    sessions: int = 0
    decisions: int = 0
    empty: int = 0
    clicked: int = 0
    completed: int = 0
    dismissed: int = 0
    versions: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    decision_id: str
    cards: list[str]  # in slot order
    propensity: float  # of the first slot
    model_version: str


@dataclass(frozen=True)
class Shown:
    """The first card of a session, as the logging policy chose it (for the random policy the
    propensity is the simulator's own uniform choice); ``reward`` is 1 if it was completed."""

    decision_id: str
    user_id: str
    element_id: str
    propensity: float
    reward: float
    model_version: str


def library_fits(path: Path = DEFAULT_LIBRARY) -> tuple[dict[str, Fit], dict[str, str | None]]:
    """The element facts the response model reads, and each element's achieved event."""
    lib = load_library(path)
    fits = {
        e.id: Fit(
            kind=e.kind.value,
            stage=e.stage.value,
            feature_area=e.feature_area,
            roles=tuple(r.value for r in e.roles),
            effort_minutes=e.effort_minutes,
            value_weight=e.value_weight,
        )
        for e in lib.elements
    }
    return fits, {e.id: e.achieved_event for e in lib.elements}


class Simulation:
    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        seed: int,
        accounts: int,
        policy: Policy = "api",
        concurrency: int = 16,
        cards: int = 3,
        library: Path = DEFAULT_LIBRARY,
    ) -> None:
        self.cards = cards
        self._client = client
        self.seed = seed
        self.policy = policy
        self.world: list[Account] = build_world(seed, accounts)
        self.fits, self.achieved_event = library_fits(library)
        self._sem = asyncio.Semaphore(concurrency)
        self.week = 0
        self.shown: list[Shown] = []
        self._initial_users = sum(len(a.people) for a in self.world)

    # ------------------------------------------------------------ HTTP

    async def _post_events(self, events: Sequence[Json]) -> None:
        for i in range(0, len(events), MAX_BATCH):
            r = await self._client.post(
                "/v1/events/batch", json={"events": list(events[i : i + MAX_BATCH])}
            )
            r.raise_for_status()

    async def _respond(self, user_id: str, decision_id: str, element_id: str, outcome: str) -> None:
        body = {
            "user_id": user_id,
            "decision_id": decision_id,
            "element_id": element_id,
            "outcome": outcome,
            "channel": "in_app",
        }
        # Delivery puts the card in the inbox asynchronously; until then the API answers 404.
        for attempt in range(40):
            r = await self._client.post("/v1/responses", json=body)
            if r.status_code != 404:
                r.raise_for_status()
                return
            await asyncio.sleep(min(0.05 * (attempt + 1), 0.5))
        r.raise_for_status()

    async def _decide(self, user_id: str, rng: random.Random) -> Decision | None:
        limit = RANDOM_LIMIT if self.policy == "random" else self.cards
        r = await self._client.get(
            "/v1/next-best-value", params={"user_id": user_id, "limit": limit, "channel": "in_app"}
        )
        if r.status_code == 404:
            return None  # not projected yet
        r.raise_for_status()
        body = r.json()
        items: list[dict[str, Any]] = body["items"]
        if not items:
            return None
        decision_id = str(body["decision_id"])
        if self.policy == "random":
            picked = rng.sample(range(len(items)), min(self.cards, len(items)))
            cards = [str(items[i]["element_id"]) for i in picked]
            # The first slot's probability under uniform sampling without replacement.
            propensity = 1.0 / len(items)
            # The cards not picked were never seen: "not now" keeps them offerable later.
            await asyncio.gather(
                *(
                    self._respond(user_id, decision_id, i["element_id"], "snoozed")
                    for i in items
                    if i["element_id"] not in cards
                )
            )
        else:
            cards = [str(i["element_id"]) for i in items]
            propensity = float(items[0]["propensity"])
        return Decision(decision_id, cards, propensity, str(body["model_version"]))

    def _weeks_to_renewal(self, p: Person) -> int:
        acct = next(a for a in self.world if a.account_id == p.account_id)
        return acct.renewal_week - self.week

    def _react(self, p: Person, cards: Sequence[str], rng: random.Random) -> list[str]:
        """What the person does with each card: looks down the list (attention fades with
        position), acts on at most one, may dismiss some, ignores the rest."""
        outcomes = ["shown"] * len(cards)
        for slot, element_id in enumerate(cards):
            fit = self.fits.get(element_id)
            if fit is None:
                continue
            complete, clicked, dismissed = respond_probabilities(
                p, element_id, fit, self._weeks_to_renewal(p)
            )
            look = ATTENTION[min(slot, len(ATTENTION) - 1)]
            draw = rng.random()
            if draw < look * complete:
                outcomes[slot] = "completed"
                break
            if draw < look * (complete + clicked):
                outcomes[slot] = "clicked"
                break
            if draw < look * (complete + clicked + dismissed):
                outcomes[slot] = "dismissed"
        return outcomes

    async def _session(self, p: Person, events: list[Json], rng: random.Random, t: _Tally) -> None:
        await self._post_events(events)
        decided = await self._decide(p.user_id, rng)
        t.sessions += 1
        if decided is None:
            t.empty += 1
            return
        t.decisions += 1
        t.versions[decided.model_version] = t.versions.get(decided.model_version, 0) + 1
        outcomes = self._react(p, decided.cards, rng)
        for element_id in decided.cards:
            p.shown[element_id] = p.shown.get(element_id, 0) + 1
        p.fatigue += 1.0
        for element_id, outcome in zip(decided.cards, outcomes, strict=True):
            await self._respond(p.user_id, decided.decision_id, element_id, "shown")
            # An ignored card is put aside ("not now") rather than left open in the inbox,
            # where it would block the element from being offered again.
            await self._respond(
                p.user_id,
                decided.decision_id,
                element_id,
                "snoozed" if outcome == "shown" else outcome,
            )
            await self._apply(p, decided.decision_id, element_id, outcome, t)
        self.shown.append(
            Shown(
                decided.decision_id,
                p.user_id,
                decided.cards[0],
                decided.propensity,
                1.0 if outcomes[0] == "completed" else 0.0,
                decided.model_version,
            )
        )

    async def _apply(
        self, p: Person, decision_id: str, element_id: str, outcome: str, t: _Tally
    ) -> None:
        fit = self.fits.get(element_id)
        if outcome == "completed" and fit is not None:
            t.completed += 1
            p.completed.add(element_id)
            on_completed(p, fit)
            achieved = self.achieved_event.get(element_id)
            if achieved:
                await self._post_events(
                    [
                        {
                            "id": f"{decision_id}:{element_id}:achieved",
                            "source": "simulator",
                            "type": "product.track",
                            "time": iso(datetime.now(UTC)),
                            "account_id": p.account_id,
                            "user_id": p.user_id,
                            "payload": {"event": achieved, "feature_area": fit.feature_area},
                        }
                    ]
                )
        elif outcome == "clicked":
            t.clicked += 1
        elif outcome == "dismissed":
            t.dismissed += 1
            p.satisfaction = max(-1.0, p.satisfaction - 0.02)

    async def _person_week(self, p: Person, t: _Tally) -> None:
        rng = random.Random(f"person:{self.seed}:{p.user_id}:{self.week}")
        now = datetime.now(UTC)
        events, sessions = person_week_events(p, self.seed, self.week, now, rng)
        per_session = len(events) // sessions if sessions else 0
        async with self._sem:
            for s in range(sessions):
                chunk = events[s * per_session : (s + 1) * per_session]
                if s == sessions - 1:
                    chunk = events[s * per_session :]
                await self._session(p, chunk, rng, t)
            if sessions == 0 and events:
                await self._post_events(events)

    async def setup(self) -> None:
        now = datetime.now(UTC)
        events: list[Json] = []
        for acct in self.world:
            events.extend(onboarding_events(acct, self.seed, now))
        await self._post_events(events)

    async def run_week(self) -> WeekSummary:
        rng = random.Random(f"accounts:{self.seed}:{self.week}")
        now = datetime.now(UTC)
        events: list[Json] = []
        for acct in self.world:
            if acct.churned:
                continue
            events.extend(billing_events(acct, self.seed, self.week, now, rng))
            if rng.random() < 0.03:
                events.extend(champion_change(acct, self.seed, self.week, now, rng))
        await self._post_events(events)

        tally = _Tally()
        people = [p for a in self.world if not a.churned for p in a.people if p.active]
        await asyncio.gather(*(self._person_week(p, tally) for p in people))
        self._end_of_week(rng)
        summary = self._summary(tally, len(people))
        self.week += 1
        return summary

    def _end_of_week(self, rng: random.Random) -> None:
        for acct in self.world:
            if acct.churned:
                continue
            for p in acct.people:
                if not p.active:
                    continue
                weekly_drift(rng, p)
                if rng.random() < 0.01 + 0.12 * max(0.0, -p.satisfaction):
                    p.active = False  # stopped using the product
            if acct.renewal_week == self.week:
                active = [p for p in acct.people if p.active]
                mood = sum(p.satisfaction for p in active) / len(active) if active else -1.0
                if len(active) >= 0.5 * len(acct.people) and mood > -0.25:
                    acct.renewed += 1
                    acct.renewal_week += 52
                else:
                    acct.churned = True

    def _summary(self, t: _Tally, active_users: int) -> WeekSummary:
        people = [p for a in self.world for p in a.people]
        live = [p for a in self.world if not a.churned for p in a.people if p.active]
        return WeekSummary(
            week=self.week,
            active_users=active_users,
            sessions=t.sessions,
            decisions=t.decisions,
            empty=t.empty,
            clicked=t.clicked,
            completed=t.completed,
            dismissed=t.dismissed,
            retained_users=len(live) / max(1, self._initial_users),
            retained_accounts=sum(not a.churned for a in self.world) / max(1, len(self.world)),
            mean_satisfaction=sum(p.satisfaction for p in people) / max(1, len(people)),
            model_versions=t.versions,
        )


async def wait_projected(client: httpx.AsyncClient, user_ids: Sequence[str]) -> None:
    """Wait until the system has a view of these people (ingest is asynchronous)."""
    for user_id in user_ids:
        for _ in range(1_000_000):
            if (await client.get(f"/v1/users/{user_id}/view")).status_code != 404:
                break
            await asyncio.sleep(0.1)


async def simulate(
    url: str,
    *,
    accounts: int,
    weeks: int,
    seed: int,
    policy: Policy = "api",
    concurrency: int = 16,
    cards: int = 3,
    http_timeout_s: float = 30.0,
    on_week: Callable[[WeekSummary], None] | None = None,
    between_weeks: Callable[[int], Awaitable[None]] | None = None,
) -> tuple[list[WeekSummary], Simulation]:
    """Run ``weeks`` simulated weeks against the NBV at ``url``; ``between_weeks(w)`` runs after
    week ``w`` (the lift bench retrains and promotes the ranker there)."""
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=http_timeout_s, limits=limits) as client:
        sim = Simulation(
            client,
            seed=seed,
            accounts=accounts,
            policy=policy,
            concurrency=concurrency,
            cards=cards,
        )
        await sim.setup()
        async with asyncio.timeout(120):
            await wait_projected(client, [sim.world[-1].people[-1].user_id])
        summaries: list[WeekSummary] = []
        for w in range(weeks):
            summary = await sim.run_week()
            summaries.append(summary)
            if on_week is not None:
                on_week(summary)
            if between_weeks is not None and w < weeks - 1:
                await between_weeks(w)
        return summaries, sim
