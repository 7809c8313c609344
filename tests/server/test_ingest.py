"""The ingest bridge (fleet/devices/ingest.py) against the real Mosquitto of the session
fixture (project config: dynamic security, per-device credentials, 256 KiB packet limit)
and PostgreSQL. Devices publish with their own credentials, as agents do; bridges run in a
thread of the test process, or as `manage.py mqtt_ingest` when a test kills one."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from django.db import connection
from django.db.models import Sum
from django.utils import timezone
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet.devices import ingest, tasks
from fleet.devices.choices import DeviceStatus
from fleet.devices.ingest import Counters, IngestBridge
from fleet.devices.models import Device, DeviceEvent, TelemetryHourly, TelemetryWindow
from tests.conftest import ROOT, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

TOPIC = "fleet/v1/devices/{}/{}"


def utc_now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def telemetry(message_id: str | None = None, *, inferences: int = 100, p95: float = 2.0, **extra) -> dict:
    return {
        "id": message_id or uuid.uuid4().hex,
        "ts": utc_now(),
        "window_s": 30,
        "models": {
            "digits": {
                "version": "1.4.0",
                "variant": "int8",
                "inferences": inferences,
                "errors": 1,
                "latency_ms": {"p50": 1.0, "p95": p95, "p99": p95 + 1},
                "feedback": {"labeled": 10, "correct": 9},
            }
        },
        "health": {"cpu_pct": 12.5, "rss_mb": 61.2},
        **extra,
    }


@dataclass
class FakeDevice:
    """A device's MQTT connection with its own broker credential and a last will, like the
    agent's (agent/mqtt.py)."""

    device_id: str
    client: mqtt.Client
    disconnected: threading.Event = field(default_factory=threading.Event)

    def publish(self, kind: str, body: dict | bytes, *, retain: bool = False) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        info = self.client.publish(TOPIC.format(self.device_id, kind), payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), f"the broker did not acknowledge {kind} from {self.device_id}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect_device(broker, device_id: str) -> FakeDevice:
    password = secrets.token_urlsafe(12)
    broker.admin().ensure_device(device_id, password)
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=device_id,
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=False,
    )
    client.username_pw_set(device_id, password)
    client.will_set(TOPIC.format(device_id, "status"), json.dumps({"online": False}), qos=1, retain=True)
    device = FakeDevice(device_id, client)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.on_disconnect = lambda *args: device.disconnected.set()
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    assert connected.wait(10), f"{device_id} could not connect"
    return device


@pytest.fixture
def devices(broker):
    """Factory: a Device row (active unless told otherwise) and its MQTT connection."""
    made: list[FakeDevice] = []

    def make(name: str, status: str | None = DeviceStatus.ACTIVE) -> FakeDevice:
        device_id = f"{name}-{uuid.uuid4().hex[:6]}"
        if status is not None:
            Device.objects.create(device_id=device_id, status=status)
        device = connect_device(broker, device_id)
        made.append(device)
        return device

    yield make
    for device in made:
        device.close()


@pytest.fixture(scope="module")
def marker(broker):
    """A device with credentials and no Device row: its garbage marks a point in the stream."""
    device = connect_device(broker, f"marker-{uuid.uuid4().hex[:6]}")
    yield device
    device.close()


class Bridge:
    """An IngestBridge running in a thread; ``delta`` counts from when it was settled (the
    retained status/reported messages of other tests' devices, replayed at subscribe time,
    are behind it)."""

    def __init__(self, broker, client_id: str | None = None, **options) -> None:
        self.bridge = IngestBridge(
            client_id=client_id or f"test-ingest-{uuid.uuid4().hex[:8]}",
            url=broker.url,
            username="fleet-ingest",
            password=broker.ingest_password,
            flush_ms=options.pop("flush_ms", 30),
            session_expiry_s=options.pop("session_expiry_s", 0),  # no session left behind
            # These tests stream far faster than an agent (one window per 30 s) does; the
            # per-device limit has tests of its own (test_ingest_limits.py).
            device_rate=options.pop("device_rate", 100_000),
            device_burst=options.pop("device_burst", 100_000),
            **options,
        )
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.baseline = Counters()

    def _run(self) -> None:
        try:
            self.bridge.run(self.stop)
        except BaseException as exc:
            self.error = exc

    @property
    def counters(self) -> Counters:
        return self.bridge.counters

    def start(self, marker: FakeDevice | None = None) -> Bridge:
        """Start; with a ``marker``, return once the replayed retained messages are counted
        (a second bridge in the same group may get the marker instead: no marker then)."""
        self.thread.start()
        wait_until(self.bridge.subscribed.is_set, timeout=10, message="the bridge to subscribe")
        if marker is None:
            self.baseline = self.snapshot()
            return self
        malformed = self.counters.malformed
        marker.publish("telemetry", b"marker, not JSON")

        def settled() -> Counters | None:
            # The marker is counted, and so is the rest of its batch.
            counters = self.snapshot()
            done = counters.received == counters.committed + counters.dropped_by_writer
            return counters if done and counters.malformed > malformed else None

        self.baseline = wait_until(settled, timeout=10, message="the marker")
        return self

    def snapshot(self) -> Counters:
        return replace(self.counters)

    def delta(self, name: str) -> int:
        return getattr(self.counters, name) - getattr(self.baseline, name)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), "the bridge did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def bridge(broker, marker):
    running = Bridge(broker).start(marker)
    yield running
    running.close()


def rows_of(device: FakeDevice):
    return TelemetryWindow.objects.filter(device__device_id=device.device_id)


def test_it_keeps_each_windows_health_and_sums_it_per_hour(bridge, devices):
    """CPU, RSS and temperature for the device page's sparklines: per window, and per hour
    as a sum with its number of windows; a figure that is missing or not a number is left
    out (None), never the window."""
    cam = devices("cam")
    cam.publish("telemetry", telemetry(health={"cpu_pct": 10.0, "rss_mb": 60.0, "temp_c": 50.5}))
    cam.publish("telemetry", telemetry(health={"cpu_pct": 20.0, "rss_mb": 64.0}))
    cam.publish("telemetry", telemetry(health={"cpu_pct": "hot", "rss_mb": True, "temp_c": 51.5}))
    wait_until(lambda: rows_of(cam).count() == 3, timeout=10, message="three windows")
    health = sorted(rows_of(cam).values_list("cpu_pct", "rss_mb", "temp_c"), key=str)
    assert health == sorted([(10.0, 60.0, 50.5), (20.0, 64.0, None), (None, None, 51.5)], key=str)
    hourly = TelemetryHourly.objects.filter(device__device_id=cam.device_id).aggregate(
        cpu=Sum("cpu_pct_sum"),
        cpu_n=Sum("cpu_pct_windows"),
        rss=Sum("rss_mb_sum"),
        rss_n=Sum("rss_mb_windows"),
        temp=Sum("temp_c_sum"),
        temp_n=Sum("temp_c_windows"),
        windows=Sum("windows"),
    )
    assert hourly == {
        "cpu": 30.0,
        "cpu_n": 2,
        "rss": 124.0,
        "rss_n": 2,
        "temp": 102.0,
        "temp_n": 2,
        "windows": 3,
    }


def test_it_writes_telemetry_events_and_reported_state_from_several_devices(bridge, devices):
    cam, gate = devices("cam"), devices("gate")
    for p95 in (2.0, 4.0):
        cam.publish("telemetry", telemetry(inferences=100, p95=p95))
    gate.publish("telemetry", telemetry(inferences=300, p95=8.0))
    gate.publish(
        "reported",
        {"generation": 7, "ts": utc_now(), "models": {"digits": {"version": "1.4.0", "variant": "int8"}}},
        retain=True,
    )
    gate.publish(
        "events",
        {
            "id": "ev-1",
            "ts": utc_now(),
            "type": "swap",
            "generation": 7,
            "model": "digits",
            "version": "1.4.0",
            "variant": "int8",
        },
    )

    wait_until(
        lambda: TelemetryWindow.objects.count() == 3 and DeviceEvent.objects.exists(),
        timeout=10,
        message="rows",
    )
    wait_until(
        lambda: Device.objects.get(device_id=gate.device_id).applied_generation == 7,
        timeout=10,
        message="reported state",
    )

    window = rows_of(gate).get()
    assert (window.model, window.version, window.variant) == ("digits", "1.4.0", "int8")
    assert (window.inferences, window.errors, window.labeled, window.correct) == (300, 1, 10, 9)
    assert (window.latency_p50_ms, window.latency_p95_ms, window.latency_p99_ms) == (1.0, 8.0, 9.0)
    assert window.window_s == 30
    assert window.window_start == window.ts - timedelta(seconds=30)
    assert window.shadow_version == "" and window.shadow_sampled == 0
    # Hourly sums per device, by the hour the window began.
    hourly = TelemetryHourly.objects.filter(device__device_id=cam.device_id)
    sums = hourly.aggregate(
        windows=Sum("windows"),
        inferences=Sum("inferences"),
        errors=Sum("errors"),
        labeled=Sum("labeled"),
        correct=Sum("correct"),
        p95_sum=Sum("latency_p95_weighted_sum"),
        p95_weight=Sum("latency_p95_weight"),
    )
    assert sums == {
        "windows": 2,
        "inferences": 200,
        "errors": 2,
        "labeled": 20,
        "correct": 18,
        "p95_sum": 100 * 2.0 + 100 * 4.0,
        "p95_weight": 200,
    }
    row = TelemetryHourly.objects.get(device__device_id=gate.device_id)
    assert (row.model, row.version, row.variant, row.shadow_version) == ("digits", "1.4.0", "int8", "")
    assert row.hour == window.window_start.replace(minute=0, second=0, microsecond=0)
    assert (row.windows, row.inferences, row.latency_p95_weighted_sum, row.latency_p95_max_ms) == (
        1,
        300,
        300 * 8.0,
        8.0,
    )
    event = DeviceEvent.objects.get()
    assert (event.device.device_id, event.message_id, event.type, event.generation) == (
        gate.device_id,
        "ev-1",
        "swap",
        7,
    )
    state = Device.objects.get(device_id=gate.device_id)
    assert state.reported_models == {"digits": {"version": "1.4.0", "variant": "int8"}}
    assert state.health == {"cpu_pct": 12.5, "rss_mb": 61.2}
    assert state.online and state.last_seen_at is not None
    assert bridge.delta("dropped") == 0


def test_it_marks_devices_online_and_offline_from_status_and_the_last_will(bridge, devices):
    cam, gate = devices("cam"), devices("gate")
    for device in (cam, gate):
        device.publish("status", {"online": True, "agent_version": "0.3.0", "ts": utc_now()}, retain=True)
    wait_until(lambda: Device.objects.filter(online=True).count() == 2, timeout=10, message="both online")
    assert Device.objects.get(device_id=cam.device_id).agent_version == "0.3.0"

    gate.publish("status", {"online": False, "ts": utc_now()}, retain=True)  # a clean stop
    # A power cut: the connection drops without DISCONNECT, the broker publishes the will.
    cam.client.loop_stop()
    cam.client.socket().close()

    wait_until(lambda: not Device.objects.filter(online=True).exists(), timeout=15, message="both offline")


def test_it_counts_and_drops_bad_messages_while_good_ones_keep_flowing(bridge, devices):
    cam = devices("cam")
    stranger = devices("stranger", status=None)  # credentials, but no Device row
    retired = devices("retired", status=DeviceStatus.RETIRED)
    disabled = devices("disabled", status=DeviceStatus.DISABLED)

    cam.publish("telemetry", b"{not json")
    cam.publish("telemetry", telemetry())
    cam.publish("telemetry", {"id": "x", "ts": utc_now(), "models": {}})  # no window_s
    cam.publish("events", {"id": "e", "ts": utc_now(), "type": "t" * 33})  # longer than the column
    cam.publish("telemetry", telemetry(padding="x" * 200_000))  # 200 KB: over the bridge's limit
    cam.publish("telemetry", telemetry())
    stranger.publish("telemetry", telemetry())
    retired.publish("telemetry", telemetry())
    disabled.publish("events", {"id": "e", "ts": utc_now(), "type": "swap"})
    cam.publish("telemetry", telemetry())

    wait_until(lambda: rows_of(cam).count() == 3, timeout=10, message="good messages")
    wait_until(lambda: bridge.delta("dropped") == 7, timeout=10, message="drops")
    assert bridge.delta("malformed") == 1
    assert bridge.delta("schema") == 2
    assert bridge.delta("too_large") == 1
    assert bridge.delta("unknown_device") == 3
    assert bridge.delta("committed") == 3
    assert TelemetryWindow.objects.count() == 3


def test_it_keeps_going_when_the_broker_refuses_a_1mb_payload(bridge, devices):
    cam, gate = devices("cam"), devices("gate")
    cam.client.publish(TOPIC.format(cam.device_id, "telemetry"), b"x" * 1024 * 1024, qos=1)
    assert cam.disconnected.wait(10), "the broker should drop a client that sends a 1 MB packet"

    gate.publish("telemetry", telemetry())
    wait_until(lambda: rows_of(gate).exists(), timeout=10, message="the next message")
    assert bridge.delta("dropped") == 0  # the bridge never saw the 1 MB message


def test_it_does_not_count_a_redelivered_message_twice(bridge, devices):
    cam = devices("cam")
    window = telemetry("window-1", inferences=100)
    event = {"id": "event-1", "ts": utc_now(), "type": "verify"}
    for _ in range(2):
        cam.publish("telemetry", window)
        cam.publish("events", event)
    cam.publish("telemetry", telemetry("window-2", inferences=1))

    wait_until(lambda: bridge.delta("committed") == 5, timeout=10, message="five messages")
    assert rows_of(cam).count() == 2
    assert DeviceEvent.objects.count() == 1
    hourly = TelemetryHourly.objects.aggregate(windows=Sum("windows"), inferences=Sum("inferences"))
    assert hourly == {"windows": 2, "inferences": 101}
    assert bridge.delta("duplicate_rows") == 2


def test_several_bridges_split_the_load(bridge, broker, devices):
    second = Bridge(broker)
    try:
        second.start()
        cam, gate = devices("cam"), devices("gate")
        for _ in range(100):
            cam.publish("telemetry", telemetry())
            gate.publish("telemetry", telemetry())
        wait_until(lambda: TelemetryWindow.objects.count() == 200, timeout=15, message="200 rows")
    finally:
        second.close()
    assert bridge.delta("committed") > 0 and second.delta("committed") > 0
    assert bridge.delta("committed") + second.delta("committed") == 200
    assert TelemetryHourly.objects.aggregate(windows=Sum("windows"))["windows"] == 200


def test_a_device_deleted_while_cached_is_counted_as_unknown(bridge, devices):
    cam, gate = devices("cam"), devices("gate")
    cam.publish("telemetry", telemetry())
    wait_until(lambda: rows_of(cam).exists(), timeout=10, message="the first window")
    Device.objects.filter(device_id=cam.device_id).delete()  # the bridge still has its pk

    cam.publish("telemetry", telemetry())
    gate.publish("telemetry", telemetry())
    wait_until(lambda: rows_of(gate).exists(), timeout=10, message="the other device's window")
    wait_until(lambda: bridge.delta("unknown_device") == 1, timeout=10, message="the drop")
    assert bridge.delta("db_rejected") == 0


def test_it_retries_a_lost_database_connection_and_loses_nothing(bridge, devices):
    cam = devices("cam")
    cam.publish("telemetry", telemetry())
    wait_until(lambda: rows_of(cam).exists(), timeout=10, message="the first window")
    with connection.cursor() as cursor:  # a database restart, as far as the bridge can tell
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    for _ in range(5):
        cam.publish("telemetry", telemetry())
    wait_until(lambda: rows_of(cam).count() == 6, timeout=15, message="the windows after the restart")
    assert bridge.delta("db_retries") >= 1
    assert bridge.delta("dropped") == 0


def test_it_stops_with_an_error_when_the_broker_refuses_its_subscriptions(broker):
    password = secrets.token_urlsafe(12)
    broker.admin().ensure_device("not-the-bridge", password)  # a device may not subscribe
    bridge = IngestBridge(
        client_id="not-the-bridge", url=broker.url, username="not-the-bridge", password=password
    )
    with pytest.raises(ingest.IngestError, match="refused subscriptions"):
        bridge.run(threading.Event())


def test_after_it_subscribes_it_asks_devices_to_replay_what_it_may_have_missed(broker, devices, settings):
    """docs/protocol.md, addition 7: on every (re)subscription, a retained replay request
    naming a time shortly before the last message the bridge received."""
    settings.INGEST_REPLAY_MARGIN_S = 60.0
    watcher = devices("watcher")  # a device may read the replay topic
    requests: list[dict] = []
    got = threading.Event()

    def on_replay(client, userdata, message):
        if message.payload:
            requests.append(json.loads(message.payload))
            got.set()

    watcher.client.message_callback_add("fleet/v1/replay", on_replay)
    started = datetime.now(UTC)
    running = Bridge(broker).start()
    try:
        watcher.client.subscribe("fleet/v1/replay", qos=1)
        wait_until(lambda: any(r.get("since") for r in requests), timeout=10, message="a replay request")
        request = requests[-1]
        since = datetime.fromisoformat(request["since"])
        assert started - timedelta(seconds=62) <= since <= datetime.now(UTC) - timedelta(seconds=58)
        assert running.bridge.replays_requested == 1 and len(request["id"]) == 32
    finally:
        running.close()


# --- a bridge process killed mid-stream


def end_session(broker, client_id: str) -> None:
    """Remove a bridge's persistent session, so that the broker stops sending it a share."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set("fleet-ingest", broker.ingest_password)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 0
    client.connect("127.0.0.1", broker.port, clean_start=True, properties=properties)
    client.loop_start()
    assert connected.wait(10)
    client.disconnect()
    client.loop_stop()


class BridgeProcess:
    def __init__(self, broker, client_id: str, log_path: Path) -> None:
        self.log_path = log_path
        env = {
            **os.environ,
            "DATABASE_URL": os.environ["DATABASE_URL"].rsplit("/", 1)[0]
            + "/"
            + connection.settings_dict["NAME"],
            "MQTT_URL": broker.url,
            "MQTT_INGEST_PASSWORD": broker.ingest_password,
            "INGEST_BATCH_SIZE": "100",  # many commits while the stream runs
            "INGEST_FLUSH_MS": "20",
            "INGEST_DEVICE_RATE": "100000",  # three devices stream flat out
            "INGEST_DEVICE_BURST": "100000",
        }
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "manage.py",
                    "mqtt_ingest",
                    "--client-id",
                    client_id,
                    "--session-expiry",
                    "60",
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._subscribed, timeout=30, message="the bridge process to subscribe")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def _subscribed(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"mqtt_ingest exited:\n{self.log()}")
        return "ingest: subscribed" in self.log()

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.process.wait(20)


class Stream:
    """Devices publishing telemetry back to back in a thread, up to ``limit`` messages;
    ``acked`` holds the ids the broker acknowledged (QoS 1 PUBACK). While ``paced``, it
    stays at most 200 messages ahead of what is committed, so that what a killed bridge
    leaves unacknowledged, plus what follows, fits in the broker's queue for its session."""

    def __init__(self, devices: list[FakeDevice], limit: int = 100_000) -> None:
        self.devices, self.limit = devices, limit
        self.paced = True
        self.acked: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            index = 0
            while index < self.limit:
                if self.paced and index % 50 == 0:
                    wait_until(
                        lambda: not self.paced or TelemetryWindow.objects.count() >= len(self.acked) - 150,
                        timeout=20,
                        message="the bridge to keep up",
                    )
                device = self.devices[index % len(self.devices)]
                message_id = f"{device.device_id}-{index}"
                info = device.client.publish(
                    TOPIC.format(device.device_id, "telemetry"), json.dumps(telemetry(message_id)), qos=1
                )
                info.wait_for_publish(10)
                if info.is_published():
                    self.acked.append(message_id)
                index += 1
        finally:
            connection.close()

    def stop(self) -> None:
        self.limit = 0
        self.thread.join(20)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_killed_bridge_loses_nothing_the_broker_acknowledged(broker, devices, tmp_path, signum):
    client_id = f"test-ingest-proc-{uuid.uuid4().hex[:6]}"
    senders = [devices(f"cam{i}") for i in range(3)]
    first = BridgeProcess(broker, client_id, tmp_path / "first.log")
    stream = Stream(senders)
    try:
        wait_until(lambda: TelemetryWindow.objects.count() >= 100, timeout=20, message="the stream to flow")
        # 300 more while the bridge stops and stays down: they wait in its session (the
        # broker queues up to max_queued_messages, 1000, for an absent client).
        stream.paced = False
        stream.limit = len(stream.acked) + 300
        exit_code = first.stop(signum)
        if signum == signal.SIGTERM:
            assert exit_code == 0, first.log()
            assert f"ingest bridge {client_id} stopped: received=" in first.log()
        stream.thread.join(20)
        committed_by_first = TelemetryWindow.objects.count()
        assert committed_by_first < len(stream.acked), "the bridge should stop in the middle of the stream"
        second = BridgeProcess(broker, client_id, tmp_path / "second.log")
        try:
            wait_until(
                lambda: TelemetryWindow.objects.count() >= len(stream.acked),
                timeout=30,
                message="the whole stream",
            )
        finally:
            assert second.stop(signal.SIGTERM) == 0
    finally:
        stream.stop()
        if first.process.poll() is None:
            first.process.kill()
        end_session(broker, client_id)

    ids = list(TelemetryWindow.objects.values_list("message_id", flat=True))
    assert len(ids) == len(set(ids)) == len(stream.acked)
    assert set(ids) == set(stream.acked)
    assert TelemetryHourly.objects.aggregate(windows=Sum("windows"))["windows"] == len(stream.acked)
    if signum == signal.SIGTERM:
        # A clean stop acknowledged everything it had committed: nothing came back twice.
        assert " duplicates=0 " in second.log(), second.log()


# --- beat tasks


def test_mark_stale_sets_silent_devices_offline():
    now = timezone.now()
    silent = Device.objects.create(device_id="silent", online=True, last_seen_at=now - timedelta(minutes=10))
    never_seen = Device.objects.create(device_id="never-seen", online=True)
    talking = Device.objects.create(device_id="talking", online=True, last_seen_at=now - timedelta(seconds=5))
    offline = Device.objects.create(device_id="offline", online=False, last_seen_at=now - timedelta(days=1))

    assert tasks.devices_mark_stale() == 2

    online = dict(Device.objects.values_list("device_id", "online"))
    assert online == {
        silent.device_id: False,
        never_seen.device_id: False,
        talking.device_id: True,
        offline.device_id: False,
    }
    assert tasks.devices_mark_stale() == 0


def test_cleanup_deletes_what_is_older_than_the_retention(settings):
    """Telemetry windows go by whole day partitions of their window start (and from the
    DEFAULT partition row by row); hourly sums, events and refusal counts by age."""
    settings.TELEMETRY_RETENTION_DAYS = 7
    settings.TELEMETRY_HOURLY_RETENTION_DAYS = 30
    device = Device.objects.create(device_id="cam", status=DeviceStatus.ACTIVE)
    now = timezone.now()
    ingest.telemetry_partitions_ensure(now=now, first_day=(now - timedelta(days=9)).date())
    old, recent, ancient = now - timedelta(days=8, hours=1), now - timedelta(days=6), now - timedelta(days=40)
    for index, when in enumerate([old, old, ancient, recent]):
        TelemetryWindow.objects.create(
            device=device,
            message_id=f"w{index}",
            ts=when,
            window_start=when - timedelta(seconds=30),
            received_at=now,
            window_s=30,
            model="digits",
            version="1.4.0",
            variant="int8",
            inferences=1,
            errors=0,
        )
        DeviceEvent.objects.create(
            device=device, message_id=f"e{index}", type="swap", ts=when, received_at=when
        )
        TelemetryHourly.objects.create(
            device=device,
            hour=(when - timedelta(days=index * 10)).replace(minute=0, second=0, microsecond=0),
            model="digits",
            version="1.4.0",
            variant="int8",
        )
    old_partition = f"devices_telemetrywindow_p{(old - timedelta(seconds=30)).date():%Y%m%d}"
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s)", [old_partition])
        assert cursor.fetchone()[0] == old_partition

    deleted = ingest.telemetry_cleanup(now=now, chunk_size=2)

    # The partitions of the days before the retention went whole (the windows 8 days old
    # with them; other tests may have made older ones); the 40-day-old window was in DEFAULT.
    assert deleted["telemetry_partitions"] >= 2
    assert deleted["telemetrywindow"] == 1
    assert deleted["deviceevent"] == 3
    # Hours 0, 10, 20 and 30 days before each window: those beyond 30 days go.
    assert deleted["telemetryhourly"] == 2
    assert list(TelemetryWindow.objects.values_list("message_id", flat=True)) == ["w3"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s)", [old_partition])
        assert cursor.fetchone()[0] is None
    assert DeviceEvent.objects.get().received_at == recent
    # Idempotent; the partitions of the days ahead are still there to write into.
    again = tasks.telemetry_cleanup()
    assert again["telemetry_partitions"] == again["telemetrywindow"] == again["deviceevent"] == 0
    assert tasks.telemetry_partitions() == []


def test_partitions_are_made_ahead_and_rows_parked_in_default_move_into_theirs():
    device = Device.objects.create(device_id="cam", status=DeviceStatus.ACTIVE)
    now = timezone.now()
    far = now + timedelta(days=10)  # beyond the partitions made ahead: lands in DEFAULT
    TelemetryWindow.objects.create(
        device=device,
        message_id="far",
        ts=far,
        window_start=far,
        received_at=now,
        window_s=30,
        model="digits",
        version="1.4.0",
        variant="int8",
        inferences=1,
        errors=0,
    )

    def partition_of(message_id: str) -> str:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT tableoid::regclass::text FROM devices_telemetrywindow WHERE message_id = %s",
                [message_id],
            )
            return cursor.fetchone()[0]

    assert partition_of("far") == "devices_telemetrywindow_default"
    made = ingest.telemetry_partitions_ensure(now=far)
    assert f"devices_telemetrywindow_p{far.date():%Y%m%d}" in made
    assert partition_of("far") == f"devices_telemetrywindow_p{far.date():%Y%m%d}"
    assert ingest.telemetry_partitions_ensure(now=far) == []  # idempotent


def test_it_keeps_what_a_device_says_it_can_run_and_refuses_op_names_tflite_lacks(bridge, devices):
    cam, gate = devices("cam"), devices("gate")
    capabilities = {
        "hardware": "jetson",
        "runtime": "tflite_runtime",
        "runtime_version": "2.14.0",
        "int8": False,
        "unsupported_ops": ["gelu", "CUSTOM:MyOp"],
    }
    cam.publish("status", {"online": True, "ts": utc_now(), "capabilities": capabilities}, retain=True)
    gate.publish(
        "status",
        {
            "online": True,
            "ts": utc_now(),
            "capabilities": {"hardware": "rpi4", "unsupported_ops": ["NOT_AN_OP"]},
        },
        retain=True,
    )
    wait_until(
        lambda: Device.objects.filter(hardware="jetson").exists(), timeout=10, message="cam's capabilities"
    )
    wait_until(lambda: bridge.delta("dropped") == 1, timeout=10, message="gate's status dropped")
    saved = Device.objects.get(device_id=cam.device_id)
    assert (saved.runtime, saved.runtime_version, saved.supports_int8) == ("tflite_runtime", "2.14.0", False)
    assert saved.unsupported_ops == ["CUSTOM:MyOp", "GELU"]
    assert Device.objects.get(device_id=gate.device_id).hardware != "rpi4"  # the whole status was refused
