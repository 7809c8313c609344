"""One virtual device: the agent's apply loop and reports without LiteRT or threads.

Every check is the agent's own (agent/apply.py, agent/trust.py): a virtual device refuses
what a real one refuses, with the same reason code, and publishes the same events
(``notified``, ``downloading``, ``verifying``, ``active``, ``failed``, ``retrying``,
``trust``) and the same retained ``reported`` state. What it does not do: run a model (the
install takes ``--install-seconds``), shadows (addition 5), golden sets, telemetry replay
(addition 7), and it keeps its applied generation in memory only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import __version__, protocol
from agent.apply import (
    Refusal,
    check_fits,
    check_freshness,
    event_message,
    reported_message,
    verify_desired,
    verify_manifest,
)
from agent.config import BrokerConfig
from agent.download import TransferError
from agent.mqtt import OfflineQueue, Outgoing
from agent.protocol.codes import EventType, Reason
from agent.protocol.topics import Topics
from agent.protocol.trust import TrustState
from agent.telemetry import telemetry_message
from agent.trust import bundle_applied

if TYPE_CHECKING:
    from agent.sim.fleet import Fleet

log = logging.getLogger(__name__)

RUNTIME_NAME = "simulated"
MAX_ARTIFACT_BYTES = 256 * 1024 * 1024  # the agent's default limit
OFFLINE_QUEUE_MESSAGES, OFFLINE_QUEUE_BYTES = 1000, 1024 * 1024
RECONNECT_INITIAL_S, RECONNECT_MAX_S = 1.0, 60.0
RETRY_INITIAL_S, RETRY_MAX_S = 1.0, 60.0
SESSION_EXPIRY_S = 7 * 24 * 3600


class Behaviour:
    """What a device does besides following its desired state (the CLI's fractions)."""

    NORMAL = "normal"
    OFFLINE = "offline"  # enrolled, never connects
    FLAPPING = "flapping"  # loses its connection (no DISCONNECT: the will fires) and comes back
    FAILING = "failing"  # every install fails with the configured reason code


@dataclass(frozen=True)
class VersionProfile:
    """How a model version behaves on a virtual device (the telemetry it produces)."""

    accuracy: float = 0.95
    error_rate: float = 0.0
    latency_ms: float = 5.0


@dataclass(frozen=True)
class DeviceSpec:
    index: int
    device_id: str
    hardware: str
    int8: bool
    behaviour: str = Behaviour.NORMAL


@dataclass
class Credentials:
    token: str
    broker: BrokerConfig


def binomial(rng: random.Random, n: int, p: float) -> int:
    """A binomial draw: exact for small ``n``, the normal approximation beyond (Python
    3.11 has no ``binomialvariate``)."""
    if n <= 0 or p <= 0:
        return 0
    if p >= 1:
        return n
    if n * p * (1 - p) < 25:
        return sum(rng.random() < p for _ in range(n))
    draw = round(rng.gauss(n * p, math.sqrt(n * p * (1 - p))))
    return min(n, max(0, draw))


class VirtualDevice:
    def __init__(self, fleet: Fleet, spec: DeviceSpec, credentials: Credentials) -> None:
        self.fleet = fleet
        self.spec = spec
        self.device_id = spec.device_id
        self.credentials = credentials
        self.topics = Topics(credentials.broker.topic_prefix)
        self.rng = random.Random(f"{fleet.config.seed}-{spec.index}")
        self.trust = TrustState.pinned(fleet.config.root_keys, fleet.config.root_threshold)
        self.applied_generation = 0
        self.active: dict[str, tuple[str, str]] = {}  # model -> (version, variant)
        self.refused: set[int] = set()
        self.queue = OfflineQueue(max_messages=OFFLINE_QUEUE_MESSAGES, max_bytes=OFFLINE_QUEUE_BYTES)
        self.connected = False
        self.connects = 0
        self.stopping = False
        self._pending: bytes | None = None
        self._last_desired: bytes | None = None
        self._applying: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self._reconnect_delay = RECONNECT_INITIAL_S
        self._drop_requested = False
        self.started_at = fleet.loop.time()
        self.client = self._make_client()

    # --- MQTT (the same session, topics, status and will as agent/mqtt.py)

    def _status(self, online: bool) -> bytes:
        ts = protocol.format_time(datetime.now(UTC))
        return json.dumps({"online": online, "agent_version": __version__, "ts": ts}).encode()

    def _make_client(self) -> mqtt.Client:
        broker = self.credentials.broker
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            client.tls_set_context(self.fleet.tls_context())  # one context for the process
        client.will_set(self.topics.device(self.device_id, "status"), self._status(False), qos=1, retain=True)
        client.suppress_exceptions = True
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.message_callback_add(self.topics.desired(self.device_id), self._on_desired)
        client.message_callback_add(self.topics.trust(), self._on_trust)
        self.fleet.io.attach(client)
        return client

    def start(self) -> None:
        if self.spec.behaviour == Behaviour.OFFLINE:
            return
        self._publish("reported", self._reported(), retain=True)  # queued until connected
        self._tasks.append(self.fleet.loop.create_task(self._telemetry_loop()))
        self.fleet.connect_soon(self)

    def connect(self) -> None:
        """Called by the fleet's connect queue (the TCP and TLS handshakes block briefly)."""
        if self.stopping:
            return
        broker = self.credentials.broker
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        try:
            self.client.connect(
                broker.host,
                broker.port,
                keepalive=self.fleet.config.keepalive_s,
                clean_start=False,
                properties=properties,
            )
        except (OSError, ValueError) as exc:
            log.warning("%s: mqtt connection to %s failed: %s", self.device_id, broker.url, exc)
            self._reconnect_later()

    def _reconnect_later(self, delay: float | None = None) -> None:
        if self.stopping:
            return
        if delay is None:
            # Full jitter, as the agent: a fleet that lost its broker does not come back in lockstep.
            delay = self.rng.uniform(0, self._reconnect_delay)
            self._reconnect_delay = min(self._reconnect_delay * 2, RECONNECT_MAX_S)
        self.fleet.loop.call_later(delay, self.fleet.connect_soon, self)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("%s: mqtt connect refused: %s", self.device_id, reason_code)
            return
        self.connected = True
        self.connects += 1
        self.fleet.stats.connects += 1
        self._reconnect_delay = RECONNECT_INITIAL_S
        # Trust first: the broker sends retained messages in the order of the filters.
        client.subscribe([(self.topics.trust(), 1), (self.topics.desired(self.device_id), 1)])
        client.publish(self.topics.device(self.device_id, "status"), self._status(True), qos=1, retain=True)
        for item in self.queue.take_all():
            self._send(item)
        if self.spec.behaviour == Behaviour.FLAPPING:
            online_s = self.fleet.config.flap_online_s * self.rng.uniform(0.8, 1.2)
            self.fleet.loop.call_later(online_s, self.drop_connection)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected = False
        if self.stopping:
            return
        if self._drop_requested:
            self._drop_requested = False
            self._reconnect_later(self.fleet.config.flap_offline_s)
        else:
            log.warning("%s: mqtt disconnected: %s", self.device_id, reason_code)
            self._reconnect_later()

    def drop_connection(self) -> None:
        """A power cut or a lost radio link: the socket goes without a DISCONNECT, so the
        broker publishes the last will."""
        sock = self.client.socket()
        if self.stopping or not self.connected or sock is None:
            return
        self._drop_requested = True
        self.fleet.stats.drops += 1
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def _send(self, item: Outgoing) -> None:
        info = self.client.publish(item.topic, item.payload, qos=1, retain=item.retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.queue.put(item)

    def _publish(self, kind: str, message: dict[str, Any], *, retain: bool = False) -> None:
        item = Outgoing(self.topics.device(self.device_id, kind), json.dumps(message).encode(), retain)
        self.fleet.stats.published += 1
        if self.connected:
            self._send(item)
        else:
            self.queue.put(item)

    def stop(self) -> None:
        """Graceful stop, as the agent's: offline status (retained), then DISCONNECT."""
        self.stopping = True
        for task in self._tasks:
            task.cancel()
        if self._applying is not None:
            self._applying.cancel()
        if self.connected:
            self.client.publish(
                self.topics.device(self.device_id, "status"), self._status(False), qos=1, retain=True
            )
            self.client.disconnect()

    # --- reporting

    def _event(self, kind: EventType, **fields: Any) -> None:
        if fields.get("reason"):
            log.info(
                "%s: event %s reason=%s: %s", self.device_id, kind, fields["reason"], fields.get("message")
            )
        self._publish("events", event_message(kind, **fields))

    def _reported(self) -> dict[str, Any]:
        return reported_message(
            generation=self.applied_generation,
            models={name: {"version": v, "variant": var} for name, (v, var) in self.active.items()},
            trust_versions={
                "root_version": self.trust.root_version,
                "keyring_version": self.trust.keyring_version,
            },
        )

    # --- trust bundles (docs/protocol.md, addition 6)

    def _on_trust(self, client, userdata, message) -> None:
        if not message.payload:
            return
        try:
            new = bundle_applied(self.trust, bytes(message.payload), now=datetime.now(UTC))
        except protocol.EnvelopeError as exc:
            self._event(EventType.FAILED, reason=exc.reason, message=f"trust bundle refused: {exc}")
            return
        if new is self.trust:
            return
        self.trust = new
        self.refused.clear()  # refusals of earlier generations may have been about keys
        self._event(
            EventType.TRUST,
            message=f"now trusting keyring version {new.keyring_version}"
            f" under root version {new.root_version}",
        )
        self._publish("reported", self._reported(), retain=True)
        if self._pending is None and self._last_desired is not None:
            self._submit(self._last_desired)

    # --- desired state: the agent's apply loop, one task per device while there is work

    def _on_desired(self, client, userdata, message) -> None:
        if message.payload:
            self._last_desired = bytes(message.payload)
            self._submit(self._last_desired)

    def _submit(self, envelope: bytes) -> None:
        self._pending = envelope  # only the newest counts
        if self._applying is None or self._applying.done():
            self._applying = self.fleet.loop.create_task(self._apply_loop())

    async def _apply_loop(self) -> None:
        delay = RETRY_INITIAL_S
        while self._pending is not None and not self.stopping:
            envelope, self._pending = self._pending, None
            try:
                transient = await self._apply(envelope)
            except Exception:
                log.exception("%s: apply failed unexpectedly", self.device_id)
                transient = True
            if not transient:
                delay = RETRY_INITIAL_S
                continue
            # Retried after a backoff, unless something newer arrived meanwhile.
            await asyncio.sleep(self.rng.uniform(0, delay))
            delay = min(delay * 2, RETRY_MAX_S)
            if self._pending is None:
                self._pending = envelope

    async def _apply(self, envelope: bytes) -> bool:
        """Apply one desired state; True when it failed for a transient reason."""
        self.fleet.stats.desired += 1
        try:
            desired = verify_desired(self.trust, envelope, device_id=self.device_id)
        except Refusal as refusal:
            self._event(EventType.FAILED, reason=refusal.reason, message=refusal.message)
            return False
        generation = desired["generation"]
        if generation == self.applied_generation:
            self._publish("reported", self._reported(), retain=True)
            return False
        if generation in self.refused:
            return False
        try:
            check_freshness(desired, applied_generation=self.applied_generation)
            self._event(EventType.NOTIFIED, generation=generation)
            for name, spec in sorted(desired["models"].items()):
                await self._apply_model(name, spec, generation)
        except Refusal as refusal:
            if refusal.permanent:
                self.refused.add(generation)
                self.fleet.stats.failed += 1
            self._event(
                refusal.event_type,
                generation=generation,
                model=refusal.model,
                reason=refusal.reason,
                message=refusal.message,
            )
            return not refusal.permanent
        self.applied_generation = generation
        self._publish("reported", self._reported(), retain=True)
        return False

    async def _apply_model(self, name: str, spec: dict[str, Any], generation: int) -> None:
        wanted = (spec["version"], spec["variant"])
        if self.active.get(name) == wanted:
            return
        common = {"generation": generation, "model": name, "version": wanted[0], "variant": wanted[1]}
        try:
            self._event(EventType.DOWNLOADING, **common)
            envelope = await self.fleet.cache.manifest(spec, token=self.credentials.token)
            try:
                _payload, manifest = verify_manifest(self.trust, envelope, name=name, spec=spec)
            except Refusal:
                self.fleet.cache.forget_manifest(spec)  # a bad copy must not stay shared
                raise
            check_fits(
                manifest,
                max_artifact_bytes=MAX_ARTIFACT_BYTES,
                hardware=self.spec.hardware,
                int8=self.spec.int8,
                unsupported_ops=(),
                runtime_name=RUNTIME_NAME,
            )
            blob = manifest["blob"]
            path = await self.fleet.cache.blob(spec["blob_url"], blob, token=self.credentials.token)
            # Shared bytes, but this device's own check of them.
            if await self.fleet.cache.sha256_of(path) != blob["sha256"]:
                raise Refusal(
                    Reason.HASH_MISMATCH, f"{spec['blob_url']}: the blob's sha256 is not {blob['sha256']}"
                )
            self._event(EventType.VERIFYING, **common)
            await asyncio.sleep(self.fleet.config.install_s * self.rng.uniform(0.5, 1.5))
            if self.spec.behaviour == Behaviour.FAILING:
                reason = self.fleet.config.fail_reason
                raise Refusal(reason, f"simulated install failure ({reason})")
        except TransferError as exc:
            raise Refusal(exc.reason, str(exc), permanent=exc.permanent, model=name) from exc
        except Refusal as refusal:
            refusal.model = name
            raise
        self.active[name] = wanted
        self.fleet.stats.installs += 1
        self._event(EventType.ACTIVE, **common, message="simulated install")

    # --- telemetry

    def _model_window(self, version: str, variant: str, window_s: float) -> dict[str, Any]:
        config = self.fleet.config
        profile = config.profiles.get(version, config.default_profile)
        rng = self.rng
        inferences = max(0, round(config.inferences_per_s * window_s * rng.uniform(0.8, 1.2)))
        errors = binomial(rng, inferences, profile.error_rate)
        labeled = binomial(rng, inferences - errors, config.label_rate)
        entry: dict[str, Any] = {
            "version": version,
            "variant": variant,
            "inferences": inferences,
            "errors": errors,
            "feedback": {"labeled": labeled, "correct": binomial(rng, labeled, profile.accuracy)},
        }
        if inferences > errors:
            p50 = profile.latency_ms * rng.uniform(0.9, 1.1)
            entry["latency_ms"] = {
                "p50": round(p50, 3),
                "p95": round(p50 * 1.6, 3),
                "p99": round(p50 * 2.2, 3),
            }
        return entry

    def telemetry(self) -> dict[str, Any]:
        window_s = self.fleet.config.telemetry_interval_s
        models = {name: self._model_window(v, var, window_s) for name, (v, var) in self.active.items()}
        health = {
            "cpu_pct": round(self.rng.uniform(5, 40), 1),
            "rss_mb": round(self.rng.uniform(40, 80), 1),
            "temp_c": round(self.rng.uniform(40, 70), 1),
            "disk_free_mb": 4096,
            "uptime_s": int(self.fleet.loop.time() - self.started_at),
        }
        return telemetry_message(models=models, window_s=window_s, health=health, dropped=self.queue.dropped)

    async def _telemetry_loop(self) -> None:
        interval = self.fleet.config.telemetry_interval_s
        await asyncio.sleep(self.rng.uniform(0, interval))  # spread the fleet over the interval
        while not self.stopping:
            self._publish("telemetry", self.telemetry())
            self.fleet.stats.telemetry += 1
            await asyncio.sleep(interval)
