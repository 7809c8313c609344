"""Gate statistics for rollouts (issue 8, section 2; docs/rollouts.md, "Statistics").

Three decisions shape every gate here.

**The device is the unit.** Cohorts are randomised by device, and the labels, errors and
shadow comparisons of one device are correlated (its camera, its users, its lighting), so
the analysis is by device too. An arm's rate is the ratio of sums ``sum k / sum n`` over its
devices, and its variance is the cluster-robust (sandwich, delta-method) variance of that
ratio, ``m/(m-1) * sum (k_i - p n_i)^2 / (sum n)^2`` over the arm's ``m`` devices, never
less than the binomial variance of the pooled counts (so 100 %-perfect arms still have a
width). Before that, each device's ``n`` is capped at ``cap_multiple`` (2) times the arm's
median ``n`` with ``k`` scaled alike: a device claiming 10^6 labels weighs as much as two
typical ones, not as much as the rest of the fleet. The cap costs little: when devices
differ (sd ``s``), a device's labels beyond about ``p(1-p)/s^2`` (about 100 at 95 % and 2
points) add almost nothing to what is known of the version, and equal weights are close
to optimal; a small cap also bounds how much one forged device can inflate the variance.

**No single device decides, or delays.** Before deciding, each gate sets aside two
devices: the one whose word most supports failing (its removal moves the estimate furthest
from the bad side) and the one whose word most supports passing, each arm keeping at least
two devices; the verdict is the trimmed set's. Whatever one forged device claims, it is the
extreme one on its side and is set aside, so it can neither fail a good candidate, nor pass
a bad one, nor hold a clear verdict forever (a rule that only waits when the device matters
would let one stolen login stall every rollout). Setting aside one device each way is
symmetric, so honest data lose a little power and no error control (the simulation below
measures both). The leave-one-out estimates that pick the two come from running sums in
O(devices).

**Looking every 5 s is free.** The beat evaluates each rollout every 5 s and acts on the
first fail, so a fixed-sample test repeated at each look has a false rollback rate far
above its nominal alpha. The gates use a confidence sequence instead: Robbins' normal
mixture (the mixture SPRT of Johari, Pekelis and Walsh, "Always valid inference", 2017,
and the asymptotic confidence sequences of Waudby-Smith et al., 2021). For an estimate with
variance ``v`` and a mixing distribution N(0, tau^2) on the effect, the two-sided radius

    r = sqrt(v (v + tau^2) / tau^2 * (2 ln(1/alpha) + ln(1 + tau^2 / v)))

covers the true value at every look simultaneously with probability >= 1 - alpha, whatever
the number of looks and whenever the caller stops. Its always-valid p-value is ``1 / L``
with ``L`` the mixture likelihood ratio against the threshold. It needs no look schedule
or horizon (an alpha-spending plan needs both, and the beat has neither: stages end on
soak, installs and approvals), and the gate stays a pure function of the counts, so
``looks`` is recorded for the explanation only. The price is width: at a given ``v`` the
radius is 3 to 3.6 standard errors instead of 1.6 to 2. ``tau`` is set generously (5 points
for accuracy, twice the ceiling for rates, twice the allowed disagreement for agreement)
because the radius grows like ``v / tau`` once the standard error exceeds ``tau`` (a
forged device inflating the variance would then stall a clear verdict) but only like
``sqrt(ln(tau^2 / v))`` when it is far below it.

Each gate fails only when the trimmed set's interval is on the wrong side of its threshold
and passes only when it is on the right side; it waits otherwise, and until each arm has
``min_samples`` (capped) samples from ``min_devices`` devices (at least 3 per arm when two
arms are compared, 4 for a single arm, so that two devices remain after setting aside). The two-sided
sequence bounds each one-sided error by alpha; the simulation in ``fleet/rollouts/
simulation.py`` (``bench/gate_simulation.py``) measures both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np

PASS, FAIL, WAIT = "pass", "fail", "wait"

# Devices an arm needs before a gate decides: one set aside each way must leave three
# (MIN_LEFT) to measure the spread between devices. Two arms share the two set aside.
MIN_LEFT = 3
TWO_ARM_FLOOR = MIN_LEFT + 1
ONE_ARM_FLOOR = MIN_LEFT + 2
# A device may weigh as much as this many typical (median) devices of its arm.
CAP_MULTIPLE = 2.0
# Devices listed one by one in ``Evaluation.inputs`` up to this many per arm; beyond it the
# inputs hold the arm's sums, which is what the estimate needs, and the capped device ids.
INPUT_DEVICES_LIMIT = 50
CS_METHOD = "cluster-robust ratio, normal-mixture confidence sequence, one device set aside each way"


@dataclass(frozen=True, slots=True)
class DeviceCounts:
    device: str  # device id, named in the explanation (e.g. the most influential device)
    n: int  # trials: labels / shadow samples compared / inferences
    k: int  # successes: correct / agreed / errors


@dataclass(frozen=True, slots=True)
class DeviceLatency:
    device: str
    p95_ms: float
    inferences: int


@dataclass(frozen=True)
class Evaluation:
    metric: str  # accuracy, error_rate, install_failure_rate, latency_p95_ratio, shadow_agreement, ...
    verdict: str  # PASS | FAIL | WAIT
    candidate: float | None  # point estimate of the candidate arm (fractions; p95 in ms)
    incumbent: float | None
    candidate_n: int  # samples in the arm (labels, inferences, devices for install)
    incumbent_n: int
    threshold: float  # as configured (max_drop_pp in pp, max_rate, ratio, min_agreement)
    candidate_devices: int = 0
    incumbent_devices: int = 0
    p_value: float | None = None  # always-valid p-value where the method has one
    lower: float | None = None  # bounds of the compared quantity (drop in pp, rate, agreement, ratio)
    upper: float | None = None
    method: str = ""
    variant: str = ""  # the stratum compared (e.g. "int8"), "" when not stratified
    note: str = ""  # why it waits, which device was set aside, etc.
    summary: str = ""  # one sentence for the API, the admin and the rollback event
    inputs: dict = field(default_factory=dict)  # JSON-serialisable, bounded: enough to recompute

    def as_dict(self) -> dict:
        return asdict(self)


# --- the confidence sequence


def cs_radius(*, variance: float | np.ndarray, alpha: float, tau: float) -> float | np.ndarray:
    """Half-width of the two-sided normal-mixture confidence sequence (see the module doc)."""
    tau2 = tau * tau
    v = np.maximum(variance, 1e-300)
    return np.sqrt(v * (v + tau2) / tau2 * (2 * math.log(1 / alpha) + np.log1p(tau2 / v)))


def always_valid_p(*, distance: float | np.ndarray, variance: float | np.ndarray, tau: float) -> np.ndarray:
    """1 / (normal-mixture likelihood ratio) of an estimate ``distance`` away from the null
    value; ``<= alpha`` exactly when the confidence sequence at ``alpha`` excludes it."""
    tau2 = tau * tau
    v = np.maximum(variance, 1e-300)
    log_ratio = 0.5 * np.log(v / (v + tau2)) + tau2 * np.square(distance) / (2 * v * (v + tau2))
    return np.exp(-np.maximum(log_ratio, 0.0))


def fixed_sample_quantile(confidence: float) -> float:
    """z such that P(Z <= z) = confidence; what a single-look test would use."""
    return NormalDist().inv_cdf(confidence)


# --- one arm: capped per-device counts, ratio of sums, sandwich variance, leave-one-out


@dataclass(frozen=True)
class _Arm:
    devices: Sequence[DeviceCounts]  # as given, including devices with no samples
    kept: np.ndarray  # positions in ``devices`` of the devices with samples, in the order of n, k
    n: np.ndarray  # capped trials per device
    k: np.ndarray  # capped successes per device
    total: float  # sum of capped n
    successes: float  # sum of capped k
    raw_n: int
    raw_k: int
    cap: float
    capped: list[str]

    @property
    def size(self) -> int:
        return len(self.n)

    @property
    def rate(self) -> float | None:
        return self.successes / self.total if self.total else None

    def device(self, index: int) -> DeviceCounts:
        return self.devices[int(self.kept[index])]


def _arm(devices: Sequence[DeviceCounts], cap_multiple: float) -> _Arm:
    n = np.fromiter((d.n for d in devices), dtype=float, count=len(devices))
    k = np.fromiter((d.k for d in devices), dtype=float, count=len(devices))
    kept = np.flatnonzero(n > 0)
    if len(kept) < len(devices):
        n, k = n[kept], k[kept]
    # k > n breaks the window invariant (the ingest refuses it); clamp rather than trust it.
    k = np.minimum(np.maximum(k, 0), n)
    raw_n, raw_k = int(n.sum()), int(k.sum())
    cap, capped, total, successes = 0.0, [], float(raw_n), float(raw_k)
    if len(n):
        ordered = np.sort(n)
        cap = cap_multiple * float(ordered[(len(n) - 1) // 2] + ordered[len(n) // 2]) / 2
        over = n > cap
        if over.any():
            positions = kept[over]
            capped = [devices[int(i)].device for i in positions[:INPUT_DEVICES_LIMIT]]
            n, k = np.minimum(n, cap), np.where(over, k * cap / n, k)
            total, successes = float(n.sum()), float(k.sum())
    return _Arm(
        devices=devices,
        kept=kept,
        n=n,
        k=k,
        total=total,
        successes=successes,
        raw_n=raw_n,
        raw_k=raw_k,
        cap=cap,
        capped=capped,
    )


def _loo_rates(arm: _Arm) -> np.ndarray:
    """The arm's rate without each of its devices, in O(devices): what picks the two
    devices set aside (``_trim``)."""
    return (arm.successes - arm.k) / (arm.total - arm.n)


def _binomial(successes: float, total: float, floor_rate: float | None) -> float:
    adjusted = (successes + 1) / (total + 2)
    spread = adjusted * (1 - adjusted)
    if floor_rate is not None:
        spread = max(spread, floor_rate * (1 - floor_rate))
    return spread / total


def _arm_inputs(arm: _Arm) -> dict:
    inputs = {
        "devices": arm.size,
        "n": arm.raw_n,
        "k": arm.raw_k,
        "n_capped": round(arm.total, 3),
        "k_capped": round(arm.successes, 3),
        "cap_n": round(arm.cap, 3),
        "capped_devices": arm.capped,
    }
    if len(arm.devices) <= INPUT_DEVICES_LIMIT:
        inputs["per_device"] = {d.device: [d.n, d.k] for d in arm.devices}
    return inputs


def _missing(
    arm: _Arm, *, label: str, min_samples: int, min_devices: int, unit: str, floor: int = TWO_ARM_FLOOR
) -> list[str]:
    # Whatever the policy says, an arm needs enough devices that one can be set aside each
    # way and three remain to measure the spread between devices (fewer make the cluster
    # variance too noisy to trust: with two left, a candidate 3 points worse than a 2-point
    # margin was promoted in 8 % of simulated stages at alpha 5 %).
    needs = []
    if arm.total < min_samples:
        needs.append(f"{label} has {_count(arm.total)} of {_count(min_samples)} {unit}")
    if arm.size < max(min_devices, floor):
        needs.append(f"{label} has {arm.size} of {max(min_devices, floor)} devices")
    return needs


def _arm_size(arm: _Arm, unit: str = "") -> str:
    capped = f", {len(arm.capped):,} capped at {_count(arm.cap)}" if arm.capped else ""
    return f"{arm.size:,} devices, n = {_count(arm.total)}{' ' + unit if unit else ''}{capped}"


def _count(value: float) -> str:
    return f"{round(value):,}"


def _cs_label(alpha: float) -> str:
    return f"{(1 - alpha) * 100:.4g} % CS"


def _device_name(arms: list[_Arm], flat_index: int) -> str:
    for arm in arms:
        if flat_index < arm.size:
            return arm.device(flat_index).device
        flat_index -= arm.size
    return ""


# --- accuracy: candidate against incumbent


def accuracy_gate(
    *,
    candidate: Sequence[DeviceCounts],
    incumbent: Sequence[DeviceCounts],
    max_drop_pp: float,
    alpha: float,
    min_samples: int,
    min_devices: int,
    variant: str = "",
    looks: int = 0,
    tau_pp: float = 5.0,
    cap_multiple: float = CAP_MULTIPLE,
) -> Evaluation:
    """Non-inferiority of the candidate's accuracy: FAIL when confident the drop (incumbent
    minus candidate, in points) exceeds ``max_drop_pp``, PASS when confident it is below,
    WAIT otherwise. ``alpha`` is per comparison: a caller comparing several variants divides
    it among them (Bonferroni)."""
    cand, inc = _arm(candidate, cap_multiple), _arm(incumbent, cap_multiple)
    margin, tau = max_drop_pp / 100, tau_pp / 100
    stratum = f" ({variant})" if variant else ""
    common = {
        "metric": "accuracy",
        "candidate": cand.rate,
        "incumbent": inc.rate,
        "candidate_n": round(cand.total),
        "incumbent_n": round(inc.total),
        "threshold": max_drop_pp,
        "candidate_devices": cand.size,
        "incumbent_devices": inc.size,
        "method": CS_METHOD,
        "variant": variant,
    }
    inputs = {
        "candidate": _arm_inputs(cand),
        "incumbent": _arm_inputs(inc),
        "alpha": alpha,
        "tau_pp": tau_pp,
        "cap_multiple": cap_multiple,
        "min_samples": min_samples,
        "min_devices": min_devices,
        "looks": looks,
    }
    needs = _missing(cand, label="candidate", min_samples=min_samples, min_devices=min_devices, unit="labels")
    needs += _missing(inc, label="incumbent", min_samples=min_samples, min_devices=min_devices, unit="labels")
    if needs:
        note = "needs more evidence: " + "; ".join(needs)
        return Evaluation(
            verdict=WAIT, note=note, summary=f"accuracy{stratum}: waiting, {note}", inputs=inputs, **common
        )

    # Leave-one-out drops: each candidate device left out, then each incumbent device.
    loo = np.concatenate((inc.rate - _loo_rates(cand), _loo_rates(inc) - cand.rate))
    set_aside = _trim(loo, [cand.size, inc.size], fail_above=True)
    without_cand, without_inc = _positions([cand, inc], set_aside)
    cand_rate, cand_var = _arm_without(cand, without_cand)
    inc_rate, inc_var = _arm_without(inc, without_inc)
    full_variance = _arm_without(cand, [])[1] + _arm_without(inc, [])[1]
    full_radius = float(cs_radius(variance=full_variance, alpha=alpha, tau=tau))
    full_drop = inc.rate - cand.rate
    decision = _decide(
        estimate=inc_rate - cand_rate,
        variance=inc_var + cand_var,
        full_lower=full_drop - full_radius,
        full_upper=full_drop + full_radius,
        set_aside=set_aside,
        threshold=margin,
        tau=tau,
        alpha=alpha,
        fail_above=True,
    )
    # A drop lies in [-100, 100] pp; a sequence wider than that early on says only "no idea".
    drop = decision.estimate_trimmed * 100
    lower, upper = max(decision.lower * 100, -100.0), min(decision.upper * 100, 100.0)
    note, inputs["trimmed"] = decision.explain([cand, inc], scale=100, unit=" pp drop")
    inputs["drop_pp"] = round(float(drop), 4)
    relation = {FAIL: ">", PASS: "<", WAIT: "straddles"}[decision.verdict]
    summary = (
        f"accuracy{stratum}: {cand_rate * 100:.1f} % ({_arm_size(cand)}) "
        f"vs {inc_rate * 100:.1f} % ({_arm_size(inc)}), "
        f"drop {drop:.1f} pp ({_cs_label(alpha)} {lower:.1f} to {upper:.1f} pp{_trimmed_label(decision)}) "
        f"{relation} {max_drop_pp:.1f} pp allowed" + (", waiting" if decision.verdict == WAIT else "")
    )
    return Evaluation(
        verdict=decision.verdict,
        p_value=decision.p_value,
        lower=lower,
        upper=upper,
        note=note,
        summary=summary,
        inputs=inputs,
        **common,
    )


@dataclass(frozen=True)
class _Decision:
    verdict: str
    lower: float  # the confidence sequence of the trimmed set (one device set aside each way)
    upper: float
    p_value: float
    full_verdict: str  # what all the devices together would say
    set_aside: tuple[int, ...]  # flat indices of the devices set aside: (for failing, for passing)
    estimate_trimmed: float

    def explain(self, arms: list[_Arm], *, scale: float, unit: str) -> tuple[str, dict]:
        """The note naming the devices set aside, and the same for ``inputs``."""
        names = [_device_name(arms, index) for index in self.set_aside]
        trimmed = round(self.estimate_trimmed * scale, 4)
        record = {"set_aside": names, "estimate_trimmed": trimmed, "verdict_all_devices": self.full_verdict}
        if not names:
            return "", record
        shown = " and ".join(names)
        note = f"decided without {shown} ({trimmed:,.2f}{unit} without them)"
        if self.full_verdict != self.verdict:
            note = f"all devices together would {self.full_verdict}; " + note
        return note, record


def _trim(loo: np.ndarray, sizes: list[int], fail_above: bool) -> list[int]:
    """The device whose word most supports failing and the one whose word most supports
    passing (flat indices over the arms' devices, from the leave-one-out estimates ``loo``),
    each arm keeping at least MIN_LEFT devices. Setting both aside is symmetric, so it costs
    honest data little, and it leaves a single forged device no say in either direction:
    whatever it claims, it is the extreme one on its side and is set aside."""
    bad_side = loo if fail_above else -loo
    order = np.argsort(bad_side, kind="stable")  # first: removing it pulls furthest from failing
    arm_of = np.repeat(np.arange(len(sizes)), sizes)
    left = list(sizes)
    chosen: list[int] = []
    for candidates in (order, order[::-1]):
        for index in candidates:
            index = int(index)
            if index not in chosen and left[arm_of[index]] > MIN_LEFT:
                left[arm_of[index]] -= 1
                chosen.append(index)
                break
    return chosen


def _arm_without(arm: _Arm, positions: list[int], floor_rate: float | None = None) -> tuple[float, float]:
    """Rate and cluster-robust variance of the arm without the devices at ``positions``."""
    keep = np.ones(arm.size, dtype=bool)
    keep[positions] = False
    n, k = arm.n[keep], arm.k[keep]
    m, total, successes = len(n), float(n.sum()), float(k.sum())
    rate = successes / total
    residual = k - rate * n
    clustered = m / (m - 1) * float(residual @ residual) / total**2 if m > 1 else 0.0
    return rate, max(clustered, _binomial(successes, total, floor_rate))


def _positions(arms: list[_Arm], flat: list[int]) -> list[list[int]]:
    """Flat device indices -> positions within each arm."""
    result: list[list[int]] = [[] for _ in arms]
    for index in flat:
        for number, arm in enumerate(arms):
            if index < arm.size:
                result[number].append(index)
                break
            index -= arm.size
    return result


def _decide(
    *, estimate, variance, full_lower, full_upper, set_aside, threshold, tau, alpha, fail_above
) -> _Decision:
    """The verdict of the trimmed set's confidence sequence (``estimate`` and ``variance``
    without the devices ``set_aside``). ``fail_above``: the bad side is above the threshold
    (a drop, an error rate), below it for agreement."""
    radius = float(cs_radius(variance=variance, alpha=alpha, tau=tau))
    lower, upper = estimate - radius, estimate + radius

    def verdict_of(low: float, high: float) -> str:
        bad, good = (low > threshold, high < threshold) if fail_above else (high < threshold, low > threshold)
        return FAIL if bad else PASS if good else WAIT

    return _Decision(
        verdict=verdict_of(lower, upper),
        lower=lower,
        upper=upper,
        p_value=float(always_valid_p(distance=estimate - threshold, variance=variance, tau=tau)),
        full_verdict=verdict_of(full_lower, full_upper),
        set_aside=tuple(set_aside),
        estimate_trimmed=estimate,
    )


# --- one-arm proportions against a threshold: error rates and shadow agreement


def _one_arm(
    *,
    metric: str,
    devices: Sequence[DeviceCounts],
    threshold: float,
    fail_above: bool,
    alpha: float,
    min_samples: int,
    min_devices: int,
    looks: int,
    tau: float,
    cap_multiple: float,
    unit: str,
    describe: str,
) -> Evaluation:
    arm = _arm(devices, cap_multiple)
    common = {
        "metric": metric,
        "candidate": arm.rate,
        "incumbent": None,
        "candidate_n": round(arm.total),
        "incumbent_n": 0,
        "threshold": threshold,
        "candidate_devices": arm.size,
        "method": CS_METHOD,
    }
    inputs = {
        "candidate": _arm_inputs(arm),
        "alpha": alpha,
        "tau": tau,
        "cap_multiple": cap_multiple,
        "min_samples": min_samples,
        "min_devices": min_devices,
        "looks": looks,
    }
    needs = _missing(
        arm, label="candidate", min_samples=min_samples, min_devices=min_devices, unit=unit, floor=4
    )
    if needs:
        note = "needs more evidence: " + "; ".join(needs)
        return Evaluation(
            verdict=WAIT, note=note, summary=f"{describe}: waiting, {note}", inputs=inputs, **common
        )
    # The binomial floor at the threshold, when that is the larger variance, is the score
    # test's variance: it keeps a 0-errors-so-far arm from passing on a zero-width interval.
    set_aside = _trim(_loo_rates(arm), [arm.size], fail_above=fail_above)
    rate, variance = _arm_without(arm, set_aside, floor_rate=threshold)
    full_radius = float(
        cs_radius(variance=_arm_without(arm, [], floor_rate=threshold)[1], alpha=alpha, tau=tau)
    )
    decision = _decide(
        estimate=rate,
        variance=variance,
        full_lower=arm.rate - full_radius,
        full_upper=arm.rate + full_radius,
        set_aside=set_aside,
        threshold=threshold,
        tau=tau,
        alpha=alpha,
        fail_above=fail_above,
    )
    if fail_above:
        relation = {FAIL: "above", PASS: "within", WAIT: "straddles"}[decision.verdict]
    else:
        relation = {FAIL: "below", PASS: "above", WAIT: "straddles"}[decision.verdict]
    allowed = "allowed" if fail_above else "required"
    summary = (
        f"{describe}: {_pct(rate)} ({_arm_size(arm, unit)}{_trimmed_label(decision).replace(',', ';', 1)}), "
        f"{_cs_label(alpha)} {_pct(max(decision.lower, 0.0))} to {_pct(min(decision.upper, 1.0))} "
        f"{relation} {_pct(threshold)} {allowed}" + (", waiting" if decision.verdict == WAIT else "")
    )
    note, inputs["trimmed"] = decision.explain([arm], scale=100, unit=" %")
    return Evaluation(
        verdict=decision.verdict,
        p_value=decision.p_value,
        lower=max(decision.lower, 0.0),
        upper=min(decision.upper, 1.0),
        note=note,
        summary=summary,
        inputs=inputs,
        **common,
    )


def _trimmed_label(decision: _Decision) -> str:
    return ", one device set aside each way" if len(decision.set_aside) == 2 else ""


def _pct(value: float | None) -> str:
    """A percentage with the digits that matter: 12.3 %, 1.23 %, 0.012 %."""
    if value is None:
        return "n/a"
    percent = value * 100
    if percent == 0 or percent >= 10:
        return f"{percent:.1f} %"
    if percent >= 1:
        return f"{percent:.2f} %"
    return f"{percent:.2g} %"


def rate_ceiling_gate(
    *,
    metric: str,
    devices: Sequence[DeviceCounts],
    max_rate: float,
    alpha: float,
    min_total: int,
    min_devices: int,
    looks: int = 0,
    tau: float | None = None,
    cap_multiple: float = CAP_MULTIPLE,
) -> Evaluation:
    """A ceiling on a per-device-clustered rate (``k`` errors in ``n`` inferences): FAIL when
    confident the rate exceeds ``max_rate``, PASS when confident it does not."""
    return _one_arm(
        metric=metric,
        devices=devices,
        threshold=max_rate,
        fail_above=True,
        alpha=alpha,
        min_samples=min_total,
        min_devices=min_devices,
        looks=looks,
        tau=tau if tau is not None else max(2 * max_rate, 0.01),
        cap_multiple=cap_multiple,
        unit="inferences",
        describe=metric.replace("_", " "),
    )


def agreement_gate(
    *,
    devices: Sequence[DeviceCounts],
    min_agreement: float,
    alpha: float,
    min_samples: int,
    min_devices: int,
    looks: int = 0,
    tau: float | None = None,
    cap_multiple: float = CAP_MULTIPLE,
) -> Evaluation:
    """Shadow top-1 agreement with the live model (``k`` agreed of ``n`` compared): PASS when
    confident it is at least ``min_agreement``, FAIL when confident it is below."""
    return _one_arm(
        metric="shadow_agreement",
        devices=devices,
        threshold=min_agreement,
        fail_above=False,
        alpha=alpha,
        min_samples=min_samples,
        min_devices=min_devices,
        looks=looks,
        tau=tau if tau is not None else max(2 * (1 - min_agreement), 0.01),
        cap_multiple=cap_multiple,
        unit="samples",
        describe="shadow agreement",
    )


# --- install failures: devices, not samples


def install_gate(
    *, failed: Sequence[str], installed: Sequence[str], max_rate: float, installing: int = 0
) -> Evaluation:
    """Devices that failed to install over the devices of the stages so far. Each device is
    one trial and the stage's devices are the whole population, so there is no sampling
    error to bound, only two rules:

    * one device set aside each way (one failed, one installed), so one false failure
      report can neither roll a good candidate back nor hold it, and one false success
      cannot hide a failing one;
    * devices still ``installing`` count as successes for a failure and as failures for a
      pass: the gate fails early only when the stage cannot end within the limit, and
      passes early only when it cannot end above it (a verdict on the first few devices to
      finish would let one forged failure plus one honest glitch roll back a stage).

    With too few devices to set one aside each way, the plain count decides."""
    failed_ids, installed_ids = sorted(set(failed)), sorted(set(installed) - set(failed))
    f, done = len(failed_ids), len(failed_ids) + len(installed_ids)
    rate = f / done if done else None
    set_aside_failed = 1 if f else 0
    set_aside_installed = 1 if installed_ids else 0
    if done + installing - set_aside_failed - set_aside_installed < 1:
        set_aside_failed = set_aside_installed = 0  # one or two devices: their word is all there is
    kept_failed = f - set_aside_failed
    kept = done + installing - set_aside_failed - set_aside_installed
    common = {
        "metric": "install_failure_rate",
        "candidate": rate,
        "incumbent": None,
        "candidate_n": done,
        "incumbent_n": installing,
        "threshold": max_rate,
        "candidate_devices": done,
        "method": "failed / covered devices, one device set aside each way, installing devices bounding",
        "inputs": {
            "failed": failed_ids[:INPUT_DEVICES_LIMIT],
            "failed_count": f,
            "finished_count": done,
            "installing": installing,
            "set_aside": set_aside_failed + set_aside_installed,
        },
    }
    if kept < 1:
        note = "no device of the stage has finished installing yet"
        return Evaluation(verdict=WAIT, note=note, summary=f"install failures: waiting, {note}", **common)
    best, worst = kept_failed / kept, (kept_failed + installing) / kept
    if best > max_rate:
        verdict, note = FAIL, ""
    elif worst <= max_rate:
        verdict, note = PASS, ""
    else:
        verdict, note = WAIT, f"{installing:,} device(s) still installing could still decide it"
    relation = {FAIL: ">", PASS: "<=", WAIT: "could end either side of"}[verdict]
    aside = (
        " without one failed and one installed device"
        if set_aside_failed and set_aside_installed
        else " without one failed device"
        if set_aside_failed
        else ""
    )
    span = _pct(best) if installing == 0 else f"{_pct(best)} to {_pct(worst)}"
    detail = f"; {span}{aside}" + (f", {installing:,} still installing" if installing else "")
    summary = (
        f"install failures: {f:,} of {done:,} finished devices ({_pct(rate)}"
        + (detail if aside or installing else "")
        + f") {relation} {_pct(max_rate)} allowed"
    )
    return Evaluation(
        verdict=verdict, lower=best, upper=min(worst, 1.0), note=note, summary=summary, **common
    )


# --- latency: a robust ratio of per-device p95s


def latency_gate(
    *,
    candidate: Sequence[DeviceLatency],
    incumbent: Sequence[DeviceLatency],
    max_ratio: float,
    min_inferences: int,
    min_devices: int,
    metric: str = "latency_p95_ratio",
) -> Evaluation:
    """Median over devices of the per-device p95, candidate over incumbent. Devices with
    fewer than ``min_inferences`` inferences have no reliable p95 and are left out. A median
    already shrugs off one extreme device; the one-device rule makes it explicit: FAIL only
    if the ratio exceeds ``max_ratio`` with any one device removed, PASS only if it stays
    within with any one device removed."""
    cand = sorted(d.p95_ms for d in candidate if d.inferences >= min_inferences and d.p95_ms > 0)
    inc = sorted(d.p95_ms for d in incumbent if d.inferences >= min_inferences and d.p95_ms > 0)
    cand_median = float(np.median(cand)) if cand else None
    inc_median = float(np.median(inc)) if inc else None
    ratio = cand_median / inc_median if cand_median and inc_median else None
    common = {
        "metric": metric,
        "candidate": cand_median,
        "incumbent": inc_median,
        "candidate_n": sum(d.inferences for d in candidate if d.inferences >= min_inferences),
        "incumbent_n": sum(d.inferences for d in incumbent if d.inferences >= min_inferences),
        "threshold": max_ratio,
        "candidate_devices": len(cand),
        "incumbent_devices": len(inc),
        "method": "median of per-device p95, one device set aside each way",
        "inputs": {
            "min_inferences": min_inferences,
            "min_devices": min_devices,
            "candidate_p95_ms": [round(x, 3) for x in cand[:INPUT_DEVICES_LIMIT]] if len(cand) <= 50 else [],
            "incumbent_p95_ms": [round(x, 3) for x in inc[:INPUT_DEVICES_LIMIT]] if len(inc) <= 50 else [],
        },
    }
    need = max(min_devices, TWO_ARM_FLOOR)
    if len(cand) < need or len(inc) < need:
        note = (
            f"needs {need} devices per arm with {min_inferences:,} inferences each, "
            f"has {len(cand)} candidate and {len(inc)} incumbent"
        )
        return Evaluation(verdict=WAIT, note=note, summary=f"{metric}: waiting, {note}", **common)
    # One device set aside each way: the one whose removal lowers the ratio most (the
    # slowest candidate or the fastest incumbent) and the one whose removal raises it most.
    lowering = [(float(np.median(cand[:-1])) / inc_median, "candidate", -1)]
    lowering.append((cand_median / float(np.median(inc[1:])), "incumbent", 0))
    raising = [(float(np.median(cand[1:])) / inc_median, "candidate", 0)]
    raising.append((cand_median / float(np.median(inc[:-1])), "incumbent", -1))
    trimmed_cand, trimmed_inc = list(cand), list(inc)
    for _, arm, index in (min(lowering), max(raising)):
        chosen = trimmed_cand if arm == "candidate" else trimmed_inc
        if len(chosen) > MIN_LEFT:
            chosen.pop(index)
    trimmed = float(np.median(trimmed_cand)) / float(np.median(trimmed_inc))
    verdict = FAIL if trimmed > max_ratio else PASS
    relation = {FAIL: ">", PASS: "<="}[verdict]
    summary = (
        f"{metric.replace('_', ' ')}: median p95 {cand_median:,.2f} ms ({len(cand):,} devices) vs "
        f"{inc_median:,.2f} ms ({len(inc):,} devices), ratio {ratio:.2f} "
        f"({trimmed:.2f} with one device set aside each way) {relation} {max_ratio:.2f} allowed"
    )
    return Evaluation(verdict=verdict, lower=trimmed, upper=trimmed, summary=summary, **common)
