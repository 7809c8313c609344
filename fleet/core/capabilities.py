"""What a device can run and what a variant needs (docs/rollouts.md, "Who gets what").

One home for the names both sides use: hardware classes, runtime versions and TFLite op
names. Devices report their side at enrollment and in their status (docs/protocol.md,
addition 10); the registry records the variant's side from the flatbuffer.
"""

from __future__ import annotations

import re
from functools import cache

from agent.protocol.schemas import HARDWARE_PATTERN
from fleet.registry.tflite import RUNTIME_VERSION

# A hardware class as devices and uploads name it ("rpi4", "jetson-nano"); "any" is every device.
HARDWARE_CLASS = re.compile(HARDWARE_PATTERN)
MAX_OPS = 500
# LiteRT (ai_edge_litert) 1.0 was cut from TensorFlow 2.18, so every LiteRT release runs
# every op TensorFlow Lite 2.18 ran; its own version numbers restart and cannot be
# compared with the converter's min_runtime_version, which counts TensorFlow releases.
LITERT_RUNS_TFLITE = (2, 18, 0)
LITERT_RUNTIMES = ("ai_edge_litert", "litert")


@cache
def builtin_op_names() -> frozenset[str]:
    from ai_edge_litert import schema_py_generated as schema

    return frozenset(
        k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)
    )


def is_op_name(name: str) -> bool:
    """A TFLite builtin op name (``FULLY_CONNECTED``) or a custom op (``CUSTOM:Name``)."""
    if name.startswith("CUSTOM:"):
        return bool(re.fullmatch(r"CUSTOM:[A-Za-z0-9_.\-/]{1,56}", name))
    return name in builtin_op_names()


def version_tuple(text: str) -> tuple[int, ...] | None:
    """ "2.18.0rc1" -> (2, 18, 0); None for anything that is not a runtime version."""
    if not text or not RUNTIME_VERSION.fullmatch(text):
        return None
    numbers = re.match(r"[0-9.]+", text).group(0).rstrip(".")
    return tuple(int(part) for part in numbers.split("."))


def tflite_runtime_level(runtime: str, runtime_version: str) -> tuple[int, ...] | None:
    """The TensorFlow Lite release a device's runtime is at least as capable as, or None
    when the device did not say (older agents): then the runtime check is not made."""
    version = version_tuple(runtime_version)
    if version is None:
        return None
    if runtime in LITERT_RUNTIMES:
        return max(version, LITERT_RUNS_TFLITE)
    return version


def check_ops(ops: object, *, field: str) -> list[str]:
    """A list of op names, or ValueError saying what is wrong with it."""
    if not isinstance(ops, list) or len(ops) > MAX_OPS:
        raise ValueError(f"{field} must be a list of at most {MAX_OPS} TFLite op names")
    bad = [str(op)[:64] for op in ops if not isinstance(op, str) or not is_op_name(op.upper())]
    if bad:
        raise ValueError(f"{field}: not TFLite builtin op names (nor CUSTOM:name): {', '.join(bad[:5])}")
    return sorted({op.upper() if not op.startswith("CUSTOM:") else op for op in ops})
