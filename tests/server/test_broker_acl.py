"""The broker ACL, tried as an attacker with a stolen device credential would, with a real
client against a real Mosquitto running the project's configuration."""

import threading
import uuid

import pytest

from fleet.mqtt.broker import BrokerError, mqtt_client
from tests.conftest import wait_until
from tests.server.conftest import enroll

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]


class Client:
    """A device connected with its enrolled credentials, recording broker answers."""

    def __init__(self, broker, answer):
        mqtt = answer["mqtt"]
        self.device_id = answer["device_id"]
        # Where a device connects: the TLS listener the enrollment answer names.
        self.client = mqtt_client(
            mqtt["url"],
            client_id=mqtt["username"],
            username=mqtt["username"],
            password=mqtt["password"],
            ca_file=broker.ca_file,
        )
        self.acks: dict[int, object] = {}
        self.acked = threading.Condition()
        self.messages: list = []
        self.client.on_subscribe = self._on_ack
        self.client.on_publish = self._on_ack
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))

    def _on_ack(self, client, userdata, mid, reason, properties):
        with self.acked:
            self.acks[mid] = reason[0] if isinstance(reason, list) else reason
            self.acked.notify_all()

    def _wait(self, mid):
        with self.acked:
            assert self.acked.wait_for(lambda: mid in self.acks, timeout=10)
            return self.acks[mid]

    def subscribe(self, topic: str):
        return self._wait(self.client.subscribe(topic, qos=1)[1])

    def publish(self, topic: str, payload: bytes = b"{}"):
        return self._wait(self.client.publish(topic, payload, qos=1).mid)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def devices(anonymous, enrollment_key, broker):
    connected = []
    for name in ("a", "b"):
        answer = enroll(
            anonymous, f"acl-{name}-{uuid.uuid4().hex[:6]}", enrollment_token=enrollment_key
        ).json()
        connected.append(Client(broker, answer))
    yield connected
    for client in connected:
        client.close()


@pytest.fixture
def watcher(broker):
    """The ingest service account: sees every device->plane message that got through."""
    seen = []
    client = mqtt_client(
        broker.url,
        client_id=f"w-{uuid.uuid4().hex[:6]}",
        username="fleet-ingest",
        password=broker.ingest_password,
    )
    client.on_message = lambda c, u, m: seen.append(m.topic)
    done = threading.Event()
    client.on_subscribe = lambda *args: done.set()
    client.subscribe(
        [(f"fleet/v1/devices/+/{kind}", 1) for kind in ("status", "reported", "events", "telemetry")]
    )
    assert done.wait(10)
    yield seen
    client.disconnect()
    client.loop_stop()


def topic(device, kind):
    return f"fleet/v1/devices/{device.device_id}/{kind}"


def test_a_device_reads_its_own_desired_and_the_trust_bundle_and_nothing_else(devices):
    a, b = devices
    assert not a.subscribe(topic(a, "desired")).is_failure
    assert not a.subscribe("fleet/v1/trust").is_failure
    assert not a.subscribe("fleet/v1/replay").is_failure
    for forbidden in (
        topic(b, "desired"),
        "#",
        "fleet/v1/devices/+/desired",
        topic(b, "telemetry"),
        "$SYS/#",
        f"$share/x/{topic(b, 'desired')}",
        "fleet/v1/+",
    ):
        assert a.subscribe(forbidden).is_failure, forbidden


def test_a_device_writes_only_its_own_four_topics(devices, watcher):
    a, b = devices
    for kind in ("status", "reported", "events", "telemetry"):
        assert not a.publish(topic(a, kind)).is_failure
    assert a.publish(topic(b, "telemetry")).is_failure  # forging another device
    assert a.publish(topic(a, "desired")).is_failure  # commanding itself
    assert a.publish("fleet/v1/trust").is_failure  # a trust bundle of its own
    assert a.publish("fleet/v1/replay").is_failure  # making every device resend
    assert a.publish("fleet/v1/elsewhere").is_failure
    # The broker forwards one publisher's messages in order: once a's last one has reached
    # the watcher, anything forged before it would have too.
    assert not a.publish(topic(a, "status"), b"last").is_failure
    wait_until(
        lambda: watcher.count(topic(a, "status")) == 2,
        timeout=10,
        message=f"a's last message; seen {watcher}",
    )
    assert {topic(a, kind) for kind in ("reported", "events", "telemetry")} <= set(watcher)
    assert topic(b, "telemetry") not in watcher
    assert topic(a, "desired") not in watcher


def test_the_publisher_account_may_only_publish_desired_states_and_the_trust_bundle(broker):
    client = mqtt_client(
        broker.url,
        client_id=f"p-{uuid.uuid4().hex[:6]}",
        username="fleet-publisher",
        password=broker.publisher_password,
    )
    acks = {}
    done = threading.Condition()

    def on_ack(c, u, mid, reason, p):
        with done:
            acks[mid] = reason[0] if isinstance(reason, list) else reason
            done.notify_all()

    client.on_publish = client.on_subscribe = on_ack
    ok = client.publish("fleet/v1/devices/x/desired", b"{}", qos=1).mid
    trust = client.publish("fleet/v1/trust", b"{}", qos=1).mid
    forged = client.publish("fleet/v1/devices/x/telemetry", b"{}", qos=1).mid
    sub = client.subscribe("fleet/v1/devices/+/telemetry", qos=1)[1]
    with done:
        assert done.wait_for(lambda: {ok, trust, forged, sub} <= set(acks), timeout=10)
    assert not acks[ok].is_failure and not acks[trust].is_failure
    assert acks[forged].is_failure and acks[sub].is_failure
    client.disconnect()
    client.loop_stop()


def test_nobody_connects_anonymously(broker):
    with pytest.raises(BrokerError):
        mqtt_client(broker.url, client_id="anon")


def test_provisioning_a_device_again_changes_its_own_client_in_place(broker):
    """What enrollment and rotation do on the broker: the first call creates the device's
    client (marked as the device's), the next ones change its password and nothing else."""
    admin = broker.admin()
    device_id = f"acl-again-{uuid.uuid4().hex[:6]}"
    admin.ensure_device(device_id, "first")
    first = admin.get_client(device_id)
    admin.ensure_device(device_id, "second")
    assert admin.get_client(device_id) == first  # same client, same role; only the password moved
    assert first["textdescription"] == f"modelfleet-device:{device_id}"
    with pytest.raises(BrokerError):
        mqtt_client(broker.url, client_id=device_id, username=device_id, password="first")
    login = {"url": broker.tls_url, "username": device_id, "password": "second"}
    client = Client(broker, {"device_id": device_id, "mqtt": login})
    assert not client.subscribe(f"fleet/v1/devices/{device_id}/desired").is_failure
    assert client.subscribe(f"fleet/v1/devices/{device_id}-other/desired").is_failure
    client.close()


def test_devices_provisioned_at_the_same_time_each_get_their_own_client(broker):
    """Every admin client hears every answer on the one response topic: enrollments at
    once (web workers, the fleet simulator) must each read their own, not the other's
    "client not found"."""
    admin = broker.admin()
    run = uuid.uuid4().hex[:6]
    device_ids = [f"acl-together-{run}-{n}" for n in range(8)]
    errors: list[Exception] = []

    def provision(device_id: str) -> None:
        try:
            admin.ensure_device(device_id, f"pw-{device_id}")
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=provision, args=(device_id,)) for device_id in device_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    for device_id in device_ids:
        assert admin.get_client(device_id)["textdescription"] == f"modelfleet-device:{device_id}"
    # A refused command still reports its own error (the answer is matched, not lost).
    with pytest.raises(BrokerError, match="not found"):
        admin.command({"command": "getClient", "username": f"acl-nobody-{run}"})
