"""The admin acts only through the services (issue 10, section 2): a rollout is read-only once
it exists, rollouts, gate evaluations, audit entries and device events are never deleted,
"Add rollout" runs the API's checks, actions are legal-only buttons that ask for a reason,
and deleting a device retires it. Django's test client against real PostgreSQL and the
project's Mosquitto; each refusal has a positive control."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import Group
from django.db import transaction
from django.test import Client
from django.utils import timezone

from fleet.core.choices import Role
from fleet.core.errors import Conflict
from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device, DeviceEvent
from fleet.registry import services as registry
from fleet.registry.choices import VersionStatus
from fleet.rollouts import services
from fleet.rollouts.admin import ACTIONS, legal_actions
from fleet.rollouts.choices import AssignmentState, RolloutState
from fleet.rollouts.models import AuditEntry, GateEvaluation, Rollout
from tests.server import admin_world
from tests.server.conftest import enroll

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]
ROLLOUTS = "/admin/rollouts/rollout/"


def web(persona) -> Client:
    client = Client()
    client.force_login(persona.user)
    return client


@pytest.fixture
def world(digits_model, digits, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        return admin_world.build(digits_model, digits)


@pytest.fixture
def running(world, alice):
    return admin_world.start(world, alice.user)


def buttons(page: str) -> set[str]:
    return set(re.findall(r'data-action="([a-z]+)"', page))


# --- roles


def test_no_role_has_a_delete_permission(db):
    for role in Role:
        codenames = set(Group.objects.get(name=role.value).permissions.values_list("codename", flat=True))
        assert not {c for c in codenames if c.startswith("delete_")}, role
        assert "view_rollout" in codenames  # control: the roles do hold permissions
    operator = set(Group.objects.get(name="operator").permissions.values_list("codename", flat=True))
    assert {"add_rollout", "change_device", "add_rolloutpolicy"} <= operator
    viewer = set(Group.objects.get(name="viewer").permissions.values_list("codename", flat=True))
    assert not {c for c in viewer if not c.startswith("view_")}


def test_every_role_opens_the_admin_and_no_role_does_not(ada, alice, bob, charlie):
    for persona in (ada, alice, bob):
        assert web(persona).get(ROLLOUTS).status_code == 200, persona.user
    response = web(charlie).get(ROLLOUTS)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


# --- a rollout is read-only and append-only


@pytest.mark.parametrize("finish", [None, "rollback"])
def test_a_started_or_finished_rollout_cannot_be_edited(running, ada, world, finish):
    if finish:
        services.rollout_rollback(rollout=running, reason="test")
    client = web(ada)
    page = client.get(f"{ROLLOUTS}{running.pk}/change/").content.decode()
    assert "2.0.0" in page  # control: the page shows the rollout
    assert 'name="target_version"' not in page and 'name="_save"' not in page
    response = client.post(
        f"{ROLLOUTS}{running.pk}/change/",
        {"model": world["v1"].model_id, "target_version": world["v1"].pk, "policy": world["policy"].pk},
    )
    assert response.status_code == 403
    running.refresh_from_db()
    assert running.target_version == world["v2"]


def test_nobody_deletes_rollouts_evaluations_audit_or_events_in_the_admin(running, ada):
    services.rollout_evaluate(rollout_id=running.pk)
    now = timezone.now()
    device = running.assignments.first().device
    event = DeviceEvent.objects.create(device=device, message_id="m1", type="active", ts=now, received_at=now)
    client = web(ada)  # a superuser: the admin classes refuse even them
    assert client.get(f"{ROLLOUTS}{running.pk}/delete/").status_code == 403
    assert client.get(f"/admin/devices/deviceevent/{event.pk}/delete/").status_code == 403
    for url, pk in ((ROLLOUTS, running.pk), ("/admin/devices/deviceevent/", event.pk)):
        client.post(url, {"action": "delete_selected", "_selected_action": [pk], "post": "yes"})
        assert "delete_selected" not in client.get(url).content.decode()
    page = client.get(f"{ROLLOUTS}{running.pk}/change/").content.decode()
    assert "-DELETE" not in page  # no delete boxes on the audit and evaluation inlines
    assert Rollout.objects.filter(pk=running.pk).exists()
    assert DeviceEvent.objects.filter(pk=event.pk).exists()
    assert AuditEntry.objects.filter(rollout=running).exists()
    assert GateEvaluation.objects.filter(rollout=running).exists()


def test_nobody_deletes_a_rollout_through_the_api(running, ada):
    assert ada.client().delete(f"/api/v1/rollouts/{running.pk}").status_code == 405
    assert ada.client().get(f"/api/v1/rollouts/{running.pk}").status_code == 200  # control
    assert Rollout.objects.filter(pk=running.pk).exists()


# --- "Add rollout" runs the API's service and checks


def add_form(world, **changes) -> dict:
    form = {"version": world["v2"].pk, "policy": world["policy"].pk, "tags": "fleet", "priority": 0}
    return {**form, **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tags": ""}, "targets needs groups, tags or devices"),
        ({"tags": "nowhere"}, "The targets match no active device"),
    ],
)
def test_add_rollout_refuses_what_the_api_refuses(world, alice, changes, message):
    page = web(alice).post(f"{ROLLOUTS}add/", add_form(world, **changes))
    assert page.status_code == 200
    assert message in page.content.decode()
    assert not Rollout.objects.exists()


def test_add_rollout_refuses_a_revoked_version(world, alice):
    registry.version_set_status(version=world["v2"], status=VersionStatus.REVOKED)
    page = web(alice).post(f"{ROLLOUTS}add/", add_form(world)).content.decode()
    assert "is revoked" in page
    assert not Rollout.objects.exists()


def test_add_rollout_creates_a_draft_through_the_service(world, alice):
    response = web(alice).post(f"{ROLLOUTS}add/", add_form(world, devices="cam-01, cam-02", tags=""))
    rollout = Rollout.objects.get()
    assert response.status_code == 302 and response["Location"].endswith(f"/{rollout.pk}/change/")
    assert rollout.state == RolloutState.DRAFT
    assert rollout.targets == {"devices": ["cam-01", "cam-02"]}
    assert rollout.created_by == alice.user
    assert buttons(web(alice).get(response["Location"]).content.decode()) == {"start", "abort"}


def test_a_viewer_cannot_add_a_rollout(world, bob):
    assert web(bob).post(f"{ROLLOUTS}add/", add_form(world)).status_code == 403
    assert not Rollout.objects.exists()


# --- actions: legal-only buttons, confirmation with impact, a required reason


def test_a_viewer_sees_no_buttons_and_cannot_act(running, bob, alice):
    page = web(bob).get(f"{ROLLOUTS}{running.pk}/change/").content.decode()
    assert "Running" in page and buttons(page) == set()
    for method in ("get", "post"):
        response = getattr(web(bob), method)(f"{ROLLOUTS}{running.pk}/act/pause/", {"reason": "x"})
        assert response.status_code == 403
    running.refresh_from_db()
    assert running.state == RolloutState.RUNNING
    # Control: an operator sees the buttons on the same page.
    assert buttons(web(alice).get(f"{ROLLOUTS}{running.pk}/change/").content.decode())


def test_only_legal_actions_are_buttons(running, alice):
    client = web(alice)
    url = f"{ROLLOUTS}{running.pk}/change/"
    assert buttons(client.get(url).content.decode()) == {"pause", "promote", "abort", "rollback"}
    services.rollout_pause(rollout=running)
    assert buttons(client.get(url).content.decode()) == {"resume", "abort", "rollback"}
    running.refresh_from_db()
    services.rollout_rollback(rollout=running)
    assert buttons(client.get(url).content.decode()) == set()


def test_an_illegal_action_is_refused_with_a_message(running, alice):
    response = web(alice).post(f"{ROLLOUTS}{running.pk}/act/resume/", {"reason": "why not"}, follow=True)
    assert "cannot resume" in response.content.decode()
    running.refresh_from_db()
    assert running.state == RolloutState.RUNNING
    assert not AuditEntry.objects.filter(action="resume").exists()


def test_pause_asks_for_a_reason_and_writes_it_to_the_audit_log(running, alice):
    client = web(alice)
    url = f"{ROLLOUTS}{running.pk}/act/pause/"
    confirm = client.get(url).content.decode()
    assert "Impact:" in confirm and "devices keep 2.0.0" in confirm
    assert client.post(url, {"reason": "  "}).status_code == 200  # the form again: a reason is required
    running.refresh_from_db()
    assert running.state == RolloutState.RUNNING
    response = client.post(url, {"reason": "latency alarms in eu-west"})
    assert response.status_code == 302
    running.refresh_from_db()
    assert running.state == RolloutState.PAUSED
    entry = AuditEntry.objects.filter(rollout=running).order_by("-at", "-pk").first()
    assert (entry.action, entry.actor, entry.reason) == ("pause", alice.user, "latency alarms in eu-west")
    page = client.get(f"{ROLLOUTS}{running.pk}/change/").content.decode()
    assert "Paused by alice at" in page and "latency alarms in eu-west" in page


def test_the_rollback_confirmation_says_which_version_devices_return_to(running, alice):
    running.assignments.filter(state=AssignmentState.NOTIFIED).update(state=AssignmentState.ACTIVE)
    on_candidate = running.assignments.filter(state=AssignmentState.ACTIVE).count()
    page = web(alice).get(f"{ROLLOUTS}{running.pk}/act/rollback/").content.decode()
    assert f"{on_candidate} devices return to 1.0.0" in page
    web(alice).post(f"{ROLLOUTS}{running.pk}/act/rollback/", {"reason": "accuracy drop"})
    running.refresh_from_db()
    assert running.state == RolloutState.ROLLED_BACK
    assert running.assignments.filter(state=AssignmentState.ROLLED_BACK).count() == on_candidate


def test_the_rollout_page_speaks_in_labels_not_codes(running, alice):
    services.rollout_evaluate(rollout_id=running.pk)
    page = web(alice).get(f"{ROLLOUTS}{running.pk}/change/").content.decode()
    assert "GateEvaluation object" not in page and "AuditEntry object" not in page
    assert "Draft → Running" in page
    assert '<details class="raw"><summary>raw</summary>' in page  # the policy's JSON, folded
    listing = web(alice).get(ROLLOUTS).content.decode()
    notified = running.assignments.filter(state=AssignmentState.NOTIFIED).count()
    assert f"{notified} notified" in listing and "pending (later stage)" in listing  # labels


# --- devices: delete means retire, through the service


def test_deleting_a_device_in_the_admin_retires_it_and_removes_its_broker_login(
    anonymous, enrollment_key, alice, broker
):
    answer = enroll(anonymous, "cam-retire", enrollment_token=enrollment_key).json()
    device = Device.objects.get(device_id="cam-retire")
    assert broker.admin().get_client("cam-retire") is not None  # control: it has a login
    client = web(alice)
    assert "Retire" in client.get(f"/admin/devices/device/{device.pk}/delete/").content.decode()
    response = client.post(f"/admin/devices/device/{device.pk}/delete/")
    assert response.status_code == 302
    device.refresh_from_db()
    assert device.status == DeviceStatus.RETIRED
    assert broker.admin().get_client(answer["mqtt"]["username"]) is None
    assert client.get(f"/admin/devices/device/{device.pk}/delete/").status_code == 403  # nothing left


def test_a_viewer_cannot_run_bulk_actions(world, bob, alice):
    device = world["devices"][0]
    form = {"action": "retire", "_selected_action": [device.pk]}
    web(bob).post("/admin/devices/device/", form)
    assert Device.objects.get(pk=device.pk).status == DeviceStatus.ACTIVE
    assert web(bob).get(f"/admin/devices/device/{device.pk}/delete/").status_code == 403
    web(alice).post("/admin/devices/device/", form)  # control: an operator can
    assert Device.objects.get(pk=device.pk).status == DeviceStatus.RETIRED


# --- the device page: words and units, raw JSON folded, edits through the service


def test_the_device_page_shows_health_with_units_and_folds_the_json(world, alice):
    device = world["devices"][0]
    health = {"cpu_pct": 12.54, "rss_mb": 61.2, "temp_c": 48.0, "disk_free_mb": 812, "uptime_s": 90000}
    Device.objects.filter(pk=device.pk).update(health=health, supported_ops=["ADD", "SOFTMAX"])
    page = web(alice).get(f"/admin/devices/device/{device.pk}/change/").content.decode()
    assert "CPU 12.5 %, RSS 61.2 MB, 48.0 °C, disk free 812 MB, up 1 d 1 h" in page
    assert "2 TFLite ops" in page and "digits 1.0.0" in page
    assert page.count('<details class="raw"><summary>raw</summary>') == 1
    assert 'name="desired_shadows"' not in page and 'name="health"' not in page


def test_editing_a_device_goes_through_the_service(world, alice):
    device = world["devices"][0]
    form = {"display_name": "Front door", "tags": "b, a, a"}
    response = web(alice).post(f"/admin/devices/device/{device.pk}/change/", form)
    assert response.status_code == 302
    device.refresh_from_db()
    assert (device.display_name, device.tags) == ("Front door", ["a", "b"])  # sorted, once each


# --- the buttons and the state machine agree


class _Undo(Exception):
    pass


def reach(world, state: str, by):
    """A rollout in ``state``, through the services."""
    if state == RolloutState.DRAFT:
        return services.rollout_create(
            model=world["v2"].model, version=world["v2"], targets={"tags": ["fleet"]}, policy=world["policy"]
        )
    rollout = admin_world.start(world, by)
    steps = {
        RolloutState.PAUSED: [services.rollout_pause],
        RolloutState.COMPLETED: [services.rollout_promote, services.rollout_promote],
        RolloutState.ABORTED: [services.rollout_abort],
        RolloutState.ROLLED_BACK: [services.rollout_rollback],
    }
    for step in steps.get(state, []):
        rollout = step(rollout=Rollout.objects.get(pk=rollout.pk))
    rollout.refresh_from_db()
    assert rollout.state == state
    return rollout


@pytest.mark.parametrize("state", RolloutState.values)
def test_a_button_is_shown_exactly_when_its_service_would_act(world, alice, state):
    rollout = reach(world, state, alice.user)
    for action, service in ACTIONS.items():
        try:
            with transaction.atomic():
                service(rollout=Rollout.objects.get(pk=rollout.pk), by=alice.user, reason="probe")
                raise _Undo
        except _Undo:
            acted = True
        except Conflict as exc:
            assert exc.code == "illegal_transition", exc.message
            acted = False
        assert (action in legal_actions(rollout)) == acted, (state, action)
    page = web(alice).get(f"{ROLLOUTS}{rollout.pk}/change/").content.decode()
    assert buttons(page) == set(legal_actions(rollout))


def test_the_first_sentence_is_the_evaluators_when_no_person_acted_last(world, alice):
    rollout = admin_world.start(world, alice.user)
    sentence = "Rolled back at stage 1 by the accuracy gate: 72.0 % (n = 239) vs 97.5 % (n = 2,037)."
    Rollout.objects.filter(pk=rollout.pk).update(last_decision=sentence)
    services.rollout_rollback(rollout=Rollout.objects.get(pk=rollout.pk), by=None, reason=sentence)
    page = web(alice).get(f"{ROLLOUTS}{rollout.pk}/change/").content.decode()
    assert f'id="rollout-headline">{sentence}</p>' in page


@pytest.mark.parametrize(("state", "action"), [("draft", "resume"), ("paused", "start")])
def test_the_api_refuses_what_only_the_transition_table_allowed(world, alice, state, action):
    """Found by the test above: "resume" ran a draft without placing a device, and "start" on
    a paused rollout placed its devices twice (a 500)."""
    rollout = reach(world, state, alice.user)
    response = alice.client().post(f"/api/v1/rollouts/{rollout.pk}/{action}", {"reason": "x"}, format="json")
    assert response.status_code == 409 and response.json()["error"]["code"] == "illegal_transition"
    rollout.refresh_from_db()
    assert rollout.state == state
    # Control: the action its state does allow goes through.
    allowed = {"draft": "start", "paused": "resume"}[state]
    assert (
        alice.client().post(f"/api/v1/rollouts/{rollout.pk}/{allowed}", {}, format="json").status_code == 200
    )
