"""Proof of lift: the simulated world under three policies, each against its own NBV process.

All three serve what NBV ships: the default library, playbooks and decision rules, and the
default contact policy (per-element cool-downs, caps per channel, snoozes, suppression after a
dismissal, quiet hours) and delivery's impression capping (a card shown through
``NBV_INAPP_IMPRESSION_CAP`` sessions without an answer is withdrawn). They differ only in how
the eligible elements are ranked:

- random: the API with ε = 1: uniform among the eligible elements, slot by slot;
- rules:  the API's rule prior, ε = 0;
- ranker: the API with the exploration of the train config's ``evaluate`` target (ε-greedy,
  NBV's default ε = 0.1; logged propensities), serving the rule prior in week 0, then a
  LightGBM ranker retrained after every week from that process's own store (export → train →
  off-policy estimate → register and promote; the decision service hot-swaps the champion, no
  restart).

Time: each NBV process runs on the simulator's clock (``models.simulator.clock``), which moves
one simulated day at a time, so a week takes seconds and every time rule of the contact policy,
the snoozes, the usage windows and triggers, and the playbook delays work as they would in
production.

Off-policy: before each promotion the value of the new model — completions of the first card
per decision, under the exploration it will serve with — is estimated on the held-out end of
its training log, i.e. from the logs of the policy that was serving (with ``refit`` in the train
config, by the model fitted before that held-out end, which the served one was refitted on too).
The value it then achieves is the same quantity on the decisions it served. Both count a
completion only within ``--reward-window-h`` of the decision and only decisions whose window had
closed when they were measured (a card left in the inbox can be completed days later, which the
newest held-out decisions have not had time for). ``ope_rel_error`` is the error of the capped
DR estimate (see ``models/configs/one_card.yaml``) on the decision-weighted means over the
retrains. Same world seed for every policy (common random numbers).

Usage: python bench/lift.py [--quick] [--accounts N] [--weeks W] [--seed S]
Last line: {"lift_vs_rules": …, "lift_vs_random": …, "ope_rel_error": …}
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.evaluate import TargetPolicy, evaluate_model, first_card_value
from models.export import load_log
from models.features import INDEX
from models.fit import TrainConfig, save_trained, train_from_log
from models.logdata import LogData
from models.ranker import LightGBMRanker, load_model
from models.registry_store import register_and_promote
from models.simulator.clock import SharedClock
from models.simulator.driver import Simulation, WeekSummary, run
from models.simulator.truth import TruthLog
from tests.harness import ServiceProcess, auth_headers

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "models" / "configs" / "one_card.yaml"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ARMS = ("random", "rules", "ranker")
# Sessions start at 09:00 each simulated day: a 12-hour window counts the completions of the
# day the card was offered. Later ones (a card left in the inbox, finished days later) are not
# yet seen for the newest held-out decisions when the estimate is made; counting them for the
# achieved value only would compare two different quantities.
REWARD_WINDOW_H = 12.0


@dataclass
class Round:
    version: str
    ope: dict[str, float]
    ope_decisions: int
    ess: float
    achieved: float = math.nan
    achieved_decisions: int = 0


@dataclass
class Outcome:
    name: str
    weeks: list[WeekSummary]
    rounds: list[Round] = field(default_factory=list)
    seconds: float = 0.0
    decisions: int = 0

    def success(self, from_week: int) -> float:
        weeks = [w for w in self.weeks if w.week >= from_week]
        users = sum(w.active_users for w in weeks)
        return sum(w.completed for w in weeks) / users if users else 0.0

    @property
    def retention(self) -> float:
        return self.weeks[-1].retained_users if self.weeks else 0.0


def process_env(
    folder: Path, policy: TargetPolicy, seed: int, clock: SharedClock
) -> dict[str, str]:
    return {
        "NBV_BUS": "embedded",
        "NBV_DATABASE_URL": "",
        "NBV_DATA_DIR": str(folder / "data"),
        "NBV_MODEL_DIR": str(folder / "registry"),
        "NBV_EXPLORATION_POLICY": policy.kind,
        "NBV_EXPLORATION_EPSILON": str(policy.epsilon),
        "NBV_EXPLORATION_TEMPERATURE": str(policy.temperature),
        "NBV_DECISION_SEED": str(seed),
        "NBV_MODEL_POLL_S": "0.25",
        # Timers poll often, so a simulated day's unsnoozes and sweeps run before its sessions.
        "NBV_DELIVERY_POLL_S": "0.1",
        "NBV_INGEST_SCHEDULER_POLL_S": "0.1",
        "NBV_LOG_LEVEL": "WARNING",
        **clock.process_env(),
    }


def store_url(folder: Path) -> str:
    return f"sqlite+aiosqlite:///{(folder / 'data' / 'nbv.sqlite').resolve()}"


def _us(t: datetime) -> int:
    return int(t.timestamp() * 1_000_000)


class Retrainer:
    """After each week: export the process's log, train, estimate off-policy, promote.

    The estimate is of the policy that will serve: the new model with the arm's exploration
    (``policy``), on the held-out end of the log, counting a first card's completion only within
    ``window_h`` of the decision and only for decisions whose window has closed by now, which
    is how the value it then achieves is counted too."""

    def __init__(
        self,
        folder: Path,
        policy: TargetPolicy,
        config: TrainConfig,
        clock: SharedClock,
        window_h: float,
        without: tuple[str, ...] = (),
    ):
        self.url = store_url(folder)
        self.without = [INDEX[name] for name in without]
        self.registry = folder / "registry"
        self.policy = policy
        self.config = config
        self.clock = clock
        self.window_h = window_h
        self.rounds: list[Round] = []

    async def __call__(self, week: int) -> None:
        now = self.clock.now()
        data = LogData.from_table(await load_log(self.url, EPOCH, now + timedelta(seconds=1)))
        if self.without:  # an ablation: the model learns (and is estimated) without these
            features = data.features.copy()
            features[:, self.without] = math.nan
            data = dataclasses.replace(data, features=features)
        try:
            trained = await asyncio.to_thread(train_from_log, data, self.config, progress=False)
        except ValueError as exc:  # too little logged yet: the current model keeps serving
            print(f"ranker: no retrain after week {week}: {exc}", file=sys.stderr)
            return
        version = f"lgbm-week{week}"
        await asyncio.to_thread(save_trained, trained, self.registry, version)
        ranker = load_model(self.registry, version)
        if trained.holdout is not None:
            # Refitted on the held-out period too (``refit``): its twin fitted before the
            # held-out period stands in for it there, with that twin's own calibration.
            calibration = trained.holdout_calibration or {}
            ranker = LightGBMRanker(
                trained.holdout,
                version,
                slope=calibration.get("slope", 1.0),
                intercept=calibration.get("intercept", 0.0),
            )
        ev = await asyncio.to_thread(
            evaluate_model,
            ranker,
            data.within(self.window_h, _us(now)),
            trained.split_us,
            k=self.config.evaluate.k,
            epsilon=self.policy.epsilon,
            resamples=self.config.evaluate.bootstrap,
            seed=self.config.seed,
            group_by=self.config.group_by,
            target=self.policy,
            weight_cap=self.config.evaluate.dr_weight_cap,
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
                    "dr_capped": op.dr_capped.estimate if op.dr_capped else math.nan,
                },
                op.decisions,
                op.effective_sample_size,
            )
        )
        await register_and_promote(self.url, self.registry, version, by="bench/lift")
        await asyncio.sleep(1.0)  # the service polls the assignment every 0.25 s and swaps


def arm_policy(name: str, args: argparse.Namespace) -> TargetPolicy:
    """How each arm explores among the eligible elements: uniformly (random), not at all
    (rules), or as the train config's ``evaluate`` target says (ranker; the options override
    it): the policy served is the one the off-policy estimates are of."""
    if name == "random":
        return TargetPolicy("epsilon_greedy", epsilon=1.0)
    if name == "rules":
        return TargetPolicy("epsilon_greedy", epsilon=0.0)
    served = TrainConfig.load(args.config).evaluate.target()
    return TargetPolicy(
        args.exploration or served.kind,
        epsilon=served.epsilon if args.epsilon is None else args.epsilon,
        temperature=served.temperature if args.temperature is None else args.temperature,
    )


async def run_arm(name: str, args: argparse.Namespace, root: Path) -> Outcome:
    folder = root / name
    folder.mkdir()
    policy = arm_policy(name, args)
    clock = SharedClock(folder / "clock")
    # A kept run also keeps the world's hidden truth at each decision (bench/replay.py).
    truth = TruthLog(folder / "truth.jsonl") if args.keep is not None else None
    proc = ServiceProcess(["run"], process_env(folder, policy, args.seed, clock), folder, name)
    started = time.monotonic()
    retrainer = (
        Retrainer(
            folder,
            policy,
            TrainConfig.load(args.config),
            clock,
            args.reward_window_h,
            tuple(f for f in args.without.split(",") if f),
        )
        if name == "ranker"
        else None
    )
    try:
        await proc.wait_ready()
        limits = httpx.Limits(max_connections=args.concurrency * 2, keepalive_expiry=2.0)
        async with httpx.AsyncClient(
            base_url=proc.url, headers=auth_headers(), timeout=60.0, limits=limits
        ) as client:
            sim = Simulation(
                client,
                seed=args.seed,
                accounts=args.accounts,
                concurrency=args.concurrency,
                cards=args.cards,
                clock=clock,
                settle_s=args.settle,
                truth=truth,
            )
            weeks = await run(
                sim,
                args.weeks,
                on_week=lambda s: print(f"{name:>6} {s.line()}", file=sys.stderr, flush=True),
                between_weeks=retrainer,
            )
    finally:
        proc.stop()
        if truth is not None:
            truth.close()
    out = Outcome(name, weeks, seconds=time.monotonic() - started)
    out.decisions = sum(w.decisions for w in weeks)
    if retrainer is not None:
        out.rounds = retrainer.rounds
        end = clock.now()
        data = LogData.from_table(await load_log(retrainer.url, EPOCH, end + timedelta(days=1)))
        # The same reward as the estimates: completed within the window, windows closed.
        data = data.within(args.reward_window_h, _us(end))
        for r in out.rounds:
            r.achieved, r.achieved_decisions = first_card_value(data, r.version)
    clock.close()
    return out


async def run_arms(arms: list[str], args: argparse.Namespace, root: Path) -> dict[str, Outcome]:
    """The arms share nothing but the seed: each has its own NBV process, store and clock, so
    they can run side by side (two cores serve three processes better than one)."""
    if args.sequential:
        return {name: await run_arm(name, args, root) for name in arms}
    done = await asyncio.gather(*(run_arm(name, args, root) for name in arms))
    return dict(zip(arms, done, strict=True))


def ope_error(rounds: list[Round], estimator: str) -> float:
    """|estimate − achieved| ÷ achieved of the decision-weighted means over the rounds."""
    used = [r for r in rounds if r.achieved_decisions and math.isfinite(r.ope[estimator])]
    decisions = sum(r.achieved_decisions for r in used)
    if not decisions:
        return math.nan
    estimate = sum(r.ope[estimator] * r.achieved_decisions for r in used) / decisions
    value = sum(r.achieved * r.achieved_decisions for r in used) / decisions
    return abs(estimate - value) / value if value else math.nan


def mean_round_error(rounds: list[Round], estimator: str) -> float:
    """The decision-weighted mean of each round's own relative error (no cancelling out)."""
    used = [r for r in rounds if r.achieved_decisions and r.achieved > 0]
    decisions = sum(r.achieved_decisions for r in used)
    if not decisions:
        return math.nan
    return (
        sum(abs(r.ope[estimator] - r.achieved) / r.achieved * r.achieved_decisions for r in used)
        / decisions
    )


def _round(value: float, digits: int = 3) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


def report(outcomes: dict[str, Outcome], warmup: int, primary: str) -> dict[str, Any]:
    """The summary; ``primary`` is the estimator ``ope_rel_error`` is of."""
    print(
        f"\nper policy, weeks {warmup}..end (the ranker's first week{'s' * (warmup > 1)} "
        "serve the rule prior with exploration):"
    )
    for o in outcomes.values():
        print(
            f"  {o.name:>6}: success {o.success(warmup):.3f} completed/user-week "
            f"(all weeks {o.success(0):.3f}), retained users {o.retention:.2f}, "
            f"accounts {o.weeks[-1].retained_accounts:.2f}, {o.decisions} decisions, "
            f"{o.seconds:.0f} s"
        )
    ranker = outcomes["ranker"]
    for r in ranker.rounds:
        print(
            f"  {r.version}: OPE on {r.ope_decisions} held-out decisions (ESS {r.ess:.0f})  "
            + "  ".join(f"{k} {v:.3f}" for k, v in r.ope.items())
            + f"  →  achieved {r.achieved:.3f} over {r.achieved_decisions} decisions"
        )
    estimators = ("ips", "snips", "dr", "dr_capped")
    errors = {e: ope_error(ranker.rounds, e) for e in estimators}
    per_round = {e: mean_round_error(ranker.rounds, e) for e in estimators}
    print(
        "  OPE relative error (decision-weighted means): "
        + ", ".join(f"{k} {v:.3f}" for k, v in errors.items())
        + "; mean of the rounds' own errors: "
        + ", ".join(f"{k} {v:.3f}" for k, v in per_round.items())
    )
    base_rules = outcomes["rules"].success(warmup)
    base_random = outcomes["random"].success(warmup)
    learned = ranker.success(warmup)
    return {
        "lift_vs_rules": _round(learned / base_rules) if base_rules else None,
        "lift_vs_random": _round(learned / base_random) if base_random else None,
        "ope_rel_error": _round(errors[primary]),
        "ope_estimator": primary,
        "success": {k: round(o.success(warmup), 4) for k, o in outcomes.items()},
        "retained_users": {k: round(o.retention, 3) for k, o in outcomes.items()},
        "decisions": {k: o.decisions for k, o in outcomes.items()},
        "ope_rel_error_by_estimator": {k: _round(v) for k, v in errors.items()},
        "ope_mean_round_error": {k: _round(v) for k, v in per_round.items()},
        "weeks": len(ranker.weeks),
        "warmup_weeks": warmup,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer accounts and weeks")
    parser.add_argument("--accounts", type=int)
    parser.add_argument("--weeks", type=int)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--exploration",
        choices=("softmax", "epsilon_greedy"),
        help="the ranker arm's exploration (default: the config's evaluate.target_policy)",
    )
    parser.add_argument("--temperature", type=float, help="softmax's T (default: the config's)")
    parser.add_argument("--epsilon", type=float, help="ε-greedy's ε (default: the config's)")
    parser.add_argument(
        "--reward-window-h",
        type=float,
        default=REWARD_WINDOW_H,
        help="hours after a decision a completion counts for the off-policy comparison",
    )
    parser.add_argument("--concurrency", type=int, default=8, help="sessions at once per arm")
    parser.add_argument(
        "--cards", type=int, default=1, help="cards the in-app widget shows (the next best value)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="weeks left out of the success")
    parser.add_argument("--settle", type=float, default=0.3, help="seconds after each day step")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the ranker's train config")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset")
    parser.add_argument(
        "--without",
        default="",
        help="comma-separated feature columns the ranker trains without (missing), an ablation",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        help="run in this folder and keep it (stores, logs, the hidden truth for bench/replay.py)",
    )
    parser.add_argument(
        "--sequential", action="store_true", help="one arm after the other (default: together)"
    )
    args = parser.parse_args()
    args.accounts = args.accounts or (15 if args.quick else 60)
    args.weeks = args.weeks or (3 if args.quick else 6)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [f for f in args.without.split(",") if f and f not in INDEX]
    if unknown:
        parser.error(f"--without: unknown feature columns {unknown}")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=False)
        outcomes = await run_arms(arms, args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="nbv-lift-") as tmp:
            outcomes = await run_arms(arms, args, Path(tmp))
    if set(arms) != set(ARMS):
        for o in outcomes.values():
            print(f"{o.name}: success {o.success(args.warmup):.4f}", file=sys.stderr)
            for r in o.rounds:
                print(
                    f"  {r.version}: dr_capped {r.ope['dr_capped']:.3f} on {r.ope_decisions}"
                    f" → achieved {r.achieved:.3f} over {r.achieved_decisions}",
                    file=sys.stderr,
                )
        return
    cap = TrainConfig.load(args.config).evaluate.dr_weight_cap
    result = report(outcomes, warmup=args.warmup, primary="dr" if cap is None else "dr_capped")
    result["accounts"] = args.accounts
    print(json.dumps(result))


if __name__ == "__main__":
    # SIGTERM ends the run like Ctrl-C: the NBV processes it started are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    asyncio.run(main())
