"""The decision: read the view, apply the eligibility rules, the decision rules and the contact
policy, rank what is left, arbitrate, explore, log, and say why."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from models.features import (
    Context,
    ElementFacts,
    build_matrix,
    context_vector,
    offer_history,
    past_outcomes,
)
from models.ranker import Ranker
from models.routing import ServingModels
from services.decision.arbitration import (
    RuleEffects,
    apply_rules,
    decision_facts,
    final_scores,
)
from services.decision.contact_policy import (
    ContactPolicy,
    Exclusion,
    contact_history,
    csm_alerts_last_day,
    history_horizon,
)
from services.decision.explain import model_reasons, prior_reasons, reason
from services.decision.library import Stage, ValueElement
from services.decision.person import read_person
from services.decision.playbooks import PlaybookSet
from services.decision.policy import Exploration, Pick
from services.decision.rules import Gate, Verdict, gate, judge, screen
from services.ingest.summary import sophistication as area_sophistication
from services.ingest.view import AccountState, UserState
from services.ingest.windows import total as usage_total
from shared.contracts import DecidedItem, DecisionMessage, ElementContent
from shared.envelope import Channel, Role
from shared.metrics import DECISION_DURATION, DECISIONS, EXCLUSIONS, MODEL_DECISIONS
from shared.store.models import DecisionRow

# Channels × the roles a view holds, with room to spare.
MAX_SCREENS = 64


class UnknownUser(LookupError):
    pass


@dataclass(frozen=True)
class Decided:
    message: DecisionMessage
    # The ``decisions`` row to write (a dict: the log is written with Core) and its
    # ``contacts`` rows, one per offered item (services.decision.decision_log).
    log: dict[str, Any]
    contacts: list[dict[str, Any]]
    # Set when nothing could be offered only because of quiet hours: when to try again.
    deferred_until: datetime | None = None

    @property
    def row(self) -> DecisionRow:
        """The log row as a (transient) model."""
        return DecisionRow(**self.log)


def facts(e: ValueElement) -> ElementFacts:
    return ElementFacts(
        kind=e.kind.value,
        stage=e.stage.value,
        roles=[r.value for r in e.roles],
        value_weight=e.value_weight,
        effort_minutes=e.effort_minutes,
        feature_area=e.feature_area,
        element_id=e.id,
    )


@dataclass(frozen=True)
class LibrarySnapshot:
    """The library as served: replaced as a whole (one reference swap) when it changes."""

    version: int | None
    elements: tuple[ValueElement, ...]
    by_id: dict[str, ValueElement] = field(default_factory=dict)
    element_facts: dict[str, ElementFacts] = field(default_factory=dict)
    # What the eligibility rules read, in the order of ``elements``.
    gates: tuple[Gate, ...] = ()
    # What / Why / How as served, built once per library rather than per offered item.
    contents: dict[str, ElementContent] = field(default_factory=dict)
    # How far back the contact policy looks (the longest cool-down).
    horizon: timedelta = field(default_factory=lambda: history_horizon(()))
    # ``rules.screen`` of ``gates`` per (channel, role), filled as they are met.
    screens: dict[tuple[Channel | None, str | None], tuple[Verdict | None, ...]] = field(
        default_factory=dict
    )

    @classmethod
    def of(cls, version: int | None, elements: Sequence[ValueElement]) -> LibrarySnapshot:
        return cls(
            version,
            tuple(elements),
            {e.id: e for e in elements},
            {e.id: facts(e) for e in elements},
            tuple(gate(e) for e in elements),
            {e.id: e.content() for e in elements},
            history_horizon(elements),
        )

    def screen(self, channel: Channel | None, role: str | None) -> tuple[Verdict | None, ...]:
        screened = self.screens.get((channel, role))
        if screened is None:
            screened = screen(self.gates, channel, role)
            # Roles come from the view: a bound keeps unexpected ones from growing it.
            if len(self.screens) < MAX_SCREENS:
                self.screens[(channel, role)] = screened
        return screened


def _num(obj: object, name: str) -> float | None:
    value = getattr(obj, name, None)
    return float(value) if isinstance(value, int | float) else None


def _sophistication(user: UserState) -> float | None:
    """Mean quiz score over the feature areas the person was quizzed on (0..1)."""
    scores = getattr(user, "quiz_scores", None) or {}
    pairs = [v for v in scores.values() if isinstance(v, list | tuple) and len(v) == 2 and v[1]]
    if not pairs:
        return None
    return sum(float(s) / float(n) for s, n in pairs) / len(pairs)


def context_of(user: UserState, account: AccountState | None, now: datetime) -> Context:
    """The view as the features see it. Fields the view may not have yet are read defensively."""
    daily = getattr(user, "daily_usage", None) or {}
    today = now.date()
    health = _num(user, "health_score")
    if health is None and account is not None:
        health = _num(account, "health_score")
    # Per-area recency: usage this week and the week before, days since the newest ticket.
    week_before = today - timedelta(days=7)
    by_area = user.area_daily_usage
    area_7d: dict[str, int] = {}
    area_prev_7d: dict[str, int] = {}
    for area, days in by_area.items():
        if n := usage_total(days, today, 7):
            area_7d[area] = n
        if n := usage_total(days, week_before, 7):
            area_prev_7d[area] = n
    asked = user.area_last_question
    question_days = {
        area: round(max(0.0, (now - datetime.fromisoformat(at)).total_seconds() / 86_400), 3)
        for area, at in asked.items()
    }
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
        usage_7d=float(usage_total(daily, today, 7)),
        usage_prev_7d=float(usage_total(daily, today - timedelta(days=7), 7)),
        health_score=health,
        sophistication=_sophistication(user),
        past_due=bool(account and account.subscription_status == "past_due"),
        mrr=account.mrr if account else None,
        area_sophistication={a: s.score for a, s in area_sophistication(user).items()},
        area_questions=dict(user.support_questions),
        area_usage_7d=area_7d,
        area_usage_prev_7d=area_prev_7d,
        area_question_days=question_days,
    )


CsmOf = Callable[[str, AccountState | None], str | None]


@dataclass(slots=True)
class _Candidate:
    element: ValueElement
    excluded_by: str | None = None
    detail: str = ""
    channel: Channel | None = None
    score: float | None = None
    p_success: float | None = None
    lever: float = 1.0
    final: float | None = None


class DecisionEngine:
    def __init__(
        self,
        ranker: Ranker,
        exploration: Exploration,
        contact: ContactPolicy,
        playbooks: PlaybookSet | None = None,
        csm_of: CsmOf | None = None,
        explain_items: int = 1,
    ) -> None:
        self.explain_items = explain_items
        # Each of these is replaced by reference (hot reload); a decision reads each once.
        # The champion, and the challenger with its share of people (models.routing).
        self.models = ServingModels(ranker)
        self.library = LibrarySnapshot.of(None, [])
        self.playbooks = playbooks or PlaybookSet()
        self.policy = exploration
        self.contact = contact
        self._csm_of: CsmOf = csm_of or (lambda account_id, account: None)

    @property
    def ranker(self) -> Ranker:
        """The champion (a person may be routed to the challenger: ``models.for_user``)."""
        return self.models.champion

    @property
    def elements(self) -> tuple[ValueElement, ...]:
        return self.library.elements

    async def decide(
        self,
        connection: AsyncConnection,
        user_id: str,
        *,
        channel: Channel | None,
        limit: int,
        trigger: str | None = None,
        only: Sequence[str] | None = None,
        decision_id: str | None = None,
    ) -> Decided:
        """Decide for one person from what ``connection`` reads; the caller logs the result
        (``decision_log.write_decisions``), which also drops it if the person was erased
        meanwhile.

        ``only`` restricts the candidates (a playbook step offers its one element, still
        subject to every rule and the contact policy)."""
        started = time.perf_counter()
        now = datetime.now(UTC)
        library, playbooks = self.library, self.playbooks
        # One round trip for the person, their account, preferences and contact history.
        person = await read_person(connection, user_id, now - library.horizon)
        if person is None:
            raise UnknownUser(user_id)
        user, account = person.user, person.account
        ranker = self.models.for_user(user.user_id)
        ctx = context_of(user, account, now)
        elements = (
            list(library.elements)
            if only is None
            else [library.by_id[i] for i in only if i in library.by_id]
        )
        effects = apply_rules(playbooks.rules, decision_facts(ctx, account, trigger))
        csm_id = self._csm_of(user.account_id, account)
        wants_csm = channel is Channel.CSM or (
            channel is None and any(Channel.CSM in e.channels for e in elements)
        )
        history = contact_history(
            self.contact.limits,
            offers=person.offers,
            open_elements=person.open_elements,
            user_timezone=user.timezone,
            channels=person.channels,
            quiet_hours=person.quiet_hours,
            dismissed=user.dismissed,
            csm_id=csm_id,
            csm_load=(
                await csm_alerts_last_day(connection, csm_id, now)
                if wants_csm and csm_id is not None
                else 0
            ),
        )
        ctx = offer_history(ctx, [(o.element_id, o.at) for o in history.offers])
        ctx = past_outcomes(
            ctx, user.achieved, user.dismissed, library.element_facts, user.interventions
        )

        # In library order, for the log: the eligibility rules' verdicts stand for the elements
        # they exclude (most of the library, for most people), candidates for the others.
        candidates: list[_Candidate | Verdict] = []
        eligible: list[_Candidate] = []
        if only is None:
            judged = judge(library.gates, user, channel, None, library.screen(channel, user.role))
        else:
            judged = judge([gate(e) for e in elements], user, channel, library.gates)
        for verdict in judged:
            if verdict.excluded_by is not None:
                candidates.append(verdict)
                continue
            c = _Candidate(verdict.element)
            if c.element.id in effects.excluded:
                c.excluded_by = "rule:" + effects.excluded[c.element.id]
                c.detail = "excluded by a decision rule"
            else:
                c.channel, blocked = self.contact.resolve(c.element, channel, history, now)
                if blocked:
                    c.excluded_by, c.detail = blocked.rule, blocked.detail
                else:
                    eligible.append(c)
            candidates.append(c)

        features = context_vector(ctx)
        matrix = build_matrix(
            ctx, [library.element_facts[c.element.id] for c in eligible], features
        )
        if eligible:
            scores = ranker.score(matrix)
            p_success = ranker.p_success(matrix, scores)
            for i, c in enumerate(eligible):
                c.score, c.p_success = float(scores[i]), float(p_success[i])
                c.lever = effects.lever_of(c.element.id)
            for c, f in zip(
                eligible,
                final_scores(
                    [c.p_success or 0.0 for c in eligible],
                    [c.element.value_weight for c in eligible],
                    [c.lever for c in eligible],
                ),
                strict=True,
            ):
                c.final = f

        picks = self._pick(eligible, effects.required, limit)
        used: Counter[str] = Counter()
        chosen: list[tuple[int, Pick, Channel]] = []
        for pick in picks:
            c = eligible[pick.index]
            # Caps count the items of this decision too: re-check with what it already uses.
            item_channel, blocked = self.contact.resolve(c.element, channel, history, now, used)
            if blocked or item_channel is None:
                b = blocked or Exclusion("channel", "no channel left")
                c.excluded_by, c.detail = b.rule, b.detail + " (within this decision)"
                continue
            used[item_channel.value] += 1
            chosen.append((pick.index, pick, item_channel))

        # SHAP values (models.treeshap's tables: about 0.1 ms per row on a 200-tree model of
        # 15 leaves) only for the top ``explain_items``. In this thread: handing them to a
        # worker thread cost more CPU per decision (the hand-off, and the two threads trading
        # the GIL) than the event loop would have gained (docs/decision.md, "Benchmark").
        explained = [i for i, _, _ in chosen[: self.explain_items]]
        contributions = (
            ranker.contributions(matrix[explained])
            if explained and ranker.kind != "rules"
            else None
        )
        decision_id = decision_id or str(uuid.uuid4())
        items: list[DecidedItem] = []
        for rank, (index, pick, item_channel) in enumerate(chosen, start=1):
            c = eligible[index]
            why_ranker = (
                model_reasons(contributions[rank - 1])
                if contributions is not None and rank <= len(contributions)
                else prior_reasons(ctx, library.element_facts[c.element.id])
            )
            required = c.element.id in effects.required
            items.append(
                DecidedItem(
                    element_id=c.element.id,
                    rank=rank,
                    channel=item_channel,
                    score=round(c.final or 0.0, 6),
                    propensity=round(pick.propensity, 6),
                    reason=reason(
                        rules=[r for r in effects.fired if r in self._rules_about(c, effects)],
                        ranker_reasons=why_ranker,
                        p_success=c.p_success or 0.0,
                        value_weight=c.element.value_weight,
                        lever=c.lever,
                        required=required,
                    ),
                    content=library.contents[c.element.id],
                )
            )
            DECISIONS.labels(c.element.id, item_channel.value, ranker.version).inc()
        for rule, n in Counter(c.excluded_by for c in candidates if c.excluded_by).items():
            EXCLUSIONS.labels(rule).inc(n)

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
        log = dict(
            id=decision_id,
            user_id=user.user_id,
            account_id=user.account_id,
            created_at=now,
            channel=channel.value if channel else None,
            trigger=trigger,
            policy=self.policy.name,
            model_version=ranker.version,
            context={
                "stage": ctx.stage(),
                "features": features,
                # Lets the training export rebuild per-element features exactly.
                "feature_usage": dict(ctx.feature_usage),
                "area_sophistication": dict(ctx.area_sophistication),
                "area_questions": dict(ctx.area_questions),
                "area_usage_7d": dict(ctx.area_usage_7d),
                "area_usage_prev_7d": dict(ctx.area_usage_prev_7d),
                "area_question_days": dict(ctx.area_question_days),
                "offer_history": {k: list(v) for k, v in ctx.offer_history.items()},
                "area_outcomes": {k: list(v) for k, v in ctx.area_outcomes.items()},
                "kind_outcomes": {k: list(v) for k, v in ctx.kind_outcomes.items()},
                "kind_responses": {k: list(v) for k, v in ctx.kind_responses.items()},
                "rules_fired": list(effects.fired),
                "library_version": library.version,
                "csm_id": csm_id,
            },
            candidates=[_candidate_log(c) for c in candidates],
            chosen=[
                {
                    "element_id": i.element_id,
                    "rank": i.rank,
                    "score": i.score,
                    "propensity": i.propensity,
                    "channel": i.channel.value,
                    "reason": i.reason,
                }
                for i in items
            ],
        )
        contacts = [
            {
                "decision_id": decision_id,
                "element_id": i.element_id,
                "user_id": user.user_id,
                "account_id": user.account_id,
                "csm_id": csm_id,
                "channel": i.channel.value,
                "at": now,
            }
            for i in items
        ]
        deferred_until = None
        quiet = history.quiet
        if not items and candidates and all(c.excluded_by == "quiet_hours" for c in candidates):
            deferred_until = quiet.ends_after(now) if quiet else None
        MODEL_DECISIONS.labels(ranker.version).inc()
        DECISION_DURATION.observe(time.perf_counter() - started)
        return Decided(message, log, contacts, deferred_until)

    @staticmethod
    def _rules_about(c: _Candidate, effects: RuleEffects) -> set[str]:
        names = set(effects.boosted_by.get(c.element.id, ()))
        if c.element.id in effects.required:
            names.update(effects.fired)  # which required rule is not tracked per element
        return names

    def _pick(
        self, eligible: Sequence[_Candidate], required: frozenset[str], limit: int
    ) -> list[Pick]:
        """Required elements first (certain, so propensity 1), then the exploration policy."""
        forced = sorted(
            (i for i, c in enumerate(eligible) if c.element.id in required),
            key=lambda i: -(eligible[i].final or 0.0),
        )[:limit]
        rest = [i for i in range(len(eligible)) if i not in set(forced)]
        explored = self.policy.choose([eligible[i].final or 0.0 for i in rest], limit - len(forced))
        return [Pick(i, 1.0) for i in forced] + [
            Pick(rest[p.index], p.propensity) for p in explored
        ]

    def cold_start(self, channel: Channel, limit: int) -> list[DecidedItem]:
        """The documented answer for someone NBV knows nothing about: role-agnostic onboarding
        elements without prerequisites, deliverable on the channel, by value per minute."""
        library = self.library
        pool = [
            e
            for e in library.elements
            if e.stage is Stage.ONBOARD
            and not e.roles
            and not e.prerequisites
            and channel in e.channels
        ]
        pool.sort(key=lambda e: (-e.value_weight / (1 + e.effort_minutes / 60), e.id))
        return [
            DecidedItem(
                element_id=e.id,
                rank=rank,
                channel=channel,
                score=round(e.value_weight / (1 + e.effort_minutes / 60), 6),
                propensity=1.0,
                reason="cold start: a first step that fits any role",
                content=library.contents[e.id],
            )
            for rank, e in enumerate(pool[:limit], start=1)
        ]


def _candidate_log(c: _Candidate | Verdict) -> dict[str, Any]:
    # An element excluded before the ranker has no scores: its entry says only which rule and
    # why. Most of a library is excluded for most people, so this halves the JSON written per
    # decision. One the caps turned away after ranking keeps its scores.
    if isinstance(c, Verdict) or c.score is None:
        return {"element_id": c.element.id, "excluded_by": c.excluded_by, "detail": c.detail}
    return {
        "element_id": c.element.id,
        "excluded_by": c.excluded_by,
        "detail": c.detail,
        "channel": c.channel.value if c.channel else None,
        "score": c.score,
        "p_success": c.p_success,
        "lever": c.lever,
        "final": c.final,
    }
