"""Admin forms that used to take JSON (issue 10, section 2): device groups as a kind and one
field per rule, tags and device ids as comma-separated words. Each saves through the API's
service and validation; bad input is a form error that changes nothing. Django's test
client, real PostgreSQL."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from fleet.devices import selectors
from fleet.devices.admin import DeviceGroupForm
from fleet.devices.choices import DeviceStatus, GroupKind
from fleet.devices.models import Device, DeviceGroup, EnrollmentToken
from tests.server.test_admin_no_raw_json import raw_json_shown
from tests.server.test_admin_policy_editor import web

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]
GROUPS = "/admin/devices/devicegroup/"
TOKENS = "/admin/devices/enrollmenttoken/"


@pytest.fixture
def cameras(db):
    """Five devices: cam-1 and cam-2 are online rpi4s tagged fleet and cam; the rest differ
    in one way each."""
    rows = [
        ("cam-1", ["fleet", "cam"], "rpi4", True, DeviceStatus.ACTIVE),
        ("cam-2", ["cam", "fleet", "roof"], "rpi4", True, DeviceStatus.ACTIVE),
        ("cam-3", ["fleet"], "rpi4", True, DeviceStatus.ACTIVE),  # no cam tag
        ("cam-4", ["fleet", "cam"], "jetson", True, DeviceStatus.ACTIVE),  # other hardware
        ("cam-5", ["fleet", "cam"], "rpi4", False, DeviceStatus.PENDING),  # offline, pending
    ]
    return [
        Device.objects.create(device_id=device_id, tags=tags, hardware=hardware, online=online, status=status)
        for device_id, tags, hardware, online, status in rows
    ]


def group_form(**changes) -> dict:
    """A dynamic group as a browser posts it: tags fleet and cam, hardware rpi4, online."""
    form = {
        "name": "outdoor",
        "description": "",
        "kind": "dynamic",
        "rule_tags": "fleet, cam",
        "rule_hardware": "rpi4",
        "rule_status": "",
        "rule_online": "yes",
        "rule_runtime": "",
        "rule_agent_version": "",
        "rule_supports_int8": "",
    }
    return {**form, **changes}


def first_error(page: str) -> str:
    return re.search(r'<ul class="errorlist[^"]*"[^>]*><li>([^<]+)</li>', page).group(1)


# --- device groups


def test_the_form_has_a_field_for_every_rule_the_selector_knows():
    assert {name for name in DeviceGroupForm.base_fields if name.startswith("rule_")} == {
        f"rule_{key}" for key in selectors.RULES
    }


def test_a_dynamic_group_is_saved_from_fields_through_the_service(alice, cameras):
    response = web(alice).post(f"{GROUPS}add/", group_form())
    assert response.status_code == 302, response.content.decode()[:2000]
    group = DeviceGroup.objects.get(name="outdoor")
    assert (group.kind, group.rules) == (
        GroupKind.DYNAMIC,
        {"tags": ["fleet", "cam"], "hardware": "rpi4", "online": True},
    )
    assert sorted(d.device_id for d in selectors.group_devices(group=group)) == ["cam-1", "cam-2"]


def test_yes_and_no_are_booleans_and_a_blank_rule_is_no_rule(alice, cameras):
    form = group_form(rule_tags="", rule_hardware="", rule_online="no", rule_status="pending")
    assert web(alice).post(f"{GROUPS}add/", form).status_code == 302
    group = DeviceGroup.objects.get(name="outdoor")
    assert group.rules == {"status": "pending", "online": False}
    assert [d.device_id for d in selectors.group_devices(group=group)] == ["cam-5"]


def test_text_rules_are_taken_as_typed(alice, cameras):
    assert web(alice).post(f"{GROUPS}add/", group_form(rule_hardware="no", rule_online="")).status_code == 302
    assert DeviceGroup.objects.get(name="outdoor").rules == {"tags": ["fleet", "cam"], "hardware": "no"}


def test_a_static_group_keeps_its_chosen_devices_and_no_rules(alice, cameras):
    # Devices by id, as words; the rule fields are ignored.
    form = group_form(kind="static", members=f"{cameras[2].device_id}, {cameras[3].device_id}")
    assert web(alice).post(f"{GROUPS}add/", form).status_code == 302
    group = DeviceGroup.objects.get(name="outdoor")
    assert group.rules == {}
    assert sorted(d.device_id for d in selectors.group_devices(group=group)) == ["cam-3", "cam-4"]


def test_a_static_group_naming_an_unknown_device_is_a_form_error_and_saves_nothing(alice, cameras):
    form = group_form(kind="static", members=f"{cameras[2].device_id}, cam-nowhere")
    response = web(alice).post(f"{GROUPS}add/", form)
    assert response.status_code == 200 and "No such device: cam-nowhere." in response.content.decode()
    assert not DeviceGroup.objects.filter(name="outdoor").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rule_status": "asleep"}, "Select a valid choice"),
        ({"rule_online": "maybe"}, "Select a valid choice"),
        ({"rule_tags": "fleet, " + "x" * 65}, "At most 64 characters a word"),
        ({"rule_hardware": "rpi\x004"}, "Null characters are not allowed"),
        ({"name": "not a slug"}, "Enter a valid"),
    ],
    ids=["status", "online", "long-tag", "nul", "name"],
)
def test_bad_input_is_a_form_error_and_saves_nothing(alice, cameras, changes, message):
    response = web(alice).post(f"{GROUPS}add/", group_form(**changes))
    assert response.status_code == 200  # the form again, not a 500
    assert first_error(response.content.decode()).startswith(message)
    assert not DeviceGroup.objects.exists()


def test_a_rule_the_apis_validator_refuses_is_a_form_error(cameras):
    """No field can produce such a rule today; if one ever does, validate_group_rules (the
    API's check) answers on the form rather than in a 500."""
    form = DeviceGroupForm(data=group_form())
    form.rules = lambda: {"online": "no"}
    assert not form.is_valid()
    assert form.errors["__all__"] == ["rules.online must be true or false."]
    assert DeviceGroupForm(data=group_form()).is_valid()  # control: the fields' own rules pass


def test_changing_a_group_shows_its_rules_in_fields_and_saves_through_the_service(alice, cameras):
    group = DeviceGroup.objects.create(
        name="outdoor", kind=GroupKind.DYNAMIC, rules={"tags": ["fleet", "cam"], "online": True}
    )
    page = web(alice).get(f"{GROUPS}{group.pk}/change/").content.decode()
    assert 'name="rule_tags" value="fleet, cam"' in page
    assert re.search(r'<option value="yes" selected>yes</option>', page)
    assert not raw_json_shown(page)
    response = web(alice).post(f"{GROUPS}{group.pk}/change/", group_form(rule_tags="fleet", rule_online=""))
    assert response.status_code == 302
    group.refresh_from_db()
    assert group.rules == {"tags": ["fleet"], "hardware": "rpi4"}
    refused = web(alice).post(f"{GROUPS}{group.pk}/change/", group_form(rule_status="asleep"))
    assert refused.status_code == 200
    group.refresh_from_db()
    assert group.rules == {"tags": ["fleet"], "hardware": "rpi4"}  # unchanged


def test_the_rule_reads_as_a_sentence_and_links_to_its_devices(alice, bob, cameras):
    assert web(alice).post(f"{GROUPS}add/", group_form()).status_code == 302
    DeviceGroup.objects.create(name="lab", kind=GroupKind.STATIC).members.set(cameras[:3])
    DeviceGroup.objects.create(name="everything", kind=GroupKind.DYNAMIC)
    listing = web(bob).get(GROUPS).content.decode()
    assert "tags fleet and cam, hardware rpi4, online" in listing
    assert "the chosen devices" in listing and "every device" in listing
    link = re.search(r'<a href="([^"]+\?group=outdoor)">2 devices</a>', listing).group(1)
    shown = web(bob).get(link.replace("&amp;", "&"))
    assert shown.context["cl"].result_count == 2
    lab = re.search(r'<a href="([^"]+\?group=lab)">3 devices</a>', listing).group(1)
    assert web(bob).get(lab).context["cl"].result_count == 3  # control: a static group's members
    viewer_page = (
        web(bob).get(f"{GROUPS}{DeviceGroup.objects.get(name='outdoor').pk}/change/").content.decode()
    )
    assert "tags fleet and cam, hardware rpi4, online" in viewer_page
    assert not raw_json_shown(viewer_page)


@pytest.mark.parametrize(
    ("rules", "sentence"),
    [
        ({"tags": ["fleet"]}, "tag fleet"),
        ({"online": False, "tags": ["a", "b", "c"]}, "tags a, b and c, offline"),
        ({"status": "pending", "supports_int8": True}, "pending approval, runs int8"),
        (
            {"supports_int8": False, "runtime": "litert", "agent_version": "1.2.0"},
            "runtime litert, agent 1.2.0, no int8",
        ),
        ({}, "every device"),
    ],
)
def test_rule_sentences(rules, sentence):
    assert selectors.group_rules_sentence(rules) == sentence


# --- tags as words: enrollment tokens, devices, rollout targets


def token_form(**changes) -> dict:
    expires = timezone.now() + timedelta(days=3)
    form = {
        "name": "factory",
        "expires_at_0": expires.strftime("%Y-%m-%d"),
        "expires_at_1": "12:00:00",
        "max_uses": "10",
        "tags": "fleet, cam, fleet",
    }
    return {**form, **changes}


def test_a_token_takes_its_tags_as_words_and_is_made_by_the_service(ada):
    response = web(ada).post(f"{TOKENS}add/", token_form())
    assert response.status_code == 302, response.content.decode()[:2000]
    token = EnrollmentToken.objects.get()
    assert token.tags == ["fleet", "cam"]
    assert token.key_sha256 and token.prefix.startswith("me_")  # made by enrollment_token_create
    page = web(ada).get(f"{TOKENS}{token.pk}/change/").content.decode()
    assert 'name="tags" value="fleet, cam"' in page and not raw_json_shown(page)


def test_a_bad_tag_is_a_form_error_and_makes_no_token(ada):
    response = web(ada).post(f"{TOKENS}add/", token_form(tags="fleet, " + "x" * 65))
    assert response.status_code == 200
    assert first_error(response.content.decode()).startswith("At most 64 characters a word")
    assert not EnrollmentToken.objects.exists()


def test_a_viewer_reads_a_tokens_tags_in_words(ada, bob):
    web(ada).post(f"{TOKENS}add/", token_form())
    response = web(bob).get(f"{TOKENS}{EnrollmentToken.objects.get().pk}/change/")
    assert response.status_code == 200  # was a 500: the form had no fields for a viewer
    page = response.content.decode()
    assert "fleet, cam" in page and not raw_json_shown(page) and 'name="tags"' not in page


def test_a_device_is_preauthorized_with_tags_as_words(alice):
    response = web(alice).post(
        "/admin/devices/device/add/", {"device_id": "cam-9", "display_name": "", "tags": "roof, cam"}
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    assert Device.objects.get(device_id="cam-9").tags == ["roof", "cam"]
    page = web(alice).get("/admin/devices/device/add/").content.decode()
    assert not raw_json_shown(page)  # was a JSON box holding []
