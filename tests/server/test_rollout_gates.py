"""The gates as the evaluator wires them, against the real database: arms made of this
rollout's own devices, variants compared like with like, evidence from the stage's start
by window time, one forging device against honest ones (both directions), the shadow stage,
a broken rollout beside a healthy one, and the one-sentence reasons.

Devices report here through the tables the ingest bridge writes (Device, DeviceEvent,
TelemetryWindow); tests/e2e/test_gate_attacks_e2e.py does the same with real agents and a
forging device on the real broker."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device, DeviceEvent, TelemetryWindow
from fleet.devices.services import devices_assign
from fleet.registry import services as registry
from fleet.rollouts import services
from fleet.rollouts.choices import AssignmentState, Decision, RolloutState
from fleet.rollouts.models import AuditEntry, GateEvaluation, RolloutPolicy
from tests.server.conftest import ready_artifact
from tests.server.telemetry_writer import ingest_window

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("broker_settings")]
DEVICES = 40
LABELS = 400  # labels per device and window


@pytest.fixture
def fleet(digits_model, digits, django_capture_on_commit_callbacks):
    """40 devices on 1.0.0, half int8 and half float32; 2.0.0 and 3.0.0 ready."""
    artifacts = {}
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        row = registry.version_create(model=digits_model, version=version)
        models = digits.build_digits_models(version=version)
        for variant in ("float32", "int8"):
            artifacts[(version, variant)] = ready_artifact(row, variant, models[variant])
    devices = [
        Device.objects.create(
            device_id=f"cam-{n:02d}", status=DeviceStatus.ACTIVE, supports_int8=n % 2 == 0, tags=["fleet"]
        )
        for n in range(DEVICES)
    ]
    for variant in ("int8", "float32"):
        group = [d for d in devices if d.supports_int8 == (variant == "int8")]
        with django_capture_on_commit_callbacks(execute=True):
            devices_assign(devices=group, artifacts={"digits": artifacts[("1.0.0", variant)]}, publish="now")
        for device in group:
            report(device, "1.0.0", variant)
    return {"artifacts": artifacts, "devices": devices, "model": digits_model}


def report(device: Device, version: str, variant: str, shadow: str | None = None) -> None:
    """What the bridge records from a device's ``reported`` message."""
    device.refresh_from_db()
    entry = {"version": version, "variant": variant}
    if shadow:
        entry["shadow"] = {"version": shadow, "variant": variant}
    Device.objects.filter(pk=device.pk).update(
        applied_generation=device.desired_generation, reported_models={"digits": entry}
    )


def window(device: Device, version: str, variant: str, *, accuracy: float = 1.0, start=None, **extra) -> None:
    """One telemetry window, stored by the ingest bridge's own writer (the device is the
    topic's), so that the hourly sums the gates read for whole hours have it too."""
    labeled = extra.pop("labeled", LABELS)
    shadow = None
    if "shadow_version" in extra:
        shadow = {
            "version": extra.pop("shadow_version"),
            "variant": extra.pop("shadow_variant"),
            "sampled": extra.pop("shadow_sampled"),
            "compared": extra.pop("shadow_compared"),
            "agreed": extra.pop("shadow_agreed"),
            "latency_ms": {"p50": 1.0, "p95": extra.pop("shadow_latency_p95_ms"), "p99": 2.0},
        }
    stored = ingest_window(
        device.device_id,
        start=start or timezone.now(),
        version=version,
        variant=variant,
        inferences=extra.pop("inferences", labeled),
        errors=extra.pop("errors", 0),
        latency_p95_ms=extra.pop("latency_p95_ms", 1.0),
        labeled=labeled,
        correct=extra.pop("correct", round(labeled * accuracy)),
        shadow=shadow,
    )
    assert not extra, extra
    assert stored == 1, "the bridge refused the window"


def policy(name: str = "canary", **changes) -> RolloutPolicy:
    values = {
        "stages": [{"kind": "percent", "value": 50, "soak_seconds": 0}, {"kind": "percent", "value": 100}],
        "gates": {
            "max_install_failure_rate": 0.2,
            "accuracy": {"min_samples": 200, "min_devices": 3, "max_drop_pp": 2, "confidence": 0.95},
        },
        "on_failure": "rollback",
    }
    return RolloutPolicy.objects.create(name=name, **{**values, **changes})


def start(fleet, version: str = "2.0.0", targets=None, **policy_changes):
    row = fleet["model"].versions.get(version=version)
    rollout = services.rollout_create(
        model=fleet["model"],
        version=row,
        targets=targets or {"tags": ["fleet"]},
        policy=policy(name=f"p-{uuid.uuid4().hex[:6]}", **policy_changes),
    )
    return services.rollout_start(rollout=rollout)


def arms(rollout):
    """(candidate assignments, incumbent assignments) after every notified device installed."""
    for assignment in rollout.assignments.filter(state=AssignmentState.NOTIFIED).select_related("device"):
        report(assignment.device, rollout.target_version.version, assignment.variant)
    services.assignments_sync(rollout=rollout)
    candidate = list(rollout.assignments.filter(state=AssignmentState.ACTIVE).select_related("device"))
    incumbent = list(rollout.assignments.filter(state=AssignmentState.PENDING).select_related("device"))
    return candidate, incumbent


def honest(
    candidate,
    incumbent,
    *,
    version: str,
    candidate_accuracy: float,
    incumbent_accuracy: float,
    labeled=LABELS,
):
    for assignment in candidate:
        window(assignment.device, version, assignment.variant, accuracy=candidate_accuracy, labeled=labeled)
    for assignment in incumbent:
        window(assignment.device, "1.0.0", assignment.variant, accuracy=incumbent_accuracy, labeled=labeled)


def latest(rollout, metric: str) -> list[GateEvaluation]:
    last = rollout.evaluations.order_by("-evaluated_at").first()
    return list(rollout.evaluations.filter(evaluated_at=last.evaluated_at, metric=metric))


def test_a_worse_candidate_is_rolled_back_variant_by_variant_with_a_sentence_that_says_why(fleet):
    rollout = start(fleet)
    candidate, incumbent = arms(rollout)
    honest(candidate, incumbent, version="2.0.0", candidate_accuracy=0.70, incumbent_accuracy=0.97)
    assert services.rollout_evaluate(rollout_id=rollout.pk) == Decision.ROLLBACK
    rollout.refresh_from_db()
    assert rollout.state == RolloutState.ROLLED_BACK
    accuracy = latest(rollout, "accuracy")
    assert {e.variant for e in accuracy} == {"int8", "float32"}  # like with like
    failing = [e for e in accuracy if e.verdict == "fail"]
    assert failing
    for evaluation in failing:
        variant = evaluation.variant
        assert evaluation.candidate_devices == sum(a.variant == variant for a in candidate)
        assert evaluation.incumbent_devices == sum(a.variant == variant for a in incumbent)
        assert evaluation.candidate_value == pytest.approx(0.70, abs=0.01)
        assert evaluation.lower is not None and evaluation.method and evaluation.looks == 1
        assert evaluation.inputs and evaluation.summary
    reason = AuditEntry.objects.get(rollout=rollout, action="rollback").reason
    assert reason.startswith("Rolled back at stage 1 by the accuracy gate")
    assert "%" in reason and "pp" in reason
    assert not re.search(r"\d\.\d{3,}", reason)  # figures are rounded for people
    assert rollout.last_decision == reason


def test_devices_outside_the_rollout_do_not_count(fleet):
    """Telemetry of the same versions from devices this rollout does not target is ignored."""
    targets = {"devices": [d.device_id for d in fleet["devices"][:20]]}
    outsiders = fleet["devices"][20:]
    rollout = start(fleet, targets=targets)
    candidate, incumbent = arms(rollout)
    honest(candidate, incumbent, version="2.0.0", candidate_accuracy=0.97, incumbent_accuracy=0.97)
    for device in outsiders:  # a flood of bad 2.0.0 evidence from devices of no arm
        window(device, "2.0.0", "int8" if device.supports_int8 else "float32", accuracy=0.1, labeled=5000)
    services.rollout_evaluate(rollout_id=rollout.pk)
    for evaluation in latest(rollout, "accuracy"):
        assert evaluation.verdict != "fail"
        assert evaluation.candidate_n <= LABELS * len(candidate)


def test_evidence_starts_exactly_at_the_stage_start_so_two_rollouts_back_to_back_do_not_leak(fleet):
    """The second rollout's incumbents looked terrible one second before it started (the
    first rollout's last windows): none of that may count in its first evaluation."""
    first = start(fleet, stages=[{"kind": "percent", "value": 100}], gates={})
    arms(first)
    assert services.rollout_evaluate(rollout_id=first.pk) == Decision.COMPLETE
    second = start(fleet, version="3.0.0")
    before = second.stage_started_at - timedelta(seconds=1)
    for device in fleet["devices"]:
        variant = "int8" if device.supports_int8 else "float32"
        window(device, "2.0.0", variant, accuracy=0.0, labeled=5000, start=before)
    candidate, incumbent = arms(second)
    for assignment in candidate:
        window(assignment.device, "3.0.0", assignment.variant, accuracy=0.70, start=second.stage_started_at)
    for assignment in incumbent:
        window(assignment.device, "2.0.0", assignment.variant, accuracy=0.97, start=second.stage_started_at)
    assert services.rollout_evaluate(rollout_id=second.pk) == Decision.ROLLBACK
    for evaluation in latest(second, "accuracy"):
        assert evaluation.incumbent_value == pytest.approx(0.97, abs=0.01)


def test_one_forging_device_cannot_pass_a_worse_candidate(fleet):
    rollout = start(fleet)
    candidate, incumbent = arms(rollout)
    honest(candidate, incumbent, version="2.0.0", candidate_accuracy=0.70, incumbent_accuracy=0.97)
    forger = candidate[0]
    for _ in range(2):  # the attack as tried: two windows claiming a million perfect labels
        window(forger.device, "2.0.0", forger.variant, labeled=1_000_000, correct=1_000_000)
    assert services.rollout_evaluate(rollout_id=rollout.pk) == Decision.ROLLBACK
    forged = next(e for e in latest(rollout, "accuracy") if e.variant == forger.variant)
    assert forged.verdict == "fail", forged.summary
    # The attack reached the store: the gate read it and was not moved by it.
    assert TelemetryWindow.objects.filter(device=forger.device, labeled=1_000_000).count() == 2


def test_one_forging_device_cannot_roll_back_a_good_candidate(fleet):
    """It claims a million wrong labels, a million errors and an install failure; the
    gates are strict enough that any of these, taken at face value, would fail them."""
    rollout = start(
        fleet,
        gates={
            "max_install_failure_rate": 0.0,
            "max_error_rate": 0.01,
            "min_inferences": 100,
            "accuracy": {"min_samples": 200, "min_devices": 3, "max_drop_pp": 2, "confidence": 0.95},
        },
    )
    liar = rollout.assignments.filter(state=AssignmentState.NOTIFIED).select_related("device").first()
    DeviceEvent.objects.create(
        device=liar.device,
        message_id="forged",
        type="failed",
        generation=liar.generation,
        reason="golden_failed",
        ts=timezone.now(),
        received_at=timezone.now(),
    )
    candidate, incumbent = arms(rollout)
    assert liar.device_id not in {a.device_id for a in candidate}  # it counts as a failed install
    honest(candidate, incumbent, version="2.0.0", candidate_accuracy=0.97, incumbent_accuracy=0.97)
    forger = candidate[0]
    for _ in range(2):
        window(forger.device, "2.0.0", forger.variant, labeled=1_000_000, correct=0, errors=1_000_000)
    # The honest evidence is enough to pass, and the forger neither fails the gates nor
    # holds them: the rollout is promoted.
    decision = services.rollout_evaluate(rollout_id=rollout.pk)
    assert decision == Decision.PROMOTE, [e.summary for e in rollout.evaluations.all()]
    rollout.refresh_from_db()
    assert rollout.current_stage == 1


def test_an_incumbent_forger_cannot_raise_the_bar_for_a_good_candidate(fleet):
    rollout = start(fleet)
    candidate, incumbent = arms(rollout)
    # Enough honest labels to pass with the forger's (capped) claim counted or set aside.
    honest(
        candidate, incumbent, version="2.0.0", candidate_accuracy=0.96, incumbent_accuracy=0.96, labeled=2000
    )
    forger = incumbent[0]
    window(forger.device, "1.0.0", forger.variant, labeled=1_000_000, correct=1_000_000)
    decision = services.rollout_evaluate(rollout_id=rollout.pk)
    assert decision == Decision.PROMOTE, [e.summary for e in latest(rollout, "accuracy")]


def test_too_few_devices_make_the_gate_wait_and_say_so(fleet):
    rollout = start(fleet)
    candidate, incumbent = arms(rollout)
    honest(candidate[:1], incumbent[:1], version="2.0.0", candidate_accuracy=0.5, incumbent_accuracy=1.0)
    assert services.rollout_evaluate(rollout_id=rollout.pk) == Decision.WAIT
    rollout.refresh_from_db()
    assert rollout.last_decision.startswith("Waiting at stage 1 for the accuracy")


def test_a_broken_rollout_does_not_stop_the_evaluation_of_the_others(fleet):
    devices = [d.device_id for d in fleet["devices"]]
    healthy = start(fleet, targets={"devices": devices[:20]}, gates={})
    broken = start(fleet, version="3.0.0", targets={"devices": devices[20:]}, gates={})
    type(broken).objects.filter(pk=broken.pk).update(
        policy_snapshot={**broken.policy_snapshot, "gates": {"accuracy": "not an object"}}
    )
    arms(healthy)
    decisions = services.evaluate_running()
    assert decisions[broken.pk] == Decision.ERROR
    assert decisions[healthy.pk] == Decision.PROMOTE
    error = GateEvaluation.objects.get(rollout=broken, metric="evaluator")
    assert error.verdict == "error" and error.summary.startswith("Evaluation failed at stage 1")
    broken.refresh_from_db()
    assert broken.state == RolloutState.RUNNING and broken.last_decision == error.summary


# --- shadow stage

SHADOW_STAGES = [
    {"kind": "percent", "value": 50, "mode": "shadow", "sample_rate": 0.5},
    {"kind": "percent", "value": 100},
]
SHADOW_GATES = {
    "max_install_failure_rate": 0.2,
    "shadow": {"min_agreement": 0.9, "min_samples": 200, "min_devices": 3, "max_latency_p95_ratio": 3},
}


def shadowing(rollout, *, agreement: float):
    """Every notified device loads the candidate in shadow and reports agreement."""
    target = rollout.target_version.version
    for assignment in rollout.assignments.filter(state=AssignmentState.NOTIFIED).select_related("device"):
        report(assignment.device, "1.0.0", assignment.variant, shadow=target)
        window(
            assignment.device,
            "1.0.0",
            assignment.variant,
            shadow_version=target,
            shadow_variant=assignment.variant,
            shadow_sampled=LABELS,
            shadow_compared=LABELS,
            shadow_agreed=round(LABELS * agreement),
            shadow_latency_p95_ms=1.5,
        )
    services.assignments_sync(rollout=rollout)
    return list(rollout.assignments.filter(state=AssignmentState.SHADOW).select_related("device"))


def test_a_shadow_stage_names_the_candidate_as_a_shadow_and_never_as_the_live_model(fleet):
    rollout = start(fleet, stages=SHADOW_STAGES, gates=SHADOW_GATES)
    notified = list(rollout.assignments.filter(state=AssignmentState.NOTIFIED).select_related("device"))
    assert len(notified) == DEVICES // 2
    for assignment in notified:
        device = assignment.device
        device.refresh_from_db()
        assert device.desired_artifacts["digits"] == assignment.from_artifact_id  # live unchanged
        assert device.desired_shadows["digits"] == {"artifact": assignment.to_artifact_id, "sample_rate": 0.5}


def test_a_candidate_that_disagrees_with_the_live_model_stops_in_shadow(fleet):
    rollout = start(fleet, version="3.0.0", stages=SHADOW_STAGES, gates=SHADOW_GATES)
    shadows = shadowing(rollout, agreement=0.6)
    assert len(shadows) == DEVICES // 2
    assert services.rollout_evaluate(rollout_id=rollout.pk) == Decision.ROLLBACK
    rollout.refresh_from_db()
    assert rollout.last_decision.startswith("Rolled back at stage 1 by the shadow agreement gate")
    for assignment in shadows:
        device = assignment.device
        device.refresh_from_db()
        assert device.desired_shadows == {}  # the shadow ends …
        assert device.desired_artifacts["digits"] == assignment.from_artifact_id  # … and nobody served it
        assert device.desired_generation == assignment.generation + 1


def test_a_candidate_that_agrees_goes_live_after_its_shadow_stage(fleet):
    rollout = start(fleet, stages=SHADOW_STAGES, gates=SHADOW_GATES)
    shadows = shadowing(rollout, agreement=0.99)
    assert services.rollout_evaluate(rollout_id=rollout.pk) == Decision.PROMOTE
    for assignment in shadows:
        device = assignment.device
        device.refresh_from_db()
        assert device.desired_shadows == {}
        assert device.desired_artifacts["digits"] == assignment.to_artifact_id
    agreement = latest(rollout, "shadow_agreement")[0]
    assert agreement.verdict == "pass" and agreement.candidate_devices == DEVICES // 2


# --- policy documents


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        (
            {"stages": [{"kind": "percent", "value": 10}, {"kind": "percent", "value": 150}]},
            "invalid_stages",
            "stages[1].value",
        ),
        ({"stages": [{"kind": "share", "value": 10}]}, "invalid_stages", "stages[0].kind"),
        (
            {"stages": [{"kind": "percent", "value": 10, "mode": "shadow"}]},
            "invalid_stages",
            "stages[0].mode",
        ),
        ({"gates": {"accuracy": {"confidence": 2}}}, "invalid_gates", "gates.accuracy.confidence"),
        ({"gates": {"max_eror_rate": 0.1}}, "invalid_gates", "gates.max_eror_rate"),
        ({"gates": {"shadow": {"min_agreement": "high"}}}, "invalid_gates", "gates.shadow.min_agreement"),
    ],
)
def test_a_bad_policy_is_refused_with_the_field_at_fault(alice, body, code, field):
    response = alice.client().post("/api/v1/rollout-policies/", {"name": "bad", **body}, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["field"]) == (code, field)
    assert not RolloutPolicy.objects.filter(name="bad").exists()


def test_the_admin_refuses_a_bad_policy_on_its_field(ada):
    from django.test import Client

    client = Client()
    client.force_login(ada.user)
    form = {
        "name": "bad",
        "description": "",
        "stages": '[{"kind": "percent", "value": 10, "mode": "shadow"}]',
        "gates": '{"accuracy": {"confidence": 2}}',
        "on_failure": "rollback",
        "approval": "automatic",
        "window_start": "",
        "window_end": "",
        "pickup_timeout_seconds": "900",
    }
    page = client.post("/admin/rollouts/rolloutpolicy/add/", form)
    assert page.status_code == 200  # the form again, with the error on the field
    assert "The last stage must be live" in page.content.decode()
    assert not RolloutPolicy.objects.filter(name="bad").exists()
    # Positive control: the same form with valid documents saves.
    form.update(stages='[{"kind": "percent", "value": 100}]', gates='{"max_install_failure_rate": 0.1}')
    assert client.post("/admin/rollouts/rolloutpolicy/add/", form).status_code == 302
    assert RolloutPolicy.objects.filter(name="bad").exists()


def test_incumbents_are_compared_by_the_variant_they_run(fleet, django_capture_on_commit_callbacks):
    """1.0.0 went to every device as float32 (it had no int8 then); 2.0.0 gives int8 to the
    int8-capable ones. Its int8 canaries are compared with the float32 incumbents? No: like
    with like. The int8 candidates have no int8 incumbent, so int8 is not compared (and says
    so); float32 canaries are compared with the float32 incumbents, int8-capable ones included."""
    devices = fleet["devices"]
    with django_capture_on_commit_callbacks(execute=True):
        devices_assign(
            devices=devices, artifacts={"digits": fleet["artifacts"][("1.0.0", "float32")]}, publish="now"
        )
    for device in devices:
        report(device, "1.0.0", "float32")
    rollout = start(fleet)
    candidate, incumbent = arms(rollout)
    for assignment in candidate:
        window(assignment.device, "2.0.0", assignment.variant, accuracy=0.70)
    for assignment in incumbent:
        window(assignment.device, "1.0.0", "float32", accuracy=0.97)
    assert services.rollout_evaluate(rollout_id=rollout.pk) == Decision.ROLLBACK
    accuracy = {e.variant: e for e in latest(rollout, "accuracy")}
    assert accuracy["int8"].verdict == "skipped"
    assert accuracy["int8"].summary.endswith("no device of this rollout still runs the incumbent as int8")
    assert accuracy["float32"].verdict == "fail"
    assert accuracy["float32"].incumbent_devices == len(incumbent)  # int8-capable ones included


def disable(device: Device) -> None:
    """What device_disable records (its broker side is tested in tests/server/test_enrollment.py)."""
    Device.objects.filter(pk=device.pk).update(status=DeviceStatus.DISABLED)


def test_a_disabled_device_does_not_wedge_promotion_or_rollback(fleet):
    rollout = start(fleet, gates={})
    pending = rollout.assignments.filter(state=AssignmentState.PENDING).select_related("device").first()
    disable(pending.device)
    arms(rollout)
    assert services.rollout_evaluate(rollout_id=rollout.pk) == Decision.PROMOTE, rollout.last_decision
    pending.refresh_from_db()
    assert (pending.state, pending.reason) == (AssignmentState.SKIPPED, "device is disabled")
    active = rollout.assignments.filter(state=AssignmentState.NOTIFIED).select_related("device").first()
    disable(active.device)
    rollout = services.rollout_rollback(rollout=rollout, reason="test")
    assert rollout.state == RolloutState.ROLLED_BACK


def test_devices_still_installing_the_shadow_go_live_at_the_next_stage(fleet):
    rollout = start(fleet, stages=SHADOW_STAGES, gates={"shadow": None})
    notified = list(rollout.assignments.filter(state=AssignmentState.NOTIFIED).select_related("device"))
    straggler = notified[0]  # never confirms its shadow
    for assignment in notified[1:]:
        report(assignment.device, "1.0.0", assignment.variant, shadow="2.0.0")
    services.assignments_sync(rollout=rollout)
    later = timezone.now() + timedelta(seconds=1000)  # past the pick-up timeout
    decision = services.rollout_evaluate(rollout_id=rollout.pk, now=later)
    assert decision == Decision.PROMOTE, rollout.evaluations.first().summary
    straggler.refresh_from_db()
    device = straggler.device
    device.refresh_from_db()
    assert straggler.state == AssignmentState.NOTIFIED and straggler.stage == 1
    assert device.desired_shadows == {} and device.desired_artifacts["digits"] == straggler.to_artifact_id
