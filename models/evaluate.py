"""Offline evaluation of a ranker: ranking metrics and off-policy value on the held-out period.

Off-policy value is the expected reward per decision (1 = the shown element was completed) if
the new model had been serving, estimated from what the logging policy showed:

- IPS:  mean(w·r) with w = π(a|x) / μ(a|x), μ the logged propensity;
- SNIPS: Σ w·r / Σ w (self-normalised: a little biased, much less variance);
- DR:   mean(Σₐ π(a|x) q̂(x,a) + w·(r − q̂(x,a))), with q̂ a simple reward model.

Only the first slot of each decision is used (the card the simulator and the widget show
first); its logged propensity is exactly μ(a|x). The target π is the policy the model will
serve with (``TargetPolicy``): ε-greedy or softmax over arbitration scores (P(success) × value
weight × lever), the way the decision service ranks and explores. A first card a decision rule
required (logged propensity 1) is required whatever the model: π gives it probability 1 too.
Confidence intervals: percentile bootstrap over decisions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel
from sklearn.linear_model import LogisticRegression

from models.features import INDEX
from models.logdata import LogData
from models.ranker import LightGBMRanker
from services.decision.arbitration import final_scores

Floats = npt.NDArray[np.float64]


# ---------------------------------------------------------------- estimators (pure)


def ips(reward: Floats, weight: Floats) -> float:
    return float(np.mean(weight * reward)) if len(reward) else float("nan")


def snips(reward: Floats, weight: Floats) -> float:
    total = float(np.sum(weight))
    return float(np.sum(weight * reward) / total) if total > 0 else float("nan")


def doubly_robust(
    reward: Floats,
    weight: Floats,
    q_logged: Floats,
    v_model: Floats,
    cap: float | None = None,
) -> float:
    """``q_logged`` = q̂(x, a) of the logged action, ``v_model`` = Σₐ π(a|x) q̂(x, a).

    ``cap``: weights above it correct nothing (the decision is left to the reward model): a
    weight that large comes from a choice the logging policy made only by exploring, and a
    handful of such decisions would otherwise swing the whole estimate."""
    if not len(reward):
        return float("nan")
    w = weight if cap is None else np.where(weight > cap, 0.0, weight)
    return float(np.mean(v_model + w * (reward - q_logged)))


class Interval(BaseModel):
    estimate: float
    low: float
    high: float


def bootstrap(
    estimator: Callable[[npt.NDArray[np.intp]], float],
    n: int,
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> Interval:
    """Percentile bootstrap of ``estimator(indices)`` over ``n`` independent decisions."""
    rng = np.random.default_rng(seed)
    everything = np.arange(n)
    values = np.array([estimator(rng.integers(0, n, size=n)) for _ in range(resamples)])
    values = values[np.isfinite(values)]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail]) if len(values) else (np.nan, np.nan)
    return Interval(estimate=estimator(everything), low=float(lo), high=float(hi))


# ---------------------------------------------------------------- ranking metrics


def ndcg_at_k(labels: Floats, scores: Floats, k: int) -> float:
    order = np.argsort(-scores, kind="stable")[:k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    gains = (2.0 ** labels[order] - 1.0) @ discounts[: len(order)]
    ideal_order = np.sort(labels)[::-1][:k]
    ideal = (2.0**ideal_order - 1.0) @ discounts[: len(ideal_order)]
    return float(gains / ideal) if ideal > 0 else float("nan")


def average_precision(relevant: npt.NDArray[np.bool_], scores: Floats) -> float:
    order = np.argsort(-scores, kind="stable")
    hits = relevant[order]
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(np.sum(precision * hits) / hits.sum())


def ranking_metrics(labels: Floats, scores: Floats, groups: list[int], k: int) -> dict[str, float]:
    """Mean NDCG@k and MAP (relevant = label > 0) over queries that have a positive."""
    ndcgs: list[float] = []
    aps: list[float] = []
    start = 0
    for size in groups:
        lab, sc = labels[start : start + size], scores[start : start + size]
        start += size
        ndcgs.append(ndcg_at_k(lab, sc, k))
        aps.append(average_precision(lab > 0, sc))
    n = [v for v in ndcgs if np.isfinite(v)]
    a = [v for v in aps if np.isfinite(v)]
    return {
        f"ndcg@{k}": float(np.mean(n)) if n else float("nan"),
        "map": float(np.mean(a)) if a else float("nan"),
        "queries_scored": float(len(n)),
    }


# ---------------------------------------------------------------- the target policy


def epsilon_greedy(scores: Floats, epsilon: float) -> Floats:
    """π(·|x) of ε-greedy over one decision's candidates (ties: the first, as the engine)."""
    n = len(scores)
    probs = np.full(n, epsilon / n)
    probs[int(np.argmax(scores))] += 1 - epsilon
    return probs


def softmax(scores: Floats, temperature: float) -> Floats:
    """π(·|x) of the first slot of ``services.decision.policy.Softmax``: exp(sᵢ/T) / Σ exp(sⱼ/T)."""
    z = np.exp((scores - np.max(scores)) / temperature)
    return np.asarray(z / z.sum(), dtype=np.float64)


@dataclass(frozen=True)
class TargetPolicy:
    """The exploration the evaluated model will serve with (``NBV_EXPLORATION_POLICY``, and
    ``NBV_EXPLORATION_EPSILON`` or ``NBV_EXPLORATION_TEMPERATURE``): its value is the one the
    estimates are of, exploration included."""

    kind: Literal["epsilon_greedy", "softmax"] = "epsilon_greedy"
    epsilon: float = 0.1
    temperature: float = 0.1

    def probabilities(self, scores: Floats) -> Floats:
        if self.kind == "softmax":
            return softmax(scores, self.temperature)
        return epsilon_greedy(scores, self.epsilon)

    @property
    def name(self) -> str:
        if self.kind == "softmax":
            return f"softmax({self.temperature:g})"
        return f"epsilon-greedy({self.epsilon:g})"


@dataclass
class Bandit:
    """One decision per entry: its candidates' target probabilities and the logged action."""

    reward: list[float] = field(default_factory=list)
    mu: list[float] = field(default_factory=list)
    pi_logged: list[float] = field(default_factory=list)
    q_logged: list[float] = field(default_factory=list)
    v_model: list[float] = field(default_factory=list)

    def arrays(self) -> tuple[Floats, Floats, Floats, Floats]:
        mu = np.asarray(self.mu)
        return (
            np.asarray(self.reward),
            np.asarray(self.pi_logged) / mu,
            np.asarray(self.q_logged),
            np.asarray(self.v_model),
        )


def reward_model(data: LogData) -> Callable[[Floats], Floats]:
    """q̂(x, a): a logistic regression of completion on the features of shown cards."""
    shown = data.take(data.shown)
    y = shown.reward > 0
    if y.all() or not y.any():
        rate = float(y.mean()) if len(y) else 0.0
        return lambda x: np.full(len(x), rate)
    x = np.nan_to_num(shown.features, nan=0.0)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-9
    model = LogisticRegression(C=1.0, max_iter=500)
    model.fit((x - mean) / std, y)

    def predict(features: Floats) -> Floats:
        z = (np.nan_to_num(features, nan=0.0) - mean) / std
        return np.asarray(model.predict_proba(z)[:, 1], dtype=np.float64)

    return predict


def arbitration_scores(ranker: LightGBMRanker, features: Floats, lever: Floats) -> Floats:
    """The decision service's ranking score: P(success) × value weight × lever."""
    p = ranker.p_success(features, ranker.score(features))
    return np.asarray(
        final_scores(list(p), list(features[:, INDEX["value_weight"]]), list(lever)),
        dtype=np.float64,
    )


# A logged first-slot propensity this close to 1 was not the exploration policy's draw among
# several candidates (which always leaves the others some chance) but a rule's requirement or
# the only candidate: any target policy makes the same choice.
CERTAIN = 1.0 - 1e-6


def logged_bandit(
    data: LogData,
    policy_scores: Callable[[Floats, Floats], Floats],
    q_hat: Callable[[Floats], Floats],
    target: TargetPolicy | float,
) -> Bandit:
    """The first-slot bandit feedback of each decision, under the target policy (a float:
    ε-greedy with that ε)."""
    policy = target if isinstance(target, TargetPolicy) else TargetPolicy(epsilon=target)
    out = Bandit()
    order = np.argsort(data.decision_id, kind="stable")
    ids = data.decision_id[order]
    bounds = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1], True])
    for b in range(len(bounds) - 1):
        rows = order[bounds[b] : bounds[b + 1]]
        block = data.take(rows)
        first = np.flatnonzero(block.shown & (block.propensity > 0) & (block.rank == 1))
        if len(first) == 0:
            continue  # nothing shown in the first slot, or no propensity to weigh it by
        a = int(first[0])
        if block.propensity[a] >= CERTAIN:
            pi = np.zeros(len(block))
            pi[a] = 1.0
        else:
            pi = policy.probabilities(policy_scores(block.features, block.lever))
        q = q_hat(block.features)
        out.reward.append(float(block.reward[a]))
        out.mu.append(float(block.propensity[a]))
        out.pi_logged.append(float(pi[a]))
        out.q_logged.append(float(q[a]))
        out.v_model.append(float(pi @ q))
    return out


def first_card_value(data: LogData, model_version: str | None = None) -> tuple[float, int]:
    """The on-policy value the off-policy estimates predict: mean reward of the first card
    shown per decision (optionally only the decisions ``model_version`` served), and how many
    decisions that is. Same rows as ``logged_bandit`` uses."""
    first = data.shown & (data.propensity > 0) & (data.rank == 1)
    if model_version is not None:
        first &= data.model_version == model_version
    rewards = data.reward[first]
    return (float(rewards.mean()) if len(rewards) else float("nan")), len(rewards)


class OffPolicy(BaseModel):
    decisions: int
    logged_value: Interval
    ips: Interval
    snips: Interval
    dr: Interval
    # DR whose correction skips weights above ``weight_cap`` (None: not computed).
    dr_capped: Interval | None = None
    weight_cap: float | None = None
    # Decisions whose weight is above the cap.
    capped: int = 0
    mean_weight: float
    effective_sample_size: float


def off_policy(
    bandit: Bandit, resamples: int, seed: int, weight_cap: float | None = None
) -> OffPolicy:
    r, w, q, v = bandit.arrays()
    n = len(r)
    return OffPolicy(
        dr_capped=(
            bootstrap(
                lambda i: doubly_robust(r[i], w[i], q[i], v[i], weight_cap), n, resamples, seed
            )
            if weight_cap is not None
            else None
        ),
        weight_cap=weight_cap,
        capped=int((w > weight_cap).sum()) if weight_cap is not None else 0,
        decisions=n,
        logged_value=bootstrap(lambda i: float(np.mean(r[i])), n, resamples, seed),
        ips=bootstrap(lambda i: ips(r[i], w[i]), n, resamples, seed),
        snips=bootstrap(lambda i: snips(r[i], w[i]), n, resamples, seed),
        dr=bootstrap(lambda i: doubly_robust(r[i], w[i], q[i], v[i]), n, resamples, seed),
        mean_weight=float(np.mean(w)) if n else float("nan"),
        effective_sample_size=float(w.sum() ** 2 / (w**2).sum()) if n and w.any() else 0.0,
    )


class Evaluation(BaseModel):
    held_out_from: str
    held_out_rows: int
    ranking: dict[str, float]
    rule_prior_ranking: dict[str, float]
    off_policy: OffPolicy


def evaluate_model(
    ranker: LightGBMRanker,
    data: LogData,
    split_us: int,
    *,
    k: int,
    epsilon: float,
    resamples: int,
    seed: int,
    group_by: str = "user",
    target: TargetPolicy | None = None,
    weight_cap: float | None = None,
) -> Evaluation:
    """Ranking metrics and off-policy value of ``ranker`` on the decisions from ``split_us``.
    ``target``: the exploration the model will serve with (default: ε-greedy with ``epsilon``);
    ``weight_cap``: also report DR with the weights above it left to the reward model."""
    from models.logdata import utc

    train = data.take(data.decided_at < split_us)
    held = data.take(data.decided_at >= split_us)
    queries, groups = held.ranking_queries("decision" if group_by == "decision" else "user")
    ranking = ranking_metrics(queries.label, ranker.score(queries.features), groups, k)
    prior = ranking_metrics(queries.label, queries.features[:, INDEX["rule_score"]], groups, k)
    bandit = crossfit_bandit(
        train,
        held,
        lambda f, lever: arbitration_scores(ranker, f, lever),
        target or TargetPolicy(epsilon=epsilon),
    )
    return Evaluation(
        held_out_from=utc(split_us).isoformat(),
        held_out_rows=len(held),
        ranking=ranking,
        rule_prior_ranking=prior,
        off_policy=off_policy(bandit, resamples, seed, weight_cap),
    )


def crossfit_bandit(
    train: LogData,
    held: LogData,
    policy_scores: Callable[[Floats, Floats], Floats],
    target: TargetPolicy,
    folds: int = 2,
) -> Bandit:
    """The held-out bandit feedback with a cross-fitted reward model: the decisions of each
    fold get a q̂ fitted on the training period and the other folds, never on themselves (so
    DR's correction stays unbiased), yet close in time to them (the rate of completions drifts
    from week to week, and a q̂ fitted on older weeks only would carry that drift into DR)."""
    ids = np.unique(held.decision_id)
    fold_of = {d: i % folds for i, d in enumerate(ids)}
    fold = np.asarray([fold_of[d] for d in held.decision_id], dtype=np.int64)
    out = Bandit()
    for k in range(folds):
        fit_on = concat(train, held.take(fold != k))
        q_hat = reward_model(fit_on if fit_on.shown.any() else held)
        part = logged_bandit(held.take(fold == k), policy_scores, q_hat, target)
        for name in ("reward", "mu", "pi_logged", "q_logged", "v_model"):
            getattr(out, name).extend(getattr(part, name))
    return out


def concat(a: LogData, b: LogData) -> LogData:
    return LogData(
        **{
            name: np.concatenate([getattr(a, name), getattr(b, name)])
            for name in a.__dataclass_fields__
        }
    )
