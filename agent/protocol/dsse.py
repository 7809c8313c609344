"""DSSE envelopes signed with Ed25519 (ARCHITECTURE.md, "Signing").

Implements DSSE protocol v1 (secure-systems-lab/dsse): the signature covers
``PAE(type, body)`` and never the JSON of the envelope, so verification does not
depend on how the envelope was serialised. Verifiers return the verified payload
bytes; callers parse those bytes and never re-decode the envelope themselves.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from agent.protocol.codes import Reason

MANIFEST_PAYLOAD_TYPE = "application/vnd.modelfleet.manifest+json"
DESIRED_PAYLOAD_TYPE = "application/vnd.modelfleet.desired+json"
# docs/protocol.md, addition 11: the manifest of a tensor-level delta between two versions.
DELTA_PAYLOAD_TYPE = "application/vnd.modelfleet.delta+json"
# docs/protocol.md, addition 6: the root of trust and the keyring it signs.
ROOT_PAYLOAD_TYPE = "application/vnd.modelfleet.root+json"
KEYRING_PAYLOAD_TYPE = "application/vnd.modelfleet.keyring+json"


class EnvelopeError(Exception):
    """Base class; ``reason`` is the reason code the agent publishes in its events."""

    reason = Reason.SIGNATURE_INVALID


class EnvelopeMalformed(EnvelopeError):
    """Not a DSSE envelope at all (bad JSON, missing fields, bad base64)."""


class PayloadTypeMismatch(EnvelopeError):
    reason = Reason.PAYLOAD_TYPE


class SignatureInvalid(EnvelopeError):
    """No signature by a trusted key verifies."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """Pre-Authentication Encoding: ``DSSEv1 SP LEN(type) SP type SP LEN(body) SP body``."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


PublicKeyLike = Any  # VerifyKey | bytes | cryptography Ed25519PublicKey
PrivateKeyLike = Any  # SigningKey | bytes (32-byte seed) | cryptography Ed25519PrivateKey


def _verify_key(key: PublicKeyLike) -> VerifyKey:
    if isinstance(key, VerifyKey):
        return key
    if isinstance(key, bytes):
        return VerifyKey(key)
    return VerifyKey(key.public_bytes_raw())  # cryptography's Ed25519PublicKey


def _signing_key(key: PrivateKeyLike) -> SigningKey:
    if isinstance(key, SigningKey):
        return key
    if isinstance(key, bytes):
        return SigningKey(key)
    return SigningKey(key.private_bytes_raw())  # cryptography's Ed25519PrivateKey


def public_key_bytes(public_key: PublicKeyLike) -> bytes:
    """The raw 32-byte public key."""
    return bytes(_verify_key(public_key))


def public_key_of(private_key: PrivateKeyLike) -> VerifyKey:
    """The public half of a private key."""
    return _signing_key(private_key).verify_key


def keyid_for(public_key: PublicKeyLike) -> str:
    """The keyid is the hex sha256 of the raw 32-byte public key."""
    return hashlib.sha256(public_key_bytes(public_key)).hexdigest()


def public_key_from_hex(hex_key: str) -> VerifyKey:
    raw = bytes.fromhex(hex_key)
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes (64 hex characters)")
    return VerifyKey(raw)


def trusted_keys(public_keys_hex: list[str]) -> dict[str, VerifyKey]:
    """Build the ``{keyid: key}`` map that :func:`verify` expects from pinned hex keys."""
    keys = [public_key_from_hex(k) for k in public_keys_hex]
    return {keyid_for(k): k for k in keys}


def sign(payload: bytes, *, payload_type: str, private_key: PrivateKeyLike) -> dict[str, Any]:
    return sign_all(payload, payload_type=payload_type, private_keys=[private_key])


def sign_all(payload: bytes, *, payload_type: str, private_keys: list[PrivateKeyLike]) -> dict[str, Any]:
    """One envelope signed by every key given (root documents need a threshold of them)."""
    message = pae(payload_type, payload)
    signatures = []
    for private_key in private_keys:
        signing_key = _signing_key(private_key)
        signatures.append(
            {
                "keyid": keyid_for(signing_key.verify_key),
                "sig": base64.b64encode(signing_key.sign(message).signature).decode("ascii"),
            }
        )
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": signatures,
    }


def envelope_bytes(envelope: Mapping[str, Any]) -> bytes:
    """The canonical serialisation we store and serve (sorted keys, no spaces)."""
    return json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _b64decode(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise EnvelopeMalformed(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EnvelopeMalformed(f"{what} is not valid base64") from exc


def load_envelope(envelope: Mapping[str, Any] | bytes | str) -> Mapping[str, Any]:
    """The envelope as a mapping with a non-empty signature list (EnvelopeMalformed if not)."""
    if isinstance(envelope, (bytes, str)):
        try:
            envelope = json.loads(envelope)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise EnvelopeMalformed("envelope is not JSON (or nested too deep)") from exc
    if not isinstance(envelope, Mapping):
        raise EnvelopeMalformed("envelope must be a JSON object")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        raise EnvelopeMalformed("envelope has no signatures")
    return envelope


def signature_keyids(envelope: Mapping[str, Any]) -> list[str]:
    """The keyids an envelope claims to be signed by (unverified: for reason codes only)."""
    return [
        entry["keyid"]
        for entry in envelope.get("signatures") or []
        if isinstance(entry, Mapping) and isinstance(entry.get("keyid"), str)
    ]


def verify(
    envelope: Mapping[str, Any] | bytes | str,
    *,
    payload_type: str,
    keys: Mapping[str, PublicKeyLike],
    threshold: int = 1,
) -> bytes:
    """Return the payload bytes if ``threshold`` distinct trusted keys signed them under
    ``payload_type``.

    The payload type is checked before any signature so that a validly signed
    document of another kind (a manifest offered as a desired state) is refused
    with its own reason code.
    """
    envelope = load_envelope(envelope)
    if envelope.get("payloadType") != payload_type:
        raise PayloadTypeMismatch(
            f"payload type {envelope.get('payloadType')!r} is not the expected {payload_type!r}"
        )
    payload = _b64decode(envelope.get("payload"), "payload")
    message = pae(payload_type, payload)
    verified: set[str] = set()  # a key counts once, however often it signed
    for entry in envelope["signatures"]:
        if not isinstance(entry, Mapping):
            continue
        keyid = entry.get("keyid", "")
        key = keys.get(keyid) if isinstance(keyid, str) else None
        if key is None or keyid in verified:
            continue
        try:
            _verify_key(key).verify(message, _b64decode(entry.get("sig"), "signature"))
        except (BadSignatureError, ValueError, EnvelopeMalformed):
            continue  # a bad entry does not hide the good ones after it
        verified.add(keyid)
        if len(verified) >= threshold:
            return payload
    if threshold == 1:
        raise SignatureInvalid("no signature from a trusted key verifies this envelope")
    raise SignatureInvalid(
        f"{len(verified)} of the {threshold} signatures required from trusted keys verify this envelope"
    )
