"""A simulator of clustered fleets that runs the real accuracy gate at the real cadence
(issue 8, section 2; ``bench/gate_simulation.py`` prints its tables, docs/rollouts.md
"Statistics" shows them, ``tests/rollouts/test_gate_simulation.py`` checks a small run).

One simulated rollout stage is two arms of devices (candidate, incumbent) over ``stage_s``
seconds:

* each device has its own accuracy, drawn from a Beta distribution around its version's
  mean with concentration ``accuracy_concentration`` (100 gives a device-to-device standard
  deviation of 2.2 points at 95 %): labels from one device are correlated;
* each device has its own label rate, Gamma-distributed with mean ``labels_per_window``
  and shape ``label_rate_shape`` (0.5: a coefficient of variation of 1.4, a few devices
  label much more than the rest), so the labels of one window are Gamma-Poisson;
* each device publishes a telemetry window every ``window_s`` seconds at its own phase
  (staggered), and the gate sees the cumulative per-device counts of the windows
  published so far;
* the gate is evaluated every ``look_s`` seconds. A fail rolls back at once; a pass
  promotes at the first look after the soak; a stage still waiting at the end is
  "undecided" (the always-valid guarantee holds for any horizon, the naive gate's false
  rollbacks would keep growing with it).

Data are drawn with numpy, vectorised per rollout; the gate called at each look is
``fleet.rollouts.stats.accuracy_gate`` itself, on ``DeviceCounts`` like the caller's. The
pre-issue-8 gate is kept below as ``naive_accuracy_gate`` and run on the same data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist, median

import numpy as np

from fleet.rollouts.stats import FAIL, PASS, WAIT, DeviceCounts, Evaluation, accuracy_gate

ROLLBACK, PROMOTE, UNDECIDED = "rollback", "promote", "undecided"


@dataclass(frozen=True)
class Fleet:
    devices_per_arm: int
    drop_pp: float = 0.0  # true accuracy drop of the candidate's mean, in points
    incumbent_accuracy: float = 0.95
    accuracy_concentration: float = 100.0
    labels_per_window: float = 2.0
    label_rate_shape: float = 0.5
    window_s: int = 30
    look_s: int = 5
    stage_s: int = 1200
    soak_s: int = 600

    @property
    def device_accuracy_sd_pp(self) -> float:
        p = self.incumbent_accuracy
        return 100 * math.sqrt(p * (1 - p) / (self.accuracy_concentration + 1))


@dataclass(frozen=True)
class GatePolicy:
    max_drop_pp: float
    alpha: float = 0.05
    min_samples: int = 100
    min_devices: int = 5


@dataclass
class Outcome:
    decision: str
    seconds: float | None  # when the decision was taken, None if undecided
    looks: int


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)

    def rate(self, decision: str) -> float:
        return sum(o.decision == decision for o in self.outcomes) / max(len(self.outcomes), 1)

    def count(self, decision: str) -> int:
        return sum(o.decision == decision for o in self.outcomes)

    def median_minutes(self, decision: str) -> float | None:
        times = [o.seconds for o in self.outcomes if o.decision == decision and o.seconds is not None]
        return median(times) / 60 if times else None


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (good at rates near 0)."""
    if trials == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


# --- the gate as it was before issue 8, kept for comparison only ---------------------------------


def naive_accuracy_gate(
    *,
    candidate_labeled: int,
    candidate_correct: int,
    incumbent_labeled: int,
    incumbent_correct: int,
    max_drop_pp: float,
    confidence: float,
    min_samples: int,
) -> Evaluation:
    """THE OLD GATE, NOT FOR PRODUCTION: a copy of ``fleet.rollouts.stats.accuracy_gate``
    before issue 8, for the simulation's comparison. It pools every label of every device
    and runs two one-sided two-proportion z-tests on Agresti-Caffo adjusted proportions, as
    if each look were the only one. Only the normal quantile changed (NormalDist)."""
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
        "method": "naive pooled z-test (pre-issue-8)",
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
    z_quantile = NormalDist().inv_cdf(confidence)
    normal_sf = NormalDist().cdf
    p_worse = normal_sf(-(drop - margin) / se)  # small: confident the drop exceeds the margin
    p_not_worse = normal_sf(-(margin - drop) / se)  # small: confident the drop is within it
    if p_worse < alpha:
        return Evaluation(verdict=FAIL, p_value=p_worse, lower=drop - z_quantile * se, **common)
    if p_not_worse < alpha:
        return Evaluation(verdict=PASS, p_value=p_not_worse, upper=drop + z_quantile * se, **common)
    return Evaluation(
        verdict=WAIT, p_value=min(p_worse, p_not_worse), note="not significant either way", **common
    )


# --- simulated telemetry -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Arms:
    """Cumulative counts per device and look; candidate devices first, then incumbent."""

    ids: list[str]
    candidates: int
    labeled: np.ndarray  # shape (looks, devices)
    correct: np.ndarray


def _simulate(fleet: Fleet, rng: np.random.Generator) -> _Arms:
    m = fleet.devices_per_arm
    means = np.repeat([fleet.incumbent_accuracy - fleet.drop_pp / 100, fleet.incumbent_accuracy], m)
    c = fleet.accuracy_concentration
    accuracy = rng.beta(means * c, (1 - means) * c)
    rate = rng.gamma(fleet.label_rate_shape, fleet.labels_per_window / fleet.label_rate_shape, 2 * m)
    windows = fleet.stage_s // fleet.window_s
    labels = rng.poisson(rate[:, None], (2 * m, windows))
    correct = rng.binomial(labels, accuracy[:, None])
    # Column w of the cumulative arrays: after w windows (column 0: nothing yet).
    cum_labels = np.concatenate([np.zeros((2 * m, 1), int), labels.cumsum(axis=1)], axis=1)
    cum_correct = np.concatenate([np.zeros((2 * m, 1), int), correct.cumsum(axis=1)], axis=1)
    # A device's first window starts at its phase after the stage start and is published
    # when it ends; the gate only ever sees whole windows.
    phase = rng.uniform(0, fleet.window_s, 2 * m)
    times = np.arange(fleet.look_s, fleet.stage_s + 1, fleet.look_s)
    published = np.clip(np.floor((times[:, None] - phase[None, :]) / fleet.window_s), 0, windows).astype(int)
    rows = np.arange(2 * m)[None, :]
    ids = [f"cand-{i}" for i in range(m)] + [f"inc-{i}" for i in range(m)]
    return _Arms(
        ids=ids, candidates=m, labeled=cum_labels[rows, published], correct=cum_correct[rows, published]
    )


# --- running gates over a stage ------------------------------------------------------------------

Gate = Callable[[list[DeviceCounts], list[DeviceCounts], int], str]


def new_gate(policy: GatePolicy) -> Gate:
    def evaluate(candidate: list[DeviceCounts], incumbent: list[DeviceCounts], looks: int) -> str:
        return accuracy_gate(
            candidate=candidate,
            incumbent=incumbent,
            max_drop_pp=policy.max_drop_pp,
            alpha=policy.alpha,
            min_samples=policy.min_samples,
            min_devices=policy.min_devices,
            looks=looks,
        ).verdict

    return evaluate


def naive_gate(policy: GatePolicy) -> Callable[[int, int, int, int], str]:
    def evaluate(n1: int, k1: int, n2: int, k2: int) -> str:
        return naive_accuracy_gate(
            candidate_labeled=n1,
            candidate_correct=k1,
            incumbent_labeled=n2,
            incumbent_correct=k2,
            max_drop_pp=policy.max_drop_pp,
            confidence=1 - policy.alpha,
            min_samples=policy.min_samples,
        ).verdict

    return evaluate


def _decide(verdict: str, seconds: int, fleet: Fleet) -> str | None:
    if verdict == FAIL:
        return ROLLBACK
    if verdict == PASS and seconds >= fleet.soak_s:
        return PROMOTE
    return None


def run_stage(
    *, fleet: Fleet, policies: dict[str, GatePolicy], rng: np.random.Generator, naive: bool = True
) -> dict[str, Outcome]:
    """One simulated stage, with every policy's new gate (and, if ``naive``, the old gate)
    evaluated on the same telemetry at each look until each has decided. Keys: the policy
    names, and ``naive:<name>`` for the old gate."""
    arms = _simulate(fleet, rng)
    m = arms.candidates
    new = {name: new_gate(policy) for name, policy in policies.items()}
    old = {f"naive:{name}": naive_gate(policy) for name, policy in policies.items()} if naive else {}
    outcomes: dict[str, Outcome] = {}
    devices: list[DeviceCounts] = [DeviceCounts(device, 0, 0) for device in arms.ids]
    previous = np.zeros(2 * m, dtype=int)
    cached: dict[str, str] = {}
    pooled = np.stack(
        [
            arms.labeled[:, :m].sum(axis=1),
            arms.correct[:, :m].sum(axis=1),
            arms.labeled[:, m:].sum(axis=1),
            arms.correct[:, m:].sum(axis=1),
        ],
        axis=1,
    ).tolist()
    for look, labeled in enumerate(arms.labeled):
        seconds = (look + 1) * fleet.look_s
        changed = np.flatnonzero(labeled != previous)
        previous = labeled
        correct = arms.correct[look]
        for i in changed.tolist():
            devices[i] = DeviceCounts(arms.ids[i], int(labeled[i]), int(correct[i]))
        for name, evaluate in new.items():
            if name in outcomes:
                continue
            # The gate is a pure function of the counts: with no new labels since the last
            # look its verdict is the same, so the call is skipped, not approximated.
            if len(changed) or name not in cached:
                cached[name] = evaluate(devices[:m], devices[m:], look + 1)
            decision = _decide(cached[name], seconds, fleet)
            if decision:
                outcomes[name] = Outcome(decision, seconds, look + 1)
        for name, evaluate in old.items():
            if name not in outcomes:
                decision = _decide(evaluate(*pooled[look]), seconds, fleet)
                if decision:
                    outcomes[name] = Outcome(decision, seconds, look + 1)
        if len(outcomes) == len(new) + len(old):
            break
    looks = len(arms.labeled)
    for name in [*new, *old]:
        outcomes.setdefault(name, Outcome(UNDECIDED, None, looks))
    return outcomes


def run_many(
    *,
    fleet: Fleet,
    policies: dict[str, GatePolicy],
    rollouts: int,
    seed: int | np.random.SeedSequence,
    naive: bool = True,
) -> dict[str, Tally]:
    rng = np.random.default_rng(seed)
    tallies: dict[str, Tally] = {}
    for _ in range(rollouts):
        for name, outcome in run_stage(fleet=fleet, policies=policies, rng=rng, naive=naive).items():
            tallies.setdefault(name, Tally()).outcomes.append(outcome)
    return tallies


# --- a plan of cells: devices per arm x true drop, each with the margins that apply ---------------


@dataclass(frozen=True)
class Plan:
    # 4 devices per arm is the smallest arm the gates decide on (the policy default).
    devices: tuple[int, ...] = (4, 10, 100, 1000)
    drops_pp: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 5.0)
    margins_pp: tuple[float, ...] = (0.5, 2.0)
    # Rollouts per cell: A/A (no drop) cells need many to pin a rate near 5 %, A/B cells fewer.
    aa_rollouts: dict[int, int] = field(default_factory=lambda: {4: 1000, 10: 1000, 100: 800, 1000: 200})
    ab_rollouts: dict[int, int] = field(default_factory=lambda: {4: 150, 10: 150, 100: 150, 1000: 60})
    alpha: float = 0.05
    min_samples: int = 100
    min_devices: int = 4
    seed: int = 20261130
    fleet: Fleet = field(default_factory=lambda: Fleet(devices_per_arm=0))

    def margins_for(self, drop_pp: float) -> list[float]:
        """Every margin for A/A, its own boundary and the whole points; 0.5 pp only against
        the 0.5 pp margin (it is the boundary there and says little more under 2 pp)."""
        return [m for m in self.margins_pp if drop_pp in (0.0, m) or drop_pp >= 1.0]


def run_cell(*, plan: Plan, devices: int, drop_pp: float, naive: bool = True) -> dict[str, Tally]:
    fleet = Fleet(**{**plan.fleet.__dict__, "devices_per_arm": devices, "drop_pp": drop_pp})
    policies = {
        f"{margin:g}": GatePolicy(
            max_drop_pp=margin, alpha=plan.alpha, min_samples=plan.min_samples, min_devices=plan.min_devices
        )
        for margin in plan.margins_for(drop_pp)
    }
    rollouts = (plan.aa_rollouts if drop_pp == 0 else plan.ab_rollouts)[devices]
    # One seed per cell, so a cell's figures do not depend on which other cells ran.
    seed = np.random.SeedSequence([plan.seed, devices, round(drop_pp * 100)])
    return run_many(fleet=fleet, policies=policies, rollouts=rollouts, seed=seed, naive=naive)
