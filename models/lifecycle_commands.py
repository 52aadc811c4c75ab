"""``nbv model export|train|evaluate`` and ``nbv simulate``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.settings import Settings


def _when(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _export(args: argparse.Namespace, settings: Settings) -> int:
    from models.export import load_log, write_parquet

    since = _when(args.since) if args.since else datetime(1970, 1, 1, tzinfo=UTC)
    until = _when(args.until) if args.until else datetime.now(UTC)
    table = asyncio.run(load_log(settings.resolved_database_url, since, until))
    write_parquet(table, Path(args.out))
    shown = sum(1 for s in table.column("shown").to_pylist() if s)
    print(json.dumps({"rows": table.num_rows, "shown": shown, "out": args.out}))
    return 0


def _train(args: argparse.Namespace, settings: Settings) -> int:
    from models.export import read_parquet
    from models.fit import TrainConfig, save_trained, train_from_log
    from models.logdata import LogData

    config = TrainConfig.load(Path(args.config))
    data = LogData.from_table(read_parquet(Path(args.data)))
    trained = train_from_log(data, config, progress=sys.stderr.isatty() or args.progress)
    version = args.version or f"lgbm-{datetime.now(UTC):%Y%m%d%H%M%S}"
    folder = save_trained(trained, Path(args.registry or settings.model_dir), version)
    print(json.dumps({"version": version, "path": str(folder), **_brief(trained.meta)}))
    return 0


def _brief(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta[k] for k in ("rows", "queries", "best_iteration", "split_at") if k in meta}


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    import lightgbm as lgb

    from models.card import write_card
    from models.evaluate import evaluate_model
    from models.export import read_parquet
    from models.fit import TrainConfig
    from models.logdata import LogData
    from models.ranker import champion_version, load_model

    registry = Path(args.registry or settings.model_dir)
    version = args.version or champion_version(registry)
    if version is None:
        print("no --version given and no champion in the registry", file=sys.stderr)
        return 2
    meta = json.loads((registry / version / "meta.json").read_text())
    config = TrainConfig.model_validate(meta.get("config") or {})
    ranker = load_model(registry, version)
    data = LogData.from_table(read_parquet(Path(args.data)))
    split = _when(args.since) if args.since else _when(meta["split_at"])
    ev = evaluate_model(
        ranker,
        data,
        int(split.timestamp() * 1_000_000),
        k=args.k or config.evaluate.k,
        epsilon=config.evaluate.target_epsilon if args.epsilon is None else args.epsilon,
        resamples=config.evaluate.bootstrap,
        seed=config.seed,
        group_by=config.group_by,
    )
    (registry / version / "evaluation.json").write_text(ev.model_dump_json(indent=2))
    booster = lgb.Booster(model_file=str(registry / version / "model.txt"))
    card = write_card(registry / version, version, meta, booster, ev)
    print(ev.model_dump_json())
    print(f"model card: {card}", file=sys.stderr)
    return 0


def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    from models.simulator.driver import simulate

    summaries, _ = asyncio.run(
        simulate(
            args.url,
            accounts=args.accounts,
            weeks=args.weeks,
            seed=args.seed,
            policy=args.policy,
            concurrency=args.concurrency,
            cards=args.cards,
            on_week=lambda s: print(s.line(), flush=True),
        )
    )
    users = sum(s.active_users for s in summaries)
    done = sum(s.completed for s in summaries)
    print(
        json.dumps(
            {
                "weeks": len(summaries),
                "success_per_user_week": round(done / users, 4) if users else 0.0,
                "retained_users": summaries[-1].retained_users if summaries else 1.0,
            }
        )
    )
    return 0


def register(sub: Any) -> None:
    model = sub.add_parser("model", help="export, train and evaluate the ranker")
    msub = model.add_subparsers(dest="model_command", required=True)

    exp = msub.add_parser("export", help="the training log (decisions ⨝ responses) to Parquet")
    exp.add_argument("--since", help="ISO time (UTC if no zone); default: the beginning")
    exp.add_argument("--until", help="ISO time, exclusive; default: now")
    exp.add_argument("--out", required=True, help="FILE.parquet")
    exp.set_defaults(handler=_export)

    tr = msub.add_parser("train", help="train a LightGBM lambdarank model from a config")
    tr.add_argument("--config", default="models/configs/default.yaml")
    tr.add_argument("--data", required=True, help="a Parquet training log from `export`")
    tr.add_argument("--registry", help="registry folder (default: NBV_MODEL_DIR)")
    tr.add_argument("--version", help="version name (default: lgbm-<time>)")
    tr.add_argument("--progress", action="store_true", help="progress bar even without a tty")
    tr.set_defaults(handler=_train)

    ev = msub.add_parser("evaluate", help="NDCG/MAP and off-policy value; writes a model card")
    ev.add_argument("--data", required=True, help="a Parquet training log from `export`")
    ev.add_argument("--registry", help="registry folder (default: NBV_MODEL_DIR)")
    ev.add_argument("--version", help="default: the champion")
    ev.add_argument("--since", help="held-out period start (default: the model's split)")
    ev.add_argument("--k", type=int, help="NDCG cut-off (default: from the training config)")
    ev.add_argument("--epsilon", type=float, help="target policy's ε (default: from config)")
    ev.set_defaults(handler=_evaluate)

    sim = sub.add_parser("simulate", help="drive a running NBV with a simulated SaaS world")
    sim.add_argument("--url", default="http://127.0.0.1:8000")
    sim.add_argument("--accounts", type=int, default=20)
    sim.add_argument("--weeks", type=int, default=4)
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument("--policy", choices=["api", "random"], default="api")
    sim.add_argument("--concurrency", type=int, default=16)
    sim.add_argument("--cards", type=int, default=3, help="cards shown per session (limit)")
    sim.set_defaults(handler=_simulate)
