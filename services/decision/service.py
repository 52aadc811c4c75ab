"""Decision: the next-best-value API, proactive decisions and playbooks on triggers, the library
admin API, and hot reloads of the model and the library."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from models.ranker import RulePrior
from models.routing import ServingModels
from services.decision.admin import Launch, Launched, PlaybookList, admin_router
from services.decision.batching import DecisionBatcher
from services.decision.contact_policy import ContactLimits, ContactPolicy
from services.decision.decision_log import expand_candidates, write_decisions
from services.decision.engine import (
    Decided,
    DecisionEngine,
    DecisionRequest,
    LibrarySnapshot,
    UnknownUser,
)
from services.decision.group_commit import DecisionCommitter
from services.decision.library import (
    DEFAULT_LIBRARY,
    active_elements,
    current_version,
    load_library,
    seed_library,
)
from services.decision.model_admin import model_admin_router
from services.decision.model_loader import ModelLoader, publish_metrics
from services.decision.playbook_runs import (
    STEP_JOB,
    StepJob,
    audience,
    cancel_playbook,
    start_playbook,
    step_label,
)
from services.decision.playbooks import DEFAULT_PLAYBOOKS, Playbook, load_playbooks
from services.decision.policy import make_policy
from services.ingest.erasure import fence, pseudonym_key
from services.ingest.view import AccountState
from shared.access.scopes import Scope, requires
from shared.bus import Message, Record
from shared.contracts import DecidedItem
from shared.envelope import Channel, Identifier, TriggerEvent, decode
from shared.logging import log_ref
from shared.runtime import Runtime
from shared.scheduler import Job, SchedulerWorker, schedule
from shared.store.db import upsert
from shared.store.models import DecisionRow, LibraryVersion, ProcessedEvent, UserView
from shared.worker import PoisonRecord, is_transient

log = logging.getLogger(__name__)

TRIGGER_CONSUMER = "decision-triggers"
MAX_USERS_PER_ACCOUNT_TRIGGER = 50
MAX_BATCH_USERS = 100


class NextBestValue(BaseModel):
    decision_id: str | None = Field(description="null for a cold-start answer (nothing logged)")
    user_id: str
    model_version: str
    cold_start: bool = False
    items: list[DecidedItem]


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_ids: list[Identifier] = Field(min_length=1, max_length=MAX_BATCH_USERS)
    channel: Channel = Channel.IN_APP
    limit: int = Field(default=3, ge=1, le=20)


class BatchError(BaseModel):
    user_id: str
    error: str


class BatchResponse(BaseModel):
    results: list[NextBestValue]
    errors: list[BatchError]


class DecisionLog(BaseModel):
    id: str
    user_id: str
    account_id: str
    created_at: datetime
    channel: str | None
    trigger: str | None
    policy: str
    model_version: str
    context: dict[str, Any]
    candidates: list[Any]
    chosen: list[Any]
    explanation: list[str] = Field(default_factory=list, description="one line per chosen item")


def _unavailable(exc: Exception) -> bool:
    """The database or the broker failed the batch (``shared.worker.is_transient``, or the
    publish refused): each of its requests would fail the same way, after as long."""
    return is_transient(exc) or (
        isinstance(exc, HTTPException) and exc.status_code == status.HTTP_503_SERVICE_UNAVAILABLE
    )


class DecisionService:
    name = "decision"

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        s = runtime.settings
        self._playbook_dir = s.playbook_dir or DEFAULT_PLAYBOOKS
        self.engine = DecisionEngine(
            RulePrior(),  # until start() applies the registry's assignment
            make_policy(
                s.exploration_policy,
                s.exploration_epsilon,
                s.exploration_temperature,
                s.decision_seed,
            ),
            ContactPolicy(ContactLimits.from_settings(s)),
            load_playbooks(self._playbook_dir),
            self._csm_of,
            explain_items=s.decision_explain_items,
        )
        # Each batch of concurrent requests is decided, logged and published in one
        # transaction (services.decision.batching, services.decision.group_commit).
        self.committer = DecisionCommitter(
            runtime.engine,
            pseudonym_key(s),
            self.engine.decide_many,
            self._publish_or_refuse,
            connections=min(s.decision_read_connections, s.db_pool_size),
        )
        self.batcher = DecisionBatcher(
            self.committer.decide,
            max_batch=s.decision_batch_max,
            readers=s.decision_readers,
            backlog=s.decision_reader_backlog,
            shared_failure=_unavailable,
        )
        self._worker = runtime.worker(
            topics=["triggers"], group="decision", handler=self.handle_triggers
        )
        self.scheduler = SchedulerWorker(runtime.sessions, {STEP_JOB: self.run_step}, poll_s=0.5)
        self._stopping = asyncio.Event()
        self._watchers: list[asyncio.Task[None]] = []
        self.models = ModelLoader(runtime.sessions, self._serving, self._serve_models)
        self.router = APIRouter(tags=["decision"])
        self.router.add_api_route("/v1/next-best-value", self.next_best_value, methods=["GET"])
        self.router.add_api_route(
            "/v1/next-best-value/batch", self.next_best_value_batch, methods=["POST"]
        )
        self.router.add_api_route("/v1/decisions/{decision_id}", self.get_decision, methods=["GET"])
        self.router.include_router(
            admin_router(runtime, self.reload_library, self._playbook_list, self.launch)
        )
        self.router.include_router(model_admin_router(runtime, self.refresh_model))

    def _csm_of(self, account_id: str, account: AccountState | None) -> str | None:
        owner = getattr(account, "csm_id", None) or getattr(account, "csm_owner", None)
        if isinstance(owner, str) and owner:
            return owner
        s = self._rt.settings
        return s.csm_owners.get(account_id, s.csm_default_owner)

    def _playbook_list(self) -> PlaybookList:
        return PlaybookList(
            playbooks=self.engine.playbooks.playbooks, rules=self.engine.playbooks.rules
        )

    async def start(self) -> None:
        library = load_library(self._rt.settings.library_path or DEFAULT_LIBRARY)
        async with self._rt.sessions() as session, session.begin():
            if await seed_library(session, library, self._rt.dialect):
                log.info("library seeded", extra={"version": library.version})
        await self.reload_library()
        for problem in self.engine.playbooks.check_elements(self.engine.elements):
            log.warning("playbook refers to a missing element", extra={"problem": problem})
        publish_metrics(self.engine.models)
        try:
            await self.refresh_model()
        except Exception:
            log.exception("assigned model could not be loaded; serving the rule prior meanwhile")
        await self._worker.start()
        await self.scheduler.start()
        s = self._rt.settings
        self._watchers = [
            asyncio.create_task(
                self._watch(s.model_poll_s, self.refresh_model, "model"), name="model-reload"
            ),
            asyncio.create_task(
                self._watch(s.library_poll_s, self._refresh_library_if_changed, "library"),
                name="library-reload",
            ),
        ]

    async def stop(self) -> None:
        self._stopping.set()
        for watcher in self._watchers:
            await watcher
        await self.scheduler.stop()
        await self._worker.stop()
        await self.committer.close()

    # -------------------------------------------------------------- hot reloads

    def _serving(self) -> ServingModels:
        return self.engine.models

    def _serve_models(self, models: ServingModels) -> None:
        self.engine.models = models  # one reference swap; decisions in flight keep theirs

    async def reload_library(self) -> None:
        async with self._rt.sessions() as session:
            version = await current_version(session)
            elements = await active_elements(session)
        self.engine.library = LibrarySnapshot.of(version, elements)  # one reference swap

    async def refresh_model(self) -> bool:
        """Swap in the models the registry assigns if they changed (True if swapped)."""
        return await self.models.refresh()

    async def _refresh_library_if_changed(self) -> None:
        async with self._rt.sessions() as session:
            version = await session.scalar(select(func.max(LibraryVersion.version)))
        if version is not None and version != self.engine.library.version:
            await self.reload_library()
            log.info("library reloaded", extra={"version": version})

    async def _watch(
        self, period: float, refresh: Callable[[], Awaitable[object]], what: str
    ) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=period)
            if self._stopping.is_set():
                return
            try:
                await refresh()
            except Exception:
                log.exception("reload failed; the current one keeps serving", extra={"what": what})

    # -------------------------------------------------------------- API

    async def _publish(self, decided: Sequence[Decided]) -> None:
        messages = [
            Message(
                key=d.message.account_id,
                value=d.message.model_dump_json().encode(),
                headers=(("nbv-decision-id", d.message.decision_id.encode()),),
            )
            for d in decided
            if d.message.items
        ]
        if messages:
            await self._rt.bus.publish(self._rt.topic("decisions"), messages)

    @staticmethod
    async def _log(session: AsyncSession, decided: Sequence[Decided]) -> None:
        """In the session's transaction, which took the erasure fence before reading."""
        await session.flush()
        await write_decisions(
            await session.connection(),
            [d.log for d in decided],
            [c for d in decided for c in d.contacts],
        )

    async def _publish_or_refuse(self, decided: Sequence[Decided]) -> None:
        """Publish in the log's transaction: a decision is either logged and published, or
        (publish failed) rolled back and refused."""
        try:
            await self._publish(decided)
        except Exception as exc:
            log.exception("decision publish failed")
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, "decision log unavailable"
            ) from exc

    @staticmethod
    def _answer(d: Decided) -> NextBestValue:
        m = d.message
        return NextBestValue(
            decision_id=m.decision_id,
            user_id=m.user_id,
            model_version=m.model_version,
            items=m.items,
        )

    @requires(Scope.DECISIONS_READ)
    async def next_best_value(
        self,
        user_id: Annotated[str, Query(min_length=1, max_length=200)],
        limit: Annotated[int, Query(ge=1, le=20)] = 3,
        channel: Channel = Channel.IN_APP,
        cold_start: Annotated[
            bool, Query(description="for an unknown user, answer with the cold-start elements")
        ] = False,
    ) -> NextBestValue:
        """Rank the eligible Value Elements for one person and log the decision.

        The chosen items are also handed to delivery (for ``in_app``: the person's inbox).
        """
        try:
            # Decided and logged with concurrent requests (services.decision.batching).
            decided = await self.batcher.decide(DecisionRequest(user_id, channel, limit))
        except UnknownUser:
            if cold_start:
                return NextBestValue(
                    decision_id=None,
                    user_id=user_id,
                    model_version="cold-start",
                    cold_start=True,
                    items=self.engine.cold_start(channel, limit),
                )
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"unknown user_id {user_id!r}: no events received for this user yet "
                "(add cold_start=true for the cold-start answer)",
            ) from None
        return self._answer(decided)

    @requires(Scope.DECISIONS_READ)
    async def next_best_value_batch(self, body: BatchRequest) -> BatchResponse:
        """Decide for many people at once (one transaction, one publish)."""
        results = await self.committer.decide(
            [
                DecisionRequest(user_id, body.channel, body.limit)
                for user_id in dict.fromkeys(body.user_ids)
            ]
        )
        return BatchResponse(
            results=[self._answer(r) for r in results if isinstance(r, Decided)],
            errors=[
                BatchError(user_id=r.user_id, error="unknown user_id")
                for r in results
                if isinstance(r, UnknownUser)
            ],
        )

    @requires(Scope.DECISIONS_READ)
    async def get_decision(self, decision_id: str) -> DecisionLog:
        """A past decision: what was eligible, what was excluded and why, the scores, the
        propensities, the model version, and the reason given for each item."""
        async with self._rt.sessions() as session:
            row = await session.get(DecisionRow, decision_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown decision {decision_id!r}")
        out = DecisionLog.model_validate(row, from_attributes=True)
        out.candidates = expand_candidates(row.candidates)
        out.explanation = [
            f"#{c.get('rank')} {c.get('element_id')} on {c.get('channel')} "
            f"(propensity {c.get('propensity')}): {c.get('reason', '')}"
            for c in row.chosen
        ]
        excluded = [c for c in out.candidates if c.get("excluded_by")]
        if excluded:
            counts: dict[str, int] = {}
            for c in excluded:
                counts[c["excluded_by"]] = counts.get(c["excluded_by"], 0) + 1
            out.explanation.append(
                "excluded: " + ", ".join(f"{n} by {rule}" for rule, n in sorted(counts.items()))
            )
        return out

    # -------------------------------------------------------------- triggers and playbooks

    async def handle_triggers(self, records: Sequence[Record]) -> None:
        """Proactive mode: each trigger (once, by its id) starts the playbooks it names and
        cancels those it ends; a trigger no playbook knows gets a ranked decision."""
        triggers: list[TriggerEvent] = []
        for record in records:
            event = decode(record.value)
            if not isinstance(event, TriggerEvent):
                raise PoisonRecord(f"not a trigger: {event.type}")
            triggers.append(event)
        async with self._rt.sessions() as session, session.begin():
            claimed = set(
                (
                    await session.execute(
                        upsert(
                            self._rt.dialect,
                            ProcessedEvent,
                            [{"consumer": TRIGGER_CONSUMER, "event_id": t.id} for t in triggers],
                            ["consumer", "event_id"],
                        ).returning(ProcessedEvent.event_id)
                    )
                ).scalars()
            )
            # Until the commit: an erasure waits, or has finished before anyone is read.
            await fence(session, exclusive=False)
            decided: list[Decided] = []
            for trigger in triggers:
                if trigger.id not in claimed:
                    continue
                claimed.discard(trigger.id)  # a batch may carry the same trigger twice
                decided.extend(await self._on_trigger(session, trigger))
            await self._log(session, decided)
            await self._publish(decided)

    async def _on_trigger(self, session: AsyncSession, trigger: TriggerEvent) -> list[Decided]:
        name = trigger.payload.trigger
        playbooks = self.engine.playbooks
        user_ids = await self._audience(session, trigger)
        now = datetime.now(UTC)
        for playbook in playbooks.cancelled_by(name):
            n = await cancel_playbook(session, playbook.name, user_ids)
            if n:
                log.info("playbook steps cancelled", extra={"playbook": playbook.name, "steps": n})
        started = playbooks.for_trigger(name)
        for playbook in started:
            for user in await audience(session, playbook, user_ids, name, now):
                await start_playbook(
                    session,
                    self._rt.dialect,
                    playbook,
                    user,
                    trigger=name,
                    trigger_id=trigger.id,
                    now=now,
                )
        if started or playbooks.cancelled_by(name):
            return []
        results = await self.engine.decide_many(
            await session.connection(),
            [DecisionRequest(user_id, None, 1, trigger=name) for user_id in user_ids],
        )
        return [r for r in results if not isinstance(r, UnknownUser)]

    async def _audience(self, session: AsyncSession, trigger: TriggerEvent) -> list[str]:
        if trigger.user_id:
            return [trigger.user_id]
        rows = await session.scalars(
            select(UserView.user_id)
            .where(UserView.account_id == trigger.account_id)
            .order_by(UserView.user_id)
            .limit(MAX_USERS_PER_ACCOUNT_TRIGGER)
        )
        return list(rows)

    async def launch(self, playbook: Playbook, body: Launch) -> Launched:
        """Start a playbook for a target list (a CSM-defined campaign)."""
        now = datetime.now(UTC)
        trigger = playbook.triggers[0]
        scheduled = 0
        async with self._rt.sessions() as session, session.begin():
            admitted = await audience(session, playbook, body.user_ids, trigger, now)
            known = set(
                await session.scalars(
                    select(UserView.user_id).where(UserView.user_id.in_(body.user_ids))
                )
            )
            for user in admitted:
                scheduled += await start_playbook(
                    session,
                    self._rt.dialect,
                    playbook,
                    user,
                    trigger=trigger,
                    trigger_id=f"campaign-{body.campaign_id}",
                    now=now,
                )
        return Launched(
            playbook=playbook.name,
            scheduled_steps=scheduled,
            unknown_users=[u for u in body.user_ids if u not in known],
        )

    async def run_step(self, job: Job) -> None:
        """One playbook step: a decision restricted to the step's element and channel, through
        every rule and the contact policy; deferred to the end of quiet hours if that is all
        that stands in the way. Idempotent: the decision id derives from the job key."""
        step = StepJob.model_validate(job.payload)
        decision_id = str(uuid.uuid5(uuid.NAMESPACE_URL, job.key))
        async with self._rt.sessions() as session:
            if await session.get(DecisionRow, decision_id) is not None:
                return  # logged and published by an earlier run of this job
            await fence(session, exclusive=False)
            try:
                decided = await self.engine.decide(
                    await session.connection(),
                    step.user_id,
                    channel=Channel(step.channel) if step.channel else None,
                    limit=1,
                    trigger=step_label(step),
                    only=[step.element],
                    decision_id=decision_id,
                )
            except UnknownUser:
                log.warning(
                    "playbook step for an unknown user", extra={"job_ref": log_ref(job.key)}
                )
                return
            if decided.deferred_until is not None:
                await schedule(
                    session,
                    self._rt.dialect,
                    key=f"{job.key}@{decided.deferred_until:%Y%m%dT%H%M}",
                    kind=STEP_JOB,
                    due_at=decided.deferred_until,
                    payload=job.payload,
                )
            await self._log(session, [decided])
            await self._publish([decided])
            await session.commit()
