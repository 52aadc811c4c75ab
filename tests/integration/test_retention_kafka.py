"""On a real broker, NBV creates the events topic (the raw events) with the retention of
NBV_RAW_EVENT_RETENTION_DAYS; the derived topics keep the broker's default."""

from __future__ import annotations

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from shared.bus import all_topics, create_bus
from shared.settings import BusKind, Settings

pytestmark = pytest.mark.integration


async def test_events_topic_is_created_with_the_raw_event_retention(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = Settings(
        bus=BusKind.KAFKA,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        raw_event_retention_days=30,
    )
    bus = create_bus(settings)
    await bus.start()
    await bus.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        names = [settings.topic("events"), settings.topic("decisions")]
        (response,) = await admin.describe_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, n, configs={"retention.ms": None})
                for n in names
            ]
        )
        # (error code, message, type, name, [(config, value, read only, source, …)])
        retention = {
            resource[3]: {entry[0]: (entry[1], entry[3]) for entry in resource[4]}["retention.ms"]
            for resource in response.resources
        }
        # Set on the topic (source 1: a dynamic topic config) to 30 days.
        assert retention[names[0]] == (str(30 * 86_400_000), 1)
        assert retention[names[1]][1] != 1  # the broker's default, not set by NBV
        await admin.delete_topics(all_topics(settings))
    finally:
        await admin.close()
