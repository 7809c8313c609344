"""Rollout reads for the admin's rollout page and its live refresh (issue 10, section 1).

Each read costs a fixed number of queries whatever the fleet's size and however long the
rollout ran: charts thin the evaluations evenly to at most CHART_POINTS times, the timeline
and the device table are bounded pages. Numbers are rounded here, once, with the unit the
page shows next to them; the charts' data are the same numbers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.core.paginator import Page, Paginator
from django.db.models import Count, F, OuterRef, Subquery
from django.db.models.expressions import RawSQL
from django.db.models.fields.json import KT
from django.utils import timezone

from agent.protocol.codes import DeliveryPath, DeltaFallback, EventType
from fleet.core.display import count, moment, percent, size
from fleet.devices.choices import DeviceStatus, GroupKind
from fleet.devices.models import Device, DeviceEvent, DeviceGroup
from fleet.devices.selectors import group_devices
from fleet.registry.choices import ArtifactStatus
from fleet.registry.models import Artifact, ModelVersion
from fleet.rollouts import services
from fleet.rollouts.choices import ACTIVE_STATES, AssignmentState, Decision, Metric, RolloutState, StageMode
from fleet.rollouts.cohort import VariantNeeds, choose_variant, misfit
from fleet.rollouts.models import Assignment, AuditEntry, GateEvaluation, Rollout, RolloutHour
from fleet.rollouts.policy import policy_validate

CHART_POINTS = 300  # evaluations per chart at most, evenly spread over the rollout
TIMELINE_ENTRIES = 100  # the latest entries of each kind, merged
DEVICES_PER_PAGE = 50

# The progress bar's order (settled first) and colours; every colour also has its label
# beside it, so nothing is told by colour alone.
STATE_ORDER = (
    AssignmentState.ACTIVE,
    AssignmentState.SHADOW,
    AssignmentState.VERIFYING,
    AssignmentState.DOWNLOADING,
    AssignmentState.NOTIFIED,
    AssignmentState.PENDING,
    AssignmentState.FAILED,
    AssignmentState.REVERTED,
    AssignmentState.ROLLED_BACK,
    AssignmentState.SKIPPED,
)
STATE_COLOURS = {
    AssignmentState.ACTIVE: "#1a7f37",
    AssignmentState.SHADOW: "#8250df",
    AssignmentState.VERIFYING: "#0550ae",
    AssignmentState.DOWNLOADING: "#0969da",
    AssignmentState.NOTIFIED: "#54aeff",
    AssignmentState.PENDING: "#afb8c1",
    AssignmentState.FAILED: "#cf222e",
    AssignmentState.REVERTED: "#bc4c00",
    AssignmentState.ROLLED_BACK: "#9a6700",
    AssignmentState.SKIPPED: "#6e7781",
}


def state_label(value: str) -> str:
    """The human name of a rollout state ("rolled_back" → "Rolled back")."""
    return RolloutState(value).label if value in RolloutState.values else value


def stage_label(spec: dict) -> str:
    unit = " %" if spec["kind"] == "percent" else " devices"
    return f"{spec['value']:g}{unit}" + (" (shadow)" if spec.get("mode") == "shadow" else "")


def window_label(window: dict | None) -> str:
    """A policy's maintenance window as people say it: "22:00\N{EN DASH}05:00 UTC" or "any time"."""
    if not window:
        return "any time"
    return f"{window.get('start')}\N{EN DASH}{window.get('end')} UTC"


def _round(value: float | None, digits: int, scale: float = 1.0) -> float | None:
    return None if value is None else round(value * scale, digits)


# --- devices per stage, by assignment state (one query)


@dataclass
class Segment:
    state: str
    label: str
    count: int
    percent: float  # of the stage's devices, for the bar's width
    colour: str


@dataclass
class StageProgress:
    number: int | None  # 1-based; None for devices no stage covered yet
    size: str
    current: bool
    total: int
    segments: list[Segment]

    @property
    def summary(self) -> str:
        return ", ".join(f"{s.count:,} {s.label.lower()}" for s in self.segments) or "none yet"


def stage_progress(rollout: Rollout) -> list[StageProgress]:
    """Per stage: its devices by assignment state, in STATE_ORDER; then the devices that no
    stage covered yet (pending for a later stage, or skipped)."""
    counts: dict[int | None, dict[str, int]] = {}
    for stage, state, n in (
        Assignment.objects.filter(rollout=rollout)
        .values_list("stage", "state")
        .annotate(n=Count("pk"))
        .order_by()
    ):
        counts.setdefault(stage, {})[state] = n

    def row(number: int | None, size: str, current: bool) -> StageProgress:
        by_state = counts.get(None if number is None else number - 1, {})
        total = sum(by_state.values())
        segments = [
            Segment(
                state, AssignmentState(state).label, by_state[state], 100 * by_state[state] / total, colour
            )
            for state, colour in STATE_COLOURS.items()
            if by_state.get(state)
        ]
        segments.sort(key=lambda s: STATE_ORDER.index(s.state))
        return StageProgress(number, size, current, total, segments)

    rows = [
        row(number + 1, stage_label(spec), number == rollout.current_stage)
        for number, spec in enumerate(rollout.stages)
    ]
    if counts.get(None):
        rows.append(row(None, "not in a stage yet", False))
    return rows


# --- the gates' latest verdicts and their history (charts)


def _evaluation_times(rollout: Rollout) -> RawSQL:
    """At most CHART_POINTS evaluation times, evenly spread, the latest always included."""
    return RawSQL(
        "SELECT evaluated_at FROM ("
        " SELECT evaluated_at, row_number() OVER (ORDER BY evaluated_at) AS i, count(*) OVER () AS n"
        " FROM (SELECT DISTINCT evaluated_at FROM rollouts_gateevaluation WHERE rollout_id = %s) AS times"
        ") AS numbered WHERE (n - i) %% GREATEST(1, CEIL(n::float / %s)::int) = 0",
        [rollout.pk, CHART_POINTS],
    )


@dataclass
class GateRow:
    gate: str
    stage: int
    verdict: str
    verdict_code: str
    summary: str
    note: str


def latest_verdicts(rollout: Rollout) -> tuple[datetime | None, list[GateRow]]:
    """The gates of the latest evaluation, each with its verdict and sentence (one query)."""
    rows = list(
        GateEvaluation.objects.filter(
            rollout=rollout,
            evaluated_at=GateEvaluation.objects.filter(rollout=rollout)
            .order_by("-evaluated_at")
            .values("evaluated_at")[:1],
        ).order_by("metric", "variant")
    )
    return (rows[0].evaluated_at if rows else None), [
        GateRow(
            gate=row.get_metric_display() + (f" ({row.variant})" if row.variant else ""),
            stage=row.stage + 1,
            verdict=row.get_verdict_display(),
            verdict_code=row.verdict,
            summary=row.summary,
            note=row.note,
        )
        for row in rows
    ]


def _epoch(value: datetime) -> int:
    return int(value.timestamp())


def gate_series(rollout: Rollout) -> dict:
    """Accuracy (candidate and incumbent, %; the drop in points with its confidence sequence
    and the allowed drop), labels per arm, the candidate's error rate (% with its bound and
    the ceiling) and, in shadow stages, its agreement with the live model (% with its
    confidence sequence and the required agreement), one series per variant, over at most
    CHART_POINTS evaluations (one query)."""
    rows = (
        GateEvaluation.objects.filter(
            rollout=rollout,
            metric__in=(Metric.ACCURACY, Metric.ERROR_RATE, Metric.SHADOW_AGREEMENT),
            evaluated_at__in=_evaluation_times(rollout),
        )
        .exclude(candidate_value=None)
        .annotate(drop_pp=KT("inputs__drop_pp"))
        .order_by("evaluated_at", "metric", "variant")
        .values_list(
            "evaluated_at",
            "metric",
            "variant",
            "candidate_value",
            "incumbent_value",
            "candidate_n",
            "incumbent_n",
            "lower",
            "upper",
            "threshold",
            "drop_pp",
        )
    )
    accuracy: dict[str, list[dict]] = {}
    errors: list[dict] = []
    agreement: list[dict] = []
    for at, metric, variant, candidate, incumbent, cand_n, inc_n, lower, upper, threshold, drop in rows:
        if metric == Metric.ACCURACY:
            accuracy.setdefault(variant, []).append(
                {
                    "t": _epoch(at),
                    "candidate_pct": _round(candidate, 1, 100),
                    "incumbent_pct": _round(incumbent, 1, 100),
                    "drop_pp": _round(float(drop), 1) if drop is not None else None,
                    "lower_pp": _round(lower, 1),
                    "upper_pp": _round(upper, 1),
                    "allowed_pp": _round(threshold, 1),
                    "candidate_labels": cand_n,
                    "incumbent_labels": inc_n,
                }
            )
        elif metric == Metric.SHADOW_AGREEMENT:
            agreement.append(
                {
                    "t": _epoch(at),
                    "agreement_pct": _round(candidate, 1, 100),
                    "lower_pct": _round(lower, 1, 100),
                    "upper_pct": _round(upper, 1, 100),
                    "required_pct": _round(threshold, 1, 100),
                    "compared": cand_n,
                }
            )
        else:
            errors.append(
                {
                    "t": _epoch(at),
                    "rate_pct": _round(candidate, 2, 100),
                    "lower_pct": _round(lower, 2, 100),
                    "upper_pct": _round(upper, 2, 100),
                    "ceiling_pct": _round(threshold, 2, 100),
                    "inferences": cand_n,
                }
            )
    return {
        "accuracy": [{"variant": v, "points": points} for v, points in sorted(accuracy.items())],
        "error_rate": errors,
        "agreement": agreement,
    }


def telemetry_series(rollout: Rollout) -> list[dict]:
    """Per version the rollout's devices ran, per hour since the rollout started: inferences,
    error rate (%) and the inference-weighted mean p95 latency (ms). Hours the ingest can no
    longer change come summed per rollout (RolloutHour, kept by a beat task); the rest are
    added up from the devices' hourly rollups (TelemetryHourly) on each read: at most two
    queries."""
    if rollout.started_at is None:
        return []
    since, until = services.telemetry_span(rollout)
    summed = rollout.telemetry_summed_until
    rows = [
        {
            "version": row.version,
            "hour": row.hour,
            "inferences_sum": row.inferences,
            "errors_sum": row.errors,
            "p95_weighted": row.latency_p95_weighted_sum,
            "p95_weight": row.latency_p95_weight,
        }
        for row in (RolloutHour.objects.filter(rollout=rollout) if summed else ())
    ]
    if until is None or summed is None or summed < until:
        rows += services.rollout_telemetry_sums(
            rollout=rollout, since=max(since, summed) if summed else since, until=until
        )
    by_version: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda row: (row["version"], row["hour"])):
        inferences = row["inferences_sum"] or 0
        by_version.setdefault(row["version"], []).append(
            {
                "t": _epoch(row["hour"]),
                "inferences": inferences,
                "error_pct": _round(row["errors_sum"] / inferences, 2, 100) if inferences else None,
                "p95_ms": _round(row["p95_weighted"] / row["p95_weight"], 1) if row["p95_weight"] else None,
            }
        )
    return [{"version": version, "points": points} for version, points in by_version.items()]


def chart_data(rollout: Rollout) -> dict:
    return {
        **gate_series(rollout),
        "telemetry": telemetry_series(rollout),
        "target": rollout.target_version.version,
        "tz": timezone.get_current_timezone_name(),
    }


# --- one timeline: audit entries, gate decisions, device events (three queries)


@dataclass
class TimelineEntry:
    at: datetime
    kind: str  # "audit", "decision", "event"
    who: str
    what: str
    detail: str = ""
    failed: bool = False

    @property
    def when(self) -> str:
        return moment(self.at)


def _rollout_device_pks(rollout: Rollout):
    return Assignment.objects.filter(rollout=rollout).values("device_id")


def timeline(rollout: Rollout, limit: int = TIMELINE_ENTRIES) -> list[TimelineEntry]:
    """The latest ``limit`` entries, newest first. Decisions are the evaluations that acted
    (promote, pause, roll back, complete, await approval) or failed; the many "wait" looks
    are in the charts and the latest verdicts instead."""
    entries = [
        TimelineEntry(
            at=entry.at,
            kind="audit",
            who=entry.actor_name,
            what=entry.action
            + (
                f": {state_label(entry.from_state)} → {state_label(entry.to_state)}"
                if entry.from_state != entry.to_state
                else f" (stage {entry.stage + 1})"
            ),
            detail=entry.reason,
        )
        for entry in AuditEntry.objects.filter(rollout=rollout)
        .select_related("actor")
        .order_by("-at", "-pk")[:limit]
    ]
    decisions = (
        GateEvaluation.objects.filter(rollout=rollout)
        .exclude(decision=Decision.WAIT)
        .order_by("-evaluated_at", "metric", "variant")
        .values_list("evaluated_at", "stage", "decision", "verdict", "summary")[: limit * 4]
    )
    seen: dict[datetime, TimelineEntry] = {}
    for at, stage, decision, verdict, summary in decisions:
        entry = seen.get(at)
        if entry is None:
            entry = seen[at] = TimelineEntry(
                at=at,
                kind="decision",
                who="gates",
                what=f"{Decision(decision).label} (stage {stage + 1})",
                failed=decision in (Decision.ROLLBACK, Decision.PAUSE, Decision.ERROR),
            )
        if verdict in ("fail", "error") or not entry.detail:
            entry.detail = summary if verdict in ("fail", "error") else entry.detail or summary
    entries += list(seen.values())[:limit]
    if rollout.started_at is not None:
        events = (
            DeviceEvent.objects.filter(
                device_id__in=_rollout_device_pks(rollout),
                model=rollout.model.name,
                received_at__gte=rollout.started_at,
            )
            .select_related("device")
            .order_by("-received_at", "-pk")[:limit]
        )
        entries += [
            # The server's clock, as for the audit entries and decisions (a device's may drift).
            TimelineEntry(
                at=event.received_at,
                kind="event",
                who=event.device.device_id,
                what=f"{event.type} {event.version} {event.variant}".strip(),
                detail=" ".join(part for part in (event.reason, event.message) if part),
                failed=bool(event.reason),
            )
            for event in events
        ]
    entries.sort(key=lambda entry: entry.at, reverse=True)
    return entries[:limit]


# --- the devices of the rollout (three queries: count, page, their last events)


@dataclass
class DeviceRow:
    assignment: Assignment
    last_event: DeviceEvent | None = None
    last_event_text: str = field(default="—")

    @property
    def state_label(self) -> str:
        return AssignmentState(self.assignment.state).label


def device_page(
    rollout: Rollout, *, state: str | None = None, page: int | str = 1
) -> tuple[Page, list[DeviceRow]]:
    """One page of the rollout's devices (stage, then device id), filtered by assignment
    state when ``state`` is one, each with its latest event since the rollout started."""
    assignments = Assignment.objects.filter(rollout=rollout).select_related("device")
    if state in AssignmentState.values:
        assignments = assignments.filter(state=state)
    assignments = assignments.order_by(F("stage").asc(nulls_last=True), "device__device_id")
    current = Paginator(assignments, DEVICES_PER_PAGE).get_page(page)
    rows = [DeviceRow(assignment) for assignment in current.object_list]
    since = rollout.started_at or rollout.created_at
    latest = {
        event.device_id: event
        for event in DeviceEvent.objects.filter(
            device_id__in=[row.assignment.device_id for row in rows],
            model=rollout.model.name,
            received_at__gte=since - timedelta(seconds=1),
        )
        .order_by("device_id", "-received_at", "-pk")
        .distinct("device_id")
    }
    for row in rows:
        event = latest.get(row.assignment.device_id)
        if event is not None:
            row.last_event = event
            row.last_event_text = (
                " ".join(part for part in (event.type, event.reason) if part)
                + f", {moment(event.received_at)}"
            )
    return current, rows


# --- before starting: where the rollout would put each device (the placement's own code)


@dataclass
class PreviewStage:
    number: int
    size: str
    devices: int  # devices this stage adds
    covered: int  # devices covered once it has started (with the earlier stages')
    variants: list[tuple[str, int]]  # the added devices by variant; [] when not known yet
    shadow: bool
    # A shadow stage: how many of the added devices run the model now and so take part (a
    # shadow needs a live model beside it); the others wait for the first live stage.
    taking_part: int | None = None


@dataclass
class Preview:
    targeted: int
    stages: list[PreviewStage]
    variants: list[tuple[str, int]]  # every placed device, by variant
    skipped: list[tuple[str, int, list[str]]]  # reason, how many, the first few device ids
    overlapping: list[str]  # devices in another active rollout of the model: start is refused
    exact: bool  # the rollout exists, so its cohort order (hence each stage's variants) is known


def placement_preview(
    *, model, version, targets: dict, stages: list[dict], rollout: Rollout | None = None
) -> Preview:
    """What ``rollout_start`` would do now, by the same code: the targeted devices
    (``target_devices``), each one's variant or why it is skipped (``device_placement``),
    how many each stage covers (``stage_cover``) and the overlap it would refuse. The cohort
    order hashes the rollout's id, so which devices (hence which variants) fall in which
    stage is known only once the rollout exists (``exact``); the counts per stage are not."""
    devices = list(services.target_devices(targets=targets))
    available = services.ready_artifacts(version)
    placed = [
        services.device_placement(rollout_id=rollout.pk if rollout else 0, device=device, available=available)
        for device in devices
    ]
    eligible = sorted((p for p in placed if p.variant), key=lambda p: p.cohort_key)
    skipped: dict[str, list[str]] = {}
    for p in placed:
        if not p.variant:
            skipped.setdefault(p.reason, []).append(p.device.device_id)
    rows, before = [], 0
    for number, spec in enumerate(stages):
        covered = max(before, services.stage_cover(spec=spec, eligible=len(eligible)))
        added = eligible[before:covered]
        counts: dict[str, int] = {}
        for p in added:
            counts[p.variant] = counts.get(p.variant, 0) + 1
        shadow = spec.get("mode") == StageMode.SHADOW
        rows.append(
            PreviewStage(
                number=number + 1,
                size=stage_label(spec),
                devices=len(added),
                covered=covered,
                variants=sorted(counts.items()) if rollout is not None else [],
                shadow=shadow,
                taking_part=sum(1 for p in added if (p.device.desired_artifacts or {}).get(model.name))
                if shadow
                else None,
            )
        )
        before = covered
    totals: dict[str, int] = {}
    for p in eligible:
        totals[p.variant] = totals.get(p.variant, 0) + 1
    return Preview(
        targeted=len(devices),
        stages=rows,
        variants=sorted(totals.items()),
        skipped=[(reason, len(ids), sorted(ids)[:5]) for reason, ids in sorted(skipped.items())],
        overlapping=services.overlapping_devices(model=model, devices=devices, rollout=rollout),
        exact=rollout is not None,
    )


def rollout_preview(rollout: Rollout) -> Preview:
    """A draft's preview: its targets, version and policy as they are now."""
    stages, _ = policy_stages(rollout.policy)
    return placement_preview(
        model=rollout.model,
        version=rollout.target_version,
        targets=rollout.targets,
        stages=stages,
        rollout=rollout,
    )


def policy_stages(policy) -> tuple[list[dict], dict]:
    """The policy's stages and gates with every default spelled out, as a start copies them."""
    return policy_validate(stages=policy.stages, gates=policy.gates)


# --- counts for the metrics endpoint (fleet/core/metrics.py): one query each


def rollouts_by_state() -> dict[str, int]:
    """Rollout state -> number of rollouts."""
    rows = Rollout.objects.order_by().values_list("state").annotate(n=Count("id"))
    return dict(rows)


def active_gate_verdicts() -> dict[tuple[str, str], int]:
    """(gate metric, verdict) -> gates of the latest evaluation of every running or paused
    rollout: what the gates say now, not the whole history of evaluations."""
    latest = (
        GateEvaluation.objects.filter(rollout=OuterRef("rollout"))
        .order_by("-evaluated_at")
        .values("evaluated_at")[:1]
    )
    rows = (
        GateEvaluation.objects.filter(rollout__state__in=ACTIVE_STATES, evaluated_at=Subquery(latest))
        .order_by()
        .values_list("metric", "verdict")
        .annotate(n=Count("id"))
    )
    return {(metric, verdict): n for metric, verdict, n in rows}


# --- the compatibility matrix (docs/rollouts.md, "Compatibility matrix")


@dataclass(frozen=True)
class CompatibilityRow:
    """Active devices of one group (``group`` None: the whole fleet) and hardware class:
    how many can run each variant, which variant the rule would give them, and why the
    rest fit none (reason -> devices)."""

    group: str | None
    hardware: str
    devices: int
    runs: dict[str, int]
    gets: dict[str, int]
    skipped: int
    skipped_reasons: dict[str, int]


@dataclass(frozen=True)
class Compatibility:
    variants: list[VariantNeeds]  # the version's ready artifacts, smallest first
    rows: list[CompatibilityRow]


def _compatibility_rows(group: str | None, verdicts: list[tuple[str, frozenset, str | None, str]]) -> list:
    by_hardware: dict[str, list] = {}
    for verdict in verdicts:
        by_hardware.setdefault(verdict[0], []).append(verdict)
    rows = []
    for hardware, items in sorted(by_hardware.items()):
        runs: dict[str, int] = {}
        gets: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for _, runnable, chosen, why in items:
            for variant in runnable:
                runs[variant] = runs.get(variant, 0) + 1
            if chosen:
                gets[chosen] = gets.get(chosen, 0) + 1
            else:
                reasons[why] = reasons.get(why, 0) + 1
        skipped = sum(reasons.values())
        rows.append(CompatibilityRow(group, hardware, len(items), runs, gets, skipped, reasons))
    return rows


def version_compatibility(*, version: ModelVersion) -> Compatibility:
    """Which active devices, by group and hardware class, can run which of the version's
    ready variants, by the rule a rollout places them with (``choose_variant``). A device
    in several groups counts in each; the whole-fleet rows count it once."""
    needs = sorted(
        (services.variant_needs(a) for a in services.ready_artifacts(version).values()),
        key=lambda n: (n.raw_size, n.variant),
    )
    active = Device.objects.filter(status=DeviceStatus.ACTIVE)
    # Devices that said the same things get the same verdict: work per kind, not per device.
    verdict_of: dict = {}
    verdicts: dict[int, tuple[str, frozenset, str | None, str]] = {}
    for device in active.only(
        "pk", "hardware", "supports_int8", "runtime", "runtime_version", "supported_ops", "unsupported_ops"
    ):
        capabilities = services.device_capabilities(device)
        if capabilities not in verdict_of:
            runnable = frozenset(n.variant for n in needs if misfit(capabilities, n) is None)
            chosen, why = choose_variant(device=capabilities, variants=needs)
            verdict_of[capabilities] = (capabilities.hardware, runnable, chosen, why)
        verdicts[device.pk] = verdict_of[capabilities]
    rows = _compatibility_rows(None, list(verdicts.values()))
    # Static groups' members in one query; a dynamic group is its saved filter, one query each.
    static: dict[int, list[int]] = {}
    for group_pk, device_pk in DeviceGroup.members.through.objects.values_list("devicegroup_id", "device_id"):
        static.setdefault(group_pk, []).append(device_pk)
    for group in DeviceGroup.objects.order_by("name"):
        if group.kind == GroupKind.STATIC:
            members = static.get(group.pk, [])
        else:
            members = group_devices(group=group, queryset=active).values_list("pk", flat=True)
        rows.extend(_compatibility_rows(group.name, [verdicts[pk] for pk in members if pk in verdicts]))
    return Compatibility(variants=needs, rows=rows)


# --- how the new version reached the devices (docs/protocol.md, addition 11)


@dataclass
class Delivery:
    """What the rollout's devices say they downloaded for the target version: by delta or
    the full blob, the bytes, and what full blobs would have cost the same devices."""

    by_delta: int = 0
    full: int = 0
    downloaded: int = 0
    full_blobs: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)

    @property
    def devices(self) -> int:
        return self.by_delta + self.full

    @property
    def summary(self) -> str:
        """One sentence, rounded, with units; empty before any device reported a download."""
        if not self.devices:
            return ""
        why = ", ".join(f"{code}: {n}" for code, n in sorted(self.fallbacks.items()))
        text = (
            f"{count(self.by_delta, 'device')} got it as a delta "
            f"and {count(self.full, 'device')} as the full blob"
        )
        if why:
            text += f" (delta not used: {why})"
        text += f"; they downloaded {size(self.downloaded)} where full blobs would be {size(self.full_blobs)}"
        if self.full_blobs and self.downloaded <= self.full_blobs:
            text += f" ({percent(1 - self.downloaded / self.full_blobs, 0)} less)"
        return text + "."


def rollout_delivery(rollout: Rollout) -> Delivery:
    """How each device of the rollout got the target version: its latest ``verifying``
    event for it since the rollout started that says, beside the size of the full blob of
    the variant it got (one query)."""
    delivery = Delivery()
    if rollout.started_at is None:
        return delivery
    version = rollout.target_version
    blob_size = Subquery(
        Artifact.objects.filter(
            version=version, variant=OuterRef("variant"), status=ArtifactStatus.READY
        ).values("blob_size")[:1]
    )
    latest = (
        DeviceEvent.objects.filter(
            device_id__in=_rollout_device_pks(rollout),
            model=rollout.model.name,
            version=version.version,
            type=EventType.VERIFYING,
            received_at__gte=rollout.started_at,
        )
        .exclude(delivery="")
        .order_by("device_id", "-received_at", "-pk")
        .distinct("device_id")
        .annotate(full_blob=blob_size)
        .values_list("full_blob", "delivery", "delivery_bytes", "delivery_fallback")
    )
    fallbacks: Counter = Counter()
    for full_blob, path, downloaded, fallback in latest:
        if path == DeliveryPath.DELTA:
            delivery.by_delta += 1
        else:
            delivery.full += 1
        if fallback:  # a device's claim: a code this release does not know is counted as "other"
            fallbacks[fallback if fallback in DeltaFallback.__members__.values() else "other"] += 1
        delivery.downloaded += downloaded or 0
        delivery.full_blobs += full_blob or 0
    delivery.fallbacks = dict(fallbacks)
    return delivery
