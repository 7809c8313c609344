"""Deltas in the registry and in desired states (issue 12 §1; docs/protocol.md, addition 11).

The registry makes a delta to a ready artifact from the released versions before it,
checks it rebuilds the target, signs a manifest naming base and target, and records what
it decided in one sentence; desired states offer a delta only to a device that reported
its base; the rollout says how its devices got the version.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

import pytest
import zstandard
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from agent import protocol
from agent.protocol.delta import apply_delta
from fleet.devices.choices import DeviceStatus
from fleet.devices.desired import desired_entries, sign_desired_states
from fleet.devices.models import Device, DeviceEvent
from fleet.registry import services
from fleet.registry.choices import DeltaStatus, VersionStatus
from fleet.registry.models import ArtifactDelta
from fleet.registry.signing import signing_key_active
from fleet.rollouts.models import Rollout, RolloutPolicy
from fleet.rollouts.selectors import rollout_delivery
from tests.server.conftest import ready_artifact

pytestmark = pytest.mark.django_db


@pytest.fixture
def released_v1(version_v1, digits, alice):
    float32 = ready_artifact(version_v1, "float32", digits.build_digits_models()["float32"], alice.user)
    services.version_set_status(version=version_v1, status=VersionStatus.RELEASED)
    return float32


def new_version(model, number: str, golden_npz: bytes, alice):
    return services.version_create(
        model=model, version=number, golden_set=SimpleUploadedFile("g.npz", golden_npz), created_by=alice.user
    )


def payload_of(envelope: str | bytes, payload_type: str) -> dict:
    public, _ = signing_key_active()
    keys = protocol.trusted_keys([public.public_key])
    return json.loads(protocol.verify(envelope, keys=keys, payload_type=payload_type))


def test_a_head_retrain_gets_a_signed_delta_that_rebuilds_it(released_v1, golden_npz, alice, digits):
    v2 = new_version(released_v1.version.model, "2.0.0", golden_npz, alice)
    target = ready_artifact(v2, "float32", digits.build_head_retrained_models()["float32"], alice.user)

    made = services.artifact_deltas_make(artifact_id=target.pk)

    assert [(d.base_id, d.status) for d in made] == [(released_v1.pk, DeltaStatus.READY)]
    delta = made[0]
    assert delta.blob_size < 0.2 * target.blob_size
    assert delta.reason.startswith("Offered to devices running 1.0.0: ")
    assert delta.reason.endswith(" %).")  # sizes and the ratio rounded, with their units
    manifest = payload_of(delta.manifest_envelope, protocol.DELTA_PAYLOAD_TYPE)
    assert manifest["base"] == {
        "version": "1.0.0",
        "variant": "float32",
        "raw": {"sha256": released_v1.raw_sha256, "size": released_v1.raw_size},
    }
    assert manifest["target"]["raw"] == {"sha256": target.raw_sha256, "size": target.raw_size}
    assert (manifest["model"], manifest["version"], manifest["variant"]) == ("digits", "2.0.0", "float32")
    # Served to people with a role, by the same ranged view as blobs; it rebuilds the target.
    client = alice.client()
    blob = b"".join(client.get(f"/api/v1/artifacts/{target.pk}/deltas/{delta.pk}/blob").streaming_content)
    assert hashlib.sha256(blob).hexdigest() == delta.blob_sha256 == manifest["delta"]["sha256"]
    base_raw = zstandard.ZstdDecompressor().decompress(
        b"".join(client.get(f"/api/v1/artifacts/{released_v1.pk}/blob").streaming_content)
    )
    rebuilt = apply_delta(base_raw, blob, max_output=target.raw_size)
    assert hashlib.sha256(rebuilt).hexdigest() == target.raw_sha256
    # Listed with the artifact in the API.
    listed = client.get(f"/api/v1/artifacts/{target.pk}/").json()["deltas"]
    assert [(d["base_version"], d["status"]) for d in listed] == [("1.0.0", "ready")]
    assert listed[0]["urls"]["blob"].endswith(f"/api/v1/artifacts/{target.pk}/deltas/{delta.pk}/blob")
    # Made once: a retry (or a second worker) changes nothing.
    assert services.artifact_deltas_make(artifact_id=target.pk) == []
    assert ArtifactDelta.objects.filter(target=target).count() == 1


def test_a_model_trained_from_scratch_is_not_offered_a_delta_and_says_why(
    released_v1, golden_npz, alice, digits
):
    v3 = new_version(released_v1.version.model, "3.0.0", golden_npz, alice)
    target = ready_artifact(v3, "float32", digits.build_digits_models(version="2.0.0")["float32"], alice.user)
    (delta,) = services.artifact_deltas_make(artifact_id=target.pk)
    assert delta.status == DeltaStatus.SKIPPED and not delta.blob_file and not delta.manifest_envelope
    assert "over the 80 % limit (DELTA_MAX_RATIO)" in delta.reason, delta.reason
    # Not downloadable: the API says why, in JSON.
    answer = alice.client().get(f"/api/v1/artifacts/{target.pk}/deltas/{delta.pk}/blob")
    assert answer.status_code == 409 and answer.json()["error"]["code"] == "delta_not_ready"
    missing = alice.client().get(f"/api/v1/artifacts/{target.pk}/deltas/{delta.pk + 999}/manifest")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_delta"


def test_bases_are_the_latest_released_versions_of_the_same_variant(
    released_v1, golden_npz, alice, digits, settings
):
    settings.DELTA_BASES = 1
    model = released_v1.version.model
    draft = new_version(model, "1.5.0", golden_npz, alice)  # never released: devices cannot run it
    ready_artifact(draft, "float32", digits.build_head_retrained_models(epochs=5)["float32"], alice.user)
    v2 = new_version(model, "2.0.0", golden_npz, alice)
    target = ready_artifact(v2, "float32", digits.build_head_retrained_models()["float32"], alice.user)
    int8 = ready_artifact(v2, "int8", digits.build_head_retrained_models()["int8"], alice.user)
    assert [b.pk for b in services.delta_bases(target)] == [released_v1.pk]
    assert services.delta_bases(int8) == []  # 1.0.0 has no int8 here
    # Released later, 1.5.0 becomes the newest base, and releasing queues the deltas.
    services.version_set_status(version=draft, status=VersionStatus.RELEASED)
    assert [b.version.version for b in services.delta_bases(target)] == ["1.5.0"]
    settings.DELTA_BASES = 0
    assert services.delta_bases(target) == [] and services.artifact_deltas_make(artifact_id=target.pk) == []


def test_the_desired_state_offers_the_delta_only_to_a_device_running_its_base(
    released_v1, golden_npz, alice, digits
):
    v2 = new_version(released_v1.version.model, "2.0.0", golden_npz, alice)
    target = ready_artifact(v2, "float32", digits.build_head_retrained_models()["float32"], alice.user)
    (delta,) = services.artifact_deltas_make(artifact_id=target.pk)
    running = {
        "on-v1": {"digits": {"version": "1.0.0", "variant": "float32"}},
        "on-v1-int8": {"digits": {"version": "1.0.0", "variant": "int8"}},
        "on-nothing": {},
    }
    states = [(device, 7, {"digits": target.pk}, {}, reported) for device, reported in running.items()]
    states.append(("old-task", 7, {"digits": target.pk}, {}))  # queued by a release without deltas
    signed = dict(sign_desired_states(states=states, entries=desired_entries(states), rollout=None))
    models = {
        device: payload_of(envelope, protocol.DESIRED_PAYLOAD_TYPE)["models"]["digits"]
        for device, envelope in signed.items()
    }
    offer = models["on-v1"]["delta"]
    assert offer["base_version"] == "1.0.0" and offer["manifest_sha256"] == delta.manifest_sha256
    assert offer["size"] == delta.blob_size
    assert offer["blob_url"].endswith(f"/api/v1/artifacts/{target.pk}/deltas/{delta.pk}/blob")
    assert all("delta" not in models[device] for device in ("on-v1-int8", "on-nothing", "old-task"))
    # The full blob is always named beside the offer.
    assert models["on-v1"]["blob_url"] == models["on-nothing"]["blob_url"]
    assert not any("_deltas" in entry for entry in models.values())


def test_the_rollout_says_how_its_devices_got_the_version(released_v1, golden_npz, alice, digits):
    v2 = new_version(released_v1.version.model, "2.0.0", golden_npz, alice)
    target = ready_artifact(v2, "float32", digits.build_head_retrained_models()["float32"], alice.user)
    policy = RolloutPolicy.objects.create(name="p", gates={})
    started = timezone.now() - timedelta(minutes=5)
    rollout = Rollout.objects.create(
        model=v2.model, target_version=v2, targets={"tags": ["t"]}, policy=policy, started_at=started
    )
    assert rollout_delivery(rollout).summary == ""
    claims = {"a": ("delta", 1000, ""), "b": ("delta", 1200, ""), "c": ("full", 9000, "base_missing")}
    for n, (device_id, (path, size, fallback)) in enumerate(claims.items()):
        device = Device.objects.create(device_id=device_id, status=DeviceStatus.ACTIVE)
        rollout.assignments.create(device=device, stage=0, variant="float32", cohort_key=n)
        DeviceEvent.objects.create(
            device=device,
            message_id=f"m{n}",
            type="verifying",
            model="digits",
            version="2.0.0",
            variant="float32",
            delivery=path,
            delivery_bytes=size,
            delivery_fallback=fallback,
            ts=started,
            received_at=timezone.now(),
        )
    delivery = rollout_delivery(rollout)
    assert (delivery.by_delta, delivery.full, delivery.downloaded) == (2, 1, 11200)
    assert delivery.full_blobs == 3 * target.blob_size
    assert delivery.summary == (
        "2 devices got it as a delta and 1 device as the full blob (delta not used: base_missing: 1); "
        f"they downloaded 10.9 KB where full blobs would be {_size(3 * target.blob_size)} "
        f"({(1 - 11200 / (3 * target.blob_size)) * 100:.0f} % less)."
    )
    answer = alice.client().get(f"/api/v1/rollouts/{rollout.pk}").json()["delivery"]
    assert (answer["by_delta"], answer["full"], answer["fallbacks"]) == (2, 1, {"base_missing": 1})


def _size(n: int) -> str:
    from fleet.core.display import size

    return size(n)


def test_the_version_page_shows_each_delta_once_in_words(released_v1, golden_npz, alice, bob, digits):
    from django.test import Client
    from django.utils.html import escape

    v2 = new_version(released_v1.version.model, "2.0.0", golden_npz, alice)
    target = ready_artifact(v2, "float32", digits.build_head_retrained_models()["float32"], alice.user)
    (delta,) = services.artifact_deltas_make(artifact_id=target.pk)
    client = Client()
    client.force_login(bob.user)
    html = client.get(f"/admin/registry/modelversion/{v2.pk}/change/").content.decode()
    assert html.count('id="deltas"') == 1
    row = html.split('data-variant="float32" data-base="1.0.0" data-offered="yes"')[1].split("</tr>")[0]
    assert escape(delta.reason) in row and f"<td>{delta.ratio * 100:.0f} %</td>" in row
