"""The whole loop with real parts: 20 in-process agents enrolled through the API, a real
Mosquitto with the project's config, the ingest bridge, the control plane serving
artifacts over HTTP, and the gate evaluator (the beat task's function, called directly).

v1 goes everywhere; v2 is rolled out in stages of 10 / 50 / 100 % with a soak, and every
device ends on v2 with the variant the rule chooses; then v3, the deliberately worse
model, is rolled out: the devices' apps post labeled feedback through the agents' local
API, the accuracy gate trips with significance, and the rollout rolls itself back so
that every canary device serves v2 again."""

from __future__ import annotations

import itertools
import time
import uuid
from collections import defaultdict

import pytest
import requests

from agent.config import parse_config
from agent.core import Agent
from fleet.devices.choices import DeviceStatus
from fleet.devices.ingest import IngestBridge
from fleet.devices.models import Device
from fleet.devices.services import devices_assign, enrollment_token_create
from fleet.registry import services as registry
from fleet.registry.models import MLModel, SigningKey
from fleet.rollouts import services as rollouts
from fleet.rollouts.choices import AssignmentState, RolloutState
from fleet.rollouts.models import AuditEntry, GateEvaluation, RolloutPolicy
from tests.conftest import wait_until
from tests.server.conftest import ready_artifact

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    # Desired states go out through chunked Celery tasks, on a real worker.
    pytest.mark.usefixtures("broker_settings", "celery_worker_process"),
]
DEVICES = 20
SOAK_SECONDS = 1
STAGE_TIMEOUT = 30


@pytest.fixture
def control_plane(live_server, settings, broker, digits):
    settings.PUBLIC_BASE_URL = live_server.url
    settings.MQTT_INGEST_PASSWORD = broker.ingest_password
    settings.ENROLL_RATE = "1000/minute"  # twenty devices enroll from one address in a second
    model = MLModel.objects.create(name="digits", labels=digits.LABELS)
    golden = digits.golden_set_npz()
    from django.core.files.uploadedfile import SimpleUploadedFile

    artifacts = {}
    for version, build in (("1.0.0", {}), ("2.0.0", {"version": "2.0.0"}), ("3.0.0", {"quality": "worse"})):
        row = registry.version_create(
            model=model, version=version, golden_set=SimpleUploadedFile("golden.npz", golden)
        )
        for variant, data in digits.build_digits_models(**build).items():
            artifacts[(version, variant)] = ready_artifact(row, variant, data)
    return {"url": live_server.url, "artifacts": artifacts}


@pytest.fixture
def bridge(broker):
    running = IngestBridge(
        client_id=f"e2e-ingest-{uuid.uuid4().hex[:6]}",
        url=broker.url,
        username="fleet-ingest",
        password=broker.ingest_password,
        flush_ms=50,
        session_expiry_s=0,
    )
    import threading

    stop = threading.Event()
    thread = threading.Thread(target=running.run, args=(stop,), daemon=True)
    thread.start()
    wait_until(running.subscribed.is_set, timeout=10, message="the ingest bridge")
    yield running
    stop.set()
    thread.join(20)


@pytest.fixture
def agents(control_plane, bridge, broker, tmp_path):
    _, key = enrollment_token_create(name="e2e", auto_approve=True)
    trusted = [signing_key.public_key for signing_key in SigningKey.objects.all()]
    running = []
    # Fresh ids each test: the broker keeps the retained messages of earlier tests' devices.
    run = uuid.uuid4().hex[:4]
    try:
        for n in range(DEVICES):
            device_id = f"e2e-{run}-{n:02d}"
            int8 = n % 2 == 0
            answer = requests.post(
                f"{control_plane['url']}/api/v1/enroll",
                json={
                    "device_id": device_id,
                    "enrollment_token": key,
                    "identity": {"hardware": "test-box", "supports_int8": int8, "agent_version": "0.1.0"},
                },
                timeout=10,
            ).json()
            config = parse_config(
                {
                    "device_id": device_id,
                    "state_dir": str(tmp_path / device_id),
                    "telemetry_interval_s": 0.5,
                    "broker": {
                        "url": broker.url,
                        "username": answer["mqtt"]["username"],
                        "password": answer["mqtt"]["password"],
                    },
                    "control_plane": {"url": control_plane["url"], "token": answer["token"]},
                    "trust": {"public_keys": trusted},
                    "local_api": {"bind": "127.0.0.1:0"},
                    "device": {"int8": int8},
                    "limits": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "reconnect_initial_s": 0.1},
                }
            )
            agent = Agent(config)
            agent.start()
            running.append(agent)
        for agent in running:
            wait_until(
                agent.link.connected.is_set, timeout=20, message=f"{agent.config.device_id} to connect"
            )
        yield running
    finally:  # also when setting up failed half-way: no agent outlives its test
        for agent in running:
            agent.stop()


def everyone_on(agents, version: str) -> bool:
    live = [agent.models.live().get("digits") for agent in agents]
    return all(model is not None and model.version == version for model in live)


def evaluate_until(rollout, states: set[str], timeout: float) -> None:
    """The beat task, called directly until the rollout reaches one of ``states``."""
    deadline = time.monotonic() + timeout
    while True:
        rollouts.rollout_evaluate(rollout_id=rollout.pk)
        rollout.refresh_from_db()
        if rollout.state in states:
            return
        assert time.monotonic() < deadline, (
            f"rollout stuck: {rollout.state} stage {rollout.current_stage}; assignments "
            f"{list(rollout.assignments.values_list('device__device_id', 'state', 'generation', 'reason'))}; "
            f"last evaluations {list(rollout.evaluations.values_list('metric', 'verdict', 'note')[:4])}"
        )
        time.sleep(0.2)


def post_feedback(agent, digits, samples: int) -> None:
    """What an app on the device does: predict, then report the true label."""
    x, y = digits.golden_set()
    session = requests.Session()
    for index in range(samples):
        answer = session.post(
            f"{agent.api.address}/v1/models/digits:predict", json={"inputs": [[x[index].tolist()]]}, timeout=5
        ).json()
        session.post(
            f"{agent.api.address}/v1/feedback",
            json={"prediction_id": answer["prediction_id"], "label": int(y[index])},
            timeout=5,
        )


def v1_everywhere(agents, devices, artifacts) -> None:
    """Put v1 on every device (the variant by the rule) and wait until the agents serve it
    and the control plane, through the ingest bridge, sees it."""
    for variant, group in (
        ("int8", [d for d in devices if d.supports_int8]),
        ("float32", [d for d in devices if not d.supports_int8]),
    ):
        devices_assign(devices=group, artifacts={"digits": artifacts[("1.0.0", variant)]}, publish="now")
    wait_until(lambda: everyone_on(agents, "1.0.0"), timeout=60, message="v1 everywhere")
    wait_until(
        lambda: (
            Device.objects.filter(
                device_id__startswith="e2e-", reported_models__digits__version="1.0.0", online=True
            ).count()
            == DEVICES
        ),
        timeout=30,
        message="the control plane to see v1 everywhere",
    )


def test_v2_promotes_through_its_stages_and_v3_is_rolled_back_by_the_accuracy_gate(
    control_plane, agents, digits
):
    artifacts = control_plane["artifacts"]
    devices = list(Device.objects.filter(device_id__startswith="e2e-").order_by("device_id"))
    assert len(devices) == DEVICES and all(d.status == DeviceStatus.ACTIVE for d in devices)

    # v1 everywhere, the variant by the rule.
    v1_everywhere(agents, devices, artifacts)

    # v2 in stages 10 / 50 / 100 % with a soak.
    staged = RolloutPolicy.objects.create(
        name="staged",
        stages=[{"kind": "percent", "value": v, "soak_seconds": SOAK_SECONDS} for v in (10, 50, 100)],
        gates={"max_install_failure_rate": 0.0},
        pickup_timeout_seconds=60,
    )
    v2 = rollouts.rollout_create(
        model=artifacts[("2.0.0", "int8")].version.model,
        version=artifacts[("2.0.0", "int8")].version,
        targets={"devices": [d.device_id for d in devices]},
        policy=staged,
    )
    v2 = rollouts.rollout_start(rollout=v2)
    finished = {RolloutState.COMPLETED, RolloutState.PAUSED, RolloutState.ROLLED_BACK}
    evaluate_until(v2, finished, timeout=STAGE_TIMEOUT)
    assert v2.state == RolloutState.COMPLETED, list(v2.evaluations.values_list("metric", "verdict", "note"))
    wait_until(lambda: everyone_on(agents, "2.0.0"), timeout=30, message="v2 everywhere")
    for agent in agents:
        live = agent.models.live()["digits"]
        assert live.variant == ("int8" if agent.config.device.int8 else "float32")
    stage_starts = [
        entry.at
        for entry in AuditEntry.objects.filter(rollout=v2).order_by("at")
        if entry.action in ("start", "promote", "complete")
    ]
    assert [e.stage for e in AuditEntry.objects.filter(rollout=v2, action="promote").order_by("at")] == [1, 2]
    assert all(
        (later - earlier).total_seconds() >= SOAK_SECONDS
        for earlier, later in itertools.pairwise(stage_starts)
    )
    covered_by_stage = defaultdict(int)
    for stage in v2.assignments.values_list("stage", flat=True):
        covered_by_stage[stage] += 1
    assert dict(covered_by_stage) == {0: 2, 1: 8, 2: 10}

    # v3, the worse model: the accuracy gate rolls it back on the devices' own feedback.
    canary = RolloutPolicy.objects.create(
        name="canary",
        stages=[{"kind": "percent", "value": 10, "soak_seconds": 0}, {"kind": "percent", "value": 100}],
        gates={"accuracy": {"min_samples": 150, "max_drop_pp": 2.0, "confidence": 0.95}},
        on_failure="rollback",
    )
    v3 = rollouts.rollout_create(
        model=artifacts[("3.0.0", "int8")].version.model,
        version=artifacts[("3.0.0", "int8")].version,
        targets={"devices": [d.device_id for d in devices]},
        policy=canary,
    )
    v3 = rollouts.rollout_start(rollout=v3)
    canaries = {a.device.device_id for a in v3.assignments.filter(state=AssignmentState.NOTIFIED)}
    assert len(canaries) == 2
    by_id = {agent.config.device_id: agent for agent in agents}
    wait_until(
        lambda: all(by_id[d].models.live()["digits"].version == "3.0.0" for d in canaries),
        timeout=60,
        message="v3 on the canaries",
    )
    for agent in agents:
        post_feedback(agent, digits, 100 if agent.config.device_id in canaries else 20)
    evaluate_until(v3, {RolloutState.ROLLED_BACK, RolloutState.PAUSED, RolloutState.COMPLETED}, timeout=60)
    assert v3.state == RolloutState.ROLLED_BACK
    accuracy = GateEvaluation.objects.filter(rollout=v3, metric="accuracy").order_by("-evaluated_at").first()
    assert accuracy.verdict == "fail" and accuracy.decision == "rollback"
    assert accuracy.candidate_n >= 150 and accuracy.incumbent_n >= 150
    assert accuracy.candidate_value < accuracy.incumbent_value - 0.1
    assert accuracy.p_value < 0.05
    wait_until(
        lambda: all(by_id[d].models.live()["digits"].version == "2.0.0" for d in canaries),
        timeout=60,
        message="the canaries back on v2",
    )
    assert everyone_on(agents, "2.0.0")


def test_an_artifact_that_fails_its_golden_check_on_devices_pauses_at_stage_one(control_plane, agents):
    """The server measured this artifact at 97.5 % (as if its runtime differed from the
    devices'); on the devices the same bytes score 71 %, so every canary refuses it with
    golden_failed, and the install-failure gate pauses the rollout at its first stage."""
    artifacts = control_plane["artifacts"]
    devices = list(Device.objects.filter(device_id__startswith="e2e-"))
    v1_everywhere(agents, devices, artifacts)
    for variant in ("int8", "float32"):
        claimed = artifacts[("3.0.0", variant)]
        claimed.golden_accuracy = 0.975
        registry._sign_manifest(claimed)  # a signed manifest that claims what devices will not measure
        claimed.save()
    policy = RolloutPolicy.objects.create(
        name="careful",
        on_failure="pause",
        stages=[{"kind": "percent", "value": 10}, {"kind": "percent", "value": 100}],
        gates={"max_install_failure_rate": 0.1},
    )
    rollout = rollouts.rollout_start(
        rollout=rollouts.rollout_create(
            model=artifacts[("3.0.0", "int8")].version.model,
            version=artifacts[("3.0.0", "int8")].version,
            targets={"devices": [d.device_id for d in devices]},
            policy=policy,
        )
    )
    evaluate_until(
        rollout,
        {RolloutState.PAUSED, RolloutState.COMPLETED, RolloutState.ROLLED_BACK},
        timeout=STAGE_TIMEOUT,
    )
    assert (rollout.state, rollout.current_stage) == (RolloutState.PAUSED, 0)
    failed = rollout.assignments.filter(state=AssignmentState.FAILED)
    assert failed.count() == 2 and set(failed.values_list("reason", flat=True)) == {"golden_failed"}
    assert rollout.assignments.filter(state=AssignmentState.PENDING).count() == DEVICES - 2
    assert everyone_on(agents, "1.0.0")  # the refused model never replaced the working one
    gate = (
        GateEvaluation.objects.filter(rollout=rollout, metric="install_failure_rate")
        .order_by("-evaluated_at")
        .first()
    )
    assert (gate.verdict, gate.decision, gate.candidate_value) == ("fail", "pause", 1.0)
