"""Exact SHAP values of a LightGBM model by table look-up, after Fast TreeSHAP v2.

LightGBM's ``pred_contrib`` runs TreeSHAP (Lundberg et al. 2020, "From local explanations to
global understanding with explainable AI for trees", Algorithm 2) for every row: a walk of every
tree that extends and unwinds the path's permutation weights, O(leaves × depth²) per tree.
Fast TreeSHAP v2 (Yang 2021, "Fast TreeSHAP: Accelerating SHAP Value Computation for Trees",
arXiv:2109.09847) moves everything that does not depend on the row to load time.

A leaf's part in the SHAP values depends on the row only through which of its path's conditions
the row meets. Merge the path's splits on the same feature into one of the leaf's k unique
features, as TreeSHAP does with repeated features: feature j's condition is the conjunction of
its splits, its zero fraction z_j the product of their cover ratios, and o_j is 1 when the row
meets the condition, else 0. A leaf of value v then adds to feature j

    φ_j = v (o_j − z_j) Σ_{S ⊆ U∖{j}} |S|! (k − |S| − 1)! / k! · Π_{i∈S} o_i · Π_{i∉S∪{j}} z_i,

a function of the k bits o alone. The tables hold φ for each leaf and each of its 2^k bit
patterns. Serving a row evaluates every split once, derives each leaf's pattern from its
parent's (the bits of the path's conditions the row has missed so far) and adds up looked-up
values. The bias column is each tree's cover-weighted mean leaf value, summed.

The sum is cheap to tabulate: with o binary it runs over subsets S of the met conditions
B = {i ≠ j : o_i = 1}, and factors as Π_{i∉B∪{j}} z_i · G(B) with
G(C) = Σ_m w(|C| − m) e_m(z_C), where w(s) = s! (k − s − 1)! / k! and e_m is the m-th
elementary symmetric polynomial of the zero fractions in C. A subset recurrence gives e (hence
G and the products of z) for all 2^k subsets in O(2^k k) per leaf.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from models.ranker import Matrix, Vector

# LightGBM's kZeroThreshold is the float literal 1e-35f: its predictor reads any |x| up to it
# as 0, and that is the "zero" of missing type Zero.
ZERO_THRESHOLD = float(np.float32(1e-35))
# LightGBM clamps thresholds to ±1e300 (Common::AvoidInf); rather than mirror how values out
# there route, calls with such values are left to LightGBM.
HUGE = 1e300
# Bit patterns are uint16; 2^k table rows per leaf make a larger k too costly anyway.
MAX_PATH_FEATURES = 16
MAX_TABLE_BYTES = 64 << 20

# How a split reads its feature, as blocks of the row's extended values (see ``_extend``):
# missing type None compares NaN as 0; NaN sends NaN, Zero sends NaN and zero, the default way.
COMPARED, NAN_LEFT, NAN_RIGHT, ZERO_LEFT, ZERO_RIGHT = range(5)

Ints = npt.NDArray[np.intp]
Bits = npt.NDArray[np.uint16]


def _extend(x: Matrix, magnitude: Matrix) -> Matrix:
    """Each row's values once per reading (``magnitude`` is |x|): ±inf sends a value the default
    way, left or right, past any finite threshold, so that every split is one ``<=``."""
    nan = np.isnan(x)
    zero = nan | (magnitude <= ZERO_THRESHOLD)
    compared = np.where(zero, 0.0, x)
    return np.concatenate(
        (
            compared,
            np.where(nan, -np.inf, compared),
            np.where(nan, np.inf, compared),
            np.where(zero, -np.inf, x),
            np.where(zero, np.inf, x),
        ),
        axis=1,
    )


@dataclass(frozen=True, eq=False)
class ShapTables:
    """The tabulated TreeSHAP of one booster; ``contributions`` equals its ``pred_contrib``."""

    booster: lgb.Booster
    n_features: int
    bias: float
    # One entry per split (all trees), ordered by depth: its column of the extended row, its
    # threshold and its own entry among the children (-1 for a root).
    split_value: Ints
    split_threshold: Vector
    split_position: Ints
    # The splits at each depth from 1 on, as (start, end).
    levels: tuple[tuple[int, int], ...]
    # One entry per child, [left children | right children] in split order: the bit of the
    # split's unique feature on the path to it, unmet when the row goes the other way.
    child_bit: Bits
    # One entry per (leaf, unique feature), sorted by feature: the leaf's φ for that feature
    # sits at tables[pair_base + missed], missed being the bits of the conditions it does not
    # meet, found at the leaf's child entry.
    pair_child: Ints
    pair_base: Ints
    feature_start: Ints
    feature_index: Ints
    tables: Vector

    @property
    def nbytes(self) -> int:
        return sum(value.nbytes for value in vars(self).values() if isinstance(value, np.ndarray))

    def contributions(self, features: Matrix) -> Matrix:
        """Per-feature SHAP contributions (last column: the bias), as ``pred_contrib``."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected rows of {self.n_features} features, got {x.shape}")
        magnitude = np.abs(x)
        if np.any(magnitude > HUGE):
            return np.asarray(
                self.booster.predict(x, pred_contrib=True, num_threads=1), dtype=np.float64
            )
        out = np.zeros((x.shape[0], self.n_features + 1))
        out[:, -1] = self.bias
        if not self.pair_child.size:
            return out
        n = self.split_value.size
        # Row by row: np.take on 1-D arrays gathers several times faster than indexing
        # along the rows of a 2-D array.
        for row, values in zip(out, _extend(x, magnitude), strict=True):
            left = np.take(values, self.split_value) <= self.split_threshold
            missed = np.concatenate((~left, left)) * self.child_bit
            # A child also misses what its parent split missed, final one level up.
            for start, end in self.levels:
                above = np.take(missed, self.split_position[start:end])
                for side in (missed[start:end], missed[n + start : n + end]):
                    np.bitwise_or(side, above, out=side)
            looked_up = np.take(self.tables, self.pair_base + np.take(missed, self.pair_child))
            row[self.feature_index] = np.add.reduceat(looked_up, self.feature_start)
        return out


class _Split(NamedTuple):
    feature: int
    threshold: float
    reading: int  # COMPARED, NAN_LEFT, ...
    depth: int
    parent: int  # the parent split's index, -1 for a root
    left: bool  # on the parent's left side
    slot: int  # the bit of the split's unique feature on the path


class _Leaf(NamedTuple):
    parent: int
    left: bool
    value: float
    features: tuple[int, ...]  # the unique features of the path, in path order
    zeros: tuple[float, ...]  # their zero fractions


# A node to visit: its JSON, parent split, side of it and depth, and the path's unique
# features and their zero fractions.
_Frame = tuple[dict[str, Any], int, bool, int, tuple[int, ...], tuple[float, ...]]


def _count(node: dict[str, Any]) -> int:
    return int(node["internal_count"] if "split_index" in node else node["leaf_count"])


def _reading(node: dict[str, Any]) -> int | None:
    """How the split reads its feature, or None for a split the tables don't model."""
    if node["decision_type"] != "<=" or not math.isfinite(node["threshold"]):
        return None
    left = bool(node["default_left"])
    match node["missing_type"]:
        case "None":
            return COMPARED
        case "NaN":
            return NAN_LEFT if left else NAN_RIGHT
        case "Zero":
            return ZERO_LEFT if left else ZERO_RIGHT
    return None


def _walk(root: dict[str, Any], splits: list[_Split], leaves: list[_Leaf]) -> float | None:
    """Adds the tree's splits and leaves; its expected value, or None if it is unsupported."""
    if "split_index" not in root:
        return float(root["leaf_value"])
    total = _count(root)
    expected = 0.0
    stack: list[_Frame] = [(root, -1, True, 0, (), ())]
    while stack:
        node, parent, left, depth, features, zeros = stack.pop()
        if "split_index" not in node:
            if "leaf_coeff" in node:  # a linear tree's leaf is not a constant
                return None
            value = float(node["leaf_value"])
            leaves.append(_Leaf(parent, left, value, features, zeros))
            expected += node["leaf_count"] / total * value
            continue
        reading = _reading(node)
        if reading is None:
            return None
        feature = int(node["split_feature"])
        slot = features.index(feature) if feature in features else len(features)
        index = len(splits)
        splits.append(_Split(feature, float(node["threshold"]), reading, depth, parent, left, slot))
        for child, takes_left in ((node["left_child"], True), (node["right_child"], False)):
            ratio = _count(child) / _count(node)
            if slot < len(features):
                child_features = features
                child_zeros = (*zeros[:slot], zeros[slot] * ratio, *zeros[slot + 1 :])
            else:
                child_features, child_zeros = (*features, feature), (*zeros, ratio)
            stack.append((child, index, takes_left, depth + 1, child_features, child_zeros))
    return expected


def _leaf_tables(values: Vector, zeros: Matrix) -> Matrix:
    """φ of leaves with k unique features each: shape (leaves, 2^k patterns, k)."""
    n_leaves, k = zeros.shape
    size = 1 << k
    # elementary[:, c, m] = e_m of the zero fractions in subset c, from e(c ∪ {i}) =
    # e(c) · (1 + z_i t) for the subsets whose highest member is i.
    elementary = np.zeros((n_leaves, size, k + 1))
    elementary[:, 0, 0] = 1.0
    for i in range(k):
        low, high = slice(0, 1 << i), slice(1 << i, 2 << i)
        elementary[:, high] = elementary[:, low]
        elementary[:, high, 1:] += zeros[:, i, None, None] * elementary[:, low, :-1]
    patterns = np.arange(size)
    bit = 1 << np.arange(k)
    members = ((patterns[:, None] & bit) > 0).astype(np.float64)
    popcount = members.sum(axis=1).astype(np.intp)
    shapley = np.array([math.factorial(s) * math.factorial(k - s - 1) for s in range(k)])
    sizes = popcount[:, None] - np.arange(k + 1)  # |S| = |C| − m
    weight = np.where(
        (sizes >= 0) & (sizes < k), shapley[np.clip(sizes, 0, k - 1)] / math.factorial(k), 0.0
    )
    g = np.einsum("lcm,cm->lc", elementary, weight)
    # Π_{i∈c} z_i is the top polynomial of c; the complement of pattern c is size − 1 − c.
    inside = np.take_along_axis(elementary, popcount[None, :, None], axis=2)[..., 0]
    outside = inside[:, ::-1]
    with_j, without_j = patterns[:, None] | bit, patterns[:, None] & ~bit
    return np.asarray(
        values[:, None, None]
        * (members - zeros[:, None, :])
        * outside[:, with_j]
        * g[:, without_j],
        dtype=np.float64,
    )


def compile_tables(
    booster: lgb.Booster,
    *,
    max_path_features: int = MAX_PATH_FEATURES,
    max_table_bytes: int = MAX_TABLE_BYTES,
) -> ShapTables | None:
    """The booster's SHAP tables, or None where ``pred_contrib`` must do: categorical splits,
    linear trees, several trees per iteration, averaged output (random forest), a leaf with
    more than ``max_path_features`` (at most 16) unique features or tables above
    ``max_table_bytes``."""
    if not 0 < max_path_features <= MAX_PATH_FEATURES:
        raise ValueError(f"max_path_features must be in 1..{MAX_PATH_FEATURES}")
    model = booster.dump_model()
    if model["num_tree_per_iteration"] != 1 or model.get("average_output"):
        return None
    splits: list[_Split] = []
    leaves: list[_Leaf] = []
    bias = 0.0
    for tree in model["tree_info"]:
        expected = _walk(tree["tree_structure"], splits, leaves)
        if expected is None:
            return None
        bias += expected
    ks = np.array([len(leaf.features) for leaf in leaves], dtype=np.intp)
    if ks.size and ks.max() > max_path_features:
        return None
    entries = (1 << ks) * ks
    if entries.sum() * 8 > max_table_bytes:
        return None
    offsets = np.cumsum(entries) - entries
    tables = np.empty(int(entries.sum()))
    values = np.array([leaf.value for leaf in leaves])
    for k in np.unique(ks):
        group = np.flatnonzero(ks == k)
        zeros = np.array([leaves[i].zeros for i in group])
        cells = offsets[group, None] + np.arange((1 << k) * k)
        # Serving knows the unmet conditions, pattern 2^k − 1 − missed, and reads one
        # feature's value per leaf: store each leaf's table as [feature][missed].
        by_missed = _leaf_tables(values[group], zeros)[:, ::-1, :].transpose(0, 2, 1)
        tables[cells.ravel()] = by_missed.ravel()

    # By depth, so that a split's own missed bits are final before its children read them.
    order = sorted(range(len(splits)), key=lambda i: splits[i].depth)
    renumbered = np.empty(len(splits), dtype=np.intp)
    renumbered[order] = np.arange(len(splits))
    ordered = [splits[i] for i in order]
    depths = [split.depth for split in ordered]

    def position(parent: int, left: bool) -> int:
        return int(renumbered[parent]) + (0 if left else len(splits))

    pairs = sorted(
        (feature, leaf, slot)
        for leaf, path in enumerate(leaves)
        for slot, feature in enumerate(path.features)
    )
    pair_leaf = np.array([leaf for _, leaf, _ in pairs], dtype=np.intp)
    pair_slot = np.array([slot for _, _, slot in pairs], dtype=np.intp)
    leaf_position = np.array([position(leaf.parent, leaf.left) for leaf in leaves], dtype=np.intp)
    feature_index, feature_start = np.unique(
        np.array([feature for feature, _, _ in pairs], dtype=np.intp), return_index=True
    )
    n_features = int(model["max_feature_idx"]) + 1
    return ShapTables(
        booster=booster,
        n_features=n_features,
        bias=bias,
        split_value=np.array([s.reading * n_features + s.feature for s in ordered], dtype=np.intp),
        split_threshold=np.array([s.threshold for s in ordered], dtype=np.float64),
        split_position=np.array(
            [position(s.parent, s.left) if s.parent >= 0 else -1 for s in ordered], dtype=np.intp
        ),
        levels=tuple(
            (bisect.bisect_left(depths, d), bisect.bisect_right(depths, d))
            for d in range(1, depths[-1] + 1 if depths else 1)
        ),
        child_bit=np.array([1 << s.slot for s in ordered] * 2, dtype=np.uint16),
        pair_child=leaf_position[pair_leaf],
        pair_base=offsets[pair_leaf] + (pair_slot << ks[pair_leaf]),
        feature_start=feature_start.astype(np.intp),
        feature_index=feature_index.astype(np.intp),
        tables=tables,
    )
