"""``nbv keys create|list|revoke|generate``: API keys, straight in the store.

``create`` prints the key alone on stdout (so a script can capture it) and what it made on
stderr; the key is never shown again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from shared.access import keys
from shared.access.scopes import Scope
from shared.settings import Settings
from shared.store.db import create_engine, migrate, session_factory

T = TypeVar("T")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("keys", help="API keys: create, list, revoke (docs/security.md)")
    actions = parser.add_subparsers(dest="action", required=True)

    create = actions.add_parser("create", help="create a key and print it (only this once)")
    create.add_argument("--name", required=True, help="who or what uses it")
    create.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        required=True,
        choices=[s.value for s in Scope],
        help="repeatable; admin implies every other scope",
    )
    create.add_argument(
        "--rate-limit", type=float, help="requests/s per process (default NBV_RATE_LIMIT_PER_S)"
    )
    create.set_defaults(handler=_create)

    list_ = actions.add_parser("list", help="keys as JSON lines (never the keys themselves)")
    list_.add_argument("--active", action="store_true", help="leave out revoked keys")
    list_.set_defaults(handler=_list)

    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("id")
    revoke.set_defaults(handler=_revoke)

    actions.add_parser(
        "generate", help="print a new random key without storing it (e.g. for NBV_ADMIN_KEY)"
    ).set_defaults(handler=_generate)


def _in_store(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    async def run() -> T:
        url = settings.resolved_database_url
        if settings.auto_migrate:
            await migrate(url)
        engine = create_engine(url)
        try:
            async with session_factory(engine)() as session, session.begin():
                return await work(session)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _create(args: argparse.Namespace, settings: Settings) -> int:
    try:
        spec = keys.KeyCreate(name=args.name, scopes=args.scopes, rate_limit=args.rate_limit)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"nbv keys create: {problems}", file=sys.stderr)
        return 2

    async def work(session: AsyncSession) -> keys.KeyCreated:
        return await keys.create_key(session, spec)

    created = _in_store(settings, work)
    print(created.key)
    print(
        f"created key {created.id} ({created.name}; {', '.join(created.scopes)}): it is shown "
        "only this once",
        file=sys.stderr,
    )
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    async def work(session: AsyncSession) -> list[keys.KeyOut]:
        return await keys.list_keys(session, include_revoked=not args.active)

    for key in _in_store(settings, work):
        print(json.dumps(key.model_dump(mode="json")))
    return 0


def _revoke(args: argparse.Namespace, settings: Settings) -> int:
    async def work(session: AsyncSession) -> dict[str, Any] | None:
        row = await keys.revoke_key(session, args.id)
        return None if row is None else keys.KeyOut.model_validate(row).model_dump(mode="json")

    revoked = _in_store(settings, work)
    if revoked is None:
        print(f"nbv keys revoke: unknown key id {args.id!r}", file=sys.stderr)
        return 1
    print(f"revoked key {revoked['id']} ({revoked['name']}) at {revoked['revoked_at']}")
    return 0


def _generate(args: argparse.Namespace, settings: Settings) -> int:
    print(keys.generate())
    return 0
