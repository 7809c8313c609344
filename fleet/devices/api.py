"""Devices REST API: inventory (declarative, with filters), groups, enrollment tokens,
enrollment, and the lifecycle actions (thin views over services)."""

from __future__ import annotations

from django.conf import settings
from django_filters import rest_framework as filters
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from fleet.core import listing
from fleet.core.fields import refuse_nul_characters
from fleet.core.permissions import IsAdmin, IsOperator, ViewerReadsOperatorWrites
from fleet.core.throttling import ClientAddressRateThrottle
from fleet.devices import selectors, services
from fleet.devices.choices import DeviceStatus, EnrollmentTokenState, GroupKind
from fleet.devices.models import Device, DeviceGroup, EnrollmentToken
from fleet.registry.api import ERRORS, list_create_schema

DEVICE_ID_PARAM = OpenApiParameter("device_id", str, OpenApiParameter.PATH, description="Device id")


class DeviceSerializer(serializers.ModelSerializer):
    groups = serializers.SerializerMethodField()

    class Meta:
        model = Device
        fields = [
            "device_id",
            "display_name",
            "status",
            "hardware",
            "runtime",
            "runtime_version",
            "supports_int8",
            "supported_ops",
            "agent_version",
            "tags",
            "online",
            "last_seen_at",
            "applied_generation",
            "reported_models",
            "desired_generation",
            "desired_artifacts",
            "health",
            "enrolled_at",
            "created_at",
            "groups",
        ]
        read_only_fields = [f for f in fields if f not in ("display_name", "tags")]

    def get_groups(self, device: Device) -> list[str]:
        return sorted(group.name for group in device.static_groups.all())


class DeviceUpdateSerializer(serializers.Serializer):
    display_name = serializers.CharField(max_length=200, required=False, allow_blank=True)
    tags = serializers.ListField(child=serializers.CharField(max_length=64), required=False)


class DeviceFilter(listing.FilterSet):
    status = filters.ChoiceFilter(choices=DeviceStatus.choices)
    online = listing.BooleanFilter()
    hardware = filters.CharFilter()
    tag = filters.CharFilter(method="filter_tag", label="has this tag")
    group = filters.CharFilter(method="filter_group", label="member of this group (static or dynamic)")
    model = filters.CharFilter(method="filter_model", label="reports this model")
    version = filters.CharFilter(method="filter_version", label="reports this model version (with model=)")
    ordering = listing.OrderingFilter(
        fields=[
            "device_id",
            "display_name",
            "status",
            "hardware",
            "agent_version",
            "last_seen_at",
            "enrolled_at",
            "created_at",
        ]
    )

    def filter_tag(self, queryset, name, value):
        return queryset.filter(tags__contains=[value])

    def filter_group(self, queryset, name, value):
        group = DeviceGroup.objects.filter(name=value).first()
        return selectors.group_devices(group=group, queryset=queryset) if group else queryset.none()

    def filter_model(self, queryset, name, value):
        return queryset.filter(reported_models__has_key=value)

    def filter_version(self, queryset, name, value):
        model = self.data.get("model")
        if not model:
            raise serializers.ValidationError({"version": "Filter by version together with model=."})
        return queryset.filter(**{f"reported_models__{model}__version": value})


@extend_schema(responses={200: DeviceSerializer, **ERRORS})
class DeviceList(generics.ListAPIView):
    serializer_class = DeviceSerializer
    filterset_class = DeviceFilter

    def get_queryset(self):
        return Device.objects.prefetch_related("static_groups")


@extend_schema(parameters=[DEVICE_ID_PARAM])
class DeviceDetail(generics.RetrieveUpdateAPIView):
    serializer_class = DeviceSerializer
    permission_classes = [ViewerReadsOperatorWrites]
    queryset = Device.objects.all()
    http_method_names = ["get", "patch", "head", "options"]

    def get_object(self):
        return services.device_get(device_id=self.kwargs["device_id"])

    @extend_schema(request=DeviceUpdateSerializer, responses={200: DeviceSerializer, **ERRORS})
    def patch(self, request, device_id: str):
        data = DeviceUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        device = services.device_update(device=self.get_object(), **data.validated_data)
        return Response(DeviceSerializer(device).data)


class CredentialsSerializer(serializers.Serializer):
    device_id = serializers.CharField()
    status = serializers.CharField()
    token = serializers.CharField(help_text="Bearer token for the device's API calls. Shown once.")
    mqtt = serializers.DictField(help_text="url, username, password (shown once), topic_prefix")


def credentials_body(credentials: services.Credentials) -> dict:
    return {
        "device_id": credentials.device.device_id,
        "status": credentials.device.status,
        "token": credentials.token,
        "mqtt": {
            "url": settings.MQTT_PUBLIC_URL,
            "username": credentials.mqtt_username,
            "password": credentials.mqtt_password,
            "topic_prefix": settings.MQTT_TOPIC_PREFIX,
        },
    }


DEVICE_ACTIONS = {
    "approve": services.device_approve,
    "disable": services.device_disable,
    "retire": services.device_retire,
}


def device_action_view(action: str) -> type[APIView]:
    class DeviceAction(APIView):
        permission_classes = [IsOperator]
        serializer_class = DeviceSerializer

        @extend_schema(
            parameters=[DEVICE_ID_PARAM],
            request=None,
            responses={200: DeviceSerializer, **ERRORS},
            operation_id=f"devices_{action}",
            summary=f"{action.capitalize()} a device",
        )
        def post(self, request, device_id: str):
            device = DEVICE_ACTIONS[action](device=services.device_get(device_id=device_id))
            return Response(DeviceSerializer(device).data)

    DeviceAction.__name__ = f"Device{action.capitalize()}"
    return DeviceAction


class DeviceRotateCredentials(APIView):
    permission_classes = [IsOperator]
    serializer_class = CredentialsSerializer

    @extend_schema(
        parameters=[DEVICE_ID_PARAM],
        request=None,
        responses={200: CredentialsSerializer, **ERRORS},
        summary="New API token and broker password for a device (shown once)",
    )
    def post(self, request, device_id: str):
        credentials = services.device_rotate_credentials(device=services.device_get(device_id=device_id))
        return Response(credentials_body(credentials))


class PreauthorizeSerializer(serializers.Serializer):
    device_id = serializers.CharField(max_length=128)
    display_name = serializers.CharField(max_length=200, required=False, default="")
    tags = serializers.ListField(child=serializers.CharField(max_length=64), required=False, default=list)


class PreauthorizedSerializer(serializers.Serializer):
    device_id = serializers.CharField()
    enrollment_code = serializers.CharField(help_text="One-time code the device enrolls with. Shown once.")


class DevicePreauthorize(APIView):
    permission_classes = [IsOperator]
    serializer_class = PreauthorizeSerializer

    @extend_schema(
        request=PreauthorizeSerializer,
        responses={201: PreauthorizedSerializer, **ERRORS},
        summary="Register a device id in advance with a one-time enrollment code",
    )
    def post(self, request):
        data = PreauthorizeSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        device, code = services.device_preauthorize(**data.validated_data)
        return Response(
            {"device_id": device.device_id, "enrollment_code": code}, status=status.HTTP_201_CREATED
        )


class ProvisionDeviceSerializer(serializers.Serializer):
    device_id = serializers.CharField(max_length=128)
    identity = serializers.DictField(
        required=False,
        default=dict,
        validators=[refuse_nul_characters],
        help_text="As in enrollment: display_name, hardware, runtime, runtime_version, agent_version, "
        "supports_int8, supported_ops, unsupported_ops",
    )
    tags = serializers.ListField(child=serializers.CharField(), required=False, default=list)


class ProvisionSerializer(serializers.Serializer):
    devices = serializers.ListField(
        child=ProvisionDeviceSerializer(),
        help_text="At most DEVICE_PROVISION_MAX_DEVICES (1000) per request.",
    )
    tags = serializers.ListField(
        child=serializers.CharField(), required=False, default=list, help_text="Given to every device."
    )


class ProvisionedSerializer(serializers.Serializer):
    devices = CredentialsSerializer(many=True, help_text="In the order asked; every secret shown once.")


class DeviceProvision(APIView):
    """Bulk provisioning for factories (docs/enrollment.md, "Bulk provisioning")."""

    permission_classes = [IsAdmin]
    serializer_class = ProvisionSerializer

    @extend_schema(
        request=ProvisionSerializer,
        responses={201: ProvisionedSerializer, **ERRORS},
        summary="Create many active devices at once, with their credentials (shown once)",
    )
    def post(self, request):
        # The cap before validating: a request far over it is refused without parsing it all.
        devices = request.data.get("devices") if isinstance(request.data, dict) else None
        if isinstance(devices, list):
            services.devices_provision_count_check(count=len(devices))
        data = ProvisionSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        credentials = services.devices_provision(
            items=[
                services.ProvisionItem(device["device_id"], device["identity"], device["tags"])
                for device in data.validated_data["devices"]
            ],
            tags=data.validated_data["tags"],
        )
        return Response(
            {"devices": [credentials_body(one) for one in credentials]}, status=status.HTTP_201_CREATED
        )


# --- enrollment


class EnrollThrottle(ClientAddressRateThrottle):
    """Per client address (the peer, or what TRUSTED_PROXY_COUNT proxies saw; never a
    header the client wrote); the rate is read at request time (setting ENROLL_RATE)."""

    scope = "enroll"

    def get_rate(self):
        return settings.ENROLL_RATE


class EnrollSerializer(serializers.Serializer):
    device_id = serializers.CharField(max_length=128)
    enrollment_token = serializers.CharField(required=False, help_text="A fleet enrollment token (me_…)")
    enrollment_code = serializers.CharField(required=False, help_text="A pre-authorized device's code (mc_…)")
    identity = serializers.DictField(
        required=False,
        default=dict,
        validators=[refuse_nul_characters],  # its strings land in text columns
        help_text="display_name, hardware (class, e.g. rpi4), runtime, runtime_version (e.g. 2.18.0), "
        "agent_version, supports_int8, supported_ops and unsupported_ops (TFLite op names)",
    )


class Enroll(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_classes = [EnrollThrottle]
    serializer_class = EnrollSerializer

    @extend_schema(
        request=EnrollSerializer,
        responses={201: CredentialsSerializer, **ERRORS},
        summary="Enroll a device: its API token and broker credentials (shown once)",
    )
    def post(self, request):
        data = EnrollSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        credentials = services.device_enroll(**data.validated_data)
        return Response(credentials_body(credentials), status=status.HTTP_201_CREATED)


# --- enrollment tokens (admins)


class EnrollmentTokenSerializer(serializers.ModelSerializer):
    # A plain string in the schema: an enum here would collide with the rollouts' "state".
    state = serializers.CharField(
        read_only=True, help_text=f"One of {', '.join(EnrollmentTokenState.values)}."
    )

    class Meta:
        model = EnrollmentToken
        fields = [
            "id",
            "name",
            "prefix",
            "auto_approve",
            "expires_at",
            "max_uses",
            "uses",
            "state",
            "tags",
            "created_at",
            "revoked_at",
        ]
        read_only_fields = ["id", "prefix", "uses", "created_at", "revoked_at"]
        extra_kwargs = {
            "expires_at": {"help_text": "Default: now + ENROLLMENT_TOKEN_DEFAULT_TTL_DAYS (30 days)."},
            "max_uses": {"help_text": "Default: ENROLLMENT_TOKEN_DEFAULT_MAX_USES (100).", "min_value": 1},
        }


class EnrollmentTokenCreatedSerializer(EnrollmentTokenSerializer):
    """The answer to POST, the only one that carries the key (so the schema says so)."""

    key = serializers.CharField(read_only=True, help_text="Shown once, in the answer to POST.")

    class Meta(EnrollmentTokenSerializer.Meta):
        fields = [*EnrollmentTokenSerializer.Meta.fields, "key"]


class EnrollmentTokenFilter(listing.FilterSet):
    auto_approve = listing.BooleanFilter()
    ordering = listing.OrderingFilter(fields=["name", "created_at", "expires_at", "uses"])


@list_create_schema(EnrollmentTokenSerializer, EnrollmentTokenCreatedSerializer)
class EnrollmentTokenListCreate(generics.ListCreateAPIView):
    serializer_class = EnrollmentTokenSerializer
    permission_classes = [IsAdmin]
    filterset_class = EnrollmentTokenFilter
    queryset = EnrollmentToken.objects.order_by("-created_at")

    def create(self, request, *args, **kwargs):
        data = self.get_serializer(data=request.data)
        data.is_valid(raise_exception=True)
        token, key = services.enrollment_token_create(created_by=request.user, **data.validated_data)
        body = EnrollmentTokenSerializer(token).data
        body["key"] = key
        return Response(body, status=status.HTTP_201_CREATED)


class EnrollmentTokenRevoke(APIView):
    permission_classes = [IsAdmin]
    serializer_class = EnrollmentTokenSerializer

    @extend_schema(
        parameters=[OpenApiParameter("id", int, OpenApiParameter.PATH)],
        request=None,
        responses={200: EnrollmentTokenSerializer, **ERRORS},
    )
    def post(self, request, id: int):
        token = generics.get_object_or_404(EnrollmentToken, pk=id)
        return Response(EnrollmentTokenSerializer(services.enrollment_token_revoke(token=token)).data)


# --- groups


class DeviceGroupSerializer(serializers.ModelSerializer):
    members = serializers.SlugRelatedField(
        slug_field="device_id", many=True, queryset=Device.objects.all(), required=False
    )
    device_count = serializers.SerializerMethodField()

    class Meta:
        model = DeviceGroup
        fields = ["name", "description", "kind", "members", "rules", "device_count", "created_at"]
        read_only_fields = ["created_at"]

    def get_device_count(self, group: DeviceGroup) -> int:
        return selectors.group_devices(group=group).count()

    def validate(self, attrs):
        selectors.validate_group_rules(attrs.get("rules") or {})
        return attrs

    def create(self, validated_data):
        return services.group_create(**validated_data)

    def update(self, instance, validated_data):
        return services.group_update(group=instance, **validated_data)


class DeviceGroupFilter(listing.FilterSet):
    kind = filters.ChoiceFilter(choices=GroupKind.choices)
    ordering = listing.OrderingFilter(fields=["name", "kind", "created_at"])


@list_create_schema(DeviceGroupSerializer)
class DeviceGroupListCreate(generics.ListCreateAPIView):
    serializer_class = DeviceGroupSerializer
    permission_classes = [ViewerReadsOperatorWrites]
    filterset_class = DeviceGroupFilter
    queryset = DeviceGroup.objects.prefetch_related("members")


@extend_schema(
    parameters=[OpenApiParameter("name", str, OpenApiParameter.PATH)],
    responses={200: DeviceGroupSerializer, **ERRORS},
)
class DeviceGroupDetail(generics.RetrieveUpdateDestroyAPIView):
    serializer_class = DeviceGroupSerializer
    permission_classes = [ViewerReadsOperatorWrites]
    queryset = DeviceGroup.objects.prefetch_related("members")
    lookup_field = "name"
