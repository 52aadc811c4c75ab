"""Runtime settings, read from the environment (prefix ``NBV_``)."""

from __future__ import annotations

import json
from datetime import timedelta
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class BusKind(StrEnum):
    KAFKA = "kafka"
    EMBEDDED = "embedded"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NBV_", env_file=None, extra="ignore")

    bus: BusKind = BusKind.EMBEDDED
    # Empty means: the embedded SQLite store under data_dir.
    database_url: str = ""
    # Connections per process kept open (PostgreSQL): size it to the requests a process serves
    # at once, since a connection opened beyond it is closed again when returned, and opening
    # one costs several round trips. Up to the same number again opens under bursts.
    db_pool_size: int = Field(default=30, ge=1, le=500)
    data_dir: Path = Path(".nbv/data")
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_client_id: str = "nbv"
    kafka_partitions: int = Field(default=3, ge=1)
    kafka_request_timeout_ms: int = Field(default=15_000, ge=1_000)
    # How long the producer waits for more messages before sending (see shared/bus/kafka.py).
    kafka_linger_ms: int = Field(default=0, ge=0, le=1_000)
    topic_prefix: str = "nbv."

    host: str = "127.0.0.1"
    port: int = 8000
    # Which services this process runs: any of ingest, decision, delivery.
    services: list[str] = ["ingest", "decision", "delivery"]
    auto_migrate: bool = True

    log_level: str = "INFO"
    consumer_batch_size: int = Field(default=500, ge=1)
    consumer_poll_ms: int = Field(default=200, ge=1)
    max_batch_events: int = Field(default=1_000, ge=1)

    library_path: Path | None = None
    model_dir: Path = Path("models/registry")
    exploration_epsilon: float = Field(default=0.1, ge=0.0, le=1.0)
    decision_seed: int | None = None

    # Delivery: email (SMTP), tracked links, the CSM webhook, retries and the live inbox.
    public_url: str = "http://127.0.0.1:8000"
    product_name: str = "your workspace"
    product_url: str = Field(default="", description="base for relative resource links")
    signing_secret: SecretStr = SecretStr("")
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    smtp_from: str = "NBV <nbv@localhost>"
    smtp_timeout_s: float = Field(default=10.0, gt=0)
    csm_webhook_url: str = ""
    csm_webhook_format: Literal["json", "slack"] = "json"
    webhook_secret: SecretStr = SecretStr("")
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    csm_sla_hours: int = Field(default=48, ge=1)
    delivery_max_attempts: int = Field(default=8, ge=1)
    delivery_retry_base_s: float = Field(default=2.0, gt=0)
    delivery_retry_max_s: float = Field(default=600.0, gt=0)
    delivery_poll_s: float = Field(default=0.25, gt=0)
    inbox_stream_poll_s: float = Field(default=1.0, gt=0)
    inbox_stream_keepalive_s: float = Field(default=15.0, gt=0)
    snooze_hours: float = Field(default=24.0, gt=0)
    # Impression capping (docs/delivery.md): an in-app card shown this many times without an
    # answer is withdrawn, so the widget's slot goes to a fresh decision; 0 keeps cards open
    # until the person answers them.
    inapp_impression_cap: int = Field(default=3, ge=0)
    # How long the decision service holds back an element whose card was withdrawn.
    inapp_withdrawn_cooldown_days: float = Field(default=14.0, ge=0)

    # Decision engine: exploration, hot reloads and the contact policy (docs/decision.md).
    exploration_policy: Literal["epsilon_greedy", "softmax"] = "epsilon_greedy"
    exploration_temperature: float = Field(default=0.1, gt=0)
    model_poll_s: float = Field(default=5.0, gt=0)
    library_poll_s: float = Field(default=5.0, gt=0)
    playbook_dir: Path | None = None
    # Items per person per channel; a channel not listed is not capped.
    contact_cap_per_day: dict[str, int] = {"email": 1, "csm": 1, "in_app": 30}
    contact_cap_per_week: dict[str, int] = {"email": 3, "csm": 2, "in_app": 100}
    dismissal_suppression_hours: float = Field(default=72.0, ge=0)
    quiet_hours_start: str = Field(default="21:00", pattern=r"^\d{2}:\d{2}$")
    quiet_hours_end: str = Field(default="08:00", pattern=r"^\d{2}:\d{2}$")
    csm_alerts_per_day: int = Field(default=20, ge=0)
    # Account → CSM owner; accounts not listed belong to csm_default_owner.
    csm_owners: dict[str, str] = {}
    csm_default_owner: str = "cs-team"
    # Chosen items whose reason cites the model's SHAP contributions (about 0.05 ms per item on
    # the bench's 200-tree model: models/treeshap.py); the others cite the rule prior's factors.
    decision_explain_items: int = Field(default=1, ge=0, le=20)
    # Connections a decision service on PostgreSQL keeps out of the pool for its batches (at
    # most this many decide and log at once; shared.store.lending); capped at db_pool_size.
    decision_read_connections: int = Field(default=16, ge=1, le=200)
    # Concurrent requests are decided and logged in batches (services/decision/batching.py,
    # group_commit.py): at most this many batches at once, of at most decision_batch_max
    # requests each, one transaction each. A batch spends about half its time waiting on
    # PostgreSQL and Kafka: with two, the worker sat idle at full load a quarter of the time.
    decision_readers: int = Field(default=3, ge=1, le=64)
    # ... but a second batch starts only once this many requests wait: below it, one batch at
    # a time costs less CPU per decision than several small ones (batching.py).
    decision_reader_backlog: int = Field(default=8, ge=1, le=256)
    decision_batch_max: int = Field(default=32, ge=1, le=256)

    # Ingest: sources, the customer view's windows and scores, triggers (docs/ingest.md).
    stripe_webhook_secret: SecretStr = SecretStr("")
    stripe_tolerance_s: int = Field(default=300, ge=1)
    # How late an event may arrive and still be counted in its own day's usage bucket.
    max_lateness: timedelta = timedelta(days=2)
    inactivity_days: int = Field(default=7, ge=1)
    usage_drop_pct: float = Field(default=50.0, gt=0, le=100)
    ticket_spike_7d: int = Field(default=3, ge=1)
    renewal_notice_days: list[int] = [180, 120, 90]
    onboarding_check_days: int = Field(default=30, ge=1)
    health_weights: dict[str, float] = {
        "usage_breadth": 0.2,
        "usage_depth": 0.25,
        "payment": 0.2,
        "support": 0.15,
        "sentiment": 0.2,
    }
    engagement_weights: dict[str, float] = {
        "active_users": 0.35,
        "active_days": 0.3,
        "trend": 0.15,
        "responsiveness": 0.2,
    }
    health_red_below: float = Field(default=40.0, ge=0, le=100)
    health_green_from: float = Field(default=70.0, ge=0, le=100)
    ingest_scheduler_poll_s: float = Field(default=1.0, gt=0)
    # Rows (per view table) the projector keeps in memory between batches; PostgreSQL only.
    projector_cache_rows: int = Field(default=50_000, ge=0)
    # Allocations between young garbage collections in server processes (Python's default
    # is 700); 0 keeps the default. See services/cli.py.
    gc_threshold: int = Field(default=50_000, ge=0)

    # Operations: how often each consumer reports its lag (nbv_consumer_lag_records).
    consumer_lag_interval_s: float = Field(default=10.0, gt=0)

    # HTTP: the largest request body accepted; bigger ones get 413 before being buffered.
    max_body_bytes: int = Field(default=1_048_576, ge=1_024)

    # Access (docs/security.md). The bootstrap admin key: every scope and no rate limit, for
    # first use, deployments and tests; empty: only keys made by `nbv keys create` open the API.
    admin_key: SecretStr = SecretStr("")
    # The key NBV's own HTTP clients send (`nbv ingest --url`, `nbv simulate`); empty: admin_key.
    api_key: SecretStr = SecretStr("")
    # How long a key lookup is cached in each process: a revoked key still works that long.
    key_cache_ttl_s: float = Field(default=5.0, gt=0, le=300)
    # Each key's token bucket, per process; a key's own rate_limit replaces the rate (with a
    # burst of twice that). 0: keys without their own limit are not limited.
    rate_limit_per_s: float = Field(default=100.0, ge=0)
    rate_limit_burst: float = Field(default=200.0, ge=1)
    # Origins whose pages may call the API (the widget's host app): a comma-separated list or
    # a JSON array. Empty: no cross-origin calls.
    cors_origins: Annotated[list[str], NoDecode] = []

    # Privacy (docs/privacy.md). The key of the pseudonyms erased people keep in the decision
    # log and the erasure ledger; empty means signing_secret. It must never change once used.
    pseudonym_secret: SecretStr = SecretStr("")
    # Raw events older than this are purged (events topic retention, embedded log, idempotency
    # ledger); 0 keeps them forever.
    raw_event_retention_days: int = Field(default=90, ge=0)
    retention_purge_batch: int = Field(default=5_000, ge=1)

    @field_validator("admin_key")
    @classmethod
    def _admin_key_strength(cls, value: SecretStr) -> SecretStr:
        if 0 < len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters (`nbv keys generate` makes one)")
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origin_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else text.split(",")
        if isinstance(value, list):
            return [str(o).strip().rstrip("/") for o in value if str(o).strip()]
        return value

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'nbv.sqlite').resolve()}"

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
