"""The agent's MQTT link (ARCHITECTURE.md, "MQTT topics"), paho-mqtt 2.x behind a small
interface.

* client id = device id, MQTT v5 with a persistent session (clean_start false plus a
  session expiry), QoS 1 everywhere;
* a retained ``status`` of ``{"online": true}`` on connect, and the same topic as a retained
  last will ``{"online": false}`` so the plane learns of a power cut;
* subscribes to its own ``desired`` and the fleet's retained ``trust`` bundle only (the
  broker ACL refuses anything else anyway);
* reconnects with exponential backoff and full jitter, so a fleet that lost its broker
  does not reconnect in lockstep;
* messages published while offline wait in a queue bounded by count and bytes; when full
  the oldest is dropped and counted, and the count is reported in telemetry.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import __version__, runtime
from agent.config import Config
from agent.protocol.schemas import RUNTIME_VERSION_PATTERN, format_time, parse_time
from agent.protocol.topics import Topics

log = logging.getLogger(__name__)

REPLAY_ID_MAX = 64
# Replayed windows go out at this pace, beside the device's own traffic: under the ingest
# bridge's per-device rate (INGEST_DEVICE_RATE, 5/s), whose excess it drops.
REPLAY_PER_SECOND = 2.0


def parse_replay(payload: bytes) -> tuple[str, datetime] | None:
    """(request id, since) of a replay request ``{"id": str, "since": RFC 3339}``, or None
    when it is not one (docs/protocol.md, addition 7)."""
    try:
        data = json.loads(payload)
        request_id, since = data["id"], parse_time(data["since"])
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(request_id, str) or not 0 < len(request_id) <= REPLAY_ID_MAX:
        return None
    return request_id, since


@dataclass
class Outgoing:
    topic: str
    payload: bytes
    retain: bool = False


class OfflineQueue:
    """FIFO bounded by message count and total bytes; drops the oldest when full."""

    def __init__(self, *, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._items: collections.deque[Outgoing] = collections.deque()
        self._bytes = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def put(self, item: Outgoing) -> None:
        with self._lock:
            self._items.append(item)
            self._bytes += len(item.payload)
            while self._items and (len(self._items) > self.max_messages or self._bytes > self.max_bytes):
                old = self._items.popleft()
                self._bytes -= len(old.payload)
                self.dropped += 1

    def take_all(self) -> list[Outgoing]:
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._bytes = 0
            return items

    def __len__(self) -> int:
        return len(self._items)


class MqttLink:
    def __init__(
        self,
        config: Config,
        *,
        on_desired: Callable[[bytes], None],
        on_trust: Callable[[bytes], None] | None = None,
    ) -> None:
        self.config = config
        self._capabilities = self._device_capabilities()
        self.topics = Topics(config.broker.topic_prefix)
        self.device_id = config.device_id
        self.on_desired = on_desired
        self.on_trust = on_trust
        limits = config.limits
        self.queue = OfflineQueue(
            max_messages=limits.offline_queue_messages, max_bytes=limits.offline_queue_bytes
        )
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._publish_lock = threading.Lock()
        # docs/protocol.md, addition 7: telemetry recently sent, (window end, message), sent
        # again when the ingest bridge asks because its broker may have lost it.
        self._recent: collections.deque[tuple[datetime, Outgoing]] = collections.deque(
            maxlen=limits.replay_windows
        )
        self._replayed: str | None = None  # the last replay request handled
        self._replay_pending: collections.deque[Outgoing] = collections.deque()
        self._replay_wakeup = threading.Event()
        self._replay_thread: threading.Thread | None = None
        self.replays = 0
        self.client = self._make_client()
        self.connects = 0

    def _status(self, online: bool) -> bytes:
        return json.dumps(
            {
                "online": online,
                "agent_version": __version__,
                "ts": format_time(datetime.now(UTC)),
                "capabilities": self._capabilities,
            }
        ).encode()

    def _device_capabilities(self) -> dict[str, Any]:
        """What this device can run (docs/protocol.md, addition 10): the control plane
        picks the variant it gets from these, so it is never sent one it would refuse."""
        device = self.config.device
        capabilities: dict[str, Any] = {
            "hardware": device.hardware,
            "int8": device.int8,
            "unsupported_ops": list(device.unsupported_ops),
        }
        try:
            rt = runtime.runtime()
        except runtime.RuntimeLoadError:
            return capabilities
        capabilities["runtime"] = rt.name
        if re.fullmatch(RUNTIME_VERSION_PATTERN, rt.version):
            capabilities["runtime_version"] = rt.version
        return capabilities

    def _make_client(self) -> mqtt.Client:
        broker = self.config.broker
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,  # we reconnect ourselves, with jitter
        )
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            client.tls_set(ca_certs=str(broker.ca_file) if broker.ca_file else None)
        client.will_set(self.topics.device(self.device_id, "status"), self._status(False), qos=1, retain=True)
        # An exception in a callback is logged, and never ends the network thread (a device
        # that stops hearing its control plane would look alive to the watchdog).
        client.suppress_exceptions = True
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.message_callback_add(self.topics.desired(self.device_id), self._on_desired)
        client.message_callback_add(self.topics.trust(), self._on_trust)
        client.message_callback_add(self.topics.replay(), self._on_replay)
        return client

    # --- paho callbacks (network thread)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("mqtt connect refused: %s", reason_code)
            return
        self.connects += 1
        # One SUBSCRIBE, trust first: the broker sends retained messages in the order of
        # the filters, so the keyring is in place before the desired state it verifies.
        client.subscribe(
            [(self.topics.trust(), 1), (self.topics.desired(self.device_id), 1), (self.topics.replay(), 1)]
        )
        client.publish(self.topics.device(self.device_id, "status"), self._status(True), qos=1, retain=True)
        self.connected.set()
        for item in self.queue.take_all():
            self._send(item)
        self._replay_wakeup.set()  # resume a replay the disconnect interrupted
        log.info("mqtt connected to %s (session present: %s)", self.config.broker.url, flags.session_present)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("mqtt disconnected: %s", reason_code)

    def _on_message(self, client, userdata, message) -> None:
        log.warning("ignoring message on unexpected topic %s", message.topic)

    def _on_desired(self, client, userdata, message) -> None:
        if message.payload:
            self.on_desired(bytes(message.payload))

    def _on_trust(self, client, userdata, message) -> None:
        if message.payload and self.on_trust is not None:
            self.on_trust(bytes(message.payload))

    def _on_replay(self, client, userdata, message) -> None:
        """Send again the telemetry windows that ended at or after ``since``, once per
        request id (the request is retained: every reconnect sees it again). The bridge
        drops the windows it has by their id, so sending one twice costs only bandwidth."""
        if not message.payload:
            return  # a cleared retained request
        request = parse_replay(message.payload)
        if request is None:
            log.warning("ignoring a malformed replay request on %s", message.topic)
            return
        request_id, since = request
        with self._publish_lock:
            if request_id == self._replayed:
                return
            self._replayed = request_id
            # A newer request replaces what an older one had left to send.
            self._replay_pending = collections.deque(item for ended, item in self._recent if ended >= since)
            count = len(self._replay_pending)
        self.replays += 1
        self._replay_wakeup.set()
        log.info("replay %s: sending %d telemetry window(s) again", request_id, count)

    def _replay_loop(self) -> None:
        """Send pending replayed windows at REPLAY_PER_SECOND while connected."""
        while not self._stop.is_set():
            self._replay_wakeup.wait()
            with self._publish_lock:
                if not self._replay_pending or not self.connected.is_set():
                    self._replay_wakeup.clear()  # set again by a request or a (re)connect
                    if self._replay_pending and self.connected.is_set():
                        self._replay_wakeup.set()  # connected meanwhile
                    continue
                self._send(self._replay_pending.popleft())
            self._stop.wait(1 / REPLAY_PER_SECOND)

    # --- publishing

    def _send(self, item: Outgoing) -> None:
        info = self.client.publish(item.topic, item.payload, qos=1, retain=item.retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            # Lost the connection between the check and the publish: keep it for later.
            self.queue.put(item)

    def publish(self, kind: str, message: dict[str, Any], *, retain: bool = False) -> None:
        item = Outgoing(self.topics.device(self.device_id, kind), json.dumps(message).encode(), retain)
        with self._publish_lock:
            if kind == "telemetry":
                self._recent.append((parse_time(message["ts"]), item))
            if self.connected.is_set():
                self._send(item)
            else:
                self.queue.put(item)

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    @property
    def dropped(self) -> int:
        return self.queue.dropped

    # --- connection loop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.device_id}", daemon=True)
        self._thread.start()
        self._replay_thread = threading.Thread(
            target=self._replay_loop, name=f"replay-{self.device_id}", daemon=True
        )
        self._replay_thread.start()

    def _connect_properties(self) -> Properties:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.config.broker.session_expiry_s
        return properties

    def _run(self) -> None:
        # paho writes a publish made in another thread to the socket on the spot unless it
        # knows that a loop thread runs (loop_start records it); this thread runs paho's loop
        # itself, so record it: other threads' publishes are then queued for this thread,
        # and the TLS socket is never written from two threads at once (OpenSSL objects are
        # not thread-safe; it showed as an agent that hung in publish under load).
        self.client._thread = threading.current_thread()
        broker, limits = self.config.broker, self.config.limits
        delay = limits.reconnect_initial_s
        while not self._stop.is_set():
            try:
                self.client.connect(
                    broker.host,
                    broker.port,
                    keepalive=broker.keepalive_s,
                    clean_start=False,
                    properties=self._connect_properties(),
                )
                delay = limits.reconnect_initial_s
                self.client.loop_forever(retry_first_connection=False)
            except (OSError, mqtt.WebsocketConnectionError) as exc:
                log.warning("mqtt connection to %s failed: %s", broker.url, exc)
            self.connected.clear()
            if self._stop.is_set():
                break
            # Full jitter (AWS architecture blog): uniform in [0, delay].
            self._stop.wait(random.uniform(0, delay))
            delay = min(delay * 2, limits.reconnect_max_s)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish offline status (retained) and disconnect cleanly."""
        self._stop.set()
        self._replay_wakeup.set()
        if self.connected.is_set():
            info = self.client.publish(
                self.topics.device(self.device_id, "status"), self._status(False), qos=1, retain=True
            )
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        self.client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout)
