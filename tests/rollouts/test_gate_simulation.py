"""The accuracy gate's error rates under continuous monitoring, by simulation (issue 8,
section 2): a smaller run of bench/gate_simulation.py with the real gate every 5 s over a
20-minute stage of a clustered fleet (fleet/rollouts/simulation.py).

The naive gate run on the same simulated telemetry is the positive control: it is the
pre-issue-8 gate, and its false rollback rate must come out above alpha, which shows the
simulation can catch an invalid gate."""

import pytest

from fleet.rollouts.simulation import PROMOTE, ROLLBACK, Fleet, GatePolicy, run_many, wilson_interval

ALPHA = 0.05
# Sampling slack on the point estimate of a rate whose true value is at most alpha: with 150
# rollouts, one standard error at 5 % is 1.8 points.
TOLERANCE = 0.02


def rollback_interval(tally) -> tuple[float, float, float]:
    count, total = tally.count(ROLLBACK), len(tally.outcomes)
    return count / total, *wilson_interval(count, total)


@pytest.fixture(scope="module")
def aa_small_fleet():
    """150 A/A stages (candidate = incumbent) of 10 devices per arm, margin 0.5 pp."""
    return run_many(
        fleet=Fleet(devices_per_arm=10, drop_pp=0.0),
        policies={"gate": GatePolicy(max_drop_pp=0.5, alpha=ALPHA)},
        rollouts=150,
        seed=8,
    )


def test_the_gate_holds_alpha_in_a_a_under_continuous_monitoring(aa_small_fleet):
    rate, low, _high = rollback_interval(aa_small_fleet["gate"])
    assert low <= ALPHA
    assert rate <= ALPHA + TOLERANCE


def test_the_naive_gate_on_the_same_data_rolls_back_far_more_often_than_alpha(aa_small_fleet):
    rate, low, _high = rollback_interval(aa_small_fleet["naive:gate"])
    assert low > ALPHA, f"naive A/A false rollback rate {rate:.1%} is not above alpha: the control failed"


def test_the_gate_holds_alpha_at_the_boundary_null():
    """True drop exactly at the margin: the hardest case for the fail side."""
    tallies = run_many(
        fleet=Fleet(devices_per_arm=100, drop_pp=2.0, stage_s=600),
        policies={"gate": GatePolicy(max_drop_pp=2.0, alpha=ALPHA)},
        rollouts=60,
        seed=9,
        naive=False,
    )
    rate, low, _high = rollback_interval(tallies["gate"])
    assert low <= ALPHA
    assert rate <= ALPHA + 2 * TOLERANCE  # 60 stages: a wider slack


def test_a_real_drop_is_caught_and_an_equal_candidate_is_promoted():
    dropped = run_many(
        fleet=Fleet(devices_per_arm=100, drop_pp=5.0),
        policies={"gate": GatePolicy(max_drop_pp=0.5, alpha=ALPHA)},
        rollouts=20,
        seed=10,
        naive=False,
    )
    assert dropped["gate"].rate(ROLLBACK) >= 0.8
    assert dropped["gate"].median_minutes(ROLLBACK) < 10
    equal = run_many(
        fleet=Fleet(devices_per_arm=1000, drop_pp=0.0, stage_s=900),
        policies={"gate": GatePolicy(max_drop_pp=2.0, alpha=ALPHA)},
        rollouts=5,
        seed=11,
        naive=False,
    )
    assert equal["gate"].rate(PROMOTE) == 1.0  # promoted at the first look after the soak
