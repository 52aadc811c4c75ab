"""Delivery benchmark on Kafka + PostgreSQL: how long from a decision being published (the
trigger of a delivery) to its in-app card being visible in the inbox, and whether anything is
delivered twice when Kafka redelivers.

It starts what it needs the way the tests do (deploy/local/infra.sh up; a fresh database and
topic prefix), runs ``nbv serve delivery`` as its own process, publishes in-app and email
decisions at a steady rate (plus a redelivered tenth of them), watches the inbox and a real SMTP
server, and measures in the same run the floor: publish → consume on the same broker.

    .venv/bin/python bench/delivery.py [--decisions 1000] [--rate 500]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlalchemy import insert, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402

from shared.bus import Message, create_bus  # noqa: E402
from shared.contracts import DecidedItem, DecisionMessage, ElementContent, Resource  # noqa: E402
from shared.envelope import Channel  # noqa: E402
from shared.settings import BusKind, Settings  # noqa: E402
from shared.store.models import UserView  # noqa: E402
from tests.delivery_support import SmtpSink  # noqa: E402
from tests.harness import ServiceProcess, delete_topics, infra_env  # noqa: E402

POLL_S = 0.01


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[94] if len(values) >= 2 else values[0]


def make_decision(i: int, channel: Channel) -> DecisionMessage:
    user = f"bench-u{i}"
    return DecisionMessage(
        decision_id=f"bench-{uuid.uuid4().hex}",
        user_id=user,
        account_id=f"bench-a{i % 50}",
        created_at=datetime.now(UTC),
        model_version="bench",
        items=[
            DecidedItem(
                element_id="bench-element",
                rank=1,
                channel=channel,
                score=0.5,
                propensity=1.0,
                reason="benchmark",
                content=ElementContent(
                    element_id="bench-element",
                    title="Benchmark card",
                    kind="guide",
                    what="Do the thing",
                    why="It helps",
                    how=[Resource(type="link", label="Docs", url="https://docs.example.com")],
                ),
            )
        ],
    )


async def kafka_floor(settings: Settings, n: int) -> list[float]:
    """Publish → consume latency on the same broker: the floor under any Kafka consumer."""
    bus = create_bus(settings)
    await bus.start()
    topic = settings.topic("floor")
    consumer = bus.consumer([topic], settings.topic_prefix + "floor")
    await consumer.start()
    await bus.publish(topic, [Message(key="warm", value=b"0")])
    await _drain(consumer, 1)
    latencies: list[float] = []
    for _ in range(n):
        sent = time.perf_counter()
        await bus.publish(topic, [Message(key="k", value=b"x")])
        await _drain(consumer, 1)
        latencies.append((time.perf_counter() - sent) * 1000)
    await consumer.stop()
    await bus.stop()
    return latencies


async def _drain(consumer: Any, n: int) -> None:
    got = 0
    while got < n:
        got += len(await consumer.fetch(100, 50))
    await consumer.commit()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decisions", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=500.0, help="decisions per second")
    parser.add_argument("--email-share", type=float, default=0.1)
    args = parser.parse_args()

    infra = infra_env()
    admin_url = infra["NBV_DATABASE_URL"]
    db = f"nbv_bench_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.exec_driver_sql(f'CREATE DATABASE "{db}"')
    url = make_url(admin_url).set(database=db).render_as_string(hide_password=False)
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    settings = Settings(
        bus=BusKind.KAFKA,
        database_url=url,
        kafka_bootstrap=infra["NBV_KAFKA_BOOTSTRAP"],
        topic_prefix=prefix,
    )
    smtp = SmtpSink()
    smtp.start()
    logs = ROOT / ".nbv" / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    env = {
        "NBV_BUS": "kafka",
        "NBV_DATABASE_URL": url,
        "NBV_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "NBV_TOPIC_PREFIX": prefix,
        "NBV_CONSUMER_POLL_MS": "50",
        "NBV_DELIVERY_POLL_S": "0.1",
        "NBV_SIGNING_SECRET": "bench",
        "NBV_SMTP_PORT": str(smtp.port),
        "NBV_LOG_LEVEL": "WARNING",
    }
    migrate = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "migrate", env={**os.environ, **env}
    )
    if await migrate.wait() != 0:
        raise SystemExit("nbv migrate failed")
    proc = ServiceProcess(
        ["serve", "delivery"], {**env, "NBV_AUTO_MIGRATE": "false"}, logs, "delivery"
    )
    engine = create_async_engine(url)
    try:
        await proc.wait_ready()
        async with httpx.AsyncClient() as http:
            # The consumer group has joined once readiness says so; give the assignment a beat.
            await http.get(f"{proc.url}/readyz")
        rng = random.Random(1)
        decisions = [
            make_decision(i, Channel.EMAIL if rng.random() < args.email_share else Channel.IN_APP)
            for i in range(args.decisions)
        ]
        in_app = {d.decision_id: d for d in decisions if d.items[0].channel is Channel.IN_APP}
        emails = len(decisions) - len(in_app)
        redelivered = rng.sample(decisions, len(decisions) // 10)

        # The people, as identify events would have left them: with an address for email.
        now = datetime.now(UTC)
        async with engine.begin() as conn:
            await conn.execute(
                insert(UserView),
                [
                    {
                        "user_id": d.user_id,
                        "account_id": d.account_id,
                        "email": f"{d.user_id}@example.com",
                        "first_seen": now,
                        "last_seen": now,
                        "event_counts": {},
                        "track_events": {},
                        "feature_usage": {},
                        "achieved": {},
                        "dismissed": {},
                    }
                    for d in decisions
                ],
            )
        bus = create_bus(settings)
        await bus.start()
        sent_at: dict[str, float] = {}
        seen_at: dict[str, float] = {}

        async def produce() -> None:
            batch = max(1, int(args.rate / 20))
            for start in range(0, len(decisions), batch):
                chunk = decisions[start : start + batch]
                now = time.perf_counter()
                for d in chunk:
                    sent_at[d.decision_id] = now
                await bus.publish(
                    settings.topic("decisions"),
                    [Message(key=d.account_id, value=d.model_dump_json().encode()) for d in chunk],
                )
                await asyncio.sleep(batch / args.rate)
            # Kafka redelivery, simulated: the same decisions again.
            await bus.publish(
                settings.topic("decisions"),
                [
                    Message(key=d.account_id, value=d.model_dump_json().encode())
                    for d in redelivered
                ],
            )

        async def watch() -> None:
            deadline = time.monotonic() + 60
            while len(seen_at) < len(in_app) and time.monotonic() < deadline:
                async with engine.connect() as conn:
                    rows = await conn.execute(text("SELECT decision_id FROM inbox_items"))
                    now = time.perf_counter()
                    for (decision_id,) in rows:
                        if decision_id in in_app:
                            seen_at.setdefault(decision_id, now)
                await asyncio.sleep(POLL_S)

        await asyncio.gather(produce(), watch())
        await bus.stop()
        # Let the email sends and the redelivered batch finish.
        for _ in range(300):
            if len(smtp.messages) >= emails:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        async with engine.connect() as conn:
            cards = (await conn.execute(text("SELECT count(*) FROM inbox_items"))).scalar_one()
            ledger = (await conn.execute(text("SELECT count(*) FROM deliveries"))).scalar_one()
        email_ids = [str(m["X-NBV-Delivery-Id"]).strip() for m in smtp.messages]
        duplicates = (len(email_ids) - len(set(email_ids))) + (ledger - len(decisions))
        latencies = [(seen_at[i] - sent_at[i]) * 1000 for i in in_app if i in seen_at]
        floor = await kafka_floor(settings, 50)
    finally:
        proc.stop()
        smtp.stop()
        await engine.dispose()
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.dispose()
        await delete_topics(settings.kafka_bootstrap, prefix)

    print(
        f"decisions published: {len(decisions)} (+{len(redelivered)} redelivered), "
        f"in-app {len(in_app)}, email {emails}, rate {args.rate:g}/s"
    )
    print(f"in-app visible: {len(latencies)}/{len(in_app)}; inbox rows {cards}")
    print(f"emails received: {len(email_ids)}/{emails}; ledger rows {ledger}")
    print(
        f"trigger→inbox ms: p50 {statistics.median(latencies):.1f} p95 {p95(latencies):.1f} "
        f"max {max(latencies):.1f} (poll resolution {POLL_S * 1000:.0f} ms)"
    )
    print(
        f"floor, Kafka publish→consume ms: p50 {statistics.median(floor):.1f} p95 {p95(floor):.1f}"
    )
    print(
        json.dumps(
            {
                "trigger_to_inbox_p95_ms": round(p95(latencies), 1),
                "delivered": len(latencies) + len(set(email_ids)),
                "duplicates": duplicates,
                "missing": len(in_app) - len(latencies) + emails - len(set(email_ids)),
                "kafka_floor_p95_ms": round(p95(floor), 1),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
