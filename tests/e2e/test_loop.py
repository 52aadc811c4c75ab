"""The whole loop, through the public HTTP APIs of real NBV processes:
events in → view updated → decision → in-app inbox → response → view updated →
the completed element is not offered again. Both modes: embedded, and Kafka + PostgreSQL
with each service in its own process.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.settings import Settings
from tests.factories import event_json
from tests.harness import NBV, ServiceProcess, auth_headers, eventually


@dataclass
class Deployment:
    ingest: str
    decision: str
    delivery: str
    processes: list[ServiceProcess]


def _env(settings: Settings) -> dict[str, str]:
    env = {
        "NBV_BUS": settings.bus.value,
        "NBV_DATA_DIR": str(settings.data_dir),
        "NBV_TOPIC_PREFIX": settings.topic_prefix,
        "NBV_EXPLORATION_EPSILON": "0",
        "NBV_CONSUMER_POLL_MS": "50",
    }
    # Always set: an empty URL means the embedded store, whatever the shell exported.
    env["NBV_DATABASE_URL"] = settings.database_url
    env["NBV_KAFKA_BOOTSTRAP"] = settings.kafka_bootstrap
    return env


async def _up(processes: list[ServiceProcess]) -> None:
    try:
        await asyncio.gather(*(p.wait_ready() for p in processes))
    except BaseException:
        for p in processes:
            p.stop()
        raise


@pytest.fixture
async def embedded(embedded_settings: Settings, tmp_path: Path) -> AsyncIterator[Deployment]:
    proc = ServiceProcess(["run"], _env(embedded_settings), tmp_path, "nbv")
    await _up([proc])
    yield Deployment(proc.url, proc.url, proc.url, [proc])
    assert proc.stop(), proc.log_tail()


@pytest.fixture
async def scaled_out(kafka_settings: Settings, tmp_path: Path) -> AsyncIterator[Deployment]:
    env = _env(kafka_settings)
    migrate = await asyncio.create_subprocess_exec(*NBV, "migrate", env={**os.environ, **env})
    assert await migrate.wait() == 0
    env["NBV_AUTO_MIGRATE"] = "false"
    procs = [
        ServiceProcess(["serve", name], env, tmp_path, name)
        for name in ("ingest", "decision", "delivery")
    ]
    await _up(procs)
    yield Deployment(procs[0].url, procs[1].url, procs[2].url, procs)
    clean = [p.stop() for p in procs]
    assert all(clean), [p.log_tail() for p in procs]


async def _loop(d: Deployment) -> None:
    async with httpx.AsyncClient(timeout=15, headers=auth_headers()) as http:
        # Malformed input is refused with the field named, and nothing is published.
        bad = await http.post(
            f"{d.ingest}/v1/events",
            json=event_json("survey.nps", {"score": 3}) | {"payload": {"score": 42}},
        )
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["field"].endswith("payload.score")

        # 1. Events in.
        events = [
            event_json("user.identify", {"role": "admin", "email": "ana@example.com"}),
            event_json("billing.subscription_updated", {"plan": "pro", "mrr": 990.0}, user=None),
            event_json("product.track", {"event": "page_viewed", "feature_area": "core"}),
        ]
        accepted = await http.post(f"{d.ingest}/v1/events/batch", json={"events": events})
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["accepted"] == 3
        # The same batch again (a client retry) must change nothing.
        assert (
            await http.post(f"{d.ingest}/v1/events/batch", json={"events": events})
        ).status_code == 202

        # 2. The view is updated (exactly once despite the retry).
        async def view() -> dict[str, Any]:
            r = await http.get(f"{d.ingest}/v1/users/u1/view")
            return r.json() if r.status_code == 200 else {}

        seen = await eventually(view, lambda v: v.get("event_count") == 2, what="user view")
        assert seen["role"] == "admin"
        account = (await http.get(f"{d.ingest}/v1/accounts/acme/view")).json()
        assert account["plan"] == "pro" and account["event_count"] == 3

        # 3. A decision.
        nbv = await http.get(f"{d.decision}/v1/next-best-value", params={"user_id": "u1"})
        assert nbv.status_code == 200, nbv.text
        decision = nbv.json()
        assert len(decision["items"]) == 3
        top = decision["items"][0]
        assert top["content"]["what"] and top["content"]["why"] and top["content"]["how"]
        assert top["propensity"] == 1.0 and top["reason"]
        missing = await http.get(f"{d.decision}/v1/next-best-value", params={"user_id": "nobody"})
        assert missing.status_code == 404 and "nobody" in missing.json()["detail"]

        # 4. It reaches the in-app inbox.
        async def inbox() -> list[str]:
            r = await http.get(f"{d.delivery}/v1/users/u1/inbox")
            return [i["element_id"] for i in r.json()["items"]]

        await eventually(inbox, lambda ids: top["element_id"] in ids, what="inbox card")

        # 5. The person completes it.
        response = await http.post(
            f"{d.delivery}/v1/responses",
            json={
                "user_id": "u1",
                "decision_id": decision["decision_id"],
                "element_id": top["element_id"],
                "outcome": "completed",
            },
        )
        assert response.status_code == 202, response.text

        # 6. The view records it, and the inbox card is closed.
        await eventually(
            view, lambda v: top["element_id"] in v.get("achieved", {}), what="achieved element"
        )
        assert top["element_id"] not in await inbox()

        # 7. It is never offered again, and the decision log says why.
        again = (
            await http.get(
                f"{d.decision}/v1/next-best-value", params={"user_id": "u1", "limit": 20}
            )
        ).json()
        assert top["element_id"] not in [i["element_id"] for i in again["items"]]
        log = (await http.get(f"{d.decision}/v1/decisions/{again['decision_id']}")).json()
        verdict = {c["element_id"]: c["excluded_by"] for c in log["candidates"]}
        assert verdict[top["element_id"]] == "achieved"
        assert all(c["propensity"] > 0 for c in log["chosen"])

        for url in {d.ingest, d.decision, d.delivery}:
            metrics = (await http.get(f"{url}/metrics")).text
            assert "nbv_http_requests_total" in metrics
            assert (await http.get(f"{url}/healthz")).status_code == 200


async def test_loop_embedded(embedded: Deployment) -> None:
    await _loop(embedded)


@pytest.mark.integration
async def test_loop_kafka_postgres(scaled_out: Deployment) -> None:
    await _loop(scaled_out)
