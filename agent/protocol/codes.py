"""The contract's codes: the event types and reason codes a device publishes on its
``events`` topic (docs/protocol.md, "Event types and reason codes").

One home for both sides: the agent publishes these members, the control plane reads them
(the ingest stores them, the rollouts move assignments on them, the admin labels them).
They are ``StrEnum``s, so a member *is* its code: ``json.dumps`` writes exactly the same
bytes as for the plain string, and a code read from the wire compares equal to its member.

The ``events`` schema leaves ``type`` and ``reason`` open strings on purpose: a newer agent
may publish a code an older control plane does not know yet, which is stored and shown as
the raw code rather than dropped.
"""

from __future__ import annotations

import enum


class EventType(enum.StrEnum):
    """``type`` of an ``events`` message: where a device is with a desired state."""

    NOTIFIED = "notified"  # a new generation verified; the device starts on it
    DOWNLOADING = "downloading"  # fetching a model's manifest and blob
    VERIFYING = "verifying"  # checking the download, loading it, running the golden set
    ACTIVE = "active"  # the new version serves requests
    SHADOW = "shadow"  # the candidate runs in shadow beside the live model (addition 5)
    FAILED = "failed"  # refused or given up, with a reason code
    RETRYING = "retrying"  # a transient failure, tried again with backoff (addition 8)
    TRUST = "trust"  # a newer root or keyring was accepted (addition 6)


class Reason(enum.StrEnum):
    """``reason`` of a ``failed`` or ``retrying`` event: why a desired state, one of its
    models, or a trust bundle was refused."""

    SIGNATURE_INVALID = "signature_invalid"
    PAYLOAD_TYPE = "payload_type"
    REPLAY = "replay"
    EXPIRED = "expired"
    WRONG_DEVICE = "wrong_device"
    MANIFEST_MISMATCH = "manifest_mismatch"
    TOO_LARGE = "too_large"
    HASH_MISMATCH = "hash_mismatch"
    INCOMPATIBLE = "incompatible"
    LOAD_FAILED = "load_failed"
    GOLDEN_FAILED = "golden_failed"
    DOWNLOAD_FAILED = "download_failed"
    TLS_FAILED = "tls_failed"
    # addition 6: the keyring
    KEY_REVOKED = "key_revoked"
    KEY_EXPIRED = "key_expired"
    KEYRING_ROLLBACK = "keyring_rollback"
    KEYRING_EXPIRED = "keyring_expired"
    ROOT_EXPIRED = "root_expired"
    NO_KEYRING = "no_keyring"
    TRUST_NOT_SAVED = "trust_not_saved"


class DeliveryPath(enum.StrEnum):
    """How a device got a model's bytes (docs/protocol.md, addition 11): ``delivery.path``
    of the ``verifying`` event that follows a download."""

    DELTA = "delta"  # rebuilt from the installed base with a tensor-level delta
    FULL = "full"  # the whole zstd blob


class DeltaFallback(enum.StrEnum):
    """``delivery.fallback``: why a device offered a delta downloaded the full blob instead.

    The last five are the codec's own (agent.protocol.delta.DeltaFailure)."""

    BASE_MISSING = "base_missing"  # the base the delta needs is not installed (or not intact)
    DELTA_REFUSED = "delta_refused"  # its manifest failed a check: signature, pin, names, sizes
    DELTA_DOWNLOAD = "delta_download"  # the delta could not be downloaded (retries exhausted, 404, sha256)
    INTERRUPTED = "interrupted"  # a rebuild from this delta did not finish (a crash, OOM kill, full disk)
    WRONG_BASE = "wrong_base"
    TOO_LARGE = "too_large"
    UNSUPPORTED = "unsupported"
    CORRUPT = "corrupt"
    TARGET_MISMATCH = "target_mismatch"  # the rebuilt bytes are not the target's signed sha256
