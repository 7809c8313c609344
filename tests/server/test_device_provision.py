"""Bulk provisioning for factories (issue 13 §1, docs/enrollment.md "Bulk provisioning"):
one admin request creates many active devices with their credentials, and each one's
broker login works, on the real Mosquitto with the project's config, for its own topics
only. Bad requests change nothing."""

import uuid

import pytest

from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device, DeviceToken
from fleet.mqtt.broker import CONTROL_MESSAGE_COMMANDS, BrokerError, mqtt_client
from tests.conftest import wait_until
from tests.server.test_broker_acl import Client, topic, watcher  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]
URL = "/api/v1/devices/provision"


def ids(count: int) -> list[str]:
    run = uuid.uuid4().hex[:6]
    return [f"bulk-{run}-{n:03d}" for n in range(count)]


def provision(persona, body):
    return persona.client().post(URL, body, format="json")


def test_an_admin_provisions_many_devices_in_one_request(ada, broker):
    names = ids(3)
    body = {
        "tags": ["line-2"],
        "devices": [
            {
                "device_id": name,
                "identity": {"hardware": "rpi4", "supports_int8": n != 1, "unsupported_ops": ["GELU"]},
                "tags": ["outdoor"] if n == 0 else [],
            }
            for n, name in enumerate(names)
        ],
    }
    response = provision(ada, body)
    assert response.status_code == 201, response.json()
    answers = response.json()["devices"]
    assert [answer["device_id"] for answer in answers] == names
    assert all(a["status"] == "active" and a["token"].startswith("md_") for a in answers)
    assert {a["mqtt"]["url"] for a in answers} == {broker.tls_url}
    devices = {d.device_id: d for d in Device.objects.filter(device_id__in=names)}
    assert [devices[name].supports_int8 for name in names] == [True, False, True]
    assert devices[names[0]].tags == ["line-2", "outdoor"] and devices[names[1]].tags == ["line-2"]
    assert devices[names[2]].unsupported_ops == ["GELU"] and devices[names[2]].hardware == "rpi4"
    assert all(d.status == DeviceStatus.ACTIVE and d.enrolled_at for d in devices.values())
    # Only hashes are kept, and each token opens the API as its device.
    assert not DeviceToken.objects.filter(key_sha256=answers[0]["token"]).exists()
    assert DeviceToken.objects.filter(device__device_id__in=names, revoked_at=None).count() == 3


def test_a_batch_of_many_control_messages_provisions_every_device(ada, broker):
    """Two changing commands a device, at most CONTROL_MESSAGE_COMMANDS a control message:
    this batch takes several messages, and every device's login works, its own only."""
    names = ids(CONTROL_MESSAGE_COMMANDS + 1)
    response = provision(ada, {"devices": [{"device_id": name} for name in names]})
    assert response.status_code == 201, response.json()
    answers = response.json()["devices"]
    assert [answer["device_id"] for answer in answers] == names
    for answer in answers:
        mqtt = answer["mqtt"]
        client = mqtt_client(
            mqtt["url"],
            client_id=mqtt["username"],
            username=mqtt["username"],
            password=mqtt["password"],
            ca_file=broker.ca_file,
        )
        client.disconnect()
        client.loop_stop()
    first, last = answers[0]["mqtt"], answers[-1]["mqtt"]
    with pytest.raises(BrokerError):  # the last one's name with the first one's password
        mqtt_client(
            broker.url, client_id=last["username"], username=last["username"], password=first["password"]
        )


def test_a_provisioned_device_uses_its_own_topics_and_cannot_forge_another(ada, broker, watcher):  # noqa: F811
    a_answer, b_answer = provision(ada, {"devices": [{"device_id": n} for n in ids(2)]}).json()["devices"]
    a, b = Client(broker, a_answer), Client(broker, b_answer)
    try:
        # Positive control: its own topics work.
        assert not a.subscribe(topic(a, "desired")).is_failure
        for kind in ("status", "reported", "events", "telemetry"):
            assert not a.publish(topic(a, kind)).is_failure
        # The attack: another device's topics, with a valid login of the same batch.
        assert a.publish(topic(b, "telemetry")).is_failure
        assert a.publish(topic(b, "status")).is_failure
        assert a.subscribe(topic(b, "desired")).is_failure
        assert not a.publish(topic(a, "status"), b"last").is_failure
        wait_until(lambda: watcher.count(topic(a, "status")) == 2, timeout=10, message="a's last status")
        assert topic(b, "telemetry") not in watcher and topic(b, "status") not in watcher
    finally:
        a.close()
        b.close()
    # Its login is its own: another device's name with this password is refused.
    with pytest.raises(BrokerError):
        mqtt_client(
            broker.url, client_id=b.device_id, username=b.device_id, password=a_answer["mqtt"]["password"]
        )


@pytest.mark.parametrize("persona", ["alice", "bob", "charlie"])
def test_only_admins_provision_in_bulk(persona, request):
    response = provision(request.getfixturevalue(persona), {"devices": [{"device_id": ids(1)[0]}]})
    assert response.status_code == 403
    assert not Device.objects.filter(device_id__startswith="bulk-").exists()


@pytest.mark.parametrize(
    ("devices", "code", "field"),
    [
        ([], "invalid", "devices"),
        ([{"device_id": "bad id"}], "invalid_device_id", "devices.0.device_id"),
        ([{"device_id": "fleet-ingest"}], "reserved_device_id", "devices.0.device_id"),
        ([{"device_id": "bulk-x"}, {"device_id": "bulk-x"}], "duplicate_device", "devices.1.device_id"),
        (
            [{"device_id": "bulk-y", "identity": {"hardware": "a b"}}],
            "invalid",
            "devices.0.identity.hardware",
        ),
        ([{"device_id": "bulk-z", "tags": ["a,b"]}], "invalid_tags", "devices.0.tags"),
        ("bulk-x", "not_a_list", "devices"),
    ],
)
def test_bad_requests_are_refused_with_a_json_error_and_create_nothing(ada, devices, code, field):
    response = provision(ada, {"devices": devices})
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["code"] == code and response.json()["error"]["field"] == field
    assert not Device.objects.filter(device_id__startswith="bulk-").exists()


def test_more_devices_than_the_cap_are_refused(ada, settings):
    settings.DEVICE_PROVISION_MAX_DEVICES = 2
    response = provision(ada, {"devices": [{"device_id": name} for name in ids(3)]})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "too_many_devices"
    assert not Device.objects.exists()
    assert provision(ada, {"devices": [{"device_id": name} for name in ids(2)]}).status_code == 201


def test_an_existing_id_refuses_the_whole_batch(ada, broker):
    first, second = ids(2)
    assert provision(ada, {"devices": [{"device_id": first}]}).status_code == 201
    response = provision(ada, {"devices": [{"device_id": second}, {"device_id": first}]})
    assert response.status_code == 409 and response.json()["error"]["code"] == "already_enrolled"
    assert not Device.objects.filter(device_id=second).exists()


def test_a_broker_account_of_the_same_name_refuses_the_batch_and_is_left_alone(ada, broker):
    stranger = f"bulk-op-{uuid.uuid4().hex[:6]}"
    broker.admin().command({"command": "createClient", "username": stranger, "password": "theirs"})
    fresh = ids(1)[0]
    response = provision(ada, {"devices": [{"device_id": fresh}, {"device_id": stranger}]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "reserved_device_id"
    assert not Device.objects.filter(device_id__in=[fresh, stranger]).exists()
    assert broker.admin().get_client(fresh) is None  # nothing of the batch reached the broker
    client = mqtt_client(broker.url, client_id=stranger, username=stranger, password="theirs")
    client.disconnect()
    client.loop_stop()
