"""``nbv ingest FILE``: backfill events from NDJSON or CSV, with a progress bar."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from services.ingest.importer import (
    Format,
    ImportError_,
    Sender,
    bus_sender,
    http_sender,
    run_import,
)
from shared.access.keys import client_key
from shared.bus import create_bus
from shared.logging import configure_logging
from shared.settings import Settings


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "ingest",
        help="backfill events from an NDJSON or CSV file",
        description="Send every event of FILE (NDJSON or CSV of envelope events) to NBV.",
    )
    parser.add_argument("file", type=Path)
    parser.add_argument("--format", choices=["ndjson", "csv"], help="default: from the suffix")
    parser.add_argument(
        "--url",
        help="a running ingest service (default: NBV_PUBLIC_URL); posts batches with the key "
        "in NBV_API_KEY (else NBV_ADMIN_KEY), which needs events:write",
    )
    parser.add_argument(
        "--direct",
        action="store_true",
        help="publish straight to the event log (NBV_BUS settings) instead of over HTTP",
    )
    parser.add_argument("--batch", type=int, default=1_000, help="events per batch (≤ 1000)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request")
    parser.set_defaults(handler=_ingest)


def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings.log_level, "ingest-import")
    path: Path = args.file
    if not path.is_file():
        print(f"nbv ingest: no such file: {path}", file=sys.stderr)
        return 2
    if not 1 <= args.batch <= 1_000:
        print("nbv ingest: --batch must be between 1 and 1000", file=sys.stderr)
        return 2
    try:
        sent = asyncio.run(_run(args, settings, path, path.stat().st_size))
    except ImportError_ as exc:
        print(f"nbv ingest: {exc}", file=sys.stderr)
        return 1
    print(f"nbv ingest: {sent} event(s) sent from {path}")
    return 0


async def _run(args: argparse.Namespace, settings: Settings, path: Path, size: int) -> int:
    fmt: Format | None = args.format
    with tqdm(total=size, unit="B", unit_scale=True, desc=path.name) as bar:
        if args.direct:
            bus = create_bus(settings)
            await bus.start()
            try:
                send: Sender = bus_sender(bus, settings.topic("events"))
                return await run_import(
                    path, send, fmt=fmt, batch_size=args.batch, progress=bar.update
                )
            finally:
                await bus.stop()
        url = args.url or settings.public_url
        key = client_key(settings)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(base_url=url, timeout=args.timeout, headers=headers) as client:
            return await run_import(
                path, http_sender(client), fmt=fmt, batch_size=args.batch, progress=bar.update
            )
