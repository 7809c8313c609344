"""Who may call the devices endpoints, and what a device's own token opens: only the
artifacts assigned to it, and nothing meant for people."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from rest_framework.test import APIClient

from fleet.devices import services
from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device, DeviceGroup, EnrollmentToken
from tests.server.conftest import ready_artifact

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    path: str
    role: str  # who may: viewer | operator | admin
    ok: int = 200
    body: dict[str, Any] | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


DEVICE_ENDPOINTS = [
    Endpoint("device-list", "GET", "/api/v1/devices/", "viewer"),
    Endpoint("device-detail", "GET", "/api/v1/devices/cam-1/", "viewer"),
    Endpoint("device-detail", "PATCH", "/api/v1/devices/cam-1/", "operator", body={"tags": ["roof"]}),
    Endpoint("device-approve", "POST", "/api/v1/devices/cam-p/approve", "operator"),
    Endpoint("device-disable", "POST", "/api/v1/devices/cam-1/disable", "operator"),
    Endpoint("device-retire", "POST", "/api/v1/devices/cam-1/retire", "operator"),
    Endpoint("device-rotate-credentials", "POST", "/api/v1/devices/cam-1/rotate-credentials", "operator"),
    Endpoint(
        "device-preauthorize",
        "POST",
        "/api/v1/devices/preauthorize",
        "operator",
        201,
        {"device_id": "cam-new"},
    ),
    Endpoint(
        "device-provision",
        "POST",
        "/api/v1/devices/provision",
        "admin",
        201,
        {"devices": [{"device_id": "cam-bulk"}]},
    ),
    Endpoint("device-group-list", "GET", "/api/v1/device-groups/", "viewer"),
    Endpoint(
        "device-group-list",
        "POST",
        "/api/v1/device-groups/",
        "operator",
        201,
        {"name": "outdoor", "kind": "dynamic", "rules": {"tags": ["outdoor"]}},
    ),
    Endpoint("device-group-detail", "GET", "/api/v1/device-groups/roof/", "viewer"),
    Endpoint("device-group-detail", "PATCH", "/api/v1/device-groups/roof/", "operator", body={"members": []}),
    Endpoint("device-group-detail", "DELETE", "/api/v1/device-groups/roof/", "operator", 204),
    Endpoint("enrollment-token-list", "GET", "/api/v1/enrollment-tokens/", "admin"),
    Endpoint("enrollment-token-list", "POST", "/api/v1/enrollment-tokens/", "admin", 201, {"name": "line-2"}),
    Endpoint("enrollment-token-revoke", "POST", "/api/v1/enrollment-tokens/{token}/revoke", "admin"),
]
RANK = {"viewer": 1, "operator": 2, "admin": 3}
PERSONAS = {"bob": "viewer", "alice": "operator", "ada": "admin"}


@pytest.fixture
def world(ada, broker):
    admin = broker.admin()
    for device_id, status in (("cam-1", DeviceStatus.ACTIVE), ("cam-p", DeviceStatus.PENDING)):
        Device.objects.create(device_id=device_id, status=status)
        admin.ensure_device(device_id, "pw")
    group = DeviceGroup.objects.create(name="roof")
    group.members.add(Device.objects.get(device_id="cam-1"))
    return services.enrollment_token_create(name="line-1", created_by=ada.user)[0]


def call(client: APIClient, endpoint: Endpoint, token: EnrollmentToken):
    path = endpoint.path.format(token=token.pk)
    return getattr(client, endpoint.method.lower())(path, endpoint.body, format="json")


def test_the_matrices_cover_every_api_v1_endpoint():
    from fleet.urls import api_v1
    from tests.server.test_permissions import ENDPOINTS

    rollouts = {"rollout-list", "rollout-detail", "rollout-policy-list", "rollout-policy-detail"} | {
        f"rollout-{action}" for action in ("start", "pause", "resume", "promote", "abort", "rollback")
    }  # tests/server/test_rollouts_api.py
    # Public by design, with their own tests: enroll (tests/server/test_enrollment*.py) and
    # the trust bundle, read by anyone and uploaded by admins (tests/server/test_trust.py).
    # The API root lists addresses only, like the schema (tests/server/test_api_root.py).
    public = {"enroll", "trust", "api-root"}
    # A target artifact's deltas: who may fetch them, below (and tests/server/test_url_permissions.py).
    deltas = {"artifact-delta-manifest", "artifact-delta-blob"}
    covered = {e.name for e in ENDPOINTS} | {e.name for e in DEVICE_ENDPOINTS} | public | rollouts | deltas
    assert covered == {pattern.name for pattern in api_v1}


@pytest.mark.parametrize("endpoint", DEVICE_ENDPOINTS, ids=str)
def test_anonymous_must_authenticate(endpoint, world, anonymous):
    response = call(anonymous, endpoint, world)
    assert response.status_code == 401 and response.json()["error"]["code"] == "not_authenticated"


@pytest.mark.parametrize("endpoint", DEVICE_ENDPOINTS, ids=str)
def test_an_account_without_a_role_is_refused(endpoint, world, charlie):
    assert call(charlie.client(), endpoint, world).status_code == 403


@pytest.mark.parametrize("persona", sorted(PERSONAS))
@pytest.mark.parametrize("endpoint", DEVICE_ENDPOINTS, ids=str)
def test_each_role_gets_exactly_what_it_may(endpoint, persona, world, request):
    before = sorted(Device.objects.values_list("device_id", "status", "tags"))
    response = call(request.getfixturevalue(persona).client(), endpoint, world)
    if RANK[PERSONAS[persona]] >= RANK[endpoint.role]:
        assert response.status_code == endpoint.ok, response.content[:300]
    else:
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "permission_denied"
        assert sorted(Device.objects.values_list("device_id", "status", "tags")) == before


@pytest.mark.parametrize("endpoint", DEVICE_ENDPOINTS, ids=str)
def test_a_device_token_opens_no_endpoint_meant_for_people(endpoint, world, enrollment_key, anonymous):
    answer = anonymous.post(
        "/api/v1/enroll", {"device_id": "cam-x", "enrollment_token": enrollment_key}, format="json"
    ).json()
    device = APIClient()
    device.credentials(HTTP_AUTHORIZATION=f"Bearer {answer['token']}")
    assert call(device, endpoint, world).status_code == 403


# --- artifacts: a device sees what is assigned to it, and nothing else


@pytest.fixture
def two_devices(version_v1, digits, alice, anonymous, enrollment_key, django_capture_on_commit_callbacks):
    artifact = ready_artifact(version_v1, "int8", digits.build_digits_models()["int8"], alice.user)
    # A delta to it, from an artifact of another version (devices may fetch it with the artifact).
    from fleet.registry import services as registry_services
    from samples.retrained import fine_tune

    other = registry_services.version_create(model=version_v1.model, version="0.9.0", created_by=alice.user)
    base = ready_artifact(other, "int8", fine_tune(digits.build_digits_models()["int8"]), alice.user)
    delta = registry_services.artifact_delta_make(target=artifact, base=base)
    assert delta is not None and delta.status == "ready", delta and delta.reason
    artifact.delta_id = delta.pk
    clients = {}
    for device_id in ("cam-a", "cam-b"):
        answer = anonymous.post(
            "/api/v1/enroll", {"device_id": device_id, "enrollment_token": enrollment_key}, format="json"
        ).json()
        clients[device_id] = APIClient()
        clients[device_id].credentials(HTTP_AUTHORIZATION=f"Bearer {answer['token']}")
    with django_capture_on_commit_callbacks(execute=True):
        services.devices_assign(
            devices=[Device.objects.get(device_id="cam-a")], artifacts={"digits": artifact}, publish="now"
        )
    return artifact, clients


FILES = ["manifest", "blob", "golden", "deltas/{delta}/manifest", "deltas/{delta}/blob"]


@pytest.mark.parametrize("what", FILES)
def test_a_device_fetches_what_is_assigned_to_it(two_devices, what):
    artifact, clients = two_devices
    response = clients["cam-a"].get(f"/api/v1/artifacts/{artifact.pk}/{what.format(delta=artifact.delta_id)}")
    assert response.status_code == 200


@pytest.mark.parametrize("what", FILES)
def test_a_device_cannot_fetch_another_devices_artifact(two_devices, what):
    artifact, clients = two_devices
    response = clients["cam-b"].get(f"/api/v1/artifacts/{artifact.pk}/{what.format(delta=artifact.delta_id)}")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"


def test_a_delta_is_reached_only_through_its_own_target(two_devices, version_v1, digits, alice):
    """cam-a may fetch its artifact; a delta of another artifact is not found through it."""
    artifact, clients = two_devices
    float32 = ready_artifact(version_v1, "float32", digits.build_digits_models()["float32"], alice.user)
    assert (
        clients["cam-a"].get(f"/api/v1/artifacts/{artifact.pk}/deltas/{artifact.delta_id}/blob").status_code
        == 200
    )
    foreign = clients["cam-a"].get(f"/api/v1/artifacts/{artifact.pk}/deltas/{artifact.delta_id + 1000}/blob")
    assert foreign.status_code == 404 and foreign.json()["error"]["code"] == "unknown_delta"
    # The delta's own id under an artifact the device was not given: refused before lookup.
    through_other = clients["cam-a"].get(f"/api/v1/artifacts/{float32.pk}/deltas/{artifact.delta_id}/blob")
    assert through_other.status_code == 403


@pytest.mark.parametrize(
    "path", ["/api/v1/models/", "/api/v1/artifacts/", "/api/v1/devices/", "/api/v1/signing-keys/"]
)
def test_a_device_token_reads_nothing_meant_for_people(two_devices, path):
    _, clients = two_devices
    assert clients["cam-a"].get(path).status_code == 403


def test_a_disabled_devices_token_stops_working(two_devices, alice):
    artifact, clients = two_devices
    alice.client().post("/api/v1/devices/cam-a/disable")
    response = clients["cam-a"].get(f"/api/v1/artifacts/{artifact.pk}/manifest")
    assert response.status_code == 401
