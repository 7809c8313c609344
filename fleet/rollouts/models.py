from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from fleet.rollouts.choices import (
    Approval,
    AssignmentState,
    Decision,
    Metric,
    OnFailure,
    RolloutState,
    SkipReason,
    Verdict,
)


def default_stages() -> list[dict]:
    return [
        {"kind": "percent", "value": 10, "min_devices": 1, "soak_seconds": 600},
        {"kind": "percent", "value": 50, "min_devices": 1, "soak_seconds": 600},
        {"kind": "percent", "value": 100, "min_devices": 1, "soak_seconds": 0},
    ]


def default_gates() -> dict:
    return {
        "max_install_failure_rate": 0.1,
        "max_error_rate": 0.01,
        "max_latency_p95_ratio": 1.5,
        "min_inferences": 100,
        "accuracy": {"min_samples": 100, "max_drop_pp": 2.0, "confidence": 0.95},
    }


class RolloutPolicy(models.Model):
    """A named, reusable recipe. A rollout copies it when it starts: editing the policy
    never changes a running rollout."""

    name = models.SlugField(max_length=64, unique=True)
    description = models.TextField(blank=True)
    stages = models.JSONField(default=default_stages)
    gates = models.JSONField(default=default_gates)
    on_failure = models.CharField(max_length=10, choices=OnFailure.choices, default=OnFailure.ROLLBACK)
    approval = models.CharField(max_length=10, choices=Approval.choices, default=Approval.AUTOMATIC)
    # {"start": "22:00", "end": "05:00"} in UTC: new stages start only inside it.
    maintenance_window = models.JSONField(null=True, blank=True)
    # Devices that have not picked up their assignment after this long stop blocking a stage.
    pickup_timeout_seconds = models.PositiveIntegerField(default=900)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "rollout policies"

    def __str__(self) -> str:
        return self.name

    def snapshot(self) -> dict:
        return {
            "name": self.name,
            "stages": self.stages,
            "gates": self.gates,
            "on_failure": self.on_failure,
            "approval": self.approval,
            "maintenance_window": self.maintenance_window,
            "pickup_timeout_seconds": self.pickup_timeout_seconds,
        }


class Rollout(models.Model):
    model = models.ForeignKey("registry.MLModel", on_delete=models.PROTECT, related_name="rollouts")
    target_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.PROTECT, related_name="rollouts"
    )
    targets = models.JSONField(default=dict, help_text='{"groups": [...], "tags": [...], "devices": [...]}')
    policy = models.ForeignKey(RolloutPolicy, on_delete=models.PROTECT, related_name="rollouts")
    policy_snapshot = models.JSONField(null=True, blank=True, help_text="The policy as it was at start.")
    state = models.CharField(max_length=12, choices=RolloutState.choices, default=RolloutState.DRAFT)
    current_stage = models.IntegerField(default=-1, help_text="-1 before start; 0 is the first stage")
    stage_started_at = models.DateTimeField(null=True, blank=True)
    awaiting_approval = models.BooleanField(default=False)
    stage_looks = models.IntegerField(default=0, help_text="evaluations of the current stage so far")
    last_decision = models.TextField(
        blank=True, default="", help_text="the evaluator's latest decision, in one sentence"
    )
    priority = models.IntegerField(default=0)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Hours of window start before this are summed in RolloutHour (services.telemetry_summarize).
    telemetry_summed_until = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"rollout {self.pk}: {self.model} → {self.target_version.version}"

    @property
    def stages(self) -> list[dict]:
        return (self.policy_snapshot or self.policy.snapshot())["stages"]


class Assignment(models.Model):
    """One device in one rollout: what it ran, what it should run, and how far it got."""

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="assignments")
    device = models.ForeignKey("devices.Device", on_delete=models.CASCADE, related_name="assignments")
    cohort_key = models.BigIntegerField()
    stage = models.IntegerField(null=True, blank=True, help_text="the stage that covered it")
    from_version = models.CharField(max_length=64, blank=True)
    from_artifact = models.ForeignKey(
        "registry.Artifact", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    to_artifact = models.ForeignKey(
        "registry.Artifact", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    variant = models.CharField(max_length=64, blank=True)
    generation = models.PositiveBigIntegerField(null=True, blank=True)
    state = models.CharField(max_length=12, choices=AssignmentState.choices, default=AssignmentState.PENDING)
    reason = models.CharField(max_length=200, blank=True)
    skip_code = models.CharField(max_length=20, choices=SkipReason.choices, blank=True)
    notified_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["rollout", "cohort_key"]
        constraints = [models.UniqueConstraint(fields=["rollout", "device"], name="rollouts_assignment_once")]
        indexes = [models.Index(fields=["rollout", "state"]), models.Index(fields=["device", "generation"])]


class GateEvaluation(models.Model):
    """One gate of one evaluation (for one variant where the gate compares like with like),
    with its inputs, its numbers and one sentence: why a decision was made."""

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="evaluations")
    stage = models.IntegerField()
    metric = models.CharField(max_length=40, choices=Metric.choices)
    variant = models.CharField(
        max_length=64, blank=True, default="", help_text="the variant compared, if per variant"
    )
    verdict = models.CharField(max_length=8, choices=Verdict.choices)
    candidate_value = models.FloatField(null=True)
    incumbent_value = models.FloatField(null=True)
    candidate_n = models.BigIntegerField(default=0)
    incumbent_n = models.BigIntegerField(default=0)
    candidate_devices = models.IntegerField(default=0)
    incumbent_devices = models.IntegerField(default=0)
    threshold = models.FloatField(null=True)
    p_value = models.FloatField(null=True)
    lower = models.FloatField(null=True, help_text="lower end of the confidence sequence")
    upper = models.FloatField(null=True, help_text="upper end of the confidence sequence")
    method = models.CharField(max_length=200, blank=True, default="")
    looks = models.IntegerField(default=0, help_text="evaluations of this stage so far, this one included")
    note = models.CharField(max_length=200, blank=True)
    summary = models.TextField(blank=True, default="", help_text="one sentence, for people")
    inputs = models.JSONField(default=dict, blank=True, help_text="what the gate was given")
    decision = models.CharField(max_length=16, choices=Decision.choices)
    evaluated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-evaluated_at", "metric", "variant"]
        indexes = [models.Index(fields=["rollout", "-evaluated_at"])]

    def __str__(self) -> str:
        variant = f" ({self.variant})" if self.variant else ""
        return f"{self.get_metric_display()}{variant}: {self.get_verdict_display().lower()}"


class AuditEntry(models.Model):
    """Who did what to a rollout, when and why (the evaluator is "system")."""

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="audit")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    action = models.CharField(max_length=20)
    from_state = models.CharField(max_length=12)
    to_state = models.CharField(max_length=12)
    stage = models.IntegerField()
    reason = models.TextField(blank=True)
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-at"]
        verbose_name_plural = "audit entries"

    def __str__(self) -> str:
        return f"{self.actor_name}: {self.action}"

    @property
    def actor_name(self) -> str:
        return str(self.actor) if self.actor else "system"


class RolloutHour(models.Model):
    """The telemetry of a rollout's devices summed per version and hour of window start, for
    hours the ingest can no longer change (it refuses windows older than INGEST_MAX_AGE_S):
    what the rollout page's telemetry charts read instead of adding up every device's hourly
    rollups of the whole rollout on each look. Kept by services.telemetry_summarize (beat);
    outlives the rollups' retention."""

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="+")
    version = models.CharField(max_length=64)
    hour = models.DateTimeField()
    inferences = models.PositiveBigIntegerField()
    errors = models.PositiveBigIntegerField()
    # Inference-weighted p95 latency: mean p95 = sum / weight (as in TelemetryHourly).
    latency_p95_weighted_sum = models.FloatField()
    latency_p95_weight = models.PositiveBigIntegerField()

    class Meta:
        ordering = ["rollout", "version", "hour"]
        constraints = [
            models.UniqueConstraint(fields=["rollout", "version", "hour"], name="rollouts_hour_once")
        ]
