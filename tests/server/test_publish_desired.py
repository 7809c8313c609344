"""Signed desired states and `manage.py publish_desired`, against the real broker with the
project's ACLs: the device it names receives it, retained; the agent's verifier accepts it."""

import json
import threading
from datetime import UTC, datetime

import pytest
from django.core.management import CommandError, call_command

from agent import protocol
from fleet.devices.choices import DeviceStatus
from fleet.devices.desired import desired_state_envelope
from fleet.devices.models import Device
from fleet.mqtt.broker import mqtt_client
from fleet.registry import services
from fleet.registry.choices import VersionStatus
from fleet.registry.models import SigningKey
from tests.conftest import wait_until
from tests.server.conftest import pending_artifact, ready_artifact


@pytest.fixture
def ready_int8(version_v1, digits, alice):
    return ready_artifact(version_v1, "int8", digits.build_digits_models()["int8"], alice.user)


def publish(*devices: str, variant: str) -> None:
    call_command(
        "publish_desired", *devices, "--model", "digits", "--model-version", "1.0.0", "--variant", variant
    )


@pytest.fixture
def devices(db):
    return [Device.objects.create(device_id=name, status=DeviceStatus.ACTIVE) for name in ("cam-a", "cam-b")]


def trusted():
    return protocol.trusted_keys([key.public_key for key in SigningKey.objects.all()])


def test_the_envelope_verifies_and_names_the_artifact(ready_int8, settings):
    settings.PUBLIC_BASE_URL = "https://fleet.example.com"
    envelope = desired_state_envelope(device_id="cam-1", generation=7, artifacts={"digits": ready_int8})
    payload = protocol.verify(envelope, payload_type=protocol.DESIRED_PAYLOAD_TYPE, keys=trusted())
    desired = protocol.parse("desired", payload)
    entry = desired["models"]["digits"]
    assert (desired["device_id"], desired["generation"]) == ("cam-1", 7)
    assert entry["manifest_url"] == f"https://fleet.example.com/api/v1/artifacts/{ready_int8.pk}/manifest"
    assert entry["blob_url"].endswith(f"/api/v1/artifacts/{ready_int8.pk}/blob")
    assert entry["golden_url"].endswith(f"/api/v1/artifacts/{ready_int8.pk}/golden")
    assert entry["manifest_sha256"] == ready_int8.manifest_sha256
    expires = datetime.fromisoformat(desired["expires_at"].replace("Z", "+00:00"))
    assert (expires - datetime.now(UTC)).total_seconds() == pytest.approx(
        settings.DESIRED_STATE_TTL_SECONDS, abs=60
    )


def test_a_revoked_version_cannot_be_assigned(ready_int8):
    services.version_set_status(version=ready_int8.version, status=VersionStatus.REVOKED)
    ready_int8.refresh_from_db()
    with pytest.raises(services.Conflict) as excinfo:
        desired_state_envelope(device_id="cam-1", generation=1, artifacts={"digits": ready_int8})
    assert excinfo.value.code == "version_revoked"


def test_a_pending_artifact_cannot_be_assigned(version_v1, digits):
    pending = pending_artifact(version_v1, "float32", digits.build_digits_models()["float32"])
    with pytest.raises(services.Conflict) as excinfo:
        desired_state_envelope(device_id="cam-1", generation=1, artifacts={"digits": pending})
    assert excinfo.value.code == "artifact_not_ready"


def test_the_command_publishes_retained_to_each_device_only(
    ready_int8, devices, broker, settings, django_capture_on_commit_callbacks
):
    settings.MQTT_URL = broker.url
    settings.MQTT_PUBLISHER_PASSWORD = broker.publisher_password
    admin = broker.admin()
    admin.ensure_device("cam-a", "pw-a")
    admin.ensure_device("cam-b", "pw-b")
    Device.objects.filter(device_id="cam-a").update(desired_generation=2)
    with django_capture_on_commit_callbacks(execute=True):
        publish("cam-a", "cam-b", variant="int8")

    # Retained: a device that connects afterwards receives it, and only its own.
    received, got = [], threading.Event()
    device = mqtt_client(broker.url, client_id="cam-a", username="cam-a", password="pw-a")
    device.on_message = lambda c, u, m: (received.append((m.topic, m.payload, m.retain)), got.set())
    device.subscribe("fleet/v1/devices/cam-a/desired", qos=1)
    assert got.wait(10)
    device.disconnect()
    device.loop_stop()
    topic, payload, retained = received[0]
    assert topic == "fleet/v1/devices/cam-a/desired" and retained
    desired = protocol.parse(
        "desired", protocol.verify(payload, payload_type=protocol.DESIRED_PAYLOAD_TYPE, keys=trusted())
    )
    assert desired["device_id"] == "cam-a" and desired["generation"] == 3  # always one more
    assert json.loads(payload)["payloadType"] == protocol.DESIRED_PAYLOAD_TYPE
    cam_a = Device.objects.get(device_id="cam-a")
    assert (cam_a.desired_generation, cam_a.desired_artifacts) == (3, {"digits": ready_int8.pk})
    assert Device.objects.get(device_id="cam-b").desired_generation == 1


def test_the_command_refuses_a_variant_that_is_not_ready(ready_int8, devices, broker, settings):
    settings.MQTT_URL = broker.url
    with pytest.raises(CommandError, match="no ready 'float32'"):
        publish("cam-a", variant="float32")


def test_the_command_refuses_unknown_and_inactive_devices(ready_int8, devices):
    with pytest.raises(CommandError, match="Unknown device"):
        publish("cam-a", "cam-zz", variant="int8")
    Device.objects.filter(device_id="cam-b").update(status=DeviceStatus.DISABLED)
    with pytest.raises(CommandError, match="disabled"):
        publish("cam-b", variant="int8")
    assert Device.objects.get(device_id="cam-b").desired_generation == 0


@pytest.mark.django_db(transaction=True)
def test_the_command_fails_clearly_with_a_wrong_publisher_password(ready_int8, devices, broker, settings):
    settings.MQTT_URL = broker.url
    settings.MQTT_PUBLISHER_PASSWORD = "wrong"
    with pytest.raises(CommandError, match="cannot connect"):
        publish("cam-a", variant="int8")


@pytest.mark.django_db(transaction=True)
def test_rollout_sized_assignments_are_published_by_celery_workers_in_chunks(
    ready_int8, broker, settings, celery_worker_process
):
    """The default path: chunked Celery tasks on a real worker publish every desired state."""
    settings.DESIRED_PUBLISH_CHUNK = 2
    devices = [Device.objects.create(device_id=f"chunk-{n}", status=DeviceStatus.ACTIVE) for n in range(5)]
    seen, lock = {}, threading.Lock()

    def on_message(client, userdata, message):
        with lock:
            seen[message.topic] = message.payload

    for device in devices:
        broker.admin().ensure_device(device.device_id, "pw")
    clients = []
    for device in devices:
        client = mqtt_client(broker.url, client_id=device.device_id, username=device.device_id, password="pw")
        client.on_message = on_message
        client.subscribe(f"fleet/v1/devices/{device.device_id}/desired", qos=1)
        clients.append(client)
    from fleet.devices.services import devices_assign

    devices_assign(devices=devices, artifacts={"digits": ready_int8})  # commits: on_commit queues 3 tasks
    wait_until(lambda: len(seen) == 5, timeout=30, message="five desired states from the worker")
    for client in clients:
        client.disconnect()
        client.loop_stop()
    for device in devices:
        payload = protocol.verify(
            seen[f"fleet/v1/devices/{device.device_id}/desired"],
            payload_type=protocol.DESIRED_PAYLOAD_TYPE,
            keys=trusted(),
        )
        assert protocol.parse("desired", payload)["device_id"] == device.device_id
