"""``nbv deliveries …``: look at the ledger and replay dead deliveries."""

from __future__ import annotations

import argparse
import asyncio
import json

from services.delivery.ledger import Status, list_deliveries, replay
from shared.settings import Settings
from shared.store.db import create_engine, session_factory


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    deliveries = sub.add_parser("deliveries", help="the delivery ledger")
    actions = deliveries.add_subparsers(dest="action", required=True)

    replay_p = actions.add_parser("replay", help="re-queue dead deliveries")
    which = replay_p.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="ids", action="append", help="a delivery id (repeatable)")
    which.add_argument("--all-dead", action="store_true", help="every dead delivery")
    replay_p.set_defaults(handler=_replay)

    list_p = actions.add_parser("list", help="print deliveries as JSON lines")
    list_p.add_argument("--status", choices=[s.value for s in Status])
    list_p.add_argument("--user-id")
    list_p.add_argument("--limit", type=int, default=100)
    list_p.set_defaults(handler=_list)


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    async def run() -> list[str]:
        engine = create_engine(settings.resolved_database_url)
        try:
            async with session_factory(engine)() as session, session.begin():
                dialect = engine.dialect.name
                return await replay(session, dialect, ids=args.ids or (), all_dead=args.all_dead)
        finally:
            await engine.dispose()

    ids = asyncio.run(run())
    for delivery_id in ids:
        print(delivery_id)
    print(f"{len(ids)} deliveries re-queued")
    if args.ids and len(ids) < len(args.ids):
        missing = sorted(set(args.ids) - set(ids))
        print(f"not dead (or unknown), left alone: {', '.join(missing)}")
        return 1
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    async def run() -> None:
        engine = create_engine(settings.resolved_database_url)
        try:
            async with session_factory(engine)() as session:
                rows = await list_deliveries(
                    session, status=args.status, user_id=args.user_id, limit=args.limit
                )
        finally:
            await engine.dispose()
        for row in rows:
            print(json.dumps(row.model_dump(mode="json")))

    asyncio.run(run())
    return 0
