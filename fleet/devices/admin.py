"""Devices admin: who is online, what each runs, when it was last heard from; bulk
approve / disable / retire through the same services as the API."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlencode

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import F
from django.http import HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from fleet.core.choices import Role
from fleet.core.display import count, duration, moment, raw_details, time_column
from fleet.core.errors import InvalidInput, ServiceError
from fleet.core.forms import WordsField, label_split_datetime, words_text
from fleet.core.live import live_response, render_fields
from fleet.core.permissions import has_role
from fleet.devices import selectors, services
from fleet.devices.choices import DeviceStatus, EventReason, GroupKind, event_type_label, reason_label
from fleet.devices.models import Device, DeviceEvent, DeviceGroup, EnrollmentToken, IngestRefusal
from fleet.registry.admin import status_badge
from fleet.registry.models import Artifact

STATUS_COLOURS = {"active": "#1a7f37", "pending": "#9a6700", "disabled": "#cf222e", "retired": "#57606a"}
TOKEN_STATE_COLOURS = {"usable": "#1a7f37", "expired": "#57606a", "used_up": "#9a6700", "revoked": "#cf222e"}


HEALTH = (
    ("cpu_pct", "CPU {:.1f} %"),
    ("rss_mb", "RSS {:.1f} MB"),
    ("temp_c", "{:.1f} °C"),
    ("disk_free_mb", "disk free {:,.0f} MB"),
)


class DeviceChangeForm(forms.ModelForm):
    """What people may change about a device (as ``PATCH /api/v1/devices/{id}/``); tags
    are words separated by commas, not a JSON list."""

    tags = WordsField()

    class Meta:
        model = Device
        fields = ("display_name", "tags")


class DeviceAddForm(forms.ModelForm):
    """Pre-authorizing an id: the model's own validators refuse bad and reserved ids."""

    tags = WordsField()

    class Meta:
        model = Device
        fields = ("device_id", "display_name", "tags")


class RunningFilter(admin.SimpleListFilter):
    """Devices that report running a model version and variant ("digits:1.0.0:int8"), the
    dashboard's stacked bar links here."""

    title = "running"
    parameter_name = "running"

    def lookups(self, request, model_admin):
        value = self.value()
        return [(value, value.replace(":", " ", 1).replace(":", " [", 1) + "]")] if value else []

    def queryset(self, request, queryset):
        if not self.value():
            return queryset
        model, _, rest = self.value().partition(":")
        version, _, variant = rest.partition(":")
        entry = {"version": version, **({"variant": variant} if variant and variant != "?" else {})}
        return queryset.filter(reported_models__contains={model: entry})


class GenerationFilter(admin.SimpleListFilter):
    title = "generation"
    parameter_name = "generation"

    def lookups(self, request, model_admin):
        return [("behind", "behind the desired one"), ("current", "up to date")]

    def queryset(self, request, queryset):
        if self.value() == "behind":
            return queryset.filter(applied_generation__lt=F("desired_generation"))
        if self.value() == "current":
            return queryset.filter(applied_generation__gte=F("desired_generation"))
        return queryset


class GroupFilter(admin.SimpleListFilter):
    """Members of a group, static or dynamic (the dynamic ones by their saved filter now),
    as the API's ``?group=``; the group pages link here."""

    title = "group"
    parameter_name = "group"

    def lookups(self, request, model_admin):
        return [(name, name) for name in DeviceGroup.objects.values_list("name", flat=True)]

    def queryset(self, request, queryset):
        if not self.value():
            return queryset
        group = DeviceGroup.objects.filter(name=self.value()).first()
        return selectors.group_devices(group=group, queryset=queryset) if group else queryset.none()


# --- the device page: health over time, events in words, rollout history


def health_summary(series: dict) -> list[dict]:
    """Each sparkline's latest hour and its range, in words (also the text beside the chart)."""
    summaries = []
    for line in series["series"]:
        known = [value for value in line["points"] if value is not None]
        fmt = f"{{:,.{line['decimals']}f}} {line['unit']}"
        summaries.append(
            {
                **line,
                "latest": fmt.format(known[-1]) if known else "no telemetry",
                "range": f"{fmt.format(min(known))} to {fmt.format(max(known))}" if known else "",
            }
        )
    return summaries


def event_row(event: DeviceEvent) -> dict:
    model = " ".join(part for part in (event.model, event.version) if part)
    return {
        "event": event,
        "at": moment(event.received_at),
        "device_at": moment(event.ts),
        "type": event_type_label(event.type),
        "model": f"{model} [{event.variant}]" if event.variant else model or "—",
        "reason": reason_label(event.reason) or "—",
    }


def assignment_row(assignment) -> dict:
    to = assignment.to_artifact
    before = assignment.from_version or "no model"
    if assignment.from_artifact is not None:
        before += f" [{assignment.from_artifact.variant}]"
    return {
        "rollout": assignment.rollout,
        "url": reverse("admin:rollouts_rollout_change", args=[assignment.rollout_id]),
        "stage": assignment.stage + 1 if assignment.stage is not None else "—",
        "change": f"{before} → {to.version.version} [{to.variant}]" if to else f"{before} → (none chosen)",
        "state": assignment.get_state_display(),
        "reason": reason_label(assignment.reason) or "—",
        "generation": assignment.generation or "—",
        "updated": moment(assignment.updated_at),
    }


def device_page(device: Device) -> dict:
    """What the device page shows below its fields (a fixed number of queries)."""
    series = selectors.device_health_series(device=device, now=timezone.now())
    return {
        "live_url": reverse("admin:devices_device_live", args=[device.pk]),
        "health_series": series,
        "health_lines": health_summary(series),
        "events": [event_row(event) for event in selectors.device_recent_events(device=device)],
        "events_url": reverse("admin:devices_deviceevent_changelist")
        + "?"
        + urlencode({"q": device.device_id}),
        "history": [assignment_row(row) for row in selectors.device_rollout_history(device=device)],
    }


# The device page's live parts (fleet/core/live.py), each also on the page: the health
# figures in words (one part per sparkline), the events, the rollout history; and the
# read-only fields that change as the device reports (never the form's name and tags).
DEVICE_PARTS = {"events": "admin/devices/device/events.html", "history": "admin/devices/device/history.html"}
DEVICE_LIVE_FIELDS = (
    "status_label",
    "online_dot",
    "last_seen",
    "models",
    "desired",
    "generations",
    "trust_versions",
    "health_text",
)


def device_live_parts(page: dict) -> dict:
    health = {
        f"health-{line['key']}": ("admin/devices/device/health_line.html", {"line": line})
        for line in page["health_lines"]
    }
    return {**health, **DEVICE_PARTS}


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    list_display = (
        "device_id",
        "online_dot",
        "status_label",
        "models",
        "hardware",
        "agent_version",
        "last_seen",
        "applied_generation",
        "desired_generation",
    )
    list_filter = (
        "status",
        "online",
        GenerationFilter,
        RunningFilter,
        "hardware",
        "supports_int8",
        "keyring_version",
        GroupFilter,
    )
    search_fields = ("device_id", "display_name", "tags")
    form = DeviceChangeForm
    change_fields = (
        "device_id",
        "display_name",
        "tags",
        "status_label",
        "online_dot",
        "last_seen",
        "identity",
        "models",
        "desired",
        "generations",
        "trust_versions",
        "health_text",
        "enrolled",
        "raw",
    )
    readonly_fields = (*(name for name in change_fields if name not in ("display_name", "tags")), "tags_text")
    actions = ["approve", "disable", "retire"]
    # "Add device" pre-authorizes an id (the same service as the API); everything else
    # about a device comes from the device itself.
    add_fields = ("device_id", "display_name", "tags")

    change_form_template = "admin/devices/device/change_form.html"  # sparklines, events, rollouts

    def get_fields(self, request, obj=None):
        if obj is None:
            return self.add_fields
        if not self.has_change_permission(request, obj):
            # Read only (a viewer): the tags in words, not the JSON list Django would show.
            return tuple("tags_text" if name == "tags" else name for name in self.change_fields)
        return self.change_fields

    @admin.display(description="tags")
    def tags_text(self, obj):
        return words_text(obj.tags) or "—"

    def change_view(self, request, object_id, form_url="", extra_context=None):
        device = self.get_object(request, object_id)
        if device is not None:
            extra_context = {**(extra_context or {}), **device_page(device)}
        return super().change_view(request, object_id, form_url, extra_context)

    def get_readonly_fields(self, request, obj=None):
        return () if obj is None else self.readonly_fields

    def get_urls(self):
        live = self.admin_site.admin_view(self.live_view)
        return [path("<int:pk>/live/", live, name="devices_device_live"), *super().get_urls()]

    def live_view(self, request, pk: int):
        """The page's live parts and read-only fields, for its refresh without a reload
        (fleet/core/live.py): the same templates and display methods as the page."""
        device = get_object_or_404(self.get_queryset(request), pk=pk)
        if not self.has_view_permission(request, device):
            raise PermissionDenied
        page = device_page(device)
        return live_response(
            request,
            parts=device_live_parts(page),
            context=page,
            fields=render_fields(request, self, device, DEVICE_LIVE_FIELDS),
            charts=page["health_series"],
        )

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = DeviceAddForm
        return super().get_form(request, obj, **kwargs)

    def has_delete_permission(self, request, obj=None):
        # "Delete" is the retire door (delete_view below): a deleted row would free its id,
        # and a retired id must never come back (issue 9, section 1). Operators retire, as
        # in the API; a retired device has nothing left to retire.
        if obj is not None and obj.status == DeviceStatus.RETIRED:
            return False
        return has_role(request.user, Role.OPERATOR)

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # the "retire" action does it through the service
        return actions

    def delete_view(self, request, object_id, extra_context=None):
        """Retire through the service (token and broker login removed), never a row delete."""
        device = self.get_object(request, object_id)
        if device is None or not self.has_delete_permission(request, device):
            raise PermissionDenied
        if request.method == "POST":
            try:
                services.device_retire(device=device)
            except ServiceError as exc:
                self.message_user(request, f"{device}: {exc.message}", messages.ERROR)
            else:
                self.message_user(
                    request,
                    f"{device} is retired: its token and broker login no longer work.",
                    messages.SUCCESS,
                )
            return HttpResponseRedirect(reverse("admin:devices_device_change", args=[device.pk]))
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "original": device,
            "title": f"Retire {device}?",
        }
        return TemplateResponse(request, "admin/devices/device/retire.html", context)

    def save_model(self, request, obj, form, change):
        if change:
            services.device_update(
                device=obj, display_name=form.cleaned_data["display_name"], tags=form.cleaned_data["tags"]
            )
            return
        # The form has refused bad and reserved ids already (the model's validators); the
        # service checks again, as for the API.
        device, code = services.device_preauthorize(
            device_id=obj.device_id, display_name=obj.display_name, tags=obj.tags or []
        )
        obj.pk = device.pk
        self.message_user(
            request,
            f"{device} is pre-authorized. Its one-time enrollment code, shown only now: {code}",
            messages.WARNING,
        )

    @admin.display(description="online", ordering="online")
    def online_dot(self, obj):
        colour, label = ("#1a7f37", "online") if obj.online else ("#8c959f", "offline")
        dot = '<span title="{}" style="color:{};font-size:1.3em">●</span> {}'
        return format_html(dot, label, colour, label)

    @admin.display(description="status", ordering="status")
    def status_label(self, obj):
        return status_badge(obj.status, obj.get_status_display(), STATUS_COLOURS)

    @admin.display(description="running")
    def models(self, obj):
        return (
            ", ".join(
                f"{name} {m.get('version')} [{m.get('variant')}]"
                for name, m in sorted(obj.reported_models.items())
            )
            or "—"
        )

    @admin.display(description="identity")
    def identity(self, obj):
        runtime = f"{obj.runtime} {obj.runtime_version}".strip() or "unknown runtime"
        int8 = "runs int8" if obj.supports_int8 else "no int8"
        return (
            f"{obj.hardware}, {runtime}, {int8}, {count(len(obj.supported_ops or []), 'TFLite op')}, "
            f"agent {obj.agent_version or 'unknown'}"
        )

    @admin.display(description="should run")
    def desired(self, obj):
        """What we last told the device, with links to the artifacts."""
        ids = {**obj.desired_artifacts, **{m: s.get("artifact") for m, s in obj.desired_shadows.items()}}
        artifacts = Artifact.objects.select_related("version__model").in_bulk(
            [pk for pk in ids.values() if isinstance(pk, int)]
        )
        rows = [
            (
                reverse("admin:registry_artifact_change", args=[pk]),
                artifacts[pk],
                " (shadow)" * (name in obj.desired_shadows),
            )
            for name, pk in sorted(ids.items())
            if pk in artifacts
        ]
        return format_html_join(", ", '<a href="{}">{}</a>{}', rows) or "—"

    @admin.display(description="generation")
    def generations(self, obj):
        lag = obj.desired_generation - obj.applied_generation
        behind = f", {count(lag, 'generation')} behind" if lag > 0 else ""
        return f"applied {obj.applied_generation} of {obj.desired_generation}{behind}"

    @admin.display(description="verifies with")
    def trust_versions(self, obj):
        if obj.keyring_version is None:
            return "no keyring reported yet"
        return f"keyring version {obj.keyring_version} under root version {obj.root_version}"

    @admin.display(description="health")
    def health_text(self, obj):
        health = obj.health or {}
        parts = [text.format(health[key]) for key, text in HEALTH if isinstance(health.get(key), int | float)]
        if isinstance(health.get("uptime_s"), int | float):
            parts.append(f"up {duration(health['uptime_s'])}")
        return ", ".join(parts) or "—"

    @admin.display(description="enrolled")
    def enrolled(self, obj):
        if obj.enrolled_at is None:
            return "not yet"
        how = f" with token {obj.enrolled_with.name}" if obj.enrolled_with else " with its one-time code"
        return f"{moment(obj.enrolled_at)}{how}"

    @admin.display(description="raw")
    def raw(self, obj):
        fields = ("supported_ops", "reported_models", "health", "desired_artifacts", "desired_shadows")
        return raw_details({name: getattr(obj, name) for name in fields})

    @admin.display(description="last seen", ordering="last_seen_at")
    def last_seen(self, obj):
        if obj.last_seen_at is None:
            return "never"
        seconds = int((timezone.now() - obj.last_seen_at).total_seconds())
        return (
            f"{seconds} s ago"
            if seconds < 120
            else f"{seconds // 60} min ago"
            if seconds < 7200
            else moment(obj.last_seen_at)
        )

    def _bulk(self, request, queryset, action, verb: str) -> None:
        done = 0
        for device in queryset:
            try:
                action(device=device)
                done += 1
            except ServiceError as exc:
                self.message_user(request, f"{device}: {exc.message}", messages.ERROR)
        if done:
            self.message_user(request, f"{verb} {done} device(s).", messages.SUCCESS)

    @admin.action(description="Approve selected devices", permissions=["change"])
    def approve(self, request, queryset):
        self._bulk(request, queryset, services.device_approve, "Approved")

    @admin.action(
        description="Disable selected devices (revokes token and broker login, disconnects)",
        permissions=["change"],
    )
    def disable(self, request, queryset):
        self._bulk(request, queryset, services.device_disable, "Disabled")

    @admin.action(description="Retire selected devices (final)", permissions=["change"])
    def retire(self, request, queryset):
        self._bulk(request, queryset, services.device_retire, "Retired")


ANY_YES_NO = (("", "any"), ("yes", "yes"), ("no", "no"))
YES_NO = {True: "yes", False: "no"}


class DeviceGroupForm(forms.ModelForm):
    """A group as people say it: static (chosen devices) or dynamic, whose saved filter is
    one field per rule key (fleet/devices/selectors.py RULES), not a JSON document. The
    rules are checked by the API's own validate_group_rules; its refusal is a form error."""

    # Device ids typed as words, not a list of every device: a fleet has thousands.
    members = WordsField(label="devices", max_word_length=128, help_text="Device ids, separated by commas.")
    rule_tags = WordsField(
        label="tags", help_text="Devices with every one of these tags, separated by commas."
    )
    rule_hardware = forms.CharField(label="hardware", required=False, max_length=64, help_text="e.g. rpi4")
    rule_status = forms.ChoiceField(
        label="status", required=False, choices=[("", "any"), *DeviceStatus.choices]
    )
    rule_online = forms.ChoiceField(label="online", required=False, choices=ANY_YES_NO)
    rule_runtime = forms.CharField(label="runtime", required=False, max_length=64, help_text="e.g. litert")
    rule_agent_version = forms.CharField(label="agent version", required=False, max_length=32)
    rule_supports_int8 = forms.ChoiceField(label="runs int8", required=False, choices=ANY_YES_NO)

    class Meta:
        model = DeviceGroup
        fields = ("name", "description", "kind", "members")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.initial["members"] = list(
                self.instance.members.order_by("device_id").values_list("device_id", flat=True)
            )
        rules = self.instance.rules if self.instance.pk and isinstance(self.instance.rules, dict) else {}
        for key, value in rules.items():
            if f"rule_{key}" in self.fields:
                self.initial[f"rule_{key}"] = YES_NO.get(value, value) if isinstance(value, bool) else value

    def clean_members(self) -> list[Device]:
        ids = self.cleaned_data["members"]
        found = {device.device_id: device for device in Device.objects.filter(device_id__in=ids)}
        unknown = [device_id for device_id in ids if device_id not in found]
        if unknown:
            raise forms.ValidationError(f"No such device: {', '.join(unknown)}.")
        return [found[device_id] for device_id in ids]

    def rules(self) -> dict:
        """The saved filter the fields say (blank fields are not rules); none for a static group."""
        if self.cleaned_data.get("kind") != GroupKind.DYNAMIC:
            return {}
        rules = {}
        for key in selectors.RULES:
            value = self.cleaned_data.get(f"rule_{key}")
            if key in selectors.YES_NO_RULES and value:
                value = value == "yes"
            if value not in ("", None, []):
                rules[key] = value
        return rules

    def clean(self):
        cleaned = super().clean()
        try:
            selectors.validate_group_rules(self.rules())
        except InvalidInput as exc:
            raise forms.ValidationError(exc.message, code=exc.code) from exc
        return cleaned


@admin.register(DeviceGroup)
class DeviceGroupAdmin(admin.ModelAdmin):
    form = DeviceGroupForm
    list_display = ("name", "kind", "rule_text", "devices_link", "description")
    list_filter = ("kind",)
    search_fields = ("name", "description")
    readonly_fields = ("rule_text", "devices_link", "raw")
    RULE_FIELDS = tuple(f"rule_{key}" for key in selectors.RULES)

    def get_fieldsets(self, request, obj=None):
        now = (("Now", {"fields": ("rule_text", "devices_link", "raw")}),) if obj is not None else ()
        if obj is not None and not self.has_change_permission(request, obj):
            return ((None, {"fields": ("name", "description", "kind")}), *now)  # read only, in words
        return (
            (None, {"fields": ("name", "description", "kind")}),
            ("Static group: the chosen devices", {"fields": ("members",)}),
            (
                "Dynamic group: the saved filter",
                {
                    "fields": self.RULE_FIELDS,
                    "description": "A device is a member while it matches every rule given; a blank "
                    "rule matches any device. Devices that enroll or change later join by themselves.",
                },
            ),
            *now,
        )

    @admin.display(description="members")
    def rule_text(self, obj):
        if obj.kind == GroupKind.STATIC:
            return "the chosen devices"
        return selectors.group_rules_sentence(obj.rules)

    @admin.display(description="devices now")
    def devices_link(self, obj):
        url = reverse("admin:devices_device_changelist") + "?" + urlencode({"group": obj.name})
        return format_html(
            '<a href="{}">{}</a>', url, count(selectors.group_devices(group=obj).count(), "device")
        )

    @admin.display(description="raw")
    def raw(self, obj):
        return raw_details({"kind": obj.kind, "rules": obj.rules})

    def save_model(self, request, obj, form, change):
        """Through the same service as the API (the form has checked the rules already)."""
        fields = {
            "name": form.cleaned_data["name"],
            "kind": form.cleaned_data["kind"],
            "description": form.cleaned_data["description"],
            "members": list(form.cleaned_data["members"]),
            "rules": form.rules(),
        }
        group = services.group_update(group=obj, **fields) if change else services.group_create(**fields)
        obj.pk = group.pk

    def save_related(self, request, form, formsets, change):
        pass  # the service has set the members


class EnrollmentTokenForm(forms.ModelForm):
    """Every token made or edited here has an expiry and a use limit (the defaults are
    filled in), and the form refuses on the field what the service would refuse."""

    tags = WordsField(help_text="Tags given to the devices it enrolls, separated by commas.")

    class Meta:
        model = EnrollmentToken
        fields = ("name", "auto_approve", "expires_at", "max_uses", "tags")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in ("expires_at", "max_uses"):
            if name in self.fields:  # a viewer's form has no fields
                self.fields[name].required = True
        if "expires_at" in self.fields:
            label_split_datetime(self.fields["expires_at"], "Expires")

    def clean(self):
        """The service's own checks (creation's, or an edit's), shown on their fields."""
        cleaned = super().clean()
        try:
            services.enrollment_token_check(
                token=self.instance if self.instance.pk else None,
                expires_at=cleaned.get("expires_at"),
                max_uses=cleaned.get("max_uses"),
                tags=cleaned.get("tags"),
            )
        except InvalidInput as exc:
            self.add_error(exc.field if exc.field in self.fields else None, exc.message)
        return cleaned


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(admin.ModelAdmin):
    form = EnrollmentTokenForm
    list_display = (
        "name",
        "prefix",
        "state_label",
        "auto_approve",
        "uses",
        "max_uses",
        "expires_at_text",
        "revoked_at_text",
        "created_at_text",
    )
    fields = ("name", "auto_approve", "expires_at", "max_uses", "tags")
    readonly_fields = ("tags_text",)
    expires_at_text = time_column("expires_at", "expires at")
    revoked_at_text = time_column("revoked_at", "revoked at")
    created_at_text = time_column("created_at", "created at")
    actions = ["revoke"]

    def get_fields(self, request, obj=None):
        if obj is not None and not self.has_change_permission(request, obj):
            # Read only (a viewer): the tags in words, not the JSON list Django would show.
            return tuple("tags_text" if name == "tags" else name for name in self.fields)
        return self.fields

    @admin.display(description="tags")
    def tags_text(self, obj):
        return words_text(obj.tags) or "—"

    @admin.display(description="state")
    def state_label(self, obj):
        state = obj.state
        return status_badge(state, state.label, TOKEN_STATE_COLOURS)

    def get_changeform_initial_data(self, request):
        # The defaults a token gets, shown in the form, so that whoever makes one sees its
        # expiry and use limit (and may change them) before it exists.
        return {
            **super().get_changeform_initial_data(request),
            "expires_at": timezone.now() + timedelta(days=settings.ENROLLMENT_TOKEN_DEFAULT_TTL_DAYS),
            "max_uses": settings.ENROLLMENT_TOKEN_DEFAULT_MAX_USES,
        }

    def save_model(self, request, obj, form, change):
        if change:
            # From the row as it is now: the form has already put its values on ``obj``.
            services.enrollment_token_update(
                token=EnrollmentToken.objects.get(pk=obj.pk),
                **{name: form.cleaned_data[name] for name in self.fields},
            )
            obj.refresh_from_db()
            return
        token, key = services.enrollment_token_create(
            name=obj.name,
            auto_approve=obj.auto_approve,
            expires_at=obj.expires_at,
            max_uses=obj.max_uses,
            tags=obj.tags or [],
            created_by=request.user,
        )
        obj.pk = token.pk
        self.message_user(
            request, f"Enrollment token created. Copy it now, it is shown only once: {key}", messages.WARNING
        )

    @admin.action(description="Revoke selected enrollment tokens", permissions=["change"])
    def revoke(self, request, queryset):
        for token in queryset:
            services.enrollment_token_revoke(token=token)


class ReasonFilter(admin.SimpleListFilter):
    """Events by reason code, named in words; events without one are "no reason code"
    (the stock filter showed them as a link without text, and read every event's reason
    to list the values: the codes are the contract's, agent/protocol/codes.py)."""

    title = "reason"
    parameter_name = "reason"
    NONE = "none"

    def lookups(self, request, model_admin):
        return [(self.NONE, "no reason code"), *((code, reason_label(code)) for code in EventReason.values)]

    def queryset(self, request, queryset):
        if self.value() is None:
            return queryset
        return queryset.filter(reason="" if self.value() == self.NONE else self.value())


@admin.register(DeviceEvent)
class DeviceEventAdmin(admin.ModelAdmin):
    list_display = (
        "received_at_text",
        "device",
        "type_text",
        "generation",
        "model",
        "version",
        "variant",
        "reason_text",
    )
    list_filter = ("type", ReasonFilter, "received_at")
    search_fields = ("device__device_id", "message")
    list_select_related = ("device",)
    received_at_text = time_column("received_at", "received at")

    @admin.display(description="type", ordering="type")
    def type_text(self, obj):
        return event_type_label(obj.type)

    @admin.display(description="reason", ordering="reason")
    def reason_text(self, obj):
        return reason_label(obj.reason) or "—"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # append-only: the device's own account of what happened


@admin.register(IngestRefusal)
class IngestRefusalAdmin(admin.ModelAdmin):
    """What the ingest bridges refused per device and reason (docs/ingest.md): read only."""

    list_display = ("device", "reason", "count", "first_at_text", "last_at_text")
    list_filter = ("reason",)
    search_fields = ("device__device_id",)
    list_select_related = ("device",)
    ordering = ("-last_at",)
    first_at_text = time_column("first_at", "first at")
    last_at_text = time_column("last_at", "last at")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
