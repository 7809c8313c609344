"""Enrollment against a real Mosquitto with the project's config: the credentials it hands
out work on the broker, wrong ones do not, and a disabled device is thrown out for good."""

import threading
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from fleet.devices import services
from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device, DeviceToken, EnrollmentToken
from fleet.mqtt.broker import BrokerError, mqtt_client
from tests.conftest import wait_until
from tests.server.conftest import enroll

pytestmark = pytest.mark.usefixtures("broker_settings")


def connect(broker, answer):
    """As the device does: to the broker the answer names (its TLS listener), pinning the CA."""
    mqtt = answer["mqtt"]
    return mqtt_client(
        mqtt["url"],
        client_id=mqtt["username"],
        username=mqtt["username"],
        password=mqtt["password"],
        ca_file=broker.ca_file,
    )


def test_an_auto_approve_token_gives_working_credentials(anonymous, enrollment_key, broker):
    response = enroll(
        anonymous,
        "cam-1",
        enrollment_token=enrollment_key,
        identity={"hardware": "rpi4", "runtime": "ai_edge_litert", "supports_int8": True},
    )
    assert response.status_code == 201, response.json()
    answer = response.json()
    assert answer["status"] == "active"
    assert answer["token"].startswith("md_")
    assert answer["mqtt"]["username"] == "cam-1" and answer["mqtt"]["url"] == broker.tls_url
    assert "public_key" not in str(answer)  # trust is provisioned out of band
    device = Device.objects.get(device_id="cam-1")
    assert (device.hardware, device.runtime, device.supports_int8) == ("rpi4", "ai_edge_litert", True)
    # Only hashes are stored.
    assert not DeviceToken.objects.filter(key_sha256=answer["token"]).exists()
    client = connect(broker, answer)
    client.disconnect()
    client.loop_stop()


def test_a_wrong_broker_password_is_refused(anonymous, enrollment_key, broker):
    answer = enroll(anonymous, "cam-2", enrollment_token=enrollment_key).json()
    with pytest.raises(BrokerError, match="Not authorized"):
        mqtt_client(
            broker.url, client_id="cam-2", username="cam-2", password=answer["mqtt"]["password"] + "x"
        )


def test_a_pending_device_cannot_connect_until_approved(anonymous, ada, alice, broker):
    _, key = services.enrollment_token_create(name="manual", auto_approve=False, created_by=ada.user)
    answer = enroll(anonymous, "cam-3", enrollment_token=key).json()
    assert answer["status"] == "pending"
    with pytest.raises(BrokerError):
        connect(broker, answer)
    response = alice.client().post("/api/v1/devices/cam-3/approve")
    assert response.status_code == 200 and response.json()["status"] == "active"
    client = connect(broker, answer)
    client.disconnect()
    client.loop_stop()


def test_disabling_disconnects_the_device_and_keeps_it_out(anonymous, enrollment_key, alice, broker):
    answer = enroll(anonymous, "cam-4", enrollment_token=enrollment_key).json()
    client = connect(broker, answer)
    gone = threading.Event()
    client.on_disconnect = lambda *args: gone.set()
    client.reconnect_delay_set(60, 120)  # a reconnect attempt must not hide the kick
    assert alice.client().post("/api/v1/devices/cam-4/disable").status_code == 200
    assert gone.wait(10), "the broker did not disconnect the disabled device"
    client.loop_stop()
    with pytest.raises(BrokerError):
        connect(broker, answer)
    token = DeviceToken.objects.get(device__device_id="cam-4")
    assert token.revoked_at is not None
    bearer = APIClient()
    bearer.credentials(HTTP_AUTHORIZATION=f"Bearer {answer['token']}")
    assert bearer.get("/api/v1/artifacts/1/manifest").status_code == 401


def test_rotating_credentials_replaces_both_secrets(anonymous, enrollment_key, alice, broker):
    old = enroll(anonymous, "cam-5", enrollment_token=enrollment_key).json()
    new = alice.client().post("/api/v1/devices/cam-5/rotate-credentials").json()
    assert new["token"] != old["token"] and new["mqtt"]["password"] != old["mqtt"]["password"]
    with pytest.raises(BrokerError):
        connect(broker, old)
    client = connect(broker, new)
    client.disconnect()
    client.loop_stop()


def test_a_preauthorized_device_enrolls_once_with_its_code(anonymous, alice, broker):
    code = (
        alice.client()
        .post("/api/v1/devices/preauthorize", {"device_id": "cam-6"}, format="json")
        .json()["enrollment_code"]
    )
    assert Device.objects.get(device_id="cam-6").status == DeviceStatus.PENDING
    answer = enroll(anonymous, "cam-6", enrollment_code=code)
    assert answer.status_code == 201 and answer.json()["status"] == "active"
    again = enroll(anonymous, "cam-6", enrollment_code=code)
    assert again.status_code == 400 and again.json()["error"]["code"] == "invalid_enrollment_code"
    wrong = enroll(anonymous, "cam-6", enrollment_code="mc_guess")
    assert wrong.json()["error"]["code"] == "invalid_enrollment_code"


@pytest.mark.parametrize(
    ("token_fields", "code"),
    [
        ({"revoked_at": timezone.now()}, "invalid_enrollment_token"),
        ({"expires_at": timezone.now() - timedelta(seconds=1)}, "enrollment_token_expired"),
        ({"max_uses": 1, "uses": 1}, "enrollment_token_used_up"),
    ],
)
def test_a_dead_enrollment_token_is_refused(anonymous, enrollment_key, token_fields, code):
    EnrollmentToken.objects.update(**token_fields)
    response = enroll(anonymous, "cam-7", enrollment_token=enrollment_key)
    assert response.status_code == 400 and response.json()["error"]["code"] == code
    assert not Device.objects.filter(device_id="cam-7").exists()


def test_the_use_limit_counts_each_enrollment(anonymous, ada):
    _, key = services.enrollment_token_create(name="two", auto_approve=True, max_uses=2, created_by=ada.user)
    assert enroll(anonymous, "a-1", enrollment_token=key).status_code == 201
    assert enroll(anonymous, "a-2", enrollment_token=key).status_code == 201
    assert (
        enroll(anonymous, "a-3", enrollment_token=key).json()["error"]["code"] == "enrollment_token_used_up"
    )


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"device_id": "bad/id"}, 400, "invalid_device_id"),
        ({"device_id": "ok"}, 400, "invalid_enrollment"),  # neither token nor code
        (
            {"device_id": "ok", "enrollment_token": "me_x", "enrollment_code": "mc_y"},
            400,
            "invalid_enrollment",
        ),
        ({"enrollment_token": "me_x"}, 400, "required"),
        ({"device_id": "ok", "enrollment_token": "me_unknown"}, 400, "invalid_enrollment_token"),
    ],
)
def test_bad_enrollment_requests_answer_json_errors(anonymous, db, body, status, code):
    response = anonymous.post("/api/v1/enroll", body, format="json")
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_enrolling_an_id_twice_is_a_conflict(anonymous, enrollment_key):
    assert enroll(anonymous, "cam-8", enrollment_token=enrollment_key).status_code == 201
    response = enroll(anonymous, "cam-8", enrollment_token=enrollment_key)
    assert response.status_code == 409 and response.json()["error"]["code"] == "already_enrolled"


def test_enrollment_attempts_are_rate_limited(anonymous, settings, db):
    settings.ENROLL_RATE = "3/minute"
    codes = [enroll(anonymous, f"x-{n}", enrollment_token="me_wrong").status_code for n in range(5)]
    assert codes == [400, 400, 400, 429, 429]
    assert enroll(anonymous, "x-9", enrollment_token="me_wrong").json()["error"]["code"] == "throttled"


def test_when_the_broker_refuses_nothing_half_enrolled_stays(anonymous, enrollment_key, settings):
    settings.MQTT_ADMIN_PASSWORD = "wrong"
    response = enroll(anonymous, "cam-9", enrollment_token=enrollment_key)
    assert response.status_code == 503 and response.json()["error"]["code"] == "broker_unavailable"
    assert not Device.objects.filter(device_id="cam-9").exists()
    assert EnrollmentToken.objects.get().uses == 0  # the failed attempt's use is given back


def test_when_the_broker_refuses_a_preauthorized_device_keeps_its_code(anonymous, alice, settings, broker):
    code = (
        alice.client()
        .post("/api/v1/devices/preauthorize", {"device_id": "cam-10"}, format="json")
        .json()["enrollment_code"]
    )
    admin_password = settings.MQTT_ADMIN_PASSWORD
    settings.MQTT_ADMIN_PASSWORD = "wrong"
    assert enroll(anonymous, "cam-10", enrollment_code=code).status_code == 503
    device = Device.objects.get(device_id="cam-10")
    assert device.status == DeviceStatus.PENDING and device.enrolled_at is None
    assert not DeviceToken.objects.filter(device=device).exists()
    settings.MQTT_ADMIN_PASSWORD = admin_password
    answer = enroll(anonymous, "cam-10", enrollment_code=code)  # the retry works
    assert answer.status_code == 201 and answer.json()["status"] == "active"
    client = connect(broker, answer.json())
    client.disconnect()
    client.loop_stop()


def test_the_agent_enroll_command_writes_a_working_config(
    live_server, enrollment_key, broker, tmp_path, settings
):
    import subprocess
    import sys

    from agent.config import load_config
    from tests.conftest import ROOT

    key_hex = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
    out = tmp_path / "agent.toml"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "enroll",
            "--url",
            live_server.url,
            "--device-id",
            "cam-cli",
            "--token",
            enrollment_key,
            "--root-key",
            key_hex,
            "--config-out",
            str(out),
            "--state-dir",
            str(tmp_path / "state"),
            "--hardware",
            "rpi4",
            "--broker-ca-file",
            str(broker.ca_file),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    config = load_config(out)
    assert config.trust.root_keys == (key_hex,)
    assert config.device.hardware == "rpi4"
    assert (config.broker.url, config.broker.ca_file) == (broker.tls_url, broker.ca_file)
    client = mqtt_client(
        config.broker.url,
        client_id="cam-cli",
        username=config.broker.username,
        password=config.broker.password,
        ca_file=config.broker.ca_file,
    )
    client.disconnect()
    client.loop_stop()
    wait_until(lambda: Device.objects.filter(device_id="cam-cli", status="active").exists(), timeout=5)
