"""HTTP endpoints of the real sources: Segment, Stripe, support desk, surveys, CRM.

Each maps its format with its adapter and publishes through the one publisher; every request
is all-or-none (nothing is published if any message of it is refused).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import select

from services.ingest.adapters import Unmappable, crm, segment, stripe, support, surveys
from services.ingest.adapters import unprocessable as _unprocessable
from services.ingest.publisher import Accepted, publish
from shared.access.scopes import Scope, public, requires
from shared.metrics import EVENTS_REJECTED
from shared.runtime import Runtime
from shared.store.db import upsert
from shared.store.models import UserAccount

log = logging.getLogger(__name__)


class SegmentAccepted(Accepted):
    success: bool = True


class StripeAck(BaseModel):
    received: bool = True
    ignored: bool = False
    id: str | None = None


class SourceRoutes:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        r = self.router = APIRouter(tags=["sources"])
        for prefix in ("/v1/segment", "/v1"):
            # /v1/track, /v1/batch… are the paths Segment and RudderStack libraries call.
            for path, handler in (
                ("track", self.segment_track),
                ("identify", self.segment_identify),
                ("group", self.segment_group),
                ("page", self.segment_page),
                ("screen", self.segment_page),
                ("batch", self.segment_batch),
            ):
                r.add_api_route(
                    f"{prefix}/{path}",
                    handler,
                    methods=["POST"],
                    response_model=SegmentAccepted,
                    summary=f"Segment-spec {path}",
                )
        r.add_api_route(
            "/v1/webhooks/stripe",
            self.stripe_webhook,
            methods=["POST"],
            response_model=StripeAck,
            responses={400: {"description": "bad or stale Stripe-Signature"}},
        )
        r.add_api_route(
            "/v1/webhooks/support",
            self.support_webhook,
            methods=["POST"],
            response_model=Accepted,
            status_code=status.HTTP_202_ACCEPTED,
        )
        r.add_api_route(
            "/v1/surveys/responses",
            self.survey_response,
            methods=["POST"],
            status_code=status.HTTP_202_ACCEPTED,
        )
        r.add_api_route(
            "/v1/crm/contacts",
            self.crm_contact,
            methods=["POST"],
            status_code=status.HTTP_202_ACCEPTED,
        )

    # ------------------------------------------------------------------ Segment

    # Segment and RudderStack send their write key as HTTP Basic.
    @requires(Scope.EVENTS_WRITE, basic=True)
    async def segment_track(self, message: segment.TrackMessage) -> SegmentAccepted | JSONResponse:
        return await self._segment([message], None, {})

    @requires(Scope.EVENTS_WRITE, basic=True)
    async def segment_identify(
        self, message: segment.IdentifyMessage
    ) -> SegmentAccepted | JSONResponse:
        return await self._segment([message], None, {})

    @requires(Scope.EVENTS_WRITE, basic=True)
    async def segment_group(self, message: segment.GroupMessage) -> SegmentAccepted | JSONResponse:
        return await self._segment([message], None, {})

    @requires(Scope.EVENTS_WRITE, basic=True)
    async def segment_page(self, message: segment.PageMessage) -> SegmentAccepted | JSONResponse:
        return await self._segment([message], None, {})

    @requires(Scope.EVENTS_WRITE, basic=True)
    async def segment_batch(self, body: segment.SegmentBatch) -> SegmentAccepted | JSONResponse:
        return await self._segment(list(body.batch), body.sent_at, body.context)

    async def _segment(
        self,
        messages: Sequence[segment.SegmentMessage],
        sent_at: datetime | None,
        context: dict[str, Any],
    ) -> SegmentAccepted | JSONResponse:
        known = await self._accounts_of(segment.users_needing_lookup(list(messages), context))
        try:
            events = segment.to_events(
                messages,
                received_at=datetime.now(UTC),
                known=known,
                sent_at=sent_at,
                context=context,
            )
        except Unmappable as exc:
            return _unprocessable(exc, segment.SOURCE)
        groups = [
            (e.user_id, e.account_id, e.time)
            for e in events
            if e.type == "account.group" and e.user_id
        ]
        if groups:
            await self._remember_groups(groups)
        accepted = await publish(self._rt, events)
        return SegmentAccepted(**accepted.model_dump())

    async def _accounts_of(self, users: set[str]) -> dict[str, str]:
        if not users:
            return {}
        async with self._rt.sessions() as session:
            rows = await session.execute(
                select(UserAccount.user_id, UserAccount.account_id).where(
                    UserAccount.user_id.in_(users)
                )
            )
            return {u: a for u, a in rows.tuples()}

    async def _remember_groups(self, groups: list[tuple[str, str, datetime]]) -> None:
        rows = {u: {"user_id": u, "account_id": a, "updated_at": t} for u, a, t in groups}
        async with self._rt.sessions() as session, session.begin():
            await session.execute(
                upsert(
                    self._rt.dialect,
                    UserAccount,
                    list(rows.values()),
                    ["user_id"],
                    ["account_id", "updated_at"],
                )
            )

    # ------------------------------------------------------------------ Stripe

    @public  # authenticated by its Stripe-Signature instead
    async def stripe_webhook(self, request: Request) -> StripeAck | JSONResponse:
        secret = self._rt.settings.stripe_webhook_secret.get_secret_value()
        if not secret:
            return JSONResponse(
                status_code=503,
                content={
                    "error": "not_configured",
                    "message": "NBV_STRIPE_WEBHOOK_SECRET is not set",
                },
            )
        body = await request.body()
        try:
            stripe.verify(
                body,
                request.headers.get("stripe-signature"),
                secret,
                self._rt.settings.stripe_tolerance_s,
                time.time(),
            )
        except stripe.SignatureError as exc:
            EVENTS_REJECTED.labels("stripe_signature").inc()
            return JSONResponse(
                status_code=400, content={"error": "bad_signature", "message": str(exc)}
            )
        try:
            raw = json.loads(body)
            if not isinstance(raw, dict):
                raise Unmappable("body", "must be a JSON object")
            event = stripe.to_event(raw)
        except json.JSONDecodeError:
            return _unprocessable(Unmappable("body", "not valid JSON"), stripe.SOURCE)
        except Unmappable as exc:
            return _unprocessable(exc, stripe.SOURCE)
        if event is None:
            return StripeAck(ignored=True, id=str(raw.get("id")))
        await publish(self._rt, [event])
        return StripeAck(id=event.id)

    # ------------------------------------------------------- support, surveys, CRM

    @requires(Scope.EVENTS_WRITE)
    async def support_webhook(self, hook: support.SupportWebhook) -> Accepted | JSONResponse:
        try:
            event = support.to_event(hook, datetime.now(UTC))
        except Unmappable as exc:
            return _unprocessable(exc, support.SOURCE)
        return await publish(self._rt, [event])

    @requires(Scope.EVENTS_WRITE)
    async def survey_response(self, answer: Annotated[surveys.SurveyResponse, Body()]) -> Accepted:
        return await publish(self._rt, [surveys.to_event(answer)])

    @requires(Scope.EVENTS_WRITE)
    async def crm_contact(self, change: Annotated[crm.ContactChange, Body()]) -> Accepted:
        return await publish(self._rt, [crm.to_event(change)])
