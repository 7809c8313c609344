"""Who is in which stage, and which variant each device gets (docs/rollouts.md)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass


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


@dataclass(frozen=True)
class DeviceCapabilities:
    """What a device said it can run (enrollment identity and status, docs/protocol.md
    addition 10). Empty ``supported_ops`` means "every builtin op"; ``runtime_level`` is
    None when the device did not report its runtime version."""

    hardware: str = "any"
    supports_int8: bool = True
    runtime_level: tuple[int, ...] | None = None
    supported_ops: frozenset[str] = frozenset()
    unsupported_ops: frozenset[str] = frozenset()


@dataclass(frozen=True)
class VariantNeeds:
    """What a variant needs, from its artifact: the flatbuffer's ops, quantization and
    minimum TFLite runtime, and the hardware classes it was uploaded for."""

    variant: str
    raw_size: int
    quantization: str = "none"
    ops: frozenset[str] = frozenset()
    min_runtime: tuple[int, ...] | None = None
    hardware: frozenset[str] = frozenset({"any"})


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def misfit(device: DeviceCapabilities, needs: VariantNeeds) -> str | None:
    """Why ``device`` cannot run the variant, or None when it can. The checks are the ones
    the agent makes before loading (agent/apply.py check_fits), plus the runtime version."""
    if "any" not in needs.hardware and device.hardware not in needs.hardware:
        return f"hardware {'/'.join(sorted(needs.hardware))}-only"
    if needs.quantization in ("int8", "uint8", "int4") and not device.supports_int8:
        return "needs int8 support"
    lacking = sorted(
        (needs.ops & device.unsupported_ops)
        | (needs.ops - device.supported_ops if device.supported_ops else set())
    )
    if lacking:
        return f"needs op {', '.join(lacking)}"
    if needs.min_runtime and device.runtime_level is not None and device.runtime_level < needs.min_runtime:
        return f"runtime {_dotted(device.runtime_level)} < {_dotted(needs.min_runtime)}"
    return None


def choose_variant(*, device: DeviceCapabilities, variants: list[VariantNeeds]) -> tuple[str | None, str]:
    """The variant a device gets, and why (or why none).

    The rule (docs/rollouts.md, "Who gets what"): of the variants the device can run
    (hardware class, int8 support, ops, runtime version), the smallest model file; a tie
    goes to the variant name in alphabetical order so the choice is stable. A device that
    can run none is skipped, and the reason names what each variant lacks.
    """
    fitting, why_not = [], []
    for needs in sorted(variants, key=lambda v: (v.raw_size, v.variant)):
        problem = misfit(device, needs)
        if problem is None:
            fitting.append(needs)
        else:
            why_not.append(f"{needs.variant}: {problem}")
    if fitting:
        chosen = fitting[0]
        others = f"; not {'; '.join(why_not)}" if why_not else ""
        return chosen.variant, f"smallest variant this device runs{others}"
    if not variants:
        return None, "the version has no ready variant"
    return None, "; ".join(why_not)
