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


class EventReason(models.TextChoices):
    """What a device's reason codes mean (agent/protocol/schemas.py REFUSAL_REASONS), for
    people: the admin shows the label and the code."""

    SIGNATURE_INVALID = "signature_invalid", "Signature did not verify"
    PAYLOAD_TYPE = "payload_type", "Wrong kind of signed document"
    REPLAY = "replay", "Old generation replayed"
    EXPIRED = "expired", "Desired state expired"
    WRONG_DEVICE = "wrong_device", "Addressed to another device"
    MANIFEST_MISMATCH = "manifest_mismatch", "Manifest differs from the desired state"
    TOO_LARGE = "too_large", "Artifact over the size limit"
    HASH_MISMATCH = "hash_mismatch", "Download's sha256 did not match"
    INCOMPATIBLE = "incompatible", "Not compatible with this device"
    LOAD_FAILED = "load_failed", "LiteRT could not load the model"
    GOLDEN_FAILED = "golden_failed", "Failed its golden-set check"
    DOWNLOAD_FAILED = "download_failed", "Download failed"
    TLS_FAILED = "tls_failed", "Server certificate refused"
    KEY_REVOKED = "key_revoked", "Signed with a revoked key"
    KEY_EXPIRED = "key_expired", "Signed with an expired key"
    KEYRING_ROLLBACK = "keyring_rollback", "Older keyring refused"
    KEYRING_EXPIRED = "keyring_expired", "Keyring expired"
    ROOT_EXPIRED = "root_expired", "Root of trust expired"
    NO_KEYRING = "no_keyring", "No keyring yet"
    TRUST_NOT_SAVED = "trust_not_saved", "Trust state could not be saved"


def reason_label(code: str) -> str:
    """ "golden_failed" → "Failed its golden-set check (golden_failed)"; an unknown code as is."""
    if not code:
        return ""
    return f"{EventReason(code).label} ({code})" if code in EventReason.values else code
