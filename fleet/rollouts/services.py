"""Rollout writes: create, start, the stage machine, gate evaluation and every action.

One service per action, shared by the API, the admin and the evaluator (STYLE.md): the
admin's "pause" button, the API's pause and a failing gate all call ``rollout_pause``.
State changes are compare-and-set updates over ROLLOUT_TRANSITIONS; a promotion also
checks the stage it promotes from, so two evaluators (or an evaluator and an operator)
can never promote twice.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.cache import cache
from django.db import connection, transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from fleet.core.capabilities import tflite_runtime_level, version_tuple
from fleet.core.errors import Conflict, InvalidInput
from fleet.core.logs import log_context
from fleet.core.lookups import any_of
from fleet.devices import selectors as device_selectors
from fleet.devices.choices import DeviceStatus
from fleet.devices.desired import devices_republish_desired
from fleet.devices.models import Device, DeviceEvent, DeviceGroup
from fleet.devices.selectors import group_devices
from fleet.devices.services import devices_assign
from fleet.registry.choices import ArtifactStatus, VersionStatus
from fleet.registry.models import Artifact, MLModel, ModelVersion
from fleet.rollouts import policy, stats
from fleet.rollouts.choices import (
    ACTIVE_STATES,
    EVENT_STATES,
    IN_FLIGHT,
    ROLLOUT_TRANSITIONS,
    Approval,
    AssignmentState,
    Decision,
    Metric,
    OnFailure,
    RolloutState,
    SkipReason,
    StageMode,
    Verdict,
)
from fleet.rollouts.cohort import DeviceCapabilities, VariantNeeds, choose_variant, cohort_key, stage_size
from fleet.rollouts.models import Assignment, AuditEntry, GateEvaluation, Rollout, RolloutHour, RolloutPolicy

if TYPE_CHECKING:
    from fleet.devices.selectors import DeviceTelemetry

log = logging.getLogger(__name__)
TARGET_KEYS = ("groups", "tags", "devices")


# --- policies


def policy_validate(*, stages: Any, gates: Any, maintenance_window: Any = None) -> tuple[list[dict], dict]:
    """Declared in fleet/rollouts/policy.py; returns stages and gates with defaults filled."""
    return policy.policy_validate(stages=stages, gates=gates, maintenance_window=maintenance_window)


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


def ready_artifacts(version: ModelVersion) -> dict[str, Artifact]:
    """The version's ready artifacts by variant: what a rollout of it can give devices."""
    return {a.variant: a for a in version.artifacts.filter(status=ArtifactStatus.READY)}


# --- create and start


def rollout_check(*, model: MLModel, version: ModelVersion, targets: dict[str, list[str]]) -> None:
    """What ``rollout_create`` refuses (the API's and the admin's form's checks, and the
    admin's preview before anything is created)."""
    if version.model_id != model.pk:
        raise InvalidInput(f"{version} is not a version of {model}.", code="wrong_model", field="version")
    if version.status == VersionStatus.REVOKED:
        raise Conflict(f"{version} is revoked; it cannot be rolled out.", code="version_revoked")
    if not ready_artifacts(version):
        raise Conflict(f"{version} has no ready artifact.", code="no_artifacts")
    unknown = sorted(set(targets) - set(TARGET_KEYS))
    if unknown or not any(targets.get(key) for key in TARGET_KEYS):
        raise InvalidInput(
            "targets needs groups, tags or devices (lists).", code="invalid_targets", field="targets"
        )
    if not target_devices(targets=targets).exists():
        raise InvalidInput("The targets match no active device.", code="no_devices", field="targets")


def rollout_create(
    *,
    model: MLModel,
    version: ModelVersion,
    targets: dict[str, list[str]],
    policy: RolloutPolicy,
    priority: int = 0,
    created_by: AbstractBaseUser | None = None,
) -> Rollout:
    rollout_check(model=model, version=version, targets=targets)
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
    with log_context(rollout_id=rollout.pk):
        log.info(
            "rollout %s: %s, %s -> %s%s",
            rollout.pk,
            action,
            rollout.state,
            to_state,
            f": {reason}" if reason else "",
        )
    rollout.refresh_from_db()
    return rollout


def _require(rollout: Rollout, state: str, action: str) -> None:
    """Actions that ROLLOUT_TRANSITIONS alone would let through from another state."""
    if rollout.state != state:
        raise Conflict(
            f"Rollout {rollout.pk} is {rollout.state}; only a {state} rollout can {action}.",
            code="illegal_transition",
        )


def overlapping_devices(
    *, model: MLModel, devices: list[Device], rollout: Rollout | None = None
) -> list[str]:
    """Devices already in an active rollout of the model (other than ``rollout``): one
    active rollout per model and device."""
    clash = Assignment.objects.filter(
        rollout__model=model, rollout__state__in=ACTIVE_STATES, device__in=devices
    )
    if rollout is not None:
        clash = clash.exclude(rollout=rollout)
    return sorted(clash.exclude(state=AssignmentState.SKIPPED).values_list("device__device_id", flat=True))


def _overlapping(rollout: Rollout, devices: list[Device]) -> list[str]:
    return overlapping_devices(model=rollout.model, devices=devices, rollout=rollout)


@transaction.atomic
def rollout_start(*, rollout: Rollout, by: AbstractBaseUser | None = None, reason: str = "") -> Rollout:
    """Copy the policy, place every targeted device by its stable hash, skip (with a reason)
    those that can run no variant, and start stage 0.

    Overlap rule: a device may be in one active rollout per model. Starting a rollout that
    would take a device from another active rollout of the same model is refused (409);
    the operator finishes, aborts or narrows the other one first.
    """
    rollout = Rollout.objects.select_for_update().get(pk=rollout.pk)
    # Only a draft starts: "start" on a paused rollout would place its devices a second time.
    _require(rollout, RolloutState.DRAFT, "start")
    devices = list(target_devices(targets=rollout.targets))
    clash = _overlapping(rollout, devices)
    if clash:
        raise Conflict(
            f"{len(clash)} device(s) are in another active rollout of {rollout.model}: "
            f"{', '.join(clash[:10])}.",
            code="overlap",
        )
    snapshot = rollout.policy.snapshot()
    # The snapshot holds every default spelled out: what the evaluator reads is what was checked.
    snapshot["stages"], snapshot["gates"] = policy_validate(
        stages=snapshot["stages"], gates=snapshot["gates"], maintenance_window=snapshot["maintenance_window"]
    )
    rollout = _transition(
        rollout,
        RolloutState.RUNNING,
        action="start",
        by=by,
        reason=reason,
        policy_snapshot=snapshot,
        started_at=timezone.now(),
    )
    _place(rollout, devices)
    return _enter_stage(rollout, 0)


@dataclass(frozen=True)
class Placement:
    """Where a rollout puts a device: its place in the cohort order, and the variant it gets
    (with why), or none (skipped, with a ``SkipReason`` and why)."""

    device: Device
    cohort_key: int
    variant: str  # "" when skipped
    artifact: Artifact | None
    reason: str
    skip_code: str = ""  # a SkipReason when skipped


def device_capabilities(device: Device) -> DeviceCapabilities:
    """What the device reported it can run (enrollment and status, docs/protocol.md addition 10)."""
    return DeviceCapabilities(
        hardware=device.hardware or "any",
        supports_int8=device.supports_int8,
        runtime_level=tflite_runtime_level(device.runtime, device.runtime_version),
        supported_ops=frozenset(device.supported_ops or ()),
        unsupported_ops=frozenset(device.unsupported_ops or ()),
    )


def variant_needs(artifact: Artifact) -> VariantNeeds:
    """What running the variant takes, from what the registry read in its flatbuffer."""
    signature = artifact.tflite_signature or {}
    return VariantNeeds(
        variant=artifact.variant,
        raw_size=artifact.raw_size or 0,
        # Rows made before inspection recorded it: the variant's name is the best evidence.
        quantization=signature.get("quantization") or ("int8" if artifact.variant == "int8" else "none"),
        ops=frozenset(signature.get("ops", ())),
        min_runtime=version_tuple(signature.get("min_runtime") or ""),
        hardware=frozenset(artifact.requires_hardware or ["any"]),
    )


def device_placement(*, rollout_id: int, device: Device, available: dict[str, Artifact]) -> Placement:
    """The placement rule (docs/rollouts.md, "Who gets what"): the stable hash of (rollout,
    device) and the variant rule. Starting a rollout and the admin's preview both use it."""
    variant, why = choose_variant(
        device=device_capabilities(device), variants=[variant_needs(a) for a in available.values()]
    )
    return Placement(
        device=device,
        cohort_key=cohort_key(rollout_id, device.device_id) >> 1,
        variant=variant or "",
        artifact=available.get(variant) if variant else None,
        reason=why[:200],
        skip_code="" if variant else SkipReason.NO_VARIANT_FITS,
    )


def _placement(rollout: Rollout, device: Device, available: dict[str, Artifact]) -> Assignment:
    placed = device_placement(rollout_id=rollout.pk, device=device, available=available)
    return Assignment(
        rollout=rollout,
        device=device,
        cohort_key=placed.cohort_key,
        variant=placed.variant,
        to_artifact=placed.artifact,
        state=AssignmentState.PENDING if placed.variant else AssignmentState.SKIPPED,
        reason=placed.reason,
        skip_code=placed.skip_code,
    )


def _place(rollout: Rollout, devices: list[Device]) -> None:
    available = ready_artifacts(rollout.target_version)
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


def stage_cover(*, spec: dict, eligible: int) -> int:
    """How many of the eligible devices, in cohort order, a stage covers (with the earlier
    stages' devices): entering a stage and the admin's preview both use it."""
    return stage_size(
        kind=spec["kind"], value=spec["value"], min_devices=spec.get("min_devices", 1), eligible=eligible
    )


def _enter_stage(rollout: Rollout, stage: int) -> Rollout:
    """Cover the first stage_size(stage) eligible devices in cohort order and give those not
    yet there a new desired generation (published after commit).

    A live stage names the candidate as the model to serve. A shadow stage names it as a
    shadow beside what each device serves now, so only devices that already run the model
    take part (the others wait for the first live stage). Entering a live stage ends every
    shadow: covered devices move to the candidate, the rest go back to waiting."""
    spec = rollout.stages[stage]
    shadow = spec.get("mode") == StageMode.SHADOW
    eligible = rollout.assignments.exclude(state=AssignmentState.SKIPPED).order_by("cohort_key")
    size = stage_cover(spec=spec, eligible=eligible.count())
    covered = list(eligible.values_list("pk", "device_id", "to_artifact_id", "state", "stage")[:size])
    in_shadow = shadow_stages(rollout)

    def waits(state: str, covered_at: int | None) -> bool:
        if state == AssignmentState.PENDING:
            return True
        # A live stage also takes over every device of a shadow stage that is not serving
        # the candidate yet: shadowing, or still installing the shadow.
        return not shadow and covered_at in in_shadow and state in (AssignmentState.SHADOW, *IN_FLIGHT)

    to_notify = [
        (pk, device_id, artifact_id)
        for pk, device_id, artifact_id, state, covered_at in covered
        if waits(state, covered_at)
    ]
    to_notify = _only_active(to_notify)
    model = rollout.model.name
    ids = [pk for pk, _, _ in to_notify]
    now = timezone.now()
    # The devices app's rows for this model, joined in one UPDATE however many devices: what
    # each device ran before (for a rollback), and below, the generation it was sent.
    devices, params = device_selectors.device_model_states(model=model).query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE rollouts_assignment AS a SET from_version = COALESCE(d.reported_version, ''),"
            " from_artifact_id = NULLIF(d.desired_artifact_id, a.to_artifact_id)"
            f" FROM ({devices}) AS d WHERE a.device_id = d.id AND a.id = ANY(%s)",
            [*params, ids],
        )
    if shadow:
        # A shadow needs a live model beside it.
        ids = list(
            rollout.assignments.filter(pk__in=ids, from_artifact__isnull=False).values_list("pk", flat=True)
        )
        to_notify = [item for item in to_notify if item[0] in set(ids)]
    else:
        _shadows_end(rollout, _shadowing(rollout).exclude(any_of("pk", ids)))
    by_artifact: dict[int, list[int]] = defaultdict(list)
    for _, device_id, artifact_id in to_notify:
        by_artifact[artifact_id].append(device_id)
    for artifact_id, device_ids in by_artifact.items():
        artifact = Artifact.objects.get(pk=artifact_id)
        devices_assign(
            devices=device_ids,  # pks: 10,000 model instances cost more than the UPDATE
            artifacts={} if shadow else {model: artifact},
            shadows={model: (artifact, float(spec.get("sample_rate", 0.25)))} if shadow else None,
            rollout={"id": rollout.pk, "stage": stage},
        )
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE rollouts_assignment AS a SET generation = d.generation, stage = %s, state = %s,"
            f" notified_at = %s FROM ({devices}) AS d WHERE a.device_id = d.id AND a.id = ANY(%s)",
            [stage, AssignmentState.NOTIFIED, now, *params, ids],
        )
    Rollout.objects.filter(pk=rollout.pk).update(
        current_stage=stage, stage_started_at=now, awaiting_approval=False, stage_looks=0
    )
    rollout.refresh_from_db()
    return rollout


def shadow_stages(rollout: Rollout) -> set[int]:
    """The numbers of the rollout's stages that run the candidate in shadow."""
    return {number for number, spec in enumerate(rollout.stages) if spec.get("mode") == StageMode.SHADOW}


def _shadowing(rollout: Rollout) -> QuerySet[Assignment]:
    """Assignments whose device runs (or is installing) the candidate in shadow."""
    return rollout.assignments.filter(
        Q(state=AssignmentState.SHADOW) | Q(state__in=IN_FLIGHT, stage__in=shadow_stages(rollout))
    )


def _only_active(items: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(assignment, device, artifact) of active devices only; a device disabled or retired
    since it was placed is skipped with the reason, so it never blocks the others."""
    inactive = dict(
        Device.objects.filter(any_of("pk", {device_pk for _, device_pk, _ in items}))
        .exclude(status=DeviceStatus.ACTIVE)
        .values_list("pk", "status")
    )
    for pk, device_pk, _ in items:
        if device_pk in inactive:
            Assignment.objects.filter(pk=pk).update(
                state=AssignmentState.SKIPPED,
                skip_code=SkipReason.DEVICE_INACTIVE,
                reason=f"device is {inactive[device_pk]}",
            )
    return [item for item in items if item[1] not in inactive]


def _shadow_stage(rollout: Rollout) -> bool:
    return (
        rollout.current_stage >= 0 and rollout.stages[rollout.current_stage].get("mode") == StageMode.SHADOW
    )


def _shadows_end(rollout: Rollout, assignments: QuerySet[Assignment]) -> None:
    """Devices stop running the candidate in shadow (a new generation without it) and wait."""
    device_pks = list(
        assignments.filter(device__status=DeviceStatus.ACTIVE).values_list("device_id", flat=True)
    )
    if not device_pks:
        assignments.update(state=AssignmentState.PENDING, stage=None, generation=None, notified_at=None)
        return
    devices_assign(
        devices=device_pks,
        artifacts={},
        clear_shadows=(rollout.model.name,),
        rollout={"id": rollout.pk, "stage": rollout.current_stage},
    )
    assignments.update(state=AssignmentState.PENDING, stage=None, generation=None, notified_at=None)


# --- actions


def rollout_pause(*, rollout: Rollout, by: AbstractBaseUser | None = None, reason: str = "") -> Rollout:
    return _transition(rollout, RolloutState.PAUSED, action="pause", by=by, reason=reason)


def rollout_resume(*, rollout: Rollout, by: AbstractBaseUser | None = None, reason: str = "") -> Rollout:
    # Only a paused rollout resumes: "resume" on a draft would run it without placing a device.
    _require(rollout, RolloutState.PAUSED, "resume")
    return _transition(rollout, RolloutState.RUNNING, action="resume", by=by, reason=reason)


@transaction.atomic
def rollout_abort(*, rollout: Rollout, by: AbstractBaseUser | None = None, reason: str = "") -> Rollout:
    """Stop here: devices keep what they serve now. Devices running the candidate in
    shadow stop doing so (that is the only thing sent)."""
    rollout = _transition(
        rollout, RolloutState.ABORTED, action="abort", by=by, reason=reason, finished_at=timezone.now()
    )
    _shadows_end(rollout, _shadowing(rollout))
    return rollout


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
    # A new generation naming what each device ran before also ends any shadow of the model.
    touched = rollout.assignments.filter(
        state__in=(*IN_FLIGHT, AssignmentState.ACTIVE, AssignmentState.SHADOW, AssignmentState.FAILED)
    ).select_related("device", "from_artifact")
    by_artifact: dict[int, list[Assignment]] = defaultdict(list)
    for assignment in touched:
        if assignment.from_artifact_id:
            by_artifact[assignment.from_artifact_id].append(assignment)
    for group in by_artifact.values():
        group = [a for a in group if a.device.status == DeviceStatus.ACTIVE]  # others get nothing
        if not group:
            continue
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
    generation, and the generation they applied with the target version (live, or in
    shadow during a shadow stage)."""
    in_flight = list(rollout.assignments.filter(state__in=IN_FLIGHT).select_related("device"))
    if not in_flight:
        return
    # One ingest batch stamps all its events with one received_at; the id keeps the order
    # they arrived in (verifying, then failed), so the latest really is the last.
    events = DeviceEvent.objects.filter(
        device__in=[a.device_id for a in in_flight], generation__in={a.generation for a in in_flight}
    ).order_by("received_at", "pk")
    latest: dict[tuple[int, int], DeviceEvent] = {}
    for event in events:
        if event.type in EVENT_STATES:
            latest[(event.device_id, event.generation)] = event
    target = rollout.target_version.version
    shadow = _shadow_stage(rollout)
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
            if shadow and (reported.get("shadow") or {}).get("version") == target:
                state = AssignmentState.SHADOW
            elif not shadow and reported.get("version") == target:
                state = AssignmentState.ACTIVE
        if state == (AssignmentState.ACTIVE if shadow else AssignmentState.SHADOW):
            continue  # an event of the other mode cannot settle this assignment
        if (state, reason) != (assignment.state, assignment.reason):
            Assignment.objects.filter(pk=assignment.pk, state=assignment.state).update(
                state=state, reason=reason
            )


def desired_republish_unapplied(*, rollout: Rollout, now: datetime) -> int:
    """Send again the desired state of the rollout's devices that have not reported applying
    it DESIRED_REPUBLISH_SECONDS after they were notified: a crash may have lost the state
    between the commit and the broker, or lost the device's report on its way back
    (docs/operations.md, "What survives a crash"). An agent that applied it already says so
    again; one still installing it ignores the copy. At most once per
    DESIRED_REPUBLISH_SECONDS per assignment, and only within the pickup timeout: past it
    the stage no longer waits for the device, and a device that is simply offline still
    finds the retained copy when it comes back."""
    quiet = now - timedelta(seconds=settings.DESIRED_REPUBLISH_SECONDS)
    timeout = timedelta(seconds=rollout.policy_snapshot.get("pickup_timeout_seconds", 900))
    unapplied = rollout.assignments.filter(
        # Active or shadowing by the device's events, but its report never came.
        state__in=(*IN_FLIGHT, AssignmentState.ACTIVE, AssignmentState.SHADOW),
        notified_at__lte=quiet,
        notified_at__gt=now - timeout,
        device__status=DeviceStatus.ACTIVE,
        device__desired_generation=F("generation"),
        device__applied_generation__lt=F("generation"),
    ).select_related("device")
    by_stage: dict[int, list[Device]] = defaultdict(list)
    for assignment in unapplied:
        # The cache spaces the copies out: many evaluations run in DESIRED_REPUBLISH_SECONDS.
        key = f"desired-republish:{assignment.pk}:{assignment.generation}"
        if cache.add(key, 1, timeout=settings.DESIRED_REPUBLISH_SECONDS):
            by_stage[assignment.stage].append(assignment.device)
    for stage, devices in by_stage.items():
        log.warning(
            "rollout %s: %d device(s) at stage %s have not reported their desired state; publishing again",
            rollout.pk,
            len(devices),
            stage,
        )
        devices_republish_desired(devices=devices, rollout={"id": rollout.pk, "stage": stage})
    return sum(len(devices) for devices in by_stage.values())


# --- gates


def _arms(rollout: Rollout) -> dict[str, dict[int, tuple[str, str]]]:
    """Who is in which arm, by the control plane's own record, never by what a device says
    (device pk -> (device id, variant)):

    * candidate: devices of this rollout covered so far that installed the candidate, with
      the variant the rule gave them;
    * incumbent: devices of this rollout not covered yet (they still run what they ran),
      with the variant of the artifact the control plane last gave them (what they run,
      which may differ from the rule's choice for the candidate: an older version may have
      had no int8 artifact);
    * shadow: devices of the current (shadow) stage running the candidate in shadow;
    * covered: every device covered so far, whatever its state (how big the candidate arm
      can get: a device that reports a failure leaves the arm but not this count)."""
    arms: dict[str, dict[int, tuple[str, str]]] = {name: {} for name in ARMS}
    rows = list(
        rollout.assignments.exclude(state=AssignmentState.SKIPPED).values_list(
            "device_id", "device__device_id", "variant", "state", "stage", "device__desired_artifacts"
        )
    )
    model = rollout.model.name
    running = {
        (desired or {}).get(model) for _, _, _, state, _, desired in rows if state == AssignmentState.PENDING
    }
    variants = dict(Artifact.objects.filter(pk__in=running - {None}).values_list("pk", "variant"))
    for pk, device_id, variant, state, stage, desired in rows:
        member = (device_id, variant)
        if state == AssignmentState.ACTIVE:
            arms["candidate"][pk] = member
        elif state == AssignmentState.PENDING:
            runs = variants.get((desired or {}).get(model))
            if runs is not None:  # a device that runs no version of the model compares nothing
                arms["incumbent"][pk] = (device_id, runs)
        elif state == AssignmentState.SHADOW:
            arms["shadow"][pk] = member
        if stage is not None and state != AssignmentState.PENDING:
            arms["covered"][pk] = member
    return arms


ARMS = ("candidate", "incumbent", "shadow", "covered")


def _by_device(
    rows: list[DeviceTelemetry], arm: dict[int, tuple[str, str]], keep
) -> dict[str, dict[str, list[DeviceTelemetry]]]:
    """variant -> device id -> that device's rows, for the devices of ``arm``; a row counts
    only if ``keep`` accepts it and it names the variant the device was given (a device
    cannot move its evidence into another variant's comparison)."""
    grouped: dict[str, dict[str, list[DeviceTelemetry]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        member = arm.get(row.device_pk)
        if member is not None and row.variant == member[1] and keep(row):
            grouped[member[1]][member[0]].append(row)
    return grouped


def _counts(devices: dict[str, list[DeviceTelemetry]], n: str, k: str) -> list[stats.DeviceCounts]:
    return [
        stats.DeviceCounts(
            device=device_id, n=sum(getattr(r, n) for r in rows), k=sum(getattr(r, k) for r in rows)
        )
        for device_id, rows in sorted(devices.items())
    ]


def _latencies(devices: dict[str, list[DeviceTelemetry]], shadow: bool = False) -> list[stats.DeviceLatency]:
    """Per device, the p95 weighted by the inferences (or compared samples) behind it."""
    result = []
    for device_id, rows in sorted(devices.items()):
        pairs = [
            (r.shadow_latency_p95_ms, r.shadow_compared) if shadow else (r.latency_p95_ms, r.inferences)
            for r in rows
        ]
        pairs = [(p95, n) for p95, n in pairs if p95 is not None and n]
        total = sum(n for _, n in pairs)
        if total:
            result.append(
                stats.DeviceLatency(
                    device=device_id, p95_ms=sum(p * n for p, n in pairs) / total, inferences=total
                )
            )
    return result


def _not_compared(metric: str, variant: str, why: str, threshold: float) -> stats.Evaluation:
    """A comparative gate this rollout cannot run for a variant (too few devices of it on a
    side, or none left on the incumbent): recorded as not compared, with why, and it does
    not hold the stage. Small variants are therefore not accuracy-gated; docs/rollouts.md
    says so."""
    return stats.Evaluation(
        metric=metric,
        verdict=Verdict.SKIPPED,
        candidate=None,
        incumbent=None,
        candidate_n=0,
        incumbent_n=0,
        threshold=threshold,
        variant=variant,
        note=why,
        summary=f"{Metric(metric).label} ({variant}) not compared: {why}",
    )


def _gates(rollout: Rollout, looks: int, now: datetime) -> list[stats.Evaluation]:
    gates = rollout.policy_snapshot["gates"]
    counted = rollout.assignments.filter(stage__isnull=False, stage__lte=rollout.current_stage)
    by_state: dict[str, list[str]] = defaultdict(list)
    for device_id, state in counted.values_list("device__device_id", "state"):
        by_state[state].append(device_id)
    # Always evaluated (without a limit it never fails): every evaluation then records how
    # many devices of the stage installed and failed.
    max_failures = gates.get("max_install_failure_rate")
    timeout = timedelta(seconds=rollout.policy_snapshot.get("pickup_timeout_seconds", 900))
    installing = counted.filter(state__in=IN_FLIGHT, notified_at__gt=now - timeout).count()
    results = [
        stats.install_gate(
            failed=by_state[AssignmentState.FAILED],
            installed=by_state[AssignmentState.ACTIVE] + by_state[AssignmentState.SHADOW],
            max_rate=1.0 if max_failures is None else max_failures,
            installing=installing,
        )
    ]
    arms = _arms(rollout)
    since = rollout.stage_started_at or rollout.started_at
    model, target = rollout.model.name, rollout.target_version.version
    rows = device_selectors.telemetry_by_device(
        devices=[*arms["candidate"], *arms["incumbent"], *arms["shadow"]], model=model, since=since
    )
    if _shadow_stage(rollout):
        return results + _shadow_gates(rows, arms["shadow"], target, gates, looks)
    # Each arm counts only windows of the version its devices are supposed to run.
    candidates = _by_device(rows, arms["candidate"], lambda r: r.version == target)
    incumbents = _by_device(rows, arms["incumbent"], lambda r: r.version != target)
    min_devices = gates.get("min_devices", 3)
    if gates.get("max_error_rate") is not None:
        every = {d: rs for variant in candidates.values() for d, rs in variant.items()}
        results.append(
            stats.rate_ceiling_gate(
                metric=Metric.ERROR_RATE,
                devices=_counts(every, "inferences", "errors"),
                max_rate=gates["max_error_rate"],
                alpha=1 - gates.get("confidence", 0.95),
                min_total=gates.get("min_inferences", 100),
                min_devices=min_devices,
                looks=looks,
            )
        )
    # Like with like: each variant's candidates against the incumbents of the same variant,
    # where the rollout has enough devices of that variant on both sides to ever compare.
    covered = defaultdict(int)
    for _, variant in arms["covered"].values():
        covered[variant] += 1
    waiting = defaultdict(int)
    for _, variant in arms["incumbent"].values():
        waiting[variant] += 1
    accuracy = gates.get("accuracy") or None
    # (metric, devices it needs on each side, its threshold); the statistics' own floor
    # counts too, so "compared" here means the gate can really decide.
    comparisons = []
    if gates.get("max_latency_p95_ratio") is not None:
        need = max(min_devices, stats.TWO_ARM_FLOOR)
        comparisons.append((Metric.LATENCY_P95_RATIO, need, gates["max_latency_p95_ratio"]))
    if accuracy is not None:
        need = max(accuracy.get("min_devices", 3), stats.TWO_ARM_FLOOR)
        comparisons.append((Metric.ACCURACY, need, accuracy.get("max_drop_pp", 2.0)))
    compared = {
        metric: [v for v in sorted(covered) if covered[v] >= need and waiting[v] >= need]
        for metric, need, _ in comparisons
    }
    for metric, need, threshold in comparisons:
        for variant in sorted(covered):
            if variant in compared[metric]:
                results.append(_compare(metric, variant, candidates, incumbents, gates, looks, compared))
                continue
            why = (
                f"no device of this rollout still runs the incumbent as {variant}"
                if not waiting[variant]
                else f"{covered[variant]:,} device(s) of this variant were given the candidate and "
                f"{waiting[variant]:,} still run the incumbent; the gate needs {need:,} on each side"
            )
            results.append(_not_compared(metric, variant, why, threshold))
    return results


def _compare(metric, variant, candidates, incumbents, gates, looks, compared) -> stats.Evaluation:
    if metric == Metric.LATENCY_P95_RATIO:
        return _with_variant(
            stats.latency_gate(
                candidate=_latencies(candidates.get(variant, {})),
                incumbent=_latencies(incumbents.get(variant, {})),
                max_ratio=gates["max_latency_p95_ratio"],
                min_inferences=gates.get("min_inferences", 100),
                min_devices=gates.get("min_devices", 3),
            ),
            variant,
        )
    accuracy = gates["accuracy"]
    return stats.accuracy_gate(
        candidate=_counts(candidates.get(variant, {}), "labeled", "correct"),
        incumbent=_counts(incumbents.get(variant, {}), "labeled", "correct"),
        max_drop_pp=accuracy.get("max_drop_pp", 2.0),
        # One test per variant: Bonferroni keeps the rollout's error rate at alpha.
        alpha=(1 - accuracy.get("confidence", 0.95)) / len(compared[Metric.ACCURACY]),
        min_samples=accuracy.get("min_samples", 100),
        min_devices=accuracy.get("min_devices", 3),
        variant=variant,
        looks=looks,
    )


def _with_variant(evaluation: stats.Evaluation, variant: str) -> stats.Evaluation:
    return evaluation if evaluation.variant else replace(evaluation, variant=variant)


def _shadow_gates(
    rows: list[DeviceTelemetry], shadow: dict[int, tuple[str, str]], target: str, gates: dict, looks: int
) -> list[stats.Evaluation]:
    """Agreement with the live model and latency beside it, from devices running the
    candidate in shadow; windows count only if they name the candidate as the shadow."""
    spec = gates.get("shadow") or {}
    alpha = 1 - spec.get("confidence", 0.95)
    by_device: dict[str, list[DeviceTelemetry]] = defaultdict(list)
    for row in rows:
        if row.device_pk in shadow and row.shadow_version == target:
            by_device[row.device_id].append(row)
    results = []
    if spec:  # gates.shadow left out or null: no agreement gate (docs/rollouts.md, "Policy")
        results.append(
            stats.agreement_gate(
                devices=_counts(by_device, "shadow_compared", "shadow_agreed"),
                min_agreement=spec.get("min_agreement", 0.9),
                alpha=alpha,
                min_samples=spec.get("min_samples", 100),
                min_devices=spec.get("min_devices", 5),
                looks=looks,
            )
        )
    if gates.get("max_error_rate") is not None:
        results.append(
            stats.rate_ceiling_gate(
                metric=Metric.ERROR_RATE,
                devices=_counts(by_device, "shadow_sampled", "shadow_errors"),
                max_rate=gates["max_error_rate"],
                alpha=alpha,
                min_total=spec.get("min_samples", 100),
                min_devices=spec.get("min_devices", 5),
                looks=looks,
            )
        )
    if spec.get("max_latency_p95_ratio") is not None:
        results.append(
            stats.latency_gate(
                candidate=_latencies(by_device, shadow=True),
                incumbent=_latencies(by_device),
                max_ratio=spec["max_latency_p95_ratio"],
                min_inferences=spec.get("min_samples", 100),
                min_devices=spec.get("min_devices", 5),
                metric=Metric.SHADOW_LATENCY_P95_RATIO,
            )
        )
    return results


def _stage_settled(rollout: Rollout, now: datetime) -> tuple[bool, str]:
    """Soak elapsed, and every device of the stage installed, failed, or timed out."""
    spec = rollout.stages[rollout.current_stage]
    soak = timedelta(seconds=spec.get("soak_seconds", 0))
    if now - rollout.stage_started_at < soak:
        return False, f"soaking until {rollout.stage_started_at + soak:%H:%M:%S %Z}"
    timeout = timedelta(seconds=rollout.policy_snapshot.get("pickup_timeout_seconds", 900))
    waiting = rollout.assignments.filter(state__in=IN_FLIGHT, notified_at__gt=now - timeout).count()
    if waiting:
        return False, f"{waiting:,} device(s) still installing"
    return True, ""


def _in_window(window: dict | None, now: datetime) -> bool:
    if not window:
        return True
    start, end = (datetime.strptime(window[key], "%H:%M").time() for key in ("start", "end"))
    current = now.astimezone(UTC).time()
    return start <= current < end if start <= end else current >= start or current < end


def _decide(rollout: Rollout, results: list[stats.Evaluation], now: datetime) -> tuple[str, str]:
    """The decision and its one-sentence reason (docs/rollouts.md, "Decisions")."""
    stage = rollout.current_stage + 1
    failed = [r for r in results if r.verdict == stats.FAIL]
    if failed:
        rollback = rollout.policy_snapshot["on_failure"] == OnFailure.ROLLBACK
        first = failed[0]
        gate = f"{Metric(first.metric).label.lower()} gate" + (f" ({first.variant})" if first.variant else "")
        more = f" (and {len(failed) - 1} more gate(s))" if len(failed) > 1 else ""
        verb = "Rolled back" if rollback else "Paused"
        sentence = f"{verb} at stage {stage} by the {gate}{more}: {_tail(first)}"
        return (Decision.ROLLBACK if rollback else Decision.PAUSE), sentence
    settled, why = _stage_settled(rollout, now)
    if not settled:
        return Decision.WAIT, f"Waiting at stage {stage}: {why}."
    waiting = [r for r in results if r.verdict == stats.WAIT]
    if waiting:
        first = waiting[0]
        name = Metric(first.metric).label.lower() + (f" ({first.variant})" if first.variant else "")
        why = (first.note or first.summary).rstrip(". ")
        return Decision.WAIT, f"Waiting at stage {stage} for the {name} gate: {why}."
    passed = "; ".join(r.summary for r in results if r.summary) or "no gate configured"
    if rollout.current_stage + 1 >= len(rollout.stages):
        return Decision.COMPLETE, f"Completed after stage {stage}: {passed}."
    if not _in_window(rollout.policy_snapshot.get("maintenance_window"), now):
        return Decision.WAIT, f"Waiting at stage {stage}: outside the maintenance window."
    if rollout.policy_snapshot["approval"] == Approval.MANUAL:
        return Decision.AWAIT_APPROVAL, f"Stage {stage} passed, awaiting an operator's approval: {passed}."
    return Decision.PROMOTE, f"Promoted from stage {stage} to stage {stage + 1}: {passed}."


def _tail(evaluation: stats.Evaluation) -> str:
    """The gate's own sentence without its name (the decision sentence names the gate)."""
    summary = evaluation.summary.rstrip(".")
    head, sep, rest = summary.partition(": ")
    return (rest if sep and len(head) < 40 else summary) + "."


def _store(rollout: Rollout, results: list[stats.Evaluation], decision: str, looks: int, why: str) -> None:
    # One timestamp for the whole evaluation: readers find an evaluation's rows by it.
    now = timezone.now()
    GateEvaluation.objects.bulk_create(
        [
            GateEvaluation(
                rollout=rollout,
                stage=rollout.current_stage,
                metric=r.metric,
                variant=r.variant,
                verdict=r.verdict,
                candidate_value=r.candidate,
                incumbent_value=r.incumbent,
                candidate_n=r.candidate_n,
                incumbent_n=r.incumbent_n,
                candidate_devices=r.candidate_devices,
                incumbent_devices=r.incumbent_devices,
                threshold=r.threshold,
                p_value=r.p_value,
                lower=r.lower,
                upper=r.upper,
                method=r.method[:200],
                looks=looks,
                note=(r.note or (why if r.verdict == stats.WAIT else ""))[:200],
                summary=r.summary,
                inputs=_json_safe(r.inputs),
                decision=decision,
                evaluated_at=now,
            )
            for r in results
        ]
    )


def _json_safe(value: Any) -> Any:
    """NumPy scalars and the like as plain JSON numbers."""
    return json.loads(json.dumps(value, default=float))


def rollout_evaluate(*, rollout_id: int, now: datetime | None = None) -> str:
    """Evaluate a running rollout's gates, store every evaluation with its inputs, and act
    on the decision; the audit entry carries the decision's one-sentence reason."""
    now = now or timezone.now()
    with transaction.atomic():
        # Evaluators of the same rollout take turns; a busy one is skipped, not waited for.
        rollout = Rollout.objects.select_for_update(skip_locked=True).filter(pk=rollout_id).first()
        if rollout is None or rollout.state != RolloutState.RUNNING:
            return Decision.WAIT
        place_new_devices(rollout=rollout)
        assignments_sync(rollout=rollout)
        desired_republish_unapplied(rollout=rollout, now=now)
        looks = rollout.stage_looks + 1
        Rollout.objects.filter(pk=rollout.pk).update(stage_looks=looks)
        results = _gates(rollout, looks, now)
        decision, sentence = _decide(rollout, results, now)
        _store(rollout, results, decision, looks, sentence)
        if decision == Decision.ROLLBACK:
            rollout_rollback(rollout=rollout, reason=sentence)
        elif decision == Decision.PAUSE:
            rollout_pause(rollout=rollout, reason=sentence)
        elif decision in (Decision.PROMOTE, Decision.COMPLETE):
            rollout_promote(rollout=rollout, reason=sentence)
        elif decision == Decision.AWAIT_APPROVAL:
            Rollout.objects.filter(pk=rollout.pk).update(awaiting_approval=True)
        Rollout.objects.filter(pk=rollout.pk).update(last_decision=sentence[:2000])
    return decision


def _record_error(rollout_id: int, exc: Exception) -> None:
    """An evaluation that crashed leaves a visible row instead of silence."""
    rollout = Rollout.objects.filter(pk=rollout_id).first()
    if rollout is None:
        return
    sentence = f"Evaluation failed at stage {rollout.current_stage + 1}: {type(exc).__name__}: {exc}"[:2000]
    GateEvaluation.objects.create(
        rollout=rollout,
        stage=rollout.current_stage,
        metric=Metric.EVALUATOR,
        verdict=Verdict.ERROR,
        note=f"{type(exc).__name__}: {exc}"[:200],
        summary=sentence,
        decision=Decision.ERROR,
    )
    Rollout.objects.filter(pk=rollout_id).update(last_decision=sentence)


def evaluate_running() -> dict[int, str]:
    """Evaluate every running rollout, each on its own: one that fails (a broken policy, a
    bug) is logged and recorded, and the others are still evaluated."""
    decisions = {}
    for rollout_id in Rollout.objects.filter(state=RolloutState.RUNNING).values_list("pk", flat=True):
        with log_context(rollout_id=rollout_id):
            try:
                decisions[rollout_id] = rollout_evaluate(rollout_id=rollout_id)
            except Exception as exc:
                log.exception("rollout %s: evaluation failed", rollout_id)
                decisions[rollout_id] = Decision.ERROR
                try:
                    _record_error(rollout_id, exc)
                except Exception:
                    log.exception("rollout %s: could not record the failed evaluation", rollout_id)
    return decisions


def evaluations_thin(*, now: datetime | None = None, chunk_size: int = 500) -> int:
    """Retention of the gates' evaluations older than GATE_EVALUATION_RETENTION_DAYS: of
    each rollout, keep every evaluation whose decision acted (anything but wait), the last
    evaluation of each stage and the first of each hour, and delete the other evaluations'
    rows. What stays is what the rollout page shows (decisions, verdicts, at most
    CHART_POINTS chart points); what goes is the same "waiting" read every 5 s. Returns
    the rows deleted. Idempotent: a second run finds nothing more to delete."""
    cutoff = (now or timezone.now()) - timedelta(days=settings.GATE_EVALUATION_RETENTION_DAYS)
    old = GateEvaluation.objects.filter(evaluated_at__lt=cutoff)
    deleted = 0
    for rollout_id in old.filter(decision=Decision.WAIT).values_list("rollout_id", flat=True).distinct():
        times = old.filter(rollout_id=rollout_id).values_list("evaluated_at", "stage", "decision").distinct()
        keep, last_of_stage, hours = set(), {}, set()
        for at, stage, decision in sorted(times):
            if decision != Decision.WAIT:
                keep.add(at)
            last_of_stage[stage] = at
            hour = at.replace(minute=0, second=0, microsecond=0)
            if hour not in hours:
                hours.add(hour)
                keep.add(at)
        keep.update(last_of_stage.values())
        gone = sorted({at for at, _, _ in times} - keep)
        waits = GateEvaluation.objects.filter(rollout_id=rollout_id, decision=Decision.WAIT)
        for start in range(0, len(gone), chunk_size):
            count, _ = waits.filter(evaluated_at__in=gone[start : start + chunk_size]).delete()
            deleted += count
    if deleted:
        log.info("gate evaluations: deleted %s rows older than %s", deleted, cutoff.isoformat())
    return deleted


def rollout_telemetry_sums(
    *, rollout: Rollout, since: datetime, until: datetime | None
) -> list[dict[str, Any]]:
    """The rollout's devices' hourly telemetry per version and hour in [since, until)."""
    return device_selectors.telemetry_hourly_sums(
        model=rollout.model.name,
        devices=Assignment.objects.filter(rollout=rollout).values("device_id"),
        since=since,
        until=until,
    )


def _hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def telemetry_span(rollout: Rollout) -> tuple[datetime, datetime | None]:
    """The hours of window start the rollout's charts cover, [since, until): from the hour it
    started through the hour it finished (until None while it runs). Started rollouts only."""
    until = _hour(rollout.finished_at) + timedelta(hours=1) if rollout.finished_at else None
    return _hour(rollout.started_at), until


def telemetry_summarize(*, now: datetime | None = None) -> dict[int, int]:
    """Beat task: for every started rollout, sum its devices' telemetry per version and hour
    into RolloutHour for the hours that can no longer change (devices' selectors,
    telemetry_final_hour) and are not summed yet, so that the rollout page adds up at most
    about a day of per-device rollups whatever the rollout's length. Returns the rows written
    per rollout. Each rollout commits alone, guarded by a compare-and-set on
    telemetry_summed_until, so two runs at once cannot sum an hour twice."""
    now = now or timezone.now()
    final = device_selectors.telemetry_final_hour(now)
    written = {}
    rollouts = Rollout.objects.filter(started_at__isnull=False, started_at__lt=final).select_related("model")
    pending = Q(telemetry_summed_until__isnull=True) | Q(
        Q(finished_at__isnull=True) | Q(telemetry_summed_until__lte=F("finished_at")),
        telemetry_summed_until__lt=final,
    )
    for rollout in rollouts.filter(pending):
        since, end = telemetry_span(rollout)
        since = rollout.telemetry_summed_until or since
        until = final if end is None else min(final, end)
        if until <= since:
            continue
        rows = [
            RolloutHour(
                rollout=rollout,
                version=row["version"],
                hour=row["hour"],
                inferences=row["inferences_sum"] or 0,
                errors=row["errors_sum"] or 0,
                latency_p95_weighted_sum=row["p95_weighted"] or 0.0,
                latency_p95_weight=row["p95_weight"] or 0,
            )
            for row in rollout_telemetry_sums(rollout=rollout, since=since, until=until)
        ]
        with transaction.atomic():
            moved = Rollout.objects.filter(
                pk=rollout.pk, telemetry_summed_until=rollout.telemetry_summed_until
            ).update(telemetry_summed_until=until)
            if not moved:
                continue  # another run got there first; its rows stand
            RolloutHour.objects.bulk_create(rows, batch_size=1000)
        written[rollout.pk] = len(rows)
    return written
