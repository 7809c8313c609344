"""The pure steps of applying a desired state, shared by the agent (agent/core.py) and the
fleet simulator (agent/sim/): no threads, no network, no LiteRT, so both run exactly the
same checks and publish exactly the same messages (ARCHITECTURE.md, "Wire contract v1").

Each check raises :class:`Refusal` with the reason code the device publishes.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

from agent import protocol
from agent.protocol.codes import DeltaFallback, EventType, Reason
from agent.protocol.trust import TrustState

MANIFEST_MAX_BYTES = 1024 * 1024  # a signed manifest is a few kB


class Refusal(Exception):
    """A desired state (or one model of it) is refused; ``reason`` is the published code."""

    def __init__(
        self, reason: Reason, message: str, *, permanent: bool = True, model: str | None = None
    ) -> None:
        super().__init__(message)
        self.reason, self.message, self.permanent, self.model = reason, message, permanent, model

    @property
    def event_type(self) -> EventType:
        """How it is reported: "failed", or "retrying" for a transient failure (the control
        plane unreachable mid-download), retried until it works, so that the install-failure
        gate never counts a device that is about to succeed."""
        return EventType.FAILED if self.permanent else EventType.RETRYING


def utc_now() -> str:
    return protocol.format_time(datetime.now(UTC), fraction=True)


def verify_desired(trust: TrustState, envelope: bytes, *, device_id: str) -> dict[str, Any]:
    """The desired state inside ``envelope``: signed by a key the keyring trusts, of the
    desired payload type, following the schema, and for this device."""
    try:
        payload = trust.verify(envelope, payload_type=protocol.DESIRED_PAYLOAD_TYPE, now=datetime.now(UTC))
        desired = protocol.parse("desired", payload)
    except protocol.EnvelopeError as exc:
        raise Refusal(exc.reason, str(exc)) from exc
    except protocol.SchemaError as exc:
        raise Refusal(Reason.PAYLOAD_TYPE, f"signed payload is not a desired state: {exc}") from exc
    if desired["device_id"] != device_id:
        raise Refusal(Reason.WRONG_DEVICE, f"desired state is for {desired['device_id']!r}")
    return desired


def check_freshness(desired: dict[str, Any], *, applied_generation: int) -> None:
    """Refuse a replayed (older) generation and an expired desired state."""
    if desired["generation"] < applied_generation:
        raise Refusal(
            Reason.REPLAY,
            f"generation {desired['generation']} is older than the applied {applied_generation}",
        )
    if protocol.parse_time(desired["expires_at"]) <= datetime.now(UTC):
        raise Refusal(Reason.EXPIRED, f"desired state expired at {desired['expires_at']}")


def verify_manifest(
    trust: TrustState, envelope: bytes, *, name: str, spec: dict[str, Any]
) -> tuple[bytes, dict[str, Any]]:
    """(payload, manifest) of a manifest envelope: signed, following the schema, with the
    sha256 the desired state pins, and naming the model, version and variant it asks for."""
    try:
        payload = trust.verify(envelope, payload_type=protocol.MANIFEST_PAYLOAD_TYPE, now=datetime.now(UTC))
        manifest = protocol.parse("manifest", payload)
    except protocol.EnvelopeError as exc:
        raise Refusal(exc.reason, f"manifest: {exc}") from exc
    except protocol.SchemaError as exc:
        raise Refusal(Reason.MANIFEST_MISMATCH, f"manifest does not follow the contract: {exc}") from exc
    if hashlib.sha256(payload).hexdigest() != spec["manifest_sha256"]:
        raise Refusal(Reason.MANIFEST_MISMATCH, "manifest sha256 differs from the one the desired state pins")
    named = (manifest["model"], manifest["version"], manifest["variant"])
    if named != (name, spec["version"], spec["variant"]):
        raise Refusal(
            Reason.MANIFEST_MISMATCH,
            f"manifest is for {named}, desired state asks for {(name, spec['version'], spec['variant'])}",
        )
    return payload, manifest


class DeltaUnusable(Exception):
    """A delta offer the device does not use; it downloads the full blob instead and says
    why in ``delivery.fallback`` (docs/protocol.md, addition 11)."""

    def __init__(self, code: DeltaFallback, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def verify_delta_manifest(
    trust: TrustState,
    envelope: bytes,
    *,
    name: str,
    spec: dict[str, Any],
    offer: dict[str, Any],
    target: dict[str, Any],
    base_raw_sha256: str,
    max_bytes: int,
) -> dict[str, Any]:
    """The delta manifest inside ``envelope``, checked against everything the device already
    trusts: signed by a key the keyring trusts as a *delta* manifest, pinned by the desired
    state's ``offer``, for the model/version/variant the desired state asks for, rebuilding
    exactly the raw bytes of the *target's* verified manifest (``target``), from exactly the
    base installed here (``base_raw_sha256``), and no larger than the device takes or than
    the full blob it would replace. Raises :class:`DeltaUnusable` (``delta_refused``)."""
    refused = DeltaFallback.DELTA_REFUSED
    try:
        payload = trust.verify(envelope, payload_type=protocol.DELTA_PAYLOAD_TYPE, now=datetime.now(UTC))
        manifest = protocol.parse("delta_manifest", payload)
    except (protocol.EnvelopeError, protocol.SchemaError) as exc:
        raise DeltaUnusable(refused, f"delta manifest: {exc}") from exc
    if hashlib.sha256(payload).hexdigest() != offer["manifest_sha256"]:
        raise DeltaUnusable(refused, "delta manifest sha256 differs from the one the desired state pins")
    named = (manifest["model"], manifest["version"], manifest["variant"])
    if named != (name, spec["version"], spec["variant"]):
        raise DeltaUnusable(refused, f"delta manifest is for {named}")
    base = manifest["base"]
    if (base["version"], base["variant"]) != (offer["base_version"], offer["base_variant"]):
        raise DeltaUnusable(refused, "delta manifest names another base than the desired state")
    if base["raw"]["sha256"] != base_raw_sha256:
        raise DeltaUnusable(DeltaFallback.WRONG_BASE, "the installed base is not the delta's base")
    if manifest["target"]["raw"] != {"sha256": target["raw"]["sha256"], "size": target["raw"]["size"]}:
        raise DeltaUnusable(refused, "delta manifest rebuilds other bytes than the target's signed manifest")
    size = manifest["delta"]["size"]
    if size > max_bytes or size >= target["blob"]["size"]:
        raise DeltaUnusable(
            DeltaFallback.TOO_LARGE, f"delta is {size} bytes; the full blob is {target['blob']['size']}"
        )
    return manifest


def check_fits(
    manifest: dict[str, Any],
    *,
    max_artifact_bytes: int,
    hardware: str,
    int8: bool,
    unsupported_ops: tuple[str, ...],
    runtime_name: str,
) -> None:
    """Refuse an artifact too large for this device or one it cannot run."""
    for part in ("raw", "blob"):
        if manifest[part]["size"] > max_artifact_bytes:
            size = manifest[part]["size"]
            raise Refusal(Reason.TOO_LARGE, f"{part} is {size} bytes; this device takes {max_artifact_bytes}")
    requires = manifest.get("requires", {})
    wanted_hardware = requires.get("hardware", ["any"])
    if "any" not in wanted_hardware and hardware not in wanted_hardware:
        raise Refusal(Reason.INCOMPATIBLE, f"needs hardware {wanted_hardware}, this device is {hardware!r}")
    runtimes = requires.get("runtime", [])
    if runtimes and not any(r.startswith(("litert", "tflite")) for r in runtimes):
        raise Refusal(Reason.INCOMPATIBLE, f"needs runtime {runtimes}; this device runs {runtime_name}")
    missing = sorted(set(manifest["tflite"]["ops"]) & set(unsupported_ops))
    if missing:
        raise Refusal(Reason.INCOMPATIBLE, f"uses ops this device's runtime lacks: {', '.join(missing)}")
    if manifest["tflite"]["quantization"] == "int8" and not int8:
        raise Refusal(Reason.INCOMPATIBLE, "int8 variant, and this device does not run int8 models")


def event_message(
    kind: EventType,
    *,
    generation: int | None = None,
    model: str | None = None,
    version: str | None = None,
    variant: str | None = None,
    reason: Reason | None = None,
    message: str | None = None,
    delivery: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An ``events`` message (install/verify/swap/revert with generation and reason code,
    and how a download came, addition 11), validated against the contract."""
    event: dict[str, Any] = {"id": uuid.uuid4().hex, "ts": utc_now(), "type": kind}
    for key, value in (
        ("generation", generation),
        ("model", model),
        ("version", version),
        ("variant", variant),
        ("reason", reason),
        ("message", message),
        ("delivery", delivery),
    ):
        if value is not None:
            event[key] = value
    return protocol.validate("events", event)


def reported_message(
    *, generation: int, models: dict[str, dict[str, Any]], trust_versions: dict[str, int | None]
) -> dict[str, Any]:
    """The retained ``reported`` state: applied generation, active version/variant per
    model (with its shadow's, when one runs) and the trust versions."""
    return protocol.validate(
        "reported", {"generation": generation, "ts": utc_now(), "models": models, "trust": trust_versions}
    )
