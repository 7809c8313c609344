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
import json
import re
from collections import defaultdict

import pytest
from django.test import Client

from fleet.core.choices import Role
from fleet.core.services import user_ensure
from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device
from fleet.registry import services as registry
from fleet.registry.choices import VersionStatus
from fleet.rollouts import services as rollouts
from fleet.rollouts.choices import AssignmentState, RolloutState
from fleet.rollouts.models import AuditEntry, GateEvaluation, RolloutPolicy
from tests.conftest import wait_until
from tests.e2e.conftest import DEVICES, evaluate_until, everyone_on, post_feedback, put_everywhere


@pytest.fixture
def int8_rule():
    """Sixteen of the twenty agents run int8, four float32 (see the v3 canary below)."""
    return lambda n: n % 5 != 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    # Desired states go out through chunked Celery tasks, on a real worker.
    pytest.mark.usefixtures("broker_settings", "celery_worker_process"),
]
SOAK_SECONDS = 1
STAGE_TIMEOUT = 30


def test_v2_promotes_through_its_stages_and_v3_is_rolled_back_by_the_accuracy_gate(
    control_plane, agents, digits
):
    artifacts = control_plane["artifacts"]
    devices = list(Device.objects.filter(device_id__startswith="e2e-").order_by("device_id"))
    assert len(devices) == DEVICES and all(d.status == DeviceStatus.ACTIVE for d in devices)

    # v1 everywhere, the variant by the rule.
    put_everywhere(agents, control_plane, "1.0.0")

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
    # The gate compares each variant's candidates with incumbents of the same variant and
    # wants four devices on each side: a 50 % canary of these 20 devices (16 int8, 4
    # float32) always holds at least six int8 devices and leaves at least six behind.
    canary = RolloutPolicy.objects.create(
        name="canary",
        stages=[{"kind": "percent", "value": 50, "soak_seconds": 0}, {"kind": "percent", "value": 100}],
        gates={"accuracy": {"min_samples": 150, "min_devices": 4, "max_drop_pp": 2.0, "confidence": 0.95}},
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
    assert len(canaries) == 10
    by_id = {agent.config.device_id: agent for agent in agents}
    wait_until(
        lambda: all(by_id[d].models.live()["digits"].version == "3.0.0" for d in canaries),
        timeout=60,
        message="v3 on the canaries",
    )
    for agent in agents:
        post_feedback(agent, digits, 100)
    evaluate_until(v3, {RolloutState.ROLLED_BACK, RolloutState.PAUSED, RolloutState.COMPLETED}, timeout=60)
    assert v3.state == RolloutState.ROLLED_BACK, v3.last_decision
    accuracy = (
        GateEvaluation.objects.filter(rollout=v3, metric="accuracy", verdict="fail")
        .order_by("-evaluated_at")
        .first()
    )
    assert accuracy.decision == "rollback"
    # The devices whose windows had arrived at the deciding look: at least the gate's floor.
    assert accuracy.variant == "int8" and accuracy.candidate_devices >= 4 and accuracy.incumbent_devices >= 4
    assert accuracy.candidate_n >= 150 and accuracy.incumbent_n >= 150
    assert accuracy.candidate_value < accuracy.incumbent_value - 0.1
    assert accuracy.p_value is None or accuracy.p_value < 0.05
    assert v3.last_decision.startswith("Rolled back at stage 1 by the accuracy gate")
    wait_until(
        lambda: all(by_id[d].models.live()["digits"].version == "2.0.0" for d in canaries),
        timeout=60,
        message="the canaries back on v2",
    )
    assert everyone_on(agents, "2.0.0")

    # The control room says so (issue 10): 3.0.0, released, now prompts to be deprecated with
    # the gate's sentence, and a canary's page charts the health its agent really reported.
    version = registry.version_set_status(
        version=artifacts[("3.0.0", "int8")].version, status=VersionStatus.RELEASED
    )
    ops = Client()
    ops.force_login(user_ensure(username="olive", role=Role.OPERATOR))
    page = ops.get(f"/admin/registry/modelversion/{version.pk}/change/").content.decode()
    assert 'id="deprecate-button"' in page and "by the accuracy gate" in page
    canary = Device.objects.get(device_id=sorted(canaries)[0])
    page = ops.get(f"/admin/devices/device/{canary.pk}/change/").content.decode()
    series = json.loads(re.search(r'id="health-data" type="application/json">(.*?)</script>', page).group(1))
    points = {line["key"]: line["points"] for line in series["series"]}
    assert any(value for value in points["rss_mb"]) and any(value for value in points["inferences"])
    assert f'<tr data-rollout="{v3.pk}">' in page and f'<tr data-rollout="{v2.pk}">' in page


def test_an_artifact_that_fails_its_golden_check_on_devices_pauses_at_stage_one(control_plane, agents):
    """The server measured this artifact at 97.5 % (as if its runtime differed from the
    devices'); on the devices the same bytes score 71 %, so every canary refuses it with
    golden_failed, and the install-failure gate pauses the rollout at its first stage."""
    artifacts = control_plane["artifacts"]
    devices = list(Device.objects.filter(device_id__startswith="e2e-"))
    put_everywhere(agents, control_plane, "1.0.0")
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
