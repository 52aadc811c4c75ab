"""Bus construction from settings."""

from __future__ import annotations

from shared.bus.base import Bus, Consumer, Message, Record
from shared.settings import BusKind, Settings

TOPIC_NAMES = ("events", "triggers", "decisions", "dead-letter")


def all_topics(settings: Settings) -> list[str]:
    return [settings.topic(name) for name in TOPIC_NAMES]


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Topic settings NBV applies when it creates its topics: the events topic (the raw events)
    is kept for NBV_RAW_EVENT_RETENTION_DAYS (-1: forever); the others keep the broker's
    default retention."""
    days = settings.raw_event_retention_days
    retention_ms = days * 86_400_000 if days else -1
    return {settings.topic("events"): {"retention.ms": str(retention_ms)}}


def create_bus(settings: Settings) -> Bus:
    if settings.bus is BusKind.KAFKA:
        from shared.bus.kafka import KafkaBus

        return KafkaBus(
            settings.kafka_bootstrap,
            client_id=settings.kafka_client_id,
            partitions=settings.kafka_partitions,
            topics=all_topics(settings),
            request_timeout_ms=settings.kafka_request_timeout_ms,
            topic_configs=topic_configs(settings),
            linger_ms=settings.kafka_linger_ms,
        )
    from shared.bus.embedded import EmbeddedBus

    return EmbeddedBus(settings.data_dir / "bus.sqlite")


__all__ = ["Bus", "Consumer", "Message", "Record", "all_topics", "create_bus", "topic_configs"]
