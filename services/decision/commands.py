"""``nbv library import DIR``: validate a directory of YAML files and make it the active library
(a new version; history kept). ``nbv library versions``: the history."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import select

from services.decision.library import LibraryError, import_library, load_library
from shared.settings import Settings
from shared.store.db import create_engine, migrate, session_factory
from shared.store.models import LibraryVersion


async def _import(settings: Settings, directory: Path, dry_run: bool) -> int:
    try:
        library = load_library(directory)
    except LibraryError as exc:
        print(f"library not imported:\n{exc}", file=sys.stderr)
        return 2
    if dry_run:
        print(f"{directory}: {len(library.elements)} elements, valid")
        return 0
    if settings.auto_migrate:
        await migrate(settings.resolved_database_url)
    engine = create_engine(settings.resolved_database_url)
    try:
        async with session_factory(engine)() as session, session.begin():
            version = await import_library(
                session, engine.dialect.name, library.elements, f"nbv library import {directory}"
            )
    except LibraryError as exc:
        print(f"library not imported:\n{exc}", file=sys.stderr)
        return 2
    finally:
        await engine.dispose()
    print(f"library version {version}: {len(library.elements)} elements from {directory}")
    return 0


async def _versions(settings: Settings) -> int:
    engine = create_engine(settings.resolved_database_url)
    try:
        async with session_factory(engine)() as session:
            rows = await session.scalars(
                select(LibraryVersion).order_by(LibraryVersion.version.desc()).limit(50)
            )
            for r in rows:
                print(f"{r.version}\t{r.created_at:%Y-%m-%d %H:%M}\t{r.element_count}\t{r.source}")
    finally:
        await engine.dispose()
    return 0


def _import_cmd(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_import(settings, Path(args.directory), args.dry_run))


def _versions_cmd(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_versions(settings))


def register(sub: Any) -> None:
    library = sub.add_parser("library", help="manage the Value Element library")
    commands = library.add_subparsers(dest="library_command", required=True)
    imp = commands.add_parser("import", help="import a directory (or file) of YAML elements")
    imp.add_argument("directory", help="directory of *.yaml files, or one file")
    imp.add_argument("--dry-run", action="store_true", help="validate only")
    imp.set_defaults(handler=_import_cmd)
    commands.add_parser("versions", help="list library versions").set_defaults(
        handler=_versions_cmd
    )
