"""The policy editor (issue 10, section 1): stages and gates as fields with units, checked by
the API's own policy_validate, and a diagram of the stages. Django's test client, real
PostgreSQL."""

from __future__ import annotations

import json
import re

import pytest
from django.test import Client

from fleet.rollouts.models import RolloutPolicy

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
        "maintenance_window": "null",
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
