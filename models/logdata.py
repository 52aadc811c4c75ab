"""The exported training log as arrays: features, labels, query groups and the time split."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped]

from models.features import FEATURES

Floats = npt.NDArray[np.float64]
GroupBy = Literal["decision", "user"]


@dataclass(frozen=True)
class LogData:
    """Rows of the training log, sorted by query then time (LightGBM wants queries contiguous)."""

    features: Floats
    label: Floats
    reward: Floats
    propensity: Floats
    shown: npt.NDArray[np.bool_]
    decided_at: npt.NDArray[np.int64]  # µs since the epoch, UTC
    decision_id: npt.NDArray[np.str_]
    user_id: npt.NDArray[np.str_]
    element_id: npt.NDArray[np.str_]
    model_version: npt.NDArray[np.str_]
    lever: Floats
    rank: npt.NDArray[np.int64]  # -1: not chosen
    # Hours from the decision to the completion (NaN: not completed, or an older export).
    completed_after_h: Floats
    # Hours from the decision to the card's first response, i.e. when it was first shown (NaN:
    # not shown; 0 in exports from before it was recorded).
    shown_after_h: Floats

    @classmethod
    def from_table(cls, table: pa.Table) -> LogData:
        cols: dict[str, list[Any]] = table.to_pydict()
        n = table.num_rows
        features = np.empty((n, len(FEATURES)), dtype=np.float64)
        for j, name in enumerate(FEATURES):
            features[:, j] = np.asarray(cols[name], dtype=np.float64)
        at = np.asarray(
            [int(t.astimezone(UTC).timestamp() * 1_000_000) for t in cols["decided_at"]],
            dtype=np.int64,
        )
        return cls(
            features=features,
            label=np.asarray(cols["label"], dtype=np.float64),
            reward=np.asarray(cols["reward"], dtype=np.float64),
            propensity=np.asarray(cols["propensity"], dtype=np.float64),
            shown=np.asarray(cols["shown"], dtype=np.bool_),
            decided_at=at,
            decision_id=np.asarray(cols["decision_id"], dtype=np.str_),
            user_id=np.asarray(cols["user_id"], dtype=np.str_),
            element_id=np.asarray(cols["element_id"], dtype=np.str_),
            model_version=np.asarray(cols["model_version"], dtype=np.str_),
            lever=np.asarray(cols["lever"], dtype=np.float64),
            rank=np.asarray(cols.get("rank", [1] * n), dtype=np.int64),
            completed_after_h=np.asarray(
                cols.get("completed_after_h", [math.nan] * n), dtype=np.float64
            ),
            shown_after_h=np.asarray(cols.get("shown_after_h", [0.0] * n), dtype=np.float64),
        )

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def take(self, mask: npt.NDArray[np.bool_] | npt.NDArray[np.intp]) -> LogData:
        return LogData(**{name: getattr(self, name)[mask] for name in self.__dataclass_fields__})

    def within(self, hours: float, observed_until_us: int) -> LogData:
        """The decisions whose reward window had closed by ``observed_until_us``, with the
        reward counted only for completions within ``hours`` of the decision, and a card
        counted as shown only if it was shown within them. Estimate and achieved value read
        the same decisions and the same reward this way, however late each was measured: a
        card left in the inbox can be completed days later, and a card decided on for someone
        not in the product (a trigger at night, an absence) is first shown days later — when
        the estimate is made such a card is not shown yet, when the achieved value is measured
        it is, with no reward possible in its window."""
        closed = self.take(self.decided_at + int(hours * 3600 * 1_000_000) <= observed_until_us)
        in_time = closed.completed_after_h <= hours  # NaN (no completion) compares False
        seen_in_time = closed.shown_after_h <= hours  # NaN (not shown) compares False
        return replace(
            closed,
            reward=np.where(in_time, closed.reward, 0.0),
            shown=closed.shown & seen_in_time,
        )

    def split_time(self, valid_fraction: float) -> int:
        """The decision time (µs) from which the last ``valid_fraction`` of decisions lie."""
        times = np.unique(self.decided_at)
        if len(times) == 0:
            raise ValueError("the training log is empty")
        cut = int(np.floor(len(times) * (1.0 - valid_fraction)))
        return int(times[min(max(cut, 1), len(times) - 1)])

    def ranking_queries(self, group_by: GroupBy) -> tuple[LogData, list[int]]:
        """The shown rows ordered into contiguous queries, and each query's size.

        With one card per decision a decision is a query of one, from which lambdarank learns
        nothing; grouping by person compares the cards one person got with each other."""
        shown = self.take(self.shown)
        key = shown.decision_id if group_by == "decision" else shown.user_id
        order = np.lexsort((shown.decided_at, key))
        ordered = shown.take(order)
        okey = key[order]
        _, sizes = np.unique(okey, return_counts=True)
        # np.unique sorts its keys the way lexsort did, so counts follow the row order.
        return ordered, [int(s) for s in sizes]


def utc(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC)
