"""Publishing signed desired states to devices (retained, QoS 1), as the control plane's
publisher service account. The broker's ACL lets that account write ``…/desired`` only."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from django.conf import settings

from agent.protocol import Topics
from fleet.mqtt.broker import BrokerError, mqtt_client


def topics() -> Topics:
    return Topics(settings.MQTT_TOPIC_PREFIX)


def publish_desired(envelopes: Iterable[tuple[str, bytes]], *, timeout_s: float = 30.0) -> int:
    """Publish ``(device_id, envelope)`` pairs retained and wait until the broker has
    acknowledged every one. Re-publishing the same generation is harmless: the agent
    ignores a generation it has already applied."""
    client = mqtt_client(
        settings.MQTT_URL,
        client_id=f"fleet-publisher-{uuid.uuid4().hex[:8]}",
        username=settings.MQTT_PUBLISHER_USERNAME,
        password=settings.MQTT_PUBLISHER_PASSWORD,
        ca_file=settings.MQTT_CA_FILE,
    )
    try:
        pending = [
            client.publish(topics().desired(device_id), envelope, qos=1, retain=True)
            for device_id, envelope in envelopes
        ]
        for info in pending:
            info.wait_for_publish(timeout_s)
            if not info.is_published():
                raise BrokerError("the broker did not acknowledge a desired state in time")
        return len(pending)
    finally:
        client.disconnect()
        client.loop_stop()
