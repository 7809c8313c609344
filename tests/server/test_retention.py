"""Storage stays bounded (issue 13, section 2): day after day of a small fleet's rows, with
the beat jobs run each day, the growing tables stop growing; and the retention of the
gates' evaluations keeps what the rollout page shows. Real PostgreSQL, the project's
partition maintenance and the beat tasks' own functions (fleet/devices/tasks.py,
fleet/rollouts/tasks.py); the schedules are the migrations' (checked here too)."""

from __future__ import annotations

import importlib
from datetime import timedelta

import pytest
from django.apps import apps as django_apps
from django.db.migrations import RunPython
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from fleet.devices import ingest
from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device, DeviceEvent, IngestRefusal, TelemetryHourly, TelemetryWindow
from fleet.registry import services as registry
from fleet.rollouts import services
from fleet.rollouts import tasks as rollout_tasks
from fleet.rollouts.choices import Decision, Metric, RolloutState, Verdict
from fleet.rollouts.models import GateEvaluation, Rollout, RolloutPolicy

pytestmark = pytest.mark.django_db(transaction=True)  # partitions are made and dropped

DEVICES = 3
WINDOWS_A_DAY = 12  # a few windows stand for the 2,880 of a real day: the rule is the same


@pytest.fixture
def rollout():
    model = registry.model_create(name="digits", labels=[str(n) for n in range(10)])
    version = registry.version_create(model=model, version="2.0.0")
    policy = RolloutPolicy.objects.create(name="retention")
    return Rollout.objects.create(
        model=model, target_version=version, policy=policy, state=RolloutState.RUNNING, current_stage=0
    )


def evaluation(rollout: Rollout, at, *, stage: int = 0, decision: str = Decision.WAIT) -> None:
    """One evaluation: a row per gate, one timestamp (as services._store writes them)."""
    GateEvaluation.objects.bulk_create(
        [
            GateEvaluation(
                rollout=rollout,
                stage=stage,
                metric=metric,
                verdict=Verdict.WAIT if decision == Decision.WAIT else Verdict.PASS,
                summary="waiting for labels",
                decision=decision,
                evaluated_at=at,
            )
            for metric in (Metric.ACCURACY, Metric.ERROR_RATE)
        ]
    )


def one_day(devices: list[Device], rollout: Rollout, day) -> None:
    """What a day adds: windows, hourly sums, events, a refusal count, evaluations."""
    ingest.telemetry_partitions_ensure(now=day, first_day=day.date())
    for device in devices:
        for index in range(WINDOWS_A_DAY):
            start = day + timedelta(hours=2 * index)
            TelemetryWindow.objects.create(
                device=device,
                message_id=f"{day:%m%d}-{index}",
                ts=start + timedelta(seconds=30),
                window_start=start,
                received_at=start,
                window_s=30,
                model="digits",
                version="1.0.0",
                variant="int8",
                inferences=10,
                errors=0,
            )
            TelemetryHourly.objects.create(
                device=device, hour=start, model="digits", version="1.0.0", variant="int8", windows=1
            )
        DeviceEvent.objects.create(
            device=device, message_id=f"{day:%m%d}", type="active", ts=day, received_at=day
        )
        IngestRefusal.objects.update_or_create(
            device=device, reason="clock", defaults={"count": 1, "first_at": day, "last_at": day}
        )
    for minutes in range(0, 24 * 60, 20):  # every 20 minutes stands for every 5 seconds
        evaluation(rollout, day + timedelta(minutes=minutes))


def counts() -> dict[str, int]:
    return {
        "windows": TelemetryWindow.objects.count(),
        "hourly": TelemetryHourly.objects.count(),
        "events": DeviceEvent.objects.count(),
        "refusals": IngestRefusal.objects.count(),
    }


@pytest.mark.parametrize(
    "migration, task",
    [
        ("fleet.devices.migrations.0002_beat_schedules", "fleet.devices.tasks.telemetry_cleanup"),
        (
            "fleet.rollouts.migrations.0007_evaluations_thin_schedule",
            "fleet.rollouts.tasks.rollouts_evaluations_thin",
        ),
    ],
)
def test_the_retention_jobs_are_scheduled_hourly_by_their_migrations(migration, task):
    """The schedule rows come from data migrations (a transactional test's flush may have
    removed them): the migration's own code makes them again here."""
    PeriodicTask.objects.filter(task=task).delete()
    for operation in importlib.import_module(migration).Migration.operations:
        if isinstance(operation, RunPython):
            operation.code(django_apps, None)
    scheduled = PeriodicTask.objects.get(task=task)
    assert scheduled.enabled and (scheduled.interval.every, scheduled.interval.period) == (1, "hours")


def test_day_after_day_the_growing_tables_stop_growing(settings, rollout):
    settings.TELEMETRY_RETENTION_DAYS = 2
    settings.TELEMETRY_HOURLY_RETENTION_DAYS = 3
    settings.GATE_EVALUATION_RETENTION_DAYS = 2
    devices = [
        Device.objects.create(device_id=f"cam-{n}", status=DeviceStatus.ACTIVE) for n in range(DEVICES)
    ]
    first = (timezone.now() - timedelta(days=10)).replace(hour=0, minute=0, second=0, microsecond=0)
    after_jobs, before_jobs, evaluations = [], [], []
    for number in range(9):
        day = first + timedelta(days=number)
        one_day(devices, rollout, day)
        before_jobs.append(counts())
        end_of_day = day + timedelta(days=1)
        # What the hourly beat tasks run (device_tasks.telemetry_cleanup,
        # rollout_tasks.rollouts_evaluations_thin), at the end of the simulated day.
        ingest.telemetry_cleanup(now=end_of_day)
        services.evaluations_thin(now=end_of_day)
        after_jobs.append(counts())
        evaluations.append(GateEvaluation.objects.count())

    # Positive control: each day adds rows, so without the jobs every table would grow.
    assert all(
        before_jobs[n + 1][name] > after_jobs[n][name] for n in range(8) for name in ("windows", "hourly")
    )
    # Once the retention is reached, a day's deletions match a day's rows: a plateau.
    assert after_jobs[5] == after_jobs[6] == after_jobs[7] == after_jobs[8]
    assert after_jobs[8] == {
        "windows": DEVICES * WINDOWS_A_DAY * 2,  # two days
        "hourly": DEVICES * WINDOWS_A_DAY * 3,  # three days
        "events": DEVICES * 2,
        "refusals": DEVICES,  # one row per device and reason, whatever the days
    }
    # Evaluations: a day adds 72 evaluations (2 rows each); past the retention, 24 a day
    # remain (the first of each hour): growth by hours of a rollout, no longer by looks.
    daily = [evaluations[n + 1] - evaluations[n] for n in range(4, 8)]
    assert daily == [24 * 2] * 4, daily


def test_thinning_keeps_the_decisions_the_last_look_of_each_stage_and_one_look_an_hour(settings, rollout):
    settings.GATE_EVALUATION_RETENTION_DAYS = 7
    now = timezone.now()
    base = (now - timedelta(days=9)).replace(minute=0, second=0, microsecond=0)
    looks = [base + timedelta(minutes=10 * n) for n in range(12)]  # two hours, six looks each
    for at in looks[:5]:
        evaluation(rollout, at, stage=0)
    evaluation(rollout, looks[5], stage=0, decision=Decision.PROMOTE)  # acted: stays
    for at in looks[6:10]:
        evaluation(rollout, at, stage=1)
    evaluation(rollout, looks[10] - timedelta(minutes=1), stage=1)  # stage 1's last look: stays
    recent = now - timedelta(days=1)
    for minutes in range(3):
        evaluation(rollout, recent + timedelta(minutes=minutes), stage=2)  # too recent to thin

    deleted = rollout_tasks.rollouts_evaluations_thin()  # the beat task, at the real time

    kept = sorted(set(GateEvaluation.objects.values_list("evaluated_at", flat=True)))
    assert kept == [
        looks[0],  # first of its hour
        looks[5],  # the promotion
        looks[6],  # first of the next hour
        looks[10] - timedelta(minutes=1),  # the last look of stage 1
        *(recent + timedelta(minutes=m) for m in range(3)),
    ]
    assert deleted == 2 * (11 - 4)  # 11 old looks, 4 kept, two rows each
    assert services.evaluations_thin(now=now) == 0  # idempotent
