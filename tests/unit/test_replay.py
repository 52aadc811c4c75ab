"""bench/replay.py: the log as a retrain saw it, and scoring a ranking by the hidden truth."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from bench import replay
from models.features import FEATURES, INDEX
from models.logdata import Floats, LogData

HOUR_US = replay.HOUR_US


def _log(rows: Sequence[Mapping[str, object]]) -> LogData:
    n = len(rows)

    def col(name: str, default: object, dtype: type[np.generic]) -> npt.NDArray[Any]:
        return np.array([r.get(name, default) for r in rows], dtype=dtype)

    features = np.zeros((n, len(FEATURES)))
    features[:, INDEX["value_weight"]] = 1.0
    features[:, INDEX["effort_minutes"]] = col("effort", 5.0, np.float64)
    return LogData(
        features=features,
        label=col("label", 0.0, np.float64),
        reward=col("reward", 0.0, np.float64),
        propensity=col("propensity", math.nan, np.float64),
        shown=col("shown", False, np.bool_),
        decided_at=col("at", 0, np.int64),
        decision_id=col("decision", "d", np.str_),
        user_id=col("user", "u", np.str_),
        element_id=col("element", "e", np.str_),
        model_version=col("version", "rules-v1", np.str_),
        lever=np.ones(n),
        rank=col("rank", -1, np.int64),
        completed_after_h=col("completed_after_h", math.nan, np.float64),
        shown_after_h=col("shown_after_h", math.nan, np.float64),
    )


def test_the_log_as_of_a_retrain_has_only_what_was_reported_by_then() -> None:
    cutoff = 100 * HOUR_US
    data = _log(
        [
            # completed 10 h after a decision made 50 h before the cutoff: known
            {"at": 50 * HOUR_US, "shown": True, "shown_after_h": 1.0, "reward": 1.0,
             "label": 2.0, "completed_after_h": 10.0},
            # completed 60 h after a decision made 50 h before: not yet
            {"at": 50 * HOUR_US, "shown": True, "shown_after_h": 1.0, "reward": 1.0,
             "label": 2.0, "completed_after_h": 60.0},
            # first shown after the cutoff: not shown yet
            {"at": 90 * HOUR_US, "shown": True, "shown_after_h": 20.0},
            # decided after the cutoff: not there
            {"at": 120 * HOUR_US, "shown": True, "shown_after_h": 0.0},
        ]
    )  # fmt: skip
    seen = replay.as_of(data, cutoff)
    assert len(seen) == 3
    assert seen.reward.tolist() == [1.0, 0.0, 0.0]
    assert seen.label.tolist() == [2.0, 1.0, 0.0]
    assert math.isnan(seen.completed_after_h[1])
    assert seen.shown.tolist() == [True, True, False]


def test_a_ranking_is_scored_by_the_hidden_p_of_the_card_it_puts_first() -> None:
    # Two decisions of week 1 over three eligible elements; d2's first card was required.
    rows = [
        {"decision": d, "element": e, "rank": 1 if e == logged else -1, "propensity": p,
         "effort": effort, "at": HOUR_US}
        for d, logged, p in (("d1", "a", 0.5), ("d2", "c", 1.0))
        for e, effort in (("a", 30.0), ("b", 5.0), ("c", 60.0))
    ]  # fmt: skip
    truth = {
        "d1": {"a": 0.1, "b": 0.4, "c": 0.0},
        "d2": {"a": 0.2, "b": 0.3, "c": 0.1},
    }
    arm = replay.Arm("ranker", _log(rows), truth, np.ones(len(rows), np.int64), {1: HOUR_US})

    def least_effort(features: Floats, lever: Floats) -> Floats:
        return np.asarray(-features[:, INDEX["effort_minutes"]], dtype=np.float64)

    s = replay.score_week(least_effort, arm, 1, greedy=False)
    assert s.decisions == 2
    # d1: the model's "b" is the best (0.4); d2: the required "c" stays first (0.1).
    assert math.isclose(s.chosen, 0.4 + 0.1)
    assert math.isclose(s.best, 0.4 + 0.3)
    assert math.isclose(s.logged, 0.1 + 0.1)
    assert math.isclose(s.uniform, 0.5 / 3 + 0.6 / 3)
    # Logged greedily (ε = 0), a propensity of 1 says nothing: the model picks in d2 too.
    greedy = replay.score_week(least_effort, arm, 1, greedy=True)
    assert math.isclose(greedy.chosen, 0.4 + 0.3)
    # Another week: nothing scored.
    assert replay.score_week(least_effort, arm, 2, greedy=False).decisions == 0
