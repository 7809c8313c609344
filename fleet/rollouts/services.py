"""Rollout writes: create, start, the stage machine, gate evaluation and every action.

One service per action, shared by the API, the admin and the evaluator (STYLE.md): the
admin's "pause" button, the API's pause and a failing gate all call ``rollout_pause``.
State changes are compare-and-set updates over ROLLOUT_TRANSITIONS; a promotion also
checks the stage it promotes from, so two evaluators (or an evaluator and an operator)
can never promote twice.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction
from django.db.models import Q, QuerySet, Sum
from django.utils import timezone

from fleet.core.errors import Conflict, InvalidInput
from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device, DeviceEvent, DeviceGroup, TelemetryRollup
from fleet.devices.selectors import group_devices
from fleet.devices.services import devices_assign
from fleet.registry.choices import ArtifactStatus, VersionStatus
from fleet.registry.models import Artifact, MLModel, ModelVersion
from fleet.rollouts import stats
from fleet.rollouts.choices import (
    ACTIVE_STATES,
    EVENT_STATES,
    IN_FLIGHT,
    ROLLOUT_TRANSITIONS,
    Approval,
    AssignmentState,
    Decision,
    OnFailure,
    RolloutState,
)
from fleet.rollouts.cohort import choose_variant, cohort_key, stage_size
from fleet.rollouts.models import Assignment, AuditEntry, GateEvaluation, Rollout, RolloutPolicy

log = logging.getLogger(__name__)
TARGET_KEYS = ("groups", "tags", "devices")


# --- policies


def policy_validate(*, stages: list[dict], gates: dict) -> None:
    if not isinstance(stages, list) or not stages:
        raise InvalidInput("A policy needs at least one stage.", code="invalid_stages", field="stages")
    for number, stage in enumerate(stages):
        if not isinstance(stage, dict) or stage.get("kind") not in ("percent", "count"):
            raise InvalidInput(
                f"Stage {number}: kind must be 'percent' or 'count'.", code="invalid_stages", field="stages"
            )
        value = stage.get("value")
        if not isinstance(value, (int, float)) or value <= 0 or (stage["kind"] == "percent" and value > 100):
            raise InvalidInput(
                f"Stage {number}: value must be a positive number (percent at most 100).",
                code="invalid_stages",
                field="stages",
            )
    if not isinstance(gates, dict):
        raise InvalidInput("gates must be an object.", code="invalid_gates", field="gates")
    accuracy = gates.get("accuracy")
    if accuracy is not None and not (0.5 <= float(accuracy.get("confidence", 0.95)) < 1):
        raise InvalidInput(
            "gates.accuracy.confidence must be in [0.5, 1).", code="invalid_gates", field="gates"
        )


# --- targets and eligibility


def target_devices(*, targets: dict[str, list[str]]) -> QuerySet[Device]:
    """Active devices in any of the groups, with any of the tags, or named explicitly."""
    query = Q(pk__in=[])
    for name in targets.get("groups", []):
        group = DeviceGroup.objects.filter(name=name).first()
        if group is not None:
            query |= Q(pk__in=group_devices(group=group).values("pk"))
    for tag in targets.get("tags", []):
        query |= Q(tags__contains=[tag])
    if targets.get("devices"):
        query |= Q(device_id__in=targets["devices"])
    return Device.objects.filter(query, status=DeviceStatus.ACTIVE).distinct()


def _ready_artifacts(version: ModelVersion) -> dict[str, Artifact]:
    return {a.variant: a for a in version.artifacts.filter(status=ArtifactStatus.READY)}


# --- create and start


def rollout_create(
    *,
    model: MLModel,
    version: ModelVersion,
    targets: dict[str, list[str]],
    policy: RolloutPolicy,
    priority: int = 0,
    created_by: AbstractBaseUser | None = None,
) -> Rollout:
    if version.model_id != model.pk:
        raise InvalidInput(f"{version} is not a version of {model}.", code="wrong_model", field="version")
    if version.status == VersionStatus.REVOKED:
        raise Conflict(f"{version} is revoked; it cannot be rolled out.", code="version_revoked")
    if not _ready_artifacts(version):
        raise Conflict(f"{version} has no ready artifact.", code="no_artifacts")
    unknown = sorted(set(targets) - set(TARGET_KEYS))
    if unknown or not any(targets.get(key) for key in TARGET_KEYS):
        raise InvalidInput(
            "targets needs groups, tags or devices (lists).", code="invalid_targets", field="targets"
        )
    if not target_devices(targets=targets).exists():
        raise InvalidInput("The targets match no active device.", code="no_devices", field="targets")
    return Rollout.objects.create(
        model=model,
        target_version=version,
        targets=targets,
        policy=policy,
        priority=priority,
        created_by=created_by,
    )


def _transition(
    rollout: Rollout, to_state: str, *, action: str, by: AbstractBaseUser | None, reason: str, **changes: Any
) -> Rollout:
    """Compare-and-set the state along ROLLOUT_TRANSITIONS and write the audit entry."""
    if to_state not in ROLLOUT_TRANSITIONS[rollout.state]:
        raise Conflict(
            f"Rollout {rollout.pk} is {rollout.state}; it cannot {action}"
            + (
                f" (it may become: {', '.join(ROLLOUT_TRANSITIONS[rollout.state])})."
                if ROLLOUT_TRANSITIONS[rollout.state]
                else "; it is finished."
            ),
            code="illegal_transition",
        )
    updated = Rollout.objects.filter(
        pk=rollout.pk, state=rollout.state, current_stage=rollout.current_stage
    ).update(state=to_state, **changes)
    if not updated:
        raise Conflict(
            f"Rollout {rollout.pk} changed meanwhile; reload and try again.", code="concurrent_change"
        )
    AuditEntry.objects.create(
        rollout=rollout,
        actor=by,
        action=action,
        from_state=rollout.state,
        to_state=to_state,
        stage=changes.get("current_stage", rollout.current_stage),
        reason=reason,
    )
    rollout.refresh_from_db()
    return rollout


def _overlapping(rollout: Rollout, devices: list[Device]) -> list[str]:
    """Devices already in another active rollout of the same model (one per model and device)."""
    return sorted(
        Assignment.objects.filter(
            rollout__model=rollout.model, rollout__state__in=ACTIVE_STATES, device__in=devices
        )
        .exclude(rollout=rollout)
        .exclude(state=AssignmentState.SKIPPED)
        .values_list("device__device_id", flat=True)
    )


@transaction.atomic
def rollout_start(*, rollout: Rollout, by: AbstractBaseUser | None = None, reason: str = "") -> Rollout:
    """Copy the policy, place every targeted device by its stable hash, skip (with a reason)
    those that can run no variant, and start stage 0.

    Overlap rule: a device may be in one active rollout per model. Starting a rollout that
    would take a device from another active rollout of the same model is refused (409);
    the operator finishes, aborts or narrows the other one first.
    """
    rollout = Rollout.objects.select_for_update().get(pk=rollout.pk)
    devices = list(target_devices(targets=rollout.targets))
    clash = _overlapping(rollout, devices)
    if clash:
        raise Conflict(
            f"{len(clash)} device(s) are in another active rollout of {rollout.model}: "
            f"{', '.join(clash[:10])}.",
            code="overlap",
        )
    rollout = _transition(
        rollout,
        RolloutState.RUNNING,
        action="start",
        by=by,
        reason=reason,
        policy_snapshot=rollout.policy.snapshot(),
        started_at=timezone.now(),
    )
    _place(rollout, devices)
    return _enter_stage(rollout, 0)


def _placement(rollout: Rollout, device: Device, available: dict[str, Artifact]) -> Assignment:
    variant, why = choose_variant(
        supports_int8=device.supports_int8, hardware=device.hardware, available=set(available)
    )
    return Assignment(
        rollout=rollout,
        device=device,
        cohort_key=cohort_key(rollout.pk, device.device_id) >> 1,
        variant=variant or "",
        to_artifact=available.get(variant) if variant else None,
        state=AssignmentState.PENDING if variant else AssignmentState.SKIPPED,
        reason=why,
    )


def _place(rollout: Rollout, devices: list[Device]) -> None:
    available = _ready_artifacts(rollout.target_version)
    Assignment.objects.bulk_create(
        [_placement(rollout, device, available) for device in devices], batch_size=2000
    )


def place_new_devices(*, rollout: Rollout) -> int:
    """Devices that enrolled or joined a target group while the rollout runs get their
    place by the same hash (they join the current stage if the hash puts them there)."""
    known = rollout.assignments.values("device")
    new = [d for d in target_devices(targets=rollout.targets).exclude(pk__in=known)]
    new = [d for d in new if not _overlapping(rollout, [d])]
    _place(rollout, new)
    return len(new)


def _enter_stage(rollout: Rollout, stage: int) -> Rollout:
    """Cover the first stage_size(stage) eligible devices in cohort order; notify those not
    yet notified by giving them a new desired generation (published after commit)."""
    spec = rollout.stages[stage]
    eligible = rollout.assignments.exclude(state=AssignmentState.SKIPPED).order_by("cohort_key")
    size = stage_size(
        kind=spec["kind"],
        value=spec["value"],
        min_devices=spec.get("min_devices", 1),
        eligible=eligible.count(),
    )
    covered = eligible.values_list("pk", "device_id", "to_artifact_id", "state")[:size]
    to_notify = [
        (pk, device_id, artifact_id)
        for pk, device_id, artifact_id, state in covered
        if state == AssignmentState.PENDING
    ]
    model = rollout.model.name
    ids = [pk for pk, _, _ in to_notify]
    now = timezone.now()
    with connection.cursor() as cursor:
        # What each device ran before (for a rollback), from its own row, for all at once.
        cursor.execute(
            "UPDATE rollouts_assignment AS a SET"
            " from_version = COALESCE(d.reported_models -> %s ->> 'version', ''),"
            " from_artifact_id = NULLIF((d.desired_artifacts ->> %s)::bigint, a.to_artifact_id)"
            " FROM devices_device AS d WHERE a.device_id = d.id AND a.id = ANY(%s)",
            [model, model, ids],
        )
    by_artifact: dict[int, list[int]] = defaultdict(list)
    for _, device_id, artifact_id in to_notify:
        by_artifact[artifact_id].append(device_id)
    for artifact_id, device_ids in by_artifact.items():
        devices_assign(
            devices=[Device(pk=pk) for pk in device_ids],
            artifacts={model: Artifact.objects.get(pk=artifact_id)},
            rollout={"id": rollout.pk, "stage": stage},
        )
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE rollouts_assignment AS a SET generation = d.desired_generation, stage = %s, state = %s,"
            " notified_at = %s FROM devices_device AS d WHERE a.device_id = d.id AND a.id = ANY(%s)",
            [stage, AssignmentState.NOTIFIED, now, ids],
        )
    Rollout.objects.filter(pk=rollout.pk).update(
        current_stage=stage, stage_started_at=now, awaiting_approval=False
    )
    rollout.refresh_from_db()
    return rollout


# --- actions


def rollout_pause(*, rollout: Rollout, by: AbstractBaseUser | None = None, reason: str = "") -> Rollout:
    return _transition(rollout, RolloutState.PAUSED, action="pause", by=by, reason=reason)


def rollout_resume(*, rollout: Rollout, by: AbstractBaseUser | None = None, reason: str = "") -> Rollout:
    return _transition(rollout, RolloutState.RUNNING, action="resume", by=by, reason=reason)


def rollout_abort(*, rollout: Rollout, by: AbstractBaseUser | None = None, reason: str = "") -> Rollout:
    """Stop here: devices keep what they run now; nothing new is sent."""
    return _transition(
        rollout, RolloutState.ABORTED, action="abort", by=by, reason=reason, finished_at=timezone.now()
    )


@transaction.atomic
def rollout_promote(*, rollout: Rollout, by: AbstractBaseUser | None = None, reason: str = "") -> Rollout:
    """Start the next stage, or complete after the last one."""
    rollout = Rollout.objects.select_for_update().get(pk=rollout.pk)
    if rollout.state != RolloutState.RUNNING:
        raise Conflict(
            f"Rollout {rollout.pk} is {rollout.state}; only a running rollout is promoted.",
            code="illegal_transition",
        )
    following = rollout.current_stage + 1
    if following >= len(rollout.stages):
        return _transition(
            rollout,
            RolloutState.COMPLETED,
            action="complete",
            by=by,
            reason=reason,
            finished_at=timezone.now(),
        )
    updated = Rollout.objects.filter(
        pk=rollout.pk, state=RolloutState.RUNNING, current_stage=rollout.current_stage
    ).update(current_stage=following)
    if not updated:
        raise Conflict(f"Rollout {rollout.pk} changed meanwhile.", code="concurrent_change")
    AuditEntry.objects.create(
        rollout=rollout,
        actor=by,
        action="promote",
        from_state=rollout.state,
        to_state=rollout.state,
        stage=following,
        reason=reason,
    )
    rollout.refresh_from_db()
    return _enter_stage(rollout, following)


@transaction.atomic
def rollout_rollback(*, rollout: Rollout, by: AbstractBaseUser | None = None, reason: str = "") -> Rollout:
    """Every device this rollout touched gets a new, higher generation naming the version
    it ran before (the agent keeps it on disk, so this is an instant revert)."""
    rollout = Rollout.objects.select_for_update().get(pk=rollout.pk)
    rollout = _transition(
        rollout, RolloutState.ROLLED_BACK, action="rollback", by=by, reason=reason, finished_at=timezone.now()
    )
    touched = rollout.assignments.filter(
        state__in=(*IN_FLIGHT, AssignmentState.ACTIVE, AssignmentState.FAILED)
    ).select_related("device", "from_artifact")
    by_artifact: dict[int, list[Assignment]] = defaultdict(list)
    for assignment in touched:
        if assignment.from_artifact_id:
            by_artifact[assignment.from_artifact_id].append(assignment)
    for group in by_artifact.values():
        devices_assign(
            devices=[a.device for a in group],
            artifacts={rollout.model.name: group[0].from_artifact},
            rollout={"id": rollout.pk, "stage": rollout.current_stage},
        )
    touched.update(state=AssignmentState.ROLLED_BACK)
    return rollout


# --- following devices


def assignments_sync(*, rollout: Rollout) -> None:
    """Move assignments along with what devices report: their events for the assignment's
    generation, and the generation they applied."""
    in_flight = list(rollout.assignments.filter(state__in=IN_FLIGHT).select_related("device"))
    if not in_flight:
        return
    events = DeviceEvent.objects.filter(
        device__in=[a.device_id for a in in_flight], generation__in={a.generation for a in in_flight}
    ).order_by("received_at")
    latest: dict[tuple[int, int], DeviceEvent] = {}
    for event in events:
        if event.type in EVENT_STATES:
            latest[(event.device_id, event.generation)] = event
    for assignment in in_flight:
        state, reason = assignment.state, assignment.reason
        event = latest.get((assignment.device_id, assignment.generation))
        if event is not None:
            state = EVENT_STATES[event.type]
            reason = event.reason or reason
        if assignment.device.applied_generation >= (assignment.generation or 0) and state not in (
            AssignmentState.FAILED,
        ):
            reported = assignment.device.reported_models.get(rollout.model.name) or {}
            if reported.get("version") == rollout.target_version.version:
                state = AssignmentState.ACTIVE
        if (state, reason) != (assignment.state, assignment.reason):
            Assignment.objects.filter(pk=assignment.pk, state=assignment.state).update(
                state=state, reason=reason
            )


# --- gates


def _window(model: str, version: str, since: datetime) -> dict[str, float]:
    rows = TelemetryRollup.objects.filter(
        model=model, version=version, minute__gte=since.replace(second=0, microsecond=0)
    )
    sums = rows.aggregate(
        inferences=Sum("inferences"),
        errors=Sum("errors"),
        labeled=Sum("labeled"),
        correct=Sum("correct"),
        p95=Sum("latency_p95_weighted_sum"),
    )
    return {key: value or 0 for key, value in sums.items()}


def _gates(rollout: Rollout) -> list[stats.Evaluation]:
    policy = rollout.policy_snapshot
    gates = policy["gates"]
    counted = rollout.assignments.filter(stage__isnull=False, stage__lte=rollout.current_stage)
    states = Counter(counted.values_list("state", flat=True))
    installed = states[AssignmentState.ACTIVE] + states[AssignmentState.FAILED]
    results = [
        stats.rate_gate(
            metric="install_failure_rate",
            failures=states[AssignmentState.FAILED],
            total=installed,
            max_rate=gates.get("max_install_failure_rate", 1.0),
        )
    ]
    model, candidate_version = rollout.model.name, rollout.target_version.version
    incumbent_versions = Counter(v for v in counted.values_list("from_version", flat=True) if v)
    since = rollout.stage_started_at or rollout.started_at
    candidate = _window(model, candidate_version, since)
    min_inferences = gates.get("min_inferences", 100)
    if gates.get("max_error_rate") is not None:
        results.append(
            stats.rate_gate(
                metric="error_rate",
                failures=int(candidate["errors"]),
                total=int(candidate["inferences"]),
                max_rate=gates["max_error_rate"],
                min_total=min_inferences,
            )
        )
    if incumbent_versions:
        incumbent = _window(model, incumbent_versions.most_common(1)[0][0], since)
        if gates.get("max_latency_p95_ratio") is not None:
            results.append(
                stats.latency_gate(
                    candidate_p95_ms=candidate["p95"] / candidate["inferences"]
                    if candidate["inferences"]
                    else None,
                    incumbent_p95_ms=incumbent["p95"] / incumbent["inferences"]
                    if incumbent["inferences"]
                    else None,
                    candidate_n=int(candidate["inferences"]),
                    incumbent_n=int(incumbent["inferences"]),
                    max_ratio=gates["max_latency_p95_ratio"],
                    min_inferences=min_inferences,
                )
            )
        if gates.get("accuracy"):
            accuracy = gates["accuracy"]
            results.append(
                stats.accuracy_gate(
                    candidate_labeled=int(candidate["labeled"]),
                    candidate_correct=int(candidate["correct"]),
                    incumbent_labeled=int(incumbent["labeled"]),
                    incumbent_correct=int(incumbent["correct"]),
                    max_drop_pp=accuracy.get("max_drop_pp", 2.0),
                    confidence=accuracy.get("confidence", 0.95),
                    min_samples=accuracy.get("min_samples", 100),
                )
            )
    return results


def _stage_settled(rollout: Rollout, now: datetime) -> tuple[bool, str]:
    """Soak elapsed, and every device of the stage installed, failed, or timed out."""
    spec = rollout.stages[rollout.current_stage]
    soak = timedelta(seconds=spec.get("soak_seconds", 0))
    if now - rollout.stage_started_at < soak:
        return False, f"soaking until {(rollout.stage_started_at + soak).isoformat()}"
    timeout = timedelta(seconds=rollout.policy_snapshot.get("pickup_timeout_seconds", 900))
    waiting = rollout.assignments.filter(state__in=IN_FLIGHT, notified_at__gt=now - timeout).count()
    if waiting:
        return False, f"{waiting} device(s) still installing"
    return True, ""


def _in_window(window: dict | None, now: datetime) -> bool:
    if not window:
        return True
    start, end = (datetime.strptime(window[key], "%H:%M").time() for key in ("start", "end"))
    current = now.astimezone(UTC).time()
    return start <= current < end if start <= end else current >= start or current < end


def rollout_evaluate(*, rollout_id: int, now: datetime | None = None) -> str:
    """Evaluate a running rollout's gates, store every evaluation, and act on the decision."""
    now = now or timezone.now()
    with transaction.atomic():
        # Evaluators of the same rollout take turns; a busy one is skipped, not waited for.
        rollout = Rollout.objects.select_for_update(skip_locked=True).filter(pk=rollout_id).first()
        if rollout is None or rollout.state != RolloutState.RUNNING:
            return Decision.WAIT
        place_new_devices(rollout=rollout)
        assignments_sync(rollout=rollout)
        results = _gates(rollout)
        failed = [r for r in results if r.verdict == stats.FAIL]
        settled, why = _stage_settled(rollout, now)
        if failed:
            decision = (
                Decision.ROLLBACK
                if rollout.policy_snapshot["on_failure"] == OnFailure.ROLLBACK
                else (Decision.PAUSE)
            )
        elif not settled or any(r.verdict == stats.WAIT for r in results):
            decision = Decision.WAIT
        elif rollout.current_stage + 1 >= len(rollout.stages):
            decision = Decision.COMPLETE
        elif not _in_window(rollout.policy_snapshot.get("maintenance_window"), now):
            decision, why = Decision.WAIT, "outside the maintenance window"
        elif rollout.policy_snapshot["approval"] == Approval.MANUAL:
            decision = Decision.AWAIT_APPROVAL
        else:
            decision = Decision.PROMOTE
        GateEvaluation.objects.bulk_create(
            [
                GateEvaluation(
                    rollout=rollout,
                    stage=rollout.current_stage,
                    metric=r.metric,
                    verdict=r.verdict,
                    candidate_value=r.candidate,
                    incumbent_value=r.incumbent,
                    candidate_n=r.candidate_n,
                    incumbent_n=r.incumbent_n,
                    threshold=r.threshold,
                    p_value=r.p_value,
                    bound=r.bound,
                    note=(r.note or why)[:200],
                    decision=decision,
                )
                for r in results
            ]
        )
        reason = (
            "; ".join(
                f"{r.metric} {r.verdict} ({r.candidate} vs {r.incumbent}, p={r.p_value})" for r in failed
            )
            or why
        )
        if decision == Decision.ROLLBACK:
            rollout_rollback(rollout=rollout, reason=f"gate failed: {reason}")
        elif decision == Decision.PAUSE:
            rollout_pause(rollout=rollout, reason=f"gate failed: {reason}")
        elif decision in (Decision.PROMOTE, Decision.COMPLETE):
            rollout_promote(rollout=rollout, reason="gates passed")
        elif decision == Decision.AWAIT_APPROVAL:
            Rollout.objects.filter(pk=rollout.pk).update(awaiting_approval=True)
    return decision


def evaluate_running() -> dict[int, str]:
    return {
        rollout_id: rollout_evaluate(rollout_id=rollout_id)
        for rollout_id in Rollout.objects.filter(state=RolloutState.RUNNING).values_list("pk", flat=True)
    }
