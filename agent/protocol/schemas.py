"""Message schemas of wire contract v1 (ARCHITECTURE.md, "Wire contract v1").

One JSON Schema per message kind. The control plane validates what devices send
with these, and the agent validates what it receives: one definition, two users.

The schemas are plain JSON Schema (draft 2020-12), checked by a small validator for the
keywords they use rather than by the jsonschema package: on a device, jsonschema and its
dependencies cost ~6 MB of RSS (the agent's budget is 25 MB above the bare runtime), and
the ingest bridge validates thousands of messages a second. tests/agent/test_schemas.py
checks that this validator agrees with jsonschema on valid and broken documents.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from functools import cache
from typing import Any

SCHEMA_VERSION = 1

# Names that end up in topics, file paths and URLs: keep them boring.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
# semver.org 2.0.0, the official regular expression.
SEMVER_PATTERN = (
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
SEMVER_RE = re.compile(SEMVER_PATTERN)

# The event types and reason codes of ``events`` messages are agent/protocol/codes.py.

_str = {"type": "string"}
_count = {"type": "integer", "minimum": 0}
_sha = {"type": "string", "pattern": SHA256_PATTERN}
_name = {"type": "string", "pattern": NAME_PATTERN}
_semver = {"type": "string", "pattern": SEMVER_PATTERN}
_ts = {"type": "string", "format": "date-time", "minLength": 1}

_latency = {
    "type": "object",
    "required": ["p50", "p95", "p99"],
    "properties": {k: {"type": "number", "minimum": 0} for k in ("p50", "p95", "p99")},
}

# Addition 5 (docs/protocol.md): the candidate a desired state asks a device to run in
# shadow beside its live model, on a sampled fraction of real requests.
_desired_shadow = {
    "type": ["object", "null"],
    "required": ["version", "variant", "manifest_url", "blob_url", "manifest_sha256", "sample_rate"],
    "properties": {
        "version": _semver,
        "variant": _name,
        "manifest_url": _str,
        "blob_url": _str,
        "golden_url": {"type": ["string", "null"]},
        "manifest_sha256": _sha,
        "sample_rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    },
}

# Addition 5: per window, how the shadow compared with the live model. Samples still
# queued at the window's end are counted in the window that resolves them, so within one
# window sampled = compared + errors + skipped (the invariants in ``_invariant_error``).
_telemetry_shadow = {
    "type": "object",
    "required": ["version", "variant", "sampled", "compared", "agreed", "errors", "skipped", "mean_abs_diff"],
    "properties": {
        "version": _semver,
        "variant": _name,
        "sampled": _count,
        "compared": _count,
        "agreed": _count,
        "errors": _count,
        "skipped": _count,
        "mean_abs_diff": {"type": ["number", "null"], "minimum": 0},
        "latency_ms": _latency,
    },
}

_tensor = {
    "type": "object",
    "required": ["name", "shape", "dtype"],
    "properties": {
        "name": _str,
        "shape": {"type": "array", "items": {"type": "integer"}},
        "dtype": _str,
    },
}

MANIFEST = {
    "type": "object",
    "required": ["schema", "model", "version", "variant", "created_at", "raw", "blob", "tflite"],
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "model": _name,
        "version": _semver,
        "variant": _name,
        "created_at": _ts,
        "raw": {
            "type": "object",
            "required": ["sha256", "size", "format"],
            "properties": {"sha256": _sha, "size": _count, "format": {"const": "tflite"}},
        },
        "blob": {
            "type": "object",
            "required": ["sha256", "size", "compression"],
            "properties": {"sha256": _sha, "size": _count, "compression": {"enum": ["zstd"]}},
        },
        "tflite": {
            "type": "object",
            "required": ["inputs", "outputs", "ops", "quantization"],
            "properties": {
                "inputs": {"type": "array", "items": _tensor},
                "outputs": {"type": "array", "items": _tensor},
                "ops": {"type": "array", "items": _str},
                "quantization": _str,
            },
        },
        "requires": {
            "type": "object",
            "properties": {
                "hardware": {"type": "array", "items": _str},
                "runtime": {"type": "array", "items": _str},
            },
        },
        "labels": {"type": "array", "items": _str},
        # Contract extension (docs/protocol.md): the version's golden set, which the
        # agent downloads and runs on the candidate before it swaps.
        "golden": {
            "type": ["object", "null"],
            "required": ["sha256", "size", "samples"],
            "properties": {
                "sha256": _sha,
                "size": _count,
                "samples": _count,
                "accuracy": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            },
        },
    },
}

# Addition 11 (docs/protocol.md): a tensor-level delta that rebuilds a version's raw model
# from a base the device has installed. Its manifest is signed like an artifact's, with a
# payload type of its own (DELTA_PAYLOAD_TYPE), so neither can pass for the other.
_raw_ref = {
    "type": "object",
    "required": ["sha256", "size"],
    "additionalProperties": False,
    "properties": {"sha256": _sha, "size": _count},
}

DELTA_MANIFEST = {
    "type": "object",
    "required": ["schema", "model", "version", "variant", "created_at", "base", "target", "delta"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "model": _name,
        "version": _semver,
        "variant": _name,
        "created_at": _ts,
        "base": {
            "type": "object",
            "required": ["version", "variant", "raw"],
            "additionalProperties": False,
            "properties": {"version": _semver, "variant": _name, "raw": _raw_ref},
        },
        "target": {
            "type": "object",
            "required": ["raw"],
            "additionalProperties": False,
            "properties": {"raw": _raw_ref},
        },
        "delta": {
            "type": "object",
            "required": ["sha256", "size", "format"],
            "additionalProperties": False,
            "properties": {"sha256": _sha, "size": _count, "format": {"const": "mfdelta"}},
        },
    },
}

# Addition 11: offered in a desired state's model entry when the device reported the base
# installed. The agent may ignore it (older agents do): the full blob stays named.
_desired_delta = {
    "type": "object",
    "required": ["base_version", "base_variant", "manifest_url", "blob_url", "manifest_sha256", "size"],
    "properties": {
        "base_version": _semver,
        "base_variant": _name,
        "manifest_url": _str,
        "blob_url": _str,
        "manifest_sha256": _sha,
        "size": _count,
    },
}

DESIRED = {
    "type": "object",
    "required": ["schema", "device_id", "generation", "issued_at", "expires_at", "models"],
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "device_id": {"type": "string", "pattern": DEVICE_ID_PATTERN},
        "generation": {"type": "integer", "minimum": 1},
        "issued_at": _ts,
        "expires_at": _ts,
        "models": {
            "type": "object",
            "propertyNames": {"pattern": NAME_PATTERN},
            "additionalProperties": {
                "type": "object",
                "required": ["version", "variant", "manifest_url", "blob_url", "manifest_sha256"],
                "properties": {
                    "version": _semver,
                    "variant": _name,
                    "manifest_url": _str,
                    "blob_url": _str,
                    "golden_url": {"type": ["string", "null"]},
                    "manifest_sha256": _sha,
                    "shadow": _desired_shadow,
                    "delta": _desired_delta,
                },
            },
        },
        "rollout": {"type": ["object", "null"]},
    },
}

# Addition 6: the root of trust and the keyring it signs. Their times are UTC with a "Z"
# (format_time's form), so no offset can push one past what a database or datetime holds.
_public_key = {"type": "string", "pattern": r"^[0-9a-f]{64}$"}
_utc = {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"}
_version = {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}

ROOT = {
    "type": "object",
    "required": ["schema", "version", "expires_at", "threshold", "keys"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "version": _version,
        "expires_at": _utc,
        "threshold": {"type": "integer", "minimum": 1},
        "keys": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["keyid", "public_key"],
                "additionalProperties": False,
                "properties": {"keyid": _sha, "public_key": _public_key},
            },
        },
    },
}

KEYRING = {
    "type": "object",
    "required": ["schema", "version", "expires_at", "keys", "revoked"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "version": _version,
        "expires_at": _utc,
        "keys": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["keyid", "public_key", "expires_at"],
                "additionalProperties": False,
                "properties": {
                    "keyid": _sha,
                    "public_key": _public_key,
                    "expires_at": {"type": ["string", "null"], "pattern": _utc["pattern"]},
                },
            },
        },
        "revoked": {"type": "array", "items": _sha},
    },
}

# docs/protocol.md, addition 10: what the device can run, optional (older agents omit it).
HARDWARE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
RUNTIME_VERSION_PATTERN = r"^[0-9]{1,4}(\.[0-9]{1,4}){0,3}([a-z]+[0-9]{0,4})?$"
CAPABILITIES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "hardware": {"type": "string", "pattern": HARDWARE_PATTERN},
        "runtime": {"type": "string", "maxLength": 64},
        "runtime_version": {"type": "string", "pattern": RUNTIME_VERSION_PATTERN},
        "int8": {"type": "boolean"},
        "unsupported_ops": {"type": "array", "maxItems": 500, "items": {"type": "string", "maxLength": 64}},
    },
}

STATUS = {
    "type": "object",
    "required": ["online"],
    "properties": {
        "online": {"type": "boolean"},
        "agent_version": _str,
        "ts": _str,
        "capabilities": CAPABILITIES,
    },
}

REPORTED = {
    "type": "object",
    "required": ["generation", "models"],
    "properties": {
        "generation": _count,
        "ts": _str,
        "models": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["version", "variant"],
                "properties": {
                    "version": _semver,
                    "variant": _name,
                    # Addition 5: the candidate running in shadow, while one is loaded.
                    "shadow": {
                        "type": ["object", "null"],
                        "required": ["version", "variant"],
                        "properties": {"version": _semver, "variant": _name},
                    },
                },
            },
        },
        # Addition 6: the root and keyring versions the device verifies with.
        "trust": {
            "type": "object",
            "required": ["root_version", "keyring_version"],
            "properties": {
                # 32-bit: the control plane stores them in integer columns
                "root_version": {"type": ["integer", "null"], "minimum": 0, "maximum": 2**31 - 1},
                "keyring_version": {"type": ["integer", "null"], "minimum": 0, "maximum": 2**31 - 1},
            },
        },
    },
}

EVENT = {
    "type": "object",
    "required": ["id", "ts", "type"],
    "properties": {
        "id": {"type": "string", "minLength": 1, "maxLength": 64},
        "ts": _str,
        "type": _str,
        "generation": _count,
        "model": _str,
        "version": _str,
        "variant": _str,
        "reason": {"type": ["string", "null"]},
        "message": {"type": ["string", "null"], "maxLength": 2000},
        # Addition 11: on the ``verifying`` event after a download, how the bytes came.
        "delivery": {
            "type": "object",
            "required": ["path", "bytes"],
            "properties": {
                "path": {"enum": ["delta", "full"]},
                "bytes": {"type": "integer", "minimum": 0, "maximum": 2**53},
                "fallback": {"type": ["string", "null"], "maxLength": 40},
            },
        },
    },
}


TELEMETRY = {
    "type": "object",
    "required": ["id", "ts", "window_s", "models"],
    "properties": {
        "id": {"type": "string", "minLength": 1, "maxLength": 64},
        "ts": _str,
        "window_s": {"type": "number", "exclusiveMinimum": 0},
        "models": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["version", "variant", "inferences", "errors"],
                "properties": {
                    "version": _semver,
                    "variant": _name,
                    "inferences": _count,
                    "errors": _count,
                    "latency_ms": _latency,
                    "feedback": {
                        "type": "object",
                        "required": ["labeled", "correct"],
                        "properties": {"labeled": _count, "correct": _count},
                    },
                    "shadow": _telemetry_shadow,
                },
            },
        },
        "health": {"type": "object"},
        "dropped": _count,
    },
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "manifest": MANIFEST,
    "delta_manifest": DELTA_MANIFEST,
    "desired": DESIRED,
    "status": STATUS,
    "reported": REPORTED,
    "events": EVENT,
    "telemetry": TELEMETRY,
    "root": ROOT,
    "keyring": KEYRING,
}


class SchemaError(ValueError):
    """A message does not follow the contract; ``path`` names the offending field."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class InvariantError(SchemaError):
    """A message has the right shape, but its counters contradict each other (a shadow
    that agreed more often than it compared). A subclass, so that a consumer can count
    these apart from malformed messages."""


# Addition 5: (smaller, larger) counter pairs of a telemetry window's shadow entry.
# JSON Schema cannot compare two fields, so ``validate`` checks these after the schema.
SHADOW_INVARIANTS = (
    ("agreed", "compared"),
    ("compared", "sampled"),
    ("errors", "sampled"),
    ("skipped", "sampled"),
)


def _invariant_error(kind: str, data: dict[str, Any]) -> tuple[tuple[str, ...], str] | None:
    if kind != "telemetry":
        return None
    for name, entry in data["models"].items():
        shadow = entry.get("shadow")
        if shadow is None:
            continue
        for smaller, larger in SHADOW_INVARIANTS:
            if shadow[smaller] > shadow[larger]:
                return (
                    ("models", name, "shadow", smaller),
                    f"{smaller} ({shadow[smaller]}) is greater than {larger} ({shadow[larger]})",
                )
    return None


_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _check(schema: dict[str, Any], value: Any, path: tuple[str, ...]) -> tuple[tuple[str, ...], str] | None:
    """The first violation of ``schema`` by ``value`` as (path, message), or None.

    Supports the keywords the contract's schemas use: type, const, enum, required,
    properties, additionalProperties, propertyNames, items, minItems, maxItems, pattern, minLength,
    maxLength, minimum, maximum, exclusiveMinimum ("format" is annotation only, as in
    JSON Schema 2020-12 by default).
    """
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            return path, f"{value!r} is not of type {' or '.join(map(repr, types))}"
    if "const" in schema and (value != schema["const"] or type(value) is not type(schema["const"])):
        return path, f"{schema['const']!r} was expected"
    if "enum" in schema and value not in schema["enum"]:
        return path, f"{value!r} is not one of {schema['enum']!r}"
    if isinstance(value, str):
        if "pattern" in schema and not _compiled(schema["pattern"]).search(value):
            return path, f"{value!r} does not match {schema['pattern']!r}"
        if len(value) < schema.get("minLength", 0):
            return path, f"{value!r} is too short"
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return path, f"{value!r} is too long"
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            return path, f"{value!r} is less than the minimum of {schema['minimum']!r}"
        if "maximum" in schema and value > schema["maximum"]:
            return path, f"{value!r} is greater than the maximum of {schema['maximum']!r}"
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            return path, f"{value!r} is not greater than {schema['exclusiveMinimum']!r}"
    if isinstance(value, list) and len(value) < schema.get("minItems", 0):
        return path, f"{value!r} should have at least {schema['minItems']} item(s)"
    if isinstance(value, list) and "maxItems" in schema and len(value) > schema["maxItems"]:
        return path, f"{len(value)} items; at most {schema['maxItems']}"
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            if found := _check(schema["items"], item, (*path, str(index))):
                return found
    if isinstance(value, dict):
        for name in schema.get("required", ()):
            if name not in value:
                return path, f"{name!r} is a required property"
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if "propertyNames" in schema and (found := _check(schema["propertyNames"], key, path)):
                return found
            if key in properties:
                found = _check(properties[key], item, (*path, key))
            elif extra is False:
                found = (path, f"additional property {key!r} is not allowed")
            elif isinstance(extra, dict):
                found = _check(extra, item, (*path, key))
            else:
                found = None
            if found:
                return found
    return None


def validate(kind: str, data: Any) -> dict[str, Any]:
    """Validate ``data`` as message ``kind`` and return it; raise :class:`SchemaError`
    (:class:`InvariantError` when only the counters' cross-field invariants fail)."""
    error = _check(SCHEMAS[kind], data, ())
    if error is not None:
        path, message = error
        raise SchemaError(message, "/".join(path))
    error = _invariant_error(kind, data)
    if error is not None:
        path, message = error
        raise InvariantError(message, "/".join(path))
    return data


def parse(kind: str, payload: bytes) -> dict[str, Any]:
    """Parse verified payload bytes as JSON and validate them as ``kind``."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise SchemaError("not valid UTF-8 JSON (or nested too deep)") from exc
    return validate(kind, data)


def parse_time(value: str) -> datetime:
    """A contract timestamp (RFC 3339, e.g. ``2026-11-28T07:00:00Z``) as an aware datetime;
    one without a zone is taken as UTC. ValueError when it is not one."""
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def format_time(value: datetime, *, fraction: bool = False) -> str:
    """The contract's timestamp format: UTC, whole seconds, ``Z``; with ``fraction``, the
    microseconds too (``2026-11-28T07:00:00.123456Z``: the ``ts`` of events and reports,
    which order what one device did within a second)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ" if fraction else "%Y-%m-%dT%H:%M:%SZ")


def canonical_json(data: Any) -> bytes:
    """Deterministic bytes for signing and hashing: sorted keys, no whitespace."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def is_semver(value: str) -> bool:
    return bool(SEMVER_RE.match(value))


def build_manifest(
    *,
    model: str,
    version: str,
    variant: str,
    created_at: str,
    raw_sha256: str,
    raw_size: int,
    blob_sha256: str,
    blob_size: int,
    tflite: dict[str, Any],
    labels: list[str],
    golden: dict[str, Any] | None = None,
    hardware: list[str] | None = None,
    runtime: list[str] | None = None,
) -> dict[str, Any]:
    """The artifact manifest (ARCHITECTURE.md, "Artifact manifest"), validated."""
    manifest = {
        "schema": SCHEMA_VERSION,
        "model": model,
        "version": version,
        "variant": variant,
        "created_at": created_at,
        "raw": {"sha256": raw_sha256, "size": raw_size, "format": "tflite"},
        "blob": {"sha256": blob_sha256, "size": blob_size, "compression": "zstd"},
        "tflite": {key: tflite[key] for key in ("inputs", "outputs", "ops", "quantization")},
        "requires": {"hardware": hardware or ["any"], "runtime": runtime or ["litert>=1.0"]},
        "labels": list(labels),
        "golden": golden,
    }
    return validate("manifest", manifest)


def build_delta_manifest(
    *,
    model: str,
    version: str,
    variant: str,
    created_at: str,
    base_version: str,
    base_variant: str,
    base_raw: dict[str, Any],
    target_raw: dict[str, Any],
    delta_sha256: str,
    delta_size: int,
) -> dict[str, Any]:
    """The manifest of a tensor-level delta (docs/protocol.md, addition 11), validated.
    ``base_raw`` and ``target_raw`` are ``{"sha256", "size"}`` of the raw models."""
    manifest = {
        "schema": SCHEMA_VERSION,
        "model": model,
        "version": version,
        "variant": variant,
        "created_at": created_at,
        "base": {"version": base_version, "variant": base_variant, "raw": dict(base_raw)},
        "target": {"raw": dict(target_raw)},
        "delta": {"sha256": delta_sha256, "size": delta_size, "format": "mfdelta"},
    }
    return validate("delta_manifest", manifest)


def build_desired(
    *,
    device_id: str,
    generation: int,
    models: dict[str, dict[str, Any]],
    issued_at: str,
    expires_at: str,
    rollout: dict[str, Any] | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """A device's desired state (ARCHITECTURE.md, "Desired state"), validated unless the
    caller checked an identical-shaped one already (``check=False``)."""
    desired = {
        "schema": SCHEMA_VERSION,
        "device_id": device_id,
        "generation": generation,
        "issued_at": issued_at,
        "expires_at": expires_at,
        "models": models,
        "rollout": rollout,
    }
    return validate("desired", desired) if check else desired
