"""Publishing signed desired states to devices (retained, QoS 1), and the fleet's trust
bundle, as the control plane's publisher service account. The broker's ACL lets that
account write ``…/desired`` and ``…/trust`` only."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import paho.mqtt.client as mqtt
from django.conf import settings

from agent.protocol import Topics
from fleet.core import metrics
from fleet.mqtt.broker import BrokerError, mqtt_client

# How a Celery task that publishes retries when the broker is away: with backoff, up to a
# minute apart, ten times (re-publishing a retained message is harmless).
PUBLISH_RETRY = {
    "autoretry_for": (BrokerError, OSError),
    "retry_backoff": True,
    "retry_backoff_max": 60,
    "max_retries": 10,
}


def topics() -> Topics:
    return Topics(settings.MQTT_TOPIC_PREFIX)


@contextmanager
def _publisher() -> Iterator[mqtt.Client]:
    client = mqtt_client(
        settings.MQTT_URL,
        client_id=f"fleet-publisher-{uuid.uuid4().hex[:8]}",
        username=settings.MQTT_PUBLISHER_USERNAME,
        password=settings.MQTT_PUBLISHER_PASSWORD,
        ca_file=settings.MQTT_CA_FILE,
    )
    try:
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def _retain_all(client: mqtt.Client, messages: Iterable[tuple[str, bytes]], timeout_s: float) -> int:
    """Publish retained at QoS 1 and wait until the broker has acknowledged every one."""
    pending = [client.publish(topic, payload, qos=1, retain=True) for topic, payload in messages]
    for info in pending:
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise BrokerError("the broker did not acknowledge a retained message in time")
    return len(pending)


def publish_desired(envelopes: Iterable[tuple[str, bytes]], *, timeout_s: float = 30.0) -> int:
    """Publish ``(device_id, envelope)`` pairs retained. Re-publishing the same generation
    is harmless: the agent ignores a generation it has already applied."""
    with _publisher() as client:
        published = _retain_all(
            client, ((topics().desired(device_id), envelope) for device_id, envelope in envelopes), timeout_s
        )
    metrics.DESIRED_PUBLISHED.inc(published)
    return published


def publish_trust(bundle: bytes, *, timeout_s: float = 30.0) -> None:
    """Publish the trust bundle retained on the fleet's trust topic (docs/protocol.md,
    addition 6)."""
    with _publisher() as client:
        _retain_all(client, [(topics().trust(), bundle)], timeout_s)
