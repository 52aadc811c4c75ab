"""Properties of the rules, the contact policy and arbitration, through the real decision
engine on the embedded store (each example in a transaction that is rolled back).

For any library (cool-downs drawn anew), decision rules, person, history of contacts and open
offers, and any sequence of decisions: an element a fired rule excludes, or the eligibility
rules rule out, is never offered; an element a fired rule requires is offered first whenever it
is eligible; a boost never changes the scores or the order of the elements it does not touch;
the caps per channel and per CSM and the cool-downs are never exceeded; and no element ever has
two open offers at once.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta, tzinfo
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncSession

from models.ranker import RulePrior
from services.decision import engine as engine_module
from services.decision.contact_policy import ContactLimits, ContactPolicy
from services.decision.decision_log import expand_candidates, write_decisions
from services.decision.engine import Decided, DecisionEngine, LibrarySnapshot
from services.decision.library import DEFAULT_LIBRARY, ValueElement, load_library
from services.decision.playbooks import Condition, PlaybookSet, Rule
from services.decision.policy import EpsilonGreedy
from services.decision.rules import evaluate, judge_library
from services.ingest.view import UserState
from shared.envelope import Channel, Role
from shared.store.db import create_engine, migrate, session_factory
from shared.store.models import AccountView, Contact, Delivery, InboxItem, UserView

T = TypeVar("T")
PROPS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)
LIBRARY = load_library(DEFAULT_LIBRARY).elements
IDS = [e.id for e in LIBRARY]
USER, ACCOUNT, CSM = "u-prop", "acct-prop", "csm-1"
DAY, WEEK = timedelta(days=1), timedelta(days=7)
CHANNELS = [c.value for c in Channel]
HOURS = [0.5, 2, 12, 23, 25, 47, 71, 73, 100, 150, 167, 169, 200]


class Store:
    """One embedded database and event loop for a test; examples roll back what they wrote."""

    def __init__(self, tmp: Path) -> None:
        self._runner = asyncio.Runner()
        url = f"sqlite+aiosqlite:///{tmp / 'store.sqlite'}"
        self.run(migrate(url))
        self._engine = create_engine(url)
        self.sessions = session_factory(self._engine)

    def run(self, work: Awaitable[T]) -> T:
        return self._runner.run(work)  # type: ignore[arg-type]

    def close(self) -> None:
        self.run(self._engine.dispose())
        self._runner.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = Store(tmp_path_factory.mktemp("decisions"))
    yield s
    s.close()


@dataclass
class Scenario:
    elements: list[ValueElement]
    rules: list[Rule]
    role: str | None
    achieved: set[str]
    dismissed: set[str]
    limits: ContactLimits
    # (element, channel, hours ago) of earlier offers; elements with an offer still open.
    offers: list[tuple[str, str, float]]
    open_cards: set[str]
    open_deliveries: set[str]
    # The decisions to make in a row: (requested channel, limit).
    requests: list[tuple[Channel | None, int]]
    epsilon: float
    seed: int
    boost: dict[str, float] = field(default_factory=dict)


never = Condition(fact="role", op="==", value="no-such-role")
subsets = st.lists(st.sampled_from(IDS), max_size=6, unique=True)


@st.composite
def rule_sets(draw: st.DrawFn) -> list[Rule]:
    rules = []
    for i in range(draw(st.integers(0, 3))):
        rules.append(
            Rule(
                name=f"r{i}",
                when=[never] if draw(st.integers(0, 4)) == 0 else [],
                require=draw(st.lists(st.sampled_from(IDS), max_size=2, unique=True)),
                exclude=draw(subsets),
                boost={e: draw(st.floats(0.1, 10)) for e in draw(subsets)},
            )
        )
    return rules


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    cooldowns = st.sampled_from([0, 0, 1, 3, 7])
    elements = [e.model_copy(update={"cooldown_days": draw(cooldowns)}) for e in LIBRARY]
    caps = st.integers(0, 4)
    limits = ContactLimits(
        cap_per_day={c: draw(caps) for c in draw(st.sets(st.sampled_from(CHANNELS)))},
        cap_per_week={c: draw(st.integers(0, 8)) for c in draw(st.sets(st.sampled_from(CHANNELS)))},
        dismissal_suppression=timedelta(hours=draw(st.sampled_from([0, 72]))),
        quiet_start=time(0),
        quiet_end=time(0, 1),
        csm_alerts_per_day=draw(st.integers(0, 3)),
    )
    offers = draw(
        st.lists(
            # Hours ago, away from the edges of the windows (24 h, 72 h, 7 d), which move by
            # the milliseconds between seeding and deciding.
            st.tuples(st.sampled_from(IDS), st.sampled_from(CHANNELS), st.sampled_from(HOURS)),
            max_size=12,
        )
    )
    return Scenario(
        elements=elements,
        rules=draw(rule_sets()),
        role=draw(st.none() | st.sampled_from([r.value for r in Role])),
        achieved=set(draw(subsets)),
        dismissed=set(draw(subsets)),
        limits=limits,
        offers=offers,
        open_cards=set(draw(subsets)),
        open_deliveries=set(draw(subsets)),
        requests=draw(
            st.lists(
                st.tuples(st.none() | st.sampled_from(list(Channel)), st.integers(1, 6)),
                min_size=1,
                max_size=3,
            )
        ),
        epsilon=draw(st.sampled_from([0.0, 0.3, 1.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def engine_for(s: Scenario, rules: list[Rule], epsilon: float) -> DecisionEngine:
    engine = DecisionEngine(
        RulePrior(),
        EpsilonGreedy(epsilon, random.Random(s.seed)),
        ContactPolicy(s.limits),
        PlaybookSet(rules=rules),
        csm_of=lambda account_id, account: CSM,
    )
    engine.library = LibrarySnapshot.of(1, s.elements)
    return engine


def _card(element: str, decision: str) -> InboxItem:
    return InboxItem(
        id=str(uuid.uuid4()),
        user_id=USER,
        account_id=ACCOUNT,
        element_id=element,
        decision_id=decision,
        rank=1,
        score=0.5,
        content={},
        status="pending",
    )


def _delivery(element: str, decision: str, channel: str) -> Delivery:
    return Delivery(
        id=f"{decision}:{element}:{channel}",
        decision_id=decision,
        user_id=USER,
        account_id=ACCOUNT,
        element_id=element,
        requested_channel=channel,
        channel=channel,
        status="pending",
        payload={},
    )


async def seed(session: AsyncSession, s: Scenario, now: datetime) -> None:
    at = (now - timedelta(days=3)).isoformat()
    session.add(
        UserView(
            user_id=USER,
            account_id=ACCOUNT,
            role=s.role,
            timezone="UTC",
            first_seen=now - timedelta(days=60),
            last_seen=now,
            achieved={e: at for e in s.achieved},
            dismissed={e: at for e in s.dismissed},
        )
    )
    session.add(AccountView(account_id=ACCOUNT, first_seen=now, last_seen=now))
    for i, (element, channel, hours) in enumerate(s.offers):
        session.add(
            Contact(
                decision_id=f"old-{i}",
                element_id=element,
                user_id=USER,
                account_id=ACCOUNT,
                csm_id=CSM,
                channel=channel,
                at=now - timedelta(hours=hours),
            )
        )
    for element in s.open_cards:
        session.add(_card(element, "old-card"))
    for element in s.open_deliveries:
        session.add(_delivery(element, "old-delivery", "email"))
    await session.flush()


async def decide_in_a_row(
    store: Store, s: Scenario, rules: list[Rule], epsilon: float, *, deliver: bool = True
) -> list[Decided]:
    """The scenario's decisions one after another; after each, delivery opens an offer for
    every item (a card or a pending send). Rolled back at the end."""
    engine = engine_for(s, rules, epsilon)
    decided: list[Decided] = []
    opened = set(s.open_cards) | set(s.open_deliveries)
    async with store.sessions() as session:
        await session.begin()
        try:
            await seed(session, s, datetime.now(UTC))
            for channel, limit in s.requests:
                connection = await session.connection()
                d = await engine.decide(connection, USER, channel=channel, limit=limit)
                await write_decisions(connection, [d.log], d.contacts)
                decided.append(d)
                if deliver:
                    for item in d.message.items:
                        if item.element_id in opened:
                            continue  # offered twice: the properties below say so
                        opened.add(item.element_id)
                        if item.channel is Channel.IN_APP:
                            session.add(_card(item.element_id, d.message.decision_id))
                        else:
                            session.add(
                                _delivery(
                                    item.element_id, d.message.decision_id, item.channel.value
                                )
                            )
                    await session.flush()
        finally:
            await session.rollback()
    return decided


def _fired(rules: list[Rule], d: Decided) -> list[Rule]:
    names = set(d.row.context["rules_fired"])
    return [r for r in rules if r.name in names]


def _user(s: Scenario) -> UserState:
    now = datetime.now(UTC)
    at = now.isoformat()
    return UserState(
        user_id=USER,
        account_id=ACCOUNT,
        role=s.role,
        first_seen=now,
        last_seen=now,
        updated_at=now,
        achieved=dict.fromkeys(s.achieved, at),
        dismissed=dict.fromkeys(s.dismissed, at),
    )


@PROPS
@given(scenarios())
def test_excluded_or_ineligible_elements_are_never_offered(store: Store, s: Scenario) -> None:
    for d in store.run(decide_in_a_row(store, s, s.rules, s.epsilon)):
        chosen = {i.element_id for i in d.message.items}
        excluded = {e for r in _fired(s.rules, d) for e in r.exclude}
        assert not chosen & excluded
        assert not chosen & (s.achieved | s.dismissed)
        ruled_out = {
            v.element.id
            for v in evaluate(
                s.elements, _user(s), Channel(d.row.channel) if d.row.channel else None
            )
            if v.excluded_by is not None
        }
        assert not chosen & ruled_out
        assert len(chosen) == len(d.message.items)  # never the same element twice


EVENTS = sorted({e.achieved_event for e in LIBRARY if e.achieved_event})


@PROPS
@given(
    s=scenarios(),
    tracked=st.lists(st.sampled_from([*EVENTS, "unrelated.event"]), max_size=4, unique=True),
    channel=st.sampled_from([None, *Channel]),
    unknown=st.booleans(),
)
def test_the_whole_library_is_judged_as_element_by_element(
    s: Scenario, tracked: list[str], channel: Channel | None, unknown: bool
) -> None:
    user = _user(s).model_copy(update={"track_events": dict.fromkeys(tracked, 1)})
    if unknown:  # the record may name elements the library no longer has, and many events
        user.achieved["gone"] = user.dismissed["gone-too"] = datetime.now(UTC).isoformat()
        user.track_events.update((f"custom.event-{i}", 1) for i in range(2 * len(EVENTS)))
    library = LibrarySnapshot.of(1, s.elements)
    judged = judge_library(
        library.gates, library.index, library.by_event, user, library.screen(channel, user.role)
    )
    fast = {v.element.id: (v.excluded_by, v.detail) for v in judged.verdicts}
    for rule, detail, ids in judged.screened:
        assert ids and not fast.keys() & set(ids)
        fast.update(dict.fromkeys(ids, (rule, detail)))
    slow = {v.element.id: (v.excluded_by, v.detail) for v in evaluate(s.elements, user, channel)}
    assert fast == slow
    order = [v.element.id for v in judged.verdicts]
    assert order == [e.id for e in s.elements if e.id in set(order)]  # library order


@PROPS
@given(scenarios())
def test_a_required_element_is_offered_first_whenever_it_is_eligible(
    store: Store, s: Scenario
) -> None:
    for (_, limit), d in zip(
        s.requests, store.run(decide_in_a_row(store, s, s.rules, s.epsilon)), strict=True
    ):
        required = {e for r in _fired(s.rules, d) for e in r.require}
        # Eligible: no rule, exclusion or contact rule stood in its way in this decision.
        eligible = {
            c["element_id"]
            for c in expand_candidates(d.row.candidates)
            if c["excluded_by"] is None and c["element_id"] in required
        }
        items = d.message.items
        if len(eligible) <= limit:
            assert eligible <= {i.element_id for i in items}
        forced = [i for i in items if i.element_id in eligible]
        # First, with certainty: they were not drawn by the exploration policy.
        assert [i.rank for i in forced] == list(range(1, len(forced) + 1))
        assert all(i.propensity == 1.0 for i in forced)


def _frozen(instant: datetime) -> type[datetime]:
    class Frozen(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> Frozen:
            return cls.fromtimestamp(instant.timestamp(), tz)

    return Frozen


@PROPS
@given(s=scenarios(), boost=st.dictionaries(st.sampled_from(IDS), st.floats(0.1, 10), max_size=8))
def test_boosts_never_reorder_the_elements_they_do_not_touch(
    store: Store, s: Scenario, boost: dict[str, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One instant for both runs: time-dependent features (days since…) then agree exactly.
    monkeypatch.setattr(engine_module, "datetime", _frozen(datetime.now(UTC)))
    # The same decisions without and with an extra rule boosting some elements; greedy, on the
    # inbox, where no cap ties the items of one decision together.
    # One decision: a second one would already differ through what the first one offered.
    s.requests = [(Channel.IN_APP, limit) for _, limit in s.requests[:1]]
    s.limits = ContactLimits(
        cap_per_day={},
        cap_per_week={},
        dismissal_suppression=s.limits.dismissal_suppression,
        quiet_start=s.limits.quiet_start,
        quiet_end=s.limits.quiet_end,
        csm_alerts_per_day=0,
    )
    booster = Rule(name="booster", boost=boost)
    plain = store.run(decide_in_a_row(store, s, s.rules, 0.0, deliver=False))
    boosted = store.run(decide_in_a_row(store, s, [*s.rules, booster], 0.0, deliver=False))
    for a, b in zip(plain, boosted, strict=True):
        final_a = {c["element_id"]: c.get("final") for c in expand_candidates(a.row.candidates)}
        final_b = {c["element_id"]: c.get("final") for c in expand_candidates(b.row.candidates)}
        untouched = [e for e in final_a if e not in boost]
        # Their scores are unchanged (so is their order) …
        assert all(final_b[e] == final_a[e] for e in untouched)
        # … and greedy picks of them, after the required ones, are still the best of them in
        # that order (ties by library order), however many slots the boosted ones took.
        required = {x for r in _fired(s.rules, b) for x in r.require}
        free = [e for e in untouched if final_a[e] is not None and e not in required]
        best = sorted(free, key=lambda e: -(final_a[e] or 0.0))  # stable: library order on ties
        picked = [i.element_id for i in b.message.items if i.element_id in free]
        assert picked == best[: len(picked)]


@PROPS
@given(scenarios())
def test_caps_and_cooldowns_hold_for_any_history_and_sequence(store: Store, s: Scenario) -> None:
    decided = store.run(decide_in_a_row(store, s, s.rules, s.epsilon))
    new = [(i.element_id, i.channel.value) for d in decided for i in d.message.items]
    per_channel = Counter(channel for _, channel in new)
    prior_day = Counter(c for _, c, hours in s.offers if hours < 24)
    prior_week = Counter(c for _, c, hours in s.offers if hours < 24 * 7)
    for channel, n in per_channel.items():
        if (cap := s.limits.cap_per_day.get(channel)) is not None:
            assert n <= max(0, cap - prior_day[channel]), (channel, "day")
        if (cap := s.limits.cap_per_week.get(channel)) is not None:
            assert n <= max(0, cap - prior_week[channel]), (channel, "week")
    # The CSM's alerts in 24 h (all of them to this person here).
    assert per_channel["csm"] <= max(0, s.limits.csm_alerts_per_day - prior_day["csm"])
    cooldown = {e.id: e.cooldown_days for e in s.elements}
    offered = Counter(element for element, _ in new)
    for element, n in offered.items():
        days = cooldown[element]
        if days:
            assert n == 1, element  # once, then cooling down
            assert not any(e == element and hours < 24 * days for e, _, hours in s.offers)


@PROPS
@given(scenarios())
def test_no_element_ever_has_two_open_offers(store: Store, s: Scenario) -> None:
    open_now = set(s.open_cards) | set(s.open_deliveries)
    for d in store.run(decide_in_a_row(store, s, s.rules, s.epsilon)):
        chosen = [i.element_id for i in d.message.items]
        assert not set(chosen) & open_now
        open_now |= set(chosen)
