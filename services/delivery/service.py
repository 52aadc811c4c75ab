"""Delivery: decisions → the person's channels (in-app inbox, email, CSM webhook), and every
response (API, widget, tracked links) → the event stream."""

from __future__ import annotations

import html
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import httpx
from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from services.delivery.channels.base import Channel as Sender
from services.delivery.channels.email import EmailChannel
from services.delivery.channels.webhook import WebhookChannel
from services.delivery.dispatch import Dispatcher
from services.delivery.inbox import Inbox, Notifier, list_cards
from services.delivery.ledger import SEND_JOB, DeliveryOut, Status, list_deliveries, replay
from services.delivery.links import Links
from services.delivery.preferences import (
    Preferences,
    PreferencesOut,
    get_preferences,
    save_preferences,
)
from services.delivery.responses import UNSNOOZE_JOB, WITHDRAW_JOB, ResponseAccepted, Responses
from services.delivery.stream import card_events
from services.delivery.tracking import Tracking
from shared.access import publishable
from shared.access.scopes import Scope, public, requires
from shared.envelope import Channel, Identifier
from shared.runtime import Runtime
from shared.scheduler import SchedulerWorker
from shared.signing import BadToken
from shared.store.models import Delivery

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
UserId = Annotated[str, PathParam(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@\-]+$")]


class DeliveryService:
    name = "delivery"

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        settings = runtime.settings
        if settings.csm_webhook_url and not settings.webhook_secret.get_secret_value():
            raise ValueError("NBV_CSM_WEBHOOK_URL is set but NBV_WEBHOOK_SECRET is empty")
        self.notifier = Notifier()
        self.links = Links(runtime.signing_key, settings.public_url, settings.product_url)
        self._http = httpx.AsyncClient(follow_redirects=False)
        senders: dict[Channel, Sender] = {Channel.EMAIL: EmailChannel(settings, self.links)}
        if settings.csm_webhook_url:
            senders[Channel.CSM] = WebhookChannel(settings, self.links, self._http)
        self.dispatcher = Dispatcher(runtime, senders, self.notifier)
        self.responses = Responses(runtime, self.notifier)
        self._worker = runtime.worker(
            topics=["decisions"], group="delivery", handler=self.dispatcher.handle_decisions
        )
        self.scheduler = SchedulerWorker(
            runtime.sessions,
            {
                SEND_JOB: self.dispatcher.run_send,
                UNSNOOZE_JOB: self.dispatcher.unsnooze,
                WITHDRAW_JOB: self.dispatcher.withdraw,
            },
            poll_s=settings.delivery_poll_s,
            # Sends run one after another; a small batch keeps a batch of timeouts well inside
            # the lease, so a slow receiver never makes a job look abandoned.
            batch=10,
        )
        tracking = Tracking(runtime, self.links, self.responses)
        r = self.router = APIRouter(tags=["delivery"])
        r.add_api_route("/v1/users/{user_id}/inbox", self.inbox, methods=["GET"])
        r.add_api_route("/v1/users/{user_id}/inbox/stream", self.stream, methods=["GET"])
        r.add_api_route("/v1/users/{user_id}/preferences", self.get_prefs, methods=["GET"])
        r.add_api_route("/v1/users/{user_id}/preferences", self.put_prefs, methods=["PUT"])
        r.add_api_route(
            "/v1/responses",
            self.responses.respond,
            methods=["POST"],
            status_code=status.HTTP_202_ACCEPTED,
            response_model=ResponseAccepted,
        )
        r.add_api_route(
            "/v1/widget/keys",
            self.widget_key,
            methods=["POST"],
            status_code=status.HTTP_201_CREATED,
            summary="Mint a publishable widget key for one user",
        )
        r.add_api_route("/v1/deliveries", self.deliveries, methods=["GET"])
        r.add_api_route("/v1/deliveries/{delivery_id}", self.delivery, methods=["GET"])
        r.add_api_route("/v1/deliveries/{delivery_id}/replay", self.replay_one, methods=["POST"])
        r.add_api_route("/widget.js", self.widget, methods=["GET"], include_in_schema=False)
        r.add_api_route("/widget/demo", self.demo, methods=["GET"], include_in_schema=False)
        r.include_router(tracking.router)

    async def start(self) -> None:
        await self._worker.start()
        await self.scheduler.start()

    async def stop(self) -> None:
        await self._worker.stop()
        await self.scheduler.stop()
        await self._http.aclose()

    @requires(Scope.DECISIONS_READ, widget=True)
    async def inbox(
        self,
        user_id: UserId,
        include_closed: Annotated[bool, Query(description="also completed/dismissed")] = False,
    ) -> Inbox:
        async with self._rt.sessions() as session:
            items = await list_cards(session, user_id, include_closed=include_closed)
        return Inbox(user_id=user_id, items=items)

    @requires(Scope.DECISIONS_READ, widget=True, key_in_query=True)
    async def stream(self, request: Request, user_id: UserId) -> StreamingResponse:
        """Server-sent events: ``card`` (new or changed, JSON like the inbox items) and
        ``remove`` (closed); comments keep idle connections open. A browser's EventSource
        cannot send headers: it may pass its publishable key as ``?key=``."""
        return StreamingResponse(
            card_events(self._rt, self.notifier, request, user_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @requires(Scope.DECISIONS_READ, widget=True)
    async def get_prefs(self, user_id: UserId) -> PreferencesOut:
        async with self._rt.sessions() as session:
            return await get_preferences(session, user_id)

    @requires(Scope.RESPONSES_WRITE, widget=True)
    async def put_prefs(self, user_id: UserId, prefs: Preferences) -> PreferencesOut:
        """Replace the person's preferences (channels not listed stay allowed)."""
        async with self._rt.sessions() as session, session.begin():
            return await save_preferences(session, self._rt.dialect, user_id, prefs)

    async def deliveries(
        self,
        delivery_status: Annotated[Status | None, Query(alias="status")] = None,
        user_id: Identifier | None = None,
        decision_id: Identifier | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[DeliveryOut]:
        """The ledger, newest first; ``status=dead`` lists what needs a replay."""
        async with self._rt.sessions() as session:
            return await list_deliveries(
                session,
                status=delivery_status.value if delivery_status else None,
                user_id=user_id,
                decision_id=decision_id,
                limit=limit,
            )

    async def delivery(self, delivery_id: str) -> DeliveryOut:
        async with self._rt.sessions() as session:
            row = await session.get(Delivery, delivery_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown delivery {delivery_id!r}")
        return DeliveryOut.model_validate(row)

    async def replay_one(self, delivery_id: str) -> DeliveryOut:
        """Re-queue one dead delivery (``nbv deliveries replay`` does many)."""
        async with self._rt.sessions() as session, session.begin():
            row = await session.get(Delivery, delivery_id)
            if row is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown delivery {delivery_id!r}")
            if row.status != Status.DEAD.value:
                raise HTTPException(
                    status.HTTP_409_CONFLICT,
                    f"delivery {delivery_id!r} is {row.status}; only dead ones are replayed",
                )
            await replay(session, self._rt.dialect, ids=[delivery_id])
        return await self.delivery(delivery_id)

    @requires(Scope.DECISIONS_READ)
    async def widget_key(self, body: publishable.WidgetKeyRequest) -> publishable.WidgetKey:
        """A publishable key for the person signed in to your app, to hand to the widget
        (``data-key``): it opens only that person's inbox, live stream, preferences and
        responses, until it expires. Mint it from your backend, never from the browser."""
        expires_at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=body.ttl_s)
        key = publishable.mint(self._rt.signing_key, body.user_id, expires_at)
        return publishable.WidgetKey(key=key, user_id=body.user_id, expires_at=expires_at)

    @public
    async def widget(self) -> Response:
        return Response(
            (STATIC / "widget.js").read_bytes(),
            media_type="text/javascript",
            headers={"Cache-Control": "public, max-age=300"},
        )

    @public
    async def demo(
        self, key: Annotated[str, Query(min_length=1, max_length=2_000)]
    ) -> HTMLResponse:
        """A page hosting the widget for the holder of a publishable key (for trying it, and for
        its browser test). It holds no data: everything it shows comes through the key."""
        try:
            grant = publishable.read(self._rt.signing_key, key, datetime.now(UTC))
        except (BadToken, publishable.ExpiredKey) as exc:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST, f"key: not a valid publishable key ({exc})"
            ) from None
        page = (
            (STATIC / "demo.html")
            .read_text()
            .replace("{{USER_ID}}", html.escape(grant.user_id))
            .replace("{{KEY}}", html.escape(key))
        )
        # The page holds a key: never cached.
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})
