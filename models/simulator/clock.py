"""Simulated time, shared by the simulator and the NBV processes it drives.

NBV decides "now": cool-downs, contact caps, snoozes, usage windows, inactivity and renewal
triggers and playbook delays all read the clock. To run weeks of a simulated world in minutes
with none of them switched off, a bench starts NBV with ``SharedClock.process_env()``: the
``sitehook`` folder on ``PYTHONPATH`` puts that process on the clock file named by
``NBV_SIM_CLOCK`` (``follow``), so its wall clock (``datetime.now``, ``time.time``; not the
monotonic clock its timers and timeouts use) runs ``offset`` seconds ahead, and the simulator
moves the offset forward one simulated day at a time. Time keeps flowing between steps, so the
order of what happens within a day is kept.

The file holds two little-endian doubles: the offset the simulator asks for, and the offset the
NBV process has applied; the simulator waits for the second before it sends anything at the new
time. Against an NBV it did not start (``nbv simulate --url``) the simulator uses ``WallClock``:
a simulated week then passes in the seconds it takes to run.
"""

from __future__ import annotations

import asyncio
import mmap
import struct
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

SITE_HOOK = Path(__file__).with_name("sitehook")
ROOT = Path(__file__).resolve().parents[2]
ENV_VAR = "NBV_SIM_CLOCK"
_WANTED, _APPLIED = 0, 8
_SIZE = 16


class Clock(Protocol):
    def now(self) -> datetime: ...

    async def advance_to(self, when: datetime) -> bool:
        """Move the clock forward to ``when``; False if it was already there (or cannot move)."""
        ...


class WallClock:
    """The real clock: it cannot be moved, so a simulated week lasts as long as it takes."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def advance_to(self, when: datetime) -> bool:
        return False


def _read(mm: mmap.mmap, at: int) -> float:
    return float(struct.unpack_from("<d", mm, at)[0])


def _write(mm: mmap.mmap, at: int, value: float) -> None:
    struct.pack_into("<d", mm, at, value)


class SharedClock:
    """The simulator's side: a clock file it moves forward and NBV processes follow."""

    def __init__(self, path: Path, follow_timeout_s: float = 30.0) -> None:
        self.path = path
        self.follow_timeout_s = follow_timeout_s
        path.write_bytes(bytes(_SIZE))
        self._file = path.open("r+b")
        self._mm = mmap.mmap(self._file.fileno(), _SIZE)

    def process_env(self) -> dict[str, str]:
        """What an NBV process needs in its environment to follow this clock."""
        return {ENV_VAR: str(self.path), "PYTHONPATH": f"{SITE_HOOK}:{ROOT}"}

    @property
    def offset(self) -> float:
        return _read(self._mm, _WANTED)

    @property
    def applied(self) -> float:
        return _read(self._mm, _APPLIED)

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset)

    async def advance_to(self, when: datetime) -> bool:
        step = (when - self.now()).total_seconds()
        if step <= 0:
            return False
        wanted = self.offset + step
        _write(self._mm, _WANTED, wanted)
        deadline = time.monotonic() + self.follow_timeout_s
        while self.applied < wanted:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no NBV process followed the simulated clock {self.path} "
                    f"(started without {ENV_VAR} and the site hook?)"
                )
            await asyncio.sleep(0.002)
        return True

    def close(self) -> None:
        self._mm.close()
        self._file.close()


def follow(path: Path, poll_s: float = 0.02) -> None:
    """The NBV process's side: run this process's wall clock at the offset in ``path``."""
    import time_machine

    file = path.open("r+b")
    mm = mmap.mmap(file.fileno(), _SIZE)
    traveller = time_machine.travel(time.time(), tick=True).start()
    applied = 0.0

    def catch_up() -> None:
        nonlocal applied
        wanted = _read(mm, _WANTED)
        if wanted > applied:
            traveller.shift(wanted - applied)
            applied = wanted
            _write(mm, _APPLIED, applied)

    def loop() -> None:
        while True:
            catch_up()
            time.sleep(poll_s)  # monotonic: not moved by the travel

    catch_up()
    threading.Thread(target=loop, name="nbv-sim-clock", daemon=True).start()
