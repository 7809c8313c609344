"""Gate statistics (issue 8, section 2): the device is the unit, no single device decides, and
the confidence sequences are the documented ones. Every forging test has a positive control:
the same forged data moves the old pooled gate (or the honest data alone gives the verdict),
so a gate that ignored its input could not pass it. The error rates under continuous
monitoring are checked by simulation in test_gate_simulation.py."""

import json
import math
from statistics import NormalDist

import numpy as np
import pytest

from fleet.rollouts import stats
from fleet.rollouts.cohort import cohort_key, stage_size
from fleet.rollouts.simulation import naive_accuracy_gate
from fleet.rollouts.stats import (
    FAIL,
    PASS,
    WAIT,
    DeviceCounts,
    DeviceLatency,
    accuracy_gate,
    agreement_gate,
    install_gate,
    latency_gate,
    rate_ceiling_gate,
)

ACCURACY = {"max_drop_pp": 2.0, "alpha": 0.05, "min_samples": 100, "min_devices": 5}
RATE = {"alpha": 0.05, "min_total": 100, "min_devices": 5}


def arm(prefix: str, devices: int, n: int, accuracy: float) -> list[DeviceCounts]:
    return [DeviceCounts(f"{prefix}-{i}", n, round(n * accuracy)) for i in range(devices)]


def noisy_arm(prefix: str, devices: int, accuracy: float, rng: np.random.Generator) -> list[DeviceCounts]:
    """Devices of one version: their own accuracy around the mean, their own label count."""
    result = []
    for i in range(devices):
        n = int(rng.integers(20, 200))
        p = rng.beta(accuracy * 100, (1 - accuracy) * 100)
        result.append(DeviceCounts(f"{prefix}-{i}", n, int(rng.binomial(n, p))))
    return result


def pooled(devices: list[DeviceCounts]) -> tuple[int, int]:
    return sum(d.n for d in devices), sum(d.k for d in devices)


def naive(candidate: list[DeviceCounts], incumbent: list[DeviceCounts]) -> str:
    """The pre-issue-8 gate on the same data, pooled: the positive control of the attacks."""
    (n1, k1), (n2, k2) = pooled(candidate), pooled(incumbent)
    return naive_accuracy_gate(
        candidate_labeled=n1,
        candidate_correct=k1,
        incumbent_labeled=n2,
        incumbent_correct=k2,
        max_drop_pp=2.0,
        confidence=0.95,
        min_samples=100,
    ).verdict


# --- accuracy: thin evidence, clear cases


def test_thin_evidence_waits_and_names_what_is_missing():
    result = accuracy_gate(candidate=arm("c", 3, 20, 1.0), incumbent=arm("i", 10, 20, 0.5), **ACCURACY)
    assert result.verdict == WAIT
    assert "candidate has 60 of 100 labels" in result.note
    assert "candidate has 3 of 5 devices" in result.note
    assert "incumbent" not in result.note  # 200 labels from 10 devices: nothing missing there
    assert result.summary.startswith("accuracy: waiting, needs more evidence")


def test_devices_without_labels_do_not_count_as_devices():
    candidate = arm("c", 4, 50, 0.97) + [DeviceCounts(f"idle-{i}", 0, 0) for i in range(10)]
    result = accuracy_gate(candidate=candidate, incumbent=arm("i", 10, 50, 0.97), **ACCURACY)
    assert result.verdict == WAIT
    assert result.candidate_devices == 4
    assert "candidate has 4 of 5 devices" in result.note


def test_a_much_worse_candidate_fails_with_an_explanation():
    # 72 % on 12 devices against 97.5 % on 40: the sample models' figures.
    candidate = arm("c", 12, 20, 0.72)
    incumbent = arm("i", 40, 51, 0.975)
    result = accuracy_gate(candidate=candidate, incumbent=incumbent, variant="int8", **ACCURACY)
    assert result.verdict == FAIL
    assert result.lower > 2.0  # the whole sequence is above the margin, in points
    assert result.p_value < 1e-6
    assert (result.candidate_devices, result.incumbent_devices) == (12, 40)
    assert result.variant == "int8"
    assert result.summary == (
        "accuracy (int8): 70.0 % (12 devices, n = 240) vs 98.0 % (40 devices, n = 2,040), "
        f"drop 28.0 pp (95 % CS {result.lower:.1f} to {result.upper:.1f} pp, one device set aside each way) "
        "> 2.0 pp allowed"
    )
    assert ". " not in result.summary and not result.summary.endswith(".")  # one sentence


def test_an_equal_candidate_passes_once_the_evidence_is_in_and_not_before():
    early = accuracy_gate(candidate=arm("c", 10, 20, 0.95), incumbent=arm("i", 10, 20, 0.95), **ACCURACY)
    assert early.verdict == WAIT  # 200 labels per arm cannot show a drop under 2 points
    late = accuracy_gate(candidate=arm("c", 10, 500, 0.95), incumbent=arm("i", 10, 500, 0.95), **ACCURACY)
    assert late.verdict == PASS
    assert late.upper < 2.0 and late.p_value <= 0.05


def test_a_candidate_right_at_the_margin_waits():
    result = accuracy_gate(candidate=arm("c", 20, 200, 0.93), incumbent=arm("i", 20, 200, 0.95), **ACCURACY)
    assert result.verdict == WAIT
    assert result.lower < 2.0 < result.upper
    assert "waiting" in result.summary


def test_device_heterogeneity_widens_the_interval():
    """Same pooled counts, but devices that disagree: the clustered variance must see it."""
    same = arm("c", 10, 100, 0.9)
    spread = [DeviceCounts(f"c-{i}", 100, 80 if i % 2 else 100) for i in range(10)]
    assert pooled(same) == pooled(spread)
    incumbent = arm("i", 10, 100, 0.9)
    narrow = accuracy_gate(candidate=same, incumbent=incumbent, **ACCURACY)
    wide = accuracy_gate(candidate=spread, incumbent=incumbent, **ACCURACY)
    assert wide.upper - wide.lower > 1.5 * (narrow.upper - narrow.lower)


def test_alpha_divided_among_variants_widens_the_interval():
    kwargs = {**ACCURACY, "candidate": arm("c", 10, 300, 0.94), "incumbent": arm("i", 10, 300, 0.95)}
    one = accuracy_gate(**kwargs)
    bonferroni = accuracy_gate(**{**kwargs, "alpha": 0.025})
    assert bonferroni.upper - bonferroni.lower > one.upper - one.lower
    assert "97.5 % CS" in bonferroni.summary


# --- accuracy: one device cannot flip it, in either direction


def test_one_device_claiming_a_million_perfect_labels_cannot_save_a_bad_candidate():
    honest = arm("c", 10, 20, 0.72)
    forged = [*honest, DeviceCounts("stolen", 1_000_000, 1_000_000)]
    incumbent = arm("i", 10, 51, 0.975)
    # Controls: the honest devices alone fail it, and the forged device fools the pooled gate.
    assert accuracy_gate(candidate=honest, incumbent=incumbent, **ACCURACY).verdict == FAIL
    assert naive(forged, incumbent) == PASS
    result = accuracy_gate(candidate=forged, incumbent=incumbent, **ACCURACY)
    assert result.verdict == FAIL
    assert result.inputs["candidate"]["capped_devices"] == ["stolen"]
    assert result.inputs["candidate"]["n"] == 1_000_200  # the raw claim is kept for the record
    assert "1 capped at 40" in result.summary


def test_one_device_claiming_zero_accuracy_cannot_fail_a_good_candidate():
    honest = arm("c", 10, 300, 0.975)
    forged = [*honest, DeviceCounts("stolen", 1_000_000, 0)]
    incumbent = arm("i", 10, 300, 0.975)
    assert accuracy_gate(candidate=honest, incumbent=incumbent, **ACCURACY).verdict == PASS
    assert naive(forged, incumbent) == FAIL
    result = accuracy_gate(candidate=forged, incumbent=incumbent, **ACCURACY)
    assert result.verdict == PASS  # neither failed nor held: the forger is set aside
    assert result.note.startswith("all devices together would wait; decided without stolen and ")


def test_one_forged_incumbent_device_cannot_fail_a_good_candidate():
    candidate = arm("c", 10, 300, 0.95)
    honest = arm("i", 10, 300, 0.95)
    forged = [*honest, DeviceCounts("stolen", 10**6, 10**6)]  # a perfect incumbent makes a gap
    assert accuracy_gate(candidate=candidate, incumbent=honest, **ACCURACY).verdict == PASS
    assert naive(candidate, forged) == FAIL
    assert accuracy_gate(candidate=candidate, incumbent=forged, **ACCURACY).verdict != FAIL


@pytest.mark.parametrize("where", ["candidate", "incumbent"])
def test_one_forged_device_cannot_pass_a_bad_candidate(where):
    candidate, incumbent = arm("c", 10, 300, 0.90), arm("i", 10, 300, 0.95)  # a 5-point drop
    if where == "candidate":
        candidate = [*candidate, DeviceCounts("stolen", 10**6, 10**6)]
    else:
        incumbent = [*incumbent, DeviceCounts("stolen", 10**6, 0)]
    assert naive(candidate, incumbent) == PASS
    assert accuracy_gate(candidate=candidate, incumbent=incumbent, **ACCURACY).verdict != PASS


@pytest.mark.parametrize("seed", range(8))
def test_every_verdict_survives_removing_any_single_device(seed):
    rng = np.random.default_rng(seed)
    drop = [0.0, 0.5, 3.0, 8.0][seed % 4] / 100
    candidate = noisy_arm("c", 12, 0.95 - drop, rng)
    incumbent = noisy_arm("i", 12, 0.95, rng)
    result = accuracy_gate(candidate=candidate, incumbent=incumbent, **ACCURACY)
    for i in range(12):
        without_c = accuracy_gate(
            candidate=candidate[:i] + candidate[i + 1 :], incumbent=incumbent, **ACCURACY
        )
        without_i = accuracy_gate(
            candidate=candidate, incumbent=incumbent[:i] + incumbent[i + 1 :], **ACCURACY
        )
        # Each reduced set's interval lies inside the reported (union) interval, so a fail or
        # a pass is also the verdict of every reduced set.
        for reduced in (without_c, without_i):
            if result.verdict != WAIT:
                assert reduced.verdict == result.verdict
    assert result.lower <= result.upper


def test_counts_that_break_the_window_invariant_are_clamped():
    forged = [*arm("c", 10, 100, 0.9), DeviceCounts("stolen", 100, 10**9)]
    result = accuracy_gate(candidate=forged, incumbent=arm("i", 10, 100, 0.9), **ACCURACY)
    assert result.candidate <= 1.0
    assert result.inputs["candidate"]["k"] == 10 * 90 + 100


# --- the confidence sequence itself


def test_the_radius_is_the_normal_mixture_formula():
    v, tau, alpha = 1e-4, 0.05, 0.05
    expected = math.sqrt(v * (v + tau**2) / tau**2 * (2 * math.log(1 / alpha) + math.log(1 + tau**2 / v)))
    assert stats.cs_radius(variance=v, alpha=alpha, tau=tau) == pytest.approx(expected)
    # The always-valid p-value crosses alpha exactly where the sequence excludes the null.
    assert float(stats.always_valid_p(distance=expected, variance=v, tau=tau)) == pytest.approx(alpha)
    assert float(stats.always_valid_p(distance=0.0, variance=v, tau=tau)) == 1.0


def test_the_sequence_is_wider_than_a_single_look_interval():
    z = stats.fixed_sample_quantile(0.975)
    for sd in (0.001, 0.01, 0.05):
        assert stats.cs_radius(variance=sd**2, alpha=0.05, tau=0.05) > 1.4 * z * sd


def test_the_quantile_is_the_standard_library_one():
    assert not hasattr(stats, "_normal_quantile")
    assert stats.fixed_sample_quantile(0.95) == NormalDist().inv_cdf(0.95)


def test_inputs_are_json_and_bounded_for_a_large_fleet():
    rng = np.random.default_rng(3)
    big = accuracy_gate(
        candidate=noisy_arm("c", 5000, 0.95, rng),
        incumbent=noisy_arm("i", 5000, 0.95, rng),
        looks=42,
        **ACCURACY,
    )
    encoded = json.dumps(big.as_dict())
    assert len(encoded) < 20_000
    assert big.inputs["looks"] == 42 and big.inputs["candidate"]["devices"] == 5000
    assert "5,000 devices" in big.summary
    small = accuracy_gate(candidate=arm("c", 5, 40, 0.9), incumbent=arm("i", 5, 40, 0.9), **ACCURACY)
    assert small.inputs["candidate"]["per_device"]["c-0"] == [40, 36]  # enough to recompute
    json.dumps(small.as_dict())


# --- error rate and shadow agreement: one arm against a threshold


def test_an_error_rate_gate_passes_fails_and_waits():
    low = rate_ceiling_gate(metric="error_rate", devices=arm("d", 10, 2000, 0.001), max_rate=0.01, **RATE)
    high = rate_ceiling_gate(metric="error_rate", devices=arm("d", 10, 2000, 0.05), max_rate=0.01, **RATE)
    thin = rate_ceiling_gate(metric="error_rate", devices=arm("d", 3, 20, 0.0), max_rate=0.01, **RATE)
    assert (low.verdict, high.verdict, thin.verdict) == (PASS, FAIL, WAIT)
    assert high.lower > 0.01 and low.upper <= 0.01
    assert "candidate has 60 of 100 inferences" in thin.note and "3 of 5 devices" in thin.note
    assert high.summary.startswith(
        "error rate: 5.00 % (10 devices, n = 20,000 inferences; one device set aside each way), 95 % CS"
    )
    assert high.summary.endswith("above 1.00 % allowed")


def test_zero_errors_on_few_inferences_does_not_pass():
    result = rate_ceiling_gate(metric="error_rate", devices=arm("d", 5, 30, 0.0), max_rate=0.01, **RATE)
    assert result.verdict == WAIT  # 150 clean inferences cannot show a rate under 1 %


def test_one_device_claiming_huge_error_counts_cannot_fail_a_good_candidate():
    honest = arm("d", 10, 2000, 0.001)
    forged = [*honest, DeviceCounts("stolen", 10**9, 10**9)]
    assert rate_ceiling_gate(metric="error_rate", devices=honest, max_rate=0.01, **RATE).verdict == PASS
    assert sum(d.k for d in forged) / sum(d.n for d in forged) > 0.01  # what pooling would say
    result = rate_ceiling_gate(metric="error_rate", devices=forged, max_rate=0.01, **RATE)
    assert result.verdict == PASS
    assert "decided without stolen and " in result.note


def test_one_device_claiming_a_billion_clean_inferences_cannot_pass_a_bad_candidate():
    honest = arm("d", 10, 1000, 0.05)
    forged = [*honest, DeviceCounts("stolen", 10**9, 0)]
    assert sum(d.k for d in forged) / sum(d.n for d in forged) < 0.01  # what pooling would say
    assert rate_ceiling_gate(metric="error_rate", devices=forged, max_rate=0.01, **RATE).verdict == FAIL


def test_an_agreement_gate_passes_fails_and_resists_one_device():
    common = {"alpha": 0.05, "min_samples": 100, "min_devices": 5, "min_agreement": 0.95}
    good, bad = arm("d", 10, 200, 0.99), arm("d", 10, 200, 0.80)
    assert agreement_gate(devices=good, **common).verdict == PASS
    result = agreement_gate(devices=bad, **common)
    assert result.verdict == FAIL and result.metric == "shadow_agreement"
    assert result.summary.endswith("below 95.0 % required")
    # A stolen login claiming total disagreement neither fails nor holds a good candidate;
    # one claiming total agreement cannot pass a bad one.
    assert agreement_gate(devices=[*good, DeviceCounts("stolen", 10**6, 0)], **common).verdict == PASS
    assert agreement_gate(devices=[*bad, DeviceCounts("stolen", 10**6, 10**6)], **common).verdict != PASS
    assert agreement_gate(devices=arm("d", 2, 30, 1.0), **common).verdict == WAIT


# --- install failures: devices, one device is one trial


def test_install_failures_pass_and_fail_on_devices():
    installed = [f"d{i}" for i in range(20)]
    ok = install_gate(failed=["bad-0"], installed=installed, max_rate=0.1)
    bad = install_gate(failed=[f"bad-{i}" for i in range(4)], installed=installed, max_rate=0.1)
    assert (ok.verdict, bad.verdict) == (PASS, FAIL)
    assert (ok.candidate_n, bad.candidate_n) == (21, 24)
    assert bad.summary.startswith("install failures: 4 of 24 finished devices (16.7 %; 13.6 % without one")


def test_one_false_install_failure_cannot_roll_back():
    installed = [f"d{i}" for i in range(10)]
    result = install_gate(failed=["stolen"], installed=installed, max_rate=0.05)
    assert 1 / 11 > 0.05  # the plain rate is over the limit...
    assert result.verdict == PASS  # ...but only because of one device, which is set aside
    # Control: two failed devices are not one device's word.
    assert install_gate(failed=["a", "b"], installed=installed, max_rate=0.05).verdict == FAIL


def test_install_gate_waits_on_one_lone_failure_and_counts_each_device_once():
    assert install_gate(failed=[], installed=[], max_rate=0.5).verdict == WAIT
    assert install_gate(failed=[], installed=["d0"], max_rate=0.0).verdict == PASS  # no failure at all
    # One or two devices: too few to set one aside, their word is all there is.
    assert install_gate(failed=["d0"], installed=[], max_rate=0.5).verdict == FAIL
    assert install_gate(failed=["d0"], installed=["d1"], max_rate=0.4).verdict == FAIL
    # Devices still installing bound the verdict: no early failure on the first finishers …
    early = install_gate(failed=["stolen", "glitch"], installed=["d0"], max_rate=0.1, installing=97)
    assert early.verdict == WAIT and "97 device(s) still installing" in early.note
    # … but an early one when the stage cannot end within the limit.
    many = [f"f{i}" for i in range(30)]
    assert install_gate(failed=many, installed=["d0"], max_rate=0.1, installing=69).verdict == FAIL
    result = install_gate(failed=["d1", "d1"], installed=["d0", "d1", "d2", "d3"], max_rate=0.5)
    assert result.inputs["failed_count"] == 1 and result.inputs["finished_count"] == 4


# --- latency: median of per-device p95


def latencies(prefix: str, devices: int, p95_ms: float, inferences: int = 1000) -> list[DeviceLatency]:
    return [DeviceLatency(f"{prefix}-{i}", p95_ms, inferences) for i in range(devices)]


LATENCY = {"max_ratio": 1.5, "min_inferences": 100, "min_devices": 3}


def test_latency_passes_and_fails_on_the_median_ratio():
    assert (
        latency_gate(candidate=latencies("c", 5, 1.2), incumbent=latencies("i", 5, 1.0), **LATENCY).verdict
        == PASS
    )
    slow = latency_gate(candidate=latencies("c", 5, 2.0), incumbent=latencies("i", 5, 1.0), **LATENCY)
    assert slow.verdict == FAIL
    assert slow.summary.startswith("latency p95 ratio: median p95 2.00 ms (5 devices) vs 1.00 ms (5 devices)")


def test_one_absurd_device_cannot_fail_or_pass_latency():
    fast, incumbent = latencies("c", 6, 1.0), latencies("i", 6, 1.0)
    forged = [*fast, DeviceLatency("stolen", 1e6, 10**6)]
    mean_ratio = sum(d.p95_ms for d in forged) / len(forged) / 1.0
    assert mean_ratio > 1.5  # an average would fail it
    assert latency_gate(candidate=forged, incumbent=incumbent, **LATENCY).verdict == PASS
    slow = [*latencies("c", 6, 3.0), DeviceLatency("stolen", 0.001, 10**6)]
    assert latency_gate(candidate=slow, incumbent=incumbent, **LATENCY).verdict == FAIL


def test_latency_ignores_devices_with_few_inferences_and_waits_for_devices():
    candidate = [*latencies("c", 2, 1.0), *latencies("few", 5, 9.0, inferences=10)]
    result = latency_gate(
        candidate=candidate, incumbent=latencies("i", 5, 1.0), metric="shadow_latency_p95_ratio", **LATENCY
    )
    assert result.verdict == WAIT
    assert result.metric == "shadow_latency_p95_ratio"
    assert "has 2 candidate and 5 incumbent" in result.note


# --- cohorts and variants (fleet/rollouts/cohort.py)


def test_cohort_order_is_stable_and_differs_between_rollouts():
    devices = [f"cam-{n}" for n in range(50)]
    first = sorted(devices, key=lambda d: cohort_key(1, d))
    assert first == sorted(devices, key=lambda d: cohort_key(1, d))
    assert first != sorted(devices, key=lambda d: cohort_key(2, d))


@pytest.mark.parametrize(
    ("kind", "value", "min_devices", "eligible", "size"),
    [
        ("percent", 10, 1, 20, 2),
        ("percent", 50, 1, 20, 10),
        ("percent", 100, 1, 20, 20),
        ("percent", 1, 3, 20, 3),
        ("count", 5, 1, 20, 5),
        ("count", 50, 1, 20, 20),
        ("percent", 10, 1, 0, 0),
    ],
)
def test_stage_sizes(kind, value, min_devices, eligible, size):
    assert stage_size(kind=kind, value=value, min_devices=min_devices, eligible=eligible) == size
