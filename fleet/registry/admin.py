"""Registry admin for ops staff: what is there, what state it is in, how small it got,
how accurate each variant is. Writes go through the same services as the API."""

from __future__ import annotations

import base64
import json
from urllib.parse import urlencode

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import csrf_protect_m
from django.core.exceptions import PermissionDenied
from django.core.files.uploadedfile import TemporaryUploadedFile
from django.db.models import Count
from django.http import HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.defaultfilters import filesizeformat
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from agent import protocol
from fleet.core.choices import Role
from fleet.core.display import count, moment, percent, raw_details, short_hash, size, time_column
from fleet.core.errors import ServiceError
from fleet.core.live import live_response, render_fields
from fleet.core.permissions import has_role
from fleet.devices.choices import DeviceStatus
from fleet.registry import selectors, services, trust
from fleet.registry.api import VERSION_ACTIONS  # the API's action -> status table: the same service
from fleet.registry.choices import ArtifactFailure, ArtifactStatus, DeltaStatus, QuantRecipe, VersionStatus
from fleet.registry.models import Artifact, Keyring, MLModel, ModelVersion, SigningKey, TrustRoot

STATUS_COLOURS = {
    ArtifactStatus.READY: "#1a7f37",
    ArtifactStatus.PENDING: "#9a6700",
    ArtifactStatus.FAILED: "#cf222e",
    ArtifactStatus.REJECTED: "#bc4c00",
    VersionStatus.RELEASED: "#1a7f37",
    VersionStatus.DRAFT: "#57606a",
    VersionStatus.DEPRECATED: "#9a6700",
    VersionStatus.REVOKED: "#cf222e",
}


def status_badge(value: str, label: str, colours: dict[str, str] = STATUS_COLOURS):
    return format_html(
        '<span style="color:#fff;background:{};padding:1px 7px;border-radius:9px">{}</span>',
        colours.get(value, "#57606a"),
        label,
    )


# --- the model and version pages: variants in units, where each version runs, its rollouts


def running_url(model: MLModel, version: str, variant: str) -> str:
    """The device list filtered to the active devices that report running this variant."""
    query = urlencode({"status__exact": DeviceStatus.ACTIVE, "running": f"{model.name}:{version}:{variant}"})
    return f"{reverse('admin:devices_device_changelist')}?{query}"


def hardware_url(hardware: str, group: str | None) -> str:
    """The device list filtered to the active devices of a hardware class (and group)."""
    query = {"status__exact": DeviceStatus.ACTIVE, "hardware": hardware}
    if group:
        query["group"] = group
    return f"{reverse('admin:devices_device_changelist')}?{urlencode(query)}"


def deltas_table(version: ModelVersion) -> list[dict]:
    """The deltas made to this version's variants (docs/protocol.md, addition 11), in words."""
    return [
        {
            "variant": delta.target.variant,
            "base": delta.base.version.version,
            "status": delta.get_status_display(),
            "offered": delta.status == DeltaStatus.READY,
            "size": size(delta.blob_size),
            "of_full": percent(delta.ratio, 0),
            "reason": delta.reason,
        }
        for delta in selectors.version_deltas(version)
    ]


def compatibility_table(version: ModelVersion) -> dict:
    """The compatibility matrix (docs/rollouts.md) in words: per group and hardware class,
    how many devices can run each ready variant and how many a rollout would give it."""
    from fleet.rollouts.selectors import version_compatibility  # rollouts reads the registry

    matrix = version_compatibility(version=version)
    variants = [
        {
            "name": n.variant,
            "needs": ", ".join(
                part
                for part in (
                    "any hardware" if "any" in n.hardware else f"{'/'.join(sorted(n.hardware))} only",
                    "int8 support" if n.quantization in ("int8", "uint8", "int4") else "",
                    f"TFLite runtime ≥ {'.'.join(map(str, n.min_runtime))}" if n.min_runtime else "",
                )
                if part
            ),
        }
        for n in matrix.variants
    ]
    rows = [
        {
            "group": row.group or "All devices",
            "hardware": row.hardware,
            "devices": f"{row.devices:,}",
            "url": hardware_url(row.hardware, row.group),
            "cells": [
                {"runs": f"{row.runs.get(v['name'], 0):,}", "gets": f"{row.gets.get(v['name'], 0):,}"}
                for v in variants
            ],
            "skipped": f"{row.skipped:,}",
            "why": "; ".join(f"{count(n, 'device')}: {why}" for why, n in row.skipped_reasons.items()),
        }
        for row in matrix.rows
    ]
    return {"variants": variants, "rows": rows}


def _drop(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) < 0.05:
        return "no change"
    return f"{value:.1f} pp lower" if value > 0 else f"{-value:.1f} pp higher"


def variant_row(artifact: Artifact, reference: Artifact | None = None) -> dict:
    """One variant in words and units: sizes, compression, golden accuracy and its drop
    against float32 (``reference``: the version's float32; a produced variant's parent wins),
    median CPU latency, ops and where it came from."""
    signature = artifact.tflite_signature or {}
    ops = signature.get("ops") or []
    ratio = artifact.compression_ratio
    samples = f" (n = {artifact.golden_samples:,})" if artifact.golden_samples else ""
    return {
        "artifact": artifact,
        "url": reverse("admin:registry_artifact_change", args=[artifact.pk]),
        "status": status_badge(artifact.status, artifact.get_status_display()),
        "size": size(artifact.raw_size),
        "compressed": size(artifact.blob_size) + (f" ({ratio:.2f}x smaller)" if ratio else ""),
        "accuracy": percent(artifact.golden_accuracy) + samples
        if artifact.golden_accuracy is not None
        else "—",
        "ops": f"{count(len(ops), 'op')}: {', '.join(ops)}" if ops else "—",
        "quantization": signature.get("quantization") or "—",
        "drop": _drop(selectors.accuracy_drop_pp(artifact, artifact.parent or reference))
        if artifact.variant != "float32"
        else "—",
        "latency": f"{artifact.latency_ms:.2f} ms" if artifact.latency_ms is not None else "—",
        "origin": f"{artifact.get_recipe_display()} by {artifact.tool} {artifact.tool_version}"
        if artifact.recipe
        else "uploaded",
        "reason": artifact.failure_reason if artifact.status == ArtifactStatus.REJECTED else "",
    }


def version_section(version: ModelVersion, running: dict, rollouts: list) -> dict:
    """What the model and version pages show of one version (no query: all prefetched)."""
    model = version.model
    artifacts = sorted(version.artifacts.all(), key=lambda a: (a.variant, a.status != ArtifactStatus.READY))
    reference = next(
        (a for a in artifacts if a.variant == "float32" and a.status == ArtifactStatus.READY), None
    )
    variants = [variant_row(artifact, reference) for artifact in artifacts]
    devices = [
        {"variant": variant, "n": n, "url": running_url(model, version.version, variant)}
        for (running_version, variant), n in sorted(running.items())
        if running_version == version.version
    ]
    return {
        "version": version,
        "url": reverse("admin:registry_modelversion_change", args=[version.pk]),
        "status": status_badge(version.status, version.get_status_display()),
        "variants": variants,
        "devices": devices,
        "devices_total": sum(row["n"] for row in devices),
        "rollouts": [
            {
                "rollout": outcome.rollout,
                "url": reverse("admin:rollouts_rollout_change", args=[outcome.rollout.pk]),
                "state": outcome.rollout.get_state_display(),
                "stage": outcome.stage or "not started",
                "devices": ", ".join(f"{n:,} {label.lower()}" for label, n in outcome.devices) or "none",
                "started": moment(outcome.rollout.started_at),
                "finished": moment(outcome.rollout.finished_at),
                "why": outcome.why,
            }
            for outcome in rollouts
        ],
    }


def deprecate_prompt(version: ModelVersion, rollouts: list, request) -> dict | None:
    """Ask to deprecate a released version whose latest rollout was rolled back; the button
    only for those who may (operators, as in the API)."""
    failed = selectors.version_failed_canary(version=version, rollouts=rollouts)
    if failed is None:
        return None
    why = next(outcome.why for outcome in rollouts if outcome.rollout == failed)
    if why.startswith("by "):  # a person's rollback: who, when and their reason
        what = f"was rolled back {why}"
    else:  # the evaluator's: when, and its sentence
        what = f"was rolled back at {moment(failed.finished_at)}" + (f". {why}" if why else ".")
    return {
        "rollout": failed,
        "url": reverse("admin:rollouts_rollout_change", args=[failed.pk]),
        "what": what,
        "action": reverse("admin:registry_modelversion_deprecate", args=[version.pk])
        if has_role(request.user, Role.OPERATOR)
        else None,
    }


def version_sections(versions: list[ModelVersion], request=None) -> list[dict]:
    """The sections of the given versions of one model, in a fixed number of queries."""
    if not versions:
        return []
    running = selectors.devices_running(model=versions[0].model)
    rollouts = selectors.version_rollouts(versions=versions)
    sections = []
    for version in versions:
        section = version_section(version, running, rollouts[version.pk])
        if request is not None:
            section["prompt"] = deprecate_prompt(version, rollouts[version.pk], request)
        sections.append(section)
    return sections


# The live parts of the model and version pages (fleet/core/live.py), each also on the page,
# and the version's read-only fields that change (never the notes someone may be editing).
MODEL_PARTS = {"versions": "admin/registry/mlmodel/versions.html"}
VERSION_PARTS = {
    "prompt": "admin/registry/modelversion/prompt.html",
    "section": "admin/registry/includes/version_section.html",
}
VERSION_LIVE_FIELDS = ("status_badge", "status_changed_text")


class MLModelForm(forms.ModelForm):
    """Class labels one per line (a label may hold a comma), not a JSON list."""

    labels = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 6}), required=False, help_text="One per line, in output order."
    )

    quantize_recipes = forms.MultipleChoiceField(
        choices=QuantRecipe.choices,
        widget=forms.CheckboxSelectMultiple,
        required=False,
        label="Produce variants",
        help_text="Made by the registry from every float32 upload (docs/quantization.md).",
    )
    max_accuracy_drop_pp = forms.FloatField(
        required=False,
        min_value=0,
        max_value=100,
        label="Accuracy drop limit (percentage points)",
        help_text="A produced variant losing more golden accuracy than this against float32 is "
        "rejected. Empty: the server's QUANT_MAX_ACCURACY_DROP_PP.",
    )

    class Meta:
        model = MLModel
        fields = ("name", "task", "labels", "description", "quantize_recipes", "max_accuracy_drop_pp")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.initial["labels"] = "\n".join(self.instance.labels or [])

    def clean_labels(self):
        return [label.strip() for label in self.cleaned_data["labels"].splitlines() if label.strip()]


@admin.register(MLModel)
class MLModelAdmin(admin.ModelAdmin):
    form = MLModelForm
    list_display = ("name", "task", "version_count", "created_by", "created_at_text")
    list_filter = ("task",)
    search_fields = ("name", "description")
    readonly_fields = ("created_by", "created_at_text", "labels_text", "quantize_text", "limit_text")
    change_form_template = "admin/registry/mlmodel/change_form.html"
    created_at_text = time_column("created_at", "created at")

    def get_fields(self, request, obj=None):
        fields = (*MLModelForm.Meta.fields, "created_by", "created_at_text")
        if obj is not None and not self.has_change_permission(request, obj):
            words = {
                "labels": "labels_text",
                "quantize_recipes": "quantize_text",
                "max_accuracy_drop_pp": "limit_text",
            }
            return tuple(words.get(name, name) for name in fields)  # read only
        return fields

    @admin.display(description="produce variants")
    def quantize_text(self, obj):
        names = dict(QuantRecipe.choices)
        return ", ".join(names.get(recipe, recipe) for recipe in obj.quantize_recipes or []) or "none"

    @admin.display(description="accuracy drop limit")
    def limit_text(self, obj):
        limit = selectors.max_accuracy_drop_pp(obj)
        source = "" if obj.max_accuracy_drop_pp is not None else " (the server's default)"
        return f"{limit:.1f} percentage points{source}"

    @admin.display(description="labels")
    def labels_text(self, obj):
        labels = obj.labels or []
        return f"{count(len(labels), 'label')}: {', '.join(labels)}" if labels else "none"

    def get_queryset(self, request):
        return (
            super().get_queryset(request).select_related("created_by").annotate(n_versions=Count("versions"))
        )

    @admin.display(description="versions", ordering="n_versions")
    def version_count(self, obj):
        return obj.n_versions

    def save_model(self, request, obj, form, change):
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)

    def page_context(self, request, model: MLModel) -> dict:
        """What the page shows below the model's fields: the same for the page and its refresh."""
        versions = list(
            model.versions.select_related("model").prefetch_related("artifacts").order_by("-created_at")
        )
        return {
            "sections": version_sections(versions, request),
            "live_url": reverse("admin:registry_mlmodel_live", args=[model.pk]),
        }

    def change_view(self, request, object_id, form_url="", extra_context=None):
        model = self.get_object(request, object_id)
        if model is not None:
            extra_context = {**(extra_context or {}), **self.page_context(request, model)}
        return super().change_view(request, object_id, form_url, extra_context)

    def get_urls(self):
        live = self.admin_site.admin_view(self.live_view)
        return [path("<int:pk>/live/", live, name="registry_mlmodel_live"), *super().get_urls()]

    def live_view(self, request, pk: int):
        """The versions part again, for the page's refresh without a reload (fleet/core/live.py)."""
        model = get_object_or_404(self.get_queryset(request), pk=pk)
        if not self.has_view_permission(request, model):
            raise PermissionDenied
        return live_response(request, parts=MODEL_PARTS, context=self.page_context(request, model))


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = (
        "model",
        "version",
        "status_badge",
        "variants",
        "golden_samples",
        "created_by",
        "created_at_text",
    )
    list_filter = ("status", "model")
    search_fields = ("model__name", "version", "notes")
    list_select_related = ("model", "created_by")
    readonly_fields = (
        "status_badge",
        "golden_set",
        "created_by",
        "created_at_text",
        "status_changed_text",
    )
    fields = ("model", "version", "notes", *readonly_fields)
    actions = ["release", "deprecate", "revoke"]
    change_form_template = "admin/registry/modelversion/change_form.html"
    created_at_text = time_column("created_at", "created at")
    status_changed_text = time_column("status_changed_at", "status changed at")

    class Media:
        js = ("fleet/copy.js",)  # the copy buttons beside hashes

    def get_queryset(self, request):
        return (
            super().get_queryset(request).select_related("model", "created_by").prefetch_related("artifacts")
        )

    def get_fields(self, request, obj=None):
        return ("model", "version", "notes") if obj is None else self.fields

    def get_readonly_fields(self, request, obj=None):
        # A version's model and number are what devices and manifests name: fixed once made.
        return ("model", "version", *self.readonly_fields) if obj else ()

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj):
        return status_badge(obj.status, obj.get_status_display())

    @admin.display(description="variants")
    def variants(self, obj):
        return ", ".join(a.variant for a in obj.artifacts.all() if a.status == ArtifactStatus.READY) or "—"

    @admin.display(description="golden set")
    def golden_set(self, obj):
        if not obj.has_golden_set:
            return "none: variants are not checked for accuracy before release or on devices"
        shape = str(list(obj.golden_input_shape or [])) if obj.golden_input_shape else "?"
        return format_html(
            "{} samples of shape {}, {}, sha256 {}",
            f"{obj.golden_samples:,}" if obj.golden_samples is not None else "?",
            shape,
            size(obj.golden_size),
            short_hash(obj.golden_sha256),
        )

    def page_context(self, request, version: ModelVersion) -> dict:
        return {
            "original": version,
            "section": version_sections([version], request)[0],
            "live_url": reverse("admin:registry_modelversion_live", args=[version.pk]),
        }

    def change_view(self, request, object_id, form_url="", extra_context=None):
        version = self.get_object(request, object_id)
        if version is not None:
            extra_context = {
                **(extra_context or {}),
                **self.page_context(request, version),
                # Not refreshed live: the inventory's matrix changes slowly and costs queries.
                "compatibility": compatibility_table(version),
                "deltas": deltas_table(version),
            }
        return super().change_view(request, object_id, form_url, extra_context)

    def live_view(self, request, pk: int):
        """The prompt, the section and the status again, for the page's refresh without a
        reload (fleet/core/live.py): the same templates and display methods as the page."""
        version = get_object_or_404(self.get_queryset(request), pk=pk)
        if not self.has_view_permission(request, version):
            raise PermissionDenied
        return live_response(
            request,
            parts=VERSION_PARTS,
            context=self.page_context(request, version),
            fields=render_fields(request, self, version, VERSION_LIVE_FIELDS),
        )

    def get_urls(self):
        view = self.admin_site.admin_view(self.deprecate_view)
        live = self.admin_site.admin_view(self.live_view)
        return [
            path("<int:pk>/deprecate/", view, name="registry_modelversion_deprecate"),
            path("<int:pk>/live/", live, name="registry_modelversion_live"),
            *super().get_urls(),
        ]

    def deprecate_view(self, request, pk: int):
        """Confirm, then call the same service as ``POST …/versions/{version}/deprecate``."""
        if not has_role(request.user, Role.OPERATOR):
            raise PermissionDenied  # the API's ViewerReadsOperatorWrites
        version = get_object_or_404(ModelVersion.objects.select_related("model"), pk=pk)
        page = reverse("admin:registry_modelversion_change", args=[pk])
        if request.method == "POST":
            try:
                services.version_set_status(version=version, status=VERSION_ACTIONS["deprecate"])
            except ServiceError as exc:
                self.message_user(request, exc.message, messages.ERROR)
            else:
                self.log_change(request, version, "Deprecated (after a rolled-back rollout).")
                self.message_user(request, f"{version} is now deprecated.", messages.SUCCESS)
            return HttpResponseRedirect(page)
        running = sum(
            n for (v, _), n in selectors.devices_running(model=version.model).items() if v == version.version
        )
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "original": version,
            "title": f"Deprecate {version}?",
            "impact": (
                f"{version} is marked deprecated: a sign that it should not be rolled out again. "
                f"The {count(running, 'device')} that run it keep it until a rollout moves them; "
                "it can be released again later. (Revoke it instead to forbid it for good.)"
            ),
            "cancel_url": page,
        }
        return TemplateResponse(request, "admin/registry/modelversion/deprecate.html", context)

    def _transition(self, request, queryset, status: str):
        for version in queryset:
            try:
                services.version_set_status(version=version, status=status)
            except ServiceError as exc:
                self.message_user(request, exc.message, messages.ERROR)
            else:
                self.message_user(request, f"{version} is now {status}.", messages.SUCCESS)

    @admin.action(description="Release selected versions", permissions=["change"])
    def release(self, request, queryset):
        self._transition(request, queryset, VersionStatus.RELEASED)

    @admin.action(description="Deprecate selected versions", permissions=["change"])
    def deprecate(self, request, queryset):
        self._transition(request, queryset, VersionStatus.DEPRECATED)

    @admin.action(
        description="Revoke selected versions (final: never assignable again)", permissions=["change"]
    )
    def revoke(self, request, queryset):
        self._transition(request, queryset, VersionStatus.REVOKED)


class ArtifactUploadForm(forms.ModelForm):
    """The admin's upload door; it calls the same service as the API."""

    file = forms.FileField(help_text="A .tflite model. It is inspected now and processed in the background.")
    hardware = forms.CharField(
        label="For hardware",
        initial="any",
        required=False,
        help_text='The hardware classes this variant is for, comma-separated (e.g. "rpi4, rpi5"); '
        '"any" for every device. A rollout gives it only to devices of these classes.',
    )

    class Meta:
        model = Artifact
        fields = ("version", "variant")

    def clean(self):
        cleaned = super().clean()
        upload = cleaned.get("file")
        if upload is not None and not isinstance(upload, TemporaryUploadedFile):
            raise forms.ValidationError("Uploads must be streamed to disk; check FILE_UPLOAD_HANDLERS.")
        return cleaned

    def validate_unique(self):
        pass  # the service reports duplicates with a clear message


@admin.register(Artifact)
class ArtifactAdmin(admin.ModelAdmin):
    list_display = (
        "__str__",
        "variant",
        "status_badge",
        "sizes",
        "ratio",
        "accuracy",
        "created_by",
        "created_at_text",
    )
    list_filter = ("status", "variant", "version__model")
    search_fields = ("version__model__name", "version__version", "variant", "raw_sha256", "blob_sha256")
    list_select_related = ("version__model", "created_by")
    readonly_fields = (
        "version",
        "variant",
        "status_badge",
        "failure",
        "sizes_text",
        "hashes",
        "tflite_text",
        "hardware_text",
        "accuracy_text",
        "latency_text",
        "origin",
        "manifest_text",
        "created_by",
        "created_at_text",
        "processed_at_text",
        "raw",
    )
    exclude = ("raw_file", "blob_file", "tflite_signature", "manifest_envelope")
    created_at_text = time_column("created_at", "created at")
    processed_at_text = time_column("processed_at", "processed at")

    @admin.display(description="for hardware")
    def hardware_text(self, obj):
        classes = obj.requires_hardware or ["any"]
        return "any device" if "any" in classes else ", ".join(classes) + " only"

    class Media:
        js = ("fleet/copy.js",)  # the copy buttons beside hashes

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = ArtifactUploadForm
        return super().get_form(request, obj, **kwargs)

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields if obj else ()

    def get_exclude(self, request, obj=None):
        return self.exclude if obj else ()

    def get_fields(self, request, obj=None):
        return ("version", "variant", "file", "hardware") if obj is None else self.readonly_fields

    def save_model(self, request, obj, form, change):
        if change:
            return
        try:
            artifact = services.artifact_upload(
                version=form.cleaned_data["version"],
                variant=form.cleaned_data["variant"],
                upload=form.cleaned_data["file"],
                created_by=request.user,
                requires_hardware=form.cleaned_data.get("hardware", "").split(","),
            )
        except ServiceError as exc:
            # ModelAdmin is shared by all requests: keep the error on the request.
            request.modelfleet_upload_error = exc.message
            return
        obj.pk = artifact.pk
        obj.__dict__.update({k: v for k, v in artifact.__dict__.items() if not k.startswith("_")})

    def response_add(self, request, obj, post_url_continue=None):
        error = getattr(request, "modelfleet_upload_error", None)
        if error:
            self.message_user(request, f"Upload refused: {error}", messages.ERROR)
            return HttpResponseRedirect(request.path)
        self.message_user(request, f"{obj} uploaded; the pipeline is running.", messages.SUCCESS)
        return super().response_add(request, obj, post_url_continue)

    def has_change_permission(self, request, obj=None):
        return obj is None and super().has_change_permission(request, obj)

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj):
        label = obj.get_status_display()
        if obj.failure_code:
            label = f"{label}: {obj.failure_code}"
        return status_badge(obj.status, label)

    @admin.display(description="latency (server CPU, median)")
    def latency_text(self, obj):
        return f"{obj.latency_ms:.2f} ms" if obj.latency_ms is not None else "not measured"

    @admin.display(description="made by")
    def origin(self, obj):
        if not obj.recipe:
            return "uploaded"
        parent = obj.parent
        link = format_html(
            '<a href="{}">{}</a>', reverse("admin:registry_artifact_change", args=[parent.pk]), parent
        )
        calibrated = (
            f", calibrated on {count(obj.calibration_samples, 'sample')}" if obj.calibration_samples else ""
        )
        return format_html(
            "{} of {} by {} {}{}", obj.get_recipe_display(), link, obj.tool, obj.tool_version, calibrated
        )

    @admin.display(description="raw → blob")
    def sizes(self, obj):
        if obj.blob_size is None:
            return filesizeformat(obj.raw_size) if obj.raw_size else "—"
        return f"{filesizeformat(obj.raw_size)} → {filesizeformat(obj.blob_size)}"

    @admin.display(description="ratio")
    def ratio(self, obj):
        return f"{obj.compression_ratio:.2f}x" if obj.compression_ratio else "—"

    @admin.display(description="golden accuracy", ordering="golden_accuracy")
    def accuracy(self, obj):
        return f"{obj.golden_accuracy:.1%}" if obj.golden_accuracy is not None else "—"

    # --- the artifact page: the signature and the signed manifest in words

    @admin.display(description="failure")
    def failure(self, obj):
        if not obj.failure_code:
            return "—"
        label = ArtifactFailure(obj.failure_code).label if obj.failure_code in ArtifactFailure.values else ""
        return f"{label or obj.failure_code}: {obj.failure_reason}"

    @admin.display(description="sizes")
    def sizes_text(self, obj):
        if obj.blob_size is None:
            return f"{size(obj.raw_size)} uploaded; not compressed yet"
        level = f" level {obj.compression_level}" if obj.compression_level is not None else ""
        ratio = f" ({obj.compression_ratio:.2f}x smaller)" if obj.compression_ratio else ""
        blob = f"{size(obj.blob_size)} as {obj.compression or 'blob'}{level}{ratio}"
        return f"{size(obj.raw_size)} .tflite, {blob}"

    @admin.display(description="hashes (sha256)")
    def hashes(self, obj):
        rows = [
            ("the .tflite", obj.raw_sha256),
            ("the compressed blob", obj.blob_sha256),
            ("the signed manifest (what desired states pin)", obj.manifest_sha256),
        ]
        return (
            format_html_join(
                mark_safe("<br>"), "{}: {}", ((what, short_hash(value)) for what, value in rows if value)
            )
            or "—"
        )

    @admin.display(description="TFLite model")
    def tflite_text(self, obj):
        signature = obj.tflite_signature
        if not signature:
            return "not inspected yet"
        ops = signature.get("ops") or []
        lines = [
            ("inputs", tensors_text(signature.get("inputs"))),
            ("outputs", tensors_text(signature.get("outputs"))),
            ("ops", f"{count(len(ops), 'op')}: {', '.join(ops)}" if ops else "none"),
            ("quantization", signature.get("quantization") or "none"),
        ]
        if signature.get("description"):
            lines.append(("description", signature["description"]))
        return format_html_join(mark_safe("<br>"), "{}: {}", lines)

    @admin.display(description="golden accuracy")
    def accuracy_text(self, obj):
        if obj.golden_accuracy is None:
            return "not measured (the version has no golden set)" if obj.processed_at else "—"
        samples = f" of {obj.golden_samples:,} samples" if obj.golden_samples else ""
        return f"{percent(obj.golden_accuracy)}{samples}, measured on the server with LiteRT"

    @admin.display(description="signed manifest")
    def manifest_text(self, obj):
        """What devices verify before they install, in words (ARCHITECTURE.md, "Artifact
        manifest"): who signed it, which bytes it names, what it requires."""
        if not obj.manifest_envelope:
            return "not signed yet"
        envelope, payload = manifest_parts(obj)
        keyids = [signature.get("keyid", "") for signature in envelope.get("signatures", [])]
        requires = payload.get("requires") or {}
        labels = payload.get("labels") or []
        lines = [
            (
                "signed",
                format_html("{} by key {}", signed_at(payload), short_hash(keyids[0], "keyid"))
                if keyids
                else "no signature",
            ),
            ("names", f"{payload.get('model')} {payload.get('version')} [{payload.get('variant')}]"),
            (
                "requires",
                f"hardware {', '.join(requires.get('hardware', []))}; runtime "
                f"{', '.join(requires.get('runtime', []))}",
            ),
            (
                "labels",
                f"{count(len(labels), 'label')}"
                + (f": {', '.join(labels[:12])}" if labels else "")
                + ("…" if len(labels) > 12 else ""),
            ),
        ]
        return format_html_join(mark_safe("<br>"), "{}: {}", lines)

    @admin.display(description="raw")
    def raw(self, obj):
        """For experts only, folded: the inspection report and the manifest envelope decoded."""
        document = {"tflite_signature": obj.tflite_signature, "task_id": obj.task_id}
        if obj.manifest_envelope:
            envelope, payload = manifest_parts(obj)
            document["manifest"] = {**envelope, "payload": payload}
        return raw_details(document)


def tensors_text(tensors: list[dict] | None) -> str:
    """[{"name": "x", "shape": [1, 64], "dtype": "float32"}] → "x: float32 [1, 64]"."""
    return (
        "; ".join(
            f"{t.get('name', '?')}: {t.get('dtype', '?')} {list(t.get('shape') or [])}" for t in tensors or []
        )
        or "none"
    )


def signed_at(payload: dict) -> str:
    """The manifest's created_at ("2026-11-30T17:15:23Z") to the second with its zone."""
    try:
        return moment(protocol.parse_time(payload["created_at"]))
    except (KeyError, TypeError, ValueError):
        return "at an unreadable time"


def manifest_parts(artifact: Artifact) -> tuple[dict, dict]:
    """The stored envelope and its payload, decoded (the payload is shown, never re-signed)."""
    envelope = json.loads(artifact.manifest_envelope)
    return envelope, json.loads(base64.b64decode(envelope["payload"]))


class ReadOnlyAdmin(admin.ModelAdmin):
    """A record people read and never change here (keys, the root chain, keyrings)."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(SigningKey)
class SigningKeyAdmin(ReadOnlyAdmin):
    """Public halves only: the private key never enters the database."""

    list_display = ("keyid", "status", "created_at_text", "retired_at_text")
    list_filter = ("status",)
    readonly_fields = ("keyid", "public_key", "status", "created_at_text", "retired_at_text")
    created_at_text = time_column("created_at", "created at")
    retired_at_text = time_column("retired_at", "retired at")


class TrustUploadForm(forms.ModelForm):
    """Upload a root document or keyring signed offline (docs/security.md, "Keys and
    rotation"); it is checked and stored by the same service as the API's POST /trust."""

    signed_file = forms.FileField(
        help_text="A root document or keyring signed with `python -m agent.trustctl` on the offline machine"
    )

    class Meta:
        model = Keyring
        fields = ()

    def clean(self):
        cleaned = super().clean()
        upload = cleaned.get("signed_file")
        if upload is not None and upload.size > 256 * 1024:
            raise forms.ValidationError("A root document or keyring is a few kB; this file is too large.")
        return cleaned


def _short(keyids: list[str]) -> str:
    return ", ".join(f"{keyid[:16]}…" for keyid in keyids) or "none"


@admin.register(Keyring)
class KeyringAdmin(ReadOnlyAdmin):
    """The keys devices accept signatures from, newest first, with how many devices report
    each version. Read-only: new keyrings are uploaded, never edited."""

    list_display = (
        "version",
        "expires",
        "signing_keys",
        "revoked",
        "root_version",
        "devices",
        "uploaded_at_text",
    )
    readonly_fields = list_display
    fields = readonly_fields
    uploaded_at_text = time_column("uploaded_at", "uploaded at")

    @admin.display(description="expires")
    def expires(self, obj):
        days = (obj.expires_at - timezone.now()).days
        text = moment(obj.expires_at)
        if days < 0:
            return format_html('<strong style="color:#cf222e">{} (expired)</strong>', text)
        if days < 30:
            return format_html('<strong style="color:#9a6700">{} (in {} days)</strong>', text, days)
        return f"{text} (in {days} days)"

    @admin.display(description="signing keys")
    def signing_keys(self, obj):
        return _short(obj.keyids)

    @admin.display(description="revoked keys")
    def revoked(self, obj):
        return _short(obj.revoked_keyids)

    @admin.display(description="devices reporting it")
    def devices(self, obj):
        from fleet.devices.models import Device

        count = Device.objects.filter(keyring_version=obj.version).count()
        return format_html('<a href="../../devices/device/?keyring_version={}">{}</a>', obj.version, count)

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = TrustUploadForm
        return super().get_form(request, obj, **kwargs)

    def get_fields(self, request, obj=None):
        return ("signed_file",) if obj is None else self.fields

    def get_readonly_fields(self, request, obj=None):
        return () if obj is None else self.readonly_fields

    @csrf_protect_m
    def add_view(self, request, form_url="", extra_context=None):
        # The upload is the whole "add": the service checks and stores the row (a root or
        # a keyring) and publishes the bundle. An invalid form falls through to the stock
        # view, which shows its errors.
        if request.method == "POST" and self.has_add_permission(request):
            form = TrustUploadForm(request.POST, request.FILES)
            if form.is_valid():
                try:
                    row = trust.trust_upload(
                        envelope=form.cleaned_data["signed_file"].read(), user=request.user
                    )
                except ServiceError as exc:
                    self.message_user(request, f"Refused ({exc.code}): {exc}", messages.ERROR)
                    return HttpResponseRedirect(request.path)
                self.message_user(request, f"Stored {row} and published the trust bundle.", messages.SUCCESS)
                return HttpResponseRedirect("../")
        return super().add_view(request, form_url, extra_context)

    def has_add_permission(self, request):
        return has_role(request.user, Role.ADMIN)


@admin.register(TrustRoot)
class TrustRootAdmin(ReadOnlyAdmin):
    """The root chain: each version signed offline by the previous root's keys and its own.
    Upload new ones on the keyring page (one form for both kinds)."""

    list_display = ("version", "threshold_text", "root_keys", "expires_at_text", "uploaded_at_text")
    readonly_fields = ("version", "threshold_text", "root_keys", "expires_at_text", "uploaded_at_text")
    fields = readonly_fields
    expires_at_text = time_column("expires_at", "expires at")
    uploaded_at_text = time_column("uploaded_at", "uploaded at")

    @admin.display(description="threshold")
    def threshold_text(self, obj):
        return f"{obj.threshold} of {len(obj.keyids)} key(s)"

    @admin.display(description="root keys")
    def root_keys(self, obj):
        return _short(obj.keyids)
