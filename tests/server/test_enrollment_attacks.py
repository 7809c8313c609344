"""Issue 9, section 1, tried as an attacker holding an enrollment token (or a stolen code)
would, against a real Mosquitto running the project's configuration and real PostgreSQL
and Redis. Each attack is followed by a positive control: the service accounts it aimed at
still log in and do their job, so a dead broker cannot make a test pass."""

import re
import threading
import uuid
from datetime import timedelta

import pytest
from django.test import Client as WebClient
from django.utils import timezone
from rest_framework.test import APIClient

from fleet.devices import services
from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device, DeviceToken, EnrollmentToken
from fleet.mqtt.broker import BrokerError, mqtt_client
from tests.server.conftest import enroll

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]

SERVICE_ACCOUNTS = ("fleet-publisher", "fleet-ingest", "fleet-admin")


class Session:
    """A logged-in MQTT client that waits for the broker's answer to each request."""

    def __init__(self, url: str, username: str, password: str, client_id: str | None = None):
        self.client = mqtt_client(
            url, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}", username=username, password=password
        )
        self.acks: dict[int, object] = {}
        self.acked = threading.Condition()
        self.gone = threading.Event()
        self.client.on_subscribe = self.client.on_publish = self._on_ack
        self.client.on_disconnect = lambda *args: self.gone.set()

    def _on_ack(self, client, userdata, mid, reason, properties):
        with self.acked:
            self.acks[mid] = reason[0] if isinstance(reason, list) else reason
            self.acked.notify_all()

    def _wait(self, mid):
        with self.acked:
            assert self.acked.wait_for(lambda: mid in self.acks, timeout=10), "the broker did not answer"
            return self.acks[mid]

    def publish(self, topic: str) -> bool:
        return not self._wait(self.client.publish(topic, b"{}", qos=1).mid).is_failure

    def subscribe(self, topic: str) -> bool:
        return not self._wait(self.client.subscribe(topic, qos=1)[1]).is_failure

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def login(broker, username: str, password: str, client_id: str | None = None) -> Session:
    return Session(broker.url, username, password, client_id)


def passwords(broker) -> dict[str, str]:
    return {
        "fleet-publisher": broker.publisher_password,
        "fleet-ingest": broker.ingest_password,
        "fleet-admin": broker.admin_password,
    }


def assert_service_accounts_work(broker):
    """The positive control: each service account logs in and does exactly its job."""
    publisher = login(broker, "fleet-publisher", broker.publisher_password)
    assert publisher.publish("fleet/v1/devices/someone/desired")
    publisher.close()
    ingest = login(broker, "fleet-ingest", broker.ingest_password)
    assert ingest.subscribe("$share/fleet-ingest/fleet/v1/devices/+/telemetry")
    ingest.close()
    assert broker.admin().get_client("fleet-ingest") is not None  # the admin's control API answers


def service_account_records(broker) -> dict[str, dict]:
    admin = broker.admin()
    return {name: admin.get_client(name) for name in SERVICE_ACCOUNTS}


def new_id(prefix: str = "cam") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- reserved device ids


@pytest.mark.parametrize(
    "device_id", ["fleet-ingest", "FLEET-Publisher", "fleet-admin", "Fleet-Admin", "FLEET-INGEST"]
)
def test_enrolling_a_service_account_name_is_refused_and_the_account_keeps_working(
    anonymous, enrollment_key, broker, device_id
):
    assert_service_accounts_work(broker)
    before = service_account_records(broker)

    response = enroll(anonymous, device_id, enrollment_token=enrollment_key)

    assert response.status_code == 400, response.content
    assert response.json()["error"] == {
        "code": "reserved_device_id",
        "message": response.json()["error"]["message"],
        "field": "device_id",
    }
    assert not Device.objects.filter(device_id__iexact=device_id).exists()
    assert EnrollmentToken.objects.get().uses == 0  # a refused attempt costs no use
    assert service_account_records(broker) == before  # not deleted, not rewritten, not disabled
    assert_service_accounts_work(broker)
    # The 503s that followed enrolling fleet-admin: a real device still enrolls and connects.
    answer = enroll(anonymous, new_id(), enrollment_token=enrollment_key).json()
    assert answer["status"] == "active"
    login(broker, answer["mqtt"]["username"], answer["mqtt"]["password"], answer["device_id"]).close()


def test_a_configured_service_account_name_is_reserved_in_any_case(anonymous, enrollment_key, settings):
    settings.MQTT_INGEST_USERNAME = "Bridge-7"
    settings.MQTT_AUDIT_USERNAME = "auditor"  # any MQTT_*_USERNAME, also one added later
    for device_id in ("bridge-7", "BRIDGE-7", "Auditor"):
        response = enroll(anonymous, device_id, enrollment_token=enrollment_key)
        assert response.status_code == 400 and response.json()["error"]["code"] == "reserved_device_id"
    assert enroll(anonymous, "bridge-8", enrollment_token=enrollment_key).status_code == 201


def test_a_broker_account_the_control_plane_did_not_make_is_never_taken_over(
    anonymous, enrollment_key, broker
):
    """Not in any setting (an operator's monitoring login): the broker layer itself refuses
    to touch a client that was not created for that device."""
    name, password = new_id("ops-monitor"), "monitor-secret"
    broker.admin().command({"command": "createClient", "username": name, "password": password})
    login(broker, name, password).close()  # control: the account works before

    response = enroll(anonymous, name, enrollment_token=enrollment_key)

    assert response.status_code == 400 and response.json()["error"]["code"] == "reserved_device_id"
    assert not Device.objects.filter(device_id=name).exists()
    assert EnrollmentToken.objects.get().uses == 0  # given back
    login(broker, name, password).close()  # same password, still enabled


def test_preauthorizing_a_service_account_name_is_refused(alice, broker):
    for device_id in ("fleet-publisher", "Fleet-Ingest"):
        response = alice.client().post(
            "/api/v1/devices/preauthorize", {"device_id": device_id}, format="json"
        )
        assert response.status_code == 400, response.content
        assert response.json()["error"]["code"] == "reserved_device_id"
        assert response.json()["error"]["field"] == "device_id"
    assert not Device.objects.exists()
    response = alice.client().post("/api/v1/devices/preauthorize", {"device_id": new_id()}, format="json")
    assert response.status_code == 201  # control


def test_preauthorizing_a_bad_id_is_refused(alice):
    response = alice.client().post("/api/v1/devices/preauthorize", {"device_id": "a/b"}, format="json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_device_id"


def test_the_admin_refuses_a_service_account_name_and_preauthorizes_others(ada, broker):
    web = WebClient()
    web.force_login(ada.user)
    page = web.post(
        "/admin/devices/device/add/", {"device_id": "FLEET-admin", "display_name": "", "tags": "[]"}
    )
    assert page.status_code == 200  # the form again, with the error on the field
    assert "name of a broker service account" in page.content.decode()
    assert not Device.objects.exists()
    before = service_account_records(broker)

    device_id = new_id()
    page = web.post("/admin/devices/device/add/", {"device_id": device_id, "display_name": "", "tags": "[]"})

    assert page.status_code == 302
    device = Device.objects.get(device_id=device_id)
    assert device.status == DeviceStatus.PENDING and device.enrollment_code_sha256
    shown = web.get(page.url).content.decode()
    code = re.search(r"mc_[A-Za-z0-9_-]+", shown).group(0)  # shown once, and it works
    assert enroll(APIClient(), device_id, enrollment_code=code).json()["status"] == "active"
    assert service_account_records(broker) == before


def test_a_device_row_named_like_a_service_account_is_retired_without_touching_the_account(
    alice, anonymous, broker
):
    """A row left by the old hole (before ids were checked): its code no longer enrolls it,
    and disabling or retiring it leaves the real account alone."""
    code = "mc_left-from-before"
    Device.objects.create(
        device_id="fleet-ingest", status=DeviceStatus.ACTIVE, enrollment_code_sha256=services.sha256(code)
    )
    before = service_account_records(broker)
    response = enroll(anonymous, "fleet-ingest", enrollment_code=code)
    assert response.status_code == 400 and response.json()["error"]["code"] == "reserved_device_id"
    assert alice.client().post("/api/v1/devices/fleet-ingest/disable").status_code == 200
    assert alice.client().post("/api/v1/devices/fleet-ingest/retire").status_code == 200
    assert service_account_records(broker) == before
    assert_service_accounts_work(broker)


def test_the_broker_layer_refuses_to_provision_a_service_account_as_a_device(broker):
    admin = broker.admin()
    before = service_account_records(broker)
    for name in SERVICE_ACCOUNTS:
        with pytest.raises(BrokerError, match="not created for a device"):
            admin.ensure_device(name, "attacker-password")
        with pytest.raises(BrokerError, match="not created for a device"):
            admin.disable_device(name)
        with pytest.raises(BrokerError, match="not created for a device"):
            admin.delete_device(name)
    assert service_account_records(broker) == before
    assert_service_accounts_work(broker)
    for name, password in passwords(broker).items():
        with pytest.raises(BrokerError):
            login(broker, name, "attacker-password")
        login(broker, name, password).close()


# --- provisioning changes only the device's own client, in place


def test_rotating_credentials_changes_the_password_in_place(anonymous, enrollment_key, alice, broker):
    device_id = new_id()
    old = enroll(anonymous, device_id, enrollment_token=enrollment_key).json()
    admin = broker.admin()
    # Something only the existing client carries: if rotation deleted and recreated the
    # client (as it did), this role would be gone afterwards.
    admin.command({"command": "createRole", "rolename": f"extra-{device_id}"})
    admin.command({"command": "addClientRole", "username": device_id, "rolename": f"extra-{device_id}"})
    session = login(broker, device_id, old["mqtt"]["password"], device_id)
    session.client.reconnect_delay_set(60, 120)  # a reconnect must not hide the kick

    new = alice.client().post(f"/api/v1/devices/{device_id}/rotate-credentials").json()

    assert session.gone.wait(10), "the broker did not disconnect the old session"
    session.client.loop_stop()
    record = admin.get_client(device_id)
    assert {role["rolename"] for role in record["roles"]} == {f"device-{device_id}", f"extra-{device_id}"}
    assert not record.get("disabled")
    with pytest.raises(BrokerError):
        login(broker, device_id, old["mqtt"]["password"], device_id)
    fresh = login(broker, device_id, new["mqtt"]["password"], device_id)
    assert fresh.subscribe(f"fleet/v1/devices/{device_id}/desired")  # its ACL is intact
    fresh.close()


def test_rotation_refused_by_the_broker_keeps_the_old_token(anonymous, enrollment_key, alice, settings):
    device_id = new_id()
    old = enroll(anonymous, device_id, enrollment_token=enrollment_key).json()
    settings.MQTT_ADMIN_PASSWORD = "wrong"
    response = alice.client().post(f"/api/v1/devices/{device_id}/rotate-credentials")
    assert response.status_code == 503 and response.json()["error"]["code"] == "broker_unavailable"
    token = DeviceToken.objects.get(device__device_id=device_id)
    assert token.key_sha256 == services.sha256(old["token"]) and token.revoked_at is None


# --- devices that never enrolled, retired and disabled ones


@pytest.mark.parametrize("action", ["disable", "retire"])
def test_a_preauthorized_device_that_never_enrolled_can_be_disabled_or_retired(alice, broker, action):
    device_id = new_id()
    alice.client().post("/api/v1/devices/preauthorize", {"device_id": device_id}, format="json")
    response = alice.client().post(f"/api/v1/devices/{device_id}/{action}")
    assert response.status_code == 200, response.content
    assert response.json()["status"] == {"disable": "disabled", "retire": "retired"}[action]
    assert broker.admin().get_client(device_id) is None  # nothing was made for it either


def test_a_retired_device_never_comes_back(anonymous, enrollment_key, alice, broker):
    code = (
        alice.client()
        .post("/api/v1/devices/preauthorize", {"device_id": (device_id := new_id())}, format="json")
        .json()["enrollment_code"]
    )
    assert alice.client().post(f"/api/v1/devices/{device_id}/retire").status_code == 200

    by_code = enroll(anonymous, device_id, enrollment_code=code)
    by_token = enroll(anonymous, device_id, enrollment_token=enrollment_key)
    again = alice.client().post("/api/v1/devices/preauthorize", {"device_id": device_id}, format="json")

    assert by_code.status_code == 400 and by_code.json()["error"]["code"] == "invalid_enrollment_code"
    assert by_token.status_code == 409 and by_token.json()["error"]["code"] == "device_retired"
    assert again.status_code == 409 and again.json()["error"]["code"] == "device_retired"
    device = Device.objects.get(device_id=device_id)
    assert device.status == DeviceStatus.RETIRED and not device.enrollment_code_sha256
    assert not DeviceToken.objects.filter(device=device).exists()
    assert broker.admin().get_client(device_id) is None
    assert EnrollmentToken.objects.get().uses == 0
    # Control: the same token enrolls a device that is not retired.
    assert enroll(anonymous, new_id(), enrollment_token=enrollment_key).status_code == 201


def test_a_retired_device_with_a_code_left_over_is_still_refused(anonymous, broker):
    """A device retired before retiring forgot the code."""
    code = "mc_from-an-older-release"
    device_id = new_id()
    Device.objects.create(
        device_id=device_id, status=DeviceStatus.RETIRED, enrollment_code_sha256=services.sha256(code)
    )
    response = enroll(anonymous, device_id, enrollment_code=code)
    assert response.status_code == 409 and response.json()["error"]["code"] == "device_retired"
    assert Device.objects.get(device_id=device_id).status == DeviceStatus.RETIRED
    assert broker.admin().get_client(device_id) is None


def test_a_retired_device_is_not_deleted_in_the_admin(ada):
    device = Device.objects.create(device_id=new_id(), status=DeviceStatus.RETIRED)
    web = WebClient()
    web.force_login(ada.user)
    assert web.get(f"/admin/devices/device/{device.pk}/delete/").status_code == 403
    web.post(
        "/admin/devices/device/",
        {"action": "delete_selected", "_selected_action": [device.pk], "post": "yes"},
    )
    assert Device.objects.filter(pk=device.pk).exists()


def test_a_disabled_device_enrolling_with_its_code_stays_disabled(anonymous, alice, broker):
    device_id = new_id()
    code = (
        alice.client()
        .post("/api/v1/devices/preauthorize", {"device_id": device_id}, format="json")
        .json()["enrollment_code"]
    )
    assert alice.client().post(f"/api/v1/devices/{device_id}/disable").status_code == 200

    response = enroll(anonymous, device_id, enrollment_code=code)

    assert response.status_code == 201 and response.json()["status"] == "disabled"
    answer = response.json()
    assert Device.objects.get(device_id=device_id).status == DeviceStatus.DISABLED
    with pytest.raises(BrokerError, match="Not authorized"):
        login(broker, device_id, answer["mqtt"]["password"], device_id)
    bearer = APIClient()
    bearer.credentials(HTTP_AUTHORIZATION=f"Bearer {answer['token']}")
    assert bearer.get("/api/v1/artifacts/1/manifest").status_code == 401
    # Control: the credentials are real, an operator's approval turns them on.
    assert alice.client().post(f"/api/v1/devices/{device_id}/approve").status_code == 200
    login(broker, device_id, answer["mqtt"]["password"], device_id).close()


# --- the enrollment throttle keys on the peer address


def attempts(client: APIClient, count: int, meta) -> list[int]:
    """``count`` enrollment attempts with a wrong token; ``meta(n)`` gives the n-th request's
    REMOTE_ADDR and headers."""
    return [
        client.post(
            "/api/v1/enroll",
            {"device_id": f"x-{n}", "enrollment_token": "me_wrong"},
            format="json",
            **meta(n),
        ).status_code
        for n in range(count)
    ]


def test_rotating_x_forwarded_for_does_not_bypass_the_enrollment_limit(anonymous, settings):
    settings.ENROLL_RATE = "3/minute"
    codes = attempts(anonymous, 6, meta=lambda n: {"HTTP_X_FORWARDED_FOR": f"203.0.113.{n}"})
    assert codes == [400, 400, 400, 429, 429, 429]
    assert settings.TRUSTED_PROXY_COUNT == 0  # the default: no proxy is trusted
    # Control: another peer has a bucket of its own.
    assert attempts(anonymous, 1, meta=lambda n: {"REMOTE_ADDR": "198.51.100.7"}) == [400]


def test_behind_trusted_proxies_only_what_they_saw_counts(anonymous, settings):
    settings.ENROLL_RATE = "3/minute"
    settings.TRUSTED_PROXY_COUNT = 1

    def spoofed(n):  # the client writes the left part; the proxy appends the real address
        return {"REMOTE_ADDR": "10.0.0.1", "HTTP_X_FORWARDED_FOR": f"192.0.2.{n}, 203.0.113.9"}

    assert attempts(anonymous, 5, meta=spoofed) == [400, 400, 400, 429, 429]
    # Control: another client behind the same proxy is counted apart, so the header is read.
    other = {"REMOTE_ADDR": "10.0.0.1", "HTTP_X_FORWARDED_FOR": "203.0.113.10"}
    assert attempts(anonymous, 1, meta=lambda n: other) == [400]
    # A request that did not come through the proxy is keyed on its peer.
    direct = {"REMOTE_ADDR": "10.0.0.1"}
    assert attempts(anonymous, 4, meta=lambda n: direct) == [400, 400, 400, 429]


def test_an_ipv6_client_cannot_rotate_addresses_within_its_prefix(anonymous, settings):
    settings.ENROLL_RATE = "3/minute"
    codes = attempts(anonymous, 5, meta=lambda n: {"REMOTE_ADDR": f"2001:db8:1:2::{n + 1:x}"})
    assert codes == [400, 400, 400, 429, 429]
    assert attempts(anonymous, 1, meta=lambda n: {"REMOTE_ADDR": "2001:db8:1:3::1"}) == [400]


# --- enrollment tokens expire and run out by default


def test_a_token_made_without_limits_gets_the_default_expiry_and_use_limit(ada, settings):
    settings.ENROLLMENT_TOKEN_DEFAULT_TTL_DAYS = 7
    settings.ENROLLMENT_TOKEN_DEFAULT_MAX_USES = 2
    created = ada.client().post("/api/v1/enrollment-tokens/", {"name": "line"}, format="json").json()
    token = EnrollmentToken.objects.get(pk=created["id"])
    assert token.max_uses == 2 and created["max_uses"] == 2 and created["state"] == "usable"
    assert abs(token.expires_at - (timezone.now() + timedelta(days=7))) < timedelta(minutes=1)
    anonymous = APIClient()
    assert enroll(anonymous, new_id(), enrollment_token=created["key"]).status_code == 201
    assert enroll(anonymous, new_id(), enrollment_token=created["key"]).status_code == 201
    third = enroll(anonymous, new_id(), enrollment_token=created["key"])
    assert third.json()["error"]["code"] == "enrollment_token_used_up"


def test_a_token_past_its_default_expiry_is_refused(ada, anonymous):
    token, key = services.enrollment_token_create(name="old", auto_approve=True)
    assert enroll(anonymous, new_id(), enrollment_token=key).status_code == 201  # control
    EnrollmentToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    refused = enroll(anonymous, new_id(), enrollment_token=key)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "enrollment_token_expired"


def test_the_defaults_can_be_overridden(ada):
    expires_at = (timezone.now() + timedelta(days=365)).isoformat()
    created = (
        ada.client()
        .post(
            "/api/v1/enrollment-tokens/",
            {"name": "big", "max_uses": 5000, "expires_at": expires_at},
            format="json",
        )
        .json()
    )
    assert created["max_uses"] == 5000 and created["expires_at"].startswith(expires_at[:10])


@pytest.mark.parametrize(
    ("body", "field"),
    [({"max_uses": 0}, "max_uses"), ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at")],
)
def test_a_token_dead_at_birth_is_refused(ada, body, field):
    response = ada.client().post("/api/v1/enrollment-tokens/", {"name": "x", **body}, format="json")
    assert response.status_code == 400 and response.json()["error"]["field"] == field
    assert not EnrollmentToken.objects.exists()


def test_the_admin_shows_token_limits_and_state(ada, settings):
    settings.ENROLLMENT_TOKEN_DEFAULT_MAX_USES = 42
    web = WebClient()
    web.force_login(ada.user)
    form = web.get("/admin/devices/enrollmenttoken/add/").content.decode()
    assert 'name="max_uses"' in form and 'value="42"' in form  # the defaults, before saving
    used_up, _ = services.enrollment_token_create(name="used-up-token", max_uses=1)
    EnrollmentToken.objects.filter(pk=used_up.pk).update(uses=1)
    services.enrollment_token_create(name="fresh-token")
    page = web.get("/admin/devices/enrollmenttoken/").content.decode()
    assert "Used up" in page and "Usable" in page and ">42<" in page
    refused = web.post(
        "/admin/devices/enrollmenttoken/add/",
        {
            "name": "t",
            "expires_at_0": "2001-01-01",
            "expires_at_1": "00:00:00",
            "max_uses": "0",
            "tags": "",
        },
    )
    assert refused.status_code == 200 and "Choose a time in the future" in refused.content.decode()
    assert EnrollmentToken.objects.count() == 2
