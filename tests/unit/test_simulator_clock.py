"""The simulated clock: an NBV-like child process started with the clock's environment sees
its wall clock move when the simulator moves it, and the simulator waits until it has."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import datetime, timedelta
from pathlib import Path

from models.simulator.clock import SharedClock, WallClock

CHILD = """
import json, sys, time, datetime
print(json.dumps({"ready": time.time()}), flush=True)
sys.stdin.readline()  # the parent has moved the clock
print(json.dumps({"now": datetime.datetime.now(datetime.UTC).isoformat(), "time": time.time()}))
"""


async def test_a_process_on_the_shared_clock_follows_it(tmp_path: Path) -> None:
    clock = SharedClock(tmp_path / "clock")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        env={**os.environ, **clock.process_env()},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None and child.stdin is not None
    try:
        json.loads(await child.stdout.readline())  # started, on the clock
        target = clock.now() + timedelta(days=3)
        assert await clock.advance_to(target)
        assert clock.applied == clock.offset >= 3 * 86_400 - 5
        assert not await clock.advance_to(target - timedelta(days=1))  # never backwards
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        seen = json.loads(await child.stdout.readline())
    finally:
        await asyncio.wait_for(child.wait(), timeout=10)
        clock.close()
    now = datetime.fromisoformat(seen["now"])
    assert abs((now - target).total_seconds()) < 5
    assert abs(seen["time"] - target.timestamp()) < 5


async def test_nobody_following_is_an_error_not_a_hang(tmp_path: Path) -> None:
    clock = SharedClock(tmp_path / "clock", follow_timeout_s=0.2)
    try:
        try:
            await clock.advance_to(clock.now() + timedelta(hours=1))
        except TimeoutError as exc:
            assert "NBV_SIM_CLOCK" in str(exc)
        else:
            raise AssertionError("advance_to returned without a follower")
    finally:
        clock.close()


async def test_the_wall_clock_cannot_be_moved() -> None:
    wall = WallClock()
    assert not await wall.advance_to(wall.now() + timedelta(days=1))
    await asyncio.sleep(0)
