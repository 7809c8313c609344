"""Real agents declaring different hardware, int8 support and an op their runtime lacks
(issue 12 §3): each gets the variant it can run, and the one no variant fits is skipped
with a reason code and never sent a desired state (docs/rollouts.md, "Who gets what")."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile, TemporaryUploadedFile

from agent.config import parse_config
from agent.core import Agent
from fleet.devices.models import Device, DeviceEvent
from fleet.registry import services as registry
from fleet.rollouts import services as rollouts
from fleet.rollouts.choices import AssignmentState, SkipReason
from fleet.rollouts.models import RolloutPolicy
from tests.conftest import wait_until
from tests.e2e.conftest import enroll

# The rollout's desired states are published by the Celery worker, as in production.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("broker_settings", "celery_worker_process"),
]

# device -> what its agent's [device] table declares, and the variant it must end up with
# (the version's int8 is for rpi4 only; both variants use SOFTMAX).
DECLARED = {
    "rpi-int8": ({"hardware": "rpi4", "int8": True}, "int8"),
    "rpi-float": ({"hardware": "rpi4", "int8": False}, "float32"),
    "jetson": ({"hardware": "jetson", "int8": True}, "float32"),
    "no-softmax": ({"hardware": "rpi4", "int8": True, "unsupported_ops": ["SOFTMAX"]}, None),
}


def artifact(version, variant: str, data: bytes, hardware: list[str]):
    upload = TemporaryUploadedFile(f"{variant}.tflite", "application/octet-stream", len(data), None)
    upload.write(data)
    upload.seek(0)
    row = registry.artifact_upload(
        version=version, variant=variant, upload=upload, requires_hardware=hardware
    )
    return registry.artifact_process(artifact_id=row.pk)


@pytest.fixture
def declared_agents(control_plane, bridge, broker, tmp_path, enrollment):
    """Four agents that enroll as plain "test-box" devices (as an older enrollment would):
    what they can run reaches the control plane in their status (protocol addition 10)."""
    running, received = {}, {}
    try:
        for name, (device_table, _) in DECLARED.items():
            device_id = f"e2e-{enrollment['run']}-{name}"
            answer = enroll(control_plane, enrollment, device_id, int8=True)
            config = parse_config(
                {
                    "device_id": device_id,
                    "state_dir": str(tmp_path / device_id),
                    "telemetry_interval_s": 0.5,
                    "broker": {
                        "url": answer["mqtt"]["url"],
                        "username": answer["mqtt"]["username"],
                        "password": answer["mqtt"]["password"],
                        "ca_file": str(broker.ca_file),
                    },
                    "control_plane": {"url": control_plane["url"], "token": answer["token"]},
                    "trust": {"root_keys": [control_plane["root_key_hex"]]},
                    "local_api": {"bind": "127.0.0.1:0"},
                    "device": device_table,
                    "limits": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "reconnect_initial_s": 0.1},
                }
            )
            agent = Agent(config)
            # Every desired-state envelope the broker delivers to this agent, kept for the asserts.
            received[name] = []
            agent.link.on_desired = lambda envelope, name=name, agent=agent: (
                received[name].append(envelope),
                agent.submit_desired(envelope),
            )
            agent.start()
            running[name] = agent
        for agent in running.values():
            wait_until(
                agent.link.connected.is_set, timeout=20, message=f"{agent.config.device_id} to connect"
            )
        yield running, received
    finally:
        for agent in running.values():
            agent.stop()


def test_each_agent_gets_the_variant_it_can_run_and_the_one_nothing_fits_is_never_sent_one(
    control_plane, declared_agents, digits
):
    agents, received = declared_agents
    version = registry.version_create(
        model=control_plane["model"],
        version="5.0.0",
        golden_set=SimpleUploadedFile("g.npz", digits.golden_set_npz()),
    )
    models = digits.build_digits_models(version="1.0.0")
    artifact(version, "float32", models["float32"], ["any"])
    artifact(version, "int8", models["int8"], ["rpi4"])
    ids = {name: agent.config.device_id for name, agent in agents.items()}

    # The statuses reached the inventory through the ingest bridge.
    def declared() -> bool:
        devices = {d.device_id: d for d in Device.objects.filter(device_id__in=ids.values())}
        return all(
            devices[ids[name]].hardware == table["hardware"]
            and devices[ids[name]].supports_int8 == table["int8"]
            and devices[ids[name]].unsupported_ops == table.get("unsupported_ops", [])
            and devices[ids[name]].runtime == "ai_edge_litert"
            for name, (table, _) in DECLARED.items()
        )

    wait_until(declared, timeout=30, message="the agents' capabilities in the inventory")

    policy = RolloutPolicy.objects.create(
        name="variants", stages=[{"kind": "percent", "value": 100, "soak_seconds": 0}], gates={}
    )
    rollout = rollouts.rollout_create(
        model=version.model, version=version, targets={"devices": list(ids.values())}, policy=policy
    )
    rollout = rollouts.rollout_start(rollout=rollout)

    expected = {name: variant for name, (_, variant) in DECLARED.items() if variant}

    def served() -> bool:
        live = {name: agents[name].models.live().get("digits") for name in expected}
        return all(
            m is not None and (m.version, m.variant) == ("5.0.0", expected[n]) for n, m in live.items()
        )

    try:
        wait_until(served, timeout=60, message="each agent serving its variant")
    except AssertionError as exc:
        states = list(rollout.assignments.values_list("device__device_id", "variant", "state", "reason"))
        events = list(
            DeviceEvent.objects.filter(device__device_id__in=ids.values()).values_list(
                "type", "reason", "message"
            )
        )
        raise AssertionError(f"{exc}: assignments {states}; events {events}") from exc

    skipped = rollout.assignments.get(device__device_id=ids["no-softmax"])
    assert (skipped.state, skipped.skip_code) == (AssignmentState.SKIPPED, SkipReason.NO_VARIANT_FITS)
    assert skipped.reason == "int8: needs op SOFTMAX; float32: needs op SOFTMAX"
    placed = dict(rollout.assignments.values_list("device__device_id", "variant"))
    assert placed == {ids[name]: variant or "" for name, (_, variant) in DECLARED.items()}
    # The others were sent desired states and installed; the skipped device never got one.
    assert all(received[name] for name in expected)
    assert received["no-softmax"] == []
    assert Device.objects.get(device_id=ids["no-softmax"]).desired_generation == 0
    assert agents["no-softmax"].state.applied_generation == 0
    assert agents["no-softmax"].models.live() == {}
