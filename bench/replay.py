"""Replay a kept lift run's weekly retrains offline and score them by the world's hidden truth.

A live lift run cannot show a learner change worth a few per cent: the arms move by ±10 % from
run to run, and each arm's log follows from the models it drew. This replays the learning
instead, on the logs of one kept run (``python bench/lift.py --keep DIR``), with the hidden
P(completed) the simulator recorded at every decision (``DIR/<arm>/truth.jsonl``):

- for each week w, a model is trained with ``--config`` on the learning arm's log (``--learn``,
  default the ranker's) as it stood when week w ended — decisions before the next week's first
  one, and only the completions and impressions reported by then — as the bench's retrainer
  does;
- each model then ranks every decision of week w + 1 of each scored arm (``--score``) over all
  its eligible elements, as the decision service ranks them (calibrated P(success) × value
  weight × lever, greedily; a rule-required first card stays first), and the hidden P(completed)
  of the card it puts first is compared with the best eligible card's, the logged card's and a
  uniform draw's.

The figure of merit is ``share_of_best``: the chosen cards' mean hidden P(completed) over the
best eligible cards', over every scored decision of weeks 1.. (weeks ≥ ``--from-week``).
``--seeds`` trains each week's model with several LightGBM seeds and adds the figures up: one
fit is one draw (±0.05 of the share), more than most learner changes are worth.

What if (each alone says where the share is lost):

- ``--rank p``: rank by P(success) alone, without the value weight and the lever (the bench
  counts completions, whatever their value);
- ``--labels truth``: the models learn the hidden P(completed) of each shown row instead of
  whether it was completed — what perfect labels on the same rows would buy;
- ``--rows all`` (with ``--labels truth``): and from every eligible row, shown or not — what
  the features can carry at all.

Usage: python bench/replay.py DIR [--config PATH] [--seeds 7,8,9] [--rank p] [--labels truth]
Last line: {"share_of_best": …, "p_chosen": …, "p_best": …, "p_uniform": …, "p_logged": …}
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lift import EPOCH, store_url
from models.evaluate import CERTAIN, arbitration_scores
from models.export import load_log
from models.features import INDEX
from models.fit import TrainConfig, save_trained, train_from_log
from models.logdata import Floats, LogData
from models.ranker import load_model
from models.simulator.truth import read_truth

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "models" / "configs" / "one_card.yaml"
FAR = datetime(2200, 1, 1, tzinfo=UTC)
HOUR_US = 3_600_000_000
# A model as the decision service ranks with it: (features, levers) → final scores.
Ranking = Callable[[Floats, Floats], Floats]


@dataclass
class Arm:
    name: str
    data: LogData
    truth: dict[str, dict[str, float]]  # decision id → element id → hidden P(completed)
    week: npt.NDArray[np.int64]  # each row's decision's simulated week (-1: no truth kept)
    week_start: dict[int, int]  # week → its first decision's time (µs)


async def load_arm(folder: Path) -> Arm:
    data = LogData.from_table(await load_log(store_url(folder), EPOCH, FAR))
    truth: dict[str, dict[str, float]] = {}
    week_of: dict[str, int] = {}
    for record in read_truth(folder / "truth.jsonl"):
        truth[record.decision_id] = record.p_completed
        week_of[record.decision_id] = record.week
    week = np.array([week_of.get(d, -1) for d in data.decision_id.tolist()], dtype=np.int64)
    week_start = {int(w): int(data.decided_at[week == w].min()) for w in np.unique(week) if w >= 0}
    return Arm(folder.name, data, truth, week, week_start)


def as_of(data: LogData, cutoff_us: int) -> LogData:
    """The log as an export at ``cutoff_us`` would have read it: the decisions made before,
    with only the impressions and completions reported by then."""
    before = data.take(data.decided_at < cutoff_us)
    left = (cutoff_us - before.decided_at) / HOUR_US
    completed = before.completed_after_h < left  # NaN (never completed) compares False
    shown = before.shown & (before.shown_after_h < left)
    return dataclasses.replace(
        before,
        reward=np.where(completed, before.reward, 0.0),
        label=np.where(completed, before.label, np.minimum(before.label, 1.0)),
        completed_after_h=np.where(completed, before.completed_after_h, math.nan),
        shown=shown,
    )


@dataclass
class Score:
    decisions: int = 0
    chosen: float = 0.0
    best: float = 0.0
    uniform: float = 0.0
    logged: float = 0.0

    def add(self, other: Score) -> None:
        self.decisions += other.decisions
        self.chosen += other.chosen
        self.best += other.best
        self.uniform += other.uniform
        self.logged += other.logged

    def mean(self, total: float) -> float:
        return total / self.decisions if self.decisions else math.nan


def score_week(rank: Ranking, arm: Arm, week: int, greedy: bool) -> Score:
    """Each decision of ``week`` in ``arm``: the hidden P of the card ``rank`` puts first.
    ``greedy``: the arm logged without exploration, so a propensity of 1 does not tell a
    rule's requirement from the policy's own choice, and only a lone candidate stays."""
    data = arm.data
    rows = data.take(arm.week == week)
    out = Score()
    if not len(rows):
        return out
    order = np.argsort(rows.decision_id, kind="stable")
    sorted_ids = rows.decision_id[order]
    bounds = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1], True])
    for b in range(len(bounds) - 1):
        block = rows.take(order[bounds[b] : bounds[b + 1]])
        truth = arm.truth[str(block.decision_id[0])]
        hidden = np.array([truth.get(str(e), 0.0) for e in block.element_id.tolist()])
        first = np.flatnonzero(block.rank == 1)
        if len(first) == 0:
            continue
        logged = int(first[0])
        if len(block) == 1 or (block.propensity[logged] >= CERTAIN and not greedy):
            chosen = logged  # a rule required it, or it was the only candidate
        else:
            chosen = int(np.argmax(rank(block.features, block.lever)))
        out.decisions += 1
        out.chosen += float(hidden[chosen])
        out.best += float(hidden.max())
        out.uniform += float(hidden.mean())
        out.logged += float(hidden[logged])
    return out


@dataclass(frozen=True)
class Learner:
    """How the weekly models are trained and rank (see the module's "What if" options)."""

    config: TrainConfig
    without: list[int]
    by: str = "served"  # "served": P × value weight × lever; "p": P(success) alone
    labels: str = "completions"  # or "truth": the hidden P(completed) of each row
    rows: str = "shown"  # or "all": every eligible row (only with truth labels)


def train_week(learn: Arm, week: int, learner: Learner) -> Ranking | None:
    """The model the retrainer would have promoted after ``week``, as a ranking function."""
    cutoff = learn.week_start.get(week + 1)
    if cutoff is None:
        return None
    data = as_of(learn.data, cutoff)
    if learner.without:
        features = data.features.copy()
        features[:, learner.without] = math.nan
        data = dataclasses.replace(data, features=features)
    label_of = None
    if learner.labels == "truth":
        # The hidden P(completed) of each row as its label, a probability (cross-entropy).
        truth = learn.truth
        label_of = _truth_labels(truth)
        if learner.rows == "all":
            data = dataclasses.replace(data, shown=np.ones(len(data), dtype=np.bool_))
    try:
        trained = train_from_log(data, learner.config, progress=False, label_of=label_of)
    except ValueError:
        return None
    with tempfile.TemporaryDirectory() as registry:
        save_trained(trained, Path(registry), f"replay-week{week}")
        ranker = load_model(Path(registry), f"replay-week{week}")
    without = learner.without

    def rank(features: Floats, lever: Floats) -> Floats:
        if without:
            features = features.copy()
            features[:, without] = math.nan
        if learner.by == "p":
            # The raw score orders the rows as P(success) does (calibration is increasing),
            # and is the only order a model fitted to truth labels has (its calibration,
            # fitted to completions, is meaningless).
            return ranker.score(features)
        return arbitration_scores(ranker, features, lever)

    return rank


def _truth_labels(truth: dict[str, dict[str, float]]) -> Callable[[LogData], Floats]:
    def label_of(rows: LogData) -> Floats:
        return np.array(
            [
                truth.get(str(d), {}).get(str(e), 0.0)
                for d, e in zip(rows.decision_id.tolist(), rows.element_id.tolist(), strict=True)
            ]
        )

    return label_of


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("run", type=Path, help="a folder kept by bench/lift.py --keep")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the train config to replay")
    parser.add_argument("--learn", default="ranker", help="the arm whose log the models learn from")
    parser.add_argument("--score", default="random,rules,ranker", help="the arms scored")
    parser.add_argument("--from-week", type=int, default=1, help="the first week scored")
    parser.add_argument(
        "--greedy", default="rules", help="the arms that logged without exploration (ε = 0)"
    )
    parser.add_argument("--seeds", default="", help="LightGBM seeds (default: the config's)")
    parser.add_argument("--without", default="", help="feature columns left out (missing)")
    parser.add_argument(
        "--rank",
        choices=("served", "p"),
        default="served",
        help="served: P × value weight × lever, as the decision service ranks; p: P alone",
    )
    parser.add_argument(
        "--labels",
        choices=("completions", "truth"),
        default="completions",
        help="what the models learn: the completions logged, or the hidden P(completed)",
    )
    parser.add_argument(
        "--rows",
        choices=("shown", "all"),
        default="shown",
        help="the rows learnt from: the cards shown, or every eligible one (--labels truth)",
    )
    args = parser.parse_args()
    if args.labels == "truth" and args.rank != "p":
        parser.error("--labels truth: the models' calibration is meaningless, use --rank p")
    if args.rows == "all" and args.labels != "truth":
        parser.error("--rows all: only the hidden truth labels the rows never shown")
    unknown = [f for f in args.without.split(",") if f and f not in INDEX]
    if unknown:
        parser.error(f"--without: unknown feature columns {unknown}")
    without = [INDEX[f] for f in args.without.split(",") if f]
    names = [a for a in args.score.split(",") if a]
    greedy = {a for a in args.greedy.split(",") if a}
    arms = {name: await load_arm(args.run / name) for name in {*names, args.learn}}
    base = TrainConfig.load(args.config)
    if args.labels == "truth":  # labels are probabilities
        base = base.model_copy(
            update={"params": {**base.params, "objective": "cross_entropy"}, "target": "reward"}
        )
    seeds = [int(s) for s in args.seeds.split(",") if s] or [base.seed]
    weeks = sorted(w for w in arms[args.learn].week_start if w >= args.from_week)
    total = Score()
    per: dict[tuple[int, str], Score] = {}
    for seed in seeds:
        learner = Learner(
            base.model_copy(update={"seed": seed}), without, args.rank, args.labels, args.rows
        )
        for week in weeks:
            rank = train_week(arms[args.learn], week - 1, learner)
            if rank is None:
                continue
            for name in names:
                s = score_week(rank, arms[name], week, name in greedy)
                per.setdefault((week, name), Score()).add(s)
                total.add(s)
    print(
        f"{'week':>4} {'arm':>7} {'decisions':>9} {'chosen':>7} {'best':>6} {'share':>6}"
        f" {'logged':>7} {'uniform':>7}",
        file=sys.stderr,
    )
    for (week, name), s in sorted(per.items()):
        print(
            f"{week:>4} {name:>7} {s.decisions // len(seeds):>9} {s.mean(s.chosen):>7.4f} "
            f"{s.mean(s.best):>6.4f} {s.chosen / s.best if s.best else math.nan:>6.3f} "
            f"{s.logged / s.best if s.best else math.nan:>7.3f} "
            f"{s.uniform / s.best if s.best else math.nan:>7.3f}",
            file=sys.stderr,
        )
    result = {
        "share_of_best": round(total.chosen / total.best, 4) if total.best else None,
        "p_chosen": round(total.mean(total.chosen), 4),
        "p_best": round(total.mean(total.best), 4),
        "p_uniform": round(total.mean(total.uniform), 4),
        "p_logged": round(total.mean(total.logged), 4),
        "decisions": total.decisions // len(seeds),
        "seeds": seeds,
        "config": str(args.config),
        "rank": args.rank,
        "labels": args.labels,
        "rows": args.rows,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
