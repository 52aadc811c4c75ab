"""Endpoints behind the links in emails: tracked clicks and one-click unsubscribe."""

from __future__ import annotations

import html
import logging

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import HTMLResponse, RedirectResponse

from services.delivery.links import Links
from services.delivery.preferences import disable_channel
from services.delivery.responses import Responses, response_event
from shared.access.scopes import public
from shared.envelope import Channel, Outcome
from shared.runtime import Runtime
from shared.signing import BadToken

log = logging.getLogger(__name__)

_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title></head>
<body style="font-family:sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem">
<h1 style="font-size:1.3rem">{title}</h1>{body}</body></html>"""


class Tracking:
    def __init__(self, runtime: Runtime, links: Links, responses: Responses) -> None:
        self._rt = runtime
        self._links = links
        self._responses = responses
        self.router = APIRouter(tags=["tracking"])
        self.router.add_api_route("/v1/t/{token}", self.click, methods=["GET"])
        self.router.add_api_route("/v1/unsubscribe/{token}", self.unsubscribe_page, methods=["GET"])
        self.router.add_api_route("/v1/unsubscribe/{token}", self.unsubscribe, methods=["POST"])

    @public  # the signed token is the credential
    async def click(self, token: str) -> RedirectResponse:
        """Record a ``clicked`` response, then send the person where the link points."""
        try:
            click = self._links.read_click(token)
        except BadToken:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown or altered link") from None
        event = response_event(
            user_id=click.user_id,
            account_id=click.account_id,
            decision_id=click.decision_id,
            element_id=click.element_id,
            outcome=Outcome.CLICKED,
            channel=click.channel,
        )
        try:
            await self._responses.publish(event)
        except Exception:
            # The person still gets where they were going; only the label is missing.
            log.exception("click could not be recorded", extra={"delivery_id": click.delivery_id})
        return RedirectResponse(click.url, status_code=status.HTTP_302_FOUND)

    @public
    async def unsubscribe_page(self, token: str) -> HTMLResponse:
        # A GET never unsubscribes: mail scanners prefetch links. The button POSTs.
        self._read(token)
        body = (
            "<p>Stop receiving these emails? In-app messages are not affected.</p>"
            f'<form method="post" action="/v1/unsubscribe/{html.escape(token)}">'
            '<button type="submit">Unsubscribe</button></form>'
        )
        return HTMLResponse(_PAGE.format(title="Unsubscribe", body=body))

    @public
    async def unsubscribe(self, token: str) -> HTMLResponse:
        """One-click unsubscribe (RFC 8058 ``List-Unsubscribe-Post``) and the page's button."""
        user_id, channel = self._read(token)
        async with self._rt.sessions() as session, session.begin():
            await disable_channel(session, self._rt.dialect, user_id, channel)
        body = f"<p>Done: you will not receive {channel.value.replace('_', '-')} messages.</p>"
        return HTMLResponse(_PAGE.format(title="You are unsubscribed", body=body))

    def _read(self, token: str) -> tuple[str, Channel]:
        try:
            return self._links.read_unsubscribe(token)
        except BadToken:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown or altered link") from None
