"""Rollouts admin: where each rollout stands and why, and the same actions as the API.

A rollout is never edited here once it exists (its history is what ops read mid-incident):
"Add rollout" goes through ``rollout_create`` with the API's checks, and every change of
state is a button that appears only when the state machine allows it, asks for a reason
and calls the same service as the API. Rollouts, gate evaluations and audit entries are
never deleted (fleet/core/roles.py).
"""

from __future__ import annotations

from collections import Counter

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count
from django.http import HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse

from fleet.core.choices import Role
from fleet.core.display import count, moment, raw_details
from fleet.core.errors import ServiceError
from fleet.core.forms import WordsField
from fleet.core.live import live_response
from fleet.core.permissions import has_role
from fleet.devices.models import DeviceGroup
from fleet.registry.admin import status_badge
from fleet.registry.models import ModelVersion
from fleet.rollouts import selectors, services
from fleet.rollouts.api import ACTIONS  # the API's action -> service table: the same services
from fleet.rollouts.choices import (
    IN_FLIGHT,
    ROLLOUT_TRANSITIONS,
    AssignmentState,
    RolloutState,
)
from fleet.rollouts.models import Assignment, Rollout, RolloutPolicy
from fleet.rollouts.selectors import stage_label, state_label
from fleet.rollouts.widgets import GatesWidget, StagesWidget, gates_text

STATE_COLOURS = {
    "draft": "#57606a",
    "running": "#0969da",
    "paused": "#9a6700",
    "completed": "#1a7f37",
    "aborted": "#57606a",
    "rolled_back": "#cf222e",
}
# The rollout page's live parts (fleet/core/live.py): each is its own template, also on the page.
LIVE_PARTS = {
    part: f"admin/rollouts/rollout/{part}.html"
    for part in ("status", "progress", "verdicts", "devices", "timeline")
}
# Devices that run (or are installing) the candidate: what a rollback or an abort concerns.
ON_CANDIDATE = (*IN_FLIGHT, AssignmentState.ACTIVE, AssignmentState.SHADOW)


def devices(n: int) -> str:
    return count(n, "device")


# --- the actions: which are legal now, and what each would do


ACTION_DONE = {
    "start": "started",
    "pause": "paused",
    "resume": "resumed",
    "promote": "promoted",
    "abort": "aborted",
    "rollback": "rolled back",
}
ACTION_LABELS = {
    "start": "Start",
    "pause": "Pause",
    "resume": "Resume",
    "promote": "Promote to the next stage",
    "abort": "Abort",
    "rollback": "Roll back",
}


def legal_actions(rollout: Rollout) -> list[str]:
    """The actions the state machine (ROLLOUT_TRANSITIONS) allows from the current state;
    the services refuse the others, so a button is never offered that would be refused."""
    state, allowed = rollout.state, ROLLOUT_TRANSITIONS[rollout.state]
    legal = {
        "start": state == RolloutState.DRAFT,
        "pause": RolloutState.PAUSED in allowed,
        "resume": state == RolloutState.PAUSED,
        "promote": state == RolloutState.RUNNING,
        "abort": RolloutState.ABORTED in allowed,
        "rollback": RolloutState.ROLLED_BACK in allowed,
    }
    return [action for action in ACTIONS if legal[action]]


def action_impact(rollout: Rollout, action: str) -> str:
    """What the action does to devices, in one sentence, with counts."""
    version = rollout.target_version.version
    on_candidate = rollout.assignments.filter(state__in=ON_CANDIDATE).count()
    if action == "start":
        targeted = services.target_devices(targets=rollout.targets).count()
        return (
            f"{devices(targeted)} are targeted; stage 1 ({stage_label(rollout.stages[0])}) "
            f"starts now and its devices are told to install {version}."
        )
    if action == "pause":
        return (
            f"No new stage starts and the gates stop acting; {devices(on_candidate)} keep "
            f"{version} (or go on installing it) until the rollout resumes, is aborted or rolled back."
        )
    if action == "resume":
        return f"The gates evaluate stage {rollout.current_stage + 1} again and promote when it passes."
    if action == "promote":
        following = rollout.current_stage + 1
        if following >= len(rollout.stages):
            return f"The rollout completes: {devices(on_candidate)} keep {version}."
        pending = rollout.assignments.filter(state=AssignmentState.PENDING).count()
        return (
            f"Stage {following + 1} ({stage_label(rollout.stages[following])}) starts now, "
            f"without waiting for the gates; up to {devices(pending)} waiting are told to install {version}."
        )
    if action == "abort":
        pending = rollout.assignments.filter(state=AssignmentState.PENDING).count()
        return (
            f"The rollout stops for good: {devices(on_candidate)} keep {version} "
            f"and {devices(pending)} never get it."
        )
    returning = (
        rollout.assignments.filter(state__in=(*ON_CANDIDATE, AssignmentState.FAILED))
        .values("from_version")
        .annotate(n=Count("pk"))
        .order_by("from_version")
    )
    parts = [f"{devices(row['n'])} return to {row['from_version'] or 'no model'}" for row in returning]
    return (", ".join(parts) or "No device runs the candidate") + "; the rollout is finished for good."


class ActionForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        max_length=2000,
        help_text="Why: it goes into the audit log with your name.",
    )

    def clean_reason(self):
        reason = self.cleaned_data["reason"].strip()
        if not reason:
            raise ValidationError("Say why.")
        return reason


# --- reading a rollout


def headline(rollout: Rollout) -> str:
    """The state and why, in one sentence: the latest person's action, else the evaluator's."""
    if rollout.state == RolloutState.DRAFT:
        return "Draft: not started. Starting it places the targeted devices and begins stage 1."
    latest = rollout.audit.select_related("actor").order_by("-at", "-pk").first()
    if latest is not None and latest.actor is not None and latest.to_state == rollout.state:
        reason = latest.reason or "no reason given"
        return f"{state_label(rollout.state)} by {latest.actor} at {moment(latest.at)}: {reason}"
    return rollout.last_decision or f"{state_label(rollout.state)}."


# --- "Add rollout": the API's service and checks


class RolloutAddForm(forms.Form):
    """The same inputs as ``POST /api/v1/rollouts/``; ``rollout_create`` checks them."""

    version = forms.ModelChoiceField(
        queryset=ModelVersion.objects.select_related("model").order_by("model__name", "-created_at"),
        help_text="The version to roll out (its model is the rollout's model).",
    )
    policy = forms.ModelChoiceField(queryset=RolloutPolicy.objects.order_by("name"))
    groups = forms.ModelMultipleChoiceField(
        queryset=DeviceGroup.objects.order_by("name"), required=False, to_field_name="name"
    )
    tags = WordsField(help_text="Device tags, separated by commas.")
    devices = WordsField(max_word_length=128, help_text="Device ids, separated by commas.")
    priority = forms.IntegerField(initial=0)

    def targets(self) -> dict[str, list[str]]:
        data = self.cleaned_data
        targets = {
            "groups": [group.name for group in data.get("groups") or []],
            "tags": data.get("tags") or [],
            "devices": data.get("devices") or [],
        }
        return {key: value for key, value in targets.items() if value}


@admin.register(Rollout)
class RolloutAdmin(admin.ModelAdmin):
    list_display = ("__str__", "state_badge", "stage", "progress", "policy", "priority", "created_at")
    list_filter = ("state", "model")
    list_select_related = ("model", "target_version", "policy")
    fields = (
        "model",
        "target_version",
        "policy",
        "targets_text",
        "priority",
        "state_badge",
        "stage",
        "awaiting_approval",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
        "raw",
    )
    readonly_fields = fields
    change_form_template = "admin/rollouts/rollout/change_form.html"

    # Read only: a rollout's history is never rewritten (actions are the buttons below).
    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="state", ordering="state")
    def state_badge(self, obj):
        label = obj.get_state_display() + (" (awaiting approval)" if obj.awaiting_approval else "")
        return status_badge(obj.state, label, STATE_COLOURS)

    @admin.display(description="stage")
    def stage(self, obj):
        if obj.current_stage < 0:
            return "—"
        spec = obj.stages[obj.current_stage]
        return f"{obj.current_stage + 1} of {len(obj.stages)} ({stage_label(spec)})"

    @admin.display(description="devices")
    def progress(self, obj):
        counts = Counter(Assignment.objects.filter(rollout=obj).values_list("state", flat=True))
        return (
            ", ".join(f"{count:,} {AssignmentState(state).label.lower()}" for state, count in counts.items())
            or "—"
        )

    @admin.display(description="targets")
    def targets_text(self, obj):
        return (
            "; ".join(f"{key}: {', '.join(values)}" for key, values in obj.targets.items() if values) or "—"
        )

    @admin.display(description="raw")
    def raw(self, obj):
        """For experts only, folded: the targets and the policy as the rollout copied it."""
        return raw_details({"targets": obj.targets, "policy": obj.policy_snapshot})

    # --- the page: what happened and why, who is affected, what can be done now

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("model", "target_version", "policy", "created_by")

    def page_context(self, request, rollout: Rollout) -> dict:
        """Everything the page's live parts show: the same for the page and its refresh."""
        can_act = has_role(request.user, Role.OPERATOR)
        state = request.GET.get("state") or ""
        page, device_rows = selectors.device_page(rollout, state=state, page=request.GET.get("page") or 1)
        evaluated_at, verdicts = selectors.latest_verdicts(rollout)
        return {
            "original": rollout,
            "headline": headline(rollout),
            "actions": [
                (
                    action,
                    ACTION_LABELS[action],
                    reverse("admin:rollouts_rollout_act", args=[rollout.pk, action]),
                )
                for action in (legal_actions(rollout) if can_act else [])
            ],
            "stage_rows": selectors.stage_progress(rollout) if rollout.current_stage >= 0 else [],
            "delivery": selectors.rollout_delivery(rollout).summary,
            # A draft: where starting it would put each device, by the code that will.
            "preview": selectors.rollout_preview(rollout) if rollout.state == RolloutState.DRAFT else None,
            "evaluated_at": moment(evaluated_at) if evaluated_at else None,
            "verdicts": verdicts,
            "device_state": state if state in AssignmentState.values else "",
            "device_states": AssignmentState.choices,
            "device_page": page,
            "device_rows": device_rows,
            "timeline": selectors.timeline(rollout),
            "charts": selectors.chart_data(rollout),
            "shadow_chart": bool(services.shadow_stages(rollout)),
            "live_url": reverse("admin:rollouts_rollout_live", args=[rollout.pk]),
        }

    def change_view(self, request, object_id, form_url="", extra_context=None):
        rollout = self.get_object(request, object_id)
        if rollout is not None and self.has_view_permission(request, rollout):
            extra_context = {**(extra_context or {}), **self.page_context(request, rollout)}
        return super().change_view(request, object_id, form_url, extra_context)

    def live_view(self, request, pk: int):
        """The page's live parts, for its refresh without a reload (fleet/core/live.py): the
        same templates as the page, as HTML fragments, and the charts' data."""
        rollout = get_object_or_404(self.get_queryset(request), pk=pk)
        if not self.has_view_permission(request, rollout):
            raise PermissionDenied
        context = self.page_context(request, rollout)
        return live_response(request, parts=LIVE_PARTS, context=context, charts=context["charts"])

    def get_urls(self):
        act = self.admin_site.admin_view(self.act_view)
        live = self.admin_site.admin_view(self.live_view)
        return [
            path("<int:pk>/act/<slug:action>/", act, name="rollouts_rollout_act"),
            path("<int:pk>/live/", live, name="rollouts_rollout_live"),
            *super().get_urls(),
        ]

    def act_view(self, request, pk: int, action: str):
        """Confirm (impact, required reason), then call the same service as the API."""
        if not has_role(request.user, Role.OPERATOR):
            raise PermissionDenied  # the API's IsOperator
        rollout = get_object_or_404(Rollout.objects.select_related("model", "target_version"), pk=pk)
        page = reverse("admin:rollouts_rollout_change", args=[pk])
        if action not in ACTIONS:
            raise PermissionDenied
        if action not in legal_actions(rollout):
            self.message_user(
                request, f"A {state_label(rollout.state).lower()} rollout cannot {action}.", messages.ERROR
            )
            return HttpResponseRedirect(page)
        form = ActionForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                ACTIONS[action](rollout=rollout, by=request.user, reason=form.cleaned_data["reason"])
            except ServiceError as exc:
                self.message_user(request, exc.message, messages.ERROR)
            else:
                self.message_user(request, f"{rollout} {ACTION_DONE[action]}.", messages.SUCCESS)
            return HttpResponseRedirect(page)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "original": rollout,
            "title": f"{ACTION_LABELS[action]} {rollout}?",
            "action": action,
            "action_label": ACTION_LABELS[action],
            "impact": action_impact(rollout, action),
            "form": form,
            "cancel_url": page,
        }
        return TemplateResponse(request, "admin/rollouts/rollout/act.html", context)

    # --- "Add rollout"

    def add_view(self, request, form_url="", extra_context=None):
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = RolloutAddForm(request.POST or None)
        preview = None
        if request.method == "POST" and form.is_valid():
            version, policy = form.cleaned_data["version"], form.cleaned_data["policy"]
            try:
                if "_preview" in request.POST:
                    # The same checks as creating, then what starting would do: nothing is written.
                    services.rollout_check(model=version.model, version=version, targets=form.targets())
                    preview = selectors.placement_preview(
                        model=version.model,
                        version=version,
                        targets=form.targets(),
                        stages=selectors.policy_stages(policy)[0],
                    )
                else:
                    rollout = services.rollout_create(
                        model=version.model,
                        version=version,
                        targets=form.targets(),
                        policy=policy,
                        priority=form.cleaned_data["priority"],
                        created_by=request.user,
                    )
                    self.message_user(
                        request, f"{rollout} created as a draft; start it here.", messages.SUCCESS
                    )
                    return HttpResponseRedirect(reverse("admin:rollouts_rollout_change", args=[rollout.pk]))
            except ServiceError as exc:
                field = {"targets": "groups"}.get(exc.field, exc.field)
                if exc.code in ("invalid_stages", "invalid_gates"):
                    field = "policy"
                form.add_error(field if field in form.fields else None, exc.message)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Add rollout",
            "form": form,
            "preview": preview,
        }
        return TemplateResponse(request, "admin/rollouts/rollout/add.html", context)


def utc_time_field(label: str, help_text: str) -> forms.TimeField:
    """A time of day typed as HH:MM (UTC), nothing else."""
    widget = forms.TimeInput(format="%H:%M", attrs={"placeholder": "HH:MM", "size": 6})
    return forms.TimeField(
        label=label, required=False, input_formats=["%H:%M"], widget=widget, help_text=help_text
    )


class RolloutPolicyForm(forms.ModelForm):
    """Stages and gates as rows and fields with units (fleet/rollouts/widgets.py), and the
    maintenance window as two times; all checked by the API's own policy_validate."""

    window_start = utc_time_field(
        "maintenance window from",
        "UTC. New stages start only inside the window; leave both times empty for any time.",
    )
    window_end = utc_time_field(
        "maintenance window until", "UTC. Before the start, the window crosses midnight (22:00 until 05:00)."
    )

    class Meta:
        model = RolloutPolicy
        exclude = ("maintenance_window",)  # the two times above say it
        # Rows and fields with units, not JSON (the JSON document is still accepted as posted).
        widgets = {"stages": StagesWidget, "gates": GatesWidget}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        window = self.instance.maintenance_window
        if isinstance(window, dict):
            self.initial.setdefault("window_start", window.get("start"))
            self.initial.setdefault("window_end", window.get("end"))

    def window(self) -> dict | None:
        """The window the two times say: both or neither."""
        start, end = self.cleaned_data.get("window_start"), self.cleaned_data.get("window_end")
        if start is None and end is None:
            return None
        return {
            "start": start.strftime("%H:%M") if start else "",
            "end": end.strftime("%H:%M") if end else "",
        }

    def clean(self):
        """The same declared checks as the API (fleet/rollouts/policy.py), shown on the field."""
        cleaned = super().clean()
        if self.has_error("window_start") or self.has_error("window_end"):
            return cleaned
        window = self.window()
        if window is not None and not (window["start"] and window["end"]):
            missing = "window_end" if window["start"] else "window_start"
            self.add_error(missing, "Give both times of the window, or neither for any time.")
            return cleaned
        if "stages" in cleaned and "gates" in cleaned:
            try:
                services.policy_validate(
                    stages=cleaned["stages"], gates=cleaned["gates"], maintenance_window=window
                )
            except ServiceError as exc:
                field = {"invalid_stages": "stages", "invalid_gates": "gates"}.get(exc.code)
                if field is None:
                    field = "window_start" if exc.field == "maintenance_window.start" else "window_end"
                raise ValidationError({field: exc.message}) from exc
        return cleaned

    def save(self, commit=True):
        self.instance.maintenance_window = self.window()
        return super().save(commit)


@admin.register(RolloutPolicy)
class RolloutPolicyAdmin(admin.ModelAdmin):
    form = RolloutPolicyForm
    change_form_template = "admin/rollouts/rolloutpolicy/change_form.html"
    list_display = (
        "name",
        "stage_summary",
        "on_failure",
        "approval",
        "window_text",
        "pickup_timeout_seconds",
    )
    fields = (
        "name",
        "description",
        "stages",
        "gates",
        ("on_failure", "approval"),
        ("window_start", "window_end"),
        "pickup_timeout_seconds",
    )
    # What a viewer reads instead of the editor: the same policy in words, the document folded.
    read_only_fields = (
        "name",
        "description",
        "stage_summary",
        "gate_summary",
        "on_failure",
        "approval",
        "window_text",
        "pickup_timeout_seconds",
        "raw",
    )
    readonly_fields = ("stage_summary", "gate_summary", "window_text", "raw")

    def get_fields(self, request, obj=None):
        if obj is not None and not self.has_change_permission(request, obj):
            return self.read_only_fields
        return self.fields

    @admin.display(description="stages")
    def stage_summary(self, obj):
        return " → ".join(stage_label(spec) for spec in obj.stages)

    @admin.display(description="gates")
    def gate_summary(self, obj):
        return gates_text(obj.gates)

    @admin.display(description="maintenance window")
    def window_text(self, obj):
        return selectors.window_label(obj.maintenance_window)

    @admin.display(description="raw")
    def raw(self, obj):
        return raw_details(obj.snapshot())
