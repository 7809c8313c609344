"""Wire contract v1: the single implementation both the control plane and the agent use.

See ARCHITECTURE.md, "Wire contract v1", and docs/protocol.md.
"""

from agent.protocol.codes import EventType, Reason
from agent.protocol.dsse import (
    DELTA_PAYLOAD_TYPE,
    DESIRED_PAYLOAD_TYPE,
    KEYRING_PAYLOAD_TYPE,
    MANIFEST_PAYLOAD_TYPE,
    ROOT_PAYLOAD_TYPE,
    EnvelopeError,
    EnvelopeMalformed,
    PayloadTypeMismatch,
    SignatureInvalid,
    envelope_bytes,
    keyid_for,
    pae,
    public_key_bytes,
    public_key_from_hex,
    sign,
    trusted_keys,
    verify,
)
from agent.protocol.schemas import (
    InvariantError,
    SchemaError,
    build_delta_manifest,
    build_desired,
    build_manifest,
    canonical_json,
    format_time,
    is_semver,
    parse,
    parse_time,
    validate,
)
from agent.protocol.topics import Topics

__all__ = [
    "DELTA_PAYLOAD_TYPE",
    "DESIRED_PAYLOAD_TYPE",
    "KEYRING_PAYLOAD_TYPE",
    "MANIFEST_PAYLOAD_TYPE",
    "ROOT_PAYLOAD_TYPE",
    "EnvelopeError",
    "EnvelopeMalformed",
    "EventType",
    "InvariantError",
    "PayloadTypeMismatch",
    "Reason",
    "SchemaError",
    "SignatureInvalid",
    "Topics",
    "build_delta_manifest",
    "build_desired",
    "build_manifest",
    "canonical_json",
    "envelope_bytes",
    "format_time",
    "is_semver",
    "keyid_for",
    "pae",
    "parse",
    "parse_time",
    "public_key_bytes",
    "public_key_from_hex",
    "sign",
    "trusted_keys",
    "validate",
    "verify",
]
