"""Rollouts over the API: who may do what, and what the answers say."""

import pytest

from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device
from fleet.registry import services as registry
from fleet.rollouts.models import Rollout, RolloutPolicy
from tests.server.conftest import ready_artifact

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]
ACTIONS = ["start", "pause", "resume", "promote", "abort", "rollback"]


@pytest.fixture
def world(digits_model, digits):
    v2 = registry.version_create(model=digits_model, version="2.0.0")
    ready_artifact(v2, "int8", digits.build_digits_models(version="2.0.0")["int8"])
    for n in range(4):
        Device.objects.create(device_id=f"cam-{n}", status=DeviceStatus.ACTIVE, tags=["pilot"])
    RolloutPolicy.objects.create(name="canary", gates={})
    return Rollout.objects.create(
        model=digits_model, target_version=v2, targets={"tags": ["pilot"]}, policy=RolloutPolicy.objects.get()
    )


def create_body(**changes):
    return {
        "model": "digits",
        "version": "2.0.0",
        "policy": "canary",
        "targets": {"tags": ["pilot"]},
        **changes,
    }


def test_an_operator_creates_starts_and_reads_a_rollout(world, alice, bob):
    created = alice.client().post("/api/v1/rollouts/", create_body(), format="json")
    assert created.status_code == 201, created.content
    rollout_id = created.json()["id"]
    started = alice.client().post(f"/api/v1/rollouts/{rollout_id}/start", {"reason": "go"}, format="json")
    assert started.status_code == 200 and started.json()["state"] == "running"
    detail = bob.client().get(f"/api/v1/rollouts/{rollout_id}").json()
    assert detail["current_stage"] == 0 and len(detail["stages"]) == 3
    assert detail["counts"]["notified"] == 1 and detail["counts"]["pending"] == 3
    assert detail["evaluations"] == []


def test_the_answer_explains_the_latest_evaluation(world, alice):
    from fleet.rollouts import services

    services.rollout_start(rollout=world)
    services.rollout_evaluate(rollout_id=world.pk)
    evaluations = alice.client().get(f"/api/v1/rollouts/{world.pk}").json()["evaluations"]
    assert evaluations and {"metric", "verdict", "decision", "candidate_n", "threshold", "p_value"} <= set(
        evaluations[0]
    )


def test_an_illegal_transition_is_409_with_a_clear_error(world, alice):
    alice.client().post(f"/api/v1/rollouts/{world.pk}/abort")
    response = alice.client().post(f"/api/v1/rollouts/{world.pk}/resume")
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "illegal_transition" and "aborted" in error["message"]


@pytest.mark.parametrize(
    ("changes", "status", "code"),
    [
        ({"targets": {"tags": ["nobody"]}}, 400, "no_devices"),
        ({"targets": {}}, 400, "invalid_targets"),
        ({"version": "9.9.9"}, 404, "unknown_version"),
        ({"policy": "nope"}, 400, "does_not_exist"),
    ],
)
def test_bad_rollouts_are_refused(world, alice, changes, status, code):
    response = alice.client().post("/api/v1/rollouts/", create_body(**changes), format="json")
    assert response.status_code == status and response.json()["error"]["code"] == code


def test_a_revoked_version_is_409(world, alice):
    registry.version_set_status(version=world.target_version, status="revoked")
    response = alice.client().post("/api/v1/rollouts/", create_body(), format="json")
    assert response.status_code == 409 and response.json()["error"]["code"] == "version_revoked"


def test_a_policy_with_bad_stages_is_refused(world, alice):
    response = alice.client().post(
        "/api/v1/rollout-policies/",
        {"name": "bad", "stages": [{"kind": "percent", "value": 150}]},
        format="json",
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_stages"


@pytest.mark.parametrize(
    ("window", "field"),
    [
        ({"start": "22:00"}, "maintenance_window.end"),
        ({"start": "24:00", "end": "05:00"}, "maintenance_window.start"),
        ({"start": "10pm", "end": "05:00"}, "maintenance_window.start"),
        ({"start": "22:00", "end": "22:00"}, "maintenance_window.end"),
        ({"start": "22:00", "end": "05:00", "days": ["mon"]}, "maintenance_window.days"),
        ("22:00-05:00", "maintenance_window"),
    ],
    ids=str,
)
def test_a_policy_with_a_bad_maintenance_window_is_refused(world, alice, window, field):
    """Before, any JSON was stored and the evaluator failed on it when a stage passed."""
    body = {"name": "nightly", "maintenance_window": window}
    response = alice.client().post("/api/v1/rollout-policies/", body, format="json")
    assert response.status_code == 400, response.json()
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_maintenance_window", field)
    assert not RolloutPolicy.objects.filter(name="nightly").exists()


def test_a_maintenance_window_may_cross_midnight_or_be_left_out(world, alice):
    for name, window in (("nightly", {"start": "22:00", "end": "05:00"}), ("anytime", None)):
        body = {"name": name, "maintenance_window": window}
        assert alice.client().post("/api/v1/rollout-policies/", body, format="json").status_code == 201
        assert RolloutPolicy.objects.get(name=name).maintenance_window == window


def test_a_rollout_does_not_start_on_a_policy_whose_stored_window_is_bad(world, alice):
    """A window stored before it was checked: refused at start, not a crash in the evaluator."""
    RolloutPolicy.objects.update(maintenance_window={"start": "22:00"})
    response = alice.client().post(f"/api/v1/rollouts/{world.pk}/start", {"reason": "go"}, format="json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_maintenance_window"
    world.refresh_from_db()
    assert world.state == "draft" and not world.assignments.exists()
    RolloutPolicy.objects.update(maintenance_window={"start": "22:00", "end": "05:00"})  # control
    response = alice.client().post(f"/api/v1/rollouts/{world.pk}/start", {"reason": "go"}, format="json")
    assert response.status_code == 200 and response.json()["state"] == "running"


@pytest.mark.parametrize("action", ACTIONS)
def test_a_viewer_cannot_act(world, bob, action):
    response = bob.client().post(f"/api/v1/rollouts/{world.pk}/{action}")
    assert response.status_code == 403
    world.refresh_from_db()
    assert world.state == "draft"


@pytest.mark.parametrize("action", ACTIONS)
def test_anonymous_cannot_act(world, anonymous, action):
    assert anonymous.post(f"/api/v1/rollouts/{world.pk}/{action}").status_code == 401


@pytest.mark.parametrize("action", ACTIONS)
def test_no_role_cannot_act(world, charlie, action):
    assert charlie.client().post(f"/api/v1/rollouts/{world.pk}/{action}").status_code == 403


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/api/v1/rollouts/", None),
        ("post", "/api/v1/rollouts/", create_body()),
        ("get", "/api/v1/rollouts/{id}", None),
        ("get", "/api/v1/rollout-policies/", None),
        ("post", "/api/v1/rollout-policies/", {"name": "x"}),
        ("get", "/api/v1/rollout-policies/canary/", None),
        ("patch", "/api/v1/rollout-policies/canary/", {"description": "y"}),
    ],
)
def test_reads_need_a_viewer_and_writes_an_operator(
    world, anonymous, charlie, bob, alice, method, path, body
):
    path = path.format(id=world.pk)
    write = method != "get"
    assert getattr(anonymous, method)(path, body, format="json").status_code == 401
    assert getattr(charlie.client(), method)(path, body, format="json").status_code == 403
    assert getattr(bob.client(), method)(path, body, format="json").status_code == (403 if write else 200)
    assert getattr(alice.client(), method)(path, body, format="json").status_code in (200, 201)


def test_a_device_token_cannot_touch_rollouts(world, anonymous, enrollment_key):
    from rest_framework.test import APIClient

    answer = anonymous.post(
        "/api/v1/enroll", {"device_id": "cam-x", "enrollment_token": enrollment_key}, format="json"
    ).json()
    device = APIClient()
    device.credentials(HTTP_AUTHORIZATION=f"Bearer {answer['token']}")
    assert device.get(f"/api/v1/rollouts/{world.pk}").status_code == 403
    assert device.post(f"/api/v1/rollouts/{world.pk}/start").status_code == 403
