"""Desired state, in one place (issue 11, section 4): what a device should run, built,
signed and published (docs/protocol.md, "Desired state"; docs/architecture.md).

- building: ``desired_model_entry`` (one model's entry, from a ready artifact) and
  ``desired_entries`` (every entry a batch of states names, made once per artifact);
- signing: ``desired_state_envelope`` (one device's DSSE envelope) and
  ``sign_desired_states`` (a batch, with the key read once);
- the fan-out: ``desired_publish`` (here and now, or in chunked Celery tasks,
  fleet.devices.tasks.publish_desired_task) and ``devices_republish_desired``.

The write that decides a device's desired state (its generation and the artifacts it
names) is ``devices_assign`` in fleet.devices.services; the command is
``manage.py publish_desired``; the broker transport is fleet.mqtt.publisher.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from agent import protocol
from fleet.core import metrics
from fleet.core.errors import Conflict
from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device
from fleet.registry.choices import ArtifactStatus, DeltaStatus, VersionStatus
from fleet.registry.models import Artifact, ArtifactDelta
from fleet.registry.signing import signing_key_active

# (device id, generation, model -> live artifact id, model -> {"artifact", "sample_rate"},
# model -> {"version", "variant"} the device reported running: it picks the delta offered).
# States queued by a release before deltas have four members; they get no delta.
DesiredState = tuple[str, int, dict[str, int], dict[str, dict], dict[str, dict]]
# Inside an entry built by ``desired_entries``: the deltas to that artifact, by base
# ("version/variant"). Never sent: ``_desired_models`` picks the one the device can use.
DELTA_OFFERS = "_deltas"


# --- building


def _public_url(name: str, artifact: Artifact) -> str:
    return settings.PUBLIC_BASE_URL + reverse(name, args=[artifact.pk])


def desired_model_entry(artifact: Artifact) -> dict[str, Any]:
    """One model's entry of a desired state. Refuses artifacts that are not ready and
    versions that are revoked: a revoked version can never be assigned again."""
    if artifact.status != ArtifactStatus.READY:
        raise Conflict(f"Artifact {artifact.pk} is {artifact.status}, not ready.", code="artifact_not_ready")
    if artifact.version.status == VersionStatus.REVOKED:
        raise Conflict(f"{artifact.version} is revoked; it cannot be assigned.", code="version_revoked")
    return {
        "version": artifact.version.version,
        "variant": artifact.variant,
        "manifest_url": _public_url("artifact-manifest", artifact),
        "blob_url": _public_url("artifact-blob", artifact),
        "golden_url": _public_url("artifact-golden", artifact) if artifact.version.has_golden_set else None,
        "manifest_sha256": artifact.manifest_sha256,
    }


def desired_delta_entry(delta: ArtifactDelta) -> dict[str, Any]:
    """A delta offer of a desired state's model entry (docs/protocol.md, addition 11)."""
    args = [delta.target_id, delta.pk]
    return {
        "base_version": delta.base.version.version,
        "base_variant": delta.base.variant,
        "manifest_url": settings.PUBLIC_BASE_URL + reverse("artifact-delta-manifest", args=args),
        "blob_url": settings.PUBLIC_BASE_URL + reverse("artifact-delta-blob", args=args),
        "manifest_sha256": delta.manifest_sha256,
        "size": delta.blob_size,
    }


def json_dict(value: Any) -> dict:
    """A JSON column's value as a dict (raw SQL answers it as text)."""
    return value if isinstance(value, dict) else json.loads(value)


def desired_entries(states: list[DesiredState]) -> dict[int, dict]:
    """The desired-state entry of every artifact the states name, made once per artifact."""
    live_ids = {pk for state in states for pk in state[2].values()}
    wanted_ids = live_ids | {entry["artifact"] for state in states for entry in state[3].values()}
    named = Artifact.objects.select_related("version__model").filter(pk__in=wanted_ids)
    entries = {artifact.pk: desired_model_entry(artifact) for artifact in named}
    deltas = ArtifactDelta.objects.filter(target_id__in=live_ids, status=DeltaStatus.READY)
    for delta in deltas.select_related("base__version"):
        offers = entries[delta.target_id].setdefault(DELTA_OFFERS, {})
        offers[f"{delta.base.version.version}/{delta.base.variant}"] = desired_delta_entry(delta)
    return entries


def _public(entry: dict) -> dict:
    return {key: value for key, value in entry.items() if key != DELTA_OFFERS}


def _desired_models(
    wanted: dict[str, int], shadowed: dict[str, dict], entries: dict[int, dict], reported: dict[str, dict]
) -> dict:
    """A device's ``models``: each live entry with the delta from the version the device
    reported running, when there is one (a shadow always downloads whole)."""
    models = {}
    for name, pk in wanted.items():
        entry, running = entries[pk], reported.get(name) or {}
        models[name] = _public(entry)
        offer = entry.get(DELTA_OFFERS, {}).get(f"{running.get('version')}/{running.get('variant')}")
        if offer is not None:
            models[name]["delta"] = offer
    for name, shadow in shadowed.items():
        shadow_entry = _public(entries[shadow["artifact"]])
        models[name]["shadow"] = {**shadow_entry, "sample_rate": shadow["sample_rate"]}
    return models


# --- signing


def desired_state_envelope(
    *,
    device_id: str,
    generation: int,
    artifacts: dict[str, Artifact] | None = None,
    entries: dict[str, dict[str, Any]] | None = None,
    rollout: dict[str, Any] | None = None,
    private_key: Any = None,
    check: bool = True,
) -> bytes:
    """Sign a device's desired state naming ``artifacts`` (model name -> ready artifact), or
    ready-made ``entries`` (desired_model_entry), which callers signing thousands of states
    build once per artifact. ``check=False`` skips the schema check for states of a batch
    whose first member was checked (they differ only in device id and generation)."""
    models = (
        entries
        if entries is not None
        else {name: desired_model_entry(artifact) for name, artifact in (artifacts or {}).items()}
    )
    now = timezone.now()
    payload = protocol.build_desired(
        device_id=device_id,
        generation=generation,
        models=models,
        issued_at=protocol.format_time(now),
        expires_at=protocol.format_time(now + timedelta(seconds=settings.DESIRED_STATE_TTL_SECONDS)),
        rollout=rollout,
        check=check,
    )
    if private_key is None:  # callers signing many states fetch the key once and pass it
        _, private_key = signing_key_active()
    envelope = protocol.sign(
        protocol.canonical_json(payload), payload_type=protocol.DESIRED_PAYLOAD_TYPE, private_key=private_key
    )
    return protocol.envelope_bytes(envelope)


def desired_states_check(
    *, states: list[DesiredState], entries: dict[int, dict], rollout: dict | None
) -> None:
    """Refuse a batch whose payload breaks the contract, before it commits: the first state
    of each shape is signed and checked (the others differ only in device id and
    generation; a shape is which models carry a delta offer)."""
    firsts: dict[frozenset, DesiredState] = {}
    for state in states:
        firsts.setdefault(_shape(_state_models(state, entries)), state)
    _sign(states=list(firsts.values()), entries=entries, rollout=rollout)


def sign_desired_states(
    *,
    states: list[DesiredState],
    entries: dict[int, dict],
    rollout: dict | None,
) -> list[tuple[str, bytes]]:
    """Sign desired states to publish them (counted in the metrics)."""
    signed = _sign(states=states, entries=entries, rollout=rollout)
    metrics.DESIRED_SIGNED.inc(len(signed))
    return signed


def _sign(
    *, states: list[DesiredState], entries: dict[int, dict], rollout: dict | None
) -> list[tuple[str, bytes]]:
    """Sign desired states. The key is read once and the payload shape checked once per
    shape: the states of one batch differ only in id, generation and the delta offered
    (the first state, and the first that carries a delta offer, are checked)."""
    _, private_key = signing_key_active()
    signed, shapes = [], set()
    for state in states:
        models = _state_models(state, entries)
        shape = _shape(models)
        envelope = desired_state_envelope(
            device_id=state[0],
            generation=state[1],
            entries=models,
            rollout=rollout,
            private_key=private_key,
            check=shape not in shapes,
        )
        shapes.add(shape)
        signed.append((state[0], envelope))
    return signed


def _state_models(state: DesiredState, entries: dict[int, dict]) -> dict:
    """A state's ``models``; a state of four members (queued before deltas) gets no offer."""
    _, _, wanted, shadowed, *reported = state
    return _desired_models(wanted, shadowed, entries, reported[0] if reported else {})


def _shape(models: dict) -> frozenset:
    return frozenset(name for name, entry in models.items() if "delta" in entry)


# --- the fan-out


def desired_publish(
    states: list[DesiredState],
    entries: dict[int, dict],
    rollout: dict | None,
    *,
    now: bool = False,
) -> None:
    """Sign and publish desired states: here and now, or in Celery tasks of
    DESIRED_PUBLISH_CHUNK states each (workers sign and publish in parallel; a failed chunk
    is retried, and re-publishing a generation is harmless)."""
    from fleet.devices.tasks import publish_desired_task  # the task module imports this one
    from fleet.mqtt.publisher import publish_desired

    if now:
        publish_desired(sign_desired_states(states=states, entries=entries, rollout=rollout))
        return
    size = settings.DESIRED_PUBLISH_CHUNK
    for start in range(0, len(states), size):
        chunk = states[start : start + size]
        used = {pk for state in chunk for pk in state[2].values()}
        used |= {entry["artifact"] for state in chunk for entry in state[3].values()}
        publish_desired_task.delay(chunk, {str(pk): entries[pk] for pk in used}, rollout)


def devices_republish_desired(*, devices: list[Device], rollout: dict | None = None) -> int:
    """Publish the current desired state of ``devices`` again, at the generation they have
    (after commit, in Celery tasks). For a state that may never have reached the broker:
    the process that committed it died before it queued the publishing task, or a worker
    died inside that task (Redis hands its message to another worker only after the
    visibility timeout, an hour), or a broker that crashed lost the retained copy before
    saving it. An agent applies a generation once: given one it applied, it reports again.
    Returns how many states will be sent."""
    states = [
        (
            d.device_id,
            d.desired_generation,
            json_dict(d.desired_artifacts),
            json_dict(d.desired_shadows),
            json_dict(d.reported_models),
        )
        for d in devices
        if d.status == DeviceStatus.ACTIVE and d.desired_generation
    ]
    if states:
        entries = desired_entries(states)
        transaction.on_commit(lambda: desired_publish(states, entries, rollout))
    return len(states)
