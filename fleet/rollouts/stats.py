"""Gate statistics for rollouts (rollouts issue, point 6; docs/rollouts.md, "Gates").

The accuracy gate compares the candidate's labeled feedback with the incumbent's as two
proportions. It decides only when the evidence is strong enough either way:

* **fail** when, at the configured one-sided confidence, the candidate's accuracy is more
  than ``max_drop_pp`` points below the incumbent's (H0: drop <= margin, rejected);
* **pass** when, at the same confidence, the drop is less than the margin
  (non-inferiority: H0: drop >= margin, rejected);
* **wait** otherwise, and whenever an arm has fewer than ``min_samples`` labels.

Both are one-sided two-proportion z-tests on Agresti-Caffo adjusted proportions (one
success and one failure added to each arm), which keeps the standard error sane when an
arm is at 0 % or 100 % and holds its nominal level at the sample sizes rollouts see. The
sample-size floor is what stops a pass on twenty lucky samples; the confidence is what
stops a failure on noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

PASS, FAIL, WAIT = "pass", "fail", "wait"


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


@dataclass(frozen=True)
class Evaluation:
    metric: str
    verdict: str  # pass | fail | wait
    candidate: float | None
    incumbent: float | None
    candidate_n: int
    incumbent_n: int
    threshold: float
    p_value: float | None = None
    bound: float | None = None  # one-sided confidence bound of the difference, where it applies
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def accuracy_gate(
    *,
    candidate_labeled: int,
    candidate_correct: int,
    incumbent_labeled: int,
    incumbent_correct: int,
    max_drop_pp: float,
    confidence: float,
    min_samples: int,
) -> Evaluation:
    n1, n2 = candidate_labeled, incumbent_labeled
    observed_candidate = candidate_correct / n1 if n1 else None
    observed_incumbent = incumbent_correct / n2 if n2 else None
    common = {
        "metric": "accuracy",
        "candidate": observed_candidate,
        "incumbent": observed_incumbent,
        "candidate_n": n1,
        "incumbent_n": n2,
        "threshold": max_drop_pp,
    }
    if n1 < min_samples or n2 < min_samples:
        return Evaluation(verdict=WAIT, note=f"needs {min_samples} labeled samples per arm", **common)
    # Agresti-Caffo: add one success and one failure to each arm.
    p1 = (candidate_correct + 1) / (n1 + 2)
    p2 = (incumbent_correct + 1) / (n2 + 2)
    se = math.sqrt(p1 * (1 - p1) / (n1 + 2) + p2 * (1 - p2) / (n2 + 2))
    drop = p2 - p1
    margin = max_drop_pp / 100
    alpha = 1 - confidence
    z_quantile = _normal_quantile(confidence)
    p_worse = normal_sf((drop - margin) / se)  # small: confident the drop exceeds the margin
    p_not_worse = normal_sf((margin - drop) / se)  # small: confident the drop is within it
    if p_worse < alpha:
        return Evaluation(verdict=FAIL, p_value=p_worse, bound=drop - z_quantile * se, **common)
    if p_not_worse < alpha:
        return Evaluation(verdict=PASS, p_value=p_not_worse, bound=drop + z_quantile * se, **common)
    return Evaluation(
        verdict=WAIT, p_value=min(p_worse, p_not_worse), note="not significant either way", **common
    )


def rate_gate(*, metric: str, failures: int, total: int, max_rate: float, min_total: int = 1) -> Evaluation:
    """A ceiling on a rate (install failures, inference errors)."""
    rate = failures / total if total else None
    common = {
        "metric": metric,
        "candidate": rate,
        "incumbent": None,
        "candidate_n": total,
        "incumbent_n": 0,
        "threshold": max_rate,
    }
    if total < min_total:
        return Evaluation(verdict=WAIT, note=f"needs {min_total} observations", **common)
    return Evaluation(verdict=FAIL if rate > max_rate else PASS, **common)


def latency_gate(
    *,
    candidate_p95_ms: float | None,
    incumbent_p95_ms: float | None,
    candidate_n: int,
    incumbent_n: int,
    max_ratio: float,
    min_inferences: int,
) -> Evaluation:
    """The candidate's p95 latency against the incumbent's, as a ratio."""
    ratio = candidate_p95_ms / incumbent_p95_ms if candidate_p95_ms and incumbent_p95_ms else None
    common = {
        "metric": "latency_p95_ratio",
        "candidate": candidate_p95_ms,
        "incumbent": incumbent_p95_ms,
        "candidate_n": candidate_n,
        "incumbent_n": incumbent_n,
        "threshold": max_ratio,
        "bound": ratio,
    }
    if ratio is None or candidate_n < min_inferences or incumbent_n < min_inferences:
        return Evaluation(verdict=WAIT, note=f"needs {min_inferences} inferences per arm", **common)
    return Evaluation(verdict=FAIL if ratio > max_ratio else PASS, **common)


def _normal_quantile(p: float) -> float:
    """Inverse of the standard normal CDF (Acklam's rational approximation, |error| < 1e-9
    after one Newton step), so the gate needs no SciPy on the control plane."""
    if not 0 < p < 1:
        raise ValueError("p must be in (0, 1)")
    a = (
        -3.969683028665376e01,
        2.209460984245205e02,
        -2.759285104469687e02,
        1.383577518672690e02,
        -3.066479806614716e01,
        2.506628277459239e00,
    )
    b = (
        -5.447609879822406e01,
        1.615858368580409e02,
        -1.556989798598866e02,
        6.680131188771972e01,
        -1.328068155288572e01,
    )
    c = (
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e00,
        -2.549732539343734e00,
        4.374664141464968e00,
        2.938163982698783e00,
    )
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    low = 0.02425
    if p < low:
        q = math.sqrt(-2 * math.log(p))
        x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
        )
    elif p <= 1 - low:
        q = p - 0.5
        r = q * q
        x = (
            (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5])
            * q
            / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
        )
    else:
        q = math.sqrt(-2 * math.log(1 - p))
        x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
        )
    # One Newton step on the CDF sharpens it.
    error = 0.5 * math.erfc(-x / math.sqrt(2)) - p
    return x - error * math.sqrt(2 * math.pi) * math.exp(x * x / 2)
