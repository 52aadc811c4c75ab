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

a function of the k bits o alone. The sum is cheap to tabulate: with o binary it runs over
subsets S of the met conditions B = {i ≠ j : o_i = 1}, and factors as Π_{i∉B∪{j}} z_i · G(B)
with G(C) = Σ_m w(|C| − m) e_m(z_C), where w(s) = s! (k − s − 1)! / k! and e_m is the m-th
elementary symmetric polynomial of the zero fractions in C. A subset recurrence gives e (hence
G and the products of z) for all 2^k subsets in O(2^k k) per leaf.

The tables are kept per group of leaves rather than per leaf, because serving costs about one
look-up per (table, feature) and sibling leaves differ only in the side of their last split. A
split whose two sides are leaves (or groups) can become one group, whose bit pattern has the
bits of the path's features above it (set where the row misses their condition) and one bit per
split inside it (set where the row goes right there); its table holds, for every pattern, the
sum of its leaves' φ at the pattern that this implies for each leaf. Grouping is greedy,
bottom-up, and only where the group's table is no larger than its leaves' own tables together,
its pattern fits 16 bits and it reads no more conditions than the deepest leaf. A split on a
feature new to the path halves its leaves' tables; on LightGBM's leaf-wise trees grouping about
halves both the look-ups and the tables.

Serving compares each split once per row (one ``>`` each, see ``_SIGN``), which sets the bit of
each condition that the row misses in the pattern of the group that reads it. A group's
pattern is the OR of its conditions' bits: one gather and one reduction for all groups with
about as many conditions (padded with a condition that is always met). The patterns then give
each group's φ per feature, and these add up by feature in one ``reduceat`` that also yields the
bias column, each tree's cover-weighted mean leaf value, summed. All rows of a call go at once,
in a few numpy calls whatever the number of trees and rows: at one to a few rows, each call
costs more than its share of the work.
"""

from __future__ import annotations

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
# Padded conditions that cost about as much to read as one more tier's two numpy calls.
TIER_COST = 2000
# φ cells computed at once: bounds the compile's scratch memory, not the tables.
SCRATCH_CELLS = 1 << 20

# How a split reads its feature: missing type None compares NaN as 0; NaN sends NaN, Zero sends
# NaN and zero, the default way.
COMPARED, NAN_LEFT, NAN_RIGHT, ZERO_LEFT, ZERO_RIGHT = range(5)
# Serving turns every split into one ``>``, true when the row leaves the default way, so that
# NaN (false) goes the default way: a default-left split asks value > threshold, a default-right
# one −value > (the float below −threshold), i.e. not value <= threshold. The value is one of
# the row's extended values (see ``_extend``): x with its zeros as 0 for missing types None and
# NaN (None's NaN reads as 0, and so goes the way 0 goes: make that the default), or as NaN for
# Zero, each also negated.
_ZERO_VALUE = np.array([0.0, 0.0, np.nan, np.nan])[:, None]
_SIGN = np.array([1.0, -1.0, 1.0, -1.0])[:, None]

Ints = npt.NDArray[np.intp]
Bits = npt.NDArray[np.uint16]


def _extend(x: Matrix, magnitude: Matrix) -> Matrix:
    """Each row's values once per way of reading them (``magnitude`` is |x|), side by side."""
    rows, n_features = x.shape
    zero = (magnitude <= ZERO_THRESHOLD)[:, None, :]
    extended = np.where(zero, _ZERO_VALUE, x[:, None, :] * _SIGN)
    return extended.reshape(rows, len(_SIGN) * n_features)


@dataclass(frozen=True, eq=False)
class ShapTables:
    """The tabulated TreeSHAP of one booster; ``contributions`` equals its ``pred_contrib``."""

    booster: lgb.Booster
    n_features: int
    bias: float
    # One entry per split (all trees), then one that no group reads: its column of the
    # extended row and its threshold.
    split_value: Ints
    split_threshold: Vector
    # [side, split], side 0 the left: whether the side is the default way, and the bit that a
    # row not going that way sets in the pattern of the group that reads it (0: none does).
    default_side: npt.NDArray[np.bool_]
    condition_bit: Bits
    # The groups, most conditions first, in tiers: [:, group] each group's conditions (side ×
    # entries of split_value + split), padded with the unread split. The last group reads none:
    # its look-ups are constants.
    tiers: tuple[Ints, ...]
    # One entry per (group, feature of its leaves) and one per constant, sorted by output
    # column: its group and where its φ at pattern 0 sits in the tables (the group's table,
    # then 2^bits cells per feature; the last two cells hold 0, for a column without leaves,
    # and the bias); column_start, each column's first.
    pair_group: Ints
    pair_cell: Ints
    column_start: Ints
    tables: Vector

    @property
    def nbytes(self) -> int:
        arrays = [value for value in vars(self).values() if isinstance(value, np.ndarray)]
        return sum(array.nbytes for array in [*arrays, *self.tiers])

    def contributions(self, features: Matrix) -> Matrix:
        """Per-feature SHAP contributions (last column: the bias), as ``pred_contrib``."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected rows of {self.n_features} features, got {x.shape}")
        magnitude = np.abs(x)
        if np.count_nonzero(magnitude > HUGE):
            return np.asarray(
                self.booster.predict(x, pred_contrib=True, num_threads=1), dtype=np.float64
            )
        rows = x.shape[0]
        away = np.take(_extend(x, magnitude), self.split_value, axis=1) > self.split_threshold
        # The default side's condition is missed where the row goes away, the other's elsewhere.
        missed = np.multiply(away[:, None, :] == self.default_side, self.condition_bit)
        missed = missed.reshape(rows, self.condition_bit.size)
        tiers = [np.bitwise_or.reduce(np.take(missed, read, axis=1), axis=1) for read in self.tiers]
        patterns = np.concatenate(tiers, axis=1, dtype=np.intp)
        cells = np.take(patterns, self.pair_group, axis=1)
        cells += self.pair_cell
        return np.add.reduceat(np.take(self.tables, cells), self.column_start, axis=1)


class _Split(NamedTuple):
    feature: int
    threshold: float
    reading: int  # COMPARED, NAN_LEFT, ...
    parent: int  # the parent split's index, -1 for a root
    left: bool  # on the parent's left side
    slot: int  # the bit of the split's unique feature on the path
    above: int  # the unique features of the path above it
    depth: int  # the splits above it


class _Leaf(NamedTuple):
    parent: int
    left: bool
    value: float
    features: tuple[int, ...]  # the unique features of the path, in path order
    zeros: tuple[float, ...]  # their zero fractions


class _Group(NamedTuple):
    """Leaves that share one table: a lone leaf, or all leaves under the first of ``splits``."""

    top: int  # the first split, or ~leaf for a lone leaf
    splits: tuple[int, ...]  # its splits, whose "goes right" are the pattern's last bits
    leaves: tuple[int, ...]
    features: frozenset[int]
    bits: int
    size: int  # table cells: 2^bits per feature
    alone: int  # the cells of its leaves' own tables


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
    """Adds the tree's splits and leaves, a parent before its children; the tree's expected
    value, or None if it is unsupported."""
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
        threshold = float(node["threshold"])
        splits.append(_Split(feature, threshold, reading, parent, left, slot, len(features), depth))
        for child, takes_left in ((node["left_child"], True), (node["right_child"], False)):
            ratio = _count(child) / _count(node)
            if slot < len(features):
                child_features = features
                child_zeros = (*zeros[:slot], zeros[slot] * ratio, *zeros[slot + 1 :])
            else:
                child_features, child_zeros = (*features, feature), (*zeros, ratio)
            stack.append((child, index, takes_left, depth + 1, child_features, child_zeros))
    return expected


def _compared(split: _Split) -> tuple[int, float, bool]:
    """The split as serving compares it: its block of the extended row, the threshold and
    whether the default way is left."""
    if split.reading == COMPARED:
        left = split.threshold >= 0.0
    else:
        left = split.reading in (NAN_LEFT, ZERO_LEFT)
    block = (2 if split.reading in (ZERO_LEFT, ZERO_RIGHT) else 0) + (0 if left else 1)
    threshold = split.threshold if left else float(np.nextafter(-split.threshold, -np.inf))
    return block, threshold, left


def _path(splits: list[_Split], leaves: list[_Leaf], node: int) -> list[tuple[int, bool]]:
    """The (split, side) conditions on the way down to a split (or ~leaf), root first."""
    parent, left = (splits[node].parent, splits[node].left) if node >= 0 else leaves[~node][:2]
    way = []
    while parent >= 0:
        way.append((parent, left))
        parent, left = splits[parent].parent, splits[parent].left
    return way[::-1]


def _group(splits: list[_Split], leaves: list[_Leaf]) -> list[_Group]:
    """The leaves of all trees in groups (see the module's documentation)."""
    children = [[0, 0] for _ in splits]  # ≥ 0: a split, < 0: ~leaf
    for index, split in enumerate(splits):
        if split.parent >= 0:
            children[split.parent][not split.left] = index
    for index, leaf in enumerate(leaves):
        if leaf.parent >= 0:
            children[leaf.parent][not leaf.left] = ~index

    def lone(index: int) -> _Group:
        k = len(leaves[index].features)
        size = (1 << k) * k
        return _Group(~index, (), (index,), frozenset(leaves[index].features), k, size, size)

    # A group reads no more conditions than the deepest leaf, to which serving pads anyway.
    deepest = max((splits[leaf.parent].depth + 1 for leaf in leaves if leaf.parent >= 0), default=0)
    whole: dict[int, _Group] = {}  # a split whose subtree is one group
    groups: list[_Group] = []
    # Children come after their parent: the reverse order sees them first.
    for index in reversed(range(len(splits))):
        split = splits[index]
        parts = [lone(~child) if child < 0 else whole.get(child) for child in children[index]]
        left, right = parts
        if left is not None and right is not None:
            inner = (index, *left.splits, *right.splits)
            bits = split.above + len(inner)
            features = left.features | right.features
            size = (1 << bits) * len(features)
            alone = left.alone + right.alone
            if bits <= MAX_PATH_FEATURES and size <= alone and split.depth + len(inner) <= deepest:
                leaves_under = left.leaves + right.leaves
                whole[index] = _Group(index, inner, leaves_under, features, bits, size, alone)
                if split.parent < 0:
                    groups.append(whole[index])
                continue
        groups += [part for part in parts if part is not None]
    return groups


def _tiers(reads: list[list[int]], unread: int) -> tuple[Ints, ...]:
    """The groups' conditions (most first) in tiers, each padded to its first group's count:
    one tier costs the most padding, one per count the most numpy calls."""
    counts = [len(read) for read in reads]
    distinct = sorted(set(counts), reverse=True)
    starts = [counts.index(count) for count in distinct] + [len(counts)]
    # cost[j], end[j]: the least cost of the groups from starts[j] on, and its first tier's end.
    cost, end = [0] * len(starts), [0] * len(starts)
    for j in reversed(range(len(distinct))):
        cost[j], end[j] = min(
            (distinct[j] * (starts[i] - starts[j]) + TIER_COST + cost[i], i)
            for i in range(j + 1, len(starts))
        )
    tiers = []
    j = 0
    while j < len(distinct):
        first, last = starts[j], starts[end[j]]
        padded = np.full((distinct[j], last - first), unread, dtype=np.intp)
        for column, read in enumerate(reads[first:last]):
            padded[: len(read), column] = read
        tiers.append(padded)
        j = end[j]
    return tuple(tiers)


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


def _fill(
    tables: Vector,
    group_base: Ints,
    groups: list[_Group],
    splits: list[_Split],
    leaves: list[_Leaf],
) -> None:
    """Adds each grouped leaf's φ to its group's table, at every pattern of the group."""
    # Per leaf, for each bit t of its group's pattern: the bit of its own pattern that t sets
    # (0: none) and whether t is set when the row goes the leaf's way (at a split it is right
    # of); its group, and the number of each of its features among the group's.
    target = np.zeros((len(leaves), MAX_PATH_FEATURES), dtype=np.intp)
    flip = np.zeros((len(leaves), MAX_PATH_FEATURES), dtype=np.intp)
    group_of = np.full(len(leaves), -1, dtype=np.intp)
    feature_number = np.zeros((len(leaves), MAX_PATH_FEATURES), dtype=np.intp)
    for number, group in enumerate(groups):
        above = group.bits - len(group.splits)
        fresh = {split: t for t, split in enumerate(group.splits, start=above)}
        ordered = sorted(group.features)
        for leaf in group.leaves:
            group_of[leaf] = number
            features = leaves[leaf].features
            feature_number[leaf, : len(features)] = [ordered.index(f) for f in features]
            target[leaf, :above] = 1 << np.arange(above)
            for split, left in _path(splits, leaves, ~leaf):
                if split in fresh:
                    target[leaf, fresh[split]] = 1 << features.index(splits[split].feature)
                    flip[leaf, fresh[split]] = not left

    ks = np.array([len(leaf.features) for leaf in leaves], dtype=np.intp)
    bits = np.array([groups[g].bits if g >= 0 else 0 for g in group_of], dtype=np.intp)
    shared = np.array([g >= 0 and len(groups[g].leaves) > 1 for g in group_of], dtype=bool)
    values = np.array([leaf.value for leaf in leaves])
    for k in np.unique(ks[group_of >= 0]):
        members = np.flatnonzero((ks == k) & (group_of >= 0))
        step = max(1, SCRATCH_CELLS // ((1 << k) * k))
        for start in range(0, members.size, step):
            part = members[start : start + step]
            zeros = np.array([leaves[i].zeros for i in part])
            # Serving knows the unmet conditions, pattern 2^k − 1 − met.
            by_missed = _leaf_tables(values[part], zeros)[:, ::-1, :]
            kinds = {*zip(bits[part].tolist(), shared[part].tolist(), strict=True)}
            for b, together in sorted(kinds):
                rows = np.flatnonzero((bits[part] == b) & (shared[part] == together))
                these = part[rows]
                patterns = np.arange(1 << b)
                cells = (
                    group_base[group_of[these], None, None]
                    + (feature_number[these, None, :k] << b)
                    + patterns[None, :, None]
                )
                if not together:  # a lone leaf's pattern is its own
                    tables[cells] = by_missed[rows]
                    continue
                missed = np.zeros((rows.size, 1 << b), dtype=np.intp)
                for t in range(b):
                    on = (patterns >> t) & 1
                    missed |= (on ^ flip[these, t, None]) * target[these, t, None]
                looked_up = by_missed[rows[:, None], missed]  # (leaves, patterns, k)
                np.add.at(tables, cells.ravel(), looked_up.ravel())


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
    if max((len(leaf.features) for leaf in leaves), default=0) > max_path_features:
        return None
    groups = _group(splits, leaves)
    paths = {group.top: _path(splits, leaves, group.top) for group in groups}
    groups.sort(key=lambda group: len(paths[group.top]) + len(group.splits), reverse=True)
    sizes = np.array([group.size for group in groups], dtype=np.intp)
    cells = int(sizes.sum())
    zero_cell, bias_cell = cells, cells + 1
    if (cells + 2) * 8 > max_table_bytes:
        return None
    group_base = (np.cumsum(sizes) - sizes).astype(np.intp)
    tables = np.zeros(cells + 2)
    tables[bias_cell] = bias
    _fill(tables, group_base, groups, splits, leaves)

    n_features = int(model["max_feature_idx"]) + 1
    unread = len(splits)  # a condition of no group, always met
    condition_bit = np.zeros((2, unread + 1), dtype=np.uint16)
    condition_bit[:, :unread] = 1 << np.array([split.slot for split in splits], dtype=np.uint16)
    reads = []
    pairs: list[tuple[int, int, int]] = []  # (column, group, cell)
    for number, group in enumerate(groups):
        # The way down to the group sets the bits of the path's features; its inner splits, the
        # pattern's last bits, are read on their left side only: set where the row goes right.
        read = [split + (0 if left else unread + 1) for split, left in paths[group.top]]
        above = group.bits - len(group.splits)
        for t, split in enumerate(group.splits, start=above):
            condition_bit[:, split] = (1 << t, 0)
            read.append(split)
        reads.append(read)
        ordered = sorted(group.features)
        base = int(group_base[number])
        pairs += [(feature, number, base + (u << group.bits)) for u, feature in enumerate(ordered)]
    constants = len(groups)
    reads.append([])
    covered = {column for column, _, _ in pairs}
    pairs += [
        (column, constants, zero_cell) for column in range(n_features) if column not in covered
    ]
    pairs.append((n_features, constants, bias_cell))
    pairs.sort()
    columns = np.array([column for column, _, _ in pairs], dtype=np.intp)

    compared = [_compared(split) for split in splits]
    lefts = [left for _, _, left in compared]
    return ShapTables(
        booster=booster,
        n_features=n_features,
        bias=bias,
        split_value=np.array(
            [
                block * n_features + split.feature
                for split, (block, _, _) in zip(splits, compared, strict=True)
            ]
            + [0],
            dtype=np.intp,
        ),
        split_threshold=np.array([threshold for _, threshold, _ in compared] + [np.inf]),
        default_side=np.array([[*lefts, True], [not left for left in lefts] + [False]]),
        condition_bit=condition_bit,
        tiers=_tiers(reads, unread),
        pair_group=np.array([group for _, group, _ in pairs], dtype=np.intp),
        pair_cell=np.array([cell for _, _, cell in pairs], dtype=np.intp),
        column_start=np.searchsorted(columns, np.arange(n_features + 1)).astype(np.intp),
        tables=tables,
    )
