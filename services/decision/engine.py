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

import numpy as np
from sqlalchemy.ext.asyncio import AsyncConnection

from models.features import (
    Context,
    ElementFacts,
    build_matrix,
    context_vector,
    offer_history,
    past_outcomes,
)
from models.ranker import Matrix, Ranker
from models.routing import ServingModels
from services.decision.arbitration import (
    RuleEffects,
    apply_rules,
    decision_facts,
    final_scores,
)
from services.decision.contact_policy import (
    ContactHistory,
    ContactPolicy,
    Exclusion,
    contact_history,
    csm_alerts_last_day,
    history_horizon,
)
from services.decision.explain import model_reasons, prior_reasons, reason
from services.decision.library import Stage, ValueElement
from services.decision.person import Person, read_persons
from services.decision.playbooks import PlaybookSet
from services.decision.policy import Exploration, Pick
from services.decision.rules import (
    Gate,
    LibraryVerdicts,
    Screen,
    Verdict,
    gate,
    judge,
    judge_library,
    marks_by_event,
    screen_library,
)
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
    @property
    def user_id(self) -> str:
        return str(self.args[0])


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
    # Each gate's position by element id, and the gates each achieved event marks.
    index: dict[str, int] = field(default_factory=dict)
    by_event: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # ``rules.screen_library`` of ``gates`` per (channel, role), filled as they are met.
    screens: dict[tuple[Channel | None, str | None], Screen] = field(default_factory=dict)

    @classmethod
    def of(cls, version: int | None, elements: Sequence[ValueElement]) -> LibrarySnapshot:
        gates = tuple(gate(e) for e in elements)
        return cls(
            version,
            tuple(elements),
            {e.id: e for e in elements},
            {e.id: facts(e) for e in elements},
            gates,
            {e.id: e.content() for e in elements},
            history_horizon(elements),
            {g.id: i for i, g in enumerate(gates)},
            marks_by_event(gates),
        )

    def screen(self, channel: Channel | None, role: str | None) -> Screen:
        screened = self.screens.get((channel, role))
        if screened is None:
            screened = screen_library(self.gates, channel, role)
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


@dataclass(frozen=True, slots=True)
class DecisionRequest:
    """One decision to make. ``only`` restricts the candidates (a playbook step offers its one
    element, still subject to every rule and the contact policy); ``decision_id`` makes a
    retried decision the same one."""

    user_id: str
    channel: Channel | None
    limit: int
    trigger: str | None = None
    only: Sequence[str] | None = None
    decision_id: str | None = None


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


@dataclass(slots=True)
class _Draft:
    """A decision between its read and its answer (``DecisionEngine.decide_many``)."""

    request: DecisionRequest
    person: Person
    ranker: Ranker
    library: LibrarySnapshot
    now: datetime
    ctx: Context
    effects: RuleEffects
    csm_id: str | None
    history: ContactHistory
    # The verdicts the person's record decided, then the elements the channel or the role
    # excludes, as (rule, detail, element ids) (``rules.judge_library``).
    candidates: list[_Candidate | Verdict]
    screened_out: list[tuple[str, str, Sequence[str]]]
    eligible: list[_Candidate]
    features: dict[str, float]
    # One row per eligible candidate.
    matrix: Matrix
    # (index in eligible, pick, channel) per item, in rank order.
    chosen: list[tuple[int, Pick, Channel]] = field(default_factory=list)
    # SHAP rows of the first ``explain_items`` chosen (None: the prior's reasons).
    contributions: Matrix | None = None


@dataclass(slots=True)
class _Tally:
    """A batch's metrics, counted as it is decided and published once (a labelled child is
    looked up under a lock: once per batch rather than once per item)."""

    chosen: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    excluded: Counter[str] = field(default_factory=Counter)
    scored: Counter[str] = field(default_factory=Counter)

    def publish(self) -> None:
        for labels, n in self.chosen.items():
            DECISIONS.labels(*labels).inc(n)
        for rule, n in self.excluded.items():
            EXCLUSIONS.labels(rule).inc(n)
        for version, n in self.scored.items():
            MODEL_DECISIONS.labels(version).inc(n)


def _by_ranker(drafts: Sequence[_Draft]) -> dict[int, list[_Draft]]:
    # A challenger serves some people: each model scores its own people's rows.
    groups: dict[int, list[_Draft]] = {}
    for draft in drafts:
        groups.setdefault(id(draft.ranker), []).append(draft)
    return groups


def _score(drafts: Sequence[_Draft]) -> None:
    """Scores and P(success) of every eligible candidate: one call per model for all the
    drafts' rows (a LightGBM call costs about as much for one row as for a few dozen)."""
    for group in _by_ranker([d for d in drafts if d.eligible]).values():
        ranker = group[0].ranker
        matrix = np.concatenate([d.matrix for d in group]) if len(group) > 1 else group[0].matrix
        scores = ranker.score(matrix)
        p_success = ranker.p_success(matrix, scores)
        row = 0
        for draft in group:
            lever_of = draft.effects.lever_of
            for c in draft.eligible:
                c.score, c.p_success = float(scores[row]), float(p_success[row])
                c.lever = lever_of(c.element.id)
                row += 1


def _explain(drafts: Sequence[_Draft], explain_items: int) -> None:
    """SHAP values (models.treeshap's tables) of the top ``explain_items`` of each draft, one
    call per model. In this thread: handing them to a worker thread cost more CPU per
    decision (the hand-off, and the two threads trading the GIL) than the event loop would
    have gained (docs/decision.md, "Benchmark")."""
    if explain_items < 1:
        return
    wanted = [d for d in drafts if d.chosen and d.ranker.kind != "rules"]
    for group in _by_ranker(wanted).values():
        rows = [d.matrix[[i for i, _, _ in d.chosen[:explain_items]]] for d in group]
        explained = group[0].ranker.contributions(
            np.concatenate(rows) if len(rows) > 1 else rows[0]
        )
        if explained is None:
            continue
        start = 0
        for draft, taken in zip(group, rows, strict=True):
            draft.contributions = explained[start : start + len(taken)]
            start += len(taken)


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
        """Decide for one person (``decide_many`` for one request); raises UnknownUser."""
        (result,) = await self.decide_many(
            connection, [DecisionRequest(user_id, channel, limit, trigger, only, decision_id)]
        )
        if isinstance(result, UnknownUser):
            raise result
        return result

    async def decide_many(
        self, connection: AsyncConnection, requests: Sequence[DecisionRequest]
    ) -> list[Decided | UnknownUser]:
        """Decide for each request from what ``connection`` reads (one round trip for all the
        people), in order; UnknownUser for a person the view does not know. The caller logs
        the results (``services.decision.group_commit``, in the transaction that took the
        erasure fence before this read).

        Together, the requests share what costs the same for one row as for many: the read,
        the ranker's scoring and its explanations (one call each per model). A person asked
        for twice here decides twice from the same read, as two concurrent requests would."""
        started = time.perf_counter()
        now = datetime.now(UTC)
        library, playbooks = self.library, self.playbooks
        people = await read_persons(
            connection, list(dict.fromkeys(r.user_id for r in requests)), now - library.horizon
        )
        drafts: list[_Draft | UnknownUser] = []
        for request in requests:
            person = people.get(request.user_id)
            drafts.append(
                UnknownUser(request.user_id)
                if person is None
                else await self._draft(connection, request, person, library, playbooks, now)
            )
        ready = [d for d in drafts if isinstance(d, _Draft)]
        _score(ready)
        for draft in ready:
            self._choose(draft)
        _explain(ready, self.explain_items)
        tally = _Tally()
        results = [d if isinstance(d, UnknownUser) else self._decided(d, tally) for d in drafts]
        tally.publish()
        elapsed = time.perf_counter() - started
        for _ in ready:
            DECISION_DURATION.observe(elapsed)
        return results

    async def _draft(
        self,
        connection: AsyncConnection,
        request: DecisionRequest,
        person: Person,
        library: LibrarySnapshot,
        playbooks: PlaybookSet,
        now: datetime,
    ) -> _Draft:
        """Everything up to the ranker: the context, the rules, the contact policy, the
        eligible elements and their feature rows."""
        channel, only = request.channel, request.only
        user, account = person.user, person.account
        ctx = context_of(user, account, now)
        elements = (
            list(library.elements)
            if only is None
            else [library.by_id[i] for i in only if i in library.by_id]
        )
        effects = apply_rules(playbooks.rules, decision_facts(ctx, account, request.trigger))
        csm_id = self._csm_of(user.account_id, account)
        wants_csm = channel is Channel.CSM or (
            channel is None and any(Channel.CSM in e.channels for e in elements)
        )
        history = contact_history(
            self.contact.limits,
            read=person.history,
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
            judged = judge_library(
                library.gates,
                library.index,
                library.by_event,
                user,
                library.screen(channel, user.role),
            )
        else:
            judged = LibraryVerdicts(
                judge([gate(e) for e in elements], user, channel, library.gates), []
            )
        for verdict in judged.verdicts:
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
        return _Draft(
            request=request,
            person=person,
            ranker=self.models.for_user(user.user_id),
            library=library,
            now=now,
            ctx=ctx,
            effects=effects,
            csm_id=csm_id,
            history=history,
            candidates=candidates,
            screened_out=judged.screened,
            eligible=eligible,
            features=features,
            matrix=matrix,
        )

    def _choose(self, draft: _Draft) -> None:
        """The arbitration's final scores, the picks, and the caps re-checked per item."""
        eligible, effects = draft.eligible, draft.effects
        if eligible:
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
        channel, history, now = draft.request.channel, draft.history, draft.now
        used: Counter[str] = Counter()
        for pick in self._pick(eligible, effects.required, draft.request.limit):
            c = eligible[pick.index]
            # Caps count the items of this decision too: re-check with what it already uses.
            item_channel, blocked = self.contact.resolve(c.element, channel, history, now, used)
            if blocked or item_channel is None:
                b = blocked or Exclusion("channel", "no channel left")
                c.excluded_by, c.detail = b.rule, b.detail + " (within this decision)"
                continue
            used[item_channel.value] += 1
            draft.chosen.append((pick.index, pick, item_channel))

    def _decided(self, draft: _Draft, tally: _Tally) -> Decided:
        """The items with their reasons, the message for delivery, and the log."""
        request, library, ctx, effects = draft.request, draft.library, draft.ctx, draft.effects
        user, ranker, now = draft.person.user, draft.ranker, draft.now
        channel, csm_id, candidates = request.channel, draft.csm_id, draft.candidates
        contributions = draft.contributions
        decision_id = request.decision_id or str(uuid.uuid4())
        items: list[DecidedItem] = []
        for rank, (index, pick, item_channel) in enumerate(draft.chosen, start=1):
            c = draft.eligible[index]
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
            tally.chosen[(c.element.id, item_channel.value, ranker.version)] += 1

        message = DecisionMessage(
            decision_id=decision_id,
            user_id=user.user_id,
            account_id=user.account_id,
            role=Role(user.role) if user.role else None,
            created_at=now,
            trigger=request.trigger,
            model_version=ranker.version,
            items=items,
        )
        log = dict(
            id=decision_id,
            user_id=user.user_id,
            account_id=user.account_id,
            created_at=now,
            channel=channel.value if channel else None,
            trigger=request.trigger,
            policy=self.policy.name,
            model_version=ranker.version,
            context={
                "stage": ctx.stage(),
                "features": draft.features,
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
            candidates=_candidate_log(candidates, draft.screened_out, tally.excluded),
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
        quiet = draft.history.quiet
        if (
            not items
            and not draft.screened_out
            and candidates
            and all(c.excluded_by == "quiet_hours" for c in candidates)
        ):
            deferred_until = quiet.ends_after(now) if quiet else None
        tally.scored[ranker.version] += 1
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


def _candidate_log(
    candidates: Sequence[_Candidate | Verdict],
    screened_out: Sequence[tuple[str, str, Sequence[str]]],
    excluded: Counter[str],
) -> list[Any]:
    """The decision log's ``candidates`` (format: ``services.decision.decision_log``), counting
    each rule's exclusions into ``excluded``. Most of a library is excluded before ranking for
    most people, for a few reasons shared by many elements: one entry per reason, with its
    elements, is a fifth of the JSON one entry per element was. One the caps turned away after
    ranking keeps its scores."""
    log: list[Any] = []
    groups: dict[tuple[str | None, str], list[str]] = {
        (rule, detail): list(ids) for rule, detail, ids in screened_out
    }
    for c in candidates:
        if isinstance(c, Verdict) or (c.score is None and c.excluded_by):
            groups.setdefault((c.excluded_by, c.detail), []).append(c.element.id)
            continue
        if c.excluded_by:
            excluded[c.excluded_by] += 1
        log.append(
            {
                "element_id": c.element.id,
                "excluded_by": c.excluded_by,
                "detail": c.detail,
                "channel": c.channel.value if c.channel else None,
                "score": c.score,
                "p_success": c.p_success,
                "lever": c.lever,
                "final": c.final,
            }
        )
    for (rule, detail), ids in groups.items():
        log.append({"excluded_by": rule, "detail": detail, "element_ids": ids})
        if rule:
            excluded[rule] += len(ids)
    return log
