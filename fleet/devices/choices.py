"""Device states and the transitions allowed between them."""

from django.db import models

from agent.protocol import EventType, Reason


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
    """Error codes of the enrollment and lifecycle refusals added by issue 9, section 1, and of
    bulk provisioning (issue 13)."""

    RESERVED_DEVICE_ID = "reserved_device_id", "The id names a broker service account"
    DEVICE_RETIRED = "device_retired", "Retired devices never come back"
    TOO_MANY_DEVICES = "too_many_devices", "More devices than one bulk request may provision"


class DeviceEventType(models.TextChoices):
    """The event types devices publish (``agent.protocol.EventType``), with human labels."""

    NOTIFIED = EventType.NOTIFIED, "Notified of a new desired state"
    DOWNLOADING = EventType.DOWNLOADING, "Downloading"
    VERIFYING = EventType.VERIFYING, "Verifying"
    ACTIVE = EventType.ACTIVE, "Serving the new version"
    SHADOW = EventType.SHADOW, "Running in shadow"
    FAILED = EventType.FAILED, "Failed"
    RETRYING = EventType.RETRYING, "Retrying"
    TRUST = EventType.TRUST, "Trust updated"


class EventReason(models.TextChoices):
    """What a device's reason codes mean, for people: the admin shows the label and the code.
    The codes are the protocol's (``agent.protocol.Reason``, their one home); only the labels
    live here, and tests/server/test_contract_codes.py checks that both lists agree."""

    SIGNATURE_INVALID = Reason.SIGNATURE_INVALID, "Signature did not verify"
    PAYLOAD_TYPE = Reason.PAYLOAD_TYPE, "Wrong kind of signed document"
    REPLAY = Reason.REPLAY, "Old generation replayed"
    EXPIRED = Reason.EXPIRED, "Desired state expired"
    WRONG_DEVICE = Reason.WRONG_DEVICE, "Addressed to another device"
    MANIFEST_MISMATCH = Reason.MANIFEST_MISMATCH, "Manifest differs from the desired state"
    TOO_LARGE = Reason.TOO_LARGE, "Artifact over the size limit"
    HASH_MISMATCH = Reason.HASH_MISMATCH, "Download's sha256 did not match"
    INCOMPATIBLE = Reason.INCOMPATIBLE, "Not compatible with this device"
    LOAD_FAILED = Reason.LOAD_FAILED, "LiteRT could not load the model"
    GOLDEN_FAILED = Reason.GOLDEN_FAILED, "Failed its golden-set check"
    DOWNLOAD_FAILED = Reason.DOWNLOAD_FAILED, "Download failed"
    TLS_FAILED = Reason.TLS_FAILED, "Server certificate refused"
    KEY_REVOKED = Reason.KEY_REVOKED, "Signed with a revoked key"
    KEY_EXPIRED = Reason.KEY_EXPIRED, "Signed with an expired key"
    KEYRING_ROLLBACK = Reason.KEYRING_ROLLBACK, "Older keyring refused"
    KEYRING_EXPIRED = Reason.KEYRING_EXPIRED, "Keyring expired"
    ROOT_EXPIRED = Reason.ROOT_EXPIRED, "Root of trust expired"
    NO_KEYRING = Reason.NO_KEYRING, "No keyring yet"
    TRUST_NOT_SAVED = Reason.TRUST_NOT_SAVED, "Trust state could not be saved"


def reason_label(code: str) -> str:
    """ "golden_failed" → "Failed its golden-set check (golden_failed)"; an unknown code as is."""
    if not code:
        return ""
    return f"{EventReason(code).label} ({code})" if code in EventReason.values else code


def event_type_label(code: str) -> str:
    """ "active" → "Serving the new version"; an unknown type (a newer agent's) as is."""
    return DeviceEventType(code).label if code in DeviceEventType.values else code
