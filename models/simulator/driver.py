"""Drive a running NBV through its public HTTP APIs with the simulated world.

Each simulated week: billing, CRM (champions leaving, new seats, new customers), support and
survey events, then day by day each active person's sessions. A session posts its product
events, asks ``GET /v1/next-best-value`` for the in-app list, looks at the person's inbox for the
cards still open there (snoozed ones that came back, ones a playbook put there, ones clicked but
not finished), and reports what the person did with each card they looked at
(``POST /v1/responses``). The person's response is drawn from the world's hidden response model;
a completion also emits the element's achieved event.

Time: ``clock`` is the simulation's. With a ``SharedClock`` (the lift bench) the NBV process runs
on it and the simulator moves it one day at a time, so cool-downs, caps, snoozes, usage windows,
triggers and playbook delays all work in simulated time. With the ``WallClock`` (``nbv simulate``
against an NBV it did not start) the days of a week run back to back.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel

from models.simulator.clock import Clock, WallClock
from models.simulator.events import (
    Json,
    billing_events,
    champion_change,
    iso,
    milestone_events,
    new_hire,
    onboarding_events,
    person_week,
)
from models.simulator.truth import TruthLog, TruthRecord, hidden_p
from models.simulator.world import (
    PLANS,
    Account,
    Fit,
    Person,
    build_world,
    daily_rest,
    milestones_reached,
    new_account,
    on_completed,
    on_seen,
    respond_probabilities,
    weekly_drift,
)
from services.decision.library import DEFAULT_LIBRARY, load_library

Policy = Literal["api", "random"]
MAX_BATCH = 500
TRANSPORT_RETRIES = 4
RANDOM_LIMIT = 20
# How likely a person is to consider the card in each slot of the in-app widget.
ATTENTION = (1.0, 0.6, 0.4)
# Sessions start at this hour of each simulated day (outside the default quiet hours).
DAY_STARTS = timedelta(hours=9)
# New customers signing per week, as a share of the initial number of accounts.
NEW_ACCOUNTS_PER_WEEK = 0.04
CHAMPION_CHANGE_PER_WEEK = 0.03


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
    inbox_cards: int = 0  # older open cards the people looked at again

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
    inbox_cards: int = 0
    versions: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    decision_id: str
    cards: list[str]  # in slot order
    propensity: float  # of the first slot
    model_version: str


@dataclass(frozen=True)
class Card:
    decision_id: str
    element_id: str


@dataclass(frozen=True)
class Shown:
    """The first card of a session, as the logging policy chose it (for the random policy the
    propensity is the simulator's own uniform choice); ``reward`` is 1 if it was completed, in
    that session or later from the inbox (what the training export counts too)."""

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
        clock: Clock | None = None,
        settle_s: float = 0.3,
        truth: TruthLog | None = None,
    ) -> None:
        self.cards = cards
        # Where the hidden P(completed) of every element is written at each decision (analysis).
        self.truth = truth
        self.client = client
        self.seed = seed
        self.policy = policy
        self.clock: Clock = clock or WallClock()
        # After the clock moves, how long NBV's timers get to catch up (unsnoozes, sweeps).
        self.settle_s = settle_s
        self.world: list[Account] = build_world(seed, accounts)
        self.fits, self.achieved_event = library_fits(library)
        self._sem = asyncio.Semaphore(concurrency)
        self.week = 0
        self.start = self.clock.now()
        self._shown: dict[str, Shown] = {}
        self._initial_users = {p.user_id for a in self.world for p in a.people}
        self._initial_accounts = len(self.world)
        self._account = {a.account_id: a for a in self.world}
        # Elements whose achieved event people can reach by themselves: (event, area, stage).
        self.milestones = [
            (event, fit.feature_area, fit.stage)
            for element_id, fit in self.fits.items()
            if (event := self.achieved_event.get(element_id)) and fit.feature_area
        ]

    @property
    def shown(self) -> list[Shown]:
        return list(self._shown.values())

    # ------------------------------------------------------------ HTTP

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One API call. A dropped connection (a busy server closing an idle keep-alive one)
        or a server error is retried: every call here is idempotent (events and responses
        carry their ids)."""
        for attempt in range(TRANSPORT_RETRIES):
            last = attempt == TRANSPORT_RETRIES - 1
            try:
                r = await self.client.request(method, url, **kwargs)
            except httpx.TransportError:
                if last:
                    raise
            else:
                if r.status_code < 500 or last:
                    return r
            await asyncio.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _post_events(self, events: Sequence[Json]) -> None:
        now = iso(self.clock.now())
        stamped = [e if "time" in e else {**e, "time": now} for e in events]
        for i in range(0, len(stamped), MAX_BATCH):
            r = await self._request(
                "POST", "/v1/events/batch", json={"events": stamped[i : i + MAX_BATCH]}
            )
            r.raise_for_status()

    async def _respond(
        self,
        user_id: str,
        decision_id: str,
        element_id: str,
        outcome: str,
        *,
        labelled: bool = True,
    ) -> None:
        body: Json = {
            "user_id": user_id,
            "decision_id": decision_id,
            "element_id": element_id,
            "outcome": outcome,
            "channel": "in_app",
            "time": iso(self.clock.now()),
        }
        if labelled:
            body["id"] = f"sim-{uuid.uuid4()}"  # the same id on a retry: recorded once
        # Delivery puts the card in the inbox asynchronously; until then the API answers 404.
        for attempt in range(40):
            r = await self._request("POST", "/v1/responses", json=body)
            if r.status_code != 404:
                r.raise_for_status()
                return
            await asyncio.sleep(min(0.05 * (attempt + 1), 0.5))
        r.raise_for_status()

    async def _decide(self, user_id: str, rng: random.Random, slots: int) -> Decision | None:
        limit = RANDOM_LIMIT if self.policy == "random" else slots
        r = await self._request(
            "GET",
            "/v1/next-best-value",
            params={"user_id": user_id, "limit": limit, "channel": "in_app"},
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
            picked = rng.sample(range(len(items)), min(slots, len(items)))
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

    async def _open_cards(self, user_id: str) -> list[Card]:
        """The cards open in the person's inbox, newest first (as the widget lists them). The
        client-side random policy leaves the inbox alone: its unpicked cards were never seen."""
        if self.policy == "random":
            return []
        r = await self._request("GET", f"/v1/users/{user_id}/inbox")
        if r.status_code != 200:
            return []
        return [Card(str(c["decision_id"]), str(c["element_id"])) for c in r.json()["items"]]

    def _weeks_to_renewal(self, p: Person) -> int:
        return self._account[p.account_id].renewal_week - self.week

    def _react(self, p: Person, cards: Sequence[str], rng: random.Random) -> list[str]:
        """What the person does with the cards in view: looks down the list (attention fades
        with position), acts on at most one (completes or starts it), may dismiss some or put
        them off ("later": they come back tomorrow), and leaves the rest where they are."""
        outcomes = ["ignored"] * len(cards)
        for slot, element_id in enumerate(cards):
            fit = self.fits.get(element_id)
            if fit is None:
                continue
            complete, clicked, dismissed, later = respond_probabilities(
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
            elif draw < look * (complete + clicked + dismissed + later):
                outcomes[slot] = "snoozed"
        return outcomes

    async def _session(self, p: Person, rng: random.Random, t: _Tally) -> None:
        """The person opens the product: the widget shows their open cards and asks NBV for
        new ones to fill its free slots (new cards go on top)."""
        t.sessions += 1
        older = await self._open_cards(p.user_id)
        free = self.cards - len(older)
        decided = await self._decide(p.user_id, rng, free) if free > 0 else None
        fresh = [Card(decided.decision_id, e) for e in decided.cards] if decided else []
        if decided is not None:
            t.decisions += 1
            if self.truth is not None:
                self.truth.write(
                    TruthRecord(
                        decision_id=decided.decision_id,
                        user_id=p.user_id,
                        week=self.week,
                        p_completed=hidden_p(p, self.fits, self._weeks_to_renewal(p)),
                    )
                )
            t.versions[decided.model_version] = t.versions.get(decided.model_version, 0) + 1
        cards = (fresh + older)[: self.cards]
        t.inbox_cards += len(cards) - len(fresh)
        if not cards:
            t.empty += 1
            return
        outcomes = self._react(p, [c.element_id for c in cards], rng)
        for card in cards:
            on_seen(p, card.element_id, self.fits.get(card.element_id), self._weeks_to_renewal(p))
        for card, outcome in zip(cards, outcomes, strict=True):
            # Like widget.js on each page view: every session reports each card in view shown
            # (an impression, which impression capping counts), without an id of its own, so
            # NBV's default key makes all of them one "shown" label.
            await self._respond(
                p.user_id, card.decision_id, card.element_id, "shown", labelled=False
            )
            if outcome != "ignored":
                await self._respond(p.user_id, card.decision_id, card.element_id, outcome)
            await self._apply(p, card, outcome, t)
        if decided is not None:
            self._shown[decided.decision_id] = Shown(
                decided.decision_id,
                p.user_id,
                decided.cards[0],
                decided.propensity,
                1.0 if outcomes[0] == "completed" else 0.0,
                decided.model_version,
            )

    async def _apply(self, p: Person, card: Card, outcome: str, t: _Tally) -> None:
        fit = self.fits.get(card.element_id)
        if outcome == "completed" and fit is not None:
            t.completed += 1
            p.completed.add(card.element_id)
            on_completed(p, fit)
            first = self._shown.get(card.decision_id)
            if first is not None and first.element_id == card.element_id:
                self._shown[card.decision_id] = replace(first, reward=1.0)
            achieved = self.achieved_event.get(card.element_id)
            if achieved:
                await self._post_events(
                    [
                        {
                            "id": f"{card.decision_id}:{card.element_id}:achieved",
                            "source": "simulator",
                            "type": "product.track",
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

    async def _person_day(self, p: Person, sessions: int, rng: random.Random, t: _Tally) -> None:
        async with self._sem:
            for _ in range(sessions):
                await self._session(p, rng, t)

    async def setup(self) -> None:
        self.start = self.clock.now()
        events: list[Json] = []
        for acct in self.world:
            events.extend(onboarding_events(acct, self.seed, self.start, self.milestones))
        await self._post_events(events)

    def _day(self, day: int) -> datetime:
        return self.start + timedelta(days=7 * self.week + day) + DAY_STARTS

    def _grow(self, rng: random.Random, now: datetime) -> list[Json]:
        """Who leaves, joins and signs this week (before the week's billing is sent)."""
        events: list[Json] = []
        for acct in list(self.world):
            if acct.churned:
                continue
            if rng.random() < CHAMPION_CHANGE_PER_WEEK:
                events.extend(champion_change(acct, self.seed, self.week, now, rng))
            if rng.random() < PLANS[acct.plan]["hiring"]:
                events.extend(new_hire(acct, self.seed, self.week, now, rng))
        expected = NEW_ACCOUNTS_PER_WEEK * self._initial_accounts
        for _ in range(int(expected) + (rng.random() < expected - int(expected))):
            acct = new_account(rng, self.seed, len(self.world), 0, self.week + 52)
            self.world.append(acct)
            self._account[acct.account_id] = acct
            events.extend(onboarding_events(acct, self.seed, now, self.milestones))
        return events

    async def run_week(self) -> WeekSummary:
        await self._advance(self._day(0))
        rng = random.Random(f"accounts:{self.seed}:{self.week}")
        now = self.clock.now()
        events = self._grow(rng, now)
        for acct in self.world:
            if not acct.churned:
                events.extend(billing_events(acct, self.seed, self.week, now, rng))
        people = [p for a in self.world if not a.churned for p in a.people if p.active]
        plans = {
            p.user_id: person_week(
                p,
                self.seed,
                self.week,
                random.Random(f"person:{self.seed}:{p.user_id}:{self.week}"),
            )
            for p in people
        }
        for p in people:
            events.extend(plans[p.user_id].background)
            reached = milestones_reached(rng, p, self.milestones)
            events.extend(milestone_events(p, reached, f"sim{self.seed}-w{self.week}", None))
        await self._post_events(events)

        tally = _Tally()
        reactions = {
            p.user_id: random.Random(f"react:{self.seed}:{p.user_id}:{self.week}") for p in people
        }
        for day in range(7):
            if day:
                await self._advance(self._day(day))
                for p in people:
                    daily_rest(p)
            # The day's product usage first (sessions then only read and answer cards).
            today = {
                p.user_id: [e for d, e in plans[p.user_id].sessions if d == day] for p in people
            }
            await self._post_events([e for sessions in today.values() for s in sessions for e in s])
            await asyncio.gather(
                *(
                    self._person_day(p, len(today[p.user_id]), reactions[p.user_id], tally)
                    for p in people
                    if today[p.user_id]
                )
            )
        self._end_of_week(rng)
        summary = self._summary(tally, len(people))
        self.week += 1
        return summary

    async def _advance(self, when: datetime) -> None:
        if await self.clock.advance_to(when):
            await asyncio.sleep(self.settle_s)

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
        live = {p.user_id for a in self.world if not a.churned for p in a.people if p.active}
        initial = self.world[: self._initial_accounts]
        return WeekSummary(
            week=self.week,
            active_users=active_users,
            sessions=t.sessions,
            decisions=t.decisions,
            empty=t.empty,
            clicked=t.clicked,
            completed=t.completed,
            dismissed=t.dismissed,
            retained_users=len(live & self._initial_users) / max(1, len(self._initial_users)),
            retained_accounts=sum(not a.churned for a in initial) / max(1, len(initial)),
            mean_satisfaction=sum(p.satisfaction for p in people) / max(1, len(people)),
            model_versions=t.versions,
            inbox_cards=t.inbox_cards,
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
    clock: Clock | None = None,
    settle_s: float = 0.3,
    api_key: str | None = None,
    truth: TruthLog | None = None,
) -> tuple[list[WeekSummary], Simulation]:
    """Run ``weeks`` simulated weeks against the NBV at ``url``; ``between_weeks(w)`` runs after
    week ``w`` (the lift bench retrains and promotes the ranker there). ``clock``: the NBV
    process's, when it runs on a ``SharedClock`` (default: the wall clock). ``api_key``: sent
    as ``Authorization: Bearer`` (it needs events:write, decisions:read and responses:write).
    ``truth``: where the world's hidden truth at each decision is written (analysis only)."""
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(
        base_url=url, timeout=http_timeout_s, limits=limits, headers=headers
    ) as client:
        sim = Simulation(
            client,
            seed=seed,
            accounts=accounts,
            policy=policy,
            concurrency=concurrency,
            cards=cards,
            clock=clock,
            settle_s=settle_s,
            truth=truth,
        )
        return await run(sim, weeks, on_week=on_week, between_weeks=between_weeks), sim


async def run(
    sim: Simulation,
    weeks: int,
    *,
    on_week: Callable[[WeekSummary], None] | None = None,
    between_weeks: Callable[[int], Awaitable[None]] | None = None,
) -> list[WeekSummary]:
    """Set the world up in NBV and run ``weeks`` simulated weeks of it."""
    await sim.setup()
    async with asyncio.timeout(120):
        await wait_projected(sim.client, [sim.world[-1].people[-1].user_id])
    summaries: list[WeekSummary] = []
    for w in range(weeks):
        summary = await sim.run_week()
        summaries.append(summary)
        if on_week is not None:
            on_week(summary)
        if between_weeks is not None and w < weeks - 1:
            await between_weeks(w)
    return summaries
