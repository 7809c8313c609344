"""Registry REST API (ARCHITECTURE.md, "HTTP API"). Views are thin: they parse, call one
service or selector, and serialise."""

from __future__ import annotations

import contextlib
import re
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse
from django.urls import reverse
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
    inline_serializer,
)
from rest_framework import generics, serializers, status
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.permissions import AllowAny, BasePermission, IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from fleet.celery import app as celery_app
from fleet.core import listing
from fleet.core.errors import InvalidInput, NotFound, error_body
from fleet.core.permissions import IsAdmin, IsViewer, ViewerReadsOperatorWrites
from fleet.registry import selectors, services, trust
from fleet.registry.choices import (
    ArtifactStatus,
    DeltaStatus,
    QuantRecipe,
    SigningKeyStatus,
    Task,
    VersionStatus,
)
from fleet.registry.models import Artifact, ArtifactDelta, MLModel, ModelVersion, SigningKey, TrustRoot

# --- serializers


class ErrorSerializer(serializers.Serializer):
    error = inline_serializer(
        "ErrorDetail",
        {
            "code": serializers.CharField(),
            "message": serializers.CharField(),
            "field": serializers.CharField(allow_null=True),
        },
    )


class ModelSerializer(serializers.ModelSerializer):
    name = serializers.CharField(max_length=64)
    task = serializers.ChoiceField(choices=Task.choices, default=Task.CLASSIFICATION)
    labels = serializers.ListField(child=serializers.CharField(max_length=100), required=False, default=list)
    quantize_recipes = serializers.ListField(
        child=serializers.ChoiceField(choices=QuantRecipe.choices),
        required=False,
        default=list,
        help_text="Variants the registry produces from every float32 upload",
    )
    max_accuracy_drop_pp = serializers.FloatField(
        min_value=0,
        max_value=100,
        required=False,
        allow_null=True,
        default=None,
        help_text="Percentage points a produced variant may lose; null: the server's limit",
    )
    created_by = serializers.StringRelatedField()

    class Meta:
        model = MLModel
        fields = [
            "name",
            "task",
            "labels",
            "description",
            "quantize_recipes",
            "max_accuracy_drop_pp",
            "created_by",
            "created_at",
        ]
        read_only_fields = ["created_by", "created_at"]


class DeltaSerializer(serializers.ModelSerializer):
    """A delta to the artifact from an earlier version (docs/protocol.md, addition 11)."""

    base_version = serializers.CharField(source="base.version.version", read_only=True)
    base_artifact = serializers.IntegerField(source="base_id", read_only=True)
    ratio = serializers.FloatField(read_only=True, allow_null=True, help_text="size / full blob size")
    urls = serializers.SerializerMethodField()

    class Meta:
        model = ArtifactDelta
        fields = [
            "id",
            "base_version",
            "base_artifact",
            "status",
            "reason",
            "blob_sha256",
            "blob_size",
            "ratio",
            "manifest_sha256",
            "created_at",
            "urls",
        ]
        read_only_fields = fields

    @extend_schema_field({"type": "object", "additionalProperties": {"type": "string", "format": "uri"}})
    def get_urls(self, delta: ArtifactDelta) -> dict[str, str]:
        if delta.status != DeltaStatus.READY:
            return {}
        request = self.context.get("request")
        args = [delta.target_id, delta.pk]
        urls = {
            "manifest": reverse("artifact-delta-manifest", args=args),
            "blob": reverse("artifact-delta-blob", args=args),
        }
        return {k: request.build_absolute_uri(u) for k, u in urls.items()} if request is not None else urls


class ArtifactSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="version.model.name", read_only=True)
    version = serializers.CharField(source="version.version", read_only=True)
    compression_ratio = serializers.FloatField(read_only=True, allow_null=True)
    signing_keyid = serializers.CharField(
        source="signing_key.keyid", read_only=True, allow_null=True, default=None
    )
    created_by = serializers.StringRelatedField()
    urls = serializers.SerializerMethodField()
    recipe = serializers.CharField(
        read_only=True,
        help_text="The quantization recipe that produced it (docs/quantization.md); empty: uploaded",
    )
    deltas = DeltaSerializer(many=True, read_only=True)

    class Meta:
        model = Artifact
        fields = [
            "id",
            "model",
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
            "compression_ratio",
            "tflite_signature",
            "requires_hardware",
            "golden_accuracy",
            "golden_samples",
            "latency_ms",
            "parent",
            "recipe",
            "tool",
            "tool_version",
            "calibration_samples",
            "requested_recipes",
            "manifest_sha256",
            "signing_keyid",
            "created_by",
            "created_at",
            "processed_at",
            "deltas",
            "urls",
        ]
        read_only_fields = fields

    @extend_schema_field({"type": "object", "additionalProperties": {"type": "string", "format": "uri"}})
    def get_urls(self, artifact: Artifact) -> dict[str, str]:
        request = self.context.get("request")
        urls = {"self": reverse("artifact-detail", args=[artifact.pk])}
        if artifact.status == ArtifactStatus.READY:
            urls["manifest"] = reverse("artifact-manifest", args=[artifact.pk])
            urls["blob"] = reverse("artifact-blob", args=[artifact.pk])
            if artifact.version.has_golden_set:
                urls["golden"] = reverse("artifact-golden", args=[artifact.pk])
        if request is not None:
            urls = {key: request.build_absolute_uri(url) for key, url in urls.items()}
        return urls


class ComparisonRowSerializer(serializers.Serializer):
    """One variant in a version's comparison (selectors.version_comparison)."""

    artifact_id = serializers.IntegerField()
    variant = serializers.CharField()
    status = serializers.CharField(help_text="The artifact's status (pending, ready, failed, rejected)")
    reason = serializers.CharField(help_text="Why it failed or was rejected")
    recipe = serializers.CharField(help_text="The quantization recipe that produced it; empty: uploaded")
    parent_id = serializers.IntegerField(allow_null=True)
    tool = serializers.CharField(help_text="Quantizer name and version")
    raw_size = serializers.IntegerField(allow_null=True, help_text="bytes")
    blob_size = serializers.IntegerField(allow_null=True, help_text="bytes, zstd")
    golden_accuracy = serializers.FloatField(allow_null=True, help_text="0..1")
    accuracy_drop_pp = serializers.FloatField(
        allow_null=True, help_text="percentage points lost against float32"
    )
    latency_ms = serializers.FloatField(allow_null=True, help_text="median on the server's CPU")
    quantization = serializers.CharField(allow_null=True)
    ops = serializers.ListField(child=serializers.CharField())


class VersionSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name", read_only=True)
    golden_set = serializers.SerializerMethodField()
    comparison = serializers.SerializerMethodField()
    artifacts = ArtifactSerializer(many=True, read_only=True)
    created_by = serializers.StringRelatedField()

    class Meta:
        model = ModelVersion
        fields = [
            "model",
            "version",
            "notes",
            "status",
            "golden_set",
            "artifacts",
            "comparison",
            "created_by",
            "created_at",
        ]
        read_only_fields = fields

    @extend_schema_field(ComparisonRowSerializer(many=True))
    def get_comparison(self, version: ModelVersion) -> list[dict[str, Any]]:
        return selectors.version_comparison(version)

    @extend_schema_field(
        {
            "type": "object",
            "nullable": True,
            "properties": {
                "sha256": {"type": "string"},
                "size": {"type": "integer"},
                "samples": {"type": "integer"},
                "input_shape": {"type": "array", "items": {"type": "integer"}},
            },
        }
    )
    def get_golden_set(self, version: ModelVersion) -> dict[str, Any] | None:
        if not version.has_golden_set:
            return None
        return {
            "sha256": version.golden_sha256,
            "size": version.golden_size,
            "samples": version.golden_samples,
            "input_shape": version.golden_input_shape,
        }


class VersionCreateSerializer(serializers.Serializer):
    version = serializers.CharField(max_length=64)
    notes = serializers.CharField(required=False, allow_blank=True, default="")
    golden_set = serializers.FileField(
        required=False,
        allow_empty_file=True,
        help_text="Optional .npz with arrays x (samples) and y (labels).",
    )


NO_VARIANTS = "none"


class ArtifactUploadSerializer(serializers.Serializer):
    variant = serializers.CharField(max_length=64, help_text="e.g. float32, int8")
    file = serializers.FileField(allow_empty_file=True, help_text="The .tflite model")
    requires_hardware = serializers.ListField(
        child=serializers.CharField(max_length=64),
        required=False,
        help_text='Hardware classes this variant targets (repeat the field); default ["any"], every device',
    )
    quantize = serializers.MultipleChoiceField(
        choices=[*QuantRecipe.choices, (NO_VARIANTS, "No variant")],
        required=False,
        help_text="Variants the registry produces from this float32 upload (repeat the field); "
        f"absent: the model's quantize_recipes; {NO_VARIANTS!r}: none.",
    )


class SigningKeySerializer(serializers.ModelSerializer):
    class Meta:
        model = SigningKey
        fields = ["keyid", "public_key", "status", "created_at", "retired_at"]
        read_only_fields = fields


# --- path parameters (declared for the OpenAPI schema; the views resolve them by hand)

NAME_PARAM = OpenApiParameter("name", str, OpenApiParameter.PATH, description="Model name")
VERSION_PARAM = OpenApiParameter("version", str, OpenApiParameter.PATH, description="Semantic version")
ID_PARAM = OpenApiParameter("id", int, OpenApiParameter.PATH, description="Artifact id")
ERRORS = {code: OpenApiResponse(ErrorSerializer) for code in (400, 401, 403, 404, 409, 413, 416, 422)}


def list_create_schema(
    listed: type[serializers.Serializer], created: type[serializers.Serializer] | None = None
):
    """A list-and-create endpoint's schema: GET answers 200 with a page of ``listed``,
    POST 201 with ``created`` (a class-wide ``responses`` would give each both)."""
    return extend_schema_view(
        get=extend_schema(responses={200: listed, **ERRORS}),
        post=extend_schema(responses={201: created or listed, **ERRORS}),
    )


class FallbackContentNegotiation(DefaultContentNegotiation):
    """Binary endpoints: a client that only accepts application/zstd still gets JSON errors."""

    def select_renderer(self, request, renderers, format_suffix=None):
        try:
            return super().select_renderer(request, renderers, format_suffix)
        except Exception:
            return renderers[0], renderers[0].media_type


# --- list filters and orderings (fleet/core/listing.py)


class ModelFilter(listing.FilterSet):
    task = filters.ChoiceFilter(choices=Task.choices)
    ordering = listing.OrderingFilter(fields=["name", "created_at"])


class VersionFilter(listing.FilterSet):
    status = filters.ChoiceFilter(choices=VersionStatus.choices)
    ordering = listing.OrderingFilter(fields=["created_at", "status"])


class VersionArtifactFilter(listing.FilterSet):
    variant = filters.CharFilter()
    status = filters.ChoiceFilter(choices=ArtifactStatus.choices)
    ordering = listing.OrderingFilter(
        fields=["id", "variant", "status", "raw_size", "blob_size", "golden_accuracy", "created_at"]
    )


class ArtifactFilter(VersionArtifactFilter):
    model = filters.CharFilter(field_name="version__model__name", label="model name")
    version = filters.CharFilter(field_name="version__version", label="version (semver)")
    # The first names docs/api.md gave these two filters; kept for existing clients.
    version__model__name = filters.CharFilter(label="model name (the same as model)")
    version__version = filters.CharFilter(label="version (the same as version)")


class SigningKeyFilter(listing.FilterSet):
    status = filters.ChoiceFilter(choices=SigningKeyStatus.choices)
    ordering = listing.OrderingFilter(fields=["created_at", "status"])


# --- models


@list_create_schema(ModelSerializer)
class ModelListCreate(generics.ListCreateAPIView):
    queryset = MLModel.objects.select_related("created_by")
    serializer_class = ModelSerializer
    permission_classes = [ViewerReadsOperatorWrites]
    filterset_class = ModelFilter

    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        model = services.model_create(created_by=request.user, **serializer.validated_data)
        return Response(ModelSerializer(model).data, status=status.HTTP_201_CREATED)


@extend_schema(parameters=[NAME_PARAM], responses={200: ModelSerializer, **ERRORS})
class ModelDetail(generics.RetrieveAPIView):
    serializer_class = ModelSerializer
    queryset = MLModel.objects.all()

    def get_object(self):
        return selectors.model_get(name=self.kwargs["name"])


# --- versions


@extend_schema(parameters=[NAME_PARAM])
class VersionListCreate(generics.ListCreateAPIView):
    serializer_class = VersionSerializer
    permission_classes = [ViewerReadsOperatorWrites]
    parser_classes = [MultiPartParser, FormParser, JSONParser]
    filterset_class = VersionFilter
    queryset = ModelVersion.objects.none()

    def get_queryset(self):
        model = selectors.model_get(name=self.kwargs["name"])
        return model.versions.select_related("model", "created_by").prefetch_related(
            "artifacts__signing_key", "artifacts__deltas__base__version"
        )

    @extend_schema(request=VersionCreateSerializer, responses={201: VersionSerializer, **ERRORS})
    def post(self, request, name: str):
        model = selectors.model_get(name=name)
        serializer = VersionCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        version = services.version_create(model=model, created_by=request.user, **serializer.validated_data)
        return Response(
            VersionSerializer(version, context={"request": request}).data, status=status.HTTP_201_CREATED
        )


@extend_schema(parameters=[NAME_PARAM, VERSION_PARAM], responses={200: VersionSerializer, **ERRORS})
class VersionDetail(generics.RetrieveAPIView):
    serializer_class = VersionSerializer
    queryset = ModelVersion.objects.none()

    def get_object(self):
        return selectors.version_get(model_name=self.kwargs["name"], version=self.kwargs["version"])


VERSION_ACTIONS = {
    "release": VersionStatus.RELEASED,
    "deprecate": VersionStatus.DEPRECATED,
    "revoke": VersionStatus.REVOKED,
}


def version_action_view(action: str) -> type[APIView]:
    class VersionAction(APIView):
        permission_classes = [ViewerReadsOperatorWrites]
        serializer_class = VersionSerializer

        @extend_schema(
            parameters=[NAME_PARAM, VERSION_PARAM],
            request=None,
            responses={200: VersionSerializer, **ERRORS},
            summary=f"{action.capitalize()} a version",
            operation_id=f"models_versions_{action}",
        )
        def post(self, request, name: str, version: str):
            found = selectors.version_get(model_name=name, version=version)
            changed = services.version_set_status(version=found, status=VERSION_ACTIONS[action])
            return Response(VersionSerializer(changed, context={"request": request}).data)

    VersionAction.__name__ = f"Version{action.capitalize()}"
    return VersionAction


# --- artifacts


def _wait_seconds(request) -> float:
    raw = request.query_params.get("wait", "0")
    try:
        wait = float(raw)
    except ValueError as exc:
        raise InvalidInput(
            f"wait must be a number of seconds, got {raw!r}.", code="invalid_wait", field="wait"
        ) from exc
    if not 0 <= wait <= settings.ARTIFACT_UPLOAD_MAX_WAIT_SECONDS:
        raise InvalidInput(
            f"wait must be between 0 and {settings.ARTIFACT_UPLOAD_MAX_WAIT_SECONDS} seconds.",
            code="invalid_wait",
            field="wait",
        )
    return wait


def _wait_for_pipeline(artifact: Artifact, wait: float) -> Artifact:
    if wait and artifact.status == ArtifactStatus.PENDING:
        # On timeout the artifact is still pending: the client gets 202 and polls.
        with contextlib.suppress(CeleryTimeout):
            AsyncResult(artifact.task_id, app=celery_app).get(timeout=wait, propagate=False)
        artifact.refresh_from_db()
    return artifact


def _requested_recipes(request, data: dict[str, Any]) -> list[str] | None:
    """None when the upload does not say (the model's setting applies)."""
    if "quantize" not in request.data:
        return None
    return sorted(recipe for recipe in data.get("quantize", ()) if recipe != NO_VARIANTS)


@extend_schema(parameters=[NAME_PARAM, VERSION_PARAM])
class VersionArtifacts(generics.ListCreateAPIView):
    serializer_class = ArtifactSerializer
    permission_classes = [ViewerReadsOperatorWrites]
    parser_classes = [MultiPartParser]
    filterset_class = VersionArtifactFilter
    queryset = Artifact.objects.none()

    def get_queryset(self):
        version = selectors.version_get(model_name=self.kwargs["name"], version=self.kwargs["version"])
        return selectors.artifact_list().filter(version=version)

    @extend_schema(
        request={"multipart/form-data": ArtifactUploadSerializer},
        parameters=[
            OpenApiParameter(
                "wait",
                float,
                description="Seconds to wait for the pipeline; 201 when it finished in time, "
                "422 when it failed, 202 while it is still running.",
            )
        ],
        responses={201: ArtifactSerializer, 202: ArtifactSerializer, **ERRORS},
    )
    def post(self, request, name: str, version: str):
        wait = _wait_seconds(request)
        found = selectors.version_get(model_name=name, version=version)
        serializer = ArtifactUploadSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        artifact = services.artifact_upload(
            version=found,
            variant=serializer.validated_data["variant"],
            upload=serializer.validated_data["file"],
            created_by=request.user,
            requires_hardware=serializer.validated_data.get("requires_hardware"),
            quantize_recipes=_requested_recipes(request, serializer.validated_data),
        )
        artifact = _wait_for_pipeline(artifact, wait)
        body = ArtifactSerializer(artifact, context={"request": request}).data
        if artifact.status == ArtifactStatus.FAILED:
            return Response(
                error_body(artifact.failure_code, artifact.failure_reason, "file", artifact=body),
                status=status.HTTP_422_UNPROCESSABLE_ENTITY,
            )
        code = (
            status.HTTP_201_CREATED if artifact.status == ArtifactStatus.READY else status.HTTP_202_ACCEPTED
        )
        return Response(body, status=code, headers={"Location": body["urls"]["self"]})


@extend_schema(responses={200: ArtifactSerializer, **ERRORS})
class ArtifactList(generics.ListAPIView):
    serializer_class = ArtifactSerializer
    filterset_class = ArtifactFilter

    def get_queryset(self):
        return selectors.artifact_list()


@extend_schema(parameters=[ID_PARAM], responses={200: ArtifactSerializer, **ERRORS})
class ArtifactDetail(generics.RetrieveAPIView):
    serializer_class = ArtifactSerializer
    lookup_url_kwarg = "id"

    def get_queryset(self):
        return selectors.artifact_list()


class CanFetchArtifact(BasePermission):
    """People with the viewer role, and devices the artifact is assigned to."""

    message = "You may not download this artifact."

    def has_object_permission(self, request, view, obj) -> bool:
        return selectors.artifact_fetchable_by(principal=request.user, artifact=obj)


class _ArtifactFileView(APIView):
    permission_classes = [IsAuthenticated, CanFetchArtifact]
    content_negotiation_class = FallbackContentNegotiation

    def artifact(self, artifact_id: int) -> Artifact:
        artifact = selectors.artifact_files().filter(pk=artifact_id).first()
        if artifact is None:
            raise NotFound(f"No artifact {artifact_id}.", code="unknown_artifact")
        self.check_object_permissions(self.request, artifact)
        return selectors.artifact_ready(artifact)


@extend_schema(
    parameters=[ID_PARAM],
    responses={(200, "application/json"): OpenApiTypes.OBJECT, **ERRORS},
    summary="The signed manifest (a DSSE envelope)",
)
class ArtifactManifest(_ArtifactFileView):
    def get(self, request, id: int):
        artifact = self.artifact(id)
        response = HttpResponse(artifact.manifest_envelope, content_type="application/json")
        response["ETag"] = f'"{artifact.manifest_sha256}"'
        return response


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _requested_range(request, size: int, etag: str) -> tuple[int, int] | None:
    """The single byte range to send, or None for the whole file (RFC 9110, 14.2).

    Multiple ranges and malformed headers are ignored (the whole file is sent); a stale
    ``If-Range`` validator means the client's partial copy is of another file.
    """
    header = request.headers.get("Range", "")
    if not header or request.headers.get("If-Range", etag) != etag:
        return None
    match = _RANGE.match(header.replace(" ", ""))
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # suffix range: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            raise _Unsatisfiable()
        return max(0, size - length), size - 1
    start = int(first)
    if start >= size:
        raise _Unsatisfiable()
    end = int(last) if last else size - 1
    if end < start:
        return None
    return start, min(end, size - 1)


class _Unsatisfiable(Exception):
    pass


def _chunks(name: str, start: int, length: int):
    with services.artifact_storage().open(name, "rb") as handle:
        handle.seek(start)
        while length > 0:
            chunk = handle.read(min(services.CHUNK_BYTES, length))
            if not chunk:
                break
            length -= len(chunk)
            yield chunk


def ranged_file_response(request, *, name: str, size: int, sha256: str, content_type: str) -> HttpResponse:
    """Stream a stored file with ETag, Range (206), If-Range and 416 support."""
    etag = f'"{sha256}"'
    if request.headers.get("If-None-Match") == etag:
        response = HttpResponse(status=status.HTTP_304_NOT_MODIFIED)
        response["ETag"] = etag
        return response
    try:
        byte_range = _requested_range(request, size, etag)
    except _Unsatisfiable:
        response = Response(
            error_body(
                "range_not_satisfiable", f"The file is {size} bytes; the requested range is outside it."
            ),
            status=status.HTTP_416_REQUESTED_RANGE_NOT_SATISFIABLE,
        )
        response["Content-Range"] = f"bytes */{size}"
        return response
    start, end = byte_range if byte_range else (0, size - 1)
    length = max(0, end - start + 1)
    response = StreamingHttpResponse(
        _chunks(name, start, length),
        status=status.HTTP_206_PARTIAL_CONTENT if byte_range else status.HTTP_200_OK,
        content_type=content_type,
    )
    response["Content-Length"] = str(length)
    response["Accept-Ranges"] = "bytes"
    response["ETag"] = etag
    if byte_range:
        response["Content-Range"] = f"bytes {start}-{end}/{size}"
    return response


@extend_schema(
    parameters=[ID_PARAM],
    responses={
        (200, "application/zstd"): OpenApiTypes.BINARY,
        (206, "application/zstd"): OpenApiTypes.BINARY,
        **ERRORS,
    },
    summary="The zstd-compressed model (supports Range, If-Range, ETag)",
)
class ArtifactBlob(_ArtifactFileView):
    def get(self, request, id: int):
        artifact = self.artifact(id)
        return ranged_file_response(
            request,
            name=artifact.blob_file,
            size=artifact.blob_size,
            sha256=artifact.blob_sha256,
            content_type="application/zstd",
        )


class _DeltaFileView(_ArtifactFileView):
    """A delta to an artifact: whoever may download the artifact may download its deltas."""

    def delta(self, artifact_id: int, delta_id: int) -> ArtifactDelta:
        return selectors.delta_ready(artifact=self.artifact(artifact_id), delta_id=delta_id)


DELTA_ID_PARAM = OpenApiParameter("delta_id", int, OpenApiParameter.PATH, description="The delta's id.")


@extend_schema(
    parameters=[ID_PARAM, DELTA_ID_PARAM],
    responses={(200, "application/json"): OpenApiTypes.OBJECT, **ERRORS},
    summary="A delta's signed manifest (a DSSE envelope; docs/protocol.md, addition 11)",
)
class ArtifactDeltaManifest(_DeltaFileView):
    def get(self, request, id: int, delta_id: int):
        delta = self.delta(id, delta_id)
        response = HttpResponse(delta.manifest_envelope, content_type="application/json")
        response["ETag"] = f'"{delta.manifest_sha256}"'
        return response


@extend_schema(
    parameters=[ID_PARAM, DELTA_ID_PARAM],
    responses={
        (200, "application/octet-stream"): OpenApiTypes.BINARY,
        (206, "application/octet-stream"): OpenApiTypes.BINARY,
        **ERRORS,
    },
    summary="A tensor-level delta that rebuilds the model from an earlier version (supports Range)",
)
class ArtifactDeltaBlob(_DeltaFileView):
    def get(self, request, id: int, delta_id: int):
        delta = self.delta(id, delta_id)
        return ranged_file_response(
            request,
            name=delta.blob_file,
            size=delta.blob_size,
            sha256=delta.blob_sha256,
            content_type="application/octet-stream",
        )


@extend_schema(
    parameters=[ID_PARAM],
    responses={(200, "application/octet-stream"): OpenApiTypes.BINARY, **ERRORS},
    summary="The version's golden set (.npz) that the device runs before it swaps",
)
class ArtifactGolden(_ArtifactFileView):
    def get(self, request, id: int):
        artifact = self.artifact(id)
        version = artifact.version
        if not version.has_golden_set:
            raise NotFound(f"{version} has no golden set.", code="no_golden_set")
        return ranged_file_response(
            request,
            name=version.golden_file,
            size=version.golden_size,
            sha256=version.golden_sha256,
            content_type="application/octet-stream",
        )


@extend_schema(responses={200: SigningKeySerializer, **ERRORS})
class SigningKeyList(generics.ListAPIView):
    """Public keys to pin on devices (keyid, raw 32-byte Ed25519 key as hex, status)."""

    serializer_class = SigningKeySerializer
    permission_classes = [IsViewer]
    filterset_class = SigningKeyFilter

    def get_queryset(self):
        return selectors.signing_keys()


# --- root of trust and keyring (docs/security.md, "Keys and rotation")


class EnvelopeSerializer(serializers.Serializer):
    payloadType = serializers.CharField(help_text="application/vnd.modelfleet.root+json or …keyring+json")
    payload = serializers.CharField(help_text="base64 of the signed payload")
    signatures = serializers.ListField(child=serializers.DictField(), help_text="[{keyid, sig}]")


class TrustBundleSerializer(serializers.Serializer):
    schema = serializers.IntegerField()
    roots = serializers.ListField(child=EnvelopeSerializer(), help_text="every root document, oldest first")
    keyring = EnvelopeSerializer(allow_null=True)


class TrustUploadedSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=["root", "keyring"])
    version = serializers.IntegerField()
    expires_at = serializers.DateTimeField()


class TrustView(APIView):
    """The trust bundle devices verify with: public keys and signatures only, so anyone may
    read it (a device fetches it before it trusts anything). Admins upload root documents
    and keyrings signed offline; each is checked with the devices' own rules."""

    serializer_class = EnvelopeSerializer
    parser_classes = [JSONParser]

    def get_permissions(self):
        return [AllowAny()] if self.request.method == "GET" else [IsAdmin()]

    @extend_schema(
        responses={200: TrustBundleSerializer, **ERRORS}, summary="The root chain and current keyring"
    )
    def get(self, request):
        bundle = trust.trust_bundle()
        if bundle is None:
            raise NotFound("No root of trust has been uploaded yet (docs/security.md).", code="no_root")
        return Response(bundle)

    @extend_schema(
        request=EnvelopeSerializer,
        responses={201: TrustUploadedSerializer, **ERRORS},
        summary="Upload a root document or keyring signed offline",
    )
    def post(self, request):
        row = trust.trust_upload(envelope=request.data, user=request.user)
        kind = "root" if isinstance(row, TrustRoot) else "keyring"
        return Response(
            {"kind": kind, "version": row.version, "expires_at": row.expires_at},
            status=status.HTTP_201_CREATED,
        )
