"""The relational store: one set of SQLAlchemy models for PostgreSQL and embedded SQLite."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone on its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
        list[Any]: JSONType,
    }


class ProcessedEvent(Base):
    """Idempotency ledger: which consumer already applied which event id."""

    __tablename__ = "processed_events"
    consumer: Mapped[str] = mapped_column(String(50), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    # Indexed for the raw-event retention purge (services/ingest/retention.py).
    processed_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class UserView(Base):
    __tablename__ = "user_views"
    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(200), index=True)
    email: Mapped[str | None] = mapped_column(String(320))
    name: Mapped[str | None] = mapped_column(String(200))
    role: Mapped[str | None] = mapped_column(String(50))
    timezone: Mapped[str | None] = mapped_column(String(64))
    first_seen: Mapped[datetime]
    last_seen: Mapped[datetime]
    event_count: Mapped[int] = mapped_column(Integer, default=0)
    event_counts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    track_events: Mapped[dict[str, Any]] = mapped_column(default=dict)
    feature_usage: Mapped[dict[str, Any]] = mapped_column(default=dict)
    last_nps: Mapped[int | None] = mapped_column(Integer)
    last_nps_at: Mapped[datetime | None]
    # element id -> time it was completed / dismissed
    achieved: Mapped[dict[str, Any]] = mapped_column(default=dict)
    dismissed: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The full single customer view (services/ingest/view.py, docs/ingest.md).
    daily_usage: Mapped[dict[str, Any]] = mapped_column(default=dict)
    last_active: Mapped[datetime | None]
    area_events: Mapped[dict[str, Any]] = mapped_column(default=dict)
    quiz_scores: Mapped[dict[str, Any]] = mapped_column(default=dict)
    support_questions: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Per-area recency (migration 0002): area -> day -> usage, area -> newest ticket time.
    area_daily_usage: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    area_last_question: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    tickets_opened: Mapped[int] = mapped_column(Integer, default=0)
    last_csat: Mapped[int | None] = mapped_column(Integer)
    last_csat_at: Mapped[datetime | None]
    csat_sum: Mapped[float] = mapped_column(Float, default=0.0)
    csat_count: Mapped[int] = mapped_column(Integer, default=0)
    offered: Mapped[dict[str, Any]] = mapped_column(default=dict)
    interventions: Mapped[list[Any]] = mapped_column(default=list)
    crm_roles: Mapped[list[Any]] = mapped_column(default=list)
    left_at: Mapped[datetime | None]
    milestones: Mapped[dict[str, Any]] = mapped_column(default=dict)
    identified_at: Mapped[datetime | None]
    role_at: Mapped[datetime | None]


class AccountView(Base):
    __tablename__ = "account_views"
    account_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    plan: Mapped[str | None] = mapped_column(String(100))
    subscription_status: Mapped[str | None] = mapped_column(String(20))
    mrr: Mapped[float | None] = mapped_column(Float)
    renewal_date: Mapped[datetime | None]
    first_seen: Mapped[datetime]
    last_seen: Mapped[datetime]
    event_count: Mapped[int] = mapped_column(Integer, default=0)
    open_tickets: Mapped[dict[str, Any]] = mapped_column(default=dict)
    last_nps: Mapped[int | None] = mapped_column(Integer)
    last_nps_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    name: Mapped[str | None] = mapped_column(String(200))
    subscription_id: Mapped[str | None] = mapped_column(String(200))
    customer_id: Mapped[str | None] = mapped_column(String(200))
    billing_updated_at: Mapped[datetime | None]
    contract_signed_at: Mapped[datetime | None]
    payment_failures: Mapped[int] = mapped_column(Integer, default=0)
    last_payment_failed_at: Mapped[datetime | None]
    invoices_paid: Mapped[int] = mapped_column(Integer, default=0)
    last_invoice_paid_at: Mapped[datetime | None]
    user_count: Mapped[int] = mapped_column(Integer, default=0)
    daily_usage: Mapped[dict[str, Any]] = mapped_column(default=dict)
    daily_active_users: Mapped[dict[str, Any]] = mapped_column(default=dict)
    feature_usage: Mapped[dict[str, Any]] = mapped_column(default=dict)
    area_last_used: Mapped[dict[str, Any]] = mapped_column(default=dict)
    tickets_daily: Mapped[dict[str, Any]] = mapped_column(default=dict)
    tickets_total: Mapped[int] = mapped_column(Integer, default=0)
    solved_tickets: Mapped[dict[str, Any]] = mapped_column(default=dict)
    csat_sum: Mapped[float] = mapped_column(Float, default=0.0)
    csat_count: Mapped[int] = mapped_column(Integer, default=0)
    last_csat: Mapped[int | None] = mapped_column(Integer)
    last_csat_at: Mapped[datetime | None]
    contacts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    responses: Mapped[dict[str, Any]] = mapped_column(default=dict)
    health_score: Mapped[float | None] = mapped_column(Float)
    health_band: Mapped[str | None] = mapped_column(String(10))
    health_components: Mapped[dict[str, Any]] = mapped_column(default=dict)
    engagement_score: Mapped[float | None] = mapped_column(Float)
    engagement_components: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Intervention(Base):
    """A response to a delivered element: the view's history and the ranker's label."""

    __tablename__ = "interventions"
    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    decision_id: Mapped[str] = mapped_column(String(200), index=True)
    user_id: Mapped[str] = mapped_column(String(200), index=True)
    account_id: Mapped[str] = mapped_column(String(200))
    element_id: Mapped[str] = mapped_column(String(200))
    outcome: Mapped[str] = mapped_column(String(20))
    channel: Mapped[str] = mapped_column(String(20))
    at: Mapped[datetime]


class ValueElementRow(Base):
    __tablename__ = "value_elements"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    library_version: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]]
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class DecisionRow(Base):
    """Every decision with what was eligible, the scores and propensities (for off-policy use)."""

    __tablename__ = "decisions"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200), index=True)
    account_id: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    channel: Mapped[str | None] = mapped_column(String(20))
    trigger: Mapped[str | None] = mapped_column(String(100))
    policy: Mapped[str] = mapped_column(String(100))
    model_version: Mapped[str] = mapped_column(String(100))
    context: Mapped[dict[str, Any]]
    candidates: Mapped[list[Any]]
    chosen: Mapped[list[Any]]


class InboxItem(Base):
    __tablename__ = "inbox_items"
    __table_args__ = (
        UniqueConstraint("user_id", "element_id"),
        Index("ix_inbox_user_status", "user_id", "status"),
    )
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200))
    account_id: Mapped[str] = mapped_column(String(200))
    element_id: Mapped[str] = mapped_column(String(200))
    decision_id: Mapped[str] = mapped_column(String(200))
    rank: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    content: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Times the card was reported shown since it was last offered (or came back from a snooze),
    # and why it was closed when nobody answered it (impression capping).
    impressions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    closed_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class ScheduledJob(Base):
    """A durable timer. ``key`` is the idempotency key: scheduling the same key twice is a no-op,
    and a job's work is published under its key, so a re-run after a crash is deduplicated."""

    __tablename__ = "scheduled_jobs"
    __table_args__ = (Index("ix_scheduled_jobs_due", "status", "due_at"),)
    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    kind: Mapped[str] = mapped_column(String(100))
    due_at: Mapped[datetime]
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class Delivery(Base):
    """The delivery ledger: one row per decision × element × requested channel, written before
    anything is sent, so a redelivered decision finds its row and sends nothing twice."""

    __tablename__ = "deliveries"
    __table_args__ = (
        Index("ix_deliveries_status", "status", "updated_at"),
        Index("ix_deliveries_user", "user_id", "element_id"),
    )
    id: Mapped[str] = mapped_column(String(300), primary_key=True)
    decision_id: Mapped[str] = mapped_column(String(200), index=True)
    user_id: Mapped[str] = mapped_column(String(200))
    account_id: Mapped[str] = mapped_column(String(200))
    element_id: Mapped[str] = mapped_column(String(200))
    requested_channel: Mapped[str] = mapped_column(String(20))
    # The channel actually used after preferences and fallbacks; None when skipped.
    channel: Mapped[str | None] = mapped_column(String(20))
    # pending → sent | failed (a retry is scheduled) → sent | dead; skipped (nowhere allowed)
    status: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text, default="")
    # What a resend needs: the decided item and the decision's context.
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]
    next_attempt_at: Mapped[datetime | None]


class ChannelPreference(Base):
    """A person's preference centre: channels, quiet hours and opt-outs."""

    __tablename__ = "channel_preferences"
    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    channels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    quiet_hours: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    opted_out_kinds: Mapped[list[Any]] = mapped_column(default=list)
    opted_out_elements: Mapped[list[Any]] = mapped_column(default=list)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class LibraryVersion(Base):
    """History of the Value Element library: every import or admin edit is a new version,
    with a snapshot of the elements active from then on."""

    __tablename__ = "library_versions"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    element_count: Mapped[int] = mapped_column(Integer)
    elements: Mapped[list[Any]]


class Contact(Base):
    """One offered item of a logged decision (decision × element), written with the decision:
    the history the contact policy counts (caps per channel, cool-downs, CSM load)."""

    __tablename__ = "contacts"
    __table_args__ = (
        Index("ix_contacts_user_at", "user_id", "at"),
        Index("ix_contacts_csm_at", "csm_id", "channel", "at"),
    )
    decision_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    element_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200))
    account_id: Mapped[str] = mapped_column(String(200))
    csm_id: Mapped[str | None] = mapped_column(String(200))
    channel: Mapped[str] = mapped_column(String(20))
    at: Mapped[datetime]


class UserAccount(Base):
    """Which account a user belongs to, from Segment ``group`` calls (and any event that names
    both): lets a later ``track`` without ``context.groupId`` find its account."""

    __tablename__ = "user_accounts"
    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    """A trained ranker in the registry. The artifact itself (LightGBM's text format) lives
    here, so every decision replica on any host loads the same model from the store."""

    __tablename__ = "model_versions"
    version: Mapped[str] = mapped_column(String(100), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    registered_by: Mapped[str] = mapped_column(String(200))
    trained_at: Mapped[datetime | None]
    data_from: Mapped[datetime | None]
    data_until: Mapped[datetime | None]
    features: Mapped[list[Any]]
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # Deferred: listing versions must not drag megabytes of trees over the wire.
    model_text: Mapped[str] = mapped_column(Text, deferred=True)
    model_sha256: Mapped[str] = mapped_column(String(64))
    # candidate (never served) | champion | challenger | retired (served before, not now)
    status: Mapped[str] = mapped_column(String(20), default="candidate")


class ModelAssignment(Base):
    """Which models serve: one row per change, the highest id in force. The history says who
    changed what and when, and lets a rollback find the champion that came before."""

    __tablename__ = "model_assignments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    # None: the rule prior.
    champion: Mapped[str | None] = mapped_column(String(100))
    challenger: Mapped[str | None] = mapped_column(String(100))
    challenger_share: Mapped[float] = mapped_column(Float, default=0.0)
    # Hashed with the user id to route a stable share of people to the challenger.
    salt: Mapped[str] = mapped_column(String(200), default="")
    action: Mapped[str] = mapped_column(String(20))
    changed_by: Mapped[str] = mapped_column(String(200))
    changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    reason: Mapped[str] = mapped_column(Text, default="")
    # The assignment whose champion a rollback restores (None: back to the rule prior).
    rollback_to: Mapped[int | None] = mapped_column(Integer)


class Erasure(Base):
    """The erasure ledger: who was erased (``DELETE /v1/users/{id}``), by pseudonym only, so
    the projector can drop their events when the topic is replayed (docs/privacy.md)."""

    __tablename__ = "erasures"
    # HMAC-SHA256 of the user id (services/ingest/erasure.py), never the id itself.
    pseudonym: Mapped[str] = mapped_column(String(100), primary_key=True)
    erased_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key (shared/access). Only the SHA-256 of the key is kept: the key itself is shown
    once, when it is created. ``scopes`` lists shared.access.scopes.Scope values."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    # The key's first characters, to recognise it in a list ("nbv_sk_AbC123…").
    prefix: Mapped[str] = mapped_column(String(20))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[Any]]
    # Requests per second (per process); None: NBV_RATE_LIMIT_PER_S.
    rate_limit: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    # Updated at most once a minute per process, off the request path.
    last_used_at: Mapped[datetime | None]
