"""The decision service through its HTTP API and its consumers, on the embedded store and bus,
and on the real PostgreSQL + Kafka (marked integration)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from pydantic import SecretStr
from sqlalchemy import func, select, text

from models import registry_store
from models.features import FEATURES, INDEX
from models.train import train_ranker, training_meta
from services.decision import engine as engine_module
from services.decision.decision_log import expand_candidates
from services.decision.engine import Decided, DecisionRequest, UnknownUser
from services.decision.group_commit import DecisionCommitter
from services.decision.playbook_runs import STEP_JOB
from services.decision.service import DecisionService
from services.ingest.erasure import erase_user, pseudonym_key
from shared.bus import Message
from shared.envelope import TriggerEvent, TriggerPayload, encode
from shared.http import create_app
from shared.runtime import Runtime
from shared.settings import Settings
from shared.store.models import (
    AccountView,
    ChannelPreference,
    Contact,
    DecisionRow,
    ScheduledJob,
    UserView,
)
from tests.harness import auth_headers, eventually

NOW = datetime.now(UTC)


@dataclass
class Running:
    http: httpx.AsyncClient
    service: DecisionService
    runtime: Runtime


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.integration)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    base: Settings = request.getfixturevalue(f"{request.param}_settings")
    # Quiet hours that never cover the test run, unless a test sets its own preference.
    start = (NOW + timedelta(hours=6)).strftime("%H:00")
    end = (NOW + timedelta(hours=7)).strftime("%H:00")
    # The embedded variant uses its own SQLite file even when NBV_DATABASE_URL is exported.
    store = {"database_url": ""} if request.param == "embedded" else {}
    return base.model_copy(
        update={
            **store,
            "model_dir": tmp_path / "registry",
            "quiet_hours_start": start,
            "quiet_hours_end": end,
            "model_poll_s": 0.2,
            "library_poll_s": 0.2,
            # Erasure possible, so the decision log checks the erasure ledger.
            "pseudonym_secret": SecretStr("test-pseudonym-secret-0123456789abcdef"),
        }
    )


async def _seed(rt: Runtime) -> None:
    def user(uid: str, role: str, account: str, tz: str = "UTC", **kw: Any) -> UserView:
        return UserView(
            user_id=uid,
            account_id=account,
            role=role,
            timezone=tz,
            first_seen=NOW - timedelta(days=kw.pop("tenure", 60)),
            last_seen=NOW - timedelta(hours=1),
            event_count=40,
            event_counts={},
            track_events={"project_created": 1},
            feature_usage={"core": 30},
            achieved={},
            dismissed={},
            updated_at=NOW,
            **kw,
        )

    async with rt.sessions() as session, session.begin():
        session.add_all(
            [
                AccountView(
                    account_id="acme",
                    plan="pro",
                    subscription_status="active",
                    mrr=2000.0,
                    first_seen=NOW - timedelta(days=90),
                    last_seen=NOW,
                    event_count=100,
                    open_tickets={},
                    updated_at=NOW,
                ),
                user("u-end", "end_user", "acme"),
                user("u-champ", "champion", "acme"),
                user("u-admin", "admin", "acme"),
                user("u-buyer", "economic_buyer", "acme"),
            ]
        )


@asynccontextmanager
async def _serve(settings: Settings) -> AsyncIterator[Running]:
    rt = Runtime.from_settings(settings)
    service = DecisionService(rt)
    app: FastAPI = create_app(rt, [lambda _: service])
    async with app.router.lifespan_context(app):
        await _seed(rt)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://nbv", headers=auth_headers()
        ) as http:
            yield Running(http, service, rt)


@pytest.fixture
async def running(settings: Settings) -> AsyncIterator[Running]:
    async with _serve(settings) as r:
        yield r


async def _nbv(r: Running, user: str, **params: Any) -> dict[str, Any]:
    resp = await r.http.get("/v1/next-best-value", params={"user_id": user, **params})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


NEW_ELEMENT = {
    "id": "share-feedback",
    "title": "Tell us what to build next",
    "what": "Answer three questions about what slows you down.",
    "why": "Your answers decide the next release.",
    "how": [{"type": "link", "label": "Open the survey", "url": "/feedback"}],
    "kind": "quiz",
    "roles": [],
    "stage": "engage",
    "channels": ["in_app"],
    "effort_minutes": 1,
    "value_weight": 1.0,
    "cooldown_days": 0,
}


async def test_library_admin_changes_are_served_without_restart(running: Running) -> None:
    http = running.http
    listed = (await http.get("/v1/admin/elements")).json()
    v0 = listed["library_version"]
    assert len(listed["elements"]) >= 30

    put = await http.put("/v1/admin/elements/share-feedback", json=NEW_ELEMENT)
    assert put.status_code == 200, put.text
    assert put.json()["library_version"] == v0 + 1
    ids = [i["element_id"] for i in (await _nbv(running, "u-end", limit=20))["items"]]
    assert "share-feedback" in ids

    bad = await http.put(
        "/v1/admin/elements/share-feedback", json=NEW_ELEMENT | {"value_weight": 3}
    )
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "value_weight"
    mismatch = await http.put("/v1/admin/elements/other-id", json=NEW_ELEMENT)
    assert mismatch.status_code == 422 and "id" in mismatch.text

    blocked = await http.delete("/v1/admin/elements/create-first-project")
    assert blocked.status_code == 409 and "prerequisite" in blocked.text
    assert (await http.delete("/v1/admin/elements/share-feedback")).status_code == 200
    assert (await http.get("/v1/admin/elements/share-feedback")).status_code == 404
    ids = [i["element_id"] for i in (await _nbv(running, "u-champ", limit=20))["items"]]
    assert "share-feedback" not in ids

    imported = await http.post(
        "/v1/admin/library/import", json={"source": "test", "elements": [NEW_ELEMENT]}
    )
    assert imported.status_code == 200, imported.text
    versions = (await http.get("/v1/admin/library/versions")).json()
    assert [v["version"] for v in versions[:4]] == [v0 + 3, v0 + 2, v0 + 1, v0]
    assert versions[0]["element_count"] == 1
    only = (await _nbv(running, "u-admin", limit=5))["items"]
    assert [i["element_id"] for i in only] == ["share-feedback"]


async def test_contact_policy_exclusions_are_logged_with_reasons(running: Running) -> None:
    first = await _nbv(running, "u-champ", channel="email", limit=3)
    # The email cap (1 a day by default) lets one item through, the rest is recorded.
    assert len(first["items"]) == 1
    log = (await running.http.get(f"/v1/decisions/{first['decision_id']}")).json()
    rules = {c["excluded_by"] for c in log["candidates"]}
    assert {"channel", "role"} <= rules  # eligibility rules still apply
    assert any("within this decision" in c["detail"] for c in log["candidates"])
    # Excluded before ranking: the rule and why only; turned away after it: with its scores.
    for c in log["candidates"]:
        if c["excluded_by"] in ("channel", "role"):
            assert set(c) == {"element_id", "excluded_by", "detail"}
        if "within this decision" in c["detail"]:
            assert c["score"] is not None and c["final"] is not None

    second = await _nbv(running, "u-champ", channel="email", limit=3)
    assert second["items"] == []
    log2 = (await running.http.get(f"/v1/decisions/{second['decision_id']}")).json()
    reasons = {c["element_id"]: c["excluded_by"] for c in log2["candidates"]}
    assert reasons[first["items"][0]["element_id"]] in ("cooldown", "pending")
    assert "cap_day" in reasons.values()
    assert any(line.startswith("excluded:") for line in log2["explanation"])
    metrics = (await running.http.get("/metrics")).text
    assert 'nbv_exclusions_total{rule="cap_day"}' in metrics

    # In-app: the element just offered is not offered again while in cool-down.
    a = await _nbv(running, "u-end", limit=3)
    b = await _nbv(running, "u-end", limit=3)
    assert not {i["element_id"] for i in a["items"]} & {i["element_id"] for i in b["items"]}
    for item in a["items"]:
        assert item["reason"] and 0 < item["propensity"] <= 1
        assert item["content"]["what"] and item["content"]["how"]


async def test_the_log_keeps_one_entry_per_reason_and_explains_every_element(
    running: Running,
) -> None:
    decided = await _nbv(running, "u-end", channel="in_app", limit=2)
    async with running.runtime.sessions() as session:
        row = await session.get(DecisionRow, decided["decision_id"])
    assert row is not None
    groups = [c for c in row.candidates if "element_ids" in c]
    # Stored: each reason once, with the elements it excluded before ranking.
    assert groups and len({(g["excluded_by"], g["detail"]) for g in groups}) == len(groups)
    assert all(g["excluded_by"] and g["element_ids"] for g in groups)
    log = (await running.http.get(f"/v1/decisions/{decided['decision_id']}")).json()
    # Read: one entry per element of the library, none lost or repeated.
    ids = [c["element_id"] for c in log["candidates"]]
    assert sorted(ids) == sorted(e.id for e in running.service.engine.library.elements)
    for g in groups:
        for element in g["element_ids"]:
            entry = next(c for c in log["candidates"] if c["element_id"] == element)
            assert entry == {
                "element_id": element,
                "excluded_by": g["excluded_by"],
                "detail": g["detail"],
            }
    assert {i["element_id"] for i in decided["items"]} <= {
        c["element_id"] for c in log["candidates"] if c["excluded_by"] is None
    }


async def test_the_csm_alert_cap_counts_the_alerts_of_all_the_csm_s_people(
    settings: Settings,
) -> None:
    async with _serve(settings.model_copy(update={"csm_alerts_per_day": 1})) as running:
        first = await _nbv(running, "u-champ", channel="csm", limit=1)
        assert [i["channel"] for i in first["items"]] == ["csm"]
        # Another person of the same CSM's accounts: the CSM's day is full.
        second = await _nbv(running, "u-buyer", channel="csm", limit=1)
        assert second["items"] == []
        log = (await running.http.get(f"/v1/decisions/{second['decision_id']}")).json()
        assert "csm_cap" in {c["excluded_by"] for c in log["candidates"]}


async def test_cold_start_and_batch(running: Running) -> None:
    missing = await running.http.get("/v1/next-best-value", params={"user_id": "ghost"})
    assert missing.status_code == 404 and "ghost" in missing.json()["detail"]
    cold = await _nbv(running, "ghost", cold_start="true")
    assert cold["cold_start"] is True and cold["decision_id"] is None
    assert cold["items"] and all(i["reason"].startswith("cold start") for i in cold["items"])

    batch = await running.http.post(
        "/v1/next-best-value/batch", json={"user_ids": ["u-end", "ghost", "u-admin"], "limit": 2}
    )
    assert batch.status_code == 200, batch.text
    body = batch.json()
    assert [r["user_id"] for r in body["results"]] == ["u-end", "u-admin"]
    assert body["errors"] == [{"user_id": "ghost", "error": "unknown user_id"}]
    too_many = await running.http.post(
        "/v1/next-best-value/batch", json={"user_ids": [f"u{i}" for i in range(101)]}
    )
    # A list over its maximum is "too large" (413), naming the field.
    assert too_many.status_code == 413 and "user_ids" in too_many.text


async def _trigger(rt: Runtime, name: str, user: str | None) -> str:
    event = TriggerEvent(
        type="nbv.trigger",
        source="test",
        account_id="acme",
        user_id=user,
        payload=TriggerPayload(trigger=name, reason="test", cause_event_id=str(uuid.uuid4())),
    )
    await rt.bus.publish(rt.topic("triggers"), [Message("acme", encode(event))])
    return event.id


async def _jobs(rt: Runtime, like: str) -> dict[str, str]:
    async with rt.sessions() as session:
        rows = await session.execute(
            select(ScheduledJob.key, ScheduledJob.status).where(ScheduledJob.key.like(like))
        )
        return {k: s for k, s in rows.all()}


async def test_usage_drop_playbook_runs_on_the_scheduler_and_stops_on_recovery(
    running: Running,
) -> None:
    rt = running.runtime
    trigger_id = await _trigger(rt, "usage_drop", "u-end")
    prefix = f"playbook:usage-drop:u-end:{trigger_id}:"
    jobs = await eventually(
        lambda: _jobs(rt, prefix + "%"), lambda j: len(j) == 3, what="3 scheduled steps"
    )
    assert set(jobs) == {
        prefix + s for s in ("day1-we-miss-you", "day4-csm-email", "day9-csm-call")
    }

    # Day 1 comes: the automated email is decided, logged and published.
    ran = await running.service.scheduler.run_due(datetime.now(UTC) + timedelta(hours=25))
    assert ran == 1
    async with rt.sessions() as session:
        job = await session.get(ScheduledJob, prefix + "day1-we-miss-you")
        assert job is not None and job.status == "done", job and job.last_error
    decision_id = str(uuid.uuid5(uuid.NAMESPACE_URL, prefix + "day1-we-miss-you"))
    log = (await running.http.get(f"/v1/decisions/{decision_id}")).json()
    assert log["trigger"] == "playbook:usage-drop:day1-we-miss-you"
    assert [(c["element_id"], c["channel"]) for c in log["chosen"]] == [
        ("we-miss-you-tips-email", "email")
    ]

    # Usage recovers: the remaining steps are cancelled.
    await _trigger(rt, "usage_recovered", "u-end")
    await eventually(
        lambda: _jobs(rt, prefix + "%"),
        lambda j: sorted(j.values()) == ["cancelled", "cancelled", "done"],
        what="remaining steps cancelled",
    )


async def test_account_trigger_fans_out_to_the_audience_and_quiet_hours_defer(
    running: Running,
) -> None:
    rt = running.runtime
    # The admin is in quiet hours right now (their own preference); the buyer is not.
    async with rt.sessions() as session, session.begin():
        session.add(
            ChannelPreference(
                user_id="u-admin",
                channels={},
                quiet_hours={
                    "start": (NOW - timedelta(hours=1)).strftime("%H:%M:00"),
                    "end": (NOW + timedelta(hours=2)).strftime("%H:%M:00"),
                    "timezone": "UTC",
                },
                opted_out_kinds=[],
                opted_out_elements=[],
            )
        )
    trigger_id = await _trigger(rt, "payment_failed", None)  # account-level
    jobs = await eventually(
        lambda: _jobs(rt, f"playbook:payment-failed:%:{trigger_id}:%"),
        lambda j: len(j) == 2,
        what="one step per admin and economic buyer",
    )
    assert {k.split(":")[2] for k in jobs} == {"u-admin", "u-buyer"}
    await running.service.scheduler.run_due(datetime.now(UTC) + timedelta(seconds=1))
    deferred = await _jobs(rt, f"playbook:payment-failed:u-admin:{trigger_id}:%@%")
    assert len(deferred) == 1 and next(iter(deferred.values())) == "pending"
    async with rt.sessions() as session:
        due = await session.scalar(
            select(ScheduledJob.due_at).where(ScheduledJob.key == next(iter(deferred)))
        )
        kinds = set(await session.scalars(select(ScheduledJob.kind)))
    assert due is not None and due > datetime.now(UTC) + timedelta(hours=1)
    assert kinds == {STEP_JOB}
    assert not await _jobs(rt, f"playbook:payment-failed:u-buyer:{trigger_id}:%@%")


async def _promote_small_model(r: Running, version: str, seed: int) -> None:
    """Registers and promotes a 20-tree model that favours high value weights."""
    x = np.random.default_rng(seed).random((600, len(FEATURES)))
    y = (x[:, INDEX["value_weight"]] > 0.6).astype(float)
    booster = train_ranker(x, y, [6] * 100, num_trees=20)
    meta = {**training_meta(600, 100), "features": list(FEATURES)}
    async with r.runtime.sessions() as session, session.begin():
        await registry_store.register(session, version, booster.model_to_string(), meta, by="test")
        await registry_store.promote(session, version, by="test")


async def test_a_promoted_model_is_swapped_in_and_explains_itself(running: Running) -> None:
    assert (await _nbv(running, "u-end"))["model_version"] == "rules-v1"
    await _promote_small_model(running, "m1", seed=0)

    async def version() -> str:
        return str((await _nbv(running, "u-champ"))["model_version"])

    await eventually(version, lambda v: v == "m1", what="hot-swapped model", timeout=10)
    answer = await _nbv(running, "u-buyer")
    assert answer["items"] and "business value" in answer["items"][0]["reason"]
    metrics = (await running.http.get("/metrics")).text
    assert 'nbv_model_info{kind="lightgbm",role="champion",version="m1"} 1.0' in metrics
    assert 'version="rules-v1"' not in metrics.split("nbv_model_info", 1)[1].split("# HELP")[0]


async def test_a_campaign_is_launched_over_a_target_list_once(running: Running) -> None:
    body = {"campaign_id": "release-q4", "user_ids": ["u-end", "u-admin", "ghost"]}
    first = await running.http.post("/v1/admin/playbooks/release-campaign/launch", json=body)
    assert first.status_code == 202, first.text
    assert first.json() == {
        "playbook": "release-campaign",
        "scheduled_steps": 2,
        "unknown_users": ["ghost"],
    }
    again = await running.http.post("/v1/admin/playbooks/release-campaign/launch", json=body)
    assert again.json()["scheduled_steps"] == 0  # the same campaign id schedules nothing twice
    missing = await running.http.post("/v1/admin/playbooks/nope/launch", json=body)
    assert missing.status_code == 404
    listed = (await running.http.get("/v1/admin/playbooks")).json()
    assert "usage-drop" in {p["name"] for p in listed["playbooks"]} and listed["rules"]


async def _logged(r: Running, decided: list[Decided]) -> set[str]:
    ids = [d.message.decision_id for d in decided]
    async with r.runtime.sessions() as session:
        return set(await session.scalars(select(DecisionRow.id).where(DecisionRow.id.in_(ids))))


def _outcome(d: Decided) -> tuple[Any, ...]:
    """What a decision concluded, apart from its id, time and exploration draws."""
    scored = [
        (c["element_id"], c.get("excluded_by"), c.get("score"))
        for c in expand_candidates(d.log["candidates"])
    ]
    return d.message.user_id, d.log["context"]["features"], scored


class _Frozen(datetime):
    """The engine's clock, stopped: decisions made apart in time compare equal."""

    instant = datetime.now(UTC)

    @classmethod
    def now(cls, tz: Any = None) -> _Frozen:
        return cls.fromtimestamp(cls.instant.timestamp(), tz)


async def test_people_decided_together_get_what_each_would_get_alone(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "datetime", _Frozen)
    await _promote_small_model(running, "m-batch", seed=1)
    assert await running.service.refresh_model()
    engine = running.service.engine
    ranker = engine.ranker
    scored: list[int] = []
    real_score = ranker.score

    def counting(matrix: Any) -> Any:
        scored.append(len(matrix))
        return real_score(matrix)

    ranker.score = counting  # type: ignore[method-assign,assignment]
    people = ["u-end", "u-champ", "ghost", "u-admin", "u-buyer", "u-end"]
    async with running.runtime.engine.connect() as connection:
        together = await engine.decide_many(
            connection, [DecisionRequest(u, None, 2) for u in people]
        )
        assert len(scored) == 1  # one call for everyone's rows
        alone = [await engine.decide(connection, u, channel=None, limit=2) for u in people[:2]]
        assert len(scored) == 3

    assert isinstance(together[2], UnknownUser) and together[2].user_id == "ghost"
    decided = [d for d in together if isinstance(d, Decided)]
    assert [d.message.user_id for d in decided] == [p for p in people if p != "ghost"]
    assert scored[0] == sum(
        1 for d in decided for c in d.log["candidates"] if c.get("score") is not None
    )
    assert [_outcome(d) for d in decided[:2]] == [_outcome(d) for d in alone]
    assert _outcome(decided[0]) == _outcome(decided[-1])
    for d in decided:
        assert d.message.model_version == "m-batch"
        assert d.message.items and "business value" in d.message.items[0].reason


async def test_concurrent_requests_are_decided_in_batches(running: Running) -> None:
    def batches() -> tuple[float, float]:
        count = REGISTRY.get_sample_value("nbv_decision_read_batch_size_count") or 0.0
        total = REGISTRY.get_sample_value("nbv_decision_read_batch_size_sum") or 0.0
        return count, total

    count, total = batches()
    people = ["u-end", "u-champ", "u-admin", "u-buyer"] * 3 + ["ghost"]
    answers = await asyncio.gather(
        *(
            running.http.get("/v1/next-best-value", params={"user_id": u, "limit": 1})
            for u in people
        )
    )
    assert [a.status_code for a in answers] == [200] * 12 + [404]
    assert [a.json()["user_id"] for a in answers[:12]] == people[:12]
    assert len({a.json()["decision_id"] for a in answers[:12]}) == 12
    assert await _logged_ids(running, [a.json()["decision_id"] for a in answers[:12]]) == 12
    new_count, new_total = batches()
    assert new_total - total == len(people)
    # A person is in a batch at most once: at least three batches, and fewer than requests.
    assert 3 <= new_count - count < len(people)


async def _logged_ids(r: Running, ids: list[str]) -> int:
    async with r.runtime.sessions() as session:
        n = await session.scalar(
            select(func.count()).select_from(DecisionRow).where(DecisionRow.id.in_(ids))
        )
    return int(n or 0)


def _commit_batches() -> tuple[float, float]:
    count = REGISTRY.get_sample_value("nbv_decision_commit_batch_size_count") or 0.0
    total = REGISTRY.get_sample_value("nbv_decision_commit_batch_size_sum") or 0.0
    return count, total


async def test_a_batch_is_decided_and_logged_in_one_transaction(running: Running) -> None:
    people = ["u-end", "u-champ", "u-admin", "ghost"]
    count, total = _commit_batches()

    results = await running.service.committer.decide([DecisionRequest(u, None, 2) for u in people])

    assert isinstance(results[3], UnknownUser)
    decided = [r for r in results if isinstance(r, Decided)]
    assert [d.message.user_id for d in decided] == people[:3]
    assert _commit_batches() == (count + 1, total + 3)
    assert await _logged(running, decided) == {d.message.decision_id for d in decided}
    async with running.runtime.sessions() as session:
        contacts = await session.scalar(
            select(func.count())
            .select_from(Contact)
            .where(Contact.decision_id.in_([d.message.decision_id for d in decided]))
        )
    assert contacts == sum(len(d.message.items) for d in decided)


async def test_a_failing_decision_fails_only_its_own_request(running: Running) -> None:
    first = await running.http.get("/v1/next-best-value", params={"user_id": "u-end"})
    taken = first.json()["decision_id"]
    batcher = running.service.batcher
    # Asked for together, they share a batch; the logged id again: the primary key refuses
    # the batch's insert, and each request is then decided on its own.
    outcomes = await asyncio.gather(
        batcher.decide(DecisionRequest("u-end", None, 2, decision_id=taken)),
        batcher.decide(DecisionRequest("u-champ", None, 2)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], Exception)
    assert isinstance(outcomes[1], Decided)
    assert await _logged(running, [outcomes[1]]) == {outcomes[1].message.decision_id}


async def test_a_broker_that_refuses_fails_a_batch_at_once_and_logs_nothing(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = 0

    async def refuse(topic: str, messages: Any) -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionError("broker unavailable")

    monkeypatch.setattr(running.runtime.bus, "publish", refuse)
    people = ["u-end", "u-champ", "u-admin", "u-buyer"] * 2
    before = await _logged_ids_of(running, people)
    answers = await asyncio.gather(
        *(running.http.get("/v1/next-best-value", params={"user_id": u}) for u in people)
    )
    assert {a.status_code for a in answers} == {503}
    assert "decision log unavailable" in answers[0].text
    # Refused once per batch, not once more per request of a failed batch.
    assert 1 <= attempts < len(people)
    assert await _logged_ids_of(running, people) == before


async def _logged_ids_of(r: Running, users: list[str]) -> set[str]:
    async with r.runtime.sessions() as session:
        return set(
            await session.scalars(select(DecisionRow.id).where(DecisionRow.user_id.in_(users)))
        )


async def test_an_erasure_and_a_decision_about_the_same_person_never_cross(
    running: Running,
) -> None:
    """PostgreSQL: the decision's transaction holds the erasure fence from its read, so an
    erasure waits for it and then erases what it logged. SQLite (no fence): the write finds
    the person in the erasure ledger and logs nothing."""
    key = pseudonym_key(running.runtime.settings)
    assert key is not None
    read, release = asyncio.Event(), asyncio.Event()
    decide_many = running.service.engine.decide_many

    async def erase() -> None:
        async with running.runtime.sessions() as session, session.begin():
            await erase_user(session, running.runtime.dialect, key, "u-admin", datetime.now(UTC))

    async def decide_then_wait(connection: Any, requests: Any) -> list[Decided | UnknownUser]:
        results = await decide_many(connection, requests)
        read.set()
        if running.runtime.dialect == "postgresql":
            await release.wait()
        else:
            await erase()  # between the read and the write
        return results

    committer = DecisionCommitter(
        running.runtime.engine,
        key,
        decide_then_wait,
        running.service._publish_or_refuse,
        connections=1,
    )
    try:
        deciding = asyncio.create_task(committer.decide([DecisionRequest("u-admin", None, 2)]))
        await read.wait()
        if running.runtime.dialect == "postgresql":
            erasing = asyncio.create_task(erase())
            await asyncio.sleep(0.3)
            assert not erasing.done()  # waiting for the decision's fence
            release.set()
            [result] = await deciding
            assert isinstance(result, Decided)
            await erasing
        else:
            [result] = await deciding
            assert isinstance(result, UnknownUser)
    finally:
        release.set()
        await committer.close()
    async with running.runtime.sessions() as session:
        left = await session.scalar(
            select(func.count()).select_from(DecisionRow).where(DecisionRow.user_id == "u-admin")
        )
    assert left == 0
    resp = await running.http.get("/v1/next-best-value", params={"user_id": "u-admin"})
    assert resp.status_code == 404, resp.text


@pytest.mark.integration
async def test_decisions_recover_when_the_database_drops_its_connections(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """The decision's read runs outside a transaction, where SQLAlchemy sees no failure: a
    connection PostgreSQL closed must still be discarded, not handed to the next request."""
    settings = kafka_settings.model_copy(update={"model_dir": tmp_path / "m"})
    async with _serve(settings) as running:
        http, rt = running.http, running.runtime
        params = {"user_id": "u-end"}
        warm = await asyncio.gather(
            *(http.get("/v1/next-best-value", params=params) for _ in range(8))
        )
        assert {r.status_code for r in warm} == {200}
        async with rt.engine.connect() as connection:
            killed = await connection.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        assert killed
        statuses = [
            (await http.get("/v1/next-best-value", params=params)).status_code
            for _ in range(2 * kafka_settings.db_pool_size + 2)
        ]
        # Each dead connection fails at most one request, with a retryable 503.
        assert set(statuses) <= {200, 503}
        assert statuses[-1] == 200
