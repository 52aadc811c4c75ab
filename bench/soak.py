"""Soak: sustained mixed load against ``nbv run`` on Kafka + PostgreSQL.

Starts (or reuses) the local PostgreSQL and Kafka (deploy/local/infra.sh up), a fresh
database and topic prefix, and one ``nbv run`` process with NBV_BUS=kafka. It measures the
peak rate of the mix for ``--peak-seconds``, then holds half of it for ``--minutes``:

  ingest     POST /v1/events/batch (product usage for known users)       70 %
  decisions  GET  /v1/next-best-value?user_id=…                           20 %
  responses  POST /v1/responses for an item decided a few seconds before   10 %

Every ``--sample-seconds`` it prints the consumer lag (sum of nbv_consumer_lag_records from
/metrics), the error count so far and the process's RSS. Errors are transport failures, 5xx,
and 4xx other than a response to an item delivery has not put in the inbox yet (404/409).
Memory growth compares the RSS after warm-up (peak phase done) with the RSS at the end.

    .venv/bin/python bench/soak.py [--minutes 10] [--peak-seconds 20] [--users 400]

The last line is one JSON object: {"errors": …, "max_lag": …, "mem_growth": …, …}.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.harness import (  # noqa: E402
    ServiceProcess,
    auth_headers,
    create_database,
    delete_topics,
    infra_env,
    rss_bytes,
)

INGEST_BATCH = 50
MIX = (("ingest", 0.7), ("decide", 0.2), ("respond", 0.1))
AREAS = {
    "core": ["project_created", "task_completed", "comment_added"],
    "reporting": ["dashboard_built", "report_exported"],
    "automation": ["rule_created", "workflow_run"],
}


def rss_mb(pid: int) -> float:
    return rss_bytes(pid) / 2**20


class Load:
    def __init__(self, url: str, users: list[tuple[str, str]], seed: int = 7) -> None:
        self.url = url
        self.users = users
        self.rng = random.Random(seed)
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.decided: collections.deque[tuple[float, str, str, str]] = collections.deque(
            maxlen=5_000
        )

    def _events(self) -> list[dict[str, Any]]:
        now = datetime.now(UTC).isoformat()
        out = []
        for _ in range(INGEST_BATCH):
            account, user = self.rng.choice(self.users)
            area = self.rng.choice(list(AREAS))
            out.append(
                {
                    "id": f"s-{uuid.uuid4().hex}",
                    "source": "soak",
                    "type": "product.track",
                    "time": now,
                    "account_id": account,
                    "user_id": user,
                    "payload": {"event": self.rng.choice(AREAS[area]), "feature_area": area},
                }
            )
        return out

    async def one(self, http: httpx.AsyncClient, kind: str) -> None:
        try:
            if kind == "respond":
                kind = await self._respond(http) or "decide"
                if kind == "respond":
                    return
            if kind == "ingest":
                r = await http.post(f"{self.url}/v1/events/batch", json={"events": self._events()})
                self._count("ingest", r, ok=(202,))
            else:
                _, user = self.rng.choice(self.users)
                r = await http.get(f"{self.url}/v1/next-best-value", params={"user_id": user})
                self._count("decide", r, ok=(200,))
                if r.status_code == 200:
                    body = r.json()
                    for item in body.get("items", [])[:1]:
                        if body.get("decision_id"):
                            self.decided.append(
                                (time.monotonic(), user, body["decision_id"], item["element_id"])
                            )
        except httpx.HTTPError as exc:
            self.errors[f"{kind}:{type(exc).__name__}"] += 1

    async def _respond(self, http: httpx.AsyncClient) -> str | None:
        # Only items decided a while ago: delivery must have put them in the inbox first.
        if not self.decided or time.monotonic() - self.decided[0][0] < 5:
            return None
        _, user, decision_id, element_id = self.decided.popleft()
        outcome = self.rng.choice(["shown", "clicked", "dismissed"])
        r = await http.post(
            f"{self.url}/v1/responses",
            json={
                "user_id": user,
                "decision_id": decision_id,
                "element_id": element_id,
                "outcome": outcome,
            },
        )
        self._count("respond", r, ok=(200, 202), tolerated=(404, 409))
        return "respond"

    def _count(
        self, kind: str, r: httpx.Response, ok: tuple[int, ...], tolerated: tuple[int, ...] = ()
    ) -> None:
        self.counts[kind] += 1
        if r.status_code not in ok and r.status_code not in tolerated:
            self.errors[f"{kind}:{r.status_code}"] += 1

    def pick(self) -> str:
        x = self.rng.random()
        for kind, share in MIX:
            if x < share:
                return kind
            x -= share
        return MIX[-1][0]


async def run_peak(load: Load, seconds: float, concurrency: int = 16) -> float:
    """Closed loop, as fast as the service answers: operations per second."""
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        async with httpx.AsyncClient(timeout=30, headers=auth_headers()) as http:
            while time.monotonic() < deadline:
                await load.one(http, load.pick())
                done += 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.monotonic() - start)


async def lag(http: httpx.AsyncClient, url: str) -> int:
    text = (await http.get(f"{url}/metrics")).text
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("nbv_consumer_lag_records{")
        )
    )


async def run_steady(
    load: Load, proc: ServiceProcess, rate: float, minutes: float, sample_s: float
) -> tuple[int, list[tuple[float, int, int, float]]]:
    """Open loop at ``rate`` ops/s (a slow answer does not slow the arrivals)."""
    samples: list[tuple[float, int, int, float]] = []
    in_flight: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    end = start + minutes * 60
    async with httpx.AsyncClient(
        timeout=30, limits=httpx.Limits(max_connections=64), headers=auth_headers()
    ) as http:
        next_sample = start
        n = 0
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                value = await lag(http, proc.url)
                errors = sum(load.errors.values())
                sample = (now - start, value, errors, rss_mb(proc.proc.pid))
                samples.append(sample)
                print(
                    f"t={sample[0]:6.0f}s lag={value:6d} errors={errors:4d} "
                    f"rss={sample[3]:7.1f} MB in_flight={len(in_flight)}",
                    flush=True,
                )
                next_sample += sample_s
            due = start + n / rate
            if due > now:
                await asyncio.sleep(due - now)
            task = asyncio.create_task(load.one(http, load.pick()))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            n += 1
        if in_flight:
            await asyncio.gather(*in_flight)
        # Let the consumers drain, and record where the lag ends.
        drain_deadline = time.monotonic() + 60
        # Polling a remote gauge: there is no event to wait on.
        while (value := await lag(http, proc.url)) > 0 and time.monotonic() < drain_deadline:  # noqa: ASYNC110
            await asyncio.sleep(1)
        samples.append((time.monotonic() - start, value, sum(load.errors.values()), 0.0))
        print(f"drained: lag={value}", flush=True)
    return n, samples


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--peak-seconds", type=float, default=20.0)
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=400)
    args = parser.parse_args()

    env = infra_env()
    database = await create_database(env["NBV_DATABASE_URL"], "nbv_soak")
    work = ROOT / ".nbv" / "bench" / f"soak-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True, exist_ok=True)
    prefix = f"soak{uuid.uuid4().hex[:8]}."
    proc_env = {
        "NBV_BUS": "kafka",
        "NBV_DATABASE_URL": database,
        "NBV_KAFKA_BOOTSTRAP": env["NBV_KAFKA_BOOTSTRAP"],
        "NBV_TOPIC_PREFIX": prefix,
        "NBV_DATA_DIR": str(work / "data"),
        "NBV_LOG_LEVEL": "WARNING",
        "NBV_CONSUMER_LAG_INTERVAL_S": "2",
        "NBV_SMTP_PORT": "9",
    }
    proc = ServiceProcess(["run"], proc_env, work, "nbv")
    try:
        await proc.wait_ready(timeout=120)
        users = [(f"acct-{i % 40}", f"user-{i}") for i in range(args.users)]
        load = Load(proc.url, users)
        # Known people first, so decisions have someone to decide for.
        async with httpx.AsyncClient(timeout=30, headers=auth_headers()) as http:
            for i in range(0, len(users), 200):
                events = [
                    {
                        "id": f"id-{u}",
                        "source": "soak",
                        "type": "user.identify",
                        "account_id": a,
                        "user_id": u,
                        "payload": {"role": "end_user"},
                    }
                    for a, u in users[i : i + 200]
                ]
                r = await http.post(f"{proc.url}/v1/events/batch", json={"events": events})
                r.raise_for_status()
        await asyncio.sleep(3)
        rss_before_peak = rss_mb(proc.proc.pid)
        peak = await run_peak(load, args.peak_seconds)
        print(f"peak: {peak:.0f} ops/s (errors so far {sum(load.errors.values())})", flush=True)
        load.errors.clear()
        rss_start = rss_mb(proc.proc.pid)
        rate = peak / 2
        print(f"steady: {rate:.0f} ops/s for {args.minutes} min", flush=True)
        ops, samples = await run_steady(load, proc, rate, args.minutes, args.sample_seconds)
        rss_end = rss_mb(proc.proc.pid)
    finally:
        proc.stop()
        await delete_topics(env["NBV_KAFKA_BOOTSTRAP"], prefix)
    errors = sum(load.errors.values())
    result = {
        "errors": errors,
        "max_lag": max(s[1] for s in samples),
        "final_lag": samples[-1][1],
        "mem_growth": round((rss_end - rss_start) / rss_start, 4),
        "rss_mb": {"nbv run": {"start": round(rss_start, 1), "end": round(rss_end, 1)}},
        "rss_before_peak_mb": round(rss_before_peak, 1),
        "peak_ops_per_s": round(peak, 1),
        "rate_ops_per_s": round(rate, 1),
        "ops": ops,
        "by_kind": dict(load.counts),
        "error_kinds": dict(load.errors),
        "minutes": args.minutes,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
