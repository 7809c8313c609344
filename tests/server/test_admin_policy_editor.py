"""The policy editor (issue 10, section 1): stages and gates as fields with units, checked by
the API's own policy_validate, and a diagram of the stages. Django's test client, real
PostgreSQL."""

from __future__ import annotations

import json
import re

import pytest
from django.test import Client

from fleet.rollouts.models import RolloutPolicy
from tests.server.test_admin_no_raw_json import raw_json_shown

pytestmark = pytest.mark.django_db
POLICIES = "/admin/rollouts/rolloutpolicy/"


def web(persona) -> Client:
    client = Client()
    client.force_login(persona.user)
    return client


def editor(**changes) -> dict:
    """The form as a browser posts it: a shadow stage of 10 % then everyone, error and
    install ceilings in percent, the accuracy gate on with a 2-point margin at 95 %."""
    form = {
        "name": "careful",
        "description": "",
        "on_failure": "rollback",
        "approval": "automatic",
        "window_start": "",
        "window_end": "",
        "pickup_timeout_seconds": "900",
        "stages-rows": "4",
        "stages-0-value": "10",
        "stages-0-kind": "percent",
        "stages-0-min_devices": "5",
        "stages-0-soak_seconds": "600",
        "stages-0-mode": "shadow",
        "stages-0-sample_rate": "20",
        "stages-1-value": "100",
        "stages-1-kind": "percent",
        "stages-1-mode": "live",
        "stages-2-value": "",  # the spare rows, left empty
        "stages-3-value": "",
        "gates-form": "1",
        "gates-gates-max_install_failure_rate": "10",
        "gates-gates-max_error_rate": "1",
        "gates-gates-max_latency_p95_ratio": "1.5",
        "gates-accuracy-on": "1",
        "gates-accuracy-max_drop_pp": "2",
        "gates-accuracy-confidence": "95",
        "gates-shadow-min_agreement": "90",  # typed, but the shadow gate stays off
    }
    return {**form, **changes}


def test_the_editor_saves_stages_and_gates_from_fields_with_units(alice):
    response = web(alice).post(f"{POLICIES}add/", editor())
    assert response.status_code == 302, response.content.decode()[:2000]
    policy = RolloutPolicy.objects.get(name="careful")
    assert policy.stages == [
        {
            "kind": "percent",
            "value": 10,
            "min_devices": 5,
            "soak_seconds": 600,
            "mode": "shadow",
            "sample_rate": 0.2,
        },
        {"kind": "percent", "value": 100, "min_devices": 1, "soak_seconds": 0, "mode": "live"},
    ]
    assert policy.gates == {
        "max_install_failure_rate": 0.1,
        "max_error_rate": 0.01,
        "max_latency_p95_ratio": 1.5,
        "accuracy": {"max_drop_pp": 2, "confidence": 0.95},
    }


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"stages-1-value": "150"}, "stages[1].value"),
        ({"stages-0-value": "ten"}, "stages[0].value"),
        ({"stages-1-mode": "shadow"}, "The last stage must be live"),
        ({"gates-accuracy-confidence": "200"}, "gates.accuracy.confidence"),
        ({"gates-gates-max_error_rate": "0"}, "gates.max_error_rate"),
    ],
)
def test_the_editor_refuses_what_the_api_refuses_with_the_same_message(alice, changes, field):
    page = web(alice).post(f"{POLICIES}add/", editor(**changes)).content.decode()
    assert not RolloutPolicy.objects.filter(name="careful").exists()
    shown = re.search(r'<ul class="errorlist"[^>]*><li>([^<]+)</li>', page).group(1)
    assert shown.startswith(field)  # the field's path, as the API names it
    # The API, given the document the editor built, answers the same sentence.
    posted = web(alice).post(f"{POLICIES}add/", editor(**changes))
    document = {
        "name": "careful-api",
        "stages": json.loads(posted.context["adminform"].form["stages"].value()),
        "gates": json.loads(posted.context["adminform"].form["gates"].value()),
    }
    answer = alice.client().post("/api/v1/rollout-policies/", document, format="json")
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == shown.replace("&#x27;", "'")


def test_the_editor_shows_a_policy_in_units_with_a_diagram_of_its_stages(alice):
    policy = RolloutPolicy.objects.create(
        name="shown",
        stages=[
            {"kind": "percent", "value": 10, "mode": "shadow", "soak_seconds": 600, "sample_rate": 0.25},
            {"kind": "count", "value": 20, "soak_seconds": 300},
            {"kind": "percent", "value": 100},
        ],
        gates={"max_error_rate": 0.07, "accuracy": {"max_drop_pp": 2.0, "confidence": 0.95}},
    )
    page = web(alice).get(f"{POLICIES}{policy.pk}/change/").content.decode()
    diagram = re.search(r'<ol class="stage-diagram".*?</ol>', page, re.S).group(0)
    boxes = [re.sub(r"<[^>]+>", " ", box).split() for box in re.findall(r"<li>(.*?)</li>", diagram, re.S)]
    assert boxes == [
        ["Stage", "1", "10", "%", "(shadow)", "soak", "600", "s"],
        ["Stage", "2", "20", "devices", "soak", "300", "s"],
        ["Stage", "3", "100", "%"],
    ]
    assert 'name="stages-0-sample_rate" value="25"' in page  # a fraction shown as a percentage
    assert 'name="gates-gates-max_error_rate" value="7"' in page  # 0.07, not 7.000000000000001
    assert re.search(r'name="gates-accuracy-confidence" value="95"', page)
    assert re.search(r'name="gates-accuracy-on" value="1" checked', page)
    assert not re.search(r'name="gates-shadow-on" value="1" checked', page)  # control: off is off
    assert 'placeholder="100"' in page  # a blank field shows its default (min_inferences)


def test_the_json_document_is_still_accepted_as_the_api_takes_it(alice):
    form = {**editor(), "stages": '[{"kind": "percent", "value": 100}]', "gates": '{"max_error_rate": 0.02}'}
    form = {key: value for key, value in form.items() if not key.startswith(("stages-", "gates-"))}
    assert web(alice).post(f"{POLICIES}add/", form).status_code == 302
    assert RolloutPolicy.objects.get(name="careful").gates == {"max_error_rate": 0.02}


def test_a_viewer_cannot_save_a_policy(bob):
    assert web(bob).post(f"{POLICIES}add/", editor()).status_code == 403
    assert not RolloutPolicy.objects.exists()


# --- the maintenance window: two times (UTC), both or neither, checked by policy_validate


def test_the_editor_saves_a_maintenance_window_that_crosses_midnight(alice):
    response = web(alice).post(f"{POLICIES}add/", editor(window_start="22:00", window_end="05:00"))
    assert response.status_code == 302, response.content.decode()[:2000]
    assert RolloutPolicy.objects.get(name="careful").maintenance_window == {"start": "22:00", "end": "05:00"}


def test_no_times_is_any_time(alice):
    assert web(alice).post(f"{POLICIES}add/", editor()).status_code == 302
    assert RolloutPolicy.objects.get(name="careful").maintenance_window is None


def errors_of(page: str) -> dict[str, str]:
    """Each field's first error, by the field's name (Django renders id_<name>_error)."""
    return dict(re.findall(r'<ul class="errorlist" id="id_(\w+?)_error"><li>([^<]+)</li>', page))


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"window_start": "22:00"}, "window_end", "Give both times"),
        ({"window_end": "05:00"}, "window_start", "Give both times"),
        ({"window_start": "25:00", "window_end": "05:00"}, "window_start", "Enter a valid time"),
        ({"window_start": "22:00:30", "window_end": "05:00"}, "window_start", "Enter a valid time"),
        ({"window_start": "22:00", "window_end": "22:00"}, "window_end", "maintenance_window.end: A window"),
    ],
)
def test_a_bad_window_is_a_form_error_and_saves_nothing(alice, changes, field, message):
    response = web(alice).post(f"{POLICIES}add/", editor(**changes))
    assert response.status_code == 200  # the form again, not a 500
    assert errors_of(response.content.decode())[field].startswith(message)
    assert not RolloutPolicy.objects.exists()


def test_a_bad_window_on_an_existing_policy_changes_nothing(alice):
    policy = RolloutPolicy.objects.create(
        name="careful", maintenance_window={"start": "01:00", "end": "03:00"}
    )
    response = web(alice).post(
        f"{POLICIES}{policy.pk}/change/",
        editor(window_start="04:00", window_end="04:00", description="changed"),
    )
    assert response.status_code == 200
    policy.refresh_from_db()
    assert (policy.maintenance_window, policy.description) == ({"start": "01:00", "end": "03:00"}, "")
    # Control: a good window on the same page is saved.
    response = web(alice).post(
        f"{POLICIES}{policy.pk}/change/", editor(window_start="04:00", window_end="06:00")
    )
    assert response.status_code == 302
    policy.refresh_from_db()
    assert policy.maintenance_window == {"start": "04:00", "end": "06:00"}


def test_the_window_is_shown_as_times_and_in_words(alice, bob):
    nightly = RolloutPolicy.objects.create(
        name="nightly", maintenance_window={"start": "22:00", "end": "05:00"}
    )
    RolloutPolicy.objects.create(name="anytime")
    page = web(alice).get(f"{POLICIES}{nightly.pk}/change/").content.decode()
    assert re.search(r'name="window_start" value="22:00"', page)
    assert re.search(r'name="window_end" value="05:00"', page)
    listing = web(bob).get(POLICIES).content.decode()
    assert "22:00\N{EN DASH}05:00 UTC" in listing and "any time" in listing
    viewer_page = web(bob).get(f"{POLICIES}{nightly.pk}/change/").content.decode()
    assert "22:00\N{EN DASH}05:00 UTC" in viewer_page
    assert 'name="window_start"' not in viewer_page  # a viewer reads; there is nothing to type


def test_a_viewer_reads_the_policy_in_words_with_the_document_folded(bob):
    policy = RolloutPolicy.objects.create(
        name="shown",
        stages=[{"kind": "percent", "value": 10, "mode": "shadow"}, {"kind": "percent", "value": 100}],
        gates={"max_error_rate": 0.07, "accuracy": {"max_drop_pp": 2.0, "confidence": 0.95}},
    )
    page = web(bob).get(f"{POLICIES}{policy.pk}/change/").content.decode()
    assert "10 % (shadow) → 100 %" in page
    assert "Inference errors at most 7 % of inferences" in page
    assert "Accuracy drop at most 2 pp (percentage points), Confidence 95 %" in page
    assert "any time" in page
    assert not raw_json_shown(page) and '<details class="raw">' in page  # folded, for experts
    assert 'name="stages-0-value"' not in page  # no editor for a viewer
