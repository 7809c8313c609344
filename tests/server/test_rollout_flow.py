"""The rollout state machine with the real database and broker: cohorts by hash, variant
rule, stage order and soak, gate decisions (promote, wait, pause, roll back), overlap,
concurrency. Desired states are signed and recorded on each device; they are published after
commit (against the real broker in tests/server/test_publish_desired.py).

Devices here report through the same tables the ingest bridge writes (Device, DeviceEvent);
the gates' evidence is in test_rollout_gates.py, the run with real agents in tests/e2e."""

from datetime import timedelta

import pytest
from django.core.cache import cache
from django.utils import timezone

from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device, DeviceEvent
from fleet.devices.services import devices_assign
from fleet.registry import services as registry
from fleet.rollouts import services
from fleet.rollouts.choices import AssignmentState, Decision, RolloutState
from fleet.rollouts.models import Assignment, AuditEntry, RolloutPolicy
from tests.server.conftest import ready_artifact

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]


@pytest.fixture
def world(digits_model, digits, alice, django_capture_on_commit_callbacks):
    v1 = registry.version_create(model=digits_model, version="1.0.0")
    v2 = registry.version_create(model=digits_model, version="2.0.0")
    artifacts = {}
    for version, quality in ((v1, {}), (v2, {"version": "2.0.0"})):
        models = digits.build_digits_models(**quality)
        for variant in ("float32", "int8"):
            artifacts[(version.version, variant)] = ready_artifact(version, variant, models[variant])
    devices = [
        Device.objects.create(
            device_id=f"cam-{n:02d}", status=DeviceStatus.ACTIVE, supports_int8=n % 2 == 0, tags=["fleet"]
        )
        for n in range(20)
    ]
    for device in devices:
        variant = "int8" if device.supports_int8 else "float32"
        with django_capture_on_commit_callbacks(execute=True):
            devices_assign(
                devices=[device], artifacts={"digits": artifacts[("1.0.0", variant)]}, publish="now"
            )
        report(device, "1.0.0", variant)
    policy = RolloutPolicy.objects.create(
        name="canary",
        stages=[
            {"kind": "percent", "value": 10, "soak_seconds": 0},
            {"kind": "percent", "value": 50, "soak_seconds": 0},
            {"kind": "percent", "value": 100, "soak_seconds": 0},
        ],
        gates={
            "max_install_failure_rate": 0.2,
            "accuracy": {"min_samples": 100, "max_drop_pp": 2, "confidence": 0.95},
        },
    )
    return {"v1": v1, "v2": v2, "devices": devices, "policy": policy, "artifacts": artifacts}


def report(device: Device, version: str, variant: str) -> None:
    device.refresh_from_db()
    Device.objects.filter(pk=device.pk).update(
        applied_generation=device.desired_generation,
        reported_models={"digits": {"version": version, "variant": variant}},
    )


def devices_install(rollout) -> None:
    """What agents and the ingest bridge would do: every notified device applies."""
    for assignment in rollout.assignments.filter(state=AssignmentState.NOTIFIED).select_related("device"):
        report(assignment.device, rollout.target_version.version, assignment.variant)


def start(world, **policy_changes):
    RolloutPolicy.objects.filter(pk=world["policy"].pk).update(**policy_changes)
    rollout = services.rollout_create(
        model=world["v2"].model,
        version=world["v2"],
        targets={"tags": ["fleet"]},
        policy=RolloutPolicy.objects.get(),
    )
    return services.rollout_start(rollout=rollout)


def covered(rollout) -> int:
    return rollout.assignments.exclude(state__in=(AssignmentState.PENDING, AssignmentState.SKIPPED)).count()


def test_stages_cover_10_50_100_percent_in_hash_order_with_the_variant_rule(world):
    rollout = start(world, gates={})
    assert covered(rollout) == 2
    first = list(
        rollout.assignments.exclude(state=AssignmentState.PENDING).values_list("device__device_id", flat=True)
    )
    by_hash = list(rollout.assignments.order_by("cohort_key").values_list("device__device_id", flat=True))
    assert sorted(first) == sorted(by_hash[:2])
    for stage_size in (10, 20):
        devices_install(rollout)
        assert services.rollout_evaluate(rollout_id=rollout.pk) == Decision.PROMOTE
        rollout.refresh_from_db()
        assert covered(rollout) == stage_size
    devices_install(rollout)
    assert services.rollout_evaluate(rollout_id=rollout.pk) == Decision.COMPLETE
    rollout.refresh_from_db()
    assert rollout.state == RolloutState.COMPLETED
    for assignment in rollout.assignments.select_related("device", "to_artifact"):
        assert assignment.state == AssignmentState.ACTIVE
        assert assignment.variant == ("int8" if assignment.device.supports_int8 else "float32")
        assert assignment.to_artifact.variant == assignment.variant


def test_soak_holds_a_stage(world):
    stages = [{"kind": "percent", "value": 10, "soak_seconds": 3600}, {"kind": "percent", "value": 100}]
    rollout = start(world, stages=stages, gates={})
    devices_install(rollout)
    assert services.rollout_evaluate(rollout_id=rollout.pk) == Decision.WAIT
    later = timezone.now() + timedelta(seconds=3601)
    assert services.rollout_evaluate(rollout_id=rollout.pk, now=later) == Decision.PROMOTE


def test_install_failures_pause_at_stage_one(world):
    rollout = start(world, on_failure="pause", gates={"max_install_failure_rate": 0.1})
    for assignment in rollout.assignments.filter(state=AssignmentState.NOTIFIED):
        DeviceEvent.objects.create(
            device=assignment.device,
            message_id=f"e-{assignment.pk}",
            type="failed",
            generation=assignment.generation,
            reason="golden_failed",
            ts=timezone.now(),
            received_at=timezone.now(),
        )
    assert services.rollout_evaluate(rollout_id=rollout.pk) == Decision.PAUSE
    rollout.refresh_from_db()
    assert (rollout.state, rollout.current_stage) == (RolloutState.PAUSED, 0)
    assert set(
        rollout.assignments.exclude(state=AssignmentState.PENDING).values_list("reason", flat=True)
    ) == {"golden_failed"}


def test_illegal_transitions_are_refused(world):
    rollout = start(world, gates={})
    services.rollout_abort(rollout=rollout)
    for action in (services.rollout_pause, services.rollout_resume, services.rollout_rollback):
        with pytest.raises(services.Conflict) as excinfo:
            action(rollout=rollout)
        assert excinfo.value.code == "illegal_transition"


def test_a_second_rollout_of_the_same_model_on_the_same_devices_is_refused(world):
    start(world, gates={})
    second = services.rollout_create(
        model=world["v2"].model, version=world["v2"], targets={"devices": ["cam-03"]}, policy=world["policy"]
    )
    with pytest.raises(services.Conflict) as excinfo:
        services.rollout_start(rollout=second)
    assert excinfo.value.code == "overlap"


def test_a_revoked_version_cannot_be_rolled_out(world):
    registry.version_set_status(version=world["v2"], status="revoked")
    with pytest.raises(services.Conflict) as excinfo:
        services.rollout_create(
            model=world["v2"].model, version=world["v2"], targets={"tags": ["fleet"]}, policy=world["policy"]
        )
    assert excinfo.value.code == "version_revoked"


def test_targets_that_match_no_device_are_refused(world):
    with pytest.raises(services.InvalidInput) as excinfo:
        services.rollout_create(
            model=world["v2"].model, version=world["v2"], targets={"tags": ["nobody"]}, policy=world["policy"]
        )
    assert excinfo.value.code == "no_devices"


def test_a_stale_promotion_cannot_promote_twice(world):
    rollout = start(world, gates={})
    devices_install(rollout)
    stale = type(rollout).objects.get(pk=rollout.pk)
    services.rollout_promote(rollout=rollout)
    services.rollout_promote(rollout=stale)  # re-reads under lock: promotes from stage 1, not 0 again
    rollout.refresh_from_db()
    assert rollout.current_stage == 2
    assert AuditEntry.objects.filter(rollout=rollout, action="promote").count() == 2
    assert Assignment.objects.filter(rollout=rollout, stage=1).count() == 8


def test_editing_the_policy_does_not_change_a_running_rollout(world):
    rollout = start(world, gates={})
    RolloutPolicy.objects.update(stages=[{"kind": "percent", "value": 100}])
    rollout.refresh_from_db()
    assert len(rollout.stages) == 3


def test_a_device_that_joins_the_targets_later_gets_its_place_by_the_same_hash(world):
    from fleet.rollouts.cohort import cohort_key

    rollout = start(world, gates={})
    newcomer = Device.objects.create(device_id="cam-new", status=DeviceStatus.ACTIVE, tags=["fleet"])
    services.rollout_evaluate(rollout_id=rollout.pk)
    placed = Assignment.objects.get(rollout=rollout, device=newcomer)
    assert placed.cohort_key == cohort_key(rollout.pk, "cam-new") >> 1
    assert placed.variant == "int8"  # the rule, from its declared capabilities


def test_devices_that_never_pick_up_stop_blocking_after_the_timeout(world):
    rollout = start(world, gates={}, pickup_timeout_seconds=60)
    # One of the stage's two devices installs, the other stays offline: the stage waits …
    first = rollout.assignments.filter(state=AssignmentState.NOTIFIED).select_related("device").first()
    report(first.device, "2.0.0", first.variant)
    assert services.rollout_evaluate(rollout_id=rollout.pk) == Decision.WAIT
    # … until the pick-up timeout says the silent one no longer counts.
    later = timezone.now() + timedelta(seconds=61)
    assert services.rollout_evaluate(rollout_id=rollout.pk, now=later) == Decision.PROMOTE


def test_a_device_that_never_reports_its_desired_state_gets_it_again_until_the_pickup_timeout(
    world, settings, django_capture_on_commit_callbacks
):
    """A crash between the commit and the broker loses a desired state (docs/operations.md,
    "What survives a crash"): the evaluator sends it again to devices that stay silent."""
    settings.DESIRED_REPUBLISH_SECONDS = 30
    rollout = start(world, gates={}, pickup_timeout_seconds=300)
    answered, silent = rollout.assignments.filter(state=AssignmentState.NOTIFIED).select_related("device")
    report(answered.device, "2.0.0", answered.variant)
    now = timezone.now()
    assert services.desired_republish_unapplied(rollout=rollout, now=now) == 0  # not silent for long yet
    with django_capture_on_commit_callbacks() as publishing:
        assert services.desired_republish_unapplied(rollout=rollout, now=now + timedelta(seconds=31)) == 1
    assert len(publishing) == 1
    # At most once per DESIRED_REPUBLISH_SECONDS, and never past the pickup timeout.
    assert services.desired_republish_unapplied(rollout=rollout, now=now + timedelta(seconds=32)) == 0
    cache.delete(f"desired-republish:{silent.pk}:{silent.generation}")
    assert services.desired_republish_unapplied(rollout=rollout, now=now + timedelta(seconds=301)) == 0
