"""Rollout decisions under concurrency, on real PostgreSQL connections (one per thread):
two evaluators at the same moment never promote twice, and a pause racing a promotion
ends in one consistent state."""

import threading

import pytest
from django.db import connection

from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device
from fleet.registry import services as registry
from fleet.rollouts import services
from fleet.rollouts.choices import AssignmentState, RolloutState
from fleet.rollouts.models import AuditEntry, Rollout, RolloutPolicy
from tests.server.conftest import ready_artifact

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("broker_settings", "celery_worker_process"),
]


@pytest.fixture
def running(digits_model, digits):
    v2 = registry.version_create(model=digits_model, version="2.0.0")
    ready_artifact(v2, "float32", digits.build_digits_models(version="2.0.0")["float32"])
    for n in range(10):
        Device.objects.create(
            device_id=f"race-{n}", status=DeviceStatus.ACTIVE, tags=["race"], supports_int8=False
        )
    policy = RolloutPolicy.objects.create(
        name="race",
        gates={},
        stages=[
            {"kind": "percent", "value": 10},
            {"kind": "percent", "value": 50},
            {"kind": "percent", "value": 100},
        ],
    )
    rollout = services.rollout_create(
        model=digits_model, version=v2, targets={"tags": ["race"]}, policy=policy
    )
    rollout = services.rollout_start(rollout=rollout)
    # The stage's devices installed: the next evaluation may promote.
    for assignment in rollout.assignments.filter(state=AssignmentState.NOTIFIED).select_related("device"):
        assignment.device.refresh_from_db()
        Device.objects.filter(pk=assignment.device_id).update(
            applied_generation=assignment.device.desired_generation,
            reported_models={"digits": {"version": "2.0.0", "variant": "float32"}},
        )
    return rollout


def race(*calls):
    """Run the calls at the same moment, each on its own database connection."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(index, call):
        try:
            barrier.wait()
            results[index] = call()
        except Exception as exc:
            results[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_two_evaluations_at_the_same_moment_promote_once(running):
    results = race(*[lambda: services.rollout_evaluate(rollout_id=running.pk)] * 2)
    assert not [r for r in results if isinstance(r, Exception)], results
    running.refresh_from_db()
    assert running.current_stage == 1
    assert AuditEntry.objects.filter(rollout=running, action="promote").count() == 1
    assert running.assignments.filter(stage=1).count() == 4  # 50 % of 10, minus the first stage's one


def test_pause_racing_a_promotion_ends_consistent(running):
    results = race(
        lambda: services.rollout_evaluate(rollout_id=running.pk),
        lambda: services.rollout_pause(rollout=Rollout.objects.get(pk=running.pk), reason="race"),
    )
    running.refresh_from_db()
    promoted = AuditEntry.objects.filter(rollout=running, action="promote").count()
    paused = AuditEntry.objects.filter(rollout=running, action="pause").count()
    # Either order is fine; what must hold is that the rows agree with each other.
    if running.state == RolloutState.PAUSED:
        assert paused == 1
        assert running.current_stage == promoted  # paused at whichever stage the promotion reached
        assert running.assignments.filter(stage=running.current_stage).exists()
    else:
        assert running.state == RolloutState.RUNNING and paused == 0
        assert isinstance(results[1], services.Conflict)  # the pause lost its compare-and-set
    assert (
        running.assignments.exclude(stage__isnull=True).exclude(stage__lte=running.current_stage).count() == 0
    )
