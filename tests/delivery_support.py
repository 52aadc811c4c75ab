"""Helpers for the delivery tests: NBV in-process on a real port, and real receivers
(an SMTP server and an HTTP webhook receiver) on loopback."""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import uvicorn
from aiosmtpd.controller import Controller
from fastapi import FastAPI, Request, Response

from services.app import build_app
from shared.bus import Message, create_bus
from shared.contracts import DecidedItem, DecisionMessage, ElementContent, Resource
from shared.envelope import Channel
from shared.settings import Settings
from shared.signing import SIGNATURE_HEADER, verify_webhook_signature
from tests.harness import free_port

WEBHOOK_SECRET = "whsec-test"
SIGNING_SECRET = "signing-test"


@dataclass
class Running:
    url: str
    settings: Settings


@asynccontextmanager
async def serve(app: FastAPI, port: int) -> AsyncIterator[str]:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    server.config.timeout_graceful_shutdown = 2
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server exited during startup")
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def nbv(settings: Settings, services: list[str] | None = None) -> AsyncIterator[Running]:
    """NBV's services in this process, on a real port, with real Kafka/PostgreSQL or embedded."""
    port = free_port()
    settings = settings.model_copy(update={"public_url": f"http://127.0.0.1:{port}"})
    app = build_app(settings, services or ["ingest", "decision", "delivery"])
    async with serve(app, port) as url:
        yield Running(url, settings)


def delivery_settings(base: Settings, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "signing_secret": SIGNING_SECRET,
        "webhook_secret": WEBHOOK_SECRET,
        "delivery_poll_s": 0.05,
        "delivery_retry_base_s": 0.2,
        "delivery_retry_max_s": 1.0,
        "inbox_stream_poll_s": 0.2,
        "smtp_from": "NBV <nbv@example.com>",
        "product_url": "https://app.example.com",
    }
    values.update(overrides)
    return base.model_copy(update=Settings.model_validate(values).model_dump(include=set(values)))


def decision(
    user_id: str,
    channel: Channel,
    *,
    element_id: str = "video-tour",
    kind: str = "video",
    account_id: str = "acme",
    decision_id: str | None = None,
    trigger: str | None = None,
) -> DecisionMessage:
    return DecisionMessage(
        decision_id=decision_id or f"d-{uuid.uuid4().hex[:12]}",
        user_id=user_id,
        account_id=account_id,
        created_at=datetime.now(UTC),
        trigger=trigger,
        model_version="test",
        items=[
            DecidedItem(
                element_id=element_id,
                rank=1,
                channel=channel,
                score=0.9,
                propensity=1.0,
                reason="fits the onboard stage",
                content=ElementContent(
                    element_id=element_id,
                    title="Take the 3-minute tour",
                    kind=kind,
                    what="Watch the project tour <b>now</b>",
                    why="You will set up your first board twice as fast",
                    how=[
                        Resource(type="video", label="Project tour", url="/videos/tour"),
                        Resource(type="guide", label="Guide", url="https://docs.example.com/g"),
                    ],
                ),
            )
        ],
    )


async def publish_decisions(settings: Settings, decisions: list[DecisionMessage]) -> None:
    bus = create_bus(settings)
    await bus.start()
    try:
        await bus.publish(
            settings.topic("decisions"),
            [Message(key=d.account_id, value=d.model_dump_json().encode()) for d in decisions],
        )
    finally:
        await bus.stop()


class SmtpSink:
    """A real SMTP server (aiosmtpd) that keeps every message it accepted."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self._lock = threading.Lock()
        self.port = free_port()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        with self._lock:
            self.messages.append(parsed)
        return "250 OK"

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()


@dataclass
class WebhookReceiver:
    """An HTTP receiver that verifies NBV's signature, and fails (503) until told to recover."""

    healthy: bool = False
    received: list[dict[str, Any]] = field(default_factory=list)
    delivery_ids: list[str] = field(default_factory=list)
    refused: int = 0
    bad_signatures: int = 0

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> Response:
            body = await request.body()
            signature = request.headers.get(SIGNATURE_HEADER, "")
            if not verify_webhook_signature(WEBHOOK_SECRET.encode(), body, signature):
                self.bad_signatures += 1
                return Response(status_code=401)
            if not self.healthy:
                self.refused += 1
                return Response(status_code=503)
            self.received.append(await request.json())
            self.delivery_ids.append(request.headers["X-NBV-Delivery-Id"])
            return Response(status_code=204)

        return app
