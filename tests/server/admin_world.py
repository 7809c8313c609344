"""A small fleet with a rollout, for the admin's tests (Django test client and browser).

Ten devices tagged "fleet" run digits 1.0.0 (float32); 2.0.0 is ready; the "canary" policy
has two stages (30 %, then 100 %) and no gates. Everything goes through the services."""

from __future__ import annotations

from datetime import timedelta

from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device, DeviceEvent, TelemetryHourly
from fleet.devices.services import devices_assign
from fleet.registry import services as registry
from fleet.rollouts import services
from fleet.rollouts.choices import Decision, Metric, Verdict
from fleet.rollouts.models import GateEvaluation, Rollout, RolloutPolicy
from tests.server.conftest import ready_artifact


def build(digits_model, digits) -> dict:
    v1 = registry.version_create(model=digits_model, version="1.0.0")
    v2 = registry.version_create(model=digits_model, version="2.0.0")
    artifacts = {}
    for version in (v1, v2):
        models = digits.build_digits_models(version=version.version)
        artifacts[version.version] = ready_artifact(version, "float32", models["float32"])
    devices = [
        Device.objects.create(device_id=f"cam-{n:02d}", status=DeviceStatus.ACTIVE, tags=["fleet"])
        for n in range(10)
    ]
    devices_assign(devices=devices, artifacts={"digits": artifacts["1.0.0"]}, publish="now")
    for device in devices:
        device.refresh_from_db()
        Device.objects.filter(pk=device.pk).update(
            applied_generation=device.desired_generation,
            reported_models={"digits": {"version": "1.0.0", "variant": "float32"}},
        )
    policy = RolloutPolicy.objects.create(
        name="canary",
        stages=[
            {"kind": "percent", "value": 30, "soak_seconds": 0},
            {"kind": "percent", "value": 100, "soak_seconds": 0},
        ],
        gates={},
    )
    return {"v1": v1, "v2": v2, "devices": devices, "policy": policy}


def hourly(device, hour, variant: str = "float32", **figures) -> TelemetryHourly:
    """One hourly rollup row of digits 1.0.0 (what the ingest bridge sums from the windows)."""
    return TelemetryHourly.objects.create(
        device=device, hour=hour, model="digits", version="1.0.0", variant=variant, **figures
    )


def start(world: dict, by) -> Rollout:
    """A running rollout of 2.0.0 to every device of the world, started by ``by``."""
    rollout = services.rollout_create(
        model=world["v2"].model, version=world["v2"], targets={"tags": ["fleet"]}, policy=world["policy"]
    )
    return services.rollout_start(rollout=rollout, by=by, reason="canary for 2.0.0")


def evidence(rollout: Rollout) -> dict:
    """What a rollout at stage 1 has seen a minute in: of the covered devices (by device id)
    the first failed its golden check and the second is active (device events, synced as the
    evaluator does); three accuracy evaluations (waiting, then failing: 72.0 % vs 97.5 %), an
    error-rate evaluation beside the last, and hourly telemetry of two devices."""
    covered = list(rollout.assignments.filter(stage=0).select_related("device").order_by("device__device_id"))
    failed, active = covered[0], covered[1]
    # Evidence after the start, as it comes: events a minute in, evaluations just after.
    now = rollout.started_at.replace(microsecond=0) + timedelta(seconds=60)
    for assignment, kind, reason in ((failed, "failed", "golden_failed"), (active, "active", "")):
        DeviceEvent.objects.create(
            device=assignment.device,
            message_id=f"{kind}-1",
            type=kind,
            generation=assignment.generation,
            model="digits",
            version="2.0.0",
            variant="float32",
            reason=reason,
            ts=now - timedelta(seconds=30),
            received_at=now - timedelta(seconds=29),
        )
    services.assignments_sync(rollout=rollout)
    for n, (candidate, incumbent, lower, upper) in enumerate(
        [
            (0.91234, 0.97549, -3.14159, 12.71828),
            (0.80001, 0.97449, 8.25, 26.6666),
            (0.72049, 0.97501, 18.2, 32.9),
        ]
    ):
        GateEvaluation.objects.create(
            rollout=rollout,
            stage=0,
            metric=Metric.ACCURACY,
            variant="float32",
            verdict=Verdict.FAIL if n == 2 else Verdict.WAIT,
            candidate_value=candidate,
            incumbent_value=incumbent,
            candidate_n=100 * (n + 1),
            incumbent_n=1000 * (n + 1),
            lower=lower,
            upper=upper,
            threshold=2.0,
            summary=f"accuracy (float32): look {n + 1}",
            inputs={"drop_pp": (incumbent - candidate) * 100},
            decision=Decision.ROLLBACK if n == 2 else Decision.WAIT,
            evaluated_at=now - timedelta(seconds=20 - 5 * n),
        )
    GateEvaluation.objects.create(
        rollout=rollout,
        stage=0,
        metric=Metric.ERROR_RATE,
        verdict=Verdict.PASS,
        candidate_value=0.001234,
        candidate_n=5000,
        lower=0.0004,
        upper=0.00456789,
        threshold=0.01,
        summary="errors: fine",
        decision=Decision.ROLLBACK,
        evaluated_at=now - timedelta(seconds=10),
    )
    hour = rollout.started_at.replace(minute=0, second=0, microsecond=0)
    for assignment, version, p95, inferences, errors in (
        (active, "2.0.0", 1.2345, 300, 3),
        (covered[2], "1.0.0", 0.9, 100, 0),
        (covered[2], "2.0.0", 2.0, 100, 1),
    ):
        TelemetryHourly.objects.create(
            device=assignment.device,
            hour=hour,
            model="digits",
            version=version,
            variant="float32",
            windows=10,
            inferences=inferences,
            errors=errors,
            latency_p95_weighted_sum=p95 * inferences,
            latency_p95_weight=inferences,
        )
    rollout.refresh_from_db()
    return {"failed": failed, "active": active, "at": now}
