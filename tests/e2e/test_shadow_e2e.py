"""The shadow stage with real agents: a candidate runs beside the live model on real
requests, the agents report how often it agrees, and the agreement gate stops a bad
candidate before a single request is answered by it."""

from __future__ import annotations

import pytest

from fleet.devices.models import Device, TelemetryWindow
from fleet.rollouts import services as rollouts
from fleet.rollouts.choices import AssignmentState, RolloutState
from fleet.rollouts.models import GateEvaluation, RolloutPolicy
from tests.conftest import wait_until
from tests.e2e.conftest import DEVICES, evaluate_until, everyone_on, post_feedback, put_everywhere

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("broker_settings", "celery_worker_process"),
]
FINISHED = {RolloutState.ROLLED_BACK, RolloutState.PAUSED, RolloutState.COMPLETED}


def shadow_rollout(control_plane, enrollment, version: str):
    policy = RolloutPolicy.objects.create(
        name=f"shadow-{version}",
        stages=[
            {"kind": "percent", "value": 50, "mode": "shadow", "sample_rate": 1.0},
            {"kind": "percent", "value": 100},
        ],
        gates={
            "max_install_failure_rate": 0.2,
            "shadow": {
                "min_agreement": 0.9,
                "min_samples": 100,
                "min_devices": 3,
                "max_latency_p95_ratio": None,
            },
        },
        on_failure="rollback",
    )
    return rollouts.rollout_start(
        rollout=rollouts.rollout_create(
            model=control_plane["model"],
            version=control_plane["model"].versions.get(version=version),
            targets={"tags": [enrollment["tag"]]},
            policy=policy,
        )
    )


def test_a_candidate_that_disagrees_is_stopped_in_shadow_before_it_serves_anyone(
    control_plane, agents, enrollment, digits
):
    put_everywhere(agents, control_plane, "1.0.0")
    rollout = shadow_rollout(control_plane, enrollment, "4.0.0")
    shadows = set(rollout.assignments.filter(stage=0).values_list("device__device_id", flat=True))
    assert len(shadows) == DEVICES // 2

    def all_shadowing() -> bool:
        rollouts.rollout_evaluate(rollout_id=rollout.pk)
        return rollout.assignments.filter(state=AssignmentState.SHADOW).count() == len(shadows)

    wait_until(all_shadowing, timeout=60, interval=0.2, message="the candidate running in shadow")
    for agent in agents:
        post_feedback(agent, digits, 60)
    evaluate_until(rollout, FINISHED, timeout=60)
    assert rollout.state == RolloutState.ROLLED_BACK, rollout.last_decision
    assert rollout.last_decision.startswith("Rolled back at stage 1 by the shadow agreement gate")
    agreement = GateEvaluation.objects.filter(
        rollout=rollout, metric="shadow_agreement", verdict="fail"
    ).first()
    assert agreement.candidate_devices >= 3 and agreement.candidate_value < 0.9
    # It really ran: the agents compared it on real requests …
    compared = TelemetryWindow.objects.filter(shadow_version="4.0.0", shadow_compared__gt=0)
    assert set(compared.values_list("device__device_id", flat=True)) <= shadows
    assert compared.count() >= 3
    # … and never answered one: no window names it as the live version, every agent serves
    # 1.0.0, and the shadow is gone from what devices report.
    assert not TelemetryWindow.objects.filter(version="4.0.0").exists()
    assert everyone_on(agents, "1.0.0")
    wait_until(
        lambda: (
            not Device.objects.filter(device_id__in=shadows, reported_models__digits__has_key="shadow")
            .exclude(reported_models__digits__shadow=None)
            .exists()
        ),
        timeout=30,
        message="the shadows unloaded",
    )
