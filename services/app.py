"""Compose a process from services: one of them (scaled out) or all three (embedded mode)."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI

from services.decision.service import DecisionService
from services.delivery.service import DeliveryService
from services.ingest.service import IngestService
from shared.http import ServiceFactory, create_app
from shared.runtime import Runtime
from shared.settings import Settings, get_settings

SERVICES: dict[str, ServiceFactory] = {
    "ingest": IngestService,
    "decision": DecisionService,
    "delivery": DeliveryService,
}


def build_app(settings: Settings | None = None, services: Sequence[str] | None = None) -> FastAPI:
    settings = settings or get_settings()
    names = list(services or settings.services)
    unknown = [n for n in names if n not in SERVICES]
    if unknown:
        raise ValueError(f"unknown services {unknown}; choose from {sorted(SERVICES)}")
    return create_app(Runtime.from_settings(settings), [SERVICES[n] for n in names])
