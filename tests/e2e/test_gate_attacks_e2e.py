"""One stolen device login cannot move a gate, tried for real: 20 real agents serve and
post labeled feedback through their local API; one more device, enrolled through the API
like any other, publishes with its own broker login what an attacker would (it "installs"
the candidate and claims a million labels per window). The ingest bridge stores its
windows (the attack reaches the gate) and the gate still decides on the honest devices:

* a worse model (3.0.0, ~71 %) is rolled back although the forger claims it is perfect;
* a good model (2.0.0) completes although the forger claims it is always wrong.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from agent.protocol.topics import Topics
from fleet.devices.models import TelemetryWindow
from fleet.mqtt.broker import mqtt_client
from fleet.rollouts import services as rollouts
from fleet.rollouts.choices import AssignmentState, RolloutState
from fleet.rollouts.cohort import cohort_key
from fleet.rollouts.models import GateEvaluation, RolloutPolicy
from tests.conftest import wait_until
from tests.e2e.conftest import enroll, evaluate_until, post_feedback, put_everywhere

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("broker_settings", "celery_worker_process"),
]
FINISHED = {RolloutState.ROLLED_BACK, RolloutState.PAUSED, RolloutState.COMPLETED}
FORGED_LABELS = 1_000_000


@pytest.fixture
def int8_rule():
    """Every agent runs int8, so the canary arm is exactly the first half by the hash."""
    return lambda n: True


class Forger:
    """A device whose login is in an attacker's hands: it publishes whatever it likes on
    its own topics (the broker's ACL allows nothing else)."""

    def __init__(self, control_plane, enrollment, broker, rollout, agents) -> None:
        # An id the stable hash puts ahead of every real agent: it is a canary for sure.
        first = min(cohort_key(rollout.pk, agent.config.device_id) for agent in agents)
        self.device_id = next(
            candidate
            for candidate in (f"e2e-{enrollment['run']}-forger-{n}" for n in range(10_000))
            if cohort_key(rollout.pk, candidate) < first
        )
        answer = enroll(control_plane, enrollment, self.device_id, int8=True)
        self.client = mqtt_client(
            broker.url,
            client_id=self.device_id,
            username=answer["mqtt"]["username"],
            password=answer["mqtt"]["password"],
        )
        self.topics = Topics()

    def publish(self, kind: str, message: dict, *, retain: bool = False) -> None:
        info = self.client.publish(
            self.topics.device(self.device_id, kind), json.dumps(message), qos=1, retain=retain
        )
        info.wait_for_publish(10)

    def claim_installed(self, assignment, version: str) -> None:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        models = {"digits": {"version": version, "variant": "int8"}}
        self.publish(
            "reported", {"generation": assignment.generation, "models": models, "ts": now}, retain=True
        )
        self.publish(
            "events",
            {
                "id": uuid.uuid4().hex,
                "ts": now,
                "type": "active",
                "generation": assignment.generation,
                "model": "digits",
                "version": version,
                "variant": "int8",
            },
        )

    def forge_windows(self, version: str, *, correct: int, errors: int, since: datetime) -> None:
        """Two windows that began after ``since`` (so the stage counts them)."""
        for _ in range(2):
            end = max(datetime.now(UTC), since + timedelta(seconds=2))
            self.publish(
                "telemetry",
                {
                    "id": uuid.uuid4().hex,
                    "ts": end.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    "window_s": 1,
                    "models": {
                        "digits": {
                            "version": version,
                            "variant": "int8",
                            "inferences": FORGED_LABELS,
                            "errors": errors,
                            "latency_ms": {"p50": 0.1, "p95": 0.1, "p99": 0.1},
                            "feedback": {"labeled": FORGED_LABELS, "correct": correct},
                        }
                    },
                },
            )

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def forged_rows(forger: Forger, version: str) -> int:
    return TelemetryWindow.objects.filter(
        device__device_id=forger.device_id, version=version, labeled=FORGED_LABELS
    ).count()


def canary_rollout(control_plane, enrollment, version: str, **gates):
    policy = RolloutPolicy.objects.create(
        name=f"attacked-{version}",
        stages=[{"kind": "percent", "value": 50, "soak_seconds": 0}, {"kind": "percent", "value": 100}],
        gates=gates,
        on_failure="rollback",
    )
    return rollouts.rollout_create(
        model=control_plane["model"],
        version=control_plane["model"].versions.get(version=version),
        targets={"tags": [enrollment["tag"]]},
        policy=policy,
    )


def forger_installs(forger: Forger, rollout, version: str):
    assignment = rollout.assignments.get(device__device_id=forger.device_id)
    assert (assignment.stage, assignment.state) == (0, AssignmentState.NOTIFIED)
    forger.claim_installed(assignment, version)
    wait_until(
        lambda: (
            rollouts.assignments_sync(rollout=rollout)
            or rollout.assignments.filter(pk=assignment.pk, state=AssignmentState.ACTIVE).exists()
        ),
        timeout=30,
        message="the control plane to believe the forger installed the candidate",
    )


def test_one_forging_device_cannot_pass_a_worse_model(control_plane, agents, enrollment, broker, digits):
    put_everywhere(agents, control_plane, "1.0.0")
    rollout = canary_rollout(
        control_plane,
        enrollment,
        "3.0.0",
        accuracy={"min_samples": 150, "min_devices": 3, "max_drop_pp": 2.0, "confidence": 0.95},
    )
    forger = Forger(control_plane, enrollment, broker, rollout, agents)
    try:
        rollout = rollouts.rollout_start(rollout=rollout)
        forger_installs(forger, rollout, "3.0.0")
        canaries = set(
            rollout.assignments.filter(stage=0)
            .exclude(device__device_id=forger.device_id)
            .values_list("device__device_id", flat=True)
        )
        assert len(canaries) == 10
        by_id = {agent.config.device_id: agent for agent in agents}
        wait_until(
            lambda: all(by_id[d].models.live()["digits"].version == "3.0.0" for d in canaries),
            timeout=60,
            message="3.0.0 on the honest canaries",
        )
        forger.forge_windows("3.0.0", correct=FORGED_LABELS, errors=0, since=rollout.stage_started_at)
        for agent in agents:
            post_feedback(agent, digits, 80)
        wait_until(lambda: forged_rows(forger, "3.0.0") == 2, timeout=30, message="the forged windows stored")
        evaluate_until(rollout, FINISHED, timeout=60)
    finally:
        forger.close()
    assert rollout.state == RolloutState.ROLLED_BACK, rollout.last_decision
    failed = GateEvaluation.objects.filter(rollout=rollout, metric="accuracy", verdict="fail").first()
    # The forger's windows were read, and its claim was the one set aside on the passing side.
    assert forger.device_id in failed.inputs["candidate"]["per_device"]
    assert forger.device_id in failed.inputs["trimmed"]["set_aside"]
    assert rollout.last_decision.startswith("Rolled back at stage 1 by the accuracy gate")


def test_one_forging_device_cannot_roll_back_a_good_model(control_plane, agents, enrollment, broker, digits):
    put_everywhere(agents, control_plane, "1.0.0")
    rollout = canary_rollout(
        control_plane,
        enrollment,
        "2.0.0",
        max_error_rate=0.01,
        min_inferences=100,
        accuracy={"min_samples": 150, "min_devices": 3, "max_drop_pp": 5.0, "confidence": 0.95},
    )
    forger = Forger(control_plane, enrollment, broker, rollout, agents)
    try:
        rollout = rollouts.rollout_start(rollout=rollout)
        forger_installs(forger, rollout, "2.0.0")
        forger.forge_windows("2.0.0", correct=0, errors=FORGED_LABELS, since=rollout.stage_started_at)
        canaries = set(rollout.assignments.filter(stage=0).values_list("device__device_id", flat=True))
        by_id = {agent.config.device_id: agent for agent in agents}
        wait_until(
            lambda: all(by_id[d].models.live()["digits"].version == "2.0.0" for d in canaries if d in by_id),
            timeout=60,
            message="2.0.0 on the honest canaries",
        )
        for agent in agents:
            post_feedback(agent, digits, 150)
        wait_until(lambda: forged_rows(forger, "2.0.0") == 2, timeout=30, message="the forged windows stored")
        # Stage 1 must pass on the honest evidence, with the forger's claims beside it.
        evaluate_until(rollout, FINISHED, timeout=60, stage=1)
        assert (rollout.state, rollout.current_stage) == (RolloutState.RUNNING, 1), rollout.last_decision
        # Stage 2: the forger lies again; the honest devices serve some more requests.
        forger.forge_windows("2.0.0", correct=0, errors=FORGED_LABELS, since=rollout.stage_started_at)
        wait_until(lambda: forged_rows(forger, "2.0.0") == 4, timeout=30, message="the second forged windows")
        wait_until(
            lambda: all(agent.models.live()["digits"].version == "2.0.0" for agent in agents),
            timeout=60,
            message="2.0.0 everywhere",
        )
        # Enough requests that 0 errors is confidently under the 1 % ceiling (about 1,300).
        for agent in agents:
            post_feedback(agent, digits, 100)
        evaluate_until(rollout, FINISHED, timeout=60)
    finally:
        forger.close()
    assert rollout.state == RolloutState.COMPLETED, rollout.last_decision
    assert not GateEvaluation.objects.filter(rollout=rollout, verdict="fail").exists()
