"""The device page (issue 10, section 1): health sparklines from the hourly rollups (the
series equal the database, rounded, gaps where no telemetry came), events with reason codes
in words and times to the second with their zone, the device's rollout history linking to
each rollout, and a bounded number of queries. Django's test client, real PostgreSQL."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from fleet.devices.choices import DeviceEventType, EventReason
from fleet.devices.models import DeviceEvent
from fleet.devices.selectors import HEALTH_HOURS
from fleet.rollouts import services
from tests.server import admin_world
from tests.server.admin_world import hourly

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]
SECONDS_AND_ZONE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"


def web(persona) -> Client:
    client = Client()
    client.force_login(persona.user)
    return client


def device_url(device) -> str:
    return f"/admin/devices/device/{device.pk}/change/"


@pytest.fixture
def world(digits_model, digits, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        return admin_world.build(digits_model, digits)


@pytest.fixture
def camera(world):
    """cam-00 with telemetry this hour and three hours ago (two models' rows this hour)."""
    device = world["devices"][0]
    this_hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    hourly(
        device,
        this_hour,
        windows=120,
        inferences=1500,
        errors=3,
        latency_p95_weighted_sum=1500 * 2.5,
        latency_p95_weight=1500,
        cpu_pct_sum=120 * 12.5,
        cpu_pct_windows=120,
        rss_mb_sum=120 * 61.25,
        rss_mb_windows=120,
        temp_c_sum=60 * 48.0,
        temp_c_windows=60,
    )
    hourly(
        device,
        this_hour,
        variant="int8",
        windows=120,
        inferences=500,
        errors=1,
        latency_p95_weighted_sum=500 * 0.5,
        latency_p95_weight=500,
        cpu_pct_sum=120 * 13.5,
        cpu_pct_windows=120,
    )
    hourly(device, this_hour - timedelta(hours=3), windows=10, inferences=100, errors=0)
    return device


def embedded(page: str, element_id: str):
    return json.loads(
        re.search(rf'<script id="{element_id}" type="application/json">(.*?)</script>', page).group(1)
    )


def test_the_sparkline_series_equal_the_rollups(camera, bob):
    page = web(bob).get(device_url(camera)).content.decode()
    data = embedded(page, "health-data")
    assert len(data["hours"]) == HEALTH_HOURS
    assert data["hours"][-1] == int(timezone.now().replace(minute=0, second=0, microsecond=0).timestamp())
    series = {line["key"]: line["points"] for line in data["series"]}
    assert list(series) == ["inferences", "latency_p95_ms", "errors", "cpu_pct", "rss_mb", "temp_c"]
    assert series["inferences"][-1] == 2000 and series["inferences"][-4] == 100
    assert series["errors"][-1] == 4
    assert series["latency_p95_ms"][-1] == 2.0  # (1500 * 2.5 + 500 * 0.5) / 2000: weighted by inferences
    assert series["cpu_pct"][-1] == 13.0  # the mean over the windows that reported it
    assert series["rss_mb"][-1] == 61.25 and series["temp_c"][-1] == 48.0
    assert series["latency_p95_ms"][-4] is None and series["cpu_pct"][-4] is None  # not reported
    assert series["inferences"][-2] is None  # no telemetry that hour: a gap, not a zero
    assert all(value is None for value in series["inferences"][:-4])


def test_each_sparkline_has_its_figures_in_words_with_units(camera, bob):
    page = web(bob).get(device_url(camera)).content.decode()
    latest = dict(re.findall(r'data-latest="([a-z_0-9]+)">([^<]+)<', page))
    assert latest == {
        "inferences": "2,000 per hour",
        "latency_p95_ms": "2.0 ms",
        "errors": "4 per hour",
        "cpu_pct": "13.0 %",
        "rss_mb": "61.2 MB",  # 61.25 rounded half to even
        "temp_c": "48.0 °C",
    }
    assert "100 per hour to 2,000 per hour over 24 h" in page


def test_a_device_without_telemetry_says_so(world, bob):
    page = web(bob).get(device_url(world["devices"][5])).content.decode()
    assert set(re.findall(r'data-latest="[a-z_0-9]+">([^<]+)<', page)) == {"no telemetry"}
    assert all(value is None for line in embedded(page, "health-data")["series"] for value in line["points"])


def test_events_show_reason_codes_in_words_and_times_to_the_second(camera, bob):
    now = timezone.now()
    DeviceEvent.objects.create(
        device=camera,
        message_id="e1",
        type="failed",
        generation=7,
        model="digits",
        version="2.0.0",
        variant="float32",
        reason="golden_failed",
        message="accuracy 0.61 < 0.90",
        ts=now - timedelta(seconds=5),
        received_at=now,
    )
    DeviceEvent.objects.create(
        device=camera,
        message_id="e2",
        type="active",
        generation=6,
        ts=now,
        received_at=now - timedelta(minutes=1),
    )
    page = web(bob).get(device_url(camera)).content.decode()
    rows = re.findall(r'<tr data-event="\d+">(.*?)</tr>', page, re.S)
    assert len(rows) == 2
    assert f"{EventReason.GOLDEN_FAILED.label} (golden_failed)" in rows[0]  # newest first
    assert "digits 2.0.0 [float32]" in rows[0] and "accuracy 0.61 &lt; 0.90" in rows[0]
    assert len(re.findall(SECONDS_AND_ZONE, rows[0])) == 2  # received and the device's own time
    assert DeviceEventType.ACTIVE.label in rows[1] and "Failed" in rows[0]  # event types in words
    assert f'href="/admin/devices/deviceevent/?q={camera.device_id}"' in page


def test_the_event_list_filters_by_reason_in_words_and_by_no_reason(camera, bob):
    now = timezone.now()
    for message_id, kind, reason in (("r1", "failed", "golden_failed"), ("r2", "active", "")):
        DeviceEvent.objects.create(
            device=camera, message_id=message_id, type=kind, reason=reason, ts=now, received_at=now
        )
    events = "/admin/devices/deviceevent/"
    page = web(bob).get(events).content.decode()
    assert "Failed its golden-set check (golden_failed)" in page and ">no reason code<" in page
    for query, expected in (("?reason=golden_failed", {"r1"}), ("?reason=none", {"r2"}), ("", {"r1", "r2"})):
        shown = web(bob).get(events + query).context["cl"].result_list
        assert {event.message_id for event in shown} == expected, query


def test_the_rollout_history_lists_each_assignment_and_links_to_its_rollout(world, alice, bob):
    rollout = admin_world.start(world, alice.user)
    assignment = rollout.assignments.exclude(stage=None).select_related("device").first()
    services.rollout_rollback(rollout=rollout, by=alice.user, reason="bad canary")
    page = web(bob).get(device_url(assignment.device)).content.decode()
    row = re.search(rf'<tr data-rollout="{rollout.pk}">(.*?)</tr>', page, re.S).group(1)
    assert f'href="/admin/rollouts/rollout/{rollout.pk}/change/"' in row
    assert "1.0.0 [float32] → 2.0.0 [float32]" in row
    assert "<td>1</td>" in row  # stage 1, counted from one
    assert "Rolled back" in row and re.search(SECONDS_AND_ZONE, row)
    untouched = web(bob).get(device_url(world["devices"][9])).content.decode()
    assert f'<tr data-rollout="{rollout.pk}">' in untouched  # a later stage's device: pending
    assert "Pending (later stage)" in untouched or "Rolled back" in untouched


def test_the_device_page_costs_a_bounded_number_of_queries(
    camera, world, alice, bob, django_assert_max_num_queries
):
    admin_world.start(world, alice.user)
    for n in range(30):
        DeviceEvent.objects.create(
            device=camera, message_id=f"m{n}", type="active", ts=timezone.now(), received_at=timezone.now()
        )
    client = web(bob)
    client.get(device_url(camera))  # warm caches (content types, sessions)
    with django_assert_max_num_queries(14):
        page = client.get(device_url(camera)).content.decode()
    assert len(re.findall(r'<tr data-event="\d+">', page)) == 20  # the latest 20, then a link


def test_device_lists_show_times_to_the_second_with_their_zone(camera, ada):
    from fleet.devices import services as device_services
    from fleet.devices.models import Device, IngestRefusal

    now = timezone.now()
    Device.objects.filter(pk=camera.pk).update(last_seen_at=now - timedelta(days=2))
    DeviceEvent.objects.create(device=camera, message_id="e", type="active", ts=now, received_at=now)
    IngestRefusal.objects.create(device=camera, reason="clock", count=2, first_at=now, last_at=now)
    device_services.enrollment_token_create(name="factory", created_by=ada.user)
    for url in (
        "/admin/devices/device/",
        "/admin/devices/deviceevent/",
        "/admin/devices/ingestrefusal/",
        "/admin/devices/enrollmenttoken/",
    ):
        html = web(ada).get(url).content.decode()
        assert re.search(rf">{SECONDS_AND_ZONE}<", html), url
        assert " p.m." not in html and " a.m." not in html, url
        if url == "/admin/devices/deviceevent/":
            assert DeviceEventType.ACTIVE.label in html  # the event type in words


def test_a_viewer_reads_the_tags_in_words_and_an_operator_edits_them(world, alice, bob):
    device = world["devices"][0]
    assert '["fleet"]' not in web(bob).get(device_url(device)).content.decode()
    assert re.search(
        r'field-tags_text">.*?<div class="readonly">fleet</div>',
        web(bob).get(device_url(device)).content.decode(),
        re.S,
    )
    html = web(alice).get(device_url(device)).content.decode()
    assert 'name="tags" value="fleet"' in html  # control: the operator's form field
