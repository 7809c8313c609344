"""Device states and the transitions allowed between them."""

from django.db import models


class DeviceStatus(models.TextChoices):
    PENDING = "pending", "Pending approval"
    ACTIVE = "active", "Active"
    DISABLED = "disabled", "Disabled"
    RETIRED = "retired", "Retired"


# Retired is final. Disabling revokes the device's token and broker credential.
DEVICE_TRANSITIONS: dict[str, tuple[str, ...]] = {
    DeviceStatus.PENDING: (DeviceStatus.ACTIVE, DeviceStatus.DISABLED, DeviceStatus.RETIRED),
    DeviceStatus.ACTIVE: (DeviceStatus.DISABLED, DeviceStatus.RETIRED),
    DeviceStatus.DISABLED: (DeviceStatus.ACTIVE, DeviceStatus.RETIRED),
    DeviceStatus.RETIRED: (),
}


class GroupKind(models.TextChoices):
    STATIC = "static", "Static (chosen devices)"
    DYNAMIC = "dynamic", "Dynamic (a saved filter)"


class IngestKind(models.TextChoices):
    STATUS = "status"
    REPORTED = "reported"
    EVENTS = "events"
    TELEMETRY = "telemetry"


class IngestRefusalReason(models.TextChoices):
    """Why the ingest bridge refused a device's message (counted per device)."""

    INVARIANT = "invariant", "Broke its own invariants"
    CLOCK = "clock", "Timestamp too far ahead or too old"
    RATE_LIMITED = "rate_limited", "Over the device's rate limit"
    OVERFLOW = "overflow", "Bridge queue full (QoS 0)"


class EnrollmentTokenState(models.TextChoices):
    """Whether an enrollment token still enrolls devices (shown in the admin)."""

    USABLE = "usable", "Usable"
    EXPIRED = "expired", "Expired"
    USED_UP = "used_up", "Used up"
    REVOKED = "revoked", "Revoked"


class DeviceErrorCode(models.TextChoices):
    """Error codes of the enrollment and lifecycle refusals added by issue 9, section 1."""

    RESERVED_DEVICE_ID = "reserved_device_id", "The id names a broker service account"
    DEVICE_RETIRED = "device_retired", "Retired devices never come back"
