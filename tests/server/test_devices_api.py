"""Device inventory: filters, groups (static and dynamic), updates and lifecycle rules."""

import pytest

from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device, DeviceGroup
from tests.server.conftest import enroll

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]


@pytest.fixture
def fleet_of_devices(broker):
    rows = [
        (
            "cam-1",
            DeviceStatus.ACTIVE,
            True,
            ["outdoor", "roof"],
            "rpi4",
            {"digits": {"version": "1.0.0", "variant": "int8"}},
        ),
        (
            "cam-2",
            DeviceStatus.ACTIVE,
            False,
            ["outdoor"],
            "rpi4",
            {"digits": {"version": "2.0.0", "variant": "int8"}},
        ),
        ("cam-3", DeviceStatus.PENDING, False, [], "jetson", {}),
        (
            "cam-4",
            DeviceStatus.DISABLED,
            False,
            ["roof"],
            "jetson",
            {"digits": {"version": "1.0.0", "variant": "float32"}},
        ),
    ]
    for device_id, status, online, tags, hardware, reported in rows:
        Device.objects.create(
            device_id=device_id,
            status=status,
            online=online,
            tags=tags,
            hardware=hardware,
            reported_models=reported,
        )
        broker.admin().ensure_device(device_id, "pw")


def ids(response):
    assert response.status_code == 200, response.content
    return sorted(device["device_id"] for device in response.json()["results"])


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ["cam-1", "cam-2", "cam-3", "cam-4"]),
        ("?status=active", ["cam-1", "cam-2"]),
        ("?online=true", ["cam-1"]),
        ("?tag=roof", ["cam-1", "cam-4"]),
        ("?hardware=jetson", ["cam-3", "cam-4"]),
        ("?model=digits", ["cam-1", "cam-2", "cam-4"]),
        ("?model=digits&version=1.0.0", ["cam-1", "cam-4"]),
        ("?status=active&tag=outdoor&online=false", ["cam-2"]),
    ],
)
def test_it_filters_the_inventory(fleet_of_devices, bob, query, expected):
    assert ids(bob.client().get(f"/api/v1/devices/{query}")) == expected


def test_a_version_filter_needs_a_model(fleet_of_devices, bob):
    response = bob.client().get("/api/v1/devices/?version=1.0.0")
    assert response.status_code == 400 and response.json()["error"]["field"] == "version"


def test_static_groups_list_their_members(fleet_of_devices, alice, bob):
    response = alice.client().post(
        "/api/v1/device-groups/", {"name": "pilot", "members": ["cam-1", "cam-3"]}, format="json"
    )
    assert response.status_code == 201 and response.json()["device_count"] == 2
    assert ids(bob.client().get("/api/v1/devices/?group=pilot")) == ["cam-1", "cam-3"]
    assert bob.client().get("/api/v1/devices/cam-1/").json()["groups"] == ["pilot"]


def test_a_dynamic_group_takes_in_devices_that_match_later(fleet_of_devices, alice, bob):
    alice.client().post(
        "/api/v1/device-groups/",
        {"name": "outdoor-active", "kind": "dynamic", "rules": {"tags": ["outdoor"], "status": "active"}},
        format="json",
    )
    assert ids(bob.client().get("/api/v1/devices/?group=outdoor-active")) == ["cam-1", "cam-2"]
    alice.client().patch("/api/v1/devices/cam-3/", {"tags": ["outdoor"]}, format="json")
    alice.client().post("/api/v1/devices/cam-3/approve")
    assert ids(bob.client().get("/api/v1/devices/?group=outdoor-active")) == ["cam-1", "cam-2", "cam-3"]


@pytest.mark.parametrize(
    "rules",
    [
        {"colour": "red"},
        {"tags": "outdoor"},
        {"status": "asleep"},
        ["tags"],
        {"online": "no"},  # would filter as online (a non-empty string is true)
        {"supports_int8": 0},
        {"hardware": 4},
        {"hardware": ""},
    ],
    ids=str,
)
def test_bad_group_rules_are_refused(fleet_of_devices, alice, rules):
    response = alice.client().post(
        "/api/v1/device-groups/", {"name": "bad", "kind": "dynamic", "rules": rules}, format="json"
    )
    assert response.status_code == 400
    assert not DeviceGroup.objects.filter(name="bad").exists()


def test_an_unknown_group_matches_nothing(fleet_of_devices, bob):
    assert ids(bob.client().get("/api/v1/devices/?group=nope")) == []


def test_operators_edit_names_and_tags_but_not_state(fleet_of_devices, alice):
    response = alice.client().patch(
        "/api/v1/devices/cam-1/",
        {"display_name": "Front door", "tags": ["b", "a", "a"], "status": "retired", "online": False},
        format="json",
    )
    assert response.status_code == 200
    device = Device.objects.get(device_id="cam-1")
    assert (device.display_name, device.tags, device.status, device.online) == (
        "Front door",
        ["a", "b"],
        "active",
        True,
    )


@pytest.mark.parametrize(
    ("device_id", "action", "status", "code"),
    [
        ("cam-1", "approve", 409, "illegal_transition"),  # already active
        ("cam-3", "disable", 200, None),
        ("cam-4", "approve", 200, None),  # a disabled device may come back
        ("cam-9", "approve", 404, "unknown_device"),
    ],
)
def test_lifecycle_actions_follow_the_transition_table(
    fleet_of_devices, alice, device_id, action, status, code
):
    response = alice.client().post(f"/api/v1/devices/{device_id}/{action}")
    assert response.status_code == status, response.content
    if code:
        assert response.json()["error"]["code"] == code


def test_retired_is_final(fleet_of_devices, alice):
    assert alice.client().post("/api/v1/devices/cam-2/retire").status_code == 200
    for action in ("approve", "disable", "retire", "rotate-credentials"):
        response = alice.client().post(f"/api/v1/devices/cam-2/{action}")
        assert response.status_code == 409, action
    assert Device.objects.get(device_id="cam-2").status == DeviceStatus.RETIRED


def test_preauthorizing_an_existing_id_is_a_conflict(fleet_of_devices, alice):
    response = alice.client().post("/api/v1/devices/preauthorize", {"device_id": "cam-1"}, format="json")
    assert response.status_code == 409 and response.json()["error"]["code"] == "duplicate_device"


def test_enrollment_tokens_are_shown_once_and_can_be_revoked(ada, anonymous):
    created = (
        ada.client()
        .post(
            "/api/v1/enrollment-tokens/", {"name": "line", "auto_approve": True, "max_uses": 5}, format="json"
        )
        .json()
    )
    assert created["key"].startswith("me_")
    listed = ada.client().get("/api/v1/enrollment-tokens/").json()["results"]
    assert "key" not in listed[0]  # only the answer to POST carries it
    assert ada.client().post(f"/api/v1/enrollment-tokens/{created['id']}/revoke").json()["revoked_at"]
    refused = anonymous.post(
        "/api/v1/enroll", {"device_id": "z", "enrollment_token": created["key"]}, format="json"
    )
    assert refused.json()["error"]["code"] == "invalid_enrollment_token"


def test_enrollment_tokens_list_their_limits_and_state(ada, anonymous):
    created = (
        ada.client().post("/api/v1/enrollment-tokens/", {"name": "one", "max_uses": 1}, format="json").json()
    )
    assert created["expires_at"] and created["state"] == "usable"
    assert enroll(anonymous, "cam-t1", enrollment_token=created["key"]).status_code == 201
    listed = ada.client().get("/api/v1/enrollment-tokens/").json()["results"]
    assert [(t["name"], t["uses"], t["max_uses"], t["state"]) for t in listed] == [("one", 1, 1, "used_up")]


@pytest.mark.parametrize("action", ["approve", "disable", "retire"])
def test_lifecycle_actions_work_on_a_device_that_never_enrolled(alice, broker, action):
    alice.client().post("/api/v1/devices/preauthorize", {"device_id": "cam-never"}, format="json")
    response = alice.client().post(f"/api/v1/devices/cam-never/{action}")
    assert response.status_code == 200, response.content
    assert broker.admin().get_client("cam-never") is None


def test_a_groups_rules_are_checked_when_changed_too(fleet_of_devices, alice):
    alice.client().post(
        "/api/v1/device-groups/",
        {"name": "lookout", "kind": "dynamic", "rules": {"online": True}},
        format="json",
    )
    response = alice.client().patch(
        "/api/v1/device-groups/lookout/", {"rules": {"online": "no"}}, format="json"
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_rules"
    assert DeviceGroup.objects.get(name="lookout").rules == {"online": True}
    # Control: a good change goes through (the same service as the admin's form).
    response = alice.client().patch(
        "/api/v1/device-groups/lookout/", {"rules": {"online": False}}, format="json"
    )
    assert response.status_code == 200 and DeviceGroup.objects.get(name="lookout").rules == {"online": False}
