"""Rollouts admin: where each rollout stands, why the evaluator decided what it did, and
the same actions as the API (one service each)."""

from __future__ import annotations

from collections import Counter

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError

from fleet.core.errors import ServiceError
from fleet.registry.admin import status_badge
from fleet.rollouts import services
from fleet.rollouts.models import Assignment, AuditEntry, GateEvaluation, Rollout, RolloutPolicy

STATE_COLOURS = {
    "draft": "#57606a",
    "running": "#0969da",
    "paused": "#9a6700",
    "completed": "#1a7f37",
    "aborted": "#57606a",
    "rolled_back": "#cf222e",
}


class RolloutPolicyForm(forms.ModelForm):
    class Meta:
        model = RolloutPolicy
        fields = "__all__"

    def clean(self):
        """The same declared checks as the API (fleet/rollouts/policy.py), shown on the field."""
        cleaned = super().clean()
        if "stages" in cleaned and "gates" in cleaned:
            try:
                services.policy_validate(stages=cleaned["stages"], gates=cleaned["gates"])
            except ServiceError as exc:
                raise ValidationError(
                    {"stages" if exc.code == "invalid_stages" else "gates": exc.message}
                ) from exc
        return cleaned


@admin.register(RolloutPolicy)
class RolloutPolicyAdmin(admin.ModelAdmin):
    form = RolloutPolicyForm
    list_display = ("name", "stage_summary", "on_failure", "approval", "pickup_timeout_seconds")

    @admin.display(description="stages")
    def stage_summary(self, obj):
        return " → ".join(
            f"{s['value']:g}{'%' if s['kind'] == 'percent' else ''}"
            + (" (shadow)" if s.get("mode") == "shadow" else "")
            for s in obj.stages
        )


class EvaluationInline(admin.TabularInline):
    """Each gate's verdict in one sentence with rounded figures (the numbers behind it are
    in the API's ``evaluations``, with their inputs)."""

    model = GateEvaluation
    fields = ("evaluated_at", "stage_number", "gate", "verdict", "summary", "decision", "looks", "method")
    readonly_fields = fields
    extra = 0
    can_delete = False
    max_num = 0
    ordering = ("-evaluated_at",)

    @admin.display(description="stage")
    def stage_number(self, obj):
        return obj.stage + 1

    @admin.display(description="gate")
    def gate(self, obj):
        return obj.get_metric_display() + (f" ({obj.variant})" if obj.variant else "")


class AuditInline(admin.TabularInline):
    model = AuditEntry
    fields = ("at", "actor", "action", "from_state", "to_state", "stage", "reason")
    readonly_fields = fields
    extra = 0
    can_delete = False
    max_num = 0


@admin.register(Rollout)
class RolloutAdmin(admin.ModelAdmin):
    list_display = ("__str__", "state_label", "stage", "progress", "policy", "priority", "created_at")
    list_filter = ("state", "model")
    readonly_fields = (
        "state",
        "current_stage",
        "stage_started_at",
        "awaiting_approval",
        "last_decision",
        "policy_snapshot",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
    )
    inlines = [AuditInline, EvaluationInline]
    actions = ["start", "pause", "resume", "promote", "abort", "rollback"]

    @admin.display(description="state", ordering="state")
    def state_label(self, obj):
        label = obj.get_state_display() + (" (awaiting approval)" if obj.awaiting_approval else "")
        return status_badge(obj.state, label, STATE_COLOURS)

    @admin.display(description="stage")
    def stage(self, obj):
        return f"{obj.current_stage + 1} of {len(obj.stages)}" if obj.current_stage >= 0 else "—"

    @admin.display(description="devices")
    def progress(self, obj):
        counts = Counter(Assignment.objects.filter(rollout=obj).values_list("state", flat=True))
        return ", ".join(f"{count} {state}" for state, count in sorted(counts.items())) or "—"

    def _act(self, request, queryset, action, verb):
        for rollout in queryset:
            try:
                action(rollout=rollout, by=request.user, reason=f"{verb} in the admin")
            except ServiceError as exc:
                self.message_user(request, f"Rollout {rollout.pk}: {exc.message}", messages.ERROR)
            else:
                self.message_user(request, f"Rollout {rollout.pk}: {verb}.", messages.SUCCESS)

    @admin.action(description="Start selected rollouts")
    def start(self, request, queryset):
        self._act(request, queryset, services.rollout_start, "started")

    @admin.action(description="Pause selected rollouts")
    def pause(self, request, queryset):
        self._act(request, queryset, services.rollout_pause, "paused")

    @admin.action(description="Resume selected rollouts")
    def resume(self, request, queryset):
        self._act(request, queryset, services.rollout_resume, "resumed")

    @admin.action(description="Promote selected rollouts to their next stage")
    def promote(self, request, queryset):
        self._act(request, queryset, services.rollout_promote, "promoted")

    @admin.action(description="Abort selected rollouts (devices keep what they run)")
    def abort(self, request, queryset):
        self._act(request, queryset, services.rollout_abort, "aborted")

    @admin.action(description="Roll back selected rollouts (devices return to their previous version)")
    def rollback(self, request, queryset):
        self._act(request, queryset, services.rollout_rollback, "rolled back")
