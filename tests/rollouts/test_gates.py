"""Gate statistics: they wait on thin evidence, fail a clearly worse candidate, pass an
equal one, and hold their error rates (checked by simulation with a fixed seed)."""

import numpy as np
import pytest
from scipy.stats import norm

from fleet.rollouts.cohort import choose_variant, cohort_key, stage_size
from fleet.rollouts.stats import FAIL, PASS, WAIT, _normal_quantile, accuracy_gate, latency_gate, rate_gate

GATE = {"max_drop_pp": 2.0, "confidence": 0.95, "min_samples": 100}


def gate(candidate, incumbent):
    (n1, k1), (n2, k2) = candidate, incumbent
    return accuracy_gate(
        candidate_labeled=n1, candidate_correct=k1, incumbent_labeled=n2, incumbent_correct=k2, **GATE
    )


def test_twenty_perfect_samples_do_not_pass():
    assert gate((20, 20), (20, 10)).verdict == WAIT


def test_a_much_worse_candidate_fails_with_significance():
    result = gate((200, 142), (200, 195))  # 71 % against 97.5 %, the sample models' figures
    assert result.verdict == FAIL
    assert result.p_value < 1e-6
    assert result.bound > 0.02  # the drop's lower confidence bound clears the margin


def test_an_equal_candidate_passes_once_the_evidence_is_in():
    assert gate((150, 146), (150, 146)).verdict == WAIT  # not yet sure it is within 2 points
    assert gate((1000, 975), (1000, 975)).verdict == PASS


def test_a_candidate_right_at_the_margin_waits():
    assert gate((300, 282), (300, 288)).verdict == WAIT  # a 2-point drop: neither side provable


def test_the_quantile_matches_scipy():
    for p in (0.001, 0.05, 0.5, 0.9, 0.95, 0.975, 0.99, 0.999):
        assert _normal_quantile(p) == pytest.approx(norm.ppf(p), abs=1e-9)


@pytest.mark.parametrize("n", [200, 1000])
def test_an_equal_candidate_is_almost_never_failed(n):
    """Type I error of the fail side: no true drop, 2,000 simulated canaries."""
    rng = np.random.default_rng(7)
    fails = sum(
        gate((n, rng.binomial(n, 0.95)), (n, rng.binomial(n, 0.95))).verdict == FAIL for _ in range(2000)
    )
    assert fails / 2000 <= 0.05


@pytest.mark.parametrize("n", [200, 1000])
def test_a_candidate_at_the_margin_is_rarely_passed(n):
    """Type I error of the pass side: a true 2-point drop must pass at most ~5 % of the time."""
    rng = np.random.default_rng(11)
    passes = sum(
        gate((n, rng.binomial(n, 0.93)), (n, rng.binomial(n, 0.95))).verdict == PASS for _ in range(2000)
    )
    assert passes / 2000 <= 0.06


def test_rate_and_latency_gates():
    assert rate_gate(metric="install_failure_rate", failures=1, total=10, max_rate=0.2).verdict == PASS
    assert rate_gate(metric="install_failure_rate", failures=3, total=10, max_rate=0.2).verdict == FAIL
    assert rate_gate(metric="error_rate", failures=0, total=0, max_rate=0.01, min_total=100).verdict == WAIT
    common = {"candidate_n": 5000, "incumbent_n": 5000, "max_ratio": 1.5, "min_inferences": 1000}
    assert latency_gate(candidate_p95_ms=1.2, incumbent_p95_ms=1.0, **common).verdict == PASS
    assert latency_gate(candidate_p95_ms=2.0, incumbent_p95_ms=1.0, **common).verdict == FAIL
    assert latency_gate(candidate_p95_ms=2.0, incumbent_p95_ms=None, **common).verdict == WAIT


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


def test_the_variant_rule():
    assert choose_variant(supports_int8=True, hardware="any", available={"int8", "float32"})[0] == "int8"
    assert choose_variant(supports_int8=False, hardware="any", available={"int8", "float32"})[0] == "float32"
    assert choose_variant(supports_int8=True, hardware="any", available={"float32"})[0] == "float32"
    variant, reason = choose_variant(supports_int8=False, hardware="any", available={"int8"})
    assert variant is None and "no variant" in reason
