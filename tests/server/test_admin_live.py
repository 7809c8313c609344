"""Live refresh of the control-room pages (issue 10, section 2: "Pages refresh live …
without a full reload"): every page's live view answers viewers and up, sends anonymous
people to the login page, returns parts equal to what the page itself renders (the same
templates), never a form, follows the database, and costs a bounded number of queries.
The rollout page's live view is also tested in test_admin_rollout_page.py. Django's test
client, real PostgreSQL."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from fleet.devices.models import Device, DeviceEvent, TelemetryHourly
from fleet.rollouts import services
from tests.server import admin_world

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]
FORM_CONTROLS = re.compile(r"<(form|input|select|textarea|button)\b")


def web(persona) -> Client:
    client = Client()
    client.force_login(persona.user)
    return client


@pytest.fixture
def world(digits_model, digits, alice, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        world = admin_world.build(digits_model, digits)
        world["rollout"] = admin_world.start(world, alice.user)
    camera = world["devices"][0]
    this_hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    admin_world.hourly(camera, this_hour, windows=10, inferences=100, errors=1)
    return world


def pages(world) -> dict[str, tuple[str, str]]:
    """Each live page: (its URL, its live URL)."""
    camera, v2, rollout = world["devices"][0], world["v2"], world["rollout"]
    return {
        "dashboard": ("/admin/", "/admin/dashboard/live/"),
        "rollout": (
            f"/admin/rollouts/rollout/{rollout.pk}/change/",
            f"/admin/rollouts/rollout/{rollout.pk}/live/",
        ),
        "device": (f"/admin/devices/device/{camera.pk}/change/", f"/admin/devices/device/{camera.pk}/live/"),
        "model": (
            f"/admin/registry/mlmodel/{v2.model_id}/change/",
            f"/admin/registry/mlmodel/{v2.model_id}/live/",
        ),
        "version": (
            f"/admin/registry/modelversion/{v2.pk}/change/",
            f"/admin/registry/modelversion/{v2.pk}/live/",
        ),
    }


EXPECTED_PARTS = {
    "dashboard": {"devices", "ingest", "failures", "rollouts", "versions"},
    "device": {
        "events",
        "history",
        *(
            f"health-{key}"
            for key in ("inferences", "latency_p95_ms", "errors", "cpu_pct", "rss_mb", "temp_c")
        ),
    },
    "model": {"versions"},
    "version": {"prompt", "section"},
    "rollout": {"status", "progress", "verdicts", "devices", "timeline"},
}


@pytest.mark.parametrize("name", list(EXPECTED_PARTS))
def test_each_live_view_returns_the_parts_the_page_renders(world, bob, name):
    url, live = pages(world)[name]
    client = web(bob)  # a viewer
    page = client.get(url).content.decode()
    assert FORM_CONTROLS.search(page)  # control: the check sees the page's own forms
    answer = client.get(live).json()
    assert set(answer["parts"]) == EXPECTED_PARTS[name]
    for part, html in answer["parts"].items():
        # The page holds the very same HTML inside the element marked with the part's name.
        assert f'data-live-part="{part}">{html}</' in page, part
        assert not FORM_CONTROLS.search(html), f"{part} holds a form control a refresh would wipe"
    for field, html in answer["fields"].items():
        assert f'<div class="readonly">{html}</div>' in page, field
    assert re.fullmatch(r"\d\d:\d\d:\d\d UTC", answer["updated"])
    assert f'data-live-url="{live}"' in page and 'aria-live="polite"' in page
    assert "/static/fleet/live.js" in page


@pytest.mark.parametrize("name", list(EXPECTED_PARTS))
def test_a_live_view_sends_anonymous_people_to_log_in_and_refuses_outsiders(world, charlie, name):
    live = pages(world)[name][1]
    response = Client().get(live)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert web(charlie).get(live).status_code in (302, 403)  # an account without a role


def test_the_dashboards_live_view_follows_the_database(world, bob):
    client = web(bob)
    before = client.get("/admin/dashboard/live/").json()
    assert "<strong>0</strong>online" in before["parts"]["devices"]
    assert before["charts"]["labels"] == ["digits 1.0.0"]
    Device.objects.filter(pk__in=[d.pk for d in world["devices"][:3]]).update(
        online=True, reported_models={"digits": {"version": "2.0.0", "variant": "float32"}}
    )
    after = client.get("/admin/dashboard/live/").json()
    assert "<strong>3</strong>online" in after["parts"]["devices"]
    assert after["charts"]["labels"] == ["digits 1.0.0", "digits 2.0.0"]
    assert after["charts"]["series"][0]["counts"] == [7, 3]


def test_the_device_live_view_follows_the_database_and_leaves_the_form_alone(world, alice):
    camera = world["devices"][0]
    live = f"/admin/devices/device/{camera.pk}/live/"
    client = web(alice)  # an operator: the page has a form (name, tags)
    assert 'name="tags"' in client.get(f"/admin/devices/device/{camera.pk}/change/").content.decode()
    before = client.get(live).json()
    assert "offline" in before["fields"]["online_dot"]
    assert not {"tags", "display_name", "tags_text"} & set(before["fields"])
    Device.objects.filter(pk=camera.pk).update(online=True, last_seen_at=timezone.now())
    now = timezone.now()
    DeviceEvent.objects.create(
        device=camera, message_id="live-1", type="failed", reason="golden_failed", ts=now, received_at=now
    )
    TelemetryHourly.objects.filter(device=camera).update(inferences=250)
    after = client.get(live).json()
    assert "online" in after["fields"]["online_dot"] and "offline" not in after["fields"]["online_dot"]
    assert "s ago" in after["fields"]["last_seen"]
    assert "golden_failed" in after["parts"]["events"]
    assert ">250 per hour<" in after["parts"]["health-inferences"]
    inferences = next(line for line in after["charts"]["series"] if line["key"] == "inferences")
    assert inferences["points"][-1] == 250


def test_the_version_live_view_shows_the_prompt_once_the_canary_is_rolled_back(world, alice, bob):
    v2 = world["v2"]
    from fleet.registry import services as registry

    registry.version_set_status(version=v2, status="released")
    live = f"/admin/registry/modelversion/{v2.pk}/live/"
    assert "Its canary failed" not in web(bob).get(live).json()["parts"]["prompt"]
    services.rollout_rollback(rollout=world["rollout"], by=alice.user, reason="bad canary")
    answer = web(bob).get(live).json()
    assert "Its canary failed" in answer["parts"]["prompt"] and "bad canary" in answer["parts"]["prompt"]
    assert "Rolled back" in answer["parts"]["section"]
    assert "Released" in answer["fields"]["status_badge"]


def live_query_counts(client: Client, world) -> dict[str, int]:
    counts = {}
    for name, (_, live) in pages(world).items():
        client.get(live)  # warm caches (content types, sessions)
        with CaptureQueriesContext(connection) as queries:
            assert client.get(live).status_code == 200, name
        counts[name] = len(queries)
    return counts


def test_the_live_views_cost_the_same_bounded_queries_however_much_history(world, alice, bob):
    client = web(bob)
    small = live_query_counts(client, world)
    # More of everything the pages list: a second rollout, events, hours of telemetry, devices.
    camera = world["devices"][0]
    services.rollout_rollback(rollout=world["rollout"], by=alice.user, reason="again")
    admin_world.start(world, alice.user)
    now = timezone.now()
    DeviceEvent.objects.bulk_create(
        DeviceEvent(
            device=camera, message_id=f"m{n}", type="failed", reason=f"r{n % 5}", ts=now, received_at=now
        )
        for n in range(30)
    )
    TelemetryHourly.objects.bulk_create(
        TelemetryHourly(device=camera, hour=hour, model="digits", version="1.0.0", windows=1, inferences=5)
        for hour in (
            now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=n) for n in range(1, 20)
        )
    )
    Device.objects.bulk_create(
        Device(device_id=f"more-{n}", status="active", reported_models={"digits": {"version": "2.0.0"}})
        for n in range(50)
    )
    big = live_query_counts(client, world)
    assert big == small
    # The session, the user and their groups, then a few per figure or section.
    budgets = {"dashboard": 10, "device": 10, "model": 12, "version": 11, "rollout": 18}
    assert {name: n for name, n in big.items() if n > budgets[name]} == {}, big
