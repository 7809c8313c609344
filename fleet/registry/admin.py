"""Registry admin for ops staff: what is there, what state it is in, how small it got,
how accurate each variant is. Writes go through the same services as the API."""

from __future__ import annotations

import base64
import json

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import csrf_protect_m
from django.core.files.uploadedfile import TemporaryUploadedFile
from django.http import HttpResponseRedirect
from django.template.defaultfilters import filesizeformat
from django.utils import timezone
from django.utils.html import format_html

from fleet.core.choices import Role
from fleet.core.errors import ServiceError
from fleet.core.permissions import has_role
from fleet.registry import services, trust
from fleet.registry.choices import ArtifactStatus, VersionStatus
from fleet.registry.models import Artifact, Keyring, MLModel, ModelVersion, SigningKey, TrustRoot

STATUS_COLOURS = {
    ArtifactStatus.READY: "#1a7f37",
    ArtifactStatus.PENDING: "#9a6700",
    ArtifactStatus.FAILED: "#cf222e",
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


class VersionInline(admin.TabularInline):
    model = ModelVersion
    fields = ("version", "status", "notes", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(MLModel)
class MLModelAdmin(admin.ModelAdmin):
    list_display = ("name", "task", "version_count", "created_by", "created_at")
    list_filter = ("task",)
    search_fields = ("name", "description")
    readonly_fields = ("created_by", "created_at")
    inlines = [VersionInline]

    @admin.display(description="versions")
    def version_count(self, obj):
        return obj.versions.count()

    def save_model(self, request, obj, form, change):
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)


class ArtifactInline(admin.TabularInline):
    model = Artifact
    fields = ("variant", "status", "raw_size", "blob_size", "golden_accuracy", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = (
        "model",
        "version",
        "status_badge",
        "variants",
        "golden_samples",
        "created_by",
        "created_at",
    )
    list_filter = ("status", "model")
    search_fields = ("model__name", "version", "notes")
    readonly_fields = (
        "status",
        "golden_file",
        "golden_sha256",
        "golden_size",
        "golden_samples",
        "golden_input_shape",
        "created_by",
        "created_at",
        "status_changed_at",
    )
    inlines = [ArtifactInline]
    actions = ["release", "deprecate", "revoke"]

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj):
        return status_badge(obj.status, obj.get_status_display())

    @admin.display(description="variants")
    def variants(self, obj):
        return ", ".join(a.variant for a in obj.artifacts.all() if a.status == ArtifactStatus.READY) or "—"

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
        "created_at",
    )
    list_filter = ("status", "variant", "version__model")
    search_fields = ("version__model__name", "version__version", "variant", "raw_sha256", "blob_sha256")
    list_select_related = ("version__model", "created_by")
    readonly_fields = (
        "version",
        "variant",
        "status",
        "failure_code",
        "failure_reason",
        "raw_sha256",
        "raw_size",
        "blob_sha256",
        "blob_size",
        "compression",
        "compression_level",
        "signature_pretty",
        "golden_accuracy",
        "golden_samples",
        "manifest_pretty",
        "manifest_sha256",
        "signing_key",
        "created_by",
        "created_at",
        "processed_at",
        "task_id",
    )
    exclude = ("raw_file", "blob_file", "tflite_signature", "manifest_envelope")

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = ArtifactUploadForm
        return super().get_form(request, obj, **kwargs)

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields if obj else ()

    def get_exclude(self, request, obj=None):
        return self.exclude if obj else ()

    def get_fields(self, request, obj=None):
        if obj is None:
            return ("version", "variant", "file")
        return super().get_fields(request, obj)

    def save_model(self, request, obj, form, change):
        if change:
            return
        try:
            artifact = services.artifact_upload(
                version=form.cleaned_data["version"],
                variant=form.cleaned_data["variant"],
                upload=form.cleaned_data["file"],
                created_by=request.user,
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

    @admin.display(description="TFLite signature")
    def signature_pretty(self, obj):
        return format_html("<pre>{}</pre>", json.dumps(obj.tflite_signature, indent=2))

    @admin.display(description="signed manifest (DSSE envelope, read-only)")
    def manifest_pretty(self, obj):
        if not obj.manifest_envelope:
            return "—"
        envelope = json.loads(obj.manifest_envelope)
        payload = json.loads(base64.b64decode(envelope["payload"]))
        return format_html(
            "<p><b>payload</b></p><pre>{}</pre><p><b>signatures</b></p><pre>{}</pre>",
            json.dumps(payload, indent=2),
            json.dumps(envelope["signatures"], indent=2),
        )


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

    list_display = ("keyid", "status", "created_at", "retired_at")
    list_filter = ("status",)
    readonly_fields = ("keyid", "public_key", "status", "created_at", "retired_at")


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

    list_display = ("version", "expires", "signing_keys", "revoked", "root_version", "devices", "uploaded_at")
    readonly_fields = (
        "version",
        "expires",
        "signing_keys",
        "revoked",
        "root_version",
        "devices",
        "uploaded_at",
    )
    fields = readonly_fields

    @admin.display(description="expires")
    def expires(self, obj):
        days = (obj.expires_at - timezone.now()).days
        text = f"{obj.expires_at:%Y-%m-%d %H:%M} UTC"
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

    list_display = ("version", "threshold_text", "root_keys", "expires_at", "uploaded_at")
    readonly_fields = ("version", "threshold_text", "root_keys", "expires_at", "uploaded_at")
    fields = readonly_fields

    @admin.display(description="threshold")
    def threshold_text(self, obj):
        return f"{obj.threshold} of {len(obj.keyids)} key(s)"

    @admin.display(description="root keys")
    def root_keys(self, obj):
        return _short(obj.keyids)
