"""The off-policy estimate and the achieved value measure the same thing: the target policy is
the one that serves (its exploration included, rule-required cards as they are), and the reward
is counted within the same window on both sides."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from models.evaluate import (
    TargetPolicy,
    doubly_robust,
    first_card_value,
    ips,
    logged_bandit,
    snips,
    softmax,
)
from models.features import FEATURES
from models.logdata import LogData
from services.decision.policy import Softmax
from tests.factories import log_table

T0 = datetime(2026, 6, 1, 9, tzinfo=UTC)


def test_softmax_target_is_the_served_first_slot_probability() -> None:
    scores = [0.02, 0.31, 0.18, 0.05, 0.31]
    policy = Softmax(0.03, random.Random(4))
    pi = softmax(np.asarray(scores), 0.03)
    assert pi.sum() == pytest.approx(1.0)
    for _ in range(50):
        pick = policy.choose(scores, 1)[0]
        assert pick.propensity == pytest.approx(pi[pick.index])
    assert TargetPolicy("softmax", temperature=0.03).probabilities(np.asarray(scores)) == (
        pytest.approx(pi)
    )


def _synthetic_log(
    seed: int, decisions: int, k: int = 6, temperature: float = 0.05
) -> tuple[LogData, float]:
    """Decisions among ``k`` candidates whose true completion probability is feature 0. The
    logging policy is a softmax over a noisy score (an older model); the target a softmax over
    the true probability. Returns the log and the target's true first-card value."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    blocks: list[np.ndarray] = []
    truth = 0.0
    for d in range(decisions):
        p = rng.uniform(0.0, 0.4, size=k)
        old = p + rng.normal(0.0, 0.08, size=k)
        mu = softmax(old, temperature)
        a = int(rng.choice(k, p=mu))
        done = rng.random() < p[a]
        truth += float(softmax(p, temperature) @ p)
        features = np.zeros((k, len(FEATURES)))
        features[:, 0] = p
        blocks.append(features)
        for i in range(k):
            rows.append(
                {
                    "decision_id": f"d{d:05d}",
                    "user_id": f"u{d % 97}",
                    "element_id": f"e{i}",
                    "model_version": "old",
                    "label": 2 if i == a and done else 0,
                    "reward": 1.0 if i == a and done else 0.0,
                    "propensity": float(mu[a]) if i == a else math.nan,
                    "shown": i == a,
                    "lever": 1.0,
                    "rank": 1 if i == a else -1,
                    "completed_after_h": 0.1 if i == a and done else math.nan,
                    "decided_at": T0 + timedelta(minutes=d),
                }
            )
    return LogData.from_table(log_table(rows, np.vstack(blocks))), truth / decisions


@pytest.mark.parametrize("seed", [1, 2])
def test_estimates_recover_a_softmax_target_from_a_softmax_log(seed: int) -> None:
    data, truth = _synthetic_log(seed, 6_000)
    target = TargetPolicy("softmax", temperature=0.05)
    q_hat = lambda f: np.clip(f[:, 0] + 0.05, 0, 1)  # noqa: E731 - biased on purpose
    bandit = logged_bandit(data, lambda f, lever: f[:, 0], q_hat, target)
    r, w, q, v = bandit.arrays()
    assert len(r) == 6_000
    for estimate in (ips(r, w), snips(r, w), doubly_robust(r, w, q, v)):
        assert abs(estimate - truth) / truth < 0.06


def test_a_required_card_weighs_one_whatever_the_scores() -> None:
    """A rule required the card (logged propensity 1): the model would have shown it too."""
    features = np.zeros((3, len(FEATURES)))
    features[:, 0] = [0.9, 0.1, 0.5]  # the model prefers another card by far
    rows = [
        {
            "decision_id": "d1",
            "user_id": "u",
            "element_id": f"e{i}",
            "model_version": "rules-v1",
            "label": 0,
            "reward": 1.0 if i == 1 else 0.0,
            "propensity": 1.0 if i == 1 else math.nan,
            "shown": i == 1,
            "lever": 1.0,
            "rank": 1 if i == 1 else -1,
            "completed_after_h": 0.2 if i == 1 else math.nan,
            "decided_at": T0,
        }
        for i in range(3)
    ]
    data = LogData.from_table(log_table(rows, features))
    bandit = logged_bandit(
        data, lambda f, lever: f[:, 0], lambda f: f[:, 0], TargetPolicy("softmax", 0, 0.01)
    )
    _, w, q, v = bandit.arrays()
    assert w.tolist() == [1.0]
    assert v.tolist() == q.tolist() == [0.1]


def _first_card(
    i: int, decided_at: datetime, completed_after_h: float | None, **extra: object
) -> dict[str, object]:
    """Decision ``d{i}``'s shown first card, completed ``completed_after_h`` after it (None:
    never), propensity 0.5."""
    done = completed_after_h is not None
    return {
        "decision_id": f"d{i}",
        "user_id": "u",
        "element_id": "e",
        "model_version": "m",
        "label": 2 if done else 0,
        "reward": 1.0 if done else 0.0,
        "propensity": 0.5,
        "shown": True,
        "lever": 1.0,
        "rank": 1,
        "completed_after_h": math.nan if completed_after_h is None else completed_after_h,
        "decided_at": decided_at,
        **extra,
    }


def test_rewards_count_within_the_window_and_open_windows_are_left_out() -> None:
    features = np.zeros((4, len(FEATURES)))
    rows = [
        _first_card(i, T0 + timedelta(days=i), after)
        for i, after in enumerate([0.2, 30.0, None, 0.1])
    ]
    data = LogData.from_table(log_table(rows, features))
    # Observed on day 3 at 15:00: day 3's window (12 h) is still open.
    seen = data.within(12.0, int((T0 + timedelta(days=3, hours=6)).timestamp() * 1e6))
    assert list(seen.decision_id) == ["d0", "d1", "d2"]
    assert seen.reward.tolist() == [1.0, 0.0, 0.0]  # d1 was completed after 30 h: too late
    value, decisions = first_card_value(seen, "m")
    assert value == pytest.approx(1 / 3) and decisions == 3
    later = data.within(12.0, int((T0 + timedelta(days=4)).timestamp() * 1e6))
    assert later.reward.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_a_card_first_shown_after_its_window_is_out_of_both_sides() -> None:
    """A card decided on for someone not in the product (a trigger at night, an absence) is
    first shown days later: when the estimate is made it is not shown yet, so the achieved
    value must not count it either (it could earn no reward in its window anyway)."""
    features = np.zeros((3, len(FEATURES)))
    rows = [
        _first_card(i, T0 + timedelta(hours=i), 0.5 if i == 0 else None, shown_after_h=shown_after)
        for i, shown_after in enumerate([0.0, 40.0, 3.0])
    ]
    data = LogData.from_table(log_table(rows, features))
    # At the retrain (a day later) d1 was not shown yet; at the end it was: the same rows count.
    at_retrain = data.within(12.0, int((T0 + timedelta(days=1)).timestamp() * 1e6))
    at_end = data.within(12.0, int((T0 + timedelta(days=9)).timestamp() * 1e6))
    for seen in (at_retrain, at_end):
        assert seen.shown.tolist() == [True, False, True]
        value, decisions = first_card_value(seen, "m")
        assert value == pytest.approx(0.5) and decisions == 2
    # An export from before shown_after_h was recorded: shown cards count as shown when decided.
    old = [{k: v for k, v in r.items() if k != "shown_after_h"} for r in rows]
    assert LogData.from_table(log_table(old, features)).within(12.0, 2**62).shown.all()


def test_export_records_when_the_card_was_completed() -> None:
    from models.export import decision_rows
    from services.decision.library import load_library
    from tests.unit.test_simulator_world import _served_decision

    library = {e.id: e for e in load_library().elements}
    row, _, ids = _served_decision(full_log=True)
    decided = row.created_at  # type: ignore[attr-defined]
    out = decision_rows(
        row,  # type: ignore[arg-type]
        library,
        {ids[2]: ["shown", "completed"]},
        {ids[2]: decided + timedelta(hours=26)},
        {ids[2]: decided + timedelta(hours=20)},
    )
    chosen = [m for m in out.meta if m["shown"]]
    assert chosen[0]["completed_after_h"] == pytest.approx(26.0)
    assert chosen[0]["shown_after_h"] == pytest.approx(20.0)
    assert all(math.isnan(m["completed_after_h"]) for m in out.meta if not m["shown"])
    assert all(math.isnan(m["shown_after_h"]) for m in out.meta if not m["shown"])


def test_capped_dr_leaves_the_largest_weights_to_the_reward_model() -> None:
    reward = np.array([1.0, 0.0, 1.0])
    weight = np.array([1.0, 1.0, 150.0])  # the last: shown only because the old policy explored
    q = np.array([0.2, 0.2, 0.2])
    v = np.array([0.3, 0.3, 0.3])
    assert doubly_robust(reward, weight, q, v, cap=20) == pytest.approx(0.3 + (0.8 - 0.2) / 3)
    assert doubly_robust(reward, weight, q, v) == pytest.approx(0.3 + (0.8 - 0.2 + 120) / 3)


def test_crossfitted_reward_model_follows_a_drifting_rate() -> None:
    """Completions are twice as likely in the held-out period as in training: a reward model
    fitted on the training period alone halves the direct part of DR; cross-fitting on the
    other held-out fold moves it towards the truth, and DR's correction does the rest."""
    from models.evaluate import crossfit_bandit, logged_bandit, reward_model

    early, _ = _synthetic_log(5, 3_000)
    held, truth = _synthetic_log(6, 3_000)
    early = early.take(np.ones(len(early), dtype=bool))
    # The training period: half the completions (every other one dropped).
    done = np.flatnonzero(early.reward > 0)
    reward = early.reward.copy()
    reward[done[::2]] = 0.0
    from dataclasses import replace

    early = replace(early, reward=reward)
    target = TargetPolicy("softmax", temperature=0.05)
    scores = lambda f, lever: f[:, 0]  # noqa: E731
    crossed = crossfit_bandit(early, held, scores, target)
    r, w, q, v = crossed.arrays()
    assert len(r) == 3_000
    assert abs(doubly_robust(r, w, q, v) - truth) / truth < 0.06
    stale = logged_bandit(held, scores, reward_model(early), target)
    assert float(np.mean(stale.v_model)) < 0.6 * truth
    assert float(np.mean(stale.v_model)) < float(np.mean(v)) < truth


def test_a_probabilistic_objective_learns_completions_not_clicks() -> None:
    """Cards of one sort are always clicked and never finished, the others finished one time
    in four: a binary model must rank the second sort first (P(completed), the reward)."""
    from models.fit import TrainConfig, train_from_log

    rng = np.random.default_rng(3)
    n = 2_000
    clicky = rng.random(n) < 0.5
    done = ~clicky & (rng.random(n) < 0.25)
    features = np.zeros((n, len(FEATURES)))
    features[:, 0] = clicky
    features[:, 1] = rng.random(n)
    rows = [
        {
            "decision_id": f"d{i}",
            "user_id": f"u{i % 50}",
            "element_id": "e",
            "model_version": "m",
            "label": 1 if clicky[i] else (2 if done[i] else 0),
            "reward": 1.0 if done[i] else 0.0,
            "propensity": 1.0,
            "shown": True,
            "lever": 1.0,
            "rank": 1,
            "completed_after_h": 0.1 if done[i] else math.nan,
            "decided_at": T0 + timedelta(minutes=i),
        }
        for i in range(n)
    ]
    data = LogData.from_table(log_table(rows, features))
    config = TrainConfig.model_validate(
        {"params": {"objective": "binary", "min_data_in_leaf": 20}, "num_boost_round": 30}
    )
    trained = train_from_log(data, config, progress=False)
    probe = np.zeros((2, len(FEATURES)))
    probe[0, 0] = 1.0
    clicked_only, finished = trained.booster.predict(probe)
    assert finished > clicked_only


def test_a_probabilistic_objective_stops_on_its_own_loss() -> None:
    from models.fit import TrainConfig

    binary = TrainConfig.model_validate({"params": {"objective": "binary"}}).lgb_params()
    assert binary["metric"] == "binary_logloss"
    assert TrainConfig().lgb_params()["metric"] == "ndcg"  # lambdarank
    chosen = TrainConfig.model_validate({"params": {"objective": "binary", "metric": "auc"}})
    assert chosen.lgb_params()["metric"] == "auc"
