"""The ingest bridge: what devices publish, from MQTT into PostgreSQL (devices issue, point 4).

ARCHITECTURE.md, "MQTT topics" and "Telemetry window". One bridge process holds one MQTT v5
session on the shared subscriptions ``$share/fleet-ingest/<prefix>/devices/+/<kind>`` for the
four device→plane kinds, so that several bridges split the load.

Delivery guarantee: at least once from the broker, exactly once in the tables.

* QoS 1 with manual acks. A message is acknowledged only after the transaction holding it
  has committed, so a SIGTERM or a crash loses nothing that was acknowledged: the broker
  redelivers the rest to the same session (``clean_start=False`` plus a session expiry).
* Redeliveries are no-ops: telemetry rows and events are unique per (device, message id)
  and inserted with ``ON CONFLICT DO NOTHING``; rollups are summed only from the rows that
  were really inserted (``RETURNING``), in the same transaction.
* Messages that can never be written (not JSON, wrong schema, too large, unknown or disabled
  device) are counted per reason, logged (rate-limited) and acknowledged, so that they are
  not redelivered forever and never stop the bridge.

Throughput: the paho network thread only appends messages to a deque; the ``run`` loop
takes batches (``INGEST_BATCH_SIZE`` messages or ``INGEST_FLUSH_MS``), validates them with
``agent.protocol.parse``, builds plain tuples and writes them with COPY into temporary
tables, then one ``INSERT … SELECT … ON CONFLICT DO NOTHING RETURNING`` per table. Measured
on 1,000-row batches with the rollup upsert: COPY + INSERT … SELECT costs the client 3-5 µs
of CPU per row (~55,000 rows/s), ``executemany`` 8 µs and one INSERT from ``unnest`` arrays
10 µs; the client's CPU (one core, the GIL) is what limits a Python bridge, so COPY it is.
bench/ingest.py measures the whole bridge.

Per-device limits and bounded memory (docs/ingest.md, "Limits"): the network thread takes
the device id from the topic (the broker binds it to the device's login) and spends a token
of that device's bucket (``INGEST_DEVICE_RATE``/s, ``INGEST_DEVICE_BURST``) before queuing a
message; the excess is dropped, counted per device and, if QoS 1, acknowledged at once so
the broker does not redeliver it. The queue holds at most ``INGEST_MAX_PENDING`` messages
or ``INGEST_MAX_PENDING_BYTES``: beyond that QoS 0 messages are dropped (``overflow``);
QoS 1 ones are still queued, as the broker never has more than our Receive Maximum (at most
``INGEST_MAX_PENDING``) of them unacknowledged in flight to us. Buckets and per-device
counters are bounded maps (least recently seen devices are evicted). Windows that break
their own invariants or whose clock is off are refused (``invariant``, ``clock``) and
counted per device in ``devices_ingestrefusal``.

Limit: while a bridge is away, Mosquitto keeps at most ``max_queued_messages`` (1,000) for
its session, its unacknowledged in-flight messages included; beyond that it drops messages
it has already acknowledged to the devices. A restart must be quick, or another bridge of
the group must be running (it only gets the share of new messages, though).
"""

from __future__ import annotations

import json
import logging
import math
import select
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from typing import Any

import paho.mqtt.client as mqtt
from django.conf import settings
from django.db import (
    DatabaseError,
    DataError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connection,
    connections,
    transaction,
)
from django.utils import timezone
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import protocol
from agent.protocol.topics import DEVICE_TOPICS, Topics
from fleet.core.capabilities import check_ops
from fleet.core.lookups import any_of
from fleet.devices.choices import DeviceStatus, IngestKind, IngestRefusalReason
from fleet.devices.models import (
    Device,
    DeviceEvent,
    IngestRefusal,
    TelemetryHourly,
    TelemetryWindow,
    devices_locked,
)
from fleet.mqtt.broker import host_port, mqtt_client_unconnected

log = logging.getLogger(__name__)

# A restarted bridge resumes its session (unacknowledged and queued messages) if it comes
# back within this time. Mosquitto keeps routing a shared subscription's share to a member
# that is offline but whose session lives, so a bridge that is gone for good swallows its
# share of the traffic until its session expires: keep this short.
SESSION_EXPIRY_S = 300
# How many unacknowledged messages the broker may have in flight to us (MQTT v5 Receive
# Maximum). Without it Mosquitto allows only max_inflight_messages (20), and acknowledging
# after the commit would cap a batch at 20 messages. Beyond it Mosquitto queues only
# max_queued_messages (1,000) more and then drops, so the bridge is the buffer that
# absorbs a slow commit: the protocol's maximum, ~80 MB of 1 KB messages at worst.
RECEIVE_MAXIMUM = 65_535
# Device id -> pk is cached; the cache is dropped this often so that a device disabled or
# retired stops being accepted (its broker credential is disabled at the same time anyway).
DEVICE_CACHE_TTL_S = 60.0
# Device states whose messages are written; anything else counts as ``unknown_device``.
ACCEPTED_STATUSES = frozenset({DeviceStatus.ACTIVE.value, DeviceStatus.PENDING.value})
BIGINT_MAX = 2**63 - 1
# Column widths of the models (a longer value would fail the whole COPY).
NAME_MAX = 64
EVENT_TYPE_MAX = 32
EVENT_REASON_MAX = 40
AGENT_VERSION_MAX = 32

STATUS = IngestKind.STATUS.value
REPORTED = IngestKind.REPORTED.value
TELEMETRY = IngestKind.TELEMETRY.value

# Drops decided by the writer, per message taken from the queue...
WRITER_DROP_REASONS = (
    "malformed",
    "schema",
    "too_large",
    "unknown_device",
    "bad_topic",
    "db_rejected",
    "invariant",
    "clock",
)
# ...and by the network thread, before a message is queued (these never count as received).
NETWORK_DROP_REASONS = ("rate_limited", "overflow")
DROP_REASONS = WRITER_DROP_REASONS + NETWORK_DROP_REASONS
INVARIANT = IngestRefusalReason.INVARIANT.value
CLOCK = IngestRefusalReason.CLOCK.value
RATE_LIMITED = IngestRefusalReason.RATE_LIMITED.value
OVERFLOW = IngestRefusalReason.OVERFLOW.value
# Telemetry partitions are made for the days of windows the invariants let in, plus this
# many days ahead (the beat task runs hourly, so a day boundary is never missed).
PARTITION_DAYS_AHEAD = 2
# agent.protocol may raise a SchemaError subclass for messages whose counters contradict
# each other (protocol addition 5); the bridge counts those as its own ``invariant``.
SCHEMA_INVARIANT_ERRORS = tuple(
    error for error in (getattr(protocol, "InvariantError", None),) if isinstance(error, type)
)
PARTITION_PREFIX = "devices_telemetrywindow_p"
# Errors that depend on the data of a batch (a message isolated by bisection is dropped).
# Anything else from the database is either transient (retried) or a bug (raised).
DATA_ERRORS = (IntegrityError, DataError, UnicodeError)


class IngestError(RuntimeError):
    """The bridge cannot work at all (e.g. the broker refused its subscriptions)."""


class InvalidMessage(ValueError):
    """A message that passed the schema but cannot be stored (too long, out of range)."""


class Refused(ValueError):
    """A well-formed window the bridge refuses: it breaks its own invariants, or its clock is
    off. Counted per device (``IngestRefusal``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class Counters:
    """What the bridge did since it started. Drop reasons are the fields of DROP_REASONS."""

    received: int = 0  # taken from the queue by the writer
    committed: int = 0  # valid messages whose batch committed (then acknowledged)
    telemetry_rows: int = 0  # rows really inserted (one per model per message)
    duplicate_rows: int = 0  # telemetry rows and events already there (QoS 1 redeliveries)
    events: int = 0
    batches: int = 0
    db_retries: int = 0
    malformed: int = 0
    schema: int = 0
    too_large: int = 0
    unknown_device: int = 0
    bad_topic: int = 0
    db_rejected: int = 0
    invariant: int = 0  # correct > labeled, errors > inferences, shadow counts, window length
    clock: int = 0  # ts too far ahead of the server clock or too old
    rate_limited: int = 0  # over the device's token bucket (network thread)
    overflow: int = 0  # QoS 0 messages beyond the queue's bounds (network thread)

    @property
    def dropped(self) -> int:
        return sum(getattr(self, reason) for reason in DROP_REASONS)

    @property
    def dropped_by_writer(self) -> int:
        """Drops among the ``received`` messages (received = committed + this, once settled)."""
        return sum(getattr(self, reason) for reason in WRITER_DROP_REASONS)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "dropped": self.dropped}

    def summary(self) -> str:
        drops = ", ".join(f"{r}={getattr(self, r)}" for r in DROP_REASONS if getattr(self, r))
        return (
            f"received={self.received} committed={self.committed} telemetry_rows={self.telemetry_rows} "
            f"events={self.events} duplicates={self.duplicate_rows} batches={self.batches} "
            f"dropped={self.dropped}" + (f" ({drops})" if drops else "")
        )


class _RateLimitedLog:
    """At most one warning per reason every ``interval_s``, with the number suppressed."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, reason: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(reason, -math.inf) < self.interval_s:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        suppressed = self._suppressed.pop(reason, 0)
        self._last[reason] = now
        suffix = f" ({suppressed} more like it since the last report)" if suppressed else ""
        log.warning("ingest dropped a message (%s): " + message + suffix, reason, *args)


# A received message: (connection epoch, mid, qos, retained, topic, payload). A payload over
# the size limit is not kept: its length stands in for it (counted as too_large).
Received = tuple[int, int, int, bool, str, bytes | int]
# A valid message: (kind, device id, parsed data, retained, topic).
Parsed = tuple[str, str, dict[str, Any], bool, str]


def _count(value: int) -> int:
    if value > BIGINT_MAX:
        raise InvalidMessage(f"{value} does not fit a bigint")
    return value


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise InvalidMessage(f"{value} is not a finite number")
    return value


def _name(value: str, limit: int = NAME_MAX) -> str:
    if len(value) > limit:
        raise InvalidMessage(f"{value[:20]!r}… is longer than {limit} characters")
    return value


def _natural(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidMessage(f"{what} must be a non-negative integer")
    return _count(value)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidMessage(f"{what} must be a number")
    return _finite(value)


def _shadow(model: str, shadow: Any) -> tuple:
    """The shadow columns of a model entry (protocol addition 5). Validated here, types and
    ranges, because the wire schema may not know the field yet."""
    if shadow is None:
        return ("", "", 0, 0, 0, 0, 0, None, None)
    if not isinstance(shadow, dict):
        raise InvalidMessage(f"{model}: shadow must be an object")
    version, variant = shadow.get("version"), shadow.get("variant", "")
    if not isinstance(version, str) or not version or not isinstance(variant, str):
        raise InvalidMessage(f"{model}: shadow.version and shadow.variant must be strings")
    sampled, compared, agreed, errors, skipped = (
        _natural(shadow.get(name, 0), f"{model}: shadow.{name}")
        for name in ("sampled", "compared", "agreed", "errors", "skipped")
    )
    mean_abs_diff = shadow.get("mean_abs_diff")
    if mean_abs_diff is not None:
        mean_abs_diff = _number(mean_abs_diff, f"{model}: shadow.mean_abs_diff")
    latency, p95 = shadow.get("latency_ms"), None
    if latency is not None:
        if not isinstance(latency, dict):
            raise InvalidMessage(f"{model}: shadow.latency_ms must be an object")
        p95 = _number(latency.get("p95"), f"{model}: shadow.latency_ms.p95")
    if not agreed <= compared <= sampled:
        raise Refused(
            INVARIANT, f"{model}: shadow agreed {agreed} <= compared {compared} <= sampled {sampled}"
        )
    if errors > sampled or skipped > sampled:
        raise Refused(INVARIANT, f"{model}: shadow errors {errors} / skipped {skipped} > sampled {sampled}")
    if (mean_abs_diff is not None and mean_abs_diff < 0) or (p95 is not None and p95 < 0):
        raise Refused(INVARIANT, f"{model}: negative shadow mean_abs_diff or latency")
    return (_name(version), _name(variant), sampled, compared, agreed, errors, skipped, mean_abs_diff, p95)


def _capabilities(capabilities: dict[str, Any]) -> dict[str, Any]:
    """docs/protocol.md addition 10, past the schema: op names must be TFLite's own."""
    if "unsupported_ops" in capabilities:
        try:
            ops = check_ops(capabilities["unsupported_ops"], field="unsupported_ops")
        except ValueError as exc:
            raise Refused(INVARIANT, str(exc)) from exc
        capabilities = {**capabilities, "unsupported_ops": ops}
    return capabilities


def _health(health: Any) -> tuple[float | None, ...]:
    """The health figures of a telemetry message, for its window rows. The wire schema
    leaves "health" open, so a figure that is missing, not a number or not finite is None
    (the device page shows a gap); it never refuses the window."""
    health = health if isinstance(health, dict) else {}
    values = (health.get(name) for name in HEALTH_COLUMNS)
    return tuple(
        float(value)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        else None
        for value in values
    )


def _json(value: Any) -> str:
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


# --- SQL. Temporary tables live as long as the connection; COPY fills them inside the
# batch's transaction and ON COMMIT DELETE ROWS empties them.

TELEMETRY_COLUMNS = (
    "device_id, message_id, ts, window_start, received_at, window_s, model, version, variant, inferences, "
    "errors, latency_p50_ms, latency_p95_ms, latency_p99_ms, labeled, correct, shadow_version, "
    "shadow_variant, shadow_sampled, shadow_compared, shadow_agreed, shadow_errors, shadow_skipped, "
    "shadow_mean_abs_diff, shadow_latency_p95_ms, cpu_pct, rss_mb, temp_c"
)
EVENT_COLUMNS = (
    "device_id, message_id, type, generation, model, version, variant, reason, message, "
    "delivery, delivery_bytes, delivery_fallback, ts, received_at"
)

CREATE_TEMP_TABLES = (
    f"CREATE TEMP TABLE IF NOT EXISTS ingest_telemetry ON COMMIT DELETE ROWS AS "
    f"SELECT {TELEMETRY_COLUMNS} FROM devices_telemetrywindow WITH NO DATA",
    f"CREATE TEMP TABLE IF NOT EXISTS ingest_events ON COMMIT DELETE ROWS AS "
    f"SELECT {EVENT_COLUMNS} FROM devices_deviceevent WITH NO DATA",
    "CREATE TEMP TABLE IF NOT EXISTS ingest_devices (id bigint, seen boolean, online boolean, "
    "agent_version text, generation bigint, reported_models jsonb, health jsonb, root_version int, "
    "keyring_version int, capabilities jsonb) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE IF NOT EXISTS ingest_refusals (device_key text, reason text, count bigint, "
    "at timestamptz) ON COMMIT DELETE ROWS",
)

# Rows are locked in id order so that two bridges updating the same devices cannot deadlock,
# nor a bridge and a promotion (models.devices_locked: the same order for the ORM's writers).
LOCK_DEVICES = (
    "SELECT 1 FROM devices_device WHERE id IN (SELECT id FROM ingest_devices) ORDER BY id FOR NO KEY UPDATE"
)
# reported_models follows applied_generation, which only grows (wire contract): an older
# "reported" redelivered after a newer one must not win.
UPDATE_DEVICES = """
UPDATE devices_device d SET
    last_seen_at = CASE WHEN u.seen THEN GREATEST(d.last_seen_at, %(now)s) ELSE d.last_seen_at END,
    online = COALESCE(u.online, d.online),
    agent_version = COALESCE(u.agent_version, d.agent_version),
    applied_generation = CASE WHEN u.generation >= d.applied_generation
        THEN u.generation ELSE d.applied_generation END,
    reported_models = CASE WHEN u.generation >= d.applied_generation
        THEN u.reported_models ELSE d.reported_models END,
    root_version = CASE WHEN u.generation >= d.applied_generation
        THEN COALESCE(u.root_version, d.root_version) ELSE d.root_version END,
    keyring_version = CASE WHEN u.generation >= d.applied_generation
        THEN COALESCE(u.keyring_version, d.keyring_version) ELSE d.keyring_version END,
    health = COALESCE(u.health, d.health),
    hardware = COALESCE(u.capabilities->>'hardware', d.hardware),
    runtime = COALESCE(u.capabilities->>'runtime', d.runtime),
    runtime_version = COALESCE(u.capabilities->>'runtime_version', d.runtime_version),
    supports_int8 = COALESCE((u.capabilities->>'int8')::boolean, d.supports_int8),
    unsupported_ops = COALESCE(u.capabilities->'unsupported_ops', d.unsupported_ops)
FROM ingest_devices u WHERE d.id = u.id
"""
# Hourly sums come from the rows this statement really inserted, never from the batch, so
# a redelivered window is not summed twice. ORDER BY: hourly rows are locked in key order
# (no deadlock between bridges). The hour is the window's start (the device's clock, which
# the invariants bound), as the gates count windows by their start.
HOURLY_KEY = "device_id, hour, model, version, variant, shadow_version, shadow_variant"
# The health figures kept per window and summed per hour (with their number of windows).
HEALTH_COLUMNS = ("cpu_pct", "rss_mb", "temp_c")
HOURLY_SUMS = (
    "windows",
    "inferences",
    "errors",
    "labeled",
    "correct",
    "latency_p95_weighted_sum",
    "latency_p95_weight",
    "shadow_sampled",
    "shadow_compared",
    "shadow_agreed",
    "shadow_errors",
    "shadow_skipped",
    "shadow_latency_p95_weighted_sum",
    "shadow_latency_p95_weight",
    "shadow_mean_abs_diff_weighted_sum",
    "shadow_mean_abs_diff_weight",
    *(f"{name}_{part}" for name in HEALTH_COLUMNS for part in ("sum", "windows")),
)
INSERT_TELEMETRY = f"""
WITH inserted AS (
    INSERT INTO devices_telemetrywindow ({TELEMETRY_COLUMNS})
    SELECT {TELEMETRY_COLUMNS} FROM ingest_telemetry
    ON CONFLICT (device_id, message_id, model, window_start) DO NOTHING
    RETURNING device_id, window_start, model, version, variant, shadow_version, shadow_variant,
        inferences, errors, labeled, correct, latency_p95_ms, shadow_sampled, shadow_compared,
        shadow_agreed, shadow_errors, shadow_skipped, shadow_latency_p95_ms, shadow_mean_abs_diff,
        {", ".join(HEALTH_COLUMNS)}
), rolled AS (
    INSERT INTO devices_telemetryhourly AS hourly ({HOURLY_KEY}, {", ".join(HOURLY_SUMS)}, latency_p95_max_ms)
    SELECT device_id, date_trunc('hour', window_start), model, version, variant, shadow_version,
        shadow_variant, count(*), sum(inferences), sum(errors), sum(labeled), sum(correct),
        coalesce(sum(latency_p95_ms * inferences), 0),
        coalesce(sum(inferences) FILTER (WHERE latency_p95_ms IS NOT NULL), 0),
        sum(shadow_sampled), sum(shadow_compared), sum(shadow_agreed), sum(shadow_errors),
        sum(shadow_skipped), coalesce(sum(shadow_latency_p95_ms * shadow_compared), 0),
        coalesce(sum(shadow_compared) FILTER (WHERE shadow_latency_p95_ms IS NOT NULL), 0),
        coalesce(sum(shadow_mean_abs_diff * shadow_compared), 0),
        coalesce(sum(shadow_compared) FILTER (WHERE shadow_mean_abs_diff IS NOT NULL), 0),
        {", ".join(f"coalesce(sum({name}), 0), count({name})" for name in HEALTH_COLUMNS)},
        max(latency_p95_ms)
    FROM inserted GROUP BY 1, 2, 3, 4, 5, 6, 7 ORDER BY 1, 2, 3, 4, 5, 6, 7
    ON CONFLICT ({HOURLY_KEY}) DO UPDATE SET
        {", ".join(f"{name} = hourly.{name} + EXCLUDED.{name}" for name in HOURLY_SUMS)},
        latency_p95_max_ms = GREATEST(hourly.latency_p95_max_ms, EXCLUDED.latency_p95_max_ms)
)
SELECT count(*) FROM inserted
"""
# Per-device refusal counts (device ids as the topics name them; unknown ones are left out).
UPSERT_REFUSALS = """
INSERT INTO devices_ingestrefusal AS refusal (device_id, reason, count, first_at, last_at)
SELECT d.id, r.reason, sum(r.count), min(r.at), max(r.at)
FROM ingest_refusals r JOIN devices_device d ON d.device_id = r.device_key
GROUP BY 1, 2 ORDER BY 1, 2
ON CONFLICT (device_id, reason) DO UPDATE SET
    count = refusal.count + EXCLUDED.count,
    last_at = GREATEST(refusal.last_at, EXCLUDED.last_at)
"""
INSERT_EVENTS = f"""
INSERT INTO devices_deviceevent ({EVENT_COLUMNS}) SELECT {EVENT_COLUMNS} FROM ingest_events
ON CONFLICT (device_id, message_id) DO NOTHING
"""


@dataclass
class _Rows:
    """One batch, ready for COPY."""

    telemetry: list[tuple]
    events: list[tuple]
    devices: list[tuple]
    refusals: list[tuple]  # (device id, reason, count, at)
    messages: int  # valid messages in the batch


class IngestBridge:
    """One bridge: an MQTT session on the shared subscriptions and a batch writer.

    ``run(stop)`` is the whole life of the bridge; tests may also ``start()``, call
    ``flush()`` themselves and ``close()``. Counters are in ``self.counters``.
    """

    def __init__(
        self,
        *,
        client_id: str,
        url: str | None = None,
        username: str | None = None,
        password: str | None = None,
        topic_prefix: str | None = None,
        batch_size: int | None = None,
        flush_ms: int | None = None,
        max_payload_bytes: int | None = None,
        session_expiry_s: int = SESSION_EXPIRY_S,
        receive_maximum: int = RECEIVE_MAXIMUM,
        stats_interval_s: float = 60.0,
        device_rate: float | None = None,
        device_burst: int | None = None,
        max_pending: int | None = None,
        max_pending_bytes: int | None = None,
        max_tracked_devices: int | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.client_id = client_id
        self.url = url or settings.MQTT_URL
        self.ca_file = ca_file or settings.MQTT_CA_FILE
        self.username = username if username is not None else settings.MQTT_INGEST_USERNAME
        self.password = password if password is not None else settings.MQTT_INGEST_PASSWORD
        self.topics = Topics(topic_prefix or settings.MQTT_TOPIC_PREFIX)
        self.batch_size = batch_size or settings.INGEST_BATCH_SIZE
        self.flush_s = (flush_ms or settings.INGEST_FLUSH_MS) / 1000
        self.max_payload_bytes = max_payload_bytes or settings.INGEST_MAX_PAYLOAD_BYTES
        self.session_expiry_s = session_expiry_s
        self.device_rate = float(device_rate or settings.INGEST_DEVICE_RATE)
        self.device_burst = float(device_burst or settings.INGEST_DEVICE_BURST)
        self.max_pending = max_pending or settings.INGEST_MAX_PENDING
        self.max_pending_bytes = max_pending_bytes or settings.INGEST_MAX_PENDING_BYTES
        self.max_tracked_devices = max_tracked_devices or settings.INGEST_MAX_TRACKED_DEVICES
        # QoS 1 messages are always queued (they are acknowledged only once committed): the
        # broker's flow control keeps at most this many of them in the queue.
        self.receive_maximum = max(1, min(receive_maximum, 65535, self.max_pending))
        self.min_window_s, self.max_window_s = settings.INGEST_MIN_WINDOW_S, settings.INGEST_MAX_WINDOW_S
        self.max_future = timedelta(seconds=settings.INGEST_MAX_FUTURE_S)
        self.max_age = timedelta(seconds=settings.INGEST_MAX_AGE_S)
        self._device_prefix = f"{self.topics.prefix}/devices/"
        self.stats_interval_s = stats_interval_s
        self.counters = Counters()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self._refused: list[str] = []
        # Filled by the network thread, emptied by the writer: deque appends and pops are
        # atomic, so the two never lose a message between them.
        self._pending: deque[tuple[float, Received]] = deque()
        # Bytes queued = _bytes_in (network thread) - _bytes_out (writer): one writer each.
        self._bytes_in = self._bytes_out = 0
        # Network thread only: device id -> [tokens, last refill], least recently seen first.
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        # (device id, reason) -> count, from the network thread to the writer, which saves
        # them; both sides hold the lock. Bounded: past max_tracked_devices keys, only the
        # global counters count.
        self._refusals: dict[tuple[str, str], int] = {}
        self._refusals_lock = threading.Lock()
        self._refusals_unsaved: dict[tuple[str, str], int] = {}  # writer only
        self._refusals_at = datetime.now(UTC)
        self._refusals_saved_at = time.monotonic()
        self._wakeup = threading.Event()
        # Bumped on every (re)connect: a message received on an earlier connection must not
        # be acknowledged on a later one (its mid may have been reused for another message;
        # the broker redelivers the old one anyway).
        self._epoch = 0
        self._devices: dict[str, int] = {}
        self._devices_loaded_at = time.monotonic()
        self._temp_tables_on: object = None
        self._drops = _RateLimitedLog()
        self._stats_at = time.monotonic()
        self._closing = False
        # docs/protocol.md, addition 7: when the last device message arrived (wall clock),
        # the start of the replay the next (re)subscription asks devices for.
        self._last_message_at = time.time()
        self.replays_requested = 0
        self.client = self._make_client()

    # --- MQTT (paho network thread)

    def _make_client(self) -> mqtt.Client:
        client = mqtt_client_unconnected(
            self.url,
            client_id=self.client_id,
            username=self.username,
            password=self.password,
            ca_file=self.ca_file,
            manual_ack=True,
        )
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        # An exception in a callback must be logged, not end the network thread (the
        # bridge would stop receiving without anyone noticing).
        client.suppress_exceptions = True
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_socket_close = self._on_socket_close
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error(
                "ingest: broker %s refused the connection as %r: %s", self.url, self.username, reason_code
            )
            return
        self._epoch += 1
        self.connected.set()
        log.info("ingest: connected as %s (session present: %s)", self.client_id, flags.session_present)
        # Subscribing again on a resumed session is harmless and covers a lost session.
        client.subscribe([(self.topics.shared(kind), 1) for kind in DEVICE_TOPICS])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._refused = [
            f"{self.topics.shared(kind)}: {code}"
            for kind, code in zip(DEVICE_TOPICS, reason_codes, strict=False)
            if code.is_failure
        ]
        if self._refused:
            log.error("ingest: the broker refused subscriptions: %s", "; ".join(self._refused))
        else:
            log.info("ingest: subscribed to %s", self.topics.shared("{" + ",".join(DEVICE_TOPICS) + "}"))
            self._request_replay(client)
        self.subscribed.set()

    def _request_replay(self, client) -> None:
        """Ask every device to send again the telemetry it sent since shortly before the
        last message we received (docs/protocol.md, addition 7). A broker that restarted
        dropped what devices published before we subscribed again, and a crash loses what
        it acknowledged but had not saved; each window has an id, so the ones we have are
        dropped at insert. Retained, so that devices that reconnect later see it too."""
        since = datetime.fromtimestamp(self._last_message_at - settings.INGEST_REPLAY_MARGIN_S, UTC)
        request = {"id": uuid.uuid4().hex, "since": protocol.format_time(since)}
        client.publish(self.topics.replay(), json.dumps(request).encode(), qos=1, retain=True)
        self.replays_requested += 1
        log.info("ingest: asked devices to replay telemetry since %s", request["since"])

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if reason_code.is_failure:
            log.warning("ingest: disconnected from %s: %s (reconnecting)", self.url, reason_code)

    def _on_message(self, client, userdata, message) -> None:
        # Keep this minimal: it runs for every message on the network thread, a flood's too.
        self._last_message_at = time.time()
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = "(a topic that is not UTF-8)"  # counted as bad_topic, and acknowledged
        qos = message.qos
        device_id = ""
        if topic.startswith(self._device_prefix):
            device_id = topic[len(self._device_prefix) : topic.rfind("/")]
            if not self._take_token(device_id, time.monotonic()):
                self.counters.rate_limited += 1
                self._count_refusal(device_id, RATE_LIMITED)
                if qos:
                    client.ack(message.mid, qos)  # dropped on purpose: no redelivery
                return
        pending = self._pending
        payload = message.payload
        size = len(payload)
        if size > self.max_payload_bytes:
            payload = size  # counted as too_large by the writer; the bytes are not kept
        elif qos == 0 and (
            len(pending) >= self.max_pending or self._bytes_in - self._bytes_out >= self.max_pending_bytes
        ):
            self.counters.overflow += 1
            if device_id:
                self._count_refusal(device_id, OVERFLOW)
            return
        else:
            self._bytes_in += size
        pending.append((message.timestamp, (self._epoch, message.mid, qos, message.retain, topic, payload)))
        if len(pending) >= self.batch_size:
            self._wakeup.set()

    def _take_token(self, device_id: str, now: float) -> bool:
        """The device's token bucket (network thread only). An evicted bucket was the least
        recently seen; if it was idle it was full, so evicting it loses nothing."""
        buckets = self._buckets
        bucket = buckets.get(device_id)
        if bucket is None:
            if len(buckets) >= self.max_tracked_devices:
                buckets.popitem(last=False)
            bucket = buckets[device_id] = [self.device_burst, now]
        else:
            buckets.move_to_end(device_id)
            bucket[0] = min(self.device_burst, bucket[0] + (now - bucket[1]) * self.device_rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return True
        return False

    def _count_refusal(self, device_id: str, reason: str) -> None:
        key = (device_id, reason)
        with self._refusals_lock:
            refusals = self._refusals
            if key in refusals:
                refusals[key] += 1
            elif len(refusals) < self.max_tracked_devices:
                refusals[key] = 1

    def _on_socket_close(self, client, userdata, sock) -> None:
        """On our own DISCONNECT, read until the broker closes before closing the socket.

        The broker keeps sending while we stop; closing a socket with unread data makes the
        kernel send a reset, and the broker then discards what it had not read yet: our
        last acks. It closes once it has processed the DISCONNECT, so EOF means every ack
        before it was taken (the unread messages are redelivered to the session)."""
        if not self._closing:
            return
        deadline = time.monotonic() + 5.0
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                readable, _, _ = select.select([sock], [], [], remaining)
                if readable and not sock.recv(65536):
                    return
        except (OSError, ValueError):
            return  # already closed or reset by the broker: nothing more to wait for

    def start(self) -> None:
        """Connect (in the background, retrying) and subscribe."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.session_expiry_s
        properties.ReceiveMaximum = self.receive_maximum
        self.client.connect_async(
            *host_port(self.url),
            keepalive=30,
            clean_start=False,
            properties=properties,
        )
        self.client.loop_start()

    # --- the writer (the thread that calls run/flush)

    def run(self, stop: threading.Event) -> Counters:
        """Write batches until ``stop`` is set, then flush what was received, acknowledge
        it and disconnect. Returns the counters."""
        try:
            # Also a beat task; here so that a fresh deployment writes into day partitions.
            telemetry_partitions_ensure()
        except DatabaseError as exc:
            log.warning("ingest: could not make telemetry partitions (rows go to DEFAULT): %s", exc)
            connection.close_if_unusable_or_obsolete()
        self.start()
        try:
            while not stop.is_set():
                if self._refused:
                    raise IngestError("the broker refused subscriptions: " + "; ".join(self._refused))
                if self._batch_ready():
                    self.flush(stop)
                else:
                    self._wakeup.wait(self._wait_s())
                    self._wakeup.clear()
                # A flood of refused messages queues nothing: save its counts on their own.
                if time.monotonic() - self._refusals_saved_at >= self.flush_s:
                    self.save_refusals()
                if time.monotonic() - self._stats_at >= self.stats_interval_s:
                    self._stats_at = time.monotonic()
                    log.info("ingest: %s", self.counters.summary())
        finally:
            self.close()
        return self.counters

    def _batch_ready(self) -> bool:
        pending = self._pending
        if len(pending) >= self.batch_size:
            return True
        return bool(pending) and time.monotonic() - pending[0][0] >= self.flush_s

    def _wait_s(self) -> float:
        pending = self._pending
        if not pending:
            return self.flush_s
        return max(0.001, self.flush_s - (time.monotonic() - pending[0][0]))

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop reading, write and acknowledge everything received, disconnect."""
        self.client.loop_stop()
        # The network thread is gone: acks and DISCONNECT below are written directly.
        try:
            while self._pending and self.flush(give_up_after_s=timeout_s):
                pass
            self.save_refusals()
            deadline = time.monotonic() + timeout_s
            while self.client.want_write() and time.monotonic() < deadline:
                self.client.loop_write()
        finally:
            self._closing = True
            self.client.disconnect()
            self.connected.clear()
            connection.close()
            log.info("ingest: stopped: %s", self.counters.summary())

    def flush(self, stop: threading.Event | None = None, *, give_up_after_s: float | None = None) -> int:
        """Write at most one batch of what is waiting in one transaction, then acknowledge
        it. Returns the number of messages taken (0 if the database stayed unreachable
        until ``stop`` or ``give_up_after_s``: nothing is acknowledged then, and the broker
        redelivers those messages to this session)."""
        pending = self._pending
        count = min(len(pending), self.batch_size)
        if not count:
            return 0
        batch = [pending.popleft()[1] for _ in range(count)]
        self._bytes_out += sum(len(item[5]) for item in batch if not isinstance(item[5], int))
        self.counters.received += count
        parsed = self._parse(batch)
        if not self._write_with_retries(parsed, stop, give_up_after_s):
            return 0
        self.counters.batches += 1
        self._ack(batch)
        return count

    def pending_bytes(self) -> int:
        return self._bytes_in - self._bytes_out

    def pending_messages(self) -> int:
        return len(self._pending)

    def lag_s(self) -> float:
        """How long the oldest message not yet written has waited (0 when none waits)."""
        try:
            received_at = self._pending[0][0]
        except IndexError:
            return 0.0
        return max(0.0, time.monotonic() - received_at)

    def save_refusals(self) -> int:
        """Save the per-device counts of what the network thread refused (rate limit,
        overflow) in a transaction of their own. On a database error they are kept for the
        next try. Returns how many (device, reason) pairs were saved."""
        self._refusals_saved_at = time.monotonic()
        with self._refusals_lock:
            taken, self._refusals = self._refusals, {}
        unsaved = self._refusals_unsaved
        for key, count in taken.items():
            unsaved[key] = unsaved.get(key, 0) + count
            self._drops.warning(key[1], "device %s: %d message(s)", key[0], count)
        if taken:
            self._refusals_at = datetime.now(UTC)
        if not unsaved:
            return 0
        at = self._refusals_at
        rows = [(device_id, reason, count, at) for (device_id, reason), count in unsaved.items()]
        try:
            connection.ensure_connection()
            self._ensure_temp_tables()
            with transaction.atomic(), connection.cursor() as wrapper, connection.wrap_database_errors:
                self._copy(wrapper.cursor, "ingest_refusals", rows)
                wrapper.cursor.execute(UPSERT_REFUSALS)
        except (OperationalError, InterfaceError) as exc:
            log.warning("ingest: could not save refusal counts, keeping them: %s", exc)
            connection.close_if_unusable_or_obsolete()
            return 0
        unsaved.clear()
        return len(rows)

    def _ack(self, batch: list[Received]) -> None:
        epoch, ack = self._epoch, self.client.ack
        for message_epoch, mid, qos, _retained, _topic, _payload in batch:
            if qos and message_epoch == epoch:
                ack(mid, qos)

    # --- validation (per message: keep it cheap)

    def _drop(self, reason: str, topic: str, detail: str) -> None:
        setattr(self.counters, reason, getattr(self.counters, reason) + 1)
        self._drops.warning(reason, "%s: %s", topic, detail)

    def _parse(self, batch: list[Received]) -> list[Parsed]:
        parsed: list[Parsed] = []
        limit, split, parse = self.max_payload_bytes, self.topics.parse, protocol.parse
        for _epoch, _mid, _qos, retained, topic, payload in batch:
            if isinstance(payload, int):
                self._drop("too_large", topic, f"{payload} bytes (limit {limit})")
                continue
            try:
                device_id, kind = split(topic)
            except ValueError as exc:
                self._drop("bad_topic", topic, str(exc))
                continue
            try:
                if b"\\u0000" in payload:  # PostgreSQL text and jsonb cannot hold NUL
                    raise protocol.SchemaError("contains a NUL character")
                data = parse(kind, payload)
            except protocol.SchemaError as exc:
                if isinstance(exc, SCHEMA_INVARIANT_ERRORS):
                    # The wire schema's own cross-field checks (shadow counters): the same
                    # refusal as the bridge's, counted per device.
                    self._drop(INVARIANT, topic, str(exc))
                    self._count_refusal(device_id, INVARIANT)
                else:
                    self._drop("malformed" if exc.__cause__ is not None else "schema", topic, str(exc))
                continue
            except RecursionError:
                self._drop("malformed", topic, "nested too deeply")
                continue
            parsed.append((kind, device_id, data, retained, topic))
        return parsed

    def _device_pks(self, device_ids: set[str]) -> dict[str, int]:
        """Accepted devices among ``device_ids`` -> pk; misses cost one query per batch."""
        if time.monotonic() - self._devices_loaded_at > DEVICE_CACHE_TTL_S:
            self._devices.clear()
            self._devices_loaded_at = time.monotonic()
        cache = self._devices
        misses = [device_id for device_id in device_ids if device_id not in cache]
        if misses:
            for device_id, pk, status in Device.objects.filter(device_id__in=misses).values_list(
                "device_id", "pk", "status"
            ):
                if status in ACCEPTED_STATUSES:
                    cache[device_id] = pk
        return cache

    def _rows(self, parsed: list[Parsed], now: datetime) -> _Rows:
        """Tuples for COPY; a device's state changes are coalesced to one row per batch."""
        pks = self._device_pks({device_id for _kind, device_id, _data, _retained, _topic in parsed})
        telemetry: list[tuple] = []
        events: list[tuple] = []
        refusals: dict[tuple[str, str], int] = {}
        # pk -> [seen, online, agent_version, generation, reported_models, health,
        #        root_version, keyring_version, capabilities]
        states: dict[int, list] = {}
        valid = 0
        for kind, device_id, data, retained, topic in parsed:
            pk = pks.get(device_id)
            if pk is None:
                self._drop("unknown_device", topic, "not an active or pending device")
                continue
            state = states.get(pk)
            if state is None:
                state = states[pk] = [False, None, None, None, None, None, None, None, None]
            try:
                if kind == TELEMETRY:
                    telemetry.extend(self._telemetry_rows(pk, data, now))
                    if "health" in data:
                        state[5] = _json(data["health"])
                    online = True
                elif kind == STATUS:
                    online = data["online"]
                    if "agent_version" in data:
                        # Informational: cut to the column rather than lose the status.
                        state[2] = data["agent_version"][:AGENT_VERSION_MAX]
                    if "capabilities" in data:
                        state[8] = _json(_capabilities(data["capabilities"]))
                elif kind == REPORTED:
                    generation = _count(data["generation"])
                    if state[3] is None or generation >= state[3]:
                        state[3], state[4] = generation, _json(data["models"])
                        trust = data.get("trust") or {}
                        state[6], state[7] = trust.get("root_version"), trust.get("keyring_version")
                    online = True
                else:  # events
                    events.append(self._event_row(pk, data, now))
                    online = True
            except Refused as exc:
                self._drop(exc.reason, topic, str(exc))
                refusals[(device_id, exc.reason)] = refusals.get((device_id, exc.reason), 0) + 1
                # A refused window is still a sign of life from a known device.
                state[0] = state[0] or not retained
                continue
            except Exception as exc:  # one odd message must never stop the bridge
                self._drop("schema", topic, f"{type(exc).__name__}: {exc}")
                continue
            valid += 1
            # A retained message replayed at subscribe time is state, not a sign of life.
            if not retained:
                state[0] = True
                # A device that sends is online; a status message (incl. the last will)
                # says so explicitly, and the last one in the batch wins.
                state[1] = online
            elif kind == STATUS:
                state[1] = online
        devices = [(pk, *state) for pk, state in states.items()]
        refused = [(device_id, reason, count, now) for (device_id, reason), count in refusals.items()]
        return _Rows(telemetry, events, devices, refused, valid)

    def _telemetry_rows(self, pk: int, data: dict[str, Any], now: datetime) -> list[tuple]:
        """One row per model; the whole message is refused if any part breaks an invariant
        (a device that lies in one entry is not trusted for the others)."""
        message_id, ts, window_s = data["id"], protocol.parse_time(data["ts"]), _finite(data["window_s"])
        if not self.min_window_s <= window_s <= self.max_window_s:
            raise Refused(
                INVARIANT, f"window_s {window_s} outside [{self.min_window_s:g}, {self.max_window_s:g}]"
            )
        if ts > now + self.max_future:
            raise Refused(CLOCK, f"ts {data['ts']} is more than {self.max_future} ahead of the server")
        if ts < now - self.max_age:
            raise Refused(CLOCK, f"ts {data['ts']} is older than {self.max_age}")
        window_start = ts - timedelta(seconds=window_s)
        health = _health(data.get("health"))
        rows = []
        for model, entry in data["models"].items():
            latency = entry.get("latency_ms")
            p50 = p95 = p99 = None
            if latency is not None:
                p50, p95, p99 = _finite(latency["p50"]), _finite(latency["p95"]), _finite(latency["p99"])
            feedback = entry.get("feedback")
            labeled, correct = (feedback["labeled"], feedback["correct"]) if feedback else (0, 0)
            inferences, errors = _count(entry["inferences"]), _count(entry["errors"])
            if correct > labeled:
                raise Refused(INVARIANT, f"{model}: correct {correct} > labeled {labeled}")
            if errors > inferences:
                raise Refused(INVARIANT, f"{model}: errors {errors} > inferences {inferences}")
            rows.append(
                (
                    pk,
                    message_id,
                    ts,
                    window_start,
                    now,
                    window_s,
                    _name(model),
                    _name(entry["version"]),
                    entry["variant"],
                    inferences,
                    errors,
                    p50,
                    p95,
                    p99,
                    _count(labeled),
                    _count(correct),
                    *_shadow(model, entry.get("shadow")),
                    *health,
                )
            )
        return rows

    @staticmethod
    def _event_row(pk: int, data: dict[str, Any], now: datetime) -> tuple:
        generation = data.get("generation")
        delivery = data.get("delivery") or {}
        return (
            pk,
            data["id"],
            _name(data["type"], EVENT_TYPE_MAX),
            None if generation is None else _count(generation),
            _name(data.get("model") or ""),
            _name(data.get("version") or ""),
            _name(data.get("variant") or ""),
            _name(data.get("reason") or "", EVENT_REASON_MAX),
            data.get("message") or "",
            delivery.get("path", ""),
            _count(delivery["bytes"]) if delivery else None,
            _name(delivery.get("fallback") or "", EVENT_REASON_MAX),
            protocol.parse_time(data["ts"]),
            now,
        )

    # --- writing

    def _write_with_retries(
        self, parsed: list[Parsed], stop: threading.Event | None, give_up_after_s: float | None
    ) -> bool:
        """Write the batch; on a lost connection retry (with backoff) until it works, or
        until ``stop``/``give_up_after_s`` (then False: nothing is acknowledged)."""
        delay, started = 0.2, time.monotonic()
        while True:
            try:
                self._write(parsed)
                return True
            except (OperationalError, InterfaceError) as exc:
                # Lost connection, deadlock, server shutting down: all worth another try.
                self.counters.db_retries += 1
                log.warning("ingest: database write failed, retrying in %.1fs: %s", delay, exc)
                connection.close_if_unusable_or_obsolete()
                if (stop is not None and stop.is_set()) or (
                    give_up_after_s is not None and time.monotonic() - started > give_up_after_s
                ):
                    return False
                if stop is not None:
                    stop.wait(delay)
                else:
                    time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _write(self, parsed: list[Parsed]) -> None:
        """One transaction for the batch. A batch the database refuses (a device deleted
        under our cache, a value we failed to anticipate) is retried with a fresh cache,
        then split in halves until the message at fault is alone and dropped."""
        try:
            self._commit(parsed)
        except DATA_ERRORS:
            self._devices.clear()  # most likely a device deleted since we cached its pk
            self._bisect(parsed)

    def _bisect(self, parsed: list[Parsed]) -> None:
        try:
            self._commit(parsed)
        except DATA_ERRORS as exc:
            if len(parsed) == 1:
                self._drop("db_rejected", parsed[0][4], str(exc).strip())
                return
            middle = len(parsed) // 2
            self._bisect(parsed[:middle])
            self._bisect(parsed[middle:])

    def _commit(self, parsed: list[Parsed]) -> None:
        counters = self.counters
        # Counters of the drops found while building rows are kept only if the batch
        # commits, so a retried batch does not count its drops twice.
        before = {
            reason: getattr(counters, reason) for reason in ("unknown_device", "schema", INVARIANT, CLOCK)
        }
        now = timezone.now()
        try:
            connection.ensure_connection()
            self._ensure_temp_tables()
            rows = self._rows(parsed, now)
            with transaction.atomic(), connection.cursor() as wrapper, connection.wrap_database_errors:
                cursor = wrapper.cursor  # psycopg's own cursor, for COPY
                inserted = events = 0
                if rows.devices:
                    self._copy(cursor, "ingest_devices", rows.devices)
                    cursor.execute(LOCK_DEVICES)
                    cursor.execute(UPDATE_DEVICES, {"now": now})
                if rows.telemetry:
                    self._copy(cursor, "ingest_telemetry", rows.telemetry)
                    cursor.execute(INSERT_TELEMETRY)
                    inserted = cursor.fetchone()[0]
                if rows.events:
                    self._copy(cursor, "ingest_events", rows.events)
                    cursor.execute(INSERT_EVENTS)
                    events = cursor.rowcount
                if rows.refusals:
                    self._copy(cursor, "ingest_refusals", rows.refusals)
                    cursor.execute(UPSERT_REFUSALS)
        except BaseException:
            for reason, value in before.items():
                setattr(counters, reason, value)
            raise
        counters.committed += rows.messages
        counters.telemetry_rows += inserted
        counters.events += events
        counters.duplicate_rows += len(rows.telemetry) - inserted + len(rows.events) - events

    def _ensure_temp_tables(self) -> None:
        raw = connection.connection
        if self._temp_tables_on is raw:
            return
        with connection.cursor() as cursor:
            for statement in CREATE_TEMP_TABLES:
                cursor.execute(statement)
        self._temp_tables_on = raw

    @staticmethod
    def _copy(cursor, table: str, rows: list[tuple]) -> None:
        with cursor.copy(f"COPY {table} FROM STDIN") as copy:
            write = copy.write_row
            for row in rows:
                write(row)


# --- housekeeping (Celery beat, fleet/devices/tasks.py)


def _day_start(day: date) -> datetime:
    return datetime.combine(day, dt_time.min, tzinfo=UTC)


def _partitions(cursor) -> dict[str, date]:
    """The day partitions of devices_telemetrywindow, name -> day (DEFAULT left out)."""
    cursor.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'devices_telemetrywindow'::regclass"
    )
    days = {}
    for (name,) in cursor.fetchall():
        if name.startswith(PARTITION_PREFIX):
            days[name] = datetime.strptime(name[len(PARTITION_PREFIX) :], "%Y%m%d").date()
    return days


def telemetry_partitions_ensure(
    *, now: datetime | None = None, first_day: date | None = None, using: str = "default"
) -> list[str]:
    """Make the day partitions of devices_telemetrywindow from ``first_day`` (default: the
    oldest window start the invariants let in) to PARTITION_DAYS_AHEAD days after today.
    Idempotent, and safe to run from several processes (an advisory lock). Rows that landed
    in the DEFAULT partition for such a day are moved into it: the table is built aside and
    attached, which locks the parent less than CREATE … PARTITION OF. Returns the names made."""
    db = connections[using]
    if db.vendor != "postgresql":
        return []
    now = now or timezone.now()
    if first_day is None:
        oldest = now - timedelta(seconds=settings.INGEST_MAX_AGE_S + settings.INGEST_MAX_WINDOW_S)
        first_day = min(oldest.astimezone(UTC).date(), (now - timedelta(days=2)).astimezone(UTC).date())
    last_day = (now + timedelta(days=PARTITION_DAYS_AHEAD)).astimezone(UTC).date()
    made = []
    with db.cursor() as cursor:
        existing = _partitions(cursor)
        day = first_day
        while day <= last_day:
            name = f"{PARTITION_PREFIX}{day:%Y%m%d}"
            if name not in existing and _partition_create(cursor, using, name, day):
                made.append(name)
            day += timedelta(days=1)
    if made:
        log.info("telemetry partitions: made %s", ", ".join(made))
    return made


def _partition_create(cursor, using: str, name: str, day: date) -> bool:
    start, end = _day_start(day).isoformat(), _day_start(day + timedelta(days=1)).isoformat()
    with transaction.atomic(using=using):
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext('devices_telemetrywindow partitions'))")
        cursor.execute("SELECT to_regclass(%s)", [name])
        if cursor.fetchone()[0] is not None:
            return False  # another process made it meanwhile
        cursor.execute(
            f"CREATE TABLE {name} (LIKE devices_telemetrywindow INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        )
        cursor.execute(
            "WITH moved AS (DELETE FROM devices_telemetrywindow_default "
            "WHERE window_start >= %s AND window_start < %s RETURNING *) "
            f"INSERT INTO {name} SELECT * FROM moved",
            [start, end],
        )
        cursor.execute(
            f"ALTER TABLE devices_telemetrywindow ATTACH PARTITION {name} "
            f"FOR VALUES FROM ('{start}') TO ('{end}')"
        )
    return True


def telemetry_cleanup(*, now: datetime | None = None, chunk_size: int = 10_000) -> dict[str, int]:
    """Retention. Telemetry windows: drop the day partitions that end before
    TELEMETRY_RETENTION_DAYS ago (by window start, which the ingest invariants keep within
    a day of the server clock), and delete such rows from the DEFAULT partition. Hourly sums
    go after TELEMETRY_HOURLY_RETENTION_DAYS; events (by receive time) and per-device
    refusal counts (by their last refusal) after TELEMETRY_RETENTION_DAYS, in chunks so that
    no transaction holds locks on millions of rows."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=settings.TELEMETRY_RETENTION_DAYS)
    deleted = {"telemetry_partitions": 0, "telemetrywindow": 0}
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            for name, day in sorted(_partitions(cursor).items()):
                if _day_start(day + timedelta(days=1)) <= cutoff:
                    cursor.execute(f"DROP TABLE IF EXISTS {name}")
                    deleted["telemetry_partitions"] += 1
            cursor.execute("DELETE FROM devices_telemetrywindow_default WHERE window_start < %s", [cutoff])
            deleted["telemetrywindow"] = cursor.rowcount
    else:
        deleted["telemetrywindow"] = _delete_chunked(TelemetryWindow, "window_start", cutoff, chunk_size)
    hourly_cutoff = now - timedelta(days=settings.TELEMETRY_HOURLY_RETENTION_DAYS)
    deleted["telemetryhourly"] = _delete_chunked(TelemetryHourly, "hour", hourly_cutoff, chunk_size)
    deleted["deviceevent"] = _delete_chunked(DeviceEvent, "received_at", cutoff, chunk_size)
    deleted["ingestrefusal"] = _delete_chunked(IngestRefusal, "last_at", cutoff, chunk_size)
    if any(deleted.values()):
        log.info("telemetry cleanup: deleted %s (older than %s)", deleted, cutoff.isoformat())
    return deleted


def _delete_chunked(model, field: str, cutoff: datetime, chunk_size: int) -> int:
    total = 0
    while True:
        chunk = model.objects.filter(**{f"{field}__lt": cutoff}).values("pk")[:chunk_size]
        count, _ = model.objects.filter(pk__in=chunk).delete()
        total += count
        if count < chunk_size:
            return total


def devices_mark_stale(*, now: datetime | None = None) -> int:
    """Mark offline the devices said to be online but silent for DEVICE_STALE_SECONDS (a
    lost last will, a bridge that was down). Compare-and-set: a device the bridge has
    just heard from is not matched any more. Returns how many were marked."""
    cutoff = (now or timezone.now()) - timedelta(seconds=settings.DEVICE_STALE_SECONDS)
    with transaction.atomic():
        # Locked in id order like the bridge's batches; the lock re-checks the condition on
        # a row a batch has just updated.
        stale = devices_locked(Device.objects.filter(online=True).exclude(last_seen_at__gte=cutoff))
        return Device.objects.filter(any_of("pk", stale)).update(online=False) if stale else 0
