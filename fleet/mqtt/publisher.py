"""Publishing signed desired states to devices (retained, QoS 1), and the fleet's trust
bundle, as the control plane's publisher service account. The broker's ACL lets that
account write ``…/desired`` and ``…/trust`` only."""

from __future__ import annotations

import os
import threading
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


# One connection per process, kept between publishes: a worker publishing a rollout's
# chunks one after another no longer connects and disconnects for each (docs/benchmarks.md,
# "Rollout fan-out"). Keyed by the login so that a changed setting makes a new one, and by
# the process id so that a forked worker never shares its parent's socket.
_clients: dict[tuple, mqtt.Client] = {}
_clients_lock = threading.Lock()


def _login() -> tuple:
    return (
        os.getpid(),
        settings.MQTT_URL,
        settings.MQTT_PUBLISHER_USERNAME,
        settings.MQTT_PUBLISHER_PASSWORD,
        settings.MQTT_CA_FILE,
    )


def _client(login: tuple) -> mqtt.Client:
    with _clients_lock:
        client = _clients.get(login)
        if client is None:
            for stale in [key for key in _clients if key[0] == login[0]]:  # another login: one at a time
                old = _clients.pop(stale)
                old.disconnect()
                old.loop_stop()
            _, url, username, password, ca_file = login
            client = mqtt_client(
                url,
                client_id=f"fleet-publisher-{uuid.uuid4().hex[:8]}",
                username=username,
                password=password,
                ca_file=ca_file,
            )
            _clients[login] = client
        return client


def publisher_close() -> None:
    """Disconnect this process's kept publishers (tests, shutdown)."""
    with _clients_lock:
        clients = [client for (pid, *_), client in _clients.items() if pid == os.getpid()]
        _clients.clear()
    for client in clients:
        client.disconnect()
        client.loop_stop()


@contextmanager
def _publisher() -> Iterator[mqtt.Client]:
    """This process's publisher; dropped (and made again next time) after any failure, so a
    broker that went away or a changed password is met with a fresh connection."""
    login = _login()
    client = _client(login)
    try:
        yield client
    except BaseException:
        with _clients_lock:
            if _clients.get(login) is client:
                del _clients[login]
        client.disconnect()
        client.loop_stop()
        raise


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
