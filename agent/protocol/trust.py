"""The root of trust and the keyring it signs (docs/protocol.md, addition 6).

A device pins one or more *root* public keys and a threshold. Two kinds of signed document
sit above the manifests and desired states, each a DSSE envelope with a payload type of
its own:

* a **root** document lists the root keys and their threshold. Version 1 (or the first one
  a device meets) is valid when a threshold of the pinned keys signed it; version N+1 is
  valid only when a threshold of version N's keys *and* a threshold of its own keys signed
  it. So the root can move to new keys without re-flashing a device, one step at a time,
  and nobody holding only the new keys can start a chain of their own (TUF's rule).
* the **keyring** lists the keys that sign manifests and desired states (keyid, public
  key, optional expiry) and the keyids revoked. A threshold of the current root's keys
  signs it; its version only grows. A device accepts manifests and desired states only
  from keys of its current keyring.

Both sides use this module: the agent to follow the chain and verify, the control plane
to check what an operator uploads before it reaches any device.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nacl.signing import VerifyKey

from agent.protocol import dsse, schemas
from agent.protocol.codes import Reason
from agent.protocol.dsse import KEYRING_PAYLOAD_TYPE, ROOT_PAYLOAD_TYPE, EnvelopeError, SignatureInvalid
from agent.protocol.schemas import format_time, parse_time


class TrustError(EnvelopeError):
    """A root or keyring is refused, or an envelope is signed by no key the keyring holds;
    ``reason`` is the reason code the agent publishes."""


class KeyRevoked(TrustError):
    reason = Reason.KEY_REVOKED


class KeyExpired(TrustError):
    reason = Reason.KEY_EXPIRED


class KeyringRollback(TrustError):
    reason = Reason.KEYRING_ROLLBACK


class KeyringExpired(TrustError):
    reason = Reason.KEYRING_EXPIRED


class RootExpired(TrustError):
    reason = Reason.ROOT_EXPIRED


class NoKeyring(TrustError):
    reason = Reason.NO_KEYRING


class TrustNotSaved(TrustError):
    """A newer keyring or root verified but could not be saved (disk full): not used."""

    reason = Reason.TRUST_NOT_SAVED


class MalformedTrust(TrustError):
    """A root or keyring payload breaks the contract (schema or its own invariants)."""

    reason = Reason.PAYLOAD_TYPE


def _key_entries(entries: Iterable[Mapping[str, Any]], what: str) -> dict[str, VerifyKey]:
    keys: dict[str, VerifyKey] = {}
    for entry in entries:
        try:
            key = dsse.public_key_from_hex(entry["public_key"])
        except ValueError as exc:
            raise MalformedTrust(f"{what}: {entry['public_key']!r} is not an Ed25519 key: {exc}") from exc
        if dsse.keyid_for(key) != entry["keyid"]:
            raise MalformedTrust(f"{what}: keyid {entry['keyid'][:16]}… is not the sha256 of its public key")
        if entry["keyid"] in keys:
            raise MalformedTrust(f"{what}: key {entry['keyid'][:16]}… is listed twice")
        keys[entry["keyid"]] = key
    return keys


# A root document or keyring is a few hundred bytes per key; these bounds keep a padded one
# (junk signatures, thousands of keys) from outgrowing the bundle every device must read.
MAX_DOCUMENT_BYTES = 16 * 1024
MAX_SIGNATURES = 16


def _loaded(envelope: Mapping[str, Any] | bytes) -> Mapping[str, Any]:
    loaded = dsse.load_envelope(envelope)
    if len(loaded["signatures"]) > MAX_SIGNATURES:
        raise MalformedTrust(f"{len(loaded['signatures'])} signatures; at most {MAX_SIGNATURES}")
    if len(dsse.envelope_bytes(loaded)) > MAX_DOCUMENT_BYTES:
        raise MalformedTrust(f"a root document or keyring is at most {MAX_DOCUMENT_BYTES} bytes")
    return loaded


def _payload(kind: str, payload: bytes) -> dict[str, Any]:
    try:
        return schemas.parse(kind, payload)
    except schemas.SchemaError as exc:
        raise MalformedTrust(f"signed payload is not a {kind}: {exc}") from exc


def _time(value: str, what: str) -> datetime:
    try:
        return parse_time(value)
    except ValueError as exc:
        raise MalformedTrust(f"{what}: {value!r} is not a time") from exc


@dataclass(frozen=True)
class Root:
    version: int
    threshold: int
    keys: dict[str, VerifyKey]
    expires_at: datetime
    envelope: bytes  # canonical envelope bytes, as stored and served

    @classmethod
    def verified(
        cls, envelope: Mapping[str, Any] | bytes, *, keys: Mapping[str, Any], threshold: int
    ) -> Root:
        """The root document in ``envelope`` if a threshold of ``keys`` (the previous root's
        or the pinned ones) and a threshold of its own keys signed it."""
        loaded = _loaded(envelope)
        payload = dsse.verify(loaded, payload_type=ROOT_PAYLOAD_TYPE, keys=keys, threshold=threshold)
        data = _payload("root", payload)
        own = _key_entries(data["keys"], "root")
        if data["threshold"] > len(own):
            raise MalformedTrust(f"root: threshold {data['threshold']} is more than its {len(own)} key(s)")
        try:
            dsse.verify(loaded, payload_type=ROOT_PAYLOAD_TYPE, keys=own, threshold=data["threshold"])
        except SignatureInvalid as exc:
            raise SignatureInvalid(
                f"root version {data['version']} is not signed by its own keys: {exc}"
            ) from exc
        return cls(
            version=data["version"],
            threshold=data["threshold"],
            keys=own,
            expires_at=_time(data["expires_at"], "root expires_at"),
            envelope=dsse.envelope_bytes(loaded),
        )


@dataclass(frozen=True)
class Keyring:
    version: int
    expires_at: datetime
    keys: dict[str, VerifyKey]
    key_expiry: dict[str, datetime | None]
    revoked: frozenset[str]
    payload: bytes  # the verified payload: an equal version must carry exactly these bytes
    envelope: bytes

    @classmethod
    def verified(cls, envelope: Mapping[str, Any] | bytes, *, root: Root) -> Keyring:
        loaded = _loaded(envelope)
        try:
            payload = dsse.verify(
                loaded, payload_type=KEYRING_PAYLOAD_TYPE, keys=root.keys, threshold=root.threshold
            )
        except SignatureInvalid as exc:
            raise SignatureInvalid(f"keyring is not signed by root version {root.version}: {exc}") from exc
        data = _payload("keyring", payload)
        keys = check_keyring_payload(data)
        return cls(
            version=data["version"],
            expires_at=_time(data["expires_at"], "keyring expires_at"),
            keys=keys,
            key_expiry={
                entry["keyid"]: _time(entry["expires_at"], "key expires_at") if entry["expires_at"] else None
                for entry in data["keys"]
            },
            revoked=frozenset(data["revoked"]),
            payload=payload,
            envelope=dsse.envelope_bytes(loaded),
        )


@dataclass(frozen=True)
class TrustState:
    """What a verifier trusts now: the pinned root keys, the root chain it followed from
    them, the current keyring and every keyid it has seen leave a keyring (revoked from then
    on). Immutable: each update returns a new state, so a refused update changes nothing."""

    pinned_keys: dict[str, VerifyKey]
    pinned_threshold: int
    roots: tuple[Root, ...] = ()
    keyring: Keyring | None = None
    revoked: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def pinned(cls, public_keys_hex: Iterable[str], threshold: int = 1) -> TrustState:
        return cls(pinned_keys=dsse.trusted_keys(list(public_keys_hex)), pinned_threshold=threshold)

    @property
    def root(self) -> Root | None:
        return self.roots[-1] if self.roots else None

    @property
    def root_version(self) -> int | None:
        return self.root.version if self.root else None

    @property
    def keyring_version(self) -> int | None:
        return self.keyring.version if self.keyring else None

    # --- updates

    def with_root(self, envelope: Mapping[str, Any] | bytes) -> TrustState:
        """Follow the chain one step. A root no newer than the current one is ignored (the
        bundle carries the whole chain); a newer one must be exactly the next version."""
        current = self.root
        if current is None:
            # The first root a device meets: signed by the pinned keys, any version (a device
            # flashed today pins today's root keys).
            root = Root.verified(envelope, keys=self.pinned_keys, threshold=self.pinned_threshold)
            return TrustState(self.pinned_keys, self.pinned_threshold, (root,), self.keyring, self.revoked)
        peek = _payload_version(envelope, ROOT_PAYLOAD_TYPE)
        if peek is not None and peek <= current.version:
            return self
        root = Root.verified(envelope, keys=current.keys, threshold=current.threshold)
        if root.version != current.version + 1:
            raise KeyringRollback(
                f"root version {root.version} does not follow version {current.version} (one step at a time)"
            )
        return TrustState(
            self.pinned_keys, self.pinned_threshold, (*self.roots, root), self.keyring, self.revoked
        )

    def with_keyring(self, envelope: Mapping[str, Any] | bytes, *, now: datetime | None = None) -> TrustState:
        """Install a newer keyring, signed by a threshold of the current root's keys.

        ``now=None`` restores what was verified before (the agent's trust file, the control
        plane's rows): no expiry checks, since a restored version must keep protecting
        against rollback even once it expired. A root step is only ever taken together with
        a keyring the new root signed (``with_bundle`` applies both or neither), so the
        current root verifies the current keyring on restore too."""
        root = self.root
        if root is None:
            raise SignatureInvalid("no root document verifies against the pinned root keys yet")
        if now is not None and now > root.expires_at:
            raise RootExpired(f"root version {root.version} expired at {format_time(root.expires_at)}")
        keyring = Keyring.verified(envelope, root=root)
        current = self.keyring
        if current is not None and keyring.version == current.version and keyring.payload == current.payload:
            return self  # the keyring already trusted (the retained copy on every reconnect)
        if current is not None and keyring.version < current.version:
            raise KeyringRollback(
                f"keyring version {keyring.version} is older than the current {current.version}"
            )
        if current is not None and keyring.version == current.version:  # with other bytes
            raise KeyringRollback(
                f"keyring version {keyring.version} differs from the one trusted at that version"
            )
        if now is not None and now > keyring.expires_at:
            raise KeyringExpired(
                f"keyring version {keyring.version} expired at {format_time(keyring.expires_at)}"
            )
        # Keys that leave the keyring are refused from then on, even if an old keyring is
        # replayed later (that one is refused anyway) or a later keyring forgets to list them.
        dropped = set(current.keys) - set(keyring.keys) if current else set()
        revoked = (self.revoked | dropped | keyring.revoked) - set(keyring.keys)
        return TrustState(self.pinned_keys, self.pinned_threshold, self.roots, keyring, frozenset(revoked))

    def with_bundle(self, bundle: Mapping[str, Any], *, now: datetime | None = None) -> TrustState:
        """Apply a trust bundle (what the control plane retains on the trust topic and
        serves over HTTP): its root chain in order, then its keyring."""
        roots, keyring = bundle_parts(bundle)
        state = self
        for envelope in sorted(roots, key=lambda e: _payload_version(e, ROOT_PAYLOAD_TYPE) or 0):
            try:
                state = state.with_root(envelope)
            except SignatureInvalid:
                if state.root is not None:
                    raise
                # Roots older than the keys this device was flashed with: the chain starts
                # at the first one the pinned keys signed.
        if keyring is not None:
            return state.with_keyring(keyring, now=now)
        if state.keyring is not None and state.root_version != self.root_version:
            # Holding a keyring the new root did not sign would not survive a restart.
            raise SignatureInvalid(f"root version {state.root_version} comes without a keyring it signed")
        return state

    # --- verification of manifests and desired states

    def verify(self, envelope: Mapping[str, Any] | bytes | str, *, payload_type: str, now: datetime) -> bytes:
        """The payload if a key of the current keyring, neither revoked nor expired, signed
        it; otherwise the reason why not."""
        keyring = self.keyring
        if keyring is None:
            raise NoKeyring("no keyring yet: waiting for the control plane's trust bundle")
        if now > keyring.expires_at:
            raise KeyringExpired(
                f"keyring version {keyring.version} expired at {format_time(keyring.expires_at)}"
            )
        loaded = dsse.load_envelope(envelope)
        usable = {
            keyid: key
            for keyid, key in keyring.keys.items()
            if keyring.key_expiry[keyid] is None or now <= keyring.key_expiry[keyid]
        }
        try:
            return dsse.verify(loaded, payload_type=payload_type, keys=usable)
        except SignatureInvalid:
            claimed = dsse.signature_keyids(loaded)
            revoked = [k for k in claimed if k in self.revoked or k in keyring.revoked]
            if revoked:
                raise KeyRevoked(
                    f"signed by key {revoked[0][:16]}…, revoked as of keyring version {keyring.version}"
                ) from None
            expired = [k for k in claimed if k in keyring.keys and k not in usable]
            if expired:
                raise KeyExpired(
                    f"signed by key {expired[0][:16]}…, which expired at "
                    f"{format_time(keyring.key_expiry[expired[0]])}"
                ) from None
            raise SignatureInvalid(
                f"no signature by a key of keyring version {keyring.version} verifies this envelope"
            ) from None

    # --- persistence (the agent's trust file; the control plane keeps rows instead)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "roots": [json.loads(root.envelope) for root in self.roots],
                "keyring": json.loads(self.keyring.envelope) if self.keyring else None,
                "revoked": sorted(self.revoked),
            },
            sort_keys=True,
        ).encode()

    def restored(self, data: bytes) -> TrustState:
        """Replay a saved state through the same checks (signatures, chain, versions), but
        not expiry: what was trusted keeps its version so that nothing older is accepted."""
        saved = json.loads(data)
        if not isinstance(saved, Mapping):
            raise MalformedTrust("the saved trust state is not a JSON object")
        state = self.with_bundle(
            {"schema": schemas.SCHEMA_VERSION, "roots": saved.get("roots") or [], "keyring": None}
        )
        if saved.get("keyring") is not None:
            state = state.with_keyring(saved["keyring"], now=None)
        revoked = frozenset(saved.get("revoked") or ()) - set(state.keyring.keys if state.keyring else ())
        return TrustState(
            state.pinned_keys, state.pinned_threshold, state.roots, state.keyring, state.revoked | revoked
        )


def _payload_version(envelope: Mapping[str, Any] | bytes, payload_type: str) -> int | None:
    """The version an envelope claims, before verification: only to order and skip roots
    (skipping an old one is safe, and a claimed newer one is verified in full)."""
    try:
        loaded = dsse.load_envelope(envelope)
        if loaded.get("payloadType") != payload_type:
            return None
        version = json.loads(base64.b64decode(loaded.get("payload"), validate=True)).get("version")
    except (EnvelopeError, ValueError, TypeError, AttributeError):
        return None
    return version if isinstance(version, int) else None


def bundle_parts(bundle: Mapping[str, Any]) -> tuple[list[Any], Any]:
    """(root envelopes, keyring envelope or None) of a trust bundle, shape-checked."""
    if not isinstance(bundle, Mapping) or bundle.get("schema") != schemas.SCHEMA_VERSION:
        raise MalformedTrust('a trust bundle is {"schema": 1, "roots": [...], "keyring": {...}}')
    roots = bundle.get("roots")
    if not isinstance(roots, list) or not all(isinstance(r, Mapping) for r in roots):
        raise MalformedTrust("trust bundle: roots must be a list of DSSE envelopes")
    keyring = bundle.get("keyring")
    if keyring is not None and not isinstance(keyring, Mapping):
        raise MalformedTrust("trust bundle: keyring must be a DSSE envelope or null")
    return roots, keyring


def build_bundle(*, roots: Iterable[bytes], keyring: bytes | None) -> dict[str, Any]:
    return {
        "schema": schemas.SCHEMA_VERSION,
        "roots": [json.loads(root) for root in roots],
        "keyring": json.loads(keyring) if keyring is not None else None,
    }


def build_root(
    *, version: int, public_keys: Iterable[Any], threshold: int, expires_at: datetime
) -> dict[str, Any]:
    """A root payload, validated (schema and invariants)."""
    entries = [
        {"keyid": dsse.keyid_for(key), "public_key": dsse.public_key_bytes(key).hex()} for key in public_keys
    ]
    payload = {
        "schema": schemas.SCHEMA_VERSION,
        "version": version,
        "expires_at": format_time(expires_at),
        "threshold": threshold,
        "keys": entries,
    }
    schemas.validate("root", payload)
    _key_entries(entries, "root")
    if threshold > len(entries):
        raise MalformedTrust(f"root: threshold {threshold} is more than its {len(entries)} key(s)")
    return payload


def build_keyring(
    *,
    version: int,
    expires_at: datetime,
    keys: Iterable[tuple[Any, datetime | None]],
    revoked: Iterable[str] = (),
) -> dict[str, Any]:
    """A keyring payload from (public key, expiry or None) pairs, validated."""
    entries = [
        {
            "keyid": dsse.keyid_for(key),
            "public_key": dsse.public_key_bytes(key).hex(),
            "expires_at": format_time(expiry) if expiry else None,
        }
        for key, expiry in keys
    ]
    payload = {
        "schema": schemas.SCHEMA_VERSION,
        "version": version,
        "expires_at": format_time(expires_at),
        "keys": entries,
        "revoked": sorted(set(revoked)),
    }
    check_keyring_payload(payload)
    return payload


def check_keyring_payload(payload: Any) -> dict[str, VerifyKey]:
    """Schema and invariants of a keyring payload; its keys by keyid."""
    try:
        schemas.validate("keyring", payload)
    except schemas.SchemaError as exc:
        raise MalformedTrust(f"not a keyring: {exc}") from exc
    keys = _key_entries(payload["keys"], "keyring")
    both = keys.keys() & set(payload["revoked"])
    if both:
        raise MalformedTrust(f"keyring: key {sorted(both)[0][:16]}… is both listed and revoked")
    return keys


def sign_document(payload: dict[str, Any], *, payload_type: str, private_keys: list[Any]) -> bytes:
    """Canonical envelope bytes of ``payload`` signed by every key given."""
    envelope = dsse.sign_all(
        schemas.canonical_json(payload), payload_type=payload_type, private_keys=private_keys
    )
    return dsse.envelope_bytes(envelope)
