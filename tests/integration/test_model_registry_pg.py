"""The registry on the real PostgreSQL + Kafka, against a running decision service: register
and promote from another process (the CLI), set a challenger, promote it and roll back over the
admin API — while a steady stream of decisions goes on and never sees an error."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest

from models import registry_store
from models.features import FEATURES, INDEX
from models.ranker import save_model
from models.routing import bucket
from models.train import train_ranker, training_meta
from shared.settings import Settings
from shared.store.db import create_engine, session_factory
from shared.store.models import AccountView, UserView
from tests.delivery_support import delivery_settings, nbv
from tests.harness import auth_headers

pytestmark = pytest.mark.integration

USERS = [f"person-{i}" for i in range(40)]
# Not in the stream, so cool-downs have not used up what can be offered to them.
FRESH = "person-fresh"
NBV = [sys.executable, "-m", "services.cli"]


async def _cli(args: list[str], env: dict[str, str]) -> str:
    """``nbv …`` as its own process; waited for in a thread, as the service shares this loop."""
    done = await asyncio.to_thread(
        subprocess.run,
        [*NBV, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _train(registry: Path, version: str, seed: int, features: list[str] | None = None) -> None:
    rng = np.random.default_rng(seed)
    x = rng.random((300, len(FEATURES)))
    y = (x[:, INDEX["value_weight"]] > 0.5).astype(float)
    folder = save_model(
        train_ranker(x, y, [6] * 50, num_trees=5, seed=seed),
        registry,
        version,
        {**training_meta(300, 50)},
    )
    if features is not None:  # a model from before a feature change
        meta = (folder / "meta.json").read_text()
        (folder / "meta.json").write_text(meta.replace('"rule_score"', f'"{features[0]}"'))


async def _seed(url: str) -> None:
    now = datetime.now(UTC)
    engine = create_engine(url)
    async with session_factory(engine)() as session, session.begin():
        session.add(
            AccountView(account_id="globex", first_seen=now - timedelta(days=90), last_seen=now)
        )
        session.add_all(
            UserView(
                user_id=u,
                account_id="globex",
                role="end_user",
                timezone="UTC",
                first_seen=now - timedelta(days=60),
                last_seen=now - timedelta(hours=1),
                event_count=30,
            )
            for u in [*USERS, FRESH]
        )
    await engine.dispose()


class Stream:
    """Decisions requested back to back by a few concurrent clients, each in user order."""

    def __init__(self, http: httpx.AsyncClient, workers: int = 2) -> None:
        self.http = http
        self.seen: list[list[str]] = [[] for _ in range(workers)]
        self.errors: list[str] = []
        self._tasks = [asyncio.create_task(self._run(w)) for w in range(workers)]

    async def _run(self, worker: int) -> None:
        i = worker
        while True:
            user = USERS[i % len(USERS)]
            i += len(self.seen)
            try:
                r = await self.http.get("/v1/next-best-value", params={"user_id": user})
            except httpx.HTTPError as exc:
                self.errors.append(repr(exc))
                continue
            if r.status_code != 200:
                self.errors.append(f"{r.status_code} {r.text}")
                continue
            self.seen[worker].append(r.json()["model_version"])

    @property
    def count(self) -> int:
        return sum(len(s) for s in self.seen)

    async def wait_for(self, n: int) -> None:
        start = self.count
        deadline = asyncio.get_running_loop().time() + 30
        while self.count < start + n:
            assert not self.errors, self.errors[:3]
            assert asyncio.get_running_loop().time() < deadline, "the stream stalled"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with suppress(asyncio.CancelledError):
                await t


@asynccontextmanager
async def streaming(http: httpx.AsyncClient) -> AsyncIterator[Stream]:
    stream = Stream(http)
    try:
        yield stream
    finally:
        await stream.stop()


async def _served(http: httpx.AsyncClient, user: str) -> str:
    r = await http.get("/v1/next-best-value", params={"user_id": user})
    assert r.status_code == 200, r.text
    return str(r.json()["model_version"])


async def test_promote_challenger_and_rollback_reach_a_running_service_without_errors(
    kafka_settings: Settings, pg_url: str, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    _train(registry, "m1", seed=1)
    _train(registry, "m2", seed=2)
    _train(registry, "stale", seed=3, features=["shoe_size"])
    settings = delivery_settings(
        kafka_settings,
        model_dir=registry,
        model_poll_s=0.2,
        contact_cap_per_day={"in_app": 100_000},
        contact_cap_per_week={"in_app": 100_000},
        quiet_hours_start=(datetime.now(UTC) + timedelta(hours=6)).strftime("%H:00"),
        quiet_hours_end=(datetime.now(UTC) + timedelta(hours=7)).strftime("%H:00"),
    )
    cli_env = {
        "NBV_DATABASE_URL": pg_url,
        "NBV_MODEL_DIR": str(registry),
        "NBV_LOG_LEVEL": "WARNING",
    }
    async with nbv(settings, ["decision", "delivery"]) as running:
        await _seed(pg_url)
        async with (
            httpx.AsyncClient(base_url=running.url, timeout=10, headers=auth_headers()) as http,
            streaming(http) as stream,
        ):
            await stream.wait_for(20)
            assert {v for s in stream.seen for v in s} == {"rules-v1"}

            # A data scientist registers and promotes from their own process.
            assert "m1 registered" in await _cli(["model", "register", "m1"], cli_env)
            assert "now serving: champion m1" in await _cli(
                ["model", "promote", "m1", "--reason", "beats the prior offline"], cli_env
            )
            async with asyncio.timeout(15):  # picked up by the poll, no restart
                while stream.seen[0][-1] != "m1" or stream.seen[1][-1] != "m1":
                    await asyncio.sleep(0.05)
            await stream.wait_for(20)

            async with registry_store.registry_session(pg_url) as session:
                await registry_store.register_folder(session, registry, "m2", by="ds")
                await registry_store.register_folder(session, registry, "stale", by="ds")
            r = await http.put("/v1/admin/models/challenger", json={"version": "m2", "share": 0.5})
            assert r.status_code == 200, r.text
            assert (r.json()["champion"], r.json()["challenger"]) == ("m1", "m2")
            served = {u: await _served(http, u) for u in USERS}
            # Routed by a hash of the user id: both arms, each person always on the same one.
            assert served == {u: "m2" if bucket(u, "m2") < 0.5 else "m1" for u in USERS}
            assert set(served.values()) == {"m1", "m2"}
            assert {u: await _served(http, u) for u in USERS[:10]} == {
                u: served[u] for u in USERS[:10]
            }
            metrics = (await http.get("/metrics")).text
            assert 'nbv_model_info{kind="lightgbm",role="challenger",version="m2"} 1.0' in metrics
            assert 'nbv_model_traffic_share{role="challenger",version="m2"} 0.5' in metrics
            assert 'nbv_model_decisions_total{model_version="m2"}' in metrics
            await stream.wait_for(20)

            r = await http.post("/v1/admin/models/m2/promote", json={"reason": "won the test"})
            assert r.status_code == 200, r.text
            assert {await _served(http, u) for u in USERS} == {"m2"}
            await stream.wait_for(20)
            r = await http.post("/v1/admin/models/rollback", json={"reason": "complaints"})
            assert r.status_code == 200, r.text
            assert (r.json()["champion"], r.json()["action"]) == ("m1", "rollback")
            assert {await _served(http, u) for u in USERS} == {"m1"}
            await stream.wait_for(20)

            # Refusals name the problem; none changes what serves.
            r = await http.post("/v1/admin/models/m9/promote")
            assert r.status_code == 404 and "unknown model version 'm9'" in r.text
            r = await http.post("/v1/admin/models/stale/promote")
            assert r.status_code == 409 and "has unknown shoe_size" in r.text
            r = await http.put("/v1/admin/models/challenger", json={"version": "m2", "share": 1.5})
            assert r.status_code == 422 and "share" in r.text
            listed = (await http.get("/v1/admin/models")).json()
            assert listed["assignment"]["champion"] == "m1"
            status = {v["version"]: v["status"] for v in listed["versions"]}
            assert status == {"m1": "champion", "m2": "retired", "stale": "candidate"}
            assert [h["action"] for h in listed["history"]] == [
                "rollback",
                "promote",
                "challenger",
                "promote",
            ]
            assert listed["history"][-1]["reason"] == "beats the prior offline"

        assert stream.errors == []
        for seen in stream.seen:
            # Each client saw the versions change in order, never a request lost in between.
            changes = [v for i, v in enumerate(seen) if i == 0 or seen[i - 1] != v]
            assert changes[:2] == ["rules-v1", "m1"] and changes[-1] == "m1"
            assert "m2" in changes

        # Outcomes are counted by the model version that scored the decision.
        async with httpx.AsyncClient(
            base_url=running.url, timeout=10, headers=auth_headers()
        ) as http:
            r = await http.get("/v1/next-best-value", params={"user_id": FRESH})
            decided = r.json()
            assert decided["model_version"] == "m1" and decided["items"]
            body = {
                "user_id": FRESH,
                "decision_id": decided["decision_id"],
                "element_id": decided["items"][0]["element_id"],
                "outcome": "completed",
            }
            async with asyncio.timeout(15):  # once delivery has put the card in the inbox
                while (await http.post("/v1/responses", json=body)).status_code != 202:
                    await asyncio.sleep(0.1)
            metrics = (await http.get("/metrics")).text
            assert 'nbv_model_responses_total{model_version="m1",outcome="completed"}' in metrics
