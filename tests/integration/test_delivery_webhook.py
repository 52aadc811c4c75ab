"""CSM alerts against a real HTTP receiver that verifies the signature: retries through an
outage deliver every alert exactly once; out of retries they are dead, listed and replayable."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from shared.envelope import Channel
from shared.settings import Settings
from tests.delivery_support import (
    WebhookReceiver,
    decision,
    delivery_settings,
    nbv,
    publish_decisions,
    serve,
)
from tests.factories import event_json
from tests.harness import NBV, auth_headers, eventually, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[WebhookReceiver, str]]:
    hook = WebhookReceiver()
    async with serve(hook.app(), free_port()) as url:
        yield hook, f"{url}/hook"


async def _identify(http: httpx.AsyncClient, url: str, users: list[str]) -> None:
    events = [
        event_json("user.identify", {"name": f"User {u}", "role": "champion"}, user=u)
        for u in users
    ]
    assert (await http.post(f"{url}/v1/events/batch", json={"events": events})).status_code == 202
    await eventually(
        lambda: http.get(f"{url}/v1/users/{users[-1]}/view"),
        lambda r: r.status_code == 200,
        what="views",
    )


async def _dead(http: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    return list((await http.get(f"{url}/v1/deliveries", params={"status": "dead"})).json())


async def test_alerts_arrive_exactly_once_after_an_outage(
    kafka_settings: Settings, receiver: tuple[WebhookReceiver, str]
) -> None:
    hook, hook_url = receiver
    settings = delivery_settings(kafka_settings, csm_webhook_url=hook_url)
    users = [f"u{i}" for i in range(5)]
    async with nbv(settings) as app, httpx.AsyncClient(timeout=10, headers=auth_headers()) as http:
        await _identify(http, app.url, users)
        decisions = [
            decision(
                u, Channel.CSM, element_id="csm-call", kind="human_touch", trigger="nps_detractor"
            )
            for u in users
        ]
        await publish_decisions(app.settings, decisions)
        await eventually(_value(lambda: hook.refused), lambda n: n >= 10, what="failed attempts")
        # Redelivered while the receiver is down: nothing new is queued.
        await publish_decisions(app.settings, decisions[:2])
        hook.healthy = True
        await eventually(_value(lambda: len(hook.received)), lambda n: n >= 5, what="recovery")
        await asyncio.sleep(1.0)  # any duplicate would be on its way by now
        assert sorted(a["who"]["user_id"] for a in hook.received) == users
        assert len(set(hook.delivery_ids)) == 5 and hook.bad_signatures == 0
        alert = hook.received[0]
        assert alert["who"]["name"].startswith("User ") and alert["who"]["role"] == "champion"
        assert alert["account"]["account_id"] == "acme"
        assert alert["what"] and alert["why"] and alert["how"][0]["url"].startswith("https://")
        assert alert["view_url"] == f"{app.url}/v1/users/{alert['who']['user_id']}/view"
        assert alert["trigger"] == "nps_detractor" and alert["by_when"]
        rows = (await http.get(f"{app.url}/v1/deliveries", params={"status": "sent"})).json()
        assert len(rows) == 5 and all(r["attempts"] > 1 for r in rows)


async def test_dead_alerts_are_listed_and_replayed_once(
    kafka_settings: Settings, receiver: tuple[WebhookReceiver, str]
) -> None:
    hook, hook_url = receiver
    settings = delivery_settings(
        kafka_settings,
        csm_webhook_url=hook_url,
        csm_webhook_format="slack",
        delivery_max_attempts=2,
        delivery_retry_base_s=0.05,
    )
    async with nbv(settings) as app, httpx.AsyncClient(timeout=10, headers=auth_headers()) as http:
        await _identify(http, app.url, ["u1", "u2"])
        await publish_decisions(
            app.settings,
            [
                decision(u, Channel.CSM, element_id="csm-call", kind="human_touch")
                for u in ("u1", "u2")
            ],
        )
        dead = await eventually(lambda: _dead(http, app.url), lambda d: len(d) == 2, what="dead")
        assert all(d["attempts"] == 2 and "503" in d["last_error"] for d in dead)
        assert hook.received == []

        hook.healthy = True
        env = {
            **os.environ,
            "NBV_DATABASE_URL": settings.database_url,
            "NBV_AUTO_MIGRATE": "false",
        }
        proc = await asyncio.create_subprocess_exec(
            *NBV,
            "deliveries",
            "replay",
            "--all-dead",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0, out.decode()
        assert "2 deliveries re-queued" in out.decode()
        await eventually(_value(lambda: len(hook.received)), lambda n: n >= 2, what="replayed")
        await asyncio.sleep(0.5)
        assert len(hook.received) == 2 and await _dead(http, app.url) == []
        slack = hook.received[0]
        assert slack["text"] and slack["blocks"][0]["type"] == "header"
        # Replaying what is not dead is refused with the reason.
        sent = (await http.get(f"{app.url}/v1/deliveries", params={"status": "sent"})).json()
        again = await http.post(f"{app.url}/v1/deliveries/{sent[0]['id']}/replay")
        assert again.status_code == 409 and "only dead" in again.json()["detail"]


def _value(read: Callable[[], int]) -> Callable[[], Awaitable[int]]:
    async def probe() -> int:
        return read()

    return probe
