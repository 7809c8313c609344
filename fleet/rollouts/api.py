"""Rollouts REST API: policies (declarative), rollouts, and the actions (thin views over
one service each)."""

from __future__ import annotations

from collections import Counter

from django_filters import rest_framework as filters
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import generics, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from fleet.core import listing
from fleet.core.permissions import IsOperator, ViewerReadsOperatorWrites
from fleet.registry import selectors as registry_selectors
from fleet.registry.api import ERRORS, NAME_PARAM, VERSION_PARAM, list_create_schema
from fleet.rollouts import selectors, services
from fleet.rollouts.choices import Approval, AssignmentState, OnFailure, RolloutState
from fleet.rollouts.models import GateEvaluation, Rollout, RolloutPolicy, default_gates, default_stages

ID_PARAM = OpenApiParameter("id", int, OpenApiParameter.PATH, description="Rollout id")


class PolicySerializer(serializers.ModelSerializer):
    class Meta:
        model = RolloutPolicy
        fields = [
            "name",
            "description",
            "stages",
            "gates",
            "on_failure",
            "approval",
            "maintenance_window",
            "pickup_timeout_seconds",
            "created_at",
        ]
        read_only_fields = ["created_at"]

    def validate(self, attrs):
        stages = attrs.get("stages", self.instance.stages if self.instance else default_stages())
        gates = attrs.get("gates", self.instance.gates if self.instance else default_gates())
        window = attrs.get("maintenance_window", self.instance.maintenance_window if self.instance else None)
        # Stored as given; defaults are spelled out in the snapshot a rollout takes at start.
        services.policy_validate(stages=stages, gates=gates, maintenance_window=window)
        return attrs


class PolicyFilter(listing.FilterSet):
    approval = filters.ChoiceFilter(choices=Approval.choices)
    on_failure = filters.ChoiceFilter(choices=OnFailure.choices)
    ordering = listing.OrderingFilter(fields=["name", "created_at"])


@list_create_schema(PolicySerializer)
class PolicyListCreate(generics.ListCreateAPIView):
    serializer_class = PolicySerializer
    permission_classes = [ViewerReadsOperatorWrites]
    filterset_class = PolicyFilter
    queryset = RolloutPolicy.objects.order_by("name")


@extend_schema(
    parameters=[OpenApiParameter("name", str, OpenApiParameter.PATH)],
    responses={200: PolicySerializer, **ERRORS},
)
class PolicyDetail(generics.RetrieveUpdateAPIView):
    serializer_class = PolicySerializer
    permission_classes = [ViewerReadsOperatorWrites]
    queryset = RolloutPolicy.objects.all()
    lookup_field = "name"
    http_method_names = ["get", "patch", "head", "options"]


class EvaluationSerializer(serializers.ModelSerializer):
    class Meta:
        model = GateEvaluation
        fields = [
            "stage",
            "metric",
            "variant",
            "verdict",
            "decision",
            "summary",
            "candidate_value",
            "incumbent_value",
            "candidate_n",
            "incumbent_n",
            "candidate_devices",
            "incumbent_devices",
            "threshold",
            "p_value",
            "lower",
            "upper",
            "method",
            "looks",
            "note",
            "inputs",
            "evaluated_at",
        ]


class RolloutSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name", read_only=True)
    version = serializers.CharField(source="target_version.version", read_only=True)
    policy = serializers.CharField(source="policy.name", read_only=True)
    stages = serializers.ListField(read_only=True)
    counts = serializers.SerializerMethodField()
    skipped = serializers.SerializerMethodField()
    evaluations = serializers.SerializerMethodField()
    delivery = serializers.SerializerMethodField()

    class Meta:
        model = Rollout
        fields = [
            "id",
            "model",
            "version",
            "policy",
            "targets",
            "priority",
            "state",
            "current_stage",
            "stages",
            "stage_started_at",
            "awaiting_approval",
            "last_decision",
            "counts",
            "skipped",
            "evaluations",
            "delivery",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields

    @extend_schema_field(
        {
            "type": "object",
            "description": "How the devices got the target version (docs/protocol.md, addition 11): "
            "by delta or full blob, bytes downloaded, what full blobs would be, why deltas were not used.",
            "properties": {
                "by_delta": {"type": "integer"},
                "full": {"type": "integer"},
                "downloaded_bytes": {"type": "integer"},
                "full_blob_bytes": {"type": "integer"},
                "fallbacks": {"type": "object", "additionalProperties": {"type": "integer"}},
                "summary": {"type": "string"},
            },
        }
    )
    def get_delivery(self, rollout: Rollout) -> dict:
        delivery = selectors.rollout_delivery(rollout)
        return {
            "by_delta": delivery.by_delta,
            "full": delivery.full,
            "downloaded_bytes": delivery.downloaded,
            "full_blob_bytes": delivery.full_blobs,
            "fallbacks": delivery.fallbacks,
            "summary": delivery.summary,
        }

    @extend_schema_field({"type": "object", "additionalProperties": {"type": "integer"}})
    def get_counts(self, rollout: Rollout) -> dict[str, int]:
        counts = Counter(rollout.assignments.values_list("state", flat=True))
        return {state: counts.get(state, 0) for state in AssignmentState.values}

    @extend_schema_field({"type": "array", "items": {"type": "object"}})
    def get_skipped(self, rollout: Rollout) -> list[dict]:
        return [
            {"device_id": device_id, "code": code or None, "reason": reason}
            for device_id, code, reason in rollout.assignments.filter(
                state=AssignmentState.SKIPPED
            ).values_list("device__device_id", "skip_code", "reason")
        ]

    @extend_schema_field(EvaluationSerializer(many=True))
    def get_evaluations(self, rollout: Rollout) -> list[dict]:
        latest = rollout.evaluations.order_by("-evaluated_at").first()
        if latest is None:
            return []
        batch = rollout.evaluations.filter(evaluated_at=latest.evaluated_at)
        return EvaluationSerializer(batch, many=True).data


class RolloutCreateSerializer(serializers.Serializer):
    model = serializers.CharField()
    version = serializers.CharField()
    policy = serializers.SlugRelatedField(slug_field="name", queryset=RolloutPolicy.objects.all())
    targets = serializers.DictField(child=serializers.ListField(child=serializers.CharField()))
    priority = serializers.IntegerField(required=False, default=0)


class RolloutFilter(listing.FilterSet):
    state = filters.ChoiceFilter(choices=RolloutState.choices)
    model = filters.CharFilter(field_name="model__name", label="model name")
    version = filters.CharFilter(field_name="target_version__version", label="target version")
    policy = filters.CharFilter(field_name="policy__name", label="policy name")
    ordering = listing.OrderingFilter(
        fields=["id", "state", "priority", "created_at", "started_at", "finished_at"]
    )


@list_create_schema(RolloutSerializer)
class RolloutListCreate(generics.ListCreateAPIView):
    serializer_class = RolloutSerializer
    permission_classes = [ViewerReadsOperatorWrites]
    filterset_class = RolloutFilter

    def get_queryset(self):
        return Rollout.objects.select_related("model", "target_version", "policy")

    @extend_schema(request=RolloutCreateSerializer, responses={201: RolloutSerializer, **ERRORS})
    def post(self, request):
        data = RolloutCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        version = registry_selectors.version_get(model_name=values["model"], version=values["version"])
        rollout = services.rollout_create(
            model=version.model,
            version=version,
            targets=values["targets"],
            policy=values["policy"],
            priority=values["priority"],
            created_by=request.user,
        )
        return Response(RolloutSerializer(rollout).data, status=status.HTTP_201_CREATED)


@extend_schema(parameters=[ID_PARAM], responses={200: RolloutSerializer, **ERRORS})
class RolloutDetail(generics.RetrieveAPIView):
    serializer_class = RolloutSerializer
    queryset = Rollout.objects.select_related("model", "target_version", "policy")
    lookup_url_kwarg = "id"


class ReasonSerializer(serializers.Serializer):
    reason = serializers.CharField(required=False, allow_blank=True, default="", max_length=2000)


ACTIONS = {
    "start": services.rollout_start,
    "pause": services.rollout_pause,
    "resume": services.rollout_resume,
    "promote": services.rollout_promote,
    "abort": services.rollout_abort,
    "rollback": services.rollout_rollback,
}


def rollout_action_view(action: str) -> type[APIView]:
    class RolloutAction(APIView):
        permission_classes = [IsOperator]
        serializer_class = ReasonSerializer

        @extend_schema(
            parameters=[ID_PARAM],
            request=ReasonSerializer,
            responses={200: RolloutSerializer, **ERRORS},
            operation_id=f"rollouts_{action}",
            summary=f"{action.capitalize()} a rollout",
        )
        def post(self, request, id: int):
            rollout = generics.get_object_or_404(Rollout, pk=id)
            data = ReasonSerializer(data=request.data)
            data.is_valid(raise_exception=True)
            rollout = ACTIONS[action](rollout=rollout, by=request.user, reason=data.validated_data["reason"])
            return Response(RolloutSerializer(rollout).data)

    RolloutAction.__name__ = f"Rollout{action.capitalize()}"
    return RolloutAction


class CompatibilityVariantSerializer(serializers.Serializer):
    variant = serializers.CharField()
    raw_size = serializers.IntegerField(help_text="bytes")
    quantization = serializers.CharField()
    ops = serializers.ListField(child=serializers.CharField())
    min_runtime = serializers.CharField(allow_null=True, help_text="TensorFlow Lite release, e.g. 2.3.0")
    requires_hardware = serializers.ListField(child=serializers.CharField())


class CompatibilityRowSerializer(serializers.Serializer):
    group = serializers.CharField(allow_null=True, help_text="null: the whole fleet")
    hardware = serializers.CharField()
    devices = serializers.IntegerField()
    runs = serializers.DictField(
        child=serializers.IntegerField(), help_text="variant -> devices that can run it"
    )
    gets = serializers.DictField(
        child=serializers.IntegerField(), help_text="variant -> devices a rollout gives it"
    )
    skipped = serializers.IntegerField(help_text="devices no variant fits (skip code no_variant_fits)")
    skipped_reasons = serializers.DictField(child=serializers.IntegerField())


class CompatibilitySerializer(serializers.Serializer):
    model = serializers.CharField()
    version = serializers.CharField()
    variants = CompatibilityVariantSerializer(many=True)
    rows = CompatibilityRowSerializer(many=True)


def compatibility_body(version, matrix: selectors.Compatibility) -> dict:
    """The matrix as the API shows it; the admin's version page draws the same numbers."""
    return {
        "model": version.model.name,
        "version": version.version,
        "variants": [
            {
                "variant": n.variant,
                "raw_size": n.raw_size,
                "quantization": n.quantization,
                "ops": sorted(n.ops),
                "min_runtime": ".".join(map(str, n.min_runtime)) if n.min_runtime else None,
                "requires_hardware": sorted(n.hardware),
            }
            for n in matrix.variants
        ],
        "rows": [row.__dict__ for row in matrix.rows],
    }


@extend_schema(parameters=[NAME_PARAM, VERSION_PARAM], responses={200: CompatibilitySerializer, **ERRORS})
class VersionCompatibility(APIView):
    """Which device groups and hardware classes can run which of the version's ready
    variants, counted from the active inventory (docs/rollouts.md, "Compatibility matrix")."""

    def get(self, request, name: str, version: str):
        found = registry_selectors.version_get(model_name=name, version=version)
        return Response(compatibility_body(found, selectors.version_compatibility(version=found)))
