"""Runtime settings, read from the environment (prefix ``NBV_``)."""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class BusKind(StrEnum):
    KAFKA = "kafka"
    EMBEDDED = "embedded"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NBV_", env_file=None, extra="ignore")

    bus: BusKind = BusKind.EMBEDDED
    # Empty means: the embedded SQLite store under data_dir.
    database_url: str = ""
    data_dir: Path = Path(".nbv/data")
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_client_id: str = "nbv"
    kafka_partitions: int = Field(default=3, ge=1)
    kafka_request_timeout_ms: int = Field(default=15_000, ge=1_000)
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
