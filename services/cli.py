"""The ``nbv`` command.

Each service contributes its own subcommands from ``services/<name>/commands.py``: a
``register(sub)`` function that adds parsers with ``set_defaults(handler=fn)``, where
``fn(args, settings) -> int``. List the module in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import sys
from collections.abc import Sequence

import uvicorn

from shared.logging import configure_logging
from shared.settings import BusKind, Settings

COMMAND_MODULES: list[str] = [
    "services.delivery.commands",
    "services.ingest.commands",
    "services.decision.commands",
    "models.lifecycle_commands",
    "shared.access.commands",
]


def _serve(settings: Settings, services: Sequence[str]) -> int:
    from services.app import build_app

    configure_logging(settings.log_level, "+".join(services))
    app = build_app(settings, services)
    tune_collector(settings.gc_threshold)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=20,
    )
    return 0


def tune_collector(threshold: int) -> None:
    """A server allocates tens of thousands of short-lived objects per request or consumer batch
    (a batch of events and their models) while holding large long-lived ones (modules, the
    projector's row cache). With the default threshold the collector runs every 700
    allocations and keeps rescanning both; here what is loaded at start is moved out of its
    reach and young collections run every ``threshold`` allocations (reference counting frees
    almost everything anyway; the collector is only for cycles)."""
    gc.freeze()
    if threshold:
        gc.set_threshold(threshold, *gc.get_threshold()[1:])


def _run(args: argparse.Namespace, settings: Settings) -> int:
    return _serve(settings, ["ingest", "decision", "delivery"])


def _serve_cmd(args: argparse.Namespace, settings: Settings) -> int:
    return _serve(settings, args.services)


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from shared.store.db import migrate

    configure_logging(settings.log_level, "migrate")
    asyncio.run(migrate(settings.resolved_database_url))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbv", description="Next Best Value service")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run all three services in one process")
    run.add_argument("--port", type=int)
    run.add_argument(
        "--bus", choices=[b.value for b in BusKind], help="embedded (default) or kafka"
    )
    run.set_defaults(handler=_run)

    serve = sub.add_parser("serve", help="run one or more services (scaled-out mode)")
    serve.add_argument("services", nargs="+", choices=["ingest", "decision", "delivery"])
    serve.add_argument("--port", type=int)
    serve.set_defaults(handler=_serve_cmd)

    sub.add_parser("migrate", help="bring the database schema up to date").set_defaults(
        handler=_migrate
    )
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, object] = {}
    if getattr(args, "port", None):
        overrides["port"] = args.port
    if getattr(args, "bus", None):
        overrides["bus"] = args.bus
    settings = Settings(**overrides)  # type: ignore[arg-type]
    return int(args.handler(args, settings))


if __name__ == "__main__":
    sys.exit(main())
