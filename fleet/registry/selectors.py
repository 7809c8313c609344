"""Registry reads."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db.models import Count, Prefetch, QuerySet
from django.db.models.fields.json import KeyTextTransform, KeyTransform

from fleet.core.choices import Role
from fleet.core.display import moment
from fleet.core.errors import Conflict, NotFound
from fleet.core.permissions import has_role
from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device
from fleet.registry.choices import VERSION_TRANSITIONS, ArtifactStatus, DeltaStatus, VersionStatus
from fleet.registry.models import Artifact, ArtifactDelta, MLModel, ModelVersion, SigningKey
from fleet.rollouts.choices import AssignmentState, RolloutState
from fleet.rollouts.models import Assignment, AuditEntry, Rollout


def model_get(*, name: str) -> MLModel:
    model = MLModel.objects.filter(name=name).first()
    if model is None:
        raise NotFound(f"No model named {name!r}.", code="unknown_model")
    return model


def version_get(*, model_name: str, version: str) -> ModelVersion:
    found = (
        ModelVersion.objects.select_related("model").filter(model__name=model_name, version=version).first()
    )
    if found is None:
        model_get(name=model_name)  # says which of the two is unknown
        raise NotFound(f"Model {model_name!r} has no version {version!r}.", code="unknown_version")
    return found


def artifact_files() -> QuerySet[Artifact]:
    """Artifacts as the download views need them (manifest, blob, golden set, deltas): what
    devices fetch, so nothing more than the version and model is joined."""
    return Artifact.objects.select_related("version__model")


def artifact_list() -> QuerySet[Artifact]:
    return Artifact.objects.select_related("version__model", "signing_key", "created_by").prefetch_related(
        Prefetch("deltas", queryset=ArtifactDelta.objects.select_related("base__version"))
    )


def max_accuracy_drop_pp(model: MLModel) -> float:
    """The accuracy a produced variant may lose (pp): the model's own limit, else the server's."""
    if model.max_accuracy_drop_pp is not None:
        return model.max_accuracy_drop_pp
    return settings.QUANT_MAX_ACCURACY_DROP_PP


def accuracy_drop_pp(artifact: Artifact, reference: Artifact | None) -> float | None:
    """Golden accuracy ``artifact`` loses against ``reference`` (its float32 parent), in
    percentage points; negative when it gains. None when either was not scored."""
    if reference is None or reference.golden_accuracy is None or artifact.golden_accuracy is None:
        return None
    return (reference.golden_accuracy - artifact.golden_accuracy) * 100


def version_comparison(version: ModelVersion) -> list[dict[str, Any]]:
    """One row per variant of a version, so an operator picks what to release: sizes, golden
    accuracy and its drop against float32, median CPU latency, ops and where it came from.

    The float32 reference of a produced variant is its parent; of an uploaded one, the
    version's ready ``float32`` artifact. A failed upload retried since is left out.
    """
    artifacts = list(version.artifacts.select_related("parent").order_by("variant", "-created_at"))
    live = {a.variant for a in artifacts if a.status != ArtifactStatus.FAILED}
    reference = next(
        (a for a in artifacts if a.variant == "float32" and a.status == ArtifactStatus.READY), None
    )
    rows = []
    for artifact in artifacts:
        if artifact.status == ArtifactStatus.FAILED and artifact.variant in live:
            continue
        base = artifact.parent or (reference if artifact is not reference else None)
        signature = artifact.tflite_signature or {}
        rows.append(
            {
                "artifact_id": artifact.pk,
                "variant": artifact.variant,
                "status": artifact.status,
                "reason": artifact.failure_reason,
                "recipe": artifact.recipe,
                "parent_id": artifact.parent_id,
                "tool": f"{artifact.tool} {artifact.tool_version}".strip(),
                "raw_size": artifact.raw_size if artifact.raw_sha256 else None,
                "blob_size": artifact.blob_size,
                "golden_accuracy": artifact.golden_accuracy,
                "accuracy_drop_pp": accuracy_drop_pp(artifact, base),
                "latency_ms": artifact.latency_ms,
                "quantization": signature.get("quantization"),
                "ops": signature.get("ops", []),
            }
        )
    return rows


def artifact_ready(artifact: Artifact) -> Artifact:
    """Manifests and blobs exist only for ready artifacts."""
    if artifact.status != ArtifactStatus.READY:
        raise Conflict(
            f"Artifact {artifact.pk} is {artifact.status}, not ready"
            + (f" ({artifact.failure_code}: {artifact.failure_reason})" if artifact.failure_code else "")
            + ".",
            code="artifact_not_ready",
        )
    return artifact


def delta_ready(*, artifact: Artifact, delta_id: int) -> ArtifactDelta:
    """A delta to ``artifact`` that devices may be offered (made, checked and signed)."""
    delta = artifact.deltas.filter(pk=delta_id).first()
    if delta is None:
        raise NotFound(f"Artifact {artifact.pk} has no delta {delta_id}.", code="unknown_delta")
    if delta.status != DeltaStatus.READY:
        raise Conflict(f"Delta {delta_id} is not offered: {delta.reason}", code="delta_not_ready")
    return delta


def version_deltas(version: ModelVersion) -> QuerySet[ArtifactDelta]:
    """Every delta made (or tried) to the ready variants of ``version``: by variant, newest
    base first (one query)."""
    return (
        ArtifactDelta.objects.filter(target__version=version, target__status=ArtifactStatus.READY)
        .select_related("target", "base__version")
        .order_by("target__variant", "-base__version__created_at")
    )


def artifact_fetchable_by(*, principal, artifact: Artifact) -> bool:
    """May ``principal`` download this artifact's manifest, blob and golden set?

    People need the viewer role. Device principals (devices issue) bring their own rule as
    a ``may_fetch_artifact(artifact)`` method: a device sees only artifacts assigned to it.
    """
    may_fetch = getattr(principal, "may_fetch_artifact", None)
    if may_fetch is not None:
        return bool(may_fetch(artifact))
    return has_role(principal, Role.VIEWER)


def signing_keys() -> QuerySet[SigningKey]:
    return SigningKey.objects.all()


# --- the model and version pages (admin, issue 10 section 1): bounded queries per page


def devices_running(*, model: MLModel) -> dict[tuple[str, str], int]:
    """Active devices by the (version, variant) of ``model`` they report running (one query)."""
    entry = KeyTransform(model.name, "reported_models")
    rows = (
        Device.objects.filter(status=DeviceStatus.ACTIVE, reported_models__has_key=model.name)
        .annotate(running_version=KeyTextTransform("version", entry))
        .annotate(running_variant=KeyTextTransform("variant", entry))
        .values_list("running_version", "running_variant")
        .annotate(n=Count("pk"))
        .order_by()
    )
    return {(version or "?", variant or "?"): n for version, variant, n in rows}


@dataclass
class RolloutOutcome:
    rollout: Rollout
    stage: str  # "stage 1 of 2", or "" before its start
    devices: list[tuple[str, int]]  # (assignment state label, count), skipped ones left out
    why: str  # who brought it to its state, when and why; else the evaluator's last sentence


def version_rollouts(*, versions: list[ModelVersion]) -> dict[int, list[RolloutOutcome]]:
    """The rollouts of each version, newest first, with their devices by state and why they
    are in their state (three queries)."""
    rollouts = list(
        Rollout.objects.filter(target_version__in=versions)
        .select_related("policy", "model", "target_version")
        .order_by("-created_at")
    )
    states: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for rollout_id, state, n in (
        Assignment.objects.filter(rollout__in=rollouts)
        .exclude(state=AssignmentState.SKIPPED)
        .values_list("rollout_id", "state")
        .annotate(n=Count("pk"))
        .order_by("rollout_id", "state")
    ):
        states[rollout_id].append((AssignmentState(state).label, n))
    # The latest audit entry of each rollout (DISTINCT ON): a person's action explains the
    # state better than the evaluator's sentence when it is what brought the rollout there.
    latest = {
        entry.rollout_id: entry
        for entry in AuditEntry.objects.filter(rollout__in=rollouts)
        .select_related("actor")
        .order_by("rollout_id", "-at", "-pk")
        .distinct("rollout_id")
    }
    found: dict[int, list[RolloutOutcome]] = defaultdict(list)
    for rollout in rollouts:
        started = rollout.current_stage >= 0
        stage = f"stage {rollout.current_stage + 1} of {len(rollout.stages)}" if started else ""
        why = rollout.last_decision
        entry = latest.get(rollout.pk)
        if entry is not None and entry.actor is not None and entry.to_state == rollout.state:
            why = f"by {entry.actor} at {moment(entry.at)}: {entry.reason or 'no reason given'}"
        found[rollout.target_version_id].append(RolloutOutcome(rollout, stage, states[rollout.pk], why))
    return found


def version_failed_canary(*, version: ModelVersion, rollouts: list[RolloutOutcome]) -> Rollout | None:
    """The rolled-back rollout that should prompt deprecating ``version``, or None: its latest
    rollout was rolled back and the version may still become deprecated (it is released)."""
    if VersionStatus.DEPRECATED not in VERSION_TRANSITIONS[version.status] or not rollouts:
        return None
    latest = rollouts[0].rollout  # newest first
    return latest if latest.state == RolloutState.ROLLED_BACK else None
