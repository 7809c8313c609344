from __future__ import annotations

import re

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models
from django.db.models.functions import Cast
from django.utils import timezone

from agent.protocol.schemas import DEVICE_ID_PATTERN
from fleet.devices.choices import DeviceStatus, EnrollmentTokenState, GroupKind, IngestRefusalReason

device_id_validator = RegexValidator(
    DEVICE_ID_PATTERN, "Use letters, digits, '.', '_' or '-' (at most 128 characters)."
)

# On the broker a device's username is its id, so device ids and the control plane's own
# broker accounts share one name space (issue 9, section 1). The accounts' names are
# reserved, compared case-insensitively so that no spelling of them is ever a device.
SERVICE_ACCOUNT_NAMES = ("fleet-publisher", "fleet-ingest", "fleet-admin")
_USERNAME_SETTING = re.compile(r"MQTT_[A-Z0-9_]+_USERNAME")


def reserved_device_ids() -> frozenset[str]:
    """The default service account names and every configured ``MQTT_*_USERNAME``
    (casefolded): a service account added later is reserved as soon as it is configured."""
    configured = [getattr(settings, name) for name in dir(settings) if _USERNAME_SETTING.fullmatch(name)]
    return frozenset(
        str(name).casefold()
        for name in (*SERVICE_ACCOUNT_NAMES, *configured)
        if isinstance(name, str) and name
    )


def is_reserved_device_id(device_id: str) -> bool:
    return device_id.casefold() in reserved_device_ids()


def validate_device_id_not_reserved(value: str) -> None:
    """Model-level check, so that every form (the admin's pre-authorization) refuses it too."""
    if is_reserved_device_id(value):
        raise ValidationError(
            "%(value)s is the name of a broker service account; choose another device id.",
            code="reserved_device_id",
            params={"value": value},
        )


class EnrollmentToken(models.Model):
    """A fleet enrollment token that device makers bake into an image. Only its sha256 is
    kept. It may expire and have a use limit; devices it enrolls are active at once
    (auto-approve) or wait for an operator."""

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=12)
    key_sha256 = models.CharField(max_length=64, unique=True)
    auto_approve = models.BooleanField(default=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    max_uses = models.PositiveIntegerField(null=True, blank=True)
    uses = models.PositiveIntegerField(default=0)
    tags = models.JSONField(default=list, blank=True, help_text="Tags given to devices it enrolls.")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def state(self) -> EnrollmentTokenState:
        if self.revoked_at is not None:
            return EnrollmentTokenState.REVOKED
        if self.expires_at is not None and self.expires_at <= timezone.now():
            return EnrollmentTokenState.EXPIRED
        if self.max_uses is not None and self.uses >= self.max_uses:
            return EnrollmentTokenState.USED_UP
        return EnrollmentTokenState.USABLE


class Device(models.Model):
    device_id = models.CharField(
        max_length=128, unique=True, validators=[device_id_validator, validate_device_id_not_reserved]
    )
    display_name = models.CharField(max_length=200, blank=True)
    status = models.CharField(max_length=10, choices=DeviceStatus.choices, default=DeviceStatus.PENDING)
    # Identity and capabilities, as the device declared them at enrollment.
    hardware = models.CharField(max_length=64, default="any")
    runtime = models.CharField(max_length=64, blank=True)
    runtime_version = models.CharField(max_length=64, blank=True)
    supports_int8 = models.BooleanField(default=True)
    supported_ops = models.JSONField(default=list, blank=True)  # empty: every builtin op
    # TFLite op names the device's runtime lacks (the agent's [device] unsupported_ops).
    unsupported_ops = models.JSONField(default=list, blank=True)
    agent_version = models.CharField(max_length=32, blank=True)
    tags = models.JSONField(default=list, blank=True)
    # Pre-authorization: an operator registers the id with a one-time enrollment code.
    enrollment_code_sha256 = models.CharField(max_length=64, blank=True)
    enrolled_with = models.ForeignKey(EnrollmentToken, null=True, blank=True, on_delete=models.SET_NULL)
    enrolled_at = models.DateTimeField(null=True, blank=True)
    # What the device last told us (ingest bridge).
    online = models.BooleanField(default=False)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    applied_generation = models.PositiveBigIntegerField(default=0)
    reported_models = models.JSONField(default=dict, blank=True, help_text="model -> {version, variant}")
    # The root and keyring versions it verifies with (reported; docs/protocol.md, addition 6).
    root_version = models.PositiveIntegerField(null=True, blank=True)
    keyring_version = models.PositiveIntegerField(null=True, blank=True)
    health = models.JSONField(default=dict, blank=True)
    # What we last told the device.
    desired_generation = models.PositiveBigIntegerField(default=0)
    desired_artifacts = models.JSONField(default=dict, blank=True, help_text="model -> artifact id")
    # A candidate the device runs beside the live model without serving it (shadow stage).
    desired_shadows = models.JSONField(
        default=dict,
        # Also a database default: bulk loaders that insert devices with SQL need not know it.
        db_default=Cast(models.Value("{}"), models.JSONField()),
        blank=True,
        help_text='model -> {"artifact": id, "sample_rate": 0..1}',
    )
    created_at = models.DateTimeField(auto_now_add=True)
    status_changed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["device_id"]
        indexes = [models.Index(fields=["status", "online"]), models.Index(fields=["last_seen_at"])]

    def __str__(self) -> str:
        return self.device_id


def devices_locked(queryset: models.QuerySet[Device]) -> list[int]:
    """The pks of ``queryset``'s devices, their rows locked in id order until the
    transaction ends (FOR NO KEY UPDATE: the lock an UPDATE of non-key columns takes).

    Every transaction that changes many device rows takes this first, as the ingest bridge
    does (``ingest.LOCK_DEVICES``): two of them then queue instead of deadlocking. An
    ``UPDATE … WHERE id = ANY(…)`` alone locks in the order of its plan (a sequential or
    bitmap scan: the rows' physical order), and at 10,000 devices a stage's promotion and a
    bridge's batch did deadlock that way (docs/benchmarks.md, "Fleet at 10,000 devices")."""
    return list(queryset.order_by("pk").select_for_update(no_key=True).values_list("pk", flat=True))


class DeviceToken(models.Model):
    """A device's bearer token for the HTTP API (artifact downloads). Hashed; shown once."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="tokens")
    prefix = models.CharField(max_length=12)
    key_sha256 = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.device})"


class DeviceGroup(models.Model):
    """Static (chosen members) or dynamic (a saved filter over fields and tags)."""

    name = models.SlugField(max_length=64, unique=True)
    description = models.TextField(blank=True)
    kind = models.CharField(max_length=10, choices=GroupKind.choices, default=GroupKind.STATIC)
    members = models.ManyToManyField(Device, blank=True, related_name="static_groups")
    rules = models.JSONField(
        default=dict,
        blank=True,
        help_text='Dynamic groups: e.g. {"tags": ["outdoor"], "hardware": "rpi4", "status": "active"}',
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class DeviceEvent(models.Model):
    """Install/verify/swap/revert events devices report, with their reason codes."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="events")
    message_id = models.CharField(max_length=64)
    type = models.CharField(max_length=32)
    generation = models.PositiveBigIntegerField(null=True, blank=True)
    model = models.CharField(max_length=64, blank=True)
    version = models.CharField(max_length=64, blank=True)
    variant = models.CharField(max_length=64, blank=True)
    reason = models.CharField(max_length=40, blank=True)
    message = models.TextField(blank=True)
    # docs/protocol.md addition 11, on a ``verifying`` event after a download: how the model's
    # bytes came (DeliveryPath), how many the device says it downloaded, and why a delta
    # offered was not used (DeltaFallback). A claim of the device, shown, never decided on.
    delivery = models.CharField(max_length=8, blank=True, default="", db_default="")
    delivery_bytes = models.PositiveBigIntegerField(null=True, blank=True)
    delivery_fallback = models.CharField(max_length=40, blank=True, default="", db_default="")
    ts = models.DateTimeField(help_text="when the device says it happened")
    received_at = models.DateTimeField()

    class Meta:
        ordering = ["-received_at"]
        constraints = [
            # QoS 1 may deliver twice; the message id makes the second one a no-op.
            models.UniqueConstraint(fields=["device", "message_id"], name="devices_event_once")
        ]
        indexes = [models.Index(fields=["device", "-received_at"]), models.Index(fields=["generation"])]


class TelemetryWindow(models.Model):
    """One model's row of one telemetry message: the volume table (docs/ingest.md).

    On PostgreSQL the table is partitioned by day on ``window_start`` (raw SQL in migration
    0003; partitions are made ahead and dropped whole by ``fleet.devices.ingest``). Its real
    primary key is (id, window_start), since a partitioned table's keys must hold the
    partition key; ``id`` alone stays the ORM's pk and is unique in practice (identity)."""

    id = models.BigAutoField(primary_key=True)
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="+", db_index=False)
    message_id = models.CharField(max_length=64)
    ts = models.DateTimeField(help_text="end of the window, the device's clock")
    # ts - window_s: when the window began. Gates count the windows that began after their
    # stage started; the ingest invariants bound it to about a day around the server clock.
    window_start = models.DateTimeField()
    received_at = models.DateTimeField()
    window_s = models.FloatField()
    model = models.CharField(max_length=64)
    version = models.CharField(max_length=64)
    variant = models.CharField(max_length=64)
    inferences = models.PositiveBigIntegerField()
    errors = models.PositiveBigIntegerField()
    latency_p50_ms = models.FloatField(null=True)
    latency_p95_ms = models.FloatField(null=True)
    latency_p99_ms = models.FloatField(null=True)
    labeled = models.PositiveBigIntegerField(default=0)
    correct = models.PositiveBigIntegerField(default=0)
    # The candidate run in shadow beside the live model (ARCHITECTURE.md, "Shadow stage");
    # blank version when the window had none.
    shadow_version = models.CharField(max_length=64, blank=True, default="")
    shadow_variant = models.CharField(max_length=64, blank=True, default="")
    shadow_sampled = models.PositiveBigIntegerField(default=0)
    shadow_compared = models.PositiveBigIntegerField(default=0)
    shadow_agreed = models.PositiveBigIntegerField(default=0)
    shadow_errors = models.PositiveBigIntegerField(default=0)
    shadow_skipped = models.PositiveBigIntegerField(default=0)
    shadow_mean_abs_diff = models.FloatField(null=True)
    shadow_latency_p95_ms = models.FloatField(null=True)
    # The device's health at the end of the window (the message's "health"), repeated on
    # each model's row; null when the device did not say (the device page's sparklines).
    cpu_pct = models.FloatField(null=True)
    rss_mb = models.FloatField(null=True)
    temp_c = models.FloatField(null=True)

    class Meta:
        constraints = [
            # QoS 1 may deliver twice; a redelivery has the same ts and window_s, hence the
            # same window_start (which a unique key of a partitioned table must include).
            models.UniqueConstraint(
                fields=["device", "message_id", "model", "window_start"], name="devices_telemetry_once"
            )
        ]
        indexes = [
            # telemetry_by_device (fleet/devices/selectors.py): the rollout's devices, one
            # model, windows from the stage's start; the sums are read from the index alone.
            models.Index(
                fields=["model", "device", "window_start"],
                include=[
                    "version",
                    "variant",
                    "shadow_version",
                    "shadow_variant",
                    "inferences",
                    "errors",
                    "labeled",
                    "correct",
                    "latency_p95_ms",
                    "shadow_sampled",
                    "shadow_compared",
                    "shadow_agreed",
                    "shadow_errors",
                    "shadow_latency_p95_ms",
                ],
                name="devices_telemetry_gate",
            ),
        ]


class TelemetryHourly(models.Model):
    """Sums per device, hour of window_start and (model, version, variant, shadow version,
    shadow variant), from the windows really inserted: what charts and long-range questions
    read once the windows themselves are gone (TELEMETRY_HOURLY_RETENTION_DAYS)."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="+", db_index=False)
    hour = models.DateTimeField()
    model = models.CharField(max_length=64)
    version = models.CharField(max_length=64)
    variant = models.CharField(max_length=64)
    shadow_version = models.CharField(max_length=64, blank=True, default="")
    shadow_variant = models.CharField(max_length=64, blank=True, default="")
    windows = models.PositiveBigIntegerField(default=0)
    inferences = models.PositiveBigIntegerField(default=0)
    errors = models.PositiveBigIntegerField(default=0)
    labeled = models.PositiveBigIntegerField(default=0)
    correct = models.PositiveBigIntegerField(default=0)
    # p95 cannot be summed: keep the inference-weighted sum and its weight (the inferences
    # of the windows that had a p95), so mean p95 = sum / weight; and the worst window's.
    latency_p95_weighted_sum = models.FloatField(default=0)
    latency_p95_weight = models.PositiveBigIntegerField(default=0)
    latency_p95_max_ms = models.FloatField(null=True)
    shadow_sampled = models.PositiveBigIntegerField(default=0)
    shadow_compared = models.PositiveBigIntegerField(default=0)
    shadow_agreed = models.PositiveBigIntegerField(default=0)
    shadow_errors = models.PositiveBigIntegerField(default=0)
    shadow_skipped = models.PositiveBigIntegerField(default=0)
    # Weighted by the compared requests, as above: mean = sum / weight.
    shadow_latency_p95_weighted_sum = models.FloatField(default=0)
    shadow_latency_p95_weight = models.PositiveBigIntegerField(default=0)
    shadow_mean_abs_diff_weighted_sum = models.FloatField(default=0)
    shadow_mean_abs_diff_weight = models.PositiveBigIntegerField(default=0)
    # Health: the sum over the windows that reported it and their number (mean = sum / n).
    # Also database defaults, so that bulk loaders that insert with SQL need not know them.
    cpu_pct_sum = models.FloatField(default=0, db_default=0.0)
    cpu_pct_windows = models.PositiveBigIntegerField(default=0, db_default=0)
    rss_mb_sum = models.FloatField(default=0, db_default=0.0)
    rss_mb_windows = models.PositiveBigIntegerField(default=0, db_default=0)
    temp_c_sum = models.FloatField(default=0, db_default=0.0)
    temp_c_windows = models.PositiveBigIntegerField(default=0, db_default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["device", "hour", "model", "version", "variant", "shadow_version", "shadow_variant"],
                name="devices_hourly_key",
            )
        ]
        indexes = [
            models.Index(fields=["hour"], name="devices_hourly_hour"),
            # telemetry_sums (fleet/devices/selectors.py): the whole hours of a gate's stage,
            # its devices, one model; the sums are read from the index alone (issue 13).
            models.Index(
                fields=["model", "device", "hour"],
                include=[
                    "version",
                    "variant",
                    "shadow_version",
                    "shadow_variant",
                    "windows",
                    "inferences",
                    "errors",
                    "labeled",
                    "correct",
                    "latency_p95_weighted_sum",
                    "latency_p95_weight",
                    "latency_p95_max_ms",
                    "shadow_sampled",
                    "shadow_compared",
                    "shadow_agreed",
                    "shadow_errors",
                    "shadow_latency_p95_weighted_sum",
                    "shadow_latency_p95_weight",
                ],
                name="devices_hourly_gate",
            ),
        ]


class IngestRefusal(models.Model):
    """How many messages of a device the ingest bridges refused, per reason (upserted once
    per batch), so that ops can see which device misbehaves and since when."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="+", db_index=False)
    reason = models.CharField(max_length=16, choices=IngestRefusalReason.choices)
    count = models.PositiveBigIntegerField(default=0)
    first_at = models.DateTimeField()
    last_at = models.DateTimeField()

    class Meta:
        ordering = ["-last_at"]
        constraints = [models.UniqueConstraint(fields=["device", "reason"], name="devices_refusal_key")]
        indexes = [models.Index(fields=["last_at"], name="devices_refusal_last_at")]

    def __str__(self) -> str:
        return f"{self.device_id} {self.reason} x{self.count}"
