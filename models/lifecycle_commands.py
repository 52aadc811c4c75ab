"""``nbv model export|train|evaluate``, the registry (``register|list|history|promote|rollback|
challenger``) and ``nbv simulate``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from models.registry_store import Assignment


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
    registry = Path(args.registry or settings.model_dir)
    folder = save_trained(trained, registry, version)
    registered = False
    if not args.no_register:
        from models.registry_store import RegistryError

        try:
            registered = asyncio.run(_register_folder(settings, registry, version, _by(args)))
        except RegistryError as exc:
            print(f"trained into {folder} but not registered: {exc}", file=sys.stderr)
            return 2
    out = {"version": version, "path": str(folder), "registered": registered}
    print(json.dumps({**out, **_brief(trained.meta)}))
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
    from models.ranker import load_model

    registry = Path(args.registry or settings.model_dir)
    version = args.version or asyncio.run(_champion(settings))
    if version is None:
        print("no --version given and the rule prior is the champion", file=sys.stderr)
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
        # The exploration the model will serve with; --epsilon overrides an ε-greedy target's ε.
        target=(
            config.evaluate.target()
            if args.epsilon is None
            else config.evaluate.model_copy(update={"target_epsilon": args.epsilon}).target()
        ),
        weight_cap=config.evaluate.dr_weight_cap,
    )
    (registry / version / "evaluation.json").write_text(ev.model_dump_json(indent=2))
    booster = lgb.Booster(model_file=str(registry / version / "model.txt"))
    card = write_card(registry / version, version, meta, booster, ev)
    print(ev.model_dump_json())
    print(f"model card: {card}", file=sys.stderr)
    if asyncio.run(_attach_evaluation(settings, version, ev.model_dump(mode="json"))):
        print(f"evaluation recorded with the registered {version}", file=sys.stderr)
    else:
        print(
            f"{version} is not registered in the store: `nbv model register {version}` adds it",
            file=sys.stderr,
        )
    return 0


# ------------------------------------------------------------------ the registry in the store


def _by(args: argparse.Namespace) -> str:
    if args.by:
        return str(args.by)
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        return "cli"


def _store(settings: Settings) -> AbstractAsyncContextManager[AsyncSession]:
    """One transaction on the services' store (NBV_DATABASE_URL, or the embedded one)."""
    from models.registry_store import registry_session

    return registry_session(settings.resolved_database_url, auto_migrate=settings.auto_migrate)


async def _register_folder(settings: Settings, registry: Path, version: str, by: str) -> bool:
    from models.registry_store import register_folder

    async with _store(settings) as session:
        _, created = await register_folder(session, registry, version, by=by)
    return created


async def _champion(settings: Settings) -> str | None:
    from models.registry_store import current_assignment

    async with _store(settings) as session:
        return (await current_assignment(session)).champion


async def _attach_evaluation(settings: Settings, version: str, report: dict[str, Any]) -> bool:
    from models.registry_store import set_evaluation

    async with _store(settings) as session:
        return await set_evaluation(session, version, report)


def _store_command(
    args: argparse.Namespace,
    settings: Settings,
    work: Callable[[AsyncSession], Awaitable[str]],
) -> int:
    """Run one registry operation in one transaction; a refusal is a message and exit code 2."""
    from models.registry_store import RegistryError

    async def run() -> str:
        async with _store(settings) as session:
            return await work(session)

    try:
        print(asyncio.run(run()))
    except RegistryError as exc:
        print(f"nbv model {args.model_command}: {exc}", file=sys.stderr)
        return 2
    return 0


def _models(a: Assignment) -> str:
    if a.challenger:
        return (
            f"champion {a.champion_version}, "
            f"challenger {a.challenger} for {a.challenger_share:.0%} of people"
        )
    return f"champion {a.champion_version}, no challenger"


def _when_by(a: Assignment) -> str:
    at = f"{a.changed_at:%Y-%m-%d %H:%M:%S}Z" if a.changed_at else "never"
    return f"by {a.changed_by or '-'} at {at}"


def _serving(a: Assignment) -> str:
    if a.changed_at is None:
        return _models(a)
    return f"{_models(a)} (#{a.id} {a.action} {_when_by(a)})"


def _changed(before: int, after: Assignment) -> str:
    return ("unchanged: " if after.id == before else "now serving: ") + _serving(after)


def _register(args: argparse.Namespace, settings: Settings) -> int:
    from models.registry_store import register_folder

    registry = Path(args.registry or settings.model_dir)

    async def work(session: AsyncSession) -> str:
        info, created = await register_folder(session, registry, args.version, by=_by(args))
        what = "registered" if created else "already registered with this same model"
        return f"{info.version} {what}: {_metrics(info.headline)}"

    return _store_command(args, settings, work)


def _metrics(headline: dict[str, float | None]) -> str:
    shown = [f"{k} {v:.4g}" for k, v in headline.items() if v is not None]
    return ", ".join(shown) or "not evaluated"


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from models.registry_store import current_assignment, list_versions

    async def work(session: AsyncSession) -> str:
        assignment = await current_assignment(session)
        versions = await list_versions(session)
        if args.json:
            return json.dumps(
                {
                    "assignment": assignment.model_dump(mode="json"),
                    "versions": [
                        v.model_dump(mode="json", exclude={"meta", "evaluation"}) for v in versions
                    ],
                }
            )
        lines = [f"serving: {_serving(assignment)}"]
        if not versions:
            lines.append("no model registered yet (`nbv model train` or `nbv model register`)")
        for v in versions:
            data = (
                f"{v.data_from:%Y-%m-%d}..{v.data_until:%Y-%m-%d}"
                if v.data_from and v.data_until
                else "-"
            )
            stale = "" if v.features_match else "  [features differ from this code's]"
            lines.append(
                f"{v.version:<28} {v.status:<10} {v.created_at:%Y-%m-%d %H:%M}  data {data}  "
                f"{_metrics(v.headline)}{stale}"
            )
        return "\n".join(lines)

    return _store_command(args, settings, work)


def _history(args: argparse.Namespace, settings: Settings) -> int:
    from models.registry_store import history

    async def work(session: AsyncSession) -> str:
        rows = await history(session, args.limit)
        if not rows:
            return "no change yet: the rule prior serves"
        return "\n".join(
            f"#{a.id:<4} {a.action:<16} {_models(a)}  {_when_by(a)}"
            + (f"  ({a.reason})" if a.reason else "")
            for a in rows
        )

    return _store_command(args, settings, work)


def _promote(args: argparse.Namespace, settings: Settings) -> int:
    from models.registry_store import current_assignment, promote

    async def work(session: AsyncSession) -> str:
        before = (await current_assignment(session)).id
        done = await promote(session, args.version, by=_by(args), reason=args.reason)
        return _changed(before, done)

    return _store_command(args, settings, work)


def _rollback(args: argparse.Namespace, settings: Settings) -> int:
    from models.registry_store import rollback

    async def work(session: AsyncSession) -> str:
        return "now serving: " + _serving(await rollback(session, by=_by(args), reason=args.reason))

    return _store_command(args, settings, work)


def _challenger(args: argparse.Namespace, settings: Settings) -> int:
    from models.registry_store import clear_challenger, current_assignment, set_challenger

    if args.clear == bool(args.version):
        print("nbv model challenger: give a VERSION (with --share) or --clear", file=sys.stderr)
        return 2
    if args.version and args.share is None:
        print("nbv model challenger: --share is required with a VERSION", file=sys.stderr)
        return 2

    async def work(session: AsyncSession) -> str:
        before = (await current_assignment(session)).id
        if args.clear:
            done = await clear_challenger(session, by=_by(args), reason=args.reason)
        else:
            done = await set_challenger(
                session, args.version, args.share, by=_by(args), reason=args.reason, salt=args.salt
            )
        return _changed(before, done)

    return _store_command(args, settings, work)


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--share {text!r}: not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"--share {text}: must be between 0 and 1 (exclusive)")
    return value


def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    from models.simulator.driver import simulate
    from models.simulator.truth import TruthLog
    from shared.access.keys import client_key

    truth = TruthLog(args.truth_log) if args.truth_log else None
    try:
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
                api_key=client_key(settings),
                truth=truth,
            )
        )
    finally:
        if truth is not None:
            truth.close()
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
    model = sub.add_parser("model", help="export, train, evaluate and serve the ranker")
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
    tr.add_argument(
        "--no-register", action="store_true", help="write the working copy only, not the store"
    )
    tr.add_argument("--by", help="who registers it (default: your user name)")
    tr.set_defaults(handler=_train)

    ev = msub.add_parser("evaluate", help="NDCG/MAP and off-policy value; writes a model card")
    ev.add_argument("--data", required=True, help="a Parquet training log from `export`")
    ev.add_argument("--registry", help="registry folder (default: NBV_MODEL_DIR)")
    ev.add_argument("--version", help="default: the champion")
    ev.add_argument("--since", help="held-out period start (default: the model's split)")
    ev.add_argument("--k", type=int, help="NDCG cut-off (default: from the training config)")
    ev.add_argument("--epsilon", type=float, help="target policy's ε (default: from config)")
    ev.set_defaults(handler=_evaluate)

    reg = msub.add_parser("register", help="add a working-copy version to the store's registry")
    reg.add_argument("version")
    reg.add_argument("--registry", help="registry folder (default: NBV_MODEL_DIR)")
    reg.add_argument("--by", help="who registers it (default: your user name)")
    reg.set_defaults(handler=_register)

    ls = msub.add_parser("list", help="registered versions, their status and headline metrics")
    ls.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    ls.set_defaults(handler=_list)

    hist = msub.add_parser("history", help="who changed what serves, and when")
    hist.add_argument("--limit", type=int, default=20)
    hist.set_defaults(handler=_history)

    pro = msub.add_parser("promote", help="make a registered version the champion")
    pro.add_argument("version")
    rb = msub.add_parser("rollback", help="back to the previous champion (or the rule prior)")
    ch = msub.add_parser("challenger", help="route a share of people to another version")
    ch.add_argument("version", nargs="?")
    ch.add_argument("--share", type=_share, help="share of people, 0 < share < 1")
    ch.add_argument("--salt", help="routing salt (default: the version; kept on share changes)")
    ch.add_argument("--clear", action="store_true", help="no challenger: all on the champion")
    for p, handler in ((pro, _promote), (rb, _rollback), (ch, _challenger)):
        p.add_argument("--reason", default="", help="why, for the history")
        p.add_argument("--by", help="who (default: your user name)")
        p.set_defaults(handler=handler)

    sim = sub.add_parser("simulate", help="drive a running NBV with a simulated SaaS world")
    sim.add_argument("--url", default="http://127.0.0.1:8000")
    sim.add_argument("--accounts", type=int, default=20)
    sim.add_argument("--weeks", type=int, default=4)
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument("--policy", choices=["api", "random"], default="api")
    sim.add_argument("--concurrency", type=int, default=16)
    sim.add_argument("--cards", type=int, default=3, help="cards shown per session (limit)")
    sim.add_argument(
        "--truth-log",
        type=Path,
        help="append the world's hidden P(completed) of every element at each decision here "
        "(JSON lines, models/simulator/truth.py; for analysis, NBV never sees it)",
    )
    sim.set_defaults(handler=_simulate)
