"""Telemetry replay (docs/protocol.md, addition 7): a window published while nobody was
subscribed is gone from the broker (the control), and comes back when the ingest bridge's
account asks for a replay; each request is served once, and garbage is ignored."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import timedelta

from agent import protocol
from fleet.mqtt.broker import mqtt_client
from tests.conftest import wait_until


class Listener:
    """The ingest account, subscribed to one device's telemetry from now on."""

    def __init__(self, broker, device_id: str) -> None:
        self.ids: list[str] = []
        self.lock = threading.Lock()
        self.client = mqtt_client(
            broker.url,
            client_id=f"listener-{uuid.uuid4().hex[:6]}",
            username="fleet-ingest",
            password=broker.ingest_password,
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.subscribe(f"fleet/v1/devices/{device_id}/telemetry", qos=1)
        assert subscribed.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            self.ids.append(json.loads(message.payload)["id"])

    def seen(self) -> list[str]:
        with self.lock:
            return list(self.ids)

    def ask_replay(self, request: dict | bytes) -> None:
        payload = request if isinstance(request, bytes) else json.dumps(request).encode()
        self.client.publish("fleet/v1/replay", payload, qos=1, retain=True).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def clear_retained_request(broker) -> None:
    """An ingest bridge of an earlier test may have left its request retained."""
    client = mqtt_client(
        broker.url,
        client_id=f"clear-{uuid.uuid4().hex[:6]}",
        username="fleet-ingest",
        password=broker.ingest_password,
    )
    client.publish("fleet/v1/replay", b"", qos=1, retain=True).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def test_windows_nobody_received_come_back_on_a_replay_request_once(make_agent, broker):
    clear_retained_request(broker)
    agent = make_agent(telemetry_interval_s=0.2)
    wait_until(lambda: len(agent.link._recent) >= 3, timeout=10, message="three windows sent")
    unheard = [json.loads(item.payload)["id"] for _, item in list(agent.link._recent)]
    first_end = min(ended for ended, _ in agent.link._recent)

    def acknowledged() -> bool:
        # paho keeps a QoS 1 message until the broker's PUBACK; publishes are written by
        # the link's loop thread, so "in _recent" alone does not mean "at the broker" yet.
        pending = list(agent.link.client._out_messages.values())
        return not any(json.loads(message.payload).get("id") in unheard for message in pending)

    wait_until(acknowledged, timeout=10, message="the broker to acknowledge the first windows")
    listener = Listener(broker, agent.config.device_id)
    try:
        # Control: new windows arrive, the ones sent before anybody listened do not.
        wait_until(lambda: len(listener.seen()) >= 2, timeout=10, message="new windows")
        assert not set(unheard) & set(listener.seen())

        request = {"id": uuid.uuid4().hex, "since": protocol.format_time(first_end - timedelta(seconds=1))}
        listener.ask_replay(request)
        wait_until(lambda: set(unheard) <= set(listener.seen()), timeout=10, message="the replayed windows")
        assert agent.link.replays == 1

        # The same request again (the retained copy on a reconnect) is not served twice,
        # and garbage is ignored; a later window proves the agent read both.
        listener.ask_replay(request)
        listener.ask_replay(b"not json")
        seen = len(listener.seen())
        wait_until(lambda: len(listener.seen()) >= seen + 2, timeout=10, message="later windows")
        assert agent.link.replays == 1
        counts = {window: listener.seen().count(window) for window in unheard}
        assert set(counts.values()) == {1}, counts  # each old window came back exactly once
    finally:
        listener.ask_replay(b"")  # clear the retained request for later tests
        listener.close()
