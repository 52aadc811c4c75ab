"""Arbitration: from ranker scores to the final score the exploration policy samples from.

    final = P(success) × value weight × business lever

P(success) is the ranker's calibrated probability that the person completes the element
(``Ranker.p_success``: Platt scaling for a LightGBM model, o / (1 + o) of the prior's odds for
the rule prior). The value weight is the element's, from the library. The business lever is
the product of the ``boost`` factors of the rules that fired for this decision (1 when none).
Elements a fired rule ``require``s are offered first, in final-score order, with propensity 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from models.features import Context, context_vector
from services.decision.playbooks import Rule
from services.ingest.view import AccountState


@dataclass(frozen=True)
class RuleEffects:
    fired: tuple[str, ...]
    required: frozenset[str]
    excluded: Mapping[str, str]  # element id → rule name
    lever: Mapping[str, float]  # element id → product of boosts
    boosted_by: Mapping[str, tuple[str, ...]]  # element id → rule names

    def lever_of(self, element_id: str) -> float:
        return self.lever.get(element_id, 1.0)


def decision_facts(
    ctx: Context, account: AccountState | None, trigger: str | None
) -> dict[str, Any]:
    """What rule and audience conditions can test (documented in docs/decision.md)."""
    facts: dict[str, Any] = dict(context_vector(ctx))
    facts.update(
        stage=ctx.stage(),
        role=ctx.role,
        trigger=trigger,
        plan=account.plan if account else None,
        mrr=ctx.mrr if ctx.mrr is not None else 0.0,
        subscription_status=account.subscription_status if account else None,
    )
    if ctx.renewal_date is None:
        facts.pop("days_to_renewal")  # unknown: conditions on it do not hold
    return facts


def apply_rules(rules: Sequence[Rule], facts: Mapping[str, Any]) -> RuleEffects:
    fired = [r for r in rules if r.fires(facts)]
    excluded: dict[str, str] = {}
    lever: dict[str, float] = {}
    boosted_by: dict[str, tuple[str, ...]] = {}
    for r in fired:
        for element_id in r.exclude:
            excluded.setdefault(element_id, r.name)
        for element_id, factor in r.boost.items():
            lever[element_id] = lever.get(element_id, 1.0) * factor
            boosted_by[element_id] = (*boosted_by.get(element_id, ()), r.name)
    return RuleEffects(
        fired=tuple(r.name for r in fired),
        required=frozenset(e for r in fired for e in r.require),
        excluded=excluded,
        lever=lever,
        boosted_by=boosted_by,
    )


def final_scores(
    p_success: Sequence[float], value_weights: Sequence[float], levers: Sequence[float]
) -> list[float]:
    return [p * w * lev for p, w, lev in zip(p_success, value_weights, levers, strict=True)]
