"""The training log: logged decisions joined with the responses to them, as a Parquet table.

One row per *eligible* candidate of each decision in the time range, with the features the
ranker saw at decision time (``models.features.FEATURES``), and for the candidates that were
shown (chosen, and a response was reported) their propensity, outcome and label. Training uses
the shown rows; off-policy evaluation also needs the unshown eligible ones, to know what the new
policy would have picked instead.

Labels (docs/data-science.md): ``label`` is a relevance grade for lambdarank — 2 completed,
1 clicked, 0 shown / snoozed / dismissed; ``reward`` is the success metric the lift bench and
the off-policy estimates use — 1 completed, else 0; ``completed_after_h`` is how long after the
decision the completion came (NaN: none), so a reward can be counted within a fixed window.

Features at decision time: the decision row logs the person's context features exactly; the
element features are rebuilt from the library version the decision was made with, the way
``build_matrix`` builds them, from what the decision logged next to its context features:
per-area usage (``context.feature_usage``), per-area sophistication and support questions
(``context.area_sophistication``, ``context.area_questions``) and the person's offer history
(``context.offer_history``: element id -> [times offered, days since the last offer]) and
their earlier answers by area and kind (``context.area_outcomes``, ``context.kind_outcomes``:
[achieved, dismissed]) and the per-area recency (``context.area_usage_7d``,
``context.area_usage_prev_7d``, ``context.area_question_days``) and how they answered the cards
they saw, by kind (``context.kind_responses``: [seen, engaged, completed, dismissed]). Logs
written before the engine recorded one of these get NaN in the columns it feeds (LightGBM treats
NaN as missing); ``rule_score`` is then recovered exactly from the logged P(success) when the
rule prior was serving. ``features_exact`` says which rows are exact.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from models.features import (
    FEATURES,
    INDEX,
    RESPONSE_CONTEXT,
    RESPONSE_KIND,
    ROLES,
    Context,
    build_matrix,
    context_vector,
)
from services.decision.engine import facts
from services.decision.library import ValueElement
from shared.store.db import create_engine, session_factory
from shared.store.models import DecisionRow, Intervention, LibraryVersion, ValueElementRow

GRADE = {"completed": 2, "clicked": 1}
# The per-area recency columns, NaN for decisions logged before the engine recorded them.
RECENCY_COLUMNS = ("area_usage_7d", "area_share_7d", "area_trend", "days_since_area_question")
# The person's answers to earlier cards (overall and for the element's kind), NaN for
# decisions logged before the engine recorded ``context.kind_responses``.
RESPONSE_COLUMNS = (*RESPONSE_CONTEXT, *RESPONSE_KIND)
# Which outcome wins when a shown item got several responses.
OUTCOME_ORDER = ("completed", "clicked", "dismissed", "snoozed", "shown")
META_COLUMNS = (
    "decision_id",
    "user_id",
    "account_id",
    "decided_at",
    "model_version",
    "policy",
    "element_id",
    "shown",
    "rank",
    "propensity",
    "logged_score",
    "lever",
    "outcome",
    "label",
    "reward",
    "completed_after_h",
    "shown_after_h",
    "features_exact",
)


def best_outcome(outcomes: Iterable[str]) -> str | None:
    seen = set(outcomes)
    return next((o for o in OUTCOME_ORDER if o in seen), None)


def context_from_features(f: dict[str, float], now: datetime) -> Context:
    """A ``Context`` that reproduces the logged context features (except per-area usage)."""
    role = next((r for r in ROLES if f.get(f"role_{r}", 0.0) >= 0.5), None)
    to_renewal = f.get("days_to_renewal", 999.0)
    nps = f.get("nps", -1.0)
    usage = math.expm1(f.get("log_usage_7d", 0.0))
    change = f.get("usage_wow_change", 0.0)
    if change == 0.0:
        usage_before = 0.0  # no previous week, or the same usage: either reads as no change
    elif change > -1.0:
        usage_before = usage / (1.0 + change)
    else:
        # Usage fell to nothing: any week before with some usage gives -1 (the prior's need
        # reads the drop, so it must not come back as "no change").
        usage_before = 1.0
    health = f.get("health_score", -1.0)
    soph = f.get("sophistication", -1.0)
    return Context(
        now=now,
        role=role,
        first_seen=now - timedelta(days=f.get("tenure_days", 0.0)),
        last_seen=now - timedelta(days=f.get("days_since_seen", 0.0)),
        event_count=round(math.expm1(f.get("log_events", 0.0))),
        last_nps=None if nps < 0 else round(nps),
        open_tickets=round(f.get("open_tickets", 0.0)),
        renewal_date=None if to_renewal >= 999.0 else now + timedelta(days=to_renewal),
        n_achieved=round(f.get("n_achieved", 0.0)),
        n_dismissed=round(f.get("n_dismissed", 0.0)),
        usage_7d=usage,
        usage_prev_7d=usage_before,
        health_score=None if health < 0 else health,
        sophistication=None if soph < 0 else soph,
        past_due=f.get("past_due", 0.0) >= 0.5,
        mrr=math.expm1(f.get("log_mrr", 0.0)),
    )


def _counts(logged: object) -> dict[str, int]:
    if not isinstance(logged, dict):
        return {}
    return {str(k): int(v) for k, v in logged.items()}


def _pairs(logged: object) -> dict[str, tuple[int, int]]:
    if not isinstance(logged, dict):
        return {}
    return {str(k): (int(v[0]), int(v[1])) for k, v in logged.items()}


def _quads(logged: object) -> dict[str, tuple[int, int, int, int]]:
    if not isinstance(logged, dict):
        return {}
    return {str(k): (int(v[0]), int(v[1]), int(v[2]), int(v[3])) for k, v in logged.items()}


@dataclass(frozen=True)
class DecisionRows:
    meta: list[dict[str, Any]]
    features: np.ndarray[Any, np.dtype[np.float64]]


def decision_rows(
    row: DecisionRow,
    elements: dict[str, ValueElement],
    outcomes: dict[str, list[str]],
    completed_at: dict[str, datetime] | None = None,
    first_seen_at: dict[str, datetime] | None = None,
) -> DecisionRows:
    """The eligible candidates of one logged decision as training-log rows; ``completed_at``:
    when each completed element was first reported completed (``completed_after_h``);
    ``first_seen_at``: when each element's first response of any kind came (``shown_after_h``;
    without it a shown card counts as shown when decided, as exports did before)."""
    ctx_log: dict[str, Any] = row.context or {}
    logged: dict[str, float] = {k: float(v) for k, v in (ctx_log.get("features") or {}).items()}
    usage: dict[str, int] | None = ctx_log.get("feature_usage")
    ctx = context_from_features(logged, row.created_at)
    if usage is not None:
        ctx = dataclasses.replace(ctx, feature_usage=dict(usage))
    # Per-area standing and offer history, logged since those features exist; NaN before.
    areas_logged = "area_sophistication" in ctx_log
    offers_logged = "offer_history" in ctx_log
    outcomes_logged = "area_outcomes" in ctx_log
    recency_logged = "area_usage_7d" in ctx_log
    responses_logged = "kind_responses" in ctx_log
    ctx = dataclasses.replace(
        ctx,
        area_sophistication={
            str(k): float(v) for k, v in (ctx_log.get("area_sophistication") or {}).items()
        },
        area_questions={str(k): int(v) for k, v in (ctx_log.get("area_questions") or {}).items()},
        offer_history={
            str(k): (int(v[0]), float(v[1]))
            for k, v in (ctx_log.get("offer_history") or {}).items()
        },
        area_outcomes=_pairs(ctx_log.get("area_outcomes")),
        kind_outcomes=_pairs(ctx_log.get("kind_outcomes")),
        kind_responses=_quads(ctx_log.get("kind_responses")),
        area_usage_7d=_counts(ctx_log.get("area_usage_7d")),
        area_usage_prev_7d=_counts(ctx_log.get("area_usage_prev_7d")),
        area_question_days={
            str(k): float(v) for k, v in (ctx_log.get("area_question_days") or {}).items()
        },
    )
    stage_now = ctx_log.get("stage") or ctx.stage()
    chosen = {c["element_id"]: c for c in row.chosen}
    eligible = [
        c
        for c in row.candidates
        if c.get("excluded_by") is None and c.get("element_id") in elements
    ]
    # The context columns as logged: the element columns derived from them (the kind rates
    # shrunk towards the person's overall ones, the stage against days to renewal and tenure)
    # then equal the served ones exactly.
    base = context_vector(ctx)
    base.update((name, value) for name, value in logged.items() if name in INDEX)
    matrix = build_matrix(ctx, [facts(elements[c["element_id"]]) for c in eligible], base)
    if "offers_7d" not in logged:
        matrix[:, INDEX["offers_7d"]] = math.nan
    if not responses_logged:
        matrix[:, [INDEX[name] for name in RESPONSE_COLUMNS]] = math.nan
    meta: list[dict[str, Any]] = []
    for i, c in enumerate(eligible):
        el = elements[c["element_id"]]
        matrix[i, INDEX["stage_match"]] = float(el.stage.value == stage_now)
        exact = (
            offers_logged
            and outcomes_logged
            and recency_logged
            and responses_logged
            and (not el.feature_area or (usage is not None and areas_logged))
        )
        if usage is None:
            matrix[i, INDEX["area_usage"]] = math.nan if el.feature_area else 0.0
            if el.feature_area:
                matrix[i, INDEX["area_share"]] = math.nan
        if not areas_logged and el.feature_area:
            matrix[i, INDEX["area_sophistication"]] = math.nan
            matrix[i, INDEX["area_questions"]] = math.nan
        if not offers_logged:
            matrix[i, INDEX["times_offered"]] = math.nan
            matrix[i, INDEX["days_since_offered"]] = math.nan
        if not outcomes_logged:
            for name in ("area_achieved", "area_dismissed", "kind_achieved", "kind_dismissed"):
                matrix[i, INDEX[name]] = math.nan
        if not recency_logged:
            for name in RECENCY_COLUMNS:
                matrix[i, INDEX[name]] = math.nan
        if row.model_version == "rules-v1" and c.get("p_success") is not None:
            # The rule prior logs P = o / (1 + o) with o = rule_score ÷ value weight.
            p = min(float(c["p_success"]), 1 - 1e-12)
            matrix[i, INDEX["rule_score"]] = p / (1 - p) * el.value_weight
        elif usage is None and el.feature_area:
            matrix[i, INDEX["rule_score"]] = math.nan
        pick = chosen.get(el.id)
        outcome = best_outcome(outcomes.get(el.id, [])) if pick else None
        shown = outcome is not None
        meta.append(
            {
                "decision_id": row.id,
                "user_id": row.user_id,
                "account_id": row.account_id,
                "decided_at": row.created_at,
                "model_version": row.model_version,
                "policy": row.policy,
                "element_id": el.id,
                "shown": shown,
                "rank": int(pick["rank"]) if pick else -1,
                "propensity": float(pick["propensity"]) if pick else math.nan,
                "logged_score": float(c["final"]) if c.get("final") is not None else math.nan,
                "lever": float(c.get("lever") or 1.0),
                "outcome": outcome or "",
                "label": GRADE.get(outcome or "", 0),
                "reward": 1.0 if outcome == "completed" else 0.0,
                "completed_after_h": _hours_after(row.created_at, (completed_at or {}).get(el.id)),
                "shown_after_h": (
                    _hours_after(row.created_at, (first_seen_at or {}).get(el.id, row.created_at))
                    if shown
                    else math.nan
                ),
                "features_exact": exact,
            }
        )
    return DecisionRows(meta, matrix)


def _hours_after(decided: datetime, done: datetime | None) -> float:
    if done is None:
        return math.nan
    return max(0.0, (_aware(done) - _aware(decided)).total_seconds() / 3600)


def _earliest(first: dict[str, datetime], element_id: str, at: datetime) -> None:
    if element_id not in first or _aware(at) < _aware(first[element_id]):
        first[element_id] = at


def _aware(t: datetime) -> datetime:
    # SQLite hands back naive datetimes; the store writes UTC.
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


async def _libraries(session: AsyncSession) -> dict[int | None, dict[str, ValueElement]]:
    """Every library version's elements (the decision's own version wins; the current rows
    cover decisions logged before versions were recorded)."""
    current = {
        r.id: ValueElement.model_validate(r.spec)
        for r in (await session.scalars(select(ValueElementRow))).all()
    }
    out: dict[int | None, dict[str, ValueElement]] = {None: current}
    for v in (await session.scalars(select(LibraryVersion))).all():
        out[v.version] = {
            e["id"]: ValueElement.model_validate(e) for e in v.elements if isinstance(e, dict)
        }
    return out


async def load_log(url: str, since: datetime, until: datetime) -> pa.Table:
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as session:
            libraries = await _libraries(session)
            decisions = (
                await session.scalars(
                    select(DecisionRow)
                    .where(DecisionRow.created_at >= since, DecisionRow.created_at < until)
                    .order_by(DecisionRow.created_at, DecisionRow.id)
                )
            ).all()
            responses: dict[str, dict[str, list[str]]] = {}
            completions: dict[str, dict[str, datetime]] = {}
            first_seen: dict[str, dict[str, datetime]] = {}
            ids = [d.id for d in decisions]
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                for r in (
                    await session.scalars(
                        select(Intervention).where(Intervention.decision_id.in_(chunk))
                    )
                ).all():
                    responses.setdefault(r.decision_id, {}).setdefault(r.element_id, []).append(
                        r.outcome
                    )
                    _earliest(first_seen.setdefault(r.decision_id, {}), r.element_id, r.at)
                    if r.outcome == "completed":
                        _earliest(completions.setdefault(r.decision_id, {}), r.element_id, r.at)
    finally:
        await engine.dispose()
    metas: list[dict[str, Any]] = []
    blocks: list[np.ndarray[Any, np.dtype[np.float64]]] = []
    for d in decisions:
        version = (d.context or {}).get("library_version")
        elements = {**libraries[None], **libraries.get(version, {})}
        rows = decision_rows(
            d, elements, responses.get(d.id, {}), completions.get(d.id), first_seen.get(d.id, {})
        )
        metas.extend(rows.meta)
        blocks.append(rows.features)
    return to_table(metas, blocks)


def to_table(
    metas: Sequence[dict[str, Any]], blocks: Sequence[np.ndarray[Any, np.dtype[np.float64]]]
) -> pa.Table:
    features = np.vstack(blocks) if blocks else np.zeros((0, len(FEATURES)), dtype=np.float64)
    columns: dict[str, Any] = {
        name: [m[name] for m in metas] for name in META_COLUMNS if name != "decided_at"
    }
    columns["decided_at"] = pa.array(
        [m["decided_at"].astimezone(UTC) for m in metas], type=pa.timestamp("us", tz="UTC")
    )
    for j, name in enumerate(FEATURES):
        columns[name] = features[:, j]
    return pa.table(columns)


def write_parquet(table: pa.Table, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)


def read_parquet(path: Path) -> pa.Table:
    return pq.read_table(path)
