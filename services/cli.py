"""The ``nbv`` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import uvicorn

from shared.logging import configure_logging
from shared.settings import BusKind, Settings


def _serve(settings: Settings, services: Sequence[str]) -> None:
    from services.app import build_app

    configure_logging(settings.log_level, "+".join(services))
    app = build_app(settings, services)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=20,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nbv", description="Next Best Value service")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run all three services in one process")
    run.add_argument("--port", type=int)
    run.add_argument(
        "--bus", choices=[b.value for b in BusKind], help="embedded (default) or kafka"
    )

    serve = sub.add_parser("serve", help="run one or more services (scaled-out mode)")
    serve.add_argument("services", nargs="+", choices=["ingest", "decision", "delivery"])
    serve.add_argument("--port", type=int)

    sub.add_parser("migrate", help="bring the database schema up to date")

    args = parser.parse_args(argv)
    overrides: dict[str, object] = {}
    if getattr(args, "port", None):
        overrides["port"] = args.port
    if getattr(args, "bus", None):
        overrides["bus"] = args.bus
    settings = Settings(**overrides)  # type: ignore[arg-type]

    if args.command == "migrate":
        from shared.store.db import migrate

        configure_logging(settings.log_level, "migrate")
        asyncio.run(migrate(settings.resolved_database_url))
        return 0
    if args.command == "run":
        _serve(settings, ["ingest", "decision", "delivery"])
        return 0
    _serve(settings, args.services)
    return 0


if __name__ == "__main__":
    sys.exit(main())
