"""Decision benchmark: GET /v1/next-best-value on its normal serving path (PostgreSQL view,
contact-policy history, a promoted 200-tree LightGBM model, decision log, publish to Kafka).

It starts what it needs the way the tests do (deploy/local/infra.sh up; a fresh database and
topic prefix), writes 20,000 users in 2,000 accounts into the view, trains a 200-tree lambdarank
model on feature rows of the default library and promotes it in a temporary registry, then runs
one uvicorn worker with the decision service (``--serve``). A separate process (``--load``)
drives closed-loop load at rising concurrency, first against ``/v1/next-best-value`` (a random
user per request), then against a trivial JSON route of the same app instance (``/v1/ping``,
added only here). Then a paced run at half the peak rate measures latency there, timed from each
request's scheduled start (no coordinated omission).

    .venv/bin/python bench/decision.py [--seconds 4] [--levels 1,2,4,8,16,32,64]

The last line is one JSON object: decisions_per_s, p99_ms_at_half_peak, ratio_to_trivial. The
line before it (stderr) has the details, among them the server's CPU time per decision and per
trivial request (``server_cpu_ms_per_decision``, ``server_cpu_ms_per_trivial``; Linux only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from sqlalchemy import insert  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402

from tests.harness import (  # noqa: E402
    TEST_ADMIN_KEY,
    create_database,
    delete_topics,
    drop_database,
    infra_env,
)

# The bootstrap admin key: every request is authenticated like a client's; it is never rate
# limited, so the bench measures the service, not a throttle.
AUTH = f"Authorization: Bearer {TEST_ADMIN_KEY}\r\n"
USERS = 20_000
ACCOUNTS = 2_000
ROLES = ("end_user", "end_user", "end_user", "admin", "champion", "economic_buyer")
AREAS = ("core", "collaboration", "integrations", "automation", "reporting", "admin", "api")


async def seed_view(url: str, seed: int = 7) -> None:
    from shared.store.models import AccountView, UserView

    rng = random.Random(seed)
    now = datetime.now(UTC)
    accounts = [
        {
            "account_id": f"a{i:05d}",
            "plan": rng.choice(("starter", "pro", "enterprise")),
            "subscription_status": rng.choice(("active",) * 9 + ("past_due",)),
            "mrr": rng.choice((99.0, 490.0, 1900.0, 9000.0)),
            "renewal_date": now + timedelta(days=rng.randint(-10, 400)),
            "first_seen": now - timedelta(days=rng.randint(5, 700)),
            "last_seen": now - timedelta(hours=rng.randint(0, 200)),
            "event_count": rng.randint(10, 5000),
            "open_tickets": {f"t{j}": "normal" for j in range(rng.choice((0, 0, 0, 1, 3)))},
            "last_nps": rng.choice((None, 3, 7, 9)),
            "updated_at": now,
        }
        for i in range(ACCOUNTS)
    ]
    users = []
    for i in range(USERS):
        first = now - timedelta(days=rng.randint(1, 700))
        usage = {a: rng.randint(1, 200) for a in rng.sample(AREAS, rng.randint(0, 5))}
        daily = {
            (now - timedelta(days=d)).date().isoformat(): rng.randint(0, 40)
            for d in range(0, 14)
            if rng.random() < 0.6
        }
        # Per-area recency as the view keeps it: the areas used, by day, over two weeks.
        by_area = {
            area: {day: rng.randint(1, 12) for day in daily if rng.random() < 0.5} for area in usage
        }
        asked = {
            area: (now - timedelta(days=rng.randint(0, 60))).isoformat()
            for area in usage
            if rng.random() < 0.2
        }
        users.append(
            {
                "user_id": f"u{i:05d}",
                "account_id": f"a{i % ACCOUNTS:05d}",
                "role": rng.choice(ROLES),
                "timezone": rng.choice(("UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo")),
                "first_seen": first,
                "last_seen": now - timedelta(hours=rng.randint(0, 500)),
                "event_count": sum(usage.values()),
                "event_counts": {},
                "track_events": {},
                "feature_usage": usage,
                "last_nps": rng.choice((None, None, 2, 6, 8, 10)),
                "achieved": {},
                "dismissed": {},
                "updated_at": now,
                "daily_usage": daily,
                "area_daily_usage": by_area,
                "area_last_question": asked,
            }
        )
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(insert(AccountView), accounts)
        for start in range(0, USERS, 2_000):
            await conn.execute(insert(UserView), users[start : start + 2_000])
    await engine.dispose()


def train_model(registry: Path, trees: int = 200, seed: int = 7) -> str:
    """A 200-tree lambdarank model on real feature rows (random contexts × the default
    library) with a synthetic outcome, calibrated, saved in the working-copy folder."""
    from models.features import INDEX, Context, build_matrix
    from models.ranker import save_model
    from models.train import fit_calibration, train_ranker, training_meta
    from services.decision.engine import facts
    from services.decision.library import load_library

    rng = np.random.default_rng(seed)
    elements = [facts(e) for e in load_library().elements]
    now = datetime.now(UTC)
    blocks, labels, groups = [], [], []
    for _ in range(1_500):
        ctx = Context(
            now=now,
            role=str(rng.choice(ROLES)),
            first_seen=now - timedelta(days=int(rng.integers(1, 700))),
            last_seen=now - timedelta(hours=int(rng.integers(0, 500))),
            event_count=int(rng.integers(0, 3000)),
            feature_usage={a: int(rng.integers(1, 100)) for a in AREAS if rng.random() < 0.4},
            last_nps=int(rng.integers(0, 11)) if rng.random() < 0.5 else None,
            open_tickets=int(rng.integers(0, 4)),
            usage_7d=float(rng.integers(0, 100)),
            usage_prev_7d=float(rng.integers(0, 100)),
        )
        m = build_matrix(ctx, elements)
        logit = 3 * m[:, INDEX["rule_score"]] + m[:, INDEX["role_match"]] - 1.5
        y = (rng.random(len(elements)) < 1 / (1 + np.exp(-logit))).astype(float)
        blocks.append(m)
        labels.append(y)
        groups.append(len(elements))
    x, y = np.vstack(blocks), np.concatenate(labels)
    booster = train_ranker(x, y, groups, num_trees=trees)
    meta = training_meta(len(y), len(groups)) | {
        "calibration": fit_calibration(np.asarray(booster.predict(x)), y)
    }
    save_model(booster, registry, "bench-200", meta)
    return "bench-200"


# ------------------------------------------------------------------ the server process


def serve(port: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    from services.app import build_app
    from services.cli import tune_collector
    from shared.logging import configure_logging
    from shared.settings import Settings

    settings = Settings()
    configure_logging("WARNING", "decision")
    app: FastAPI = build_app(settings, ["decision"])

    @app.get("/v1/ping")
    async def ping() -> dict[str, str]:  # the bench's trivial baseline, not product API
        return {"status": "ok"}

    tune_collector(settings.gc_threshold)  # as `nbv serve` does
    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_config=None, access_log=False)


# ------------------------------------------------------------------ the load process


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> int:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n{AUTH}\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def load(
    port: int, route: str, concurrency: int, seconds: float, rate: float | None
) -> dict[str, Any]:
    """Closed loop (``rate`` None) or paced at ``rate`` requests/s overall, latency measured
    from each request's scheduled start."""
    rng = random.Random(concurrency)
    latencies: list[float] = []
    errors = 0
    sent = 0  # warm-up included: what the server's CPU time was spent on

    def path() -> str:
        if route == "ping":
            return "/v1/ping"
        return f"/v1/next-best-value?user_id=u{rng.randrange(USERS):05d}&limit=3"

    async def worker(index: int, stop_at: float, record: bool) -> None:
        nonlocal errors, sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        interval = concurrency / rate if rate else 0.0
        next_start = time.perf_counter() + (interval * index / concurrency if rate else 0.0)
        try:
            while True:
                if rate:
                    delay = next_start - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    scheduled = next_start
                    next_start += interval
                else:
                    scheduled = time.perf_counter()
                if scheduled >= stop_at:
                    return
                status = await _request(reader, writer, path())
                sent += 1
                if record:
                    latencies.append(time.perf_counter() - scheduled)
                    if status != 200:
                        errors += 1
        finally:
            writer.close()

    warm = time.perf_counter() + 1.0
    await asyncio.gather(*(worker(i, warm, False) for i in range(concurrency)))
    started = time.perf_counter()
    await asyncio.gather(*(worker(i, started + seconds, True) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return {
        "route": route,
        "concurrency": concurrency,
        "rate": rate,
        "requests": len(latencies),
        "sent": sent,
        "errors": errors,
        "per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
    }


def run_load(
    port: int,
    route: str,
    concurrency: int,
    seconds: float,
    rate: float | None = None,
    server_pid: int | None = None,
) -> dict[str, Any]:
    args = [sys.executable, __file__, "--load", route, "--port", str(port)]
    args += ["--concurrency", str(concurrency), "--seconds", str(seconds)]
    if rate:
        args += ["--rate", str(rate)]
    before = _cpu_seconds(server_pid)
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    after = _cpu_seconds(server_pid)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    # The server's CPU time (all its threads) per request, warm-up included: less sensitive than
    # throughput to other work on the machine (not immune: contention inflates it too), so
    # changes are compared by it, in runs made back to back.
    result["server_cpu_ms"] = (
        round((after - before) * 1000 / result["sent"], 3)
        if before is not None and after is not None and result["sent"]
        else None
    )
    print(json.dumps(result), file=sys.stderr)
    return result


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), or None."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ main


async def prepare(admin_url: str) -> str:
    from shared.store.db import migrate

    url = await create_database(admin_url, "nbv_bench_decision")
    await migrate(url)
    await seed_view(url)
    return url


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--levels", default="1,2,4,8,16,32,64")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--load")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rate", type=float)
    args = parser.parse_args()
    if args.serve:
        serve(args.port)
        return
    if args.load:
        result = asyncio.run(load(args.port, args.load, args.concurrency, args.seconds, args.rate))
        print(json.dumps(result))
        return

    from tests.harness import free_port

    infra = infra_env()
    admin_url = infra["NBV_DATABASE_URL"]
    url = asyncio.run(prepare(admin_url))
    registry = Path(tempfile.mkdtemp(prefix="nbv-bench-registry-"))
    version = train_model(registry)
    from models.registry_store import register_and_promote

    asyncio.run(register_and_promote(url, registry, version, by="bench/decision"))
    port = free_port()
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    env = {
        **os.environ,
        "NBV_DATABASE_URL": url,
        "NBV_BUS": "kafka",
        "NBV_KAFKA_BOOTSTRAP": infra["NBV_KAFKA_BOOTSTRAP"],
        "NBV_TOPIC_PREFIX": prefix,
        "NBV_MODEL_DIR": str(registry),
        "NBV_AUTO_MIGRATE": "false",
        "NBV_ADMIN_KEY": TEST_ADMIN_KEY,
    }
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(port)], env=env)
    try:
        _wait_ready(port)
        # What the server burns with no request at all (consumers, pollers, the scheduler): a
        # share of every per-request CPU figure below, the larger the lower the rate.
        idle_before = _cpu_seconds(server.pid)
        time.sleep(5)
        idle_after = _cpu_seconds(server.pid)
        idle_pct = (
            round((idle_after - idle_before) / 5 * 100, 1)
            if idle_before is not None and idle_after is not None
            else None
        )
        levels = [int(n) for n in args.levels.split(",")]
        decisions = [run_load(port, "nbv", c, args.seconds, server_pid=server.pid) for c in levels]
        peak = max(decisions, key=lambda r: r["per_s"])
        # Paced at half the peak, right after the closed-loop runs (same state of the store).
        half = run_load(port, "nbv", peak["concurrency"], args.seconds, rate=peak["per_s"] / 2)
        trivial = [run_load(port, "ping", c, args.seconds, server_pid=server.pid) for c in levels]
        trivial_best = max(trivial, key=lambda r: r["per_s"])
        trivial_peak = trivial_best["per_s"]
    finally:
        server.terminate()
        server.wait(30)
        asyncio.run(drop_database(admin_url, url))
        asyncio.run(delete_topics(infra["NBV_KAFKA_BOOTSTRAP"], prefix))
    summary = {
        "store": "postgresql",
        "bus": "kafka",
        "model": version,
        "users": USERS,
        "peak_concurrency": peak["concurrency"],
        "p50_ms_at_peak": round(peak["p50_ms"], 2),
        "p99_ms_at_peak": round(peak["p99_ms"], 2),
        "half_peak_rate": round(peak["per_s"] / 2, 1),
        "p50_ms_at_half_peak": round(half["p50_ms"], 2),
        "trivial_per_s": round(trivial_peak, 1),
        "server_cpu_ms_per_decision": peak["server_cpu_ms"],
        "server_cpu_ms_per_trivial": trivial_best["server_cpu_ms"],
        "server_idle_cpu_pct": idle_pct,
        "errors": sum(r["errors"] for r in decisions) + half["errors"],
    }
    print(json.dumps(summary), file=sys.stderr)
    print(
        json.dumps(
            {
                "decisions_per_s": round(peak["per_s"], 1),
                "p99_ms_at_half_peak": round(half["p99_ms"], 2),
                "ratio_to_trivial": round(peak["per_s"] / trivial_peak, 3),
            }
        )
    )


def _wait_ready(port: int, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("decision server not ready")


if __name__ == "__main__":
    main()
