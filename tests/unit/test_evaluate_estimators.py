"""Off-policy estimators on synthetic logs where the target policy's true value is known."""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluate import (
    average_precision,
    bootstrap,
    doubly_robust,
    epsilon_greedy,
    ips,
    ndcg_at_k,
    ranking_metrics,
    snips,
)


def _world(seed: int, n: int = 20_000, k: int = 5):
    """Contexts with k actions; the logging policy is a softmax of a noisy score, the target
    ε-greedy on the true mean reward. Returns logged data and the target's true value."""
    rng = np.random.default_rng(seed)
    mu_reward = rng.uniform(0.05, 0.6, size=(n, k))
    logits = rng.normal(size=(n, k))
    logging = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    actions = np.array([rng.choice(k, p=p) for p in logging])
    rows = np.arange(n)
    reward = (rng.random(n) < mu_reward[rows, actions]).astype(float)
    target = np.array([epsilon_greedy(m, 0.1) for m in mu_reward])
    true_value = float((target * mu_reward).sum(axis=1).mean())
    weight = target[rows, actions] / logging[rows, actions]
    # A deliberately imperfect reward model: right on average, wrong per action.
    q = np.clip(mu_reward + rng.normal(0, 0.1, size=(n, k)), 0, 1)
    return reward, weight, q[rows, actions], (target * q).sum(axis=1), true_value


@pytest.mark.parametrize("seed", [1, 2])
def test_ips_snips_dr_recover_the_true_value(seed: int) -> None:
    reward, weight, q_logged, v_model, truth = _world(seed)
    for estimate in (
        ips(reward, weight),
        snips(reward, weight),
        doubly_robust(reward, weight, q_logged, v_model),
    ):
        assert abs(estimate - truth) / truth < 0.05


def test_dr_has_lower_error_than_ips_with_a_good_reward_model() -> None:
    errors_ips, errors_dr = [], []
    for seed in range(5):
        reward, weight, q_logged, v_model, truth = _world(seed, n=2_000)
        errors_ips.append(abs(ips(reward, weight) - truth))
        errors_dr.append(abs(doubly_robust(reward, weight, q_logged, v_model) - truth))
    assert np.mean(errors_dr) < np.mean(errors_ips)


def test_bootstrap_interval_covers_the_truth() -> None:
    reward, weight, _, _, truth = _world(3, n=5_000)
    interval = bootstrap(lambda i: snips(reward[i], weight[i]), len(reward), 200, seed=1)
    assert interval.low <= truth <= interval.high
    assert interval.low < interval.estimate < interval.high


def test_epsilon_greedy_probabilities() -> None:
    p = epsilon_greedy(np.array([0.1, 0.9, 0.3, 0.9]), 0.2)
    assert p.sum() == pytest.approx(1.0)
    assert p[1] == pytest.approx(0.8 + 0.05)  # ties go to the first, like the engine
    assert p[3] == pytest.approx(0.05)


def test_ranking_metrics_by_hand() -> None:
    labels = np.array([0.0, 2.0, 1.0])
    perfect = np.array([0.0, 1.0, 0.5])
    assert ndcg_at_k(labels, perfect, 3) == pytest.approx(1.0)
    worst = np.array([1.0, 0.0, 0.5])
    # Gains 0, 1, 3 at ranks 1..3 against the ideal 3, 1, 0.
    ideal = 3 + 1 / np.log2(3)
    assert ndcg_at_k(labels, worst, 3) == pytest.approx((1 / np.log2(3) + 3 / 2) / ideal)
    assert average_precision(labels > 0, worst) == pytest.approx((1 / 2 + 2 / 3) / 2)
    metrics = ranking_metrics(np.r_[labels, 0.0, 0.0], np.r_[perfect, 0.1, 0.2], [3, 2], k=3)
    assert metrics["ndcg@3"] == pytest.approx(1.0)  # the all-zero query is not scored
    assert metrics["queries_scored"] == 1
