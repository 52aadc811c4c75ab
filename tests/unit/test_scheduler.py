from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from shared.scheduler import Job, SchedulerWorker, cancel, schedule
from shared.store.db import create_engine, migrate, session_factory
from shared.store.models import ScheduledJob

NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)


async def test_jobs_fire_once_retry_after_lease_and_cancel(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    await migrate(url)
    engine = create_engine(url)
    sessions = session_factory(engine)
    async with sessions() as s, s.begin():
        assert await schedule(s, "sqlite", key="renewal:acme:90", kind="t", due_at=NOW)
        assert not await schedule(s, "sqlite", key="renewal:acme:90", kind="t", due_at=NOW)
        assert await schedule(s, "sqlite", key="flaky", kind="flaky", due_at=NOW)
        assert await schedule(s, "sqlite", key="later", kind="t", due_at=NOW + timedelta(days=1))
        assert await schedule(s, "sqlite", key="step2", kind="t", due_at=NOW + timedelta(days=4))
        assert await cancel(s, ["step2"]) == 1

    ran: list[str] = []
    fails = {"left": 1}

    async def handler(job: Job) -> None:
        ran.append(job.key)

    async def flaky(job: Job) -> None:
        if fails["left"]:
            fails["left"] -= 1
            raise ConnectionError("bus down")
        ran.append(job.key)

    lease = timedelta(minutes=2)
    worker = SchedulerWorker(sessions, {"t": handler, "flaky": flaky}, lease=lease)
    assert await worker.run_due(NOW) == 2
    assert ran == ["renewal:acme:90"]
    assert await worker.run_due(NOW) == 0  # the failed job waits for its lease to run out
    assert await worker.run_due(NOW + lease + timedelta(seconds=1)) == 1
    assert await worker.run_due(NOW + timedelta(days=5)) == 1  # "later"; step2 was cancelled
    assert ran == ["renewal:acme:90", "flaky", "later"]
    async with sessions() as s:
        rows = (await s.execute(select(ScheduledJob.key, ScheduledJob.status))).all()
    status = {key: value for key, value in rows}
    assert status == {
        "renewal:acme:90": "done",
        "flaky": "done",
        "later": "done",
        "step2": "cancelled",
    }
    await engine.dispose()
