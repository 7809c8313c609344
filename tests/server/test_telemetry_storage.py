"""Telemetry storage for the gates (issue 8, section 1): the per-device selector
``telemetry_by_device``, its window_start boundary, and that its query reads only the
gate index of the day partitions in range (EXPLAIN on real PostgreSQL); and (issue 13)
that whole hours read from the hourly sums the ingest writes give the same sums as the
windows themselves."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.utils import timezone

from fleet.devices import ingest
from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device, TelemetryWindow
from fleet.devices.selectors import DeviceTelemetry, telemetry_by_device, telemetry_by_device_queryset
from tests.server.telemetry_writer import ingest_window

pytestmark = pytest.mark.django_db(transaction=True)  # VACUUM cannot run inside a transaction

# Noon UTC today: "several days" before it all fall in whole day partitions.
NOON = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)


def window(device: Device, start: datetime, message_id: str, **fields) -> TelemetryWindow:
    values = {
        "model": "digits",
        "version": "1.0.0",
        "variant": "int8",
        "inferences": 100,
        "errors": 1,
        "labeled": 10,
        "correct": 9,
        "latency_p95_ms": 2.0,
        **fields,
    }
    return TelemetryWindow(
        device=device,
        message_id=message_id,
        ts=start + timedelta(seconds=30),
        window_start=start,
        received_at=start + timedelta(seconds=31),
        window_s=30,
        **values,
    )


@pytest.fixture
def partitions():
    ingest.telemetry_partitions_ensure(now=NOON, first_day=(NOON - timedelta(days=6)).date())


def test_it_sums_per_device_and_arm_the_windows_that_began_at_or_after_since(partitions):
    cam, gate, outsider = (
        Device.objects.create(device_id=name, status=DeviceStatus.ACTIVE)
        for name in ("cam", "gate", "outsider")
    )
    since = NOON - timedelta(hours=1)
    TelemetryWindow.objects.bulk_create(
        [
            window(cam, since - timedelta(seconds=1), "before"),  # began 1 s before: out
            window(cam, since, "at", inferences=100, latency_p95_ms=2.0),  # began at since: in
            window(cam, since + timedelta(minutes=1), "later", inferences=300, latency_p95_ms=4.0),
            window(cam, since + timedelta(minutes=2), "no-latency", inferences=50, latency_p95_ms=None),
            window(cam, since + timedelta(minutes=3), "other-model", model="faces"),
            window(cam, since + timedelta(minutes=4), "after-until"),
            window(
                cam,
                since + timedelta(minutes=2),
                "shadowed",
                version="2.0.0",
                inferences=10,
                errors=0,
                labeled=4,
                correct=4,
                latency_p95_ms=None,
                shadow_version="3.0.0",
                shadow_variant="float32",
                shadow_sampled=10,
                shadow_compared=8,
                shadow_agreed=6,
                shadow_errors=1,
                shadow_latency_p95_ms=3.0,
            ),
            window(
                cam,
                since + timedelta(minutes=3),
                "shadowed-2",
                version="2.0.0",
                inferences=10,
                errors=0,
                labeled=0,
                correct=0,
                latency_p95_ms=None,
                shadow_version="3.0.0",
                shadow_variant="float32",
                shadow_sampled=4,
                shadow_compared=2,
                shadow_agreed=2,
                shadow_latency_p95_ms=8.0,
            ),
            window(gate, since + timedelta(minutes=1), "gate", variant="float32", labeled=0, correct=0),
            window(outsider, since + timedelta(minutes=1), "outsider", labeled=1000, correct=1000),
        ]
    )

    # These windows were written without the ingest (no hourly sums): hourly=False reads
    # the windows alone, the query whose boundaries this test is about.
    until = since + timedelta(minutes=4)
    pair = [cam.pk, gate.pk]
    rows = telemetry_by_device(devices=pair, model="digits", since=since, until=until, hourly=False)

    assert rows == [
        DeviceTelemetry(
            device_pk=cam.pk,
            device_id="cam",
            version="1.0.0",
            variant="int8",
            windows=3,
            inferences=450,
            errors=3,
            labeled=30,
            correct=27,
            # inference-weighted over the windows that have a p95: (100*2 + 300*4) / 400
            latency_p95_ms=3.5,
            shadow_version="",
            shadow_variant="",
            shadow_sampled=0,
            shadow_compared=0,
            shadow_agreed=0,
            shadow_errors=0,
            shadow_latency_p95_ms=None,
        ),
        DeviceTelemetry(
            device_pk=cam.pk,
            device_id="cam",
            version="2.0.0",
            variant="int8",
            windows=2,
            inferences=20,
            errors=0,
            labeled=4,
            correct=4,
            latency_p95_ms=None,
            shadow_version="3.0.0",
            shadow_variant="float32",
            shadow_sampled=14,
            shadow_compared=10,
            shadow_agreed=8,
            shadow_errors=1,
            # compared-weighted: (8*3 + 2*8) / 10
            shadow_latency_p95_ms=4.0,
        ),
        DeviceTelemetry(
            device_pk=gate.pk,
            device_id="gate",
            version="1.0.0",
            variant="float32",
            windows=1,
            inferences=100,
            errors=1,
            labeled=0,
            correct=0,
            latency_p95_ms=2.0,
            shadow_version="",
            shadow_variant="",
            shadow_sampled=0,
            shadow_compared=0,
            shadow_agreed=0,
            shadow_errors=0,
            shadow_latency_p95_ms=None,
        ),
    ]
    # Without until, the later window counts too; a queryset of devices works as a list does.
    open_ended = telemetry_by_device(
        devices=Device.objects.filter(device_id="cam"), model="digits", since=since, hourly=False
    )
    assert sum(row.windows for row in open_ended) == 6
    # Positive control of the boundary: one second earlier, the window before counts.
    earlier = telemetry_by_device(
        devices=[cam.pk], model="digits", since=since - timedelta(seconds=1), hourly=False
    )
    assert sum(row.windows for row in earlier) == 7
    assert telemetry_by_device(devices=[], model="digits", since=since) == []


def plan_of(queryset) -> str:
    return queryset.explain()


def scanned_partitions(plan: str) -> set[str]:
    return set(re.findall(r" on (devices_telemetrywindow_\w+)", plan))


def test_the_gate_query_reads_only_the_index_of_the_partitions_in_range(partitions):
    devices = Device.objects.bulk_create(
        [Device(device_id=f"dev-{index:03d}", status=DeviceStatus.ACTIVE) for index in range(100)]
    )
    # 100 devices x 5 days x 10 windows = 5,000 windows over five day partitions.
    rows = [
        window(device, NOON - timedelta(days=day, hours=hour), f"{device.pk}-{day}-{hour}")
        for device in devices
        for day in range(5)
        for hour in range(10)
    ]
    TelemetryWindow.objects.bulk_create(rows, batch_size=1000)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE devices_telemetrywindow")

    chosen = [device.pk for device in devices[:5]]
    since, until = NOON - timedelta(days=1, hours=9), NOON - timedelta(days=1, hours=1)
    plan = plan_of(telemetry_by_device_queryset(devices=chosen, model="digits", since=since, until=until))

    day = (NOON - timedelta(days=1)).date()
    assert scanned_partitions(plan) == {f"devices_telemetrywindow_p{day:%Y%m%d}"}, plan
    assert "Seq Scan" not in plan, plan
    assert re.search(r"Index (Only )?Scan using \w+model_device_id_window\w*", plan), plan

    # A stage started two days ago and still running: today's partitions, the ones ahead
    # and DEFAULT (which is open-ended) may be read, never the older days.
    open_plan = plan_of(
        telemetry_by_device_queryset(devices=chosen, model="digits", since=NOON - timedelta(days=2))
    )
    scanned = scanned_partitions(open_plan)
    older = {f"devices_telemetrywindow_p{(NOON - timedelta(days=n)).date():%Y%m%d}" for n in (3, 4, 5, 6)}
    assert scanned and not scanned & older, open_plan
    assert f"devices_telemetrywindow_p{(NOON - timedelta(days=2)).date():%Y%m%d}" in scanned
    # Those that hold windows are read through the index (empty ones cost nothing either way).
    with_data = {f"devices_telemetrywindow_p{(NOON - timedelta(days=n)).date():%Y%m%d}" for n in range(3)}
    assert not set(re.findall(r"Seq Scan on (devices_telemetrywindow_\w+)", open_plan)) & with_data, open_plan

    # The sums through the same query: 5 devices, each with 10 windows a day; between
    # since (03:00) and until (11:00, excluded) lie those of 03:00 to 10:00 (8 of them).
    result = telemetry_by_device(devices=chosen, model="digits", since=since, until=until, hourly=False)
    assert [(row.device_pk, row.windows, row.inferences) for row in result] == [
        (pk, 8, 800) for pk in sorted(chosen)
    ]


# --- whole hours from the hourly sums (issue 13: the gate at 10,000 devices, bench/gate_query.py)


def same_sums(rows: list[DeviceTelemetry]) -> list[tuple]:
    """Comparable answers: counts exactly, mean p95s to 1e-9 (sums added in another order)."""
    return [
        tuple(round(value, 9) if isinstance(value, float) else value for value in vars(row).values())
        for row in rows
    ]


@pytest.fixture
def ingested():
    """Four devices' windows over the last four hours, written by the ingest bridge's own
    writer (so with their hourly sums): a version change, windows without a latency, a p95
    behind no inference (the plain mean only the windows keep), and shadows, one of which
    compared nothing while reporting a p95."""
    ingest.telemetry_partitions_ensure()
    names = ("steady", "quiet", "shadow", "odd-shadow")
    devices = {
        name: Device.objects.create(device_id=f"{name}-{uuid.uuid4().hex[:6]}", status=DeviceStatus.ACTIVE)
        for name in names
    }
    now = timezone.now()
    first = now - timedelta(hours=4)
    for step in range(int((now - first) / timedelta(minutes=7))):
        start = first + step * timedelta(minutes=7)
        version = "1.0.0" if step < 20 else "2.0.0"
        stored = [
            ingest_window(
                devices["steady"].device_id,
                start=start,
                version=version,
                variant="int8",
                inferences=100 + step,
                errors=step % 3,
                labeled=20,
                correct=15 + step % 5,
                latency_p95_ms=1.0 + (step % 7) / 3,
            ),
            ingest_window(
                devices["quiet"].device_id,
                start=start,
                version="1.0.0",
                variant="float32",
                inferences=0 if step % 2 else 50,
                latency_p95_ms=2.5 + step % 4 if step % 2 else None,
            ),
            ingest_window(
                devices["shadow"].device_id,
                start=start,
                version="1.0.0",
                variant="int8",
                inferences=40,
                shadow={
                    "version": "2.0.0",
                    "variant": "int8",
                    "sampled": 10,
                    "compared": 0 if step % 4 == 0 else 10,
                    "agreed": 0 if step % 4 == 0 else 9,
                    "skipped": 10 if step % 4 == 0 else 0,
                    "latency_ms": {"p50": 1.0, "p95": 1.5 + step % 3, "p99": 5.0},
                },
            ),
            ingest_window(
                devices["odd-shadow"].device_id,
                start=start,
                version="1.0.0",
                variant="int8",
                inferences=40,
                shadow={
                    "version": "2.0.0",
                    "variant": "int8",
                    "sampled": 5,
                    "compared": 0,
                    "agreed": 0,
                    "skipped": 5,
                    "latency_ms": {"p50": 1.0, "p95": 2.0 + step % 2, "p99": 5.0},
                },
            ),
        ]
        assert stored == [1, 1, 1, 1]
    return devices, now


def test_whole_hours_read_from_the_hourly_sums_give_the_same_sums_as_the_windows(ingested):
    devices, now = ingested
    pks = [device.pk for device in devices.values()]
    hour = now.replace(minute=0, second=0, microsecond=0)
    spans = [
        (hour - timedelta(hours=3, minutes=-13), None),  # a part hour, then whole ones
        (hour - timedelta(hours=3), None),  # on the hour: no part hour at the start
        (hour - timedelta(hours=3, minutes=-41), hour - timedelta(minutes=19)),  # part hours at both ends
        (hour - timedelta(hours=2), hour),  # whole hours only
        (hour - timedelta(minutes=50), hour - timedelta(minutes=5)),  # less than an hour
    ]
    for since, until in spans:
        mixed = telemetry_by_device(devices=pks, model="digits", since=since, until=until)
        alone = telemetry_by_device(devices=pks, model="digits", since=since, until=until, hourly=False)
        assert same_sums(mixed) == same_sums(alone), (since, until)
        assert sum(row.windows for row in mixed) > 0
    # The plain means the hourly sums cannot give were read from the windows.
    by_name = {row.device_pk: row for row in mixed}
    assert by_name[devices["quiet"].pk].latency_p95_ms is not None
    assert by_name[devices["odd-shadow"].pk].shadow_latency_p95_ms is not None


def test_the_whole_hours_really_come_from_the_hourly_sums(ingested):
    """Positive control: with the windows of the whole hours gone (the hourly sums kept),
    the answer is the same, while the windows alone now say less."""
    devices, now = ingested
    steady = [devices["steady"].pk]
    since = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=3, minutes=-13)
    before = telemetry_by_device(devices=steady, model="digits", since=since)
    whole = (since.replace(minute=0) + timedelta(hours=1), now.replace(minute=0, second=0, microsecond=0))
    gone, _ = TelemetryWindow.objects.filter(
        device_id__in=steady, window_start__gte=whole[0], window_start__lt=whole[1]
    ).delete()
    assert gone > 0
    assert same_sums(telemetry_by_device(devices=steady, model="digits", since=since)) == same_sums(before)
    alone = telemetry_by_device(devices=steady, model="digits", since=since, hourly=False)
    assert sum(row.windows for row in alone) == sum(row.windows for row in before) - gone
