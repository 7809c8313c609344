"""Who is in which stage, and which variant each device gets (docs/rollouts.md)."""

from __future__ import annotations

import hashlib
import math


def cohort_key(rollout_id: int, device_id: str) -> int:
    """A device's place in a rollout: a stable hash of (rollout, device). The same device
    has a different place in every rollout, so the same devices are not always first; and
    a device that joins later gets its place by the same hash, whatever the others do."""
    digest = hashlib.sha256(f"{rollout_id}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def stage_size(*, kind: str, value: float, min_devices: int, eligible: int) -> int:
    """How many of the ``eligible`` devices (in cohort order) a stage covers."""
    if kind == "percent":
        size = math.ceil(eligible * value / 100)
    elif kind == "count":
        size = int(value)
    else:
        raise ValueError(f"unknown stage kind {kind!r}")
    return min(eligible, max(size, min_devices))


def choose_variant(*, supports_int8: bool, hardware: str, available: set[str]) -> tuple[str | None, str]:
    """The variant a device gets, and why (or why none).

    The rule: int8 where the device declares int8 support (quantized models are smaller
    and faster there), float32 otherwise; a device that cannot run any available variant
    is skipped with the reason.
    """
    if supports_int8 and "int8" in available:
        return "int8", "device supports int8"
    if "float32" in available:
        return "float32", "float32 (device does not declare int8)" if not supports_int8 else "no int8 variant"
    return None, f"no variant this device can run (available: {', '.join(sorted(available)) or 'none'})"
