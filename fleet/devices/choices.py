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
