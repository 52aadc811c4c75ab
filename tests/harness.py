"""Run NBV as real processes (the way users run it) and wait on them, for e2e tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import httpx
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

T = TypeVar("T")
NBV = [sys.executable, "-m", "services.cli"]
# The bootstrap admin key (NBV_ADMIN_KEY) of every NBV the tests and benches start; it has
# every scope and no rate limit. Not a secret: it only ever opens a test's own NBV.
TEST_ADMIN_KEY = "nbv_sk_test-admin-key-for-tests-and-benches-only"


def auth_headers(key: str = TEST_ADMIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    def __init__(self, args: list[str], env: dict[str, str], log_dir: Path, name: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        full_env = {
            **os.environ,
            "NBV_ADMIN_KEY": TEST_ADMIN_KEY,
            **env,
            "NBV_PORT": str(self.port),
            "NBV_HOST": "127.0.0.1",
        }
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*NBV, *args], env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"process exited early:\n{self.log_tail()}")
                try:
                    if (await client.get(f"{self.url}/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError(f"{self.url} not ready in {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> bool:
        """SIGTERM; True if the process shut down gracefully (drained, committed, closed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        # uvicorn re-raises SIGTERM after a clean shutdown, so -15 is a normal exit here.
        clean_exit = self.proc.returncode in (0, -signal.SIGTERM)
        return clean_exit and '"message": "stopped"' in self.log_path.read_text(errors="replace")


async def eventually(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    timeout: float = 30,
    what: str = "condition",
) -> T:
    """Poll until ``done(probe())``; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    value = await probe()
    while not done(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last value: {value!r}")
        await asyncio.sleep(0.1)
        value = await probe()
    return value


ROOT = Path(__file__).resolve().parents[1]


def infra_env() -> dict[str, str]:
    """Start (or reuse) the local PostgreSQL and Kafka; their NBV_* connection settings."""
    subprocess.run(["bash", str(ROOT / "deploy/local/infra.sh"), "up"], check=True)
    out = subprocess.run(
        ["bash", str(ROOT / "deploy/local/infra.sh"), "env"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    env: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value.strip("'\"")
    return env


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def create_database(admin_url: str, prefix: str = "nbv_t") -> str:
    """A new, empty PostgreSQL database; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    await admin.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


async def drop_database(admin_url: str, url: str) -> None:
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        name = make_url(url).database
        await conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.dispose()


async def delete_topics(bootstrap: str, prefix: str) -> None:
    """Delete the topics named with ``prefix`` (one test's, one bench run's). A local broker
    keeps every topic it was ever given, and thousands of partitions left by earlier runs
    kept it at a fifth of a CPU when idle: the next benchmark paid for it. Best effort: a
    broker that is away keeps them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
    except (KafkaError, OSError, TimeoutError) as exc:
        print(f"topics {prefix}* not deleted: {exc!r}", file=sys.stderr)
    finally:
        await admin.close()


@asynccontextmanager
async def fresh_database(admin_url: str) -> AsyncIterator[str]:
    """A new, empty PostgreSQL database (its URL), dropped on the way out."""
    url = await create_database(admin_url)
    try:
        yield url
    finally:
        await drop_database(admin_url, url)
