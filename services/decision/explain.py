"""Human-readable reasons: the rules that fired, then why the ranker liked the element
(its top LightGBM feature contributions, or the rule prior's factors)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from models.features import FEATURES, Context, ElementFacts, prior_factors

TOP_CONTRIBUTIONS = 3

# How a feature reads in a sentence; features not listed read as their name.
FEATURE_TEXT: dict[str, str] = {
    "tenure_days": "time as a customer",
    "days_since_seen": "days since last seen",
    "log_events": "overall activity",
    "feature_breadth": "breadth of features used",
    "nps": "last NPS answer",
    "is_detractor": "NPS detractor",
    "open_tickets": "open support tickets",
    "days_to_renewal": "days to renewal",
    "n_achieved": "elements completed",
    "n_dismissed": "elements dismissed",
    "log_usage_7d": "usage this week",
    "usage_wow_change": "week-over-week usage change",
    "health_score": "health score",
    "sophistication": "sophistication",
    "past_due": "billing past due",
    "log_mrr": "account revenue",
    "value_weight": "business value",
    "effort_minutes": "effort",
    "stage_match": "fit with the current stage",
    "role_match": "fit with the role",
    "area_usage": "use of its feature area",
    "rule_score": "rule prior",
    # Before the kind_ prefix below reads them as kinds of element.
    "cards_seen": "cards seen",
    "engaged_rate": "how often cards are taken up",
    "completed_rate": "how often cards are completed",
    "dismissed_rate": "how often cards are dismissed",
    "kind_seen": "cards of this kind seen",
    "kind_engaged_rate": "take-up of this kind of element",
    "kind_completed_rate": "completions of this kind of element",
    "kind_dismissed_rate": "dismissals of this kind of element",
    "kind_taste": "taste for this kind of element",
    "kind_achieved": "elements of this kind completed",
    "kind_dismissed": "elements of this kind dismissed",
    "renew_days": "days to renewal, for a renewal element",
    "onboard_days": "time as a customer, for an onboarding element",
}
_PRIOR_TEXT = {
    "need_detractor": "a detractor needs a human touch",
    "need_tickets": "open support tickets call for self-help",
    "need_unused_area": "its feature area is not used yet",
    "need_usage_drop": "usage dropped week over week",
}


def _feature_text(name: str) -> str:
    if name in FEATURE_TEXT:
        return FEATURE_TEXT[name]
    for prefix, label in (("kind_", "kind"), ("stage_now_", "current stage"), ("stage_", "stage")):
        if name.startswith(prefix):
            return f"{label} {name.removeprefix(prefix).replace('_', ' ')}"
    if name.startswith("role_"):
        return f"role {name.removeprefix('role_').replace('_', ' ')}"
    return name


def model_reasons(contrib: npt.NDArray[np.float64]) -> list[str]:
    """The top contributions of one row of ``pred_contrib`` output (last column: bias)."""
    values = contrib[: len(FEATURES)]
    order = np.argsort(-np.abs(values))[:TOP_CONTRIBUTIONS]
    return [
        f"{_feature_text(FEATURES[i])} {'+' if values[i] >= 0 else '−'}{abs(values[i]):.2f}"
        for i in order
        if values[i] != 0
    ]


def prior_reasons(ctx: Context, element: ElementFacts) -> list[str]:
    _, factors = prior_factors(ctx, element)
    out: list[str] = []
    for name, value in factors:
        if name == "stage_fit":
            stage = ctx.stage()
            out.append(f"fits the {stage} stage" if value == 1.0 else f"not a {stage} element")
        elif name == "effort":
            out.append(f"{element.effort_minutes} min of effort")
        else:
            out.append(_PRIOR_TEXT.get(name, name))
    return out


def reason(
    *,
    rules: Sequence[str],
    ranker_reasons: Sequence[str],
    p_success: float,
    value_weight: float,
    lever: float,
    required: bool,
) -> str:
    parts: list[str] = []
    if required:
        parts.append("required by rule " + ", ".join(rules))
    elif rules:
        parts.append("boosted by rule " + ", ".join(rules))
    parts.extend(ranker_reasons)
    parts.append(
        f"P(success) {p_success:.2f} × value {value_weight:g}"
        + (f" × lever {lever:g}" if lever != 1.0 else "")
    )
    return "; ".join(parts)
