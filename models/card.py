"""The model card: what a model was trained on, how it scores, and what it looks at."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np

from models.evaluate import Evaluation, Interval
from models.features import FEATURES


def _fmt(i: Interval) -> str:
    return f"{i.estimate:.4f} [{i.low:.4f}, {i.high:.4f}]"


def importance(booster: lgb.Booster, top: int = 15) -> list[tuple[str, float]]:
    gain = np.asarray(booster.feature_importance(importance_type="gain"), dtype=np.float64)
    total = gain.sum() or 1.0
    ranked = sorted(zip(FEATURES, gain / total, strict=True), key=lambda t: -t[1])
    return [(name, float(share)) for name, share in ranked[:top] if share > 0]


def _plot_importance(items: list[tuple[str, float]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(items) + 1))
    names = [n for n, _ in items][::-1]
    ax.barh(names, [v for _, v in items][::-1], color="#3b6ea5")
    ax.set_xlabel("share of total gain")
    ax.set_title("Feature importance")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_off_policy(ev: Evaluation, out: Path) -> None:
    op = ev.off_policy
    labels = ["logged", "IPS", "SNIPS", "DR"]
    values = [op.logged_value, op.ips, op.snips, op.dr]
    if op.dr_capped is not None:
        labels.append(f"DR ≤{op.weight_cap:g}")
        values.append(op.dr_capped)
    fig, ax = plt.subplots(figsize=(5, 3))
    est = np.array([v.estimate for v in values])
    err = np.array(
        [
            [max(0.0, v.estimate - v.low) for v in values],
            [max(0.0, v.high - v.estimate) for v in values],
        ]
    )
    colors = ["#999999", "#3b6ea5", "#3b6ea5", "#2a8c55", "#2a8c55"][: len(values)]
    ax.bar(labels, est, yerr=err, capsize=4, color=colors)
    ax.set_ylabel("completions per decision")
    ax.set_title("Off-policy value (95 % bootstrap CI)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_card(
    folder: Path, version: str, meta: dict[str, object], booster: lgb.Booster, ev: Evaluation
) -> Path:
    items = importance(booster)
    _plot_importance(items, folder / "feature_importance.png")
    _plot_off_policy(ev, folder / "off_policy.png")
    op = ev.off_policy
    ranking = "\n".join(
        f"| {name} | {ev.ranking.get(name, float('nan')):.4f} | "
        f"{ev.rule_prior_ranking.get(name, float('nan')):.4f} |"
        for name in ev.ranking
        if name != "queries_scored"
    )
    features = "\n".join(f"| {name} | {share:.3f} |" for name, share in items)
    capped = (
        f"\n| doubly robust, weights above {op.weight_cap:g} left to the reward model "
        f"({op.capped} decisions) | {_fmt(op.dr_capped)} |"
        if op.dr_capped is not None and op.weight_cap is not None
        else ""
    )
    text = f"""# Model card: {version}

LightGBM lambdarank ranker for Next Best Value (`models/fit.py`, config below).

## Data

- decisions from {meta.get("data_from")} to {meta.get("data_until")}
- training: {meta.get("rows")} shown cards in {meta.get("queries")} queries, before
  {meta.get("split_at")}; held out: {meta.get("valid_rows")} shown cards in
  {meta.get("valid_queries")} queries (used for early stopping and the figures below)
- best iteration: {meta.get("best_iteration")}
- labels: 2 completed, 1 clicked, 0 otherwise; reward for off-policy value: 1 completed

## Ranking on the held-out period ({int(ev.ranking.get("queries_scored", 0))} queries)

| metric | model | rule prior |
|---|---|---|
{ranking}

## Off-policy value (first card of {op.decisions} held-out decisions)

Expected completions per decision if this model had served (ε-greedy as configured), against
the logging policy. 95 % percentile bootstrap intervals.

| estimator | value [95 % CI] |
|---|---|
| logging policy (observed) | {_fmt(op.logged_value)} |
| IPS | {_fmt(op.ips)} |
| SNIPS | {_fmt(op.snips)} |
| doubly robust | {_fmt(op.dr)} |{capped}

Mean importance weight {op.mean_weight:.3f}; effective sample size
{op.effective_sample_size:.1f} of {op.decisions}.

![off-policy value](off_policy.png)

## Feature importance (share of gain)

| feature | share |
|---|---|
{features}

![feature importance](feature_importance.png)
"""
    out = folder / "card.md"
    out.write_text(text)
    return out
