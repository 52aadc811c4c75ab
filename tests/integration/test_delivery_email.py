"""Email against a real SMTP server (aiosmtpd) on Kafka + PostgreSQL: the message that arrived
(headers, both parts), tracked links, one-click unsubscribe, fallbacks and no duplicates."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from shared.envelope import Channel
from shared.settings import Settings
from shared.store.models import Intervention
from tests.delivery_support import SmtpSink, decision, delivery_settings, nbv, publish_decisions
from tests.factories import event_json
from tests.harness import auth_headers, eventually

pytestmark = pytest.mark.integration


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


def _links(html: str) -> list[str]:
    return re.findall(r'href="([^"]+/v1/t/[^"]+)"', html)


async def _ledger(http: httpx.AsyncClient, url: str, user: str) -> list[dict[str, Any]]:
    r = await http.get(f"{url}/v1/deliveries", params={"user_id": user})
    return list(r.json())


async def test_email_arrives_once_with_tracked_links_and_unsubscribe(
    kafka_settings: Settings, smtp: SmtpSink
) -> None:
    settings = delivery_settings(kafka_settings, smtp_port=smtp.port)
    async with nbv(settings) as app, httpx.AsyncClient(timeout=10, headers=auth_headers()) as http:
        identify = event_json(
            "user.identify", {"email": "ana@example.com", "name": "Ana Lima", "role": "admin"}
        )
        nobody = event_json("user.identify", {"role": "admin"}, user="u2")
        assert (
            await http.post(f"{app.url}/v1/events/batch", json={"events": [identify, nobody]})
        ).status_code == 202
        await eventually(
            lambda: http.get(f"{app.url}/v1/users/u2/view"),
            lambda r: r.status_code == 200,
            what="views",
        )
        first = decision("u1", Channel.EMAIL)
        # The same decision twice (a Kafka redelivery) and a person without an address.
        await publish_decisions(app.settings, [first, first, decision("u2", Channel.EMAIL)])

        await eventually(_count(smtp.messages), lambda n: n >= 1, what="email")
        ledger = await eventually(
            lambda: _ledger(http, app.url, "u1"),
            lambda rows: bool(rows) and rows[0]["status"] == "sent",
            what="sent in the ledger",
        )
        assert len(ledger) == 1 and ledger[0]["channel"] == "email" and ledger[0]["attempts"] == 1

        msg = smtp.messages[0]
        assert msg["To"] == "Ana Lima <ana@example.com>"
        assert msg["From"] == "NBV <nbv@example.com>"
        assert msg["Subject"] == "Take the 3-minute tour"
        assert str(msg["X-NBV-Delivery-Id"]).strip() == ledger[0]["id"]
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        unsubscribe = str(msg["List-Unsubscribe"]).strip("<>")
        assert unsubscribe.startswith(f"{app.url}/v1/unsubscribe/")
        text = msg.get_body(("plain",))
        html = msg.get_body(("html",))
        assert isinstance(text, EmailMessage) and isinstance(html, EmailMessage)
        text_body, html_body = text.get_content(), html.get_content()
        assert "Hi Ana," in text_body and "What: Watch the project tour <b>now</b>" in text_body
        assert "Watch the project tour &lt;b&gt;now&lt;/b&gt;" in html_body  # escaped
        assert "Watch now" in html_body  # the video template, not the default one
        assert unsubscribe in text_body and unsubscribe in html_body

        # Tracked links: a 302 to the resource (relative ones into the product), and a click.
        links = _links(html_body)
        assert links and all(link in text_body for link in links)
        hop = await http.get(links[0])
        assert hop.status_code == 302
        assert hop.headers["location"] == "https://app.example.com/videos/tour"
        tampered = links[0][:-3] + ("abc" if not links[0].endswith("abc") else "xyz")
        assert (await http.get(tampered)).status_code == 404
        engine = create_async_engine(settings.database_url)
        try:

            async def clicks() -> list[tuple[str, str]]:
                async with engine.connect() as conn:
                    rows = await conn.execute(
                        select(Intervention.outcome, Intervention.channel).where(
                            Intervention.decision_id == first.decision_id
                        )
                    )
                    return [tuple(r) for r in rows]

            assert await eventually(clicks, bool, what="click recorded") == [("clicked", "email")]
        finally:
            await engine.dispose()

        # No address: in-app instead, and the ledger says why.
        u2 = await eventually(
            lambda: _ledger(http, app.url, "u2"), lambda rows: bool(rows), what="u2 ledger"
        )
        assert u2[0]["channel"] == "in_app" and "no email address" in u2[0]["reason"]
        inbox = (await http.get(f"{app.url}/v1/users/u2/inbox")).json()["items"]
        assert [i["element_id"] for i in inbox] == ["video-tour"]

        # One-click unsubscribe (what mail clients POST): email is now off for Ana...
        assert (await http.get(unsubscribe)).status_code == 200  # a page, changes nothing
        prefs = (await http.get(f"{app.url}/v1/users/u1/preferences")).json()
        assert prefs["channels"] == {}
        done = await http.post(unsubscribe, content=b"List-Unsubscribe=One-Click")
        assert done.status_code == 200
        prefs = (await http.get(f"{app.url}/v1/users/u1/preferences")).json()
        assert prefs["channels"] == {"email": False}

        # ...so her next email element lands in-app; the first decision redelivered after it
        # was sent finds its ledger row and sends nothing.
        await publish_decisions(
            app.settings, [first, decision("u1", Channel.EMAIL, element_id="g2")]
        )
        rows = await eventually(
            lambda: _ledger(http, app.url, "u1"), lambda r: len(r) == 2, what="2nd delivery"
        )
        assert rows[0]["channel"] == "in_app"
        assert "email disabled" in rows[0]["reason"]
        assert len(smtp.messages) == 1


def _count(items: list[Any]) -> Callable[[], Awaitable[int]]:
    async def probe() -> int:
        return len(items)

    return probe
