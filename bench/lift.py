"""Proof of lift: the simulated world under three policies, each against its own NBV process.

- random: uniform among the eligible elements the API returns (the simulator asks for up to 20
  and picks one; it knows its own propensity, 1/n);
- rules:  the API's rule prior, ε = 0;
- ranker: the API with ε-greedy exploration (logged propensities), a LightGBM ranker retrained
  after every week from that process's own store (export → train → evaluate → promote into its
  NBV_MODEL_DIR; the decision service hot-swaps the champion, no restart).

Before each promotion the off-policy value of the new model is estimated on the held-out end of
its training log; the value it then achieves (completions per first card) is measured in the
following week. Same world seed for every policy (common random numbers).

Time is compressed: a simulated week takes seconds of wall clock, so the library served by the
bench processes has its per-element cool-downs set to 0 (otherwise "don't re-offer for 7 days"
means "never again" and the random policy, which is offered 20 cards at a time, would exhaust
its pool in a session), and contact caps are lifted for the in-app channel.

Usage: python bench/lift.py [--quick] [--accounts N] [--weeks W] [--seed S]
Last line: {"lift_vs_rules": …, "lift_vs_random": …, "ope_rel_error": …}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.evaluate import evaluate_model
from models.export import load_log
from models.fit import TrainConfig, save_trained, train_from_log
from models.logdata import LogData
from models.ranker import load_model, promote
from models.simulator.driver import Policy, Simulation, WeekSummary, simulate
from services.decision.library import DEFAULT_LIBRARY, load_library
from tests.harness import ServiceProcess

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "models" / "configs" / "default.yaml"
NO_CAP = json.dumps({"in_app": 1_000_000, "email": 1_000_000, "csm": 1_000_000})


@dataclass
class Round:
    version: str
    ope: dict[str, float]
    ope_decisions: int
    achieved: float = float("nan")
    achieved_decisions: int = 0


@dataclass
class Outcome:
    name: str
    weeks: list[WeekSummary]
    rounds: list[Round] = field(default_factory=list)
    seconds: float = 0.0

    def success(self, from_week: int) -> float:
        weeks = [w for w in self.weeks if w.week >= from_week]
        users = sum(w.active_users for w in weeks)
        return sum(w.completed for w in weeks) / users if users else 0.0

    @property
    def retention(self) -> float:
        return self.weeks[-1].retained_users if self.weeks else 0.0


def bench_library(folder: Path) -> Path:
    lib = load_library(DEFAULT_LIBRARY)
    data = {
        "version": lib.version,
        "elements": [
            {**e.model_dump(mode="json", exclude_none=True), "cooldown_days": 0}
            for e in lib.elements
        ],
    }
    path = folder / "library.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def process_env(folder: Path, epsilon: float, seed: int) -> dict[str, str]:
    return {
        "NBV_BUS": "embedded",
        "NBV_DATABASE_URL": "",
        "NBV_DATA_DIR": str(folder / "data"),
        "NBV_MODEL_DIR": str(folder / "registry"),
        "NBV_LIBRARY_PATH": str(bench_library(folder)),
        "NBV_EXPLORATION_EPSILON": str(epsilon),
        "NBV_DECISION_SEED": str(seed),
        "NBV_CONTACT_CAP_PER_DAY": NO_CAP,
        "NBV_CONTACT_CAP_PER_WEEK": NO_CAP,
        "NBV_MODEL_POLL_S": "0.25",
        "NBV_LOG_LEVEL": "WARNING",
    }


class Retrainer:
    """After each week: export the process's log, train, estimate off-policy, promote."""

    def __init__(self, folder: Path, epsilon: float, config: TrainConfig) -> None:
        self.url = f"sqlite+aiosqlite:///{(folder / 'data' / 'nbv.sqlite').resolve()}"
        self.registry = folder / "registry"
        self.epsilon = epsilon
        self.config = config
        self.rounds: list[Round] = []

    async def __call__(self, week: int) -> None:
        until = datetime.now(UTC) + timedelta(seconds=1)
        table = await load_log(self.url, datetime(1970, 1, 1, tzinfo=UTC), until)
        data = LogData.from_table(table)
        trained = await asyncio.to_thread(train_from_log, data, self.config, progress=False)
        version = f"lgbm-week{week}"
        await asyncio.to_thread(save_trained, trained, self.registry, version)
        ranker = load_model(self.registry, version)
        ev = await asyncio.to_thread(
            evaluate_model,
            ranker,
            data,
            trained.split_us,
            k=self.config.evaluate.k,
            epsilon=self.epsilon,
            resamples=self.config.evaluate.bootstrap,
            seed=self.config.seed,
            group_by=self.config.group_by,
        )
        op = ev.off_policy
        self.rounds.append(
            Round(
                version,
                {
                    "logged": op.logged_value.estimate,
                    "ips": op.ips.estimate,
                    "snips": op.snips.estimate,
                    "dr": op.dr.estimate,
                },
                op.decisions,
            )
        )
        promote(self.registry, version)
        await asyncio.sleep(1.0)  # the service polls CHAMPION every 0.25 s and swaps


async def run_policy(
    name: str, policy: Policy, epsilon: float, args: argparse.Namespace, root: Path
) -> Outcome:
    folder = root / name
    folder.mkdir()
    env = process_env(folder, epsilon, args.seed)
    proc = ServiceProcess(["run"], env, folder, name)
    started = time.monotonic()
    retrainer = Retrainer(folder, epsilon, TrainConfig.load(CONFIG)) if name == "ranker" else None
    try:
        await proc.wait_ready()
        weeks, sim = await simulate(
            proc.url,
            accounts=args.accounts,
            weeks=args.weeks,
            seed=args.seed,
            policy=policy,
            concurrency=args.concurrency,
            cards=args.cards,
            on_week=lambda s: print(f"{name:>6} {s.line()}", file=sys.stderr, flush=True),
            between_weeks=retrainer,
        )
    finally:
        proc.stop()
    out = Outcome(name, weeks, seconds=time.monotonic() - started)
    if retrainer is not None:
        out.rounds = retrainer.rounds
        achieved(out, sim)
    return out


def achieved(out: Outcome, sim: Simulation) -> None:
    """The value each promoted model achieved while it served (completions per first card)."""
    for r in out.rounds:
        served = [s for s in sim.shown if s.model_version == r.version]
        r.achieved_decisions = len(served)
        if served:
            r.achieved = sum(s.reward for s in served) / len(served)


def ope_error(rounds: list[Round], estimator: str) -> float:
    used = [r for r in rounds if r.achieved_decisions]
    decisions = sum(r.achieved_decisions for r in used)
    if not decisions:
        return float("nan")
    estimate = sum(r.ope[estimator] * r.achieved_decisions for r in used) / decisions
    value = sum(r.achieved * r.achieved_decisions for r in used) / decisions
    return abs(estimate - value) / value if value else float("nan")


def report(outcomes: dict[str, Outcome], warmup: int) -> dict[str, Any]:
    print(f"\nper policy, weeks {warmup}..end (week 0 is the ranker's warm-up on the prior):")
    for o in outcomes.values():
        print(
            f"  {o.name:>6}: success {o.success(warmup):.3f} completed/user-week "
            f"(all weeks {o.success(0):.3f}), retained users {o.retention:.2f}, "
            f"accounts {o.weeks[-1].retained_accounts:.2f}, {o.seconds:.0f} s"
        )
    ranker = outcomes["ranker"]
    for r in ranker.rounds:
        print(
            f"  {r.version}: OPE on {r.ope_decisions} held-out decisions  "
            + "  ".join(f"{k} {v:.3f}" for k, v in r.ope.items())
            + f"  →  achieved {r.achieved:.3f} over {r.achieved_decisions} decisions"
        )
    errors = {e: ope_error(ranker.rounds, e) for e in ("ips", "snips", "dr")}
    print(
        "  OPE relative error (decision-weighted): "
        + ", ".join(f"{k} {v:.3f}" for k, v in errors.items())
    )
    base_rules = outcomes["rules"].success(warmup)
    base_random = outcomes["random"].success(warmup)
    learned = ranker.success(warmup)
    return {
        "lift_vs_rules": round(learned / base_rules, 3) if base_rules else None,
        "lift_vs_random": round(learned / base_random, 3) if base_random else None,
        "ope_rel_error": round(errors["dr"], 3),
        "success": {k: round(o.success(warmup), 4) for k, o in outcomes.items()},
        "retained_users": {k: round(o.retention, 3) for k, o in outcomes.items()},
        "ope_rel_error_by_estimator": {k: round(v, 3) for k, v in errors.items()},
        "weeks": len(ranker.weeks),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer accounts and weeks")
    parser.add_argument("--accounts", type=int)
    parser.add_argument("--weeks", type=int)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--epsilon", type=float, default=0.15, help="the ranker's exploration")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--cards", type=int, default=3, help="cards per session")
    args = parser.parse_args()
    args.accounts = args.accounts or (12 if args.quick else 30)
    args.weeks = args.weeks or (4 if args.quick else 8)
    with tempfile.TemporaryDirectory(prefix="nbv-lift-") as tmp:
        root = Path(tmp)
        outcomes = {
            "random": await run_policy("random", "random", 0.0, args, root),
            "rules": await run_policy("rules", "api", 0.0, args, root),
            "ranker": await run_policy("ranker", "api", args.epsilon, args, root),
        }
    result = report(outcomes, warmup=1)
    result["accounts"] = args.accounts
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
