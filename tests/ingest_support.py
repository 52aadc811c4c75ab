"""Helpers for the ingest tests: the ingest service in this process, over ASGI."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from services.ingest.service import IngestService
from shared.http import create_app
from shared.runtime import Runtime
from shared.settings import Settings
from tests.harness import auth_headers, eventually


@dataclass
class Ingest:
    http: httpx.AsyncClient
    service: IngestService
    rt: Runtime

    async def view(self, kind: str, key: str) -> dict[str, Any] | None:
        resp = await self.http.get(f"/v1/{kind}/{key}/view")
        return resp.json() if resp.status_code == 200 else None

    async def wait_view(
        self, kind: str, key: str, done: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            return await self.view(kind, key)

        result = await eventually(probe, lambda v: v is not None and done(v), what=what)
        assert result is not None
        return result


@asynccontextmanager
async def ingest(settings: Settings) -> AsyncIterator[Ingest]:
    rt = Runtime.from_settings(settings)
    service = IngestService(rt)
    app = create_app(rt, [lambda _: service])
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://nbv", headers=auth_headers()
        ) as http:
            yield Ingest(http, service, rt)
