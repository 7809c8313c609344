"""Delta updates through the whole control plane (issue 12 §1; docs/protocol.md, addition 11).

Real parts: the registry pipeline, the Celery worker making the delta when the new version's
artifact is ready, the rollout's desired states published by the worker, real agents over
the broker's TLS listener downloading from the live server, and the ingest bridge storing
what they report. The device running the released base gets a delta and says so; a device
whose base is gone from its disk falls back to the full blob and says why.
"""

from __future__ import annotations

import shutil

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from agent.protocol.codes import DeliveryPath, DeltaFallback
from agent.store import Installed
from fleet.devices.models import Device, DeviceEvent
from fleet.registry import services as registry
from fleet.registry.choices import DeltaStatus, VersionStatus
from fleet.registry.models import ArtifactDelta
from fleet.rollouts import services as rollouts
from fleet.rollouts.choices import RolloutState
from fleet.rollouts.models import RolloutPolicy
from samples.retrained import fine_tune
from tests.conftest import wait_until
from tests.e2e.conftest import evaluate_until, everyone_on, start_agent
from tests.server.conftest import ready_artifact

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("broker_settings", "celery_worker_process"),
]


@pytest.fixture
def two_agents(control_plane, bridge, broker, tmp_path, enrollment):
    running = []
    try:
        for name in ("keeps", "loses"):
            device_id = f"e2e-{enrollment['run']}-{name}"
            running.append(start_agent(control_plane, broker, tmp_path, enrollment, device_id, int8=False))
        for agent in running:
            wait_until(
                agent.link.connected.is_set, timeout=20, message=f"{agent.config.device_id} to connect"
            )
        yield running
    finally:
        for agent in running:
            agent.stop()


def roll_out(version, device_ids: list[str]):
    policy = RolloutPolicy.objects.create(
        name=f"all-{version.version}", stages=[{"kind": "percent", "value": 100, "soak_seconds": 0}], gates={}
    )
    rollout = rollouts.rollout_create(
        model=version.model, version=version, targets={"devices": device_ids}, policy=policy
    )
    return rollouts.rollout_start(rollout=rollout)


def test_the_new_version_reaches_a_device_as_a_delta_and_a_device_without_the_base_gets_the_blob(
    control_plane, two_agents, digits
):
    keeps, loses = two_agents
    ids = [agent.config.device_id for agent in two_agents]
    golden = digits.golden_set_npz()
    model = control_plane["model"]
    float32 = digits.build_digits_models()["float32"]

    # 7.0.0, released and on both devices (as full blobs: they have nothing to diff from).
    base_version = registry.version_create(
        model=model, version="7.0.0", golden_set=SimpleUploadedFile("g.npz", golden)
    )
    base = ready_artifact(base_version, "float32", float32)
    registry.version_set_status(version=base_version, status=VersionStatus.RELEASED)
    first = roll_out(base_version, ids)
    wait_until(lambda: everyone_on(two_agents, "7.0.0"), timeout=60, message="7.0.0 everywhere")
    evaluate_until(first, {RolloutState.COMPLETED}, timeout=30)
    wait_until(
        lambda: (
            Device.objects.filter(device_id__in=ids, reported_models__digits__version="7.0.0").count() == 2
        ),
        timeout=30,
        message="the control plane to see 7.0.0 everywhere",
    )

    # 7.1.0, fine-tuned: its artifact becomes ready, and the worker makes the delta from 7.0.0.
    target_version = registry.version_create(
        model=model, version="7.1.0", golden_set=SimpleUploadedFile("g.npz", golden)
    )
    target = ready_artifact(target_version, "float32", fine_tune(float32))
    delta = wait_until(
        lambda: ArtifactDelta.objects.filter(target=target, base=base).first(),
        timeout=60,
        message="the worker to make the delta",
    )
    assert delta.status == DeltaStatus.READY, delta.reason
    assert delta.blob_size < 0.8 * target.blob_size
    assert delta.reason.startswith("Offered to devices running 7.0.0:")

    # One device loses its copy of 7.0.0 (it keeps serving it from memory).
    shutil.rmtree(loses.store.model_dir("digits", Installed("7.0.0", "float32")))
    roll_out(target_version, ids)
    wait_until(lambda: everyone_on(two_agents, "7.1.0"), timeout=60, message="7.1.0 everywhere")

    def delivered(agent) -> DeviceEvent | None:
        return DeviceEvent.objects.filter(
            device__device_id=agent.config.device_id, type="verifying", version="7.1.0"
        ).first()

    wait_until(lambda: delivered(keeps) and delivered(loses), timeout=30, message="the deliveries stored")
    by_delta, whole = delivered(keeps), delivered(loses)
    assert (by_delta.delivery, by_delta.delivery_fallback) == (DeliveryPath.DELTA, "")
    assert delta.blob_size <= by_delta.delivery_bytes < target.blob_size
    assert (whole.delivery, whole.delivery_fallback) == (DeliveryPath.FULL, DeltaFallback.BASE_MISSING)
    assert whole.delivery_bytes >= target.blob_size
    # Both rebuilt exactly the signed model.
    for agent in two_agents:
        path = agent.store.model_path("digits", Installed("7.1.0", "float32"))
        assert path.read_bytes() == fine_tune(float32)
