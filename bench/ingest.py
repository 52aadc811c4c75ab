"""Ingest benchmark on Kafka + PostgreSQL: HTTP → Kafka → projector → PostgreSQL, end to end.

It starts what it needs the way the tests do (deploy/local/infra.sh up; a fresh database and
topic prefix), runs ``nbv serve ingest`` as its own process, posts a realistic mix of events
(product usage, identifies, page views, tickets, surveys, billing) for 2,000 accounts and 20,000
users in batches, and waits until the projector has applied every one. It samples the ingest
process's memory (RSS, summed over the processes with ``--processes N``, which scales out
as in production: N ingest processes in one consumer group) when 100k events are applied and
at the end.

In the same run it measures the ceilings on the same machine: raw aiokafka produce + consume of
the same payloads (no processing), and a raw batched PostgreSQL upsert of the same rows (the
final view rows touched by each batch, plus the idempotency ids) into a fresh database, sent
as the projector sends them (one unnest statement per table per batch, straight on asyncpg,
parameters built before the clock starts), so it is the store's share of the work alone.

Progress is polled from the account rows' event counts (each applied event adds one to one
account), which is cheap enough not to load the machine being measured; at the end the
idempotency ledger is counted exactly. The processes get the tests' bootstrap admin key
(``NBV_ADMIN_KEY``), which the senders present as ``Authorization: Bearer``.

    .venv/bin/python bench/ingest.py [--events 200000] [--accounts 2000] [--users 20000]
                                     [--processes 2] [--partitions 6] [--consumer-batch 30000]

The last line is one JSON object: events_per_s, ratio_to_ceiling, mem_growth (and the parts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402
from aiokafka.partitioner import murmur2  # noqa: E402
from sqlalchemy import func, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine  # noqa: E402

from services.ingest.projector import CLAIM_PG  # noqa: E402
from services.ingest.view import AccountState, UserState  # noqa: E402
from services.ingest.view_rows import ViewRows  # noqa: E402
from shared.bus.kafka import MAX_PARTITION_FETCH_BYTES  # noqa: E402
from shared.store.db import migrate  # noqa: E402
from shared.store.models import AccountView, ProcessedEvent, UserView  # noqa: E402
from tests.harness import (  # noqa: E402
    TEST_ADMIN_KEY,
    ServiceProcess,
    auth_headers,
    create_database,
    delete_topics,
    drop_database,
    infra_env,
    rss_bytes,
)

HTTP_BATCH = 1_000
SENDERS = 4
FEATURES = {
    "core": ["project_created", "task_completed", "comment_added", "file_uploaded"],
    "reporting": ["dashboard_built", "report_exported", "chart_added"],
    "automation": ["rule_created", "workflow_run", "integration_connected"],
    "admin": ["user_invited", "permission_changed", "sso_configured"],
    "collaboration": ["mention_sent", "board_shared"],
}


def make_events(n: int, accounts: int, users: int, seed: int = 7) -> list[dict[str, Any]]:
    """A realistic mix over the last two weeks, roughly in time order (as sources send)."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    start = now - timedelta(days=14)
    events: list[dict[str, Any]] = []
    areas = list(FEATURES)
    for i in range(n):
        u = rng.randrange(users)
        account = f"acct-{u % accounts}"
        user = f"user-{u}"
        # Mostly in order, a few late by up to a day.
        at = start + timedelta(seconds=14 * 86_400 * i / n)
        if rng.random() < 0.02:
            at -= timedelta(hours=rng.uniform(0, 24))
        base: dict[str, Any] = {
            "id": f"ev-{i}",
            "source": "bench",
            "time": at.isoformat(),
            "account_id": account,
            "user_id": user,
        }
        r = rng.random()
        if r < 0.84:
            area = rng.choice(areas)
            base["type"] = "product.track"
            base["payload"] = {
                "event": rng.choice(FEATURES[area]),
                "feature_area": area,
                "properties": {
                    "plan_tier": rng.choice(["a", "b"]),
                    "duration_ms": rng.randrange(5_000),
                },
            }
        elif r < 0.92:
            base["type"] = "product.page"
            base["payload"] = {"name": rng.choice(["Home", "Reports", "Settings"])}
        elif r < 0.95:
            base["type"] = "user.identify"
            base["payload"] = {
                "email": f"{user}@example.com",
                "role": rng.choice(["end_user", "end_user", "admin", "champion"]),
                "timezone": "Europe/Paris",
            }
        elif r < 0.97:
            base["type"] = "support.ticket_opened"
            base["payload"] = {
                "ticket_id": f"t-{i}",
                "priority": rng.choice(["low", "normal", "high"]),
                "feature_area": rng.choice(areas),
            }
        elif r < 0.98:
            base["type"] = "survey.nps"
            base["payload"] = {"score": rng.randrange(11)}
        elif r < 0.99:
            base["type"] = "survey.csat"
            base["payload"] = {"score": rng.randrange(1, 6)}
        else:
            base.pop("user_id")
            base["type"] = "billing.subscription_updated"
            base["payload"] = {
                "plan": rng.choice(["starter", "pro", "enterprise"]),
                "status": rng.choice(["active", "active", "active", "past_due"]),
                "mrr": float(rng.randrange(100, 5_000)),
                "renewal_date": (now + timedelta(days=rng.randrange(30, 365))).isoformat(),
            }
        events.append(base)
    return events


async def applied(engine: AsyncEngine) -> int:
    """Events applied so far: each adds one to exactly one account's count (2,000 rows to sum,
    where counting the ledger would scan every id on every poll)."""
    async with engine.connect() as conn:
        return int(
            await conn.scalar(select(func.coalesce(func.sum(AccountView.event_count), 0))) or 0
        )


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (noisy neighbours inflate wall time, less
    this); 0 for a process that is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kafka_pids() -> list[int]:
    """The local broker's JVM(s), found by their main class (none if Kafka runs elsewhere)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"kafka.Kafka\0" in cmdline:
                pids.append(int(entry.name))
    return pids


async def database_backends(engine: AsyncEngine) -> set[int]:
    """PostgreSQL backends connected to the benchmark's database (the ingest processes' pools):
    their CPU is the store's share of the work, where the server's total also counts other
    databases on the same server."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
        return {int(pid) for (pid,) in rows}


class CpuMeter:
    """CPU used by the store's backends and the broker while the clock runs, read from /proc
    (so only when PostgreSQL and Kafka run on this machine, as infra.sh starts them). Backends
    that come and go in between are counted from when first seen."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._backend_start: dict[int, float] = {}
        self._backend_last: dict[int, float] = {}
        self._kafka_start = {pid: cpu_seconds(pid) for pid in kafka_pids()}

    async def sample(self) -> None:
        for pid in await database_backends(self._engine):
            used = cpu_seconds(pid)
            self._backend_start.setdefault(pid, used)
            self._backend_last[pid] = used

    def postgres(self) -> float:
        return sum(self._backend_last[p] - self._backend_start[p] for p in self._backend_last)

    def kafka(self) -> float:
        return sum(cpu_seconds(p) - start for p, start in self._kafka_start.items())


async def claimed(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(
            await conn.scalar(select(func.count()).select_from(ProcessedEvent.__table__)) or 0
        )


async def end_to_end(
    events: list[dict[str, Any]],
    url: str,
    env: dict[str, str],
    log_dir: Path,
    processes: int,
) -> dict[str, float]:
    # Scaled out as in production: each process serves HTTP and projects its share of the
    # partitions (one consumer group).
    procs = [
        ServiceProcess(["serve", "ingest"], env, log_dir, f"ingest-{i}") for i in range(processes)
    ]
    engine = create_async_engine(url)
    try:
        for proc in procs:
            await proc.wait_ready()
        batches = [events[i : i + HTTP_BATCH] for i in range(0, len(events), HTTP_BATCH)]
        bodies = [json.dumps({"events": b}).encode() for b in batches]
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for body in bodies:
            queue.put_nowait(body)

        async def sender(i: int) -> None:
            base = procs[i % len(procs)].url
            async with httpx.AsyncClient(
                base_url=base, timeout=60, headers=auth_headers()
            ) as client:
                while not queue.empty():
                    body = queue.get_nowait()
                    for attempt in range(5):
                        resp = await client.post(
                            "/v1/events/batch",
                            content=body,
                            headers={"content-type": "application/json", **auth_headers()},
                        )
                        if resp.status_code == 202:
                            break
                        await asyncio.sleep(0.2 * 2**attempt)
                    else:
                        raise RuntimeError(f"batch refused: {resp.status_code} {resp.text[:200]}")

        meter = CpuMeter(engine)
        await meter.sample()
        cpu_at_start = sum(cpu_seconds(p.proc.pid) for p in procs)
        start = time.perf_counter()
        senders = asyncio.gather(*(sender(i) for i in range(SENDERS)))
        mem_100k: int | None = None
        http_done: float | None = None
        total = len(events)
        mark = min(100_000, total // 2)
        polls = 0
        while True:
            polls += 1
            if polls % 20 == 0:
                await meter.sample()  # every 2 s: new backends, and the CPU of the known
            if http_done is None and senders.done():
                senders.result()
                http_done = time.perf_counter() - start
            done = await applied(engine)
            if mem_100k is None and done >= mark:
                mem_100k = sum(rss_bytes(p.proc.pid) for p in procs)
            if done >= total:
                break
            for proc in procs:
                if proc.proc.poll() is not None:
                    raise RuntimeError(f"ingest exited:\n{proc.log_tail()}")
            await asyncio.sleep(0.1)
        elapsed = time.perf_counter() - start
        await meter.sample()
        await senders
        mem_end = sum(rss_bytes(p.proc.pid) for p in procs)
        cpu = sum(cpu_seconds(p.proc.pid) for p in procs) - cpu_at_start
        kafka_cpu = meter.kafka()
        assert mem_100k is not None
        ledger = await claimed(engine)
        if ledger != total:
            raise RuntimeError(f"{ledger} ids in the idempotency ledger, {total} events sent")
        return {
            "events": total,
            "seconds": elapsed,
            "events_per_s": total / elapsed,
            "http_accept_per_s": total / (http_done or elapsed),
            "mem_at_100k_mb": mem_100k / 2**20,
            "mem_end_mb": mem_end / 2**20,
            "mem_growth": (mem_end - mem_100k) / mem_100k,
            "ingest_cpu_us_per_event": 1e6 * cpu / total,
            "postgres_cpu_us_per_event": 1e6 * meter.postgres() / total,
            # The broker serves every client on this machine: other work shows up here too.
            "kafka_cpu_us_per_event": 1e6 * kafka_cpu / total,
        }
    finally:
        for proc in procs:
            proc.stop()
        await engine.dispose()


async def kafka_ceiling(events: list[dict[str, Any]], bootstrap: str) -> float:
    """Raw aiokafka: produce every payload, then consume them all, no processing. Produced
    as the bus produces a request's events (shared/bus/kafka.py): record batches built per
    partition, in requests of HTTP_BATCH; consumed with the bus's fetch size."""
    topic = f"bench-raw-{uuid.uuid4().hex[:8]}"
    payloads = [(e["account_id"].encode(), json.dumps(e).encode()) for e in events]
    # Configured as the bus configures its producer and consumer.
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=256 * 1024,
    )
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"bench-raw-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=MAX_PARTITION_FETCH_BYTES,
    )
    await producer.start()
    start = time.perf_counter()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        for i in range(0, len(payloads), HTTP_BATCH):
            builders: dict[int, Any] = {}
            futures = []
            for key, value in payloads[i : i + HTTP_BATCH]:
                partition = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
                builder = builders.get(partition)
                if builder is None:
                    builder = builders[partition] = producer.create_batch()
                if builder.append(timestamp=None, key=key, value=value) is None:
                    futures.append(await producer.send_batch(builder, topic, partition=partition))
                    builder = builders[partition] = producer.create_batch()
                    builder.append(timestamp=None, key=key, value=value)
            for partition, builder in builders.items():
                futures.append(await producer.send_batch(builder, topic, partition=partition))
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    await consumer.start()
    try:
        seen = 0
        while seen < len(payloads):
            batch = await consumer.getmany(timeout_ms=1_000, max_records=30_000)
            seen += sum(len(v) for v in batch.values())
            await consumer.commit()
    finally:
        await consumer.stop()
    elapsed = time.perf_counter() - start
    await delete_topics(bootstrap, topic)
    return len(payloads) / elapsed


async def postgres_ceiling(
    events: list[dict[str, Any]], source_url: str, target_url: str, batch: int
) -> float:
    """Raw batched upsert of the same rows: per consumer batch, its ids and the final rows of
    the users and accounts it touches, with no decoding or folding; the statements the
    projector sends, on a bare asyncpg connection, their parameters built up front."""
    source = create_async_engine(source_url)
    async with source.connect() as conn:
        users = {
            r["user_id"]: UserState.model_validate(r)
            for r in (await conn.execute(select(UserView.__table__))).mappings()
        }
        accounts = {
            r["account_id"]: AccountState.model_validate(r)
            for r in (await conn.execute(select(AccountView.__table__))).mappings()
        }
    await source.dispose()
    await migrate(target_url)
    rows = ViewRows("postgresql", 0)
    now = datetime.now(UTC)
    work = []
    for i in range(0, len(events), batch):
        chunk = events[i : i + batch]
        touched_u = sorted({e["user_id"] for e in chunk if "user_id" in e})
        touched_a = sorted({e["account_id"] for e in chunk})
        work.append(
            (
                ("raw", json.dumps([e["id"] for e in chunk]), now),
                rows.users.parameters([users[u] for u in touched_u]),
                rows.accounts.parameters([accounts[a] for a in touched_a]),
            )
        )
    dsn = make_url(target_url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        start = time.perf_counter()
        for claim, user_rows, account_rows in work:
            async with conn.transaction():
                await conn.fetch(CLAIM_PG, *claim)
                await conn.fetch(rows.accounts.upsert_sql, *account_rows)
                await conn.fetch(rows.users.upsert_sql, *user_rows)
        elapsed = time.perf_counter() - start
    finally:
        await conn.close()
    return len(events) / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--accounts", type=int, default=2_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--consumer-batch", type=int, default=30_000)
    # Two by default: one Python process saturates one core with the HTTP intake and the
    # projector together, and a deployment on two cores runs two (`nbv serve ingest` twice).
    parser.add_argument("--processes", type=int, default=2, help="ingest processes (scale-out)")
    parser.add_argument(
        "--partitions", type=int, default=6, help="of the events topic (6: even for 1, 2, 3)"
    )
    args = parser.parse_args()

    infra = infra_env()
    admin_url = infra["NBV_DATABASE_URL"]
    bootstrap = infra["NBV_KAFKA_BOOTSTRAP"]
    events = make_events(args.events, args.accounts, args.users)
    url = await create_database(admin_url, "nbv_bench")
    # Once, before the processes start (as a deployment runs `nbv migrate` before scaling out).
    await migrate(url)
    raw_url = await create_database(admin_url, "nbv_bench_raw")
    log_dir = ROOT / ".nbv" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    env = {
        "NBV_BUS": "kafka",
        "NBV_DATABASE_URL": url,
        "NBV_KAFKA_BOOTSTRAP": bootstrap,
        "NBV_TOPIC_PREFIX": prefix,
        "NBV_CONSUMER_BATCH_SIZE": str(args.consumer_batch),
        "NBV_KAFKA_PARTITIONS": str(args.partitions),
        "NBV_LOG_LEVEL": "WARNING",
        "NBV_ADMIN_KEY": TEST_ADMIN_KEY,
    }
    try:
        e2e = await end_to_end(events, url, env, log_dir, args.processes)
        print(json.dumps({"end_to_end": e2e}), flush=True)
        kafka = await kafka_ceiling(events, bootstrap)
        print(json.dumps({"ceiling_kafka_events_per_s": round(kafka)}), flush=True)
        pg = await postgres_ceiling(events, url, raw_url, args.consumer_batch)
        print(json.dumps({"ceiling_postgres_events_per_s": round(pg)}), flush=True)
    finally:
        await drop_database(admin_url, url)
        await drop_database(admin_url, raw_url)
        await delete_topics(bootstrap, prefix)
    ceiling = min(kafka, pg)
    print(
        json.dumps(
            {
                "events_per_s": round(e2e["events_per_s"]),
                "ratio_to_ceiling": round(e2e["events_per_s"] / ceiling, 3),
                "mem_growth": round(e2e["mem_growth"], 4),
                "mem_at_100k_mb": round(e2e["mem_at_100k_mb"], 1),
                "mem_end_mb": round(e2e["mem_end_mb"], 1),
                "ceiling_kafka": round(kafka),
                "ceiling_postgres": round(pg),
                "http_accept_per_s": round(e2e["http_accept_per_s"]),
                "ingest_cpu_us_per_event": round(e2e["ingest_cpu_us_per_event"], 1),
                "postgres_cpu_us_per_event": round(e2e["postgres_cpu_us_per_event"], 1),
                "kafka_cpu_us_per_event": round(e2e["kafka_cpu_us_per_event"], 1),
                "events": e2e["events"],
                "processes": args.processes,
                "partitions": args.partitions,
                "consumer_batch": args.consumer_batch,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
