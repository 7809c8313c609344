"""The rollout page (issue 10, section 1): devices per stage by state, gate charts, one
timeline, a per-device table filtered by state, a live view of the same parts, and a query
count that does not grow with the fleet or the rollout's history. Every number shown equals
the database, rounded, with its unit. Django's test client, real PostgreSQL."""

from __future__ import annotations

import html
import json
import re
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import Count
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from fleet.devices import selectors as device_selectors
from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device, DeviceEvent, TelemetryHourly
from fleet.registry import services as registry
from fleet.rollouts import services
from fleet.rollouts.choices import AssignmentState, Decision, Metric, Verdict
from fleet.rollouts.models import Assignment, GateEvaluation, Rollout, RolloutHour
from tests.server import admin_world
from tests.server.conftest import ready_artifact

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]
ROLLOUTS = "/admin/rollouts/rollout/"
MOMENT = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"


def web(persona) -> Client:
    client = Client()
    client.force_login(persona.user)
    return client


def page_of(rollout) -> str:
    return f"/admin/rollouts/rollout/{rollout.pk}/change/"


@pytest.fixture
def rollout(digits_model, digits, alice, django_capture_on_commit_callbacks):
    """The admin world's rollout at stage 1 with admin_world.evidence: one device failed, one
    active, one notified; three accuracy evaluations, one error-rate evaluation, rollups."""
    with django_capture_on_commit_callbacks(execute=True):
        world = admin_world.build(digits_model, digits)
        rollout = admin_world.start(world, alice.user)
    admin_world.evidence(rollout)
    rollout.refresh_from_db()
    return rollout


def chart_data(page: str) -> dict:
    found = re.search(r'<script id="rollout-chart-data" type="application/json">(.*?)</script>', page)
    return json.loads(found.group(1))


def visible(page: str) -> str:
    """The page's text as people read it: no scripts, styles or tags."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", text))


def test_the_stage_bars_show_each_stages_devices_by_state_as_in_the_database(rollout, bob):
    page = web(bob).get(page_of(rollout)).content.decode()
    stage_one = re.search(r'<tr class="current" data-stage="1">(.*?)</tr>', page, re.S).group(1)
    shown = {
        state: int(n)
        for state, n in re.findall(r'data-state="([a-z_]+)">.*?<strong>(\d+)</strong>', stage_one, re.S)
    }
    expected = {
        state: rollout.assignments.filter(stage=0, state=state).count()
        for state in AssignmentState.values
        if rollout.assignments.filter(stage=0, state=state).exists()
    }
    assert shown == expected
    assert expected == {"failed": 1, "active": 1, "notified": 1}  # control: three states to show
    assert "Failed: " in visible(stage_one) and "Active: " in visible(stage_one)  # labels, not codes
    pending = rollout.assignments.filter(stage=None).count()
    assert re.search(rf"Pending \(later stage\): <strong>{pending}</strong>", page)


def test_the_chart_data_are_the_stored_evaluations_rounded(rollout, bob):
    data = chart_data(web(bob).get(page_of(rollout)).content.decode())
    (accuracy,) = data["accuracy"]
    assert accuracy["variant"] == "float32"
    assert [(p["candidate_pct"], p["incumbent_pct"]) for p in accuracy["points"]] == [
        (91.2, 97.5),
        (80.0, 97.4),
        (72.0, 97.5),
    ]
    last = accuracy["points"][-1]
    assert (last["drop_pp"], last["lower_pp"], last["upper_pp"], last["allowed_pp"]) == (
        25.5,
        18.2,
        32.9,
        2.0,
    )
    assert [p["candidate_labels"] for p in accuracy["points"]] == [100, 200, 300]
    assert data["error_rate"] == [
        {
            "t": data["error_rate"][0]["t"],
            "rate_pct": 0.12,
            "lower_pct": 0.04,
            "upper_pct": 0.46,
            "ceiling_pct": 1.0,
            "inferences": 5000,
        }
    ]
    telemetry = {series["version"]: series["points"] for series in data["telemetry"]}
    (candidate,) = telemetry["2.0.0"]
    # Inference-weighted p95 over both devices: (1.2345 * 300 + 2.0 * 100) / 400 ms; 4 errors in 400.
    assert (candidate["p95_ms"], candidate["error_pct"], candidate["inferences"]) == (1.4, 1.0, 400)
    assert telemetry["1.0.0"][0]["p95_ms"] == 0.9


def test_a_shadow_stage_gets_the_agreement_chart_with_the_stored_evaluations(rollout, bob):
    client = web(bob)
    page = client.get(page_of(rollout)).content.decode()
    assert 'id="chart-agreement"' not in page  # control: no shadow stage, no such chart
    assert chart_data(page)["agreement"] == []
    snapshot = rollout.policy_snapshot
    snapshot["stages"][0] = {**snapshot["stages"][0], "mode": "shadow"}
    Rollout.objects.filter(pk=rollout.pk).update(policy_snapshot=snapshot)
    at = rollout.started_at + timedelta(seconds=50)
    GateEvaluation.objects.create(
        rollout=rollout,
        stage=0,
        metric=Metric.SHADOW_AGREEMENT,
        variant="float32",
        verdict=Verdict.WAIT,
        candidate_value=0.934567,
        candidate_n=412,
        lower=0.88123,
        upper=0.97777,
        threshold=0.9,
        summary="shadow agreement: waiting",
        decision=Decision.WAIT,
        evaluated_at=at,
    )
    page = client.get(page_of(rollout)).content.decode()
    assert 'id="chart-agreement"' in page
    assert chart_data(page)["agreement"] == [
        {
            "t": int(at.timestamp()),
            "agreement_pct": 93.5,
            "lower_pct": 88.1,
            "upper_pct": 97.8,
            "required_pct": 90.0,
            "compared": 412,
        }
    ]


def test_numbers_on_the_page_are_rounded_and_carry_units(rollout, bob):
    page = web(bob).get(page_of(rollout)).content.decode()
    text = visible(page)
    assert not re.findall(r"\d\.\d{3,}", text), "unrounded numbers"
    assert not re.findall(r"\d\.\d{3,}", json.dumps(chart_data(page))), "unrounded numbers in the charts"
    for caption in (
        "Accuracy: candidate vs incumbent (%)",
        "Accuracy drop (pp)",
        "(ms)",
        "Error rate per version (%)",
    ):
        assert caption in text
    assert "GateEvaluation object" not in text and "{&quot;" not in page.split("<details>")[0]


def test_one_timeline_merges_actions_decisions_and_events_with_seconds_and_zone(rollout, bob):
    page = web(bob).get(page_of(rollout)).content.decode()
    table = re.search(r'<table id="rollout-timeline-table".*?</table>', page, re.S).group(0)
    kinds = re.findall(r'<tr data-kind="([a-z]+)"', table)
    assert set(kinds) == {"audit", "decision", "event"}
    assert kinds.count("decision") == 1  # the evaluation that acted (two gates), not the waits
    times = re.findall(r'<td class="nowrap">([^<]+)</td>', table)
    assert len(times) == len(kinds) and all(re.fullmatch(MOMENT, t) for t in times)
    assert times == sorted(times, reverse=True)  # newest first
    text = visible(table)
    assert "start: Draft → Running" in text and "canary for 2.0.0" in text
    assert "golden_failed" in text and "Roll back (stage 1)" in text
    assert "accuracy (float32): look 3" in text  # the failing gate's sentence, not the passing one


def test_the_device_table_lists_every_device_and_filters_to_the_failed_ones(rollout, bob):
    client = web(bob)
    every = client.get(page_of(rollout)).content.decode()
    rows = re.findall(r'<tr data-device="([^"]+)" data-state="([a-z_]+)">', every)
    assert len(rows) == Assignment.objects.filter(rollout=rollout).count() == 10
    failed = client.get(page_of(rollout) + "?state=failed").content.decode()
    rows = re.findall(r'<tr data-device="([^"]+)" data-state="([a-z_]+)">', failed)
    expected = list(
        rollout.assignments.filter(state=AssignmentState.FAILED).values_list("device__device_id", flat=True)
    )
    assert rows == [(device, "failed") for device in expected] and len(expected) == 1
    row = re.search(rf'<tr data-device="{expected[0]}".*?</tr>', failed, re.S).group(0)
    cells = [visible(cell).strip() for cell in re.findall(r"<td>(.*?)</td>", row, re.S)]
    assert "1.0.0 → 2.0.0" in cells and "float32" in cells and "Failed" in cells and "golden_failed" in cells
    assert re.search(rf"failed golden_failed, {MOMENT}", visible(row))
    assert 'href="?state=failed#rollout-devices"' in every  # the "failed only" link
    assert 'data-filter="failed"' not in failed  # no link to where you are


def test_the_live_view_returns_the_pages_parts_and_charts(rollout, alice, bob, charlie):
    url = f"/admin/rollouts/rollout/{rollout.pk}/live/"
    answer = web(bob).get(url + "?state=failed").json()
    assert set(answer["parts"]) == {"status", "progress", "verdicts", "devices", "timeline"}
    assert answer["charts"] == chart_data(web(bob).get(page_of(rollout)).content.decode())
    assert answer["parts"]["devices"].count("<tr data-device=") == 1  # the filter applies
    assert 'id="rollout-headline"' in answer["parts"]["status"]
    assert "Roll back" not in answer["parts"]["status"]  # a viewer: no buttons
    services.rollout_pause(rollout=rollout, by=alice.user, reason="operator checks the failure")
    status = web(bob).get(url).json()["parts"]["status"]
    assert "Paused by alice at " in status and "operator checks the failure" in status
    assert web(charlie).get(url).status_code in (302, 403)
    response = Client().get(url)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_the_page_costs_the_same_queries_however_big_the_rollout(rollout, bob, django_assert_max_num_queries):
    client = web(bob)
    client.get(page_of(rollout))  # warm caches (content types, sessions)
    with CaptureQueriesContext(connection) as small:
        assert client.get(page_of(rollout)).status_code == 200
    # More history: a hundred evaluations, events for every device, more devices.
    now = timezone.now()
    GateEvaluation.objects.bulk_create(
        GateEvaluation(
            rollout=rollout,
            stage=0,
            metric=Metric.ACCURACY,
            variant="float32",
            verdict=Verdict.WAIT,
            candidate_value=0.9,
            incumbent_value=0.95,
            decision=Decision.WAIT,
            evaluated_at=now - timedelta(seconds=n),
        )
        for n in range(100)
    )
    DeviceEvent.objects.bulk_create(
        DeviceEvent(
            device_id=a.device_id,
            message_id=f"m{a.pk}-{n}",
            type="downloading",
            model="digits",
            ts=now,
            received_at=now,
        )
        for a in rollout.assignments.all()
        for n in range(5)
    )
    with CaptureQueriesContext(connection) as big:
        assert client.get(page_of(rollout)).status_code == 200
    assert len(big) == len(small), [q["sql"] for q in big.captured_queries]
    # One more query once settled hours are summed (RolloutHour): the bounds allow it.
    with django_assert_max_num_queries(20):
        client.get(page_of(rollout) + "?state=failed")
    with django_assert_max_num_queries(18):
        client.get(f"/admin/rollouts/rollout/{rollout.pk}/live/")


# --- "Add rollout": the preview, by the code that places devices


@pytest.fixture
def mixed(digits_model, digits, django_capture_on_commit_callbacks):
    """The admin world where 2.0.0 also has an int8 artifact and three devices do not
    declare int8 (they get float32); 3.0.0 has only an int8 artifact (those three are skipped)."""
    with django_capture_on_commit_callbacks(execute=True):
        world = admin_world.build(digits_model, digits)
    models = digits.build_digits_models(version="2.0.0")
    ready_artifact(world["v2"], "int8", models["int8"])
    world["v3"] = registry.version_create(model=digits_model, version="3.0.0")
    ready_artifact(world["v3"], "int8", digits.build_digits_models(version="3.0.0")["int8"])
    Device.objects.filter(device_id__in=["cam-01", "cam-04", "cam-07"]).update(supports_int8=False)
    return world


def add_form(world, version: str = "v2", **changes) -> dict:
    form = {"version": world[version].pk, "policy": world["policy"].pk, "tags": "fleet", "priority": 0}
    return {**form, **changes}


def preview_numbers(page: str) -> dict:
    table = re.search(r'<table id="preview-stages".*?</table>', page, re.S).group(0)
    stages = {
        int(number): (
            int(added),
            dict((v, int(n)) for n, v in re.findall(r'data-variant="[^"]+">(\d+) (\w+)<', row)),
        )
        for number, added, row in re.findall(
            r'<tr data-stage="(\d+)">.*?data-added="(\d+)">(.*?)</tr>', table, re.S
        )
    }
    skipped = sum(int(n) for n in re.findall(r'data-skipped="(\d+)"', page))
    return {"stages": stages, "skipped": skipped}


def test_the_preview_shows_devices_per_stage_and_variant_and_creates_nothing(mixed, alice):
    page = web(alice).post(f"{ROLLOUTS}add/", add_form(mixed, _preview="Preview")).content.decode()
    assert not Rollout.objects.exists()
    shown = preview_numbers(page)
    # 10 devices, stages of 30 % and 100 %: 3, then the other 7; the split by variant is drawn
    # from the rollout's id, so it is known only once the draft exists (its page shows it).
    assert {n: added for n, (added, _) in shown["stages"].items()} == {1: 3, 2: 7}
    assert shown["skipped"] == 0
    assert "10 active devices targeted: 3 get float32, 7 get int8." in visible(page)
    assert "drawn when the draft is created" in page


def test_the_preview_says_which_devices_are_skipped_and_why(mixed, alice):
    page = web(alice).post(f"{ROLLOUTS}add/", add_form(mixed, "v3", _preview="Preview")).content.decode()
    shown = preview_numbers(page)
    assert shown["skipped"] == 3
    assert "int8: needs int8 support" in page
    assert "cam-01, cam-04, cam-07" in page
    assert {n: added for n, (added, _) in shown["stages"].items()} == {1: 3, 2: 4}  # 30 % of 7 eligible


def test_the_preview_refuses_what_creating_refuses(mixed, alice):
    page = web(alice).post(f"{ROLLOUTS}add/", add_form(mixed, tags="nowhere", _preview="Preview"))
    assert "The targets match no active device" in page.content.decode()
    assert 'id="rollout-preview"' not in page.content.decode()


def test_the_drafts_preview_is_what_starting_it_does(mixed, alice, django_capture_on_commit_callbacks):
    response = web(alice).post(f"{ROLLOUTS}add/", add_form(mixed))
    draft = Rollout.objects.get()
    shown = preview_numbers(web(alice).get(response["Location"]).content.decode())
    assert sum(sum(variants.values()) for _, variants in shown["stages"].values()) == 10  # exact now
    with django_capture_on_commit_callbacks(execute=True):
        rollout = services.rollout_start(rollout=draft, by=alice.user, reason="as previewed")
        for number in (1, 2):
            placed = dict(
                rollout.assignments.filter(stage=number - 1)
                .values_list("variant")
                .annotate(n=Count("pk"))
                .order_by()
            )
            assert placed == shown["stages"][number][1], number
            if number == 1:
                rollout = services.rollout_promote(rollout=rollout, by=alice.user, reason="next")


def test_a_draft_targeting_devices_of_another_active_rollout_says_start_will_be_refused(mixed, alice):
    admin_world.start(mixed, alice.user)
    draft = services.rollout_create(
        model=mixed["v3"].model, version=mixed["v3"], targets={"devices": ["cam-02"]}, policy=mixed["policy"]
    )
    page = web(alice).get(page_of(draft)).content.decode()
    assert "in another active rollout of this model (cam-02)" in page


def test_settled_hours_are_summed_once_per_rollout_and_the_page_shows_the_same_numbers(rollout, bob):
    """A week of 10,000 devices is 1.7 million hourly rollups: the hours the ingest can no
    longer change are summed once per rollout by a beat task (RolloutHour), and the page
    reads those sums plus the rollups of the latest hours, with the same numbers."""
    now = timezone.now()
    started = now - timedelta(days=3)
    Rollout.objects.filter(pk=rollout.pk).update(started_at=started)
    rollout.refresh_from_db()
    inside = list(rollout.assignments.values_list("device_id", flat=True)[:2])
    outside = Device.objects.create(device_id="cam-elsewhere", status=DeviceStatus.ACTIVE).pk
    first_hour = started.replace(minute=0, second=0, microsecond=0)
    final = device_selectors.telemetry_final_hour(now)
    hours = [first_hour + timedelta(hours=k) for k in (0, 10, 40)] + [final, now]
    assert sum(hour < final for hour in hours) == 3  # control: summed and live hours both
    for n, hour in enumerate(hours):
        for device, version in ((inside[0], "1.0.0"), (inside[1], "2.0.0"), (outside, "1.0.0")):
            TelemetryHourly.objects.update_or_create(
                device_id=device,
                hour=hour.replace(minute=0, second=0, microsecond=0),
                model="digits",
                version=version,
                variant="float32",
                defaults={
                    "inferences": 100 + n,
                    "errors": n,
                    "latency_p95_weighted_sum": 1.5 * (100 + n),
                    "latency_p95_weight": 100 + n,
                },
            )

    def series() -> dict:
        data = chart_data(web(bob).get(page_of(rollout)).content.decode())
        return {s["version"]: s["points"] for s in data["telemetry"]}

    before = series()
    written = services.telemetry_summarize(now=now)
    assert written == {rollout.pk: 6}  # three settled hours, two versions; the outsider left out
    summed = RolloutHour.objects.filter(rollout=rollout, version="1.0.0").order_by("hour")
    assert [(row.hour, row.inferences, row.errors) for row in summed] == [
        (hours[n].replace(minute=0, second=0, microsecond=0), 100 + n, n) for n in range(3)
    ]
    assert series() == before
    # The summed hours are read from the sums alone: with their rollups gone (as retention
    # deletes them) the page still shows them, and no hour is counted twice.
    TelemetryHourly.objects.filter(hour__lt=final).delete()
    assert series() == before
    assert services.telemetry_summarize(now=now) == {}  # nothing new to sum
    assert RolloutHour.objects.filter(rollout=rollout).count() == 6
    # An hour later the next hour settles, and only it is summed.
    assert services.telemetry_summarize(now=now + timedelta(hours=1)) == {rollout.pk: 2}
    assert series() == before


def test_a_finished_rollout_is_summed_to_its_last_hour_and_then_left_alone(rollout):
    now = timezone.now()
    Rollout.objects.filter(pk=rollout.pk).update(
        started_at=now - timedelta(days=5), finished_at=now - timedelta(days=4)
    )
    device = rollout.assignments.values_list("device_id", flat=True).first()
    finished_hour = (now - timedelta(days=4)).replace(minute=0, second=0, microsecond=0)
    for hour in (finished_hour, finished_hour + timedelta(hours=1)):
        TelemetryHourly.objects.create(
            device_id=device, hour=hour, model="digits", version="2.0.0", variant="float32", inferences=7
        )
    assert services.telemetry_summarize(now=now) == {rollout.pk: 1}  # its finishing hour, not after
    rollout.refresh_from_db()
    assert rollout.telemetry_summed_until == finished_hour + timedelta(hours=1)
    assert services.telemetry_summarize(now=now + timedelta(days=1)) == {}
