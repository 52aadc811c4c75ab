"""What the fault tests share: the private infrastructure, a steady publisher that retries the
way a client must, and counting the customer view."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from tests.harness import ServiceProcess, auth_headers


class FaultInfra:
    """A PostgreSQL and a Kafka broker that only the fault suite uses, and may break."""

    def __init__(self, scripts: Path, env: dict[str, str]) -> None:
        self.scripts = scripts
        self.env = env
        self.kafka_bootstrap = f"127.0.0.1:{env['NBV_KAFKA_PORT']}"
        self._admin_url: str | None = None

    def _run(self, script: str, command: str, timeout: float = 180) -> str:
        done = subprocess.run(
            [str(self.scripts / script), command],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{script} {command} failed:\n{done.stderr[-3000:]}")
        return done.stdout.strip()

    @property
    def admin_url(self) -> str:
        if self._admin_url is None:
            self._admin_url = self._run("postgres.sh", "url")
        return self._admin_url

    def kafka(self, command: str) -> None:
        self._run("kafka.sh", command)

    def postgres(self, command: str) -> None:
        self._run("postgres.sh", command)


def ingest_env(infra: FaultInfra, database_url: str, prefix: str, data_dir: Path) -> dict[str, str]:
    return {
        "NBV_BUS": "kafka",
        "NBV_DATABASE_URL": database_url,
        "NBV_KAFKA_BOOTSTRAP": infra.kafka_bootstrap,
        "NBV_TOPIC_PREFIX": prefix,
        "NBV_DATA_DIR": str(data_dir),
        "NBV_CONSUMER_POLL_MS": "50",
        "NBV_CONSUMER_LAG_INTERVAL_S": "1",
        # An outage turns into 503s (which the client retries) within seconds, not 15 s.
        "NBV_KAFKA_REQUEST_TIMEOUT_MS": "5000",
        "NBV_LOG_LEVEL": "INFO",
    }


async def start_ingest(env: dict[str, str], log_dir: Path, name: str) -> ServiceProcess:
    proc = ServiceProcess(["serve", "ingest"], env, log_dir, name)
    try:
        await proc.wait_ready(timeout=60)
    except BaseException:
        proc.stop()
        raise
    return proc


def kill9(proc: ServiceProcess) -> None:
    """SIGKILL: no drain, no commit, no goodbye."""
    proc.proc.kill()
    proc.proc.wait()
    proc.stop()


def track_events(n: int, accounts: int = 20, users_per_account: int = 5) -> list[dict[str, Any]]:
    now = datetime.now(UTC).isoformat()
    events = []
    for i in range(n):
        a = i % accounts
        u = (i // accounts) % users_per_account
        events.append(
            {
                "id": f"f-{uuid.uuid4().hex}",
                "source": "fault-suite",
                "type": "product.track",
                "time": now,
                "account_id": f"acct-{a}",
                "user_id": f"user-{a}-{u}",
                "payload": {"event": "report.viewed", "feature_area": "reports"},
            }
        )
    return events


@dataclass
class Publisher:
    """Posts batches to POST /v1/events/batch and retries each batch with the *same ids* until
    it is accepted, as a client must on 503 or a dropped connection. ``accepted`` holds only
    the ids the API answered 202 for; anything else the API says is a failure of the test."""

    url: str
    batch: int = 100
    pause_s: float = 0.0
    accepted: set[str] = field(default_factory=set)
    statuses: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def accepted_count(self) -> int:
        """A probe for ``eventually``: how many ids the API has accepted so far."""
        return len(self.accepted)

    async def send(self, client: httpx.AsyncClient, events: list[dict[str, Any]]) -> None:
        while True:
            try:
                r = await client.post(f"{self.url}/v1/events/batch", json={"events": events})
            except httpx.HTTPError as exc:
                self.statuses[type(exc).__name__] += 1
                await asyncio.sleep(0.2)
                continue
            self.statuses[str(r.status_code)] += 1
            if r.status_code == 202:
                ids = r.json()["ids"]
                assert sorted(ids) == sorted(e["id"] for e in events)
                self.accepted.update(ids)
                return
            if r.status_code != 503:
                self.unexpected.append(f"{r.status_code}: {r.text[:300]}")
                return
            await asyncio.sleep(0.2)

    async def publish(self, total: int) -> None:
        async with httpx.AsyncClient(timeout=20, headers=auth_headers()) as client:
            for start in range(0, total, self.batch):
                await self.send(client, track_events(min(self.batch, total - start)))

    async def send_events(self, events: list[dict[str, Any]]) -> None:
        async with httpx.AsyncClient(timeout=20, headers=auth_headers()) as client:
            await self.send(client, events)

    async def run_until_stopped(self) -> None:
        async with httpx.AsyncClient(timeout=20, headers=auth_headers()) as client:
            while not self.stop.is_set():
                await self.send(client, track_events(self.batch))
                if self.pause_s:
                    await asyncio.sleep(self.pause_s)


@dataclass(frozen=True)
class ViewCounts:
    processed: int
    user_events: int
    account_events: int


async def view_counts(database_url: str) -> ViewCounts:
    """Each fault test has its own database, so whole-table counts are the test's own."""
    engine = create_async_engine(database_url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            processed = await conn.scalar(
                text("SELECT count(*) FROM processed_events WHERE consumer = 'projector'")
            )
            users = await conn.scalar(text("SELECT coalesce(sum(event_count), 0) FROM user_views"))
            accounts = await conn.scalar(
                text("SELECT coalesce(sum(event_count), 0) FROM account_views")
            )
    finally:
        await engine.dispose()
    return ViewCounts(int(processed or 0), int(users or 0), int(accounts or 0))


async def wait_for_view(database_url: str, expected: int, timeout: float = 60) -> ViewCounts:
    """Until the projector has caught up with ``expected`` events, then a short settle, so a
    late duplicate would show; returns the final counts for the caller to assert on."""
    deadline = time.monotonic() + timeout
    counts = ViewCounts(-1, -1, -1)
    while time.monotonic() < deadline:
        try:
            counts = await view_counts(database_url)
        except Exception:
            counts = ViewCounts(-1, -1, -1)
        if counts.processed >= expected:
            break
        await asyncio.sleep(0.3)
    await asyncio.sleep(1.5)
    return await view_counts(database_url)


def assert_every_accepted_event_once(final: ViewCounts, publisher: Publisher) -> None:
    """The invariant: each id answered 202 is in the view exactly once, nothing else is."""
    accepted = len(publisher.accepted)
    assert not publisher.unexpected, publisher.unexpected
    assert final.processed == accepted, (final, accepted, publisher.statuses)
    assert final.user_events == accepted, (final, accepted)
    assert final.account_events == accepted, (final, accepted)
