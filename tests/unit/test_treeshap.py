"""The tabulated TreeSHAP must equal LightGBM's own ``pred_contrib``, bit for bit up to rounding."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import treeshap
from models.ranker import LightGBMRanker, Matrix
from models.treeshap import ShapTables, compile_tables

N_FEATURES = 5
BASE = {
    "verbose": -1,
    "num_threads": 1,
    "deterministic": True,
    "force_row_wise": True,
    "seed": 0,
    "min_data_in_leaf": 5,
}


def _data(seed: int = 0, rows: int = 400) -> tuple[Matrix, Matrix]:
    """Features with exact zeros everywhere and NaN in column 0, and a label using both."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, N_FEATURES))
    x[rng.random(x.shape) < 0.15] = 0.0
    x[rng.random(rows) < 0.2, 0] = np.nan
    y = np.nan_to_num(x[:, 0], nan=1.5) + (x[:, 1] == 0) + x[:, 2] * x[:, 3]
    return x, y + rng.normal(0, 0.1, rows)


def _train(rounds: int = 15, **params: Any) -> lgb.Booster:
    x, y = _data()
    return lgb.train({**BASE, "objective": "regression", **params}, lgb.Dataset(x, y), rounds)


def _splits(booster: lgb.Booster) -> Iterator[dict[str, Any]]:
    for tree in booster.dump_model()["tree_info"]:
        stack = [tree["tree_structure"]]
        while stack:
            node = stack.pop()
            if "split_index" in node:
                yield node
                stack += [node["left_child"], node["right_child"]]


def _paths(booster: lgb.Booster) -> Iterator[list[int]]:
    """The split features on the path to each leaf."""
    for tree in booster.dump_model()["tree_info"]:
        stack: list[tuple[dict[str, Any], list[int]]] = [(tree["tree_structure"], [])]
        while stack:
            node, path = stack.pop()
            if "split_index" not in node:
                yield path
                continue
            here = [*path, node["split_feature"]]
            stack += [(node["left_child"], here), (node["right_child"], here)]


SPECIAL = [np.nan, 0.0, -0.0, 1e-40, -1e-36, 2.5e-35]  # 1e-35f and below read as 0


def _probes(booster: lgb.Booster, rows: int = 300, seed: int = 1) -> Matrix:
    """Rows that hit every routing case: NaN, ±0, values LightGBM reads as zero, values exactly
    on a threshold of their feature, and ordinary values."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, booster.num_feature()))
    case = rng.random(x.shape)
    x[case < 0.25] = rng.choice(SPECIAL, size=int((case < 0.25).sum()))
    thresholds: dict[int, list[float]] = {}
    for split in _splits(booster):
        thresholds.setdefault(split["split_feature"], []).append(split["threshold"])
    for feature, values in thresholds.items():
        on = (case[:, feature] >= 0.25) & (case[:, feature] < 0.5)
        x[on, feature] = rng.choice(values, size=int(on.sum()))
    return x


def _assert_exact(booster: lgb.Booster, rows: Matrix, tables: ShapTables | None = None) -> None:
    tables = tables or compile_tables(booster)
    assert tables is not None
    got = tables.contributions(rows)
    want = booster.predict(rows, pred_contrib=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    # SHAP values add up to the raw score.
    np.testing.assert_allclose(got.sum(axis=1), booster.predict(rows, raw_score=True), atol=1e-9)


@pytest.fixture(scope="module")
def nan_model() -> lgb.Booster:
    return _train()


def test_missing_types_none_and_nan_match_pred_contrib(nan_model: lgb.Booster) -> None:
    routes = Counter((s["missing_type"], s["default_left"]) for s in _splits(nan_model))
    assert {("None", True), ("NaN", True), ("NaN", False)} <= set(routes)
    _assert_exact(nan_model, _probes(nan_model))


def test_missing_type_zero_matches_pred_contrib() -> None:
    booster = _train(zero_as_missing=True)
    routes = {(s["missing_type"], s["default_left"]) for s in _splits(booster)}
    assert {("Zero", True), ("Zero", False)} <= routes
    _assert_exact(booster, _probes(booster))


def test_nan_read_as_zero_without_missing_values_matches_pred_contrib() -> None:
    booster = _train(use_missing=False)
    assert {s["missing_type"] for s in _splits(booster)} == {"None"}
    _assert_exact(booster, _probes(booster))


def test_lambdarank_matches_pred_contrib() -> None:
    x, y = _data(seed=2, rows=600)
    grades = np.digitize(y, np.quantile(y, [0.5, 0.8, 0.95]))
    booster = lgb.train(
        {**BASE, "objective": "lambdarank", "num_leaves": 15, "max_depth": 6},
        lgb.Dataset(x, grades, group=[6] * 100),
        num_boost_round=20,
    )
    _assert_exact(booster, _probes(booster))


def test_repeated_splits_on_a_feature_merge_into_one_path_feature() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, N_FEATURES))
    booster = lgb.train(
        {**BASE, "objective": "regression", "num_leaves": 31},
        lgb.Dataset(x, np.sin(3 * x[:, 0]) + 0.1 * x[:, 1]),
        num_boost_round=10,
    )
    assert max(max(Counter(path).values()) for path in _paths(booster)) >= 3
    _assert_exact(booster, _probes(booster))


def test_single_leaf_trees_add_only_to_the_bias() -> None:
    x, y = _data()
    constant = lgb.train(
        {**BASE, "objective": "regression", "min_data_in_leaf": 1000}, lgb.Dataset(x, y), 5
    )
    assert constant.num_trees() == 1  # no split possible: a constant tree, then training stops
    rows = _probes(constant)
    _assert_exact(constant, rows)
    tables = compile_tables(constant)
    assert tables is not None
    np.testing.assert_array_equal(tables.contributions(rows)[:, :-1], 0.0)

    grown = lgb.train(
        {**BASE, "objective": "regression"},
        lgb.Dataset(x, y, free_raw_data=False),
        num_boost_round=5,
        init_model=constant,
    )
    assert grown.dump_model()["tree_info"][0]["num_leaves"] == 1
    _assert_exact(grown, _probes(grown))


def test_unsupported_models_are_left_to_pred_contrib() -> None:
    x, y = _data()
    categories = np.abs(np.nan_to_num(x)).astype(int) % 4
    categorical = lgb.train(
        {**BASE, "objective": "regression"},
        lgb.Dataset(categories.astype(float), y, categorical_feature=[0, 1]),
        num_boost_round=5,
    )
    assert any(s["decision_type"] == "==" for s in _splits(categorical))
    assert compile_tables(categorical) is None
    ranker = LightGBMRanker(categorical, "t")
    rows = categories[:5].astype(float)
    contributions = ranker.contributions(rows)
    assert contributions is not None
    np.testing.assert_allclose(contributions, categorical.predict(rows, pred_contrib=True))

    assert compile_tables(_train(rounds=3, linear_tree=True)) is None
    multiclass = lgb.train(
        {**BASE, "objective": "multiclass", "num_class": 3},
        lgb.Dataset(x, np.digitize(y, [0.0, 1.0])),
        num_boost_round=3,
    )
    assert compile_tables(multiclass) is None


def test_leaves_share_tables_no_larger_than_their_own(nan_model: lgb.Booster) -> None:
    tables = compile_tables(nan_model)
    assert tables is not None
    ks = [len(set(path)) for path in _paths(nan_model)]
    # Two cells are constants: 0 and the bias.
    assert tables.tables.size - 2 <= sum((1 << k) * k for k in ks)
    assert tables.pair_group.size - (N_FEATURES + 1) < sum(ks) / 1.5


def test_deep_trees_read_in_tiers_match_pred_contrib(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2000, N_FEATURES))
    x[rng.random(x.shape) < 0.1] = np.nan
    near = np.nan_to_num(x)
    y = np.sin(3 * near[:, 0]) + np.cos(2 * near[:, 1]) + 0.3 * near[:, 2] ** 2
    booster = lgb.train(
        {**BASE, "objective": "regression", "num_leaves": 63, "min_data_in_leaf": 3},
        lgb.Dataset(x, y),
        num_boost_round=8,
    )
    assert max(len(path) for path in _paths(booster)) >= 10
    # One tier per number of conditions, as many groups of deep trees would get.
    monkeypatch.setattr(treeshap, "TIER_COST", 0)
    tables = compile_tables(booster)
    assert tables is not None
    assert len(tables.tiers) >= 5
    _assert_exact(booster, _probes(booster), tables)


def test_any_number_of_rows(nan_model: lgb.Booster) -> None:
    tables = compile_tables(nan_model)
    assert tables is not None
    assert tables.contributions(np.empty((0, N_FEATURES))).shape == (0, N_FEATURES + 1)
    rows = _probes(nan_model, rows=7)
    one_by_one = np.vstack([tables.contributions(row[None]) for row in rows])
    np.testing.assert_allclose(tables.contributions(rows), one_by_one, rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        tables.contributions(rows[:, :-1])


def test_size_limits_fall_back(nan_model: lgb.Booster) -> None:
    tables = compile_tables(nan_model)
    assert tables is not None
    assert compile_tables(nan_model, max_table_bytes=tables.tables.nbytes) is not None
    assert compile_tables(nan_model, max_table_bytes=tables.tables.nbytes - 1) is None
    longest = max(len(set(path)) for path in _paths(nan_model))
    assert compile_tables(nan_model, max_path_features=longest) is not None
    assert compile_tables(nan_model, max_path_features=longest - 1) is None
    with pytest.raises(ValueError):
        compile_tables(nan_model, max_path_features=17)


def test_huge_values_are_explained_by_lightgbm(nan_model: lgb.Booster) -> None:
    rows = _probes(nan_model, rows=4)
    rows[1, 2], rows[2, 3], rows[3, 0] = 1e308, -np.inf, np.inf
    tables = compile_tables(nan_model)
    assert tables is not None
    np.testing.assert_allclose(
        tables.contributions(rows), nan_model.predict(rows, pred_contrib=True), atol=1e-9
    )


def test_ranker_serves_contributions_from_the_tables(nan_model: lgb.Booster) -> None:
    ranker = LightGBMRanker(nan_model, "t")
    assert ranker._shap is not None
    rows = _probes(nan_model, rows=10)
    contributions = ranker.contributions(rows)
    assert contributions is not None
    np.testing.assert_allclose(
        contributions, nan_model.predict(rows, pred_contrib=True), rtol=0, atol=1e-9
    )


@pytest.fixture(scope="module")
def nan_tables(nan_model: lgb.Booster) -> ShapTables:
    tables = compile_tables(nan_model)
    assert tables is not None
    return tables


_VALUES = st.one_of(
    st.floats(-4.0, 4.0),
    st.sampled_from(SPECIAL),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.data(),
    rows=st.lists(
        st.lists(_VALUES, min_size=N_FEATURES, max_size=N_FEATURES), min_size=1, max_size=6
    ),
)
def test_any_rows_match_pred_contrib(
    nan_model: lgb.Booster, nan_tables: ShapTables, data: st.DataObject, rows: list[list[float]]
) -> None:
    x = np.array(rows)
    # A value exactly on a threshold decides the ``<=``: put some of the model's own in.
    splits = sorted({(s["split_feature"], s["threshold"]) for s in _splits(nan_model)})
    for row, (feature, threshold) in enumerate(
        data.draw(st.lists(st.sampled_from(splits), max_size=2 * len(rows)))
    ):
        x[row % len(x), feature] = threshold
    _assert_exact(nan_model, x, nan_tables)
