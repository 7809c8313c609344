"""The root of trust and the keyring on the control plane (docs/security.md, "Keys and
rotation"; docs/protocol.md, addition 6).

The private root keys never come here: operators sign root documents and keyrings offline
(``python -m agent.trustctl``) and upload the signed files. This module checks each upload
with the same code the devices run (``agent.protocol.trust``), keeps the chain, and
publishes the trust bundle retained on the trust topic; the API serves it too. It also
re-signs manifests and desired states when the signing key changes, so that the old key
can be revoked without stranding a device.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, transaction
from django.utils import timezone

from agent import protocol
from agent.protocol import trust
from agent.trust import MAX_BUNDLE_BYTES
from agent.trustctl import KEYRING_EXPIRY_DAYS, generate_key_file, load_key_file, make_keyring, make_root
from fleet.core.errors import Conflict, InvalidInput
from fleet.registry.choices import ArtifactStatus, DeltaStatus, SigningKeyStatus
from fleet.registry.models import Artifact, ArtifactDelta, Keyring, SigningKey, TrustRoot

RESIGN_DEVICES_CHUNK = 1000


# --- selectors


def trust_roots() -> list[TrustRoot]:
    return list(TrustRoot.objects.order_by("version"))


def keyring_current() -> Keyring | None:
    return Keyring.objects.order_by("-version").first()


def trust_state() -> trust.TrustState | None:
    """The control plane's view of the chain, rebuilt from the stored envelopes with the
    devices' own rules. The first root stored is the anchor (its upload was the operator's
    act of pinning it); None before any root was uploaded."""
    roots = trust_roots()
    if not roots:
        return None
    first = json.loads(roots[0].envelope)
    own = json.loads(base64.b64decode(first["payload"]))
    state = trust.TrustState.pinned([entry["public_key"] for entry in own["keys"]], own["threshold"])
    keyring = keyring_current()
    # The keyring is checked by the root that signed it; roots uploaded after it (a root
    # step waiting for its keyring) come after.
    published = _published_roots(roots, keyring)
    for row in published:
        state = state.with_root(row.envelope.encode())
    if keyring is not None:
        state = state.with_keyring(keyring.envelope.encode(), now=None)
    for row in roots[len(published) :]:
        state = state.with_root(row.envelope.encode())
    return state


def _published_roots(roots: list[TrustRoot], keyring: Keyring | None) -> list[TrustRoot]:
    """The roots devices get: up to the one that signed the current keyring. A root step is
    published together with the first keyring the new root signs, never alone (a device
    holding a keyring its root did not sign refuses the step: docs/protocol.md, addition 6)."""
    if keyring is None:
        return roots
    return [row for row in roots if row.version <= keyring.root_version]


def root_awaiting_keyring() -> TrustRoot | None:
    """A root uploaded after the current keyring: devices get it with the next keyring."""
    keyring = keyring_current()
    newest = TrustRoot.objects.order_by("-version").first()
    if keyring is None or newest is None or newest.version <= keyring.root_version:
        return None
    return newest


def trust_bundle() -> dict[str, Any] | None:
    """What devices fetch: every root document (a device that missed steps follows the
    chain) and the current keyring. None before any root was uploaded."""
    roots = trust_roots()
    if not roots:
        return None
    keyring = keyring_current()
    return trust.build_bundle(
        roots=[row.envelope.encode() for row in _published_roots(roots, keyring)],
        keyring=keyring.envelope.encode() if keyring else None,
    )


def trust_bundle_bytes() -> bytes | None:
    bundle = trust_bundle()
    return None if bundle is None else protocol.canonical_json(bundle)


# --- uploads


def _refusal(exc: protocol.EnvelopeError) -> Exception:
    """The API error for a refused root or keyring, with the devices' reason code."""
    if isinstance(exc, trust.KeyringRollback):
        return Conflict(str(exc), code=exc.reason)
    if isinstance(exc, protocol.EnvelopeMalformed):
        return InvalidInput(f"not a DSSE envelope: {exc}", code="malformed_envelope")
    return InvalidInput(
        str(exc), code=exc.reason if exc.reason != protocol.Reason.PAYLOAD_TYPE else "invalid_document"
    )


def _load(envelope: bytes | str | dict) -> dict[str, Any]:
    try:
        loaded = protocol.dsse.load_envelope(envelope)
    except protocol.EnvelopeError as exc:
        raise _refusal(exc) from exc
    return dict(loaded)


@transaction.atomic
def trust_upload(*, envelope: bytes | str | dict, user=None, publish: str = "celery") -> TrustRoot | Keyring:
    """Store a root document or a keyring signed offline, after the checks a device makes;
    then publish the new trust bundle. The kind comes from the envelope's payload type."""
    loaded = _load(envelope)
    # One upload at a time, and the chain read after the lock: two uploads racing for the
    # same version cannot both pass the checks.
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext('modelfleet-trust-upload'))")
    kind = loaded.get("payloadType")
    if kind == protocol.ROOT_PAYLOAD_TYPE:
        row = _root_upload(loaded, user)
    elif kind == protocol.KEYRING_PAYLOAD_TYPE:
        row = _keyring_upload(loaded, user)
    else:
        raise InvalidInput(
            f"payload type {kind!r} is neither a root document nor a keyring",
            code=protocol.Reason.PAYLOAD_TYPE,
        )
    size = len(trust_bundle_bytes() or b"")
    if size > MAX_BUNDLE_BYTES:
        raise InvalidInput(
            f"the trust bundle would be {size} bytes; devices read at most {MAX_BUNDLE_BYTES}",
            code="bundle_too_large",
        )
    transaction.on_commit(lambda: trust_publish(now=publish == "now"))
    return row


def _root_upload(envelope: dict[str, Any], user) -> TrustRoot:
    state = trust_state()
    try:
        if state is None:
            # The first root anchors the chain: it must be signed by its own keys.
            payload = json.loads(base64.b64decode(envelope["payload"]))
            own = [entry["public_key"] for entry in payload.get("keys") or []]
            state = trust.TrustState.pinned(own, payload.get("threshold") or 1)
        new = state.with_root(envelope)
    except protocol.EnvelopeError as exc:
        raise _refusal(exc) from exc
    except Exception as exc:  # whatever an upload does, it is only refused
        raise InvalidInput(
            f"not a root document: {type(exc).__name__}: {exc}", code="invalid_document"
        ) from exc
    if new is state:
        raise Conflict(
            f"root version {state.root_version} is already trusted; a new root is version "
            f"{state.root_version + 1}, signed by the current root's keys and its own",
            code=protocol.Reason.KEYRING_ROLLBACK,
        )
    root = new.root
    return TrustRoot.objects.create(
        version=root.version,
        envelope=root.envelope.decode(),
        threshold=root.threshold,
        keyids=sorted(root.keys),
        expires_at=root.expires_at,
        uploaded_by=user,
    )


def _keyring_upload(envelope: dict[str, Any], user) -> Keyring:
    state = trust_state()
    if state is None:
        raise Conflict("upload a root document before the first keyring", code="no_root")
    try:
        new = state.with_keyring(envelope, now=timezone.now())
    except protocol.EnvelopeError as exc:
        raise _refusal(exc) from exc
    except Exception as exc:  # whatever an upload does, it is only refused
        raise InvalidInput(f"not a keyring: {type(exc).__name__}: {exc}", code="invalid_document") from exc
    keyring = new.keyring
    if new is state:
        raise Conflict(
            f"keyring version {keyring.version} is already the current one",
            code=protocol.Reason.KEYRING_ROLLBACK,
        )
    active = SigningKey.objects.filter(status=SigningKeyStatus.ACTIVE).first()
    if active is not None and active.keyid not in keyring.keys:
        raise Conflict(
            f"the active signing key {active.keyid[:16]}… is not in keyring version {keyring.version}: "
            "devices would refuse everything signed from now on. Activate a key this keyring lists first "
            "(docs/security.md, 'Keys and rotation').",
            code="active_key_missing",
        )
    _refuse_unsafe_keyring(state, new)
    SigningKey.objects.filter(keyid__in=new.revoked).exclude(status=SigningKeyStatus.REVOKED).update(
        status=SigningKeyStatus.REVOKED, retired_at=timezone.now()
    )
    return Keyring.objects.create(
        version=keyring.version,
        envelope=keyring.envelope.decode(),
        root_version=new.root_version,
        keyids=sorted(keyring.keys),
        revoked_keyids=sorted(new.revoked),
        expires_at=keyring.expires_at,
        uploaded_by=user,
    )


def _refuse_unsafe_keyring(state: trust.TrustState, new: trust.TrustState) -> None:
    """What devices would accept but would strand them or re-arm a leaked key."""
    keyring = new.keyring
    active = SigningKey.objects.filter(status=SigningKeyStatus.ACTIVE).first()
    if active is not None:
        expiry = keyring.key_expiry.get(active.keyid)
        if expiry is not None and expiry <= timezone.now() + timedelta(hours=1):
            raise Conflict(
                f"the active signing key {active.keyid[:16]}… expires in this keyring at "
                f"{protocol.format_time(expiry)}: devices would refuse what it signs. "
                "Activate another key first.",
                code="active_key_expiring",
            )
    revoked_before = state.revoked | set(
        SigningKey.objects.filter(status=SigningKeyStatus.REVOKED).values_list("keyid", flat=True)
    )
    relisted = sorted(set(keyring.keys) & revoked_before)
    if relisted:
        raise Conflict(
            f"key {relisted[0][:16]}… was revoked; a revoked key never comes back (make a new one)",
            code=protocol.Reason.KEY_REVOKED,
        )
    still_signing = (
        Artifact.objects.filter(status=ArtifactStatus.READY, signing_key__keyid__in=new.revoked)
        .values_list("signing_key__keyid", flat=True)
        .first()
    ) or (
        ArtifactDelta.objects.filter(status=DeltaStatus.READY, signing_key__keyid__in=new.revoked)
        .values_list("signing_key__keyid", flat=True)
        .first()
    )
    if still_signing:
        raise Conflict(
            f"key {still_signing[:16]}… still signs ready manifests: run `manage.py trust resign` with the "
            "new key active before revoking it, or devices refuse those artifacts (key_revoked)",
            code="key_still_signs",
        )


def trust_publish(*, now: bool = False) -> None:
    """Publish the trust bundle retained: here (``now``) or from a retried Celery task."""
    from fleet.mqtt.publisher import publish_trust
    from fleet.registry.tasks import publish_trust_task  # the task module imports this one

    if not now:
        publish_trust_task.delay()
        return
    bundle = trust_bundle_bytes()
    if bundle is not None:
        publish_trust(bundle)


# --- drafts for the offline signer


def keyring_draft(
    *, add_public_keys: list[str] = (), remove_keyids: list[str] = (), expires_days: int = KEYRING_EXPIRY_DAYS
) -> dict[str, Any]:
    """The next keyring, unsigned: the current keyring's keys (or, before the first one, the
    active signing key), plus ``add_public_keys`` (hex), minus ``remove_keyids`` (which it
    lists as revoked). An operator signs it offline with ``agent.trustctl sign-keyring``."""
    current = keyring_current()
    state = trust_state()
    keys: dict[str, Any] = {}
    expiry: dict[str, datetime | None] = {}
    revoked: set[str] = set()
    if current is not None and state is not None and state.keyring is not None:
        keys = dict(state.keyring.keys)
        expiry = dict(state.keyring.key_expiry)
        revoked = set(state.keyring.revoked)
    else:
        active = SigningKey.objects.filter(status=SigningKeyStatus.ACTIVE).first()
        if active is not None:
            keys[active.keyid] = protocol.public_key_from_hex(active.public_key)
    for public_hex in add_public_keys:
        try:
            key = protocol.public_key_from_hex(public_hex.strip().lower())
        except ValueError as exc:
            raise InvalidInput(
                f"{public_hex!r} is not an Ed25519 public key: {exc}", code="invalid_key"
            ) from exc
        keyid = protocol.keyid_for(key)
        if (
            keyid in revoked
            or SigningKey.objects.filter(keyid=keyid, status=SigningKeyStatus.REVOKED).exists()
        ):
            raise InvalidInput(
                f"key {keyid[:16]}… was revoked; a revoked key never comes back",
                code=protocol.Reason.KEY_REVOKED,
            )
        keys[keyid] = key
    for keyid in remove_keyids:
        if keyid not in keys:
            raise InvalidInput(f"key {keyid[:16]}… is not in the keyring", code="unknown_key")
        del keys[keyid]
        revoked.add(keyid)
    if not keys:
        raise InvalidInput("a keyring must list at least one signing key", code="empty_keyring")
    return trust.build_keyring(
        version=(current.version + 1) if current else 1,
        expires_at=timezone.now().astimezone(UTC) + timedelta(days=expires_days),
        keys=[(key, expiry.get(keyid)) for keyid, key in keys.items()],
        revoked=revoked,
    )


# --- rotation


def signing_resign_all(*, publish: str = "celery") -> dict[str, int]:
    """Re-sign every ready artifact's manifest with the active signing key (the payload is
    unchanged, so every pinned manifest_sha256 still holds) and give every device a new
    desired generation signed with it. Run after activating a new key and before a keyring
    revokes the old one: no device is left holding only what the old key signed."""
    from fleet.devices.choices import DeviceStatus
    from fleet.devices.models import Device
    from fleet.devices.services import devices_assign
    from fleet.registry.signing import signing_key_active

    key_row, private_key = signing_key_active()
    manifests = 0
    # Artifact manifests, and the manifests of the deltas offered between them (addition 11).
    for rows, payload_type in (
        (Artifact.objects.filter(status=ArtifactStatus.READY), protocol.MANIFEST_PAYLOAD_TYPE),
        (ArtifactDelta.objects.filter(status=DeltaStatus.READY), protocol.DELTA_PAYLOAD_TYPE),
    ):
        for row in rows.exclude(signing_key=key_row).iterator():
            payload = base64.b64decode(json.loads(row.manifest_envelope)["payload"])
            envelope = protocol.sign(payload, payload_type=payload_type, private_key=private_key)
            manifests += (
                type(row)
                .objects.filter(pk=row.pk, manifest_envelope=row.manifest_envelope)
                .update(manifest_envelope=protocol.envelope_bytes(envelope).decode(), signing_key=key_row)
            )
    devices = 0
    ids = list(
        Device.objects.filter(status=DeviceStatus.ACTIVE, desired_generation__gt=0)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    for start in range(0, len(ids), RESIGN_DEVICES_CHUNK):
        chunk = list(Device.objects.filter(pk__in=ids[start : start + RESIGN_DEVICES_CHUNK]))
        devices += len(devices_assign(devices=chunk, artifacts={}, publish=publish))
    return {"manifests": manifests, "devices": devices}


def trust_bootstrap_dev(*, root_key_path: Path, publish: str = "celery") -> str:
    """Development and demo only: make a root key (as the offline machine would), root
    version 1 and a keyring naming the active signing key, through the same uploads as
    production. Returns the root public key to pin. Refused unless SIGNING_KEY_AUTOGENERATE."""
    from fleet.registry.signing import signing_key_active

    if not settings.SIGNING_KEY_AUTOGENERATE:
        raise ImproperlyConfigured(
            "trust dev-bootstrap keeps a root key on the control plane: development only "
            "(SIGNING_KEY_AUTOGENERATE=1). In production sign offline (docs/security.md)."
        )
    if not root_key_path.exists():
        generate_key_file(root_key_path)
    root_key = load_key_file(root_key_path)
    root_hex = protocol.public_key_bytes(root_key.public_key()).hex()
    key_row, signing_private = signing_key_active()
    with transaction.atomic():
        if not TrustRoot.objects.exists():
            trust_upload(envelope=make_root(keys=[root_key]), publish=publish)
        current = keyring_current()
        if current is None or key_row.keyid not in current.keyids:
            trust_upload(
                envelope=make_keyring(
                    root_keys=[root_key],
                    version=(current.version + 1) if current else 1,
                    signing_keys=[signing_private.public_key()],
                ),
                publish=publish,
            )
    return root_hex
