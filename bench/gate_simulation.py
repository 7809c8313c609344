"""False rollback rate and power of the accuracy gate, by simulation (issue 8, section 2).

Thousands of simulated rollout stages of clustered fleets (``fleet/rollouts/simulation.py``
describes the model) run the real ``fleet.rollouts.stats.accuracy_gate`` every 5 s, and
the pre-issue-8 gate (pooled labels, a z-test at every look) on the same telemetry beside
it. Prints markdown tables for docs/rollouts.md:

* rollback rate by true drop and devices per arm, new gate / naive gate, for the 0.5 pp
  margin (where 1, 2 and 5 points of drop are power) and the default 2 pp margin; a
  rollback at a drop <= the margin is a false rollback and must stay <= alpha;
* the false promotion rate (a true drop at or beyond the margin promoted), the other error;
* the A/A false rollback rates with their 95 % Wilson intervals, beside alpha;
* the median time to decision.

    .venv/bin/python bench/gate_simulation.py [--quick] [--seed 20261130]

Fixed seed: the same command prints the same tables. The full run takes about 8 to 10
minutes on two shared cores; ``--quick`` about two.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleet.rollouts.simulation import (  # noqa: E402
    PROMOTE,
    ROLLBACK,
    Plan,
    Tally,
    run_cell,
    wilson_interval,
)

QUICK = {
    "aa_rollouts": {4: 150, 10: 150, 100: 100, 1000: 20},
    "ab_rollouts": {4: 30, 10: 30, 100: 30, 1000: 10},
}


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def minutes(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def describe(plan: Plan) -> str:
    fleet = plan.fleet
    return (
        f"Fleet model: device accuracy ~ Beta around the version's mean (incumbent "
        f"{fleet.incumbent_accuracy * 100:.0f} %, concentration {fleet.accuracy_concentration:g}: device sd "
        f"{fleet.device_accuracy_sd_pp:.1f} pp); labels per device per {fleet.window_s}-s window ~ "
        f"Gamma-Poisson (mean {fleet.labels_per_window:g}, shape {fleet.label_rate_shape:g}); windows "
        f"staggered; gate every {fleet.look_s} s for a {fleet.stage_s // 60}-min stage, soak "
        f"{fleet.soak_s // 60} min (a fail rolls back at once, a pass promotes after the soak). "
        f"alpha {plan.alpha:g}, min_samples {plan.min_samples}, min_devices {plan.min_devices}, "
        f"seed {plan.seed}."
    )


def rollback_table(plan: Plan, results: dict, margin: float) -> list[str]:
    drops = [d for d in plan.drops_pp if margin in plan.margins_for(d)]
    key = f"{margin:g}"

    def head(drop: float) -> str:
        kind = "A/A" if drop == 0 else "boundary" if drop == margin else "false" if drop < margin else "power"
        return f"{drop:g} pp ({kind})"

    lines = [
        f"Rollback rate, margin `max_drop_pp` = {margin:g}, new gate / naive gate "
        f"(a rollback at a drop <= {margin:g} pp is false and must be <= {plan.alpha * 100:g} %):",
        "",
        "| devices per arm | " + " | ".join(head(d) for d in drops) + " |",
        "|---:|" + "---:|" * len(drops),
    ]
    for devices in plan.devices:
        cells = []
        for drop in drops:
            tallies: dict[str, Tally] = results[devices, drop]
            new, old = tallies[key], tallies[f"naive:{key}"]
            cells.append(f"{percent(new.rate(ROLLBACK))} / {percent(old.rate(ROLLBACK))}")
        lines.append(f"| {devices:,} | " + " | ".join(cells) + " |")
    return lines


def promotion_table(plan: Plan, results: dict) -> list[str]:
    """The other error: promoting a candidate whose true drop is at or beyond the margin."""
    cells = [(margin, drop) for margin in plan.margins_pp for drop in plan.drops_pp if drop >= margin]
    lines = [
        "Promoted although the true drop is at or beyond the margin (false promotion, must be "
        f"<= {plan.alpha * 100:g} %), new gate / naive gate:",
        "",
        "| devices per arm | " + " | ".join(f"margin {m:g}, drop {d:g} pp" for m, d in cells) + " |",
        "|---:|" + "---:|" * len(cells),
    ]
    for devices in plan.devices:
        row = []
        for margin, drop in cells:
            tallies = results[devices, drop]
            new, old = tallies[f"{margin:g}"], tallies[f"naive:{margin:g}"]
            row.append(f"{percent(new.rate(PROMOTE))} / {percent(old.rate(PROMOTE))}")
        lines.append(f"| {devices:,} | " + " | ".join(row) + " |")
    return lines


def aa_table(plan: Plan, results: dict) -> list[str]:
    lines = [
        f"A/A false rollback rate with its 95 % Wilson interval (alpha = {plan.alpha * 100:g} %):",
        "",
        "| devices per arm | margin | rollouts | new gate | naive gate | new gate promoted |",
        "|---:|---:|---:|---|---|---:|",
    ]
    for devices in plan.devices:
        for margin in plan.margins_pp:
            key = f"{margin:g}"
            new, old = results[devices, 0.0][key], results[devices, 0.0][f"naive:{key}"]
            cells = []
            for tally in (new, old):
                count, total = tally.count(ROLLBACK), len(tally.outcomes)
                low, high = wilson_interval(count, total)
                cells.append(f"{percent(count / total)} ({percent(low)} to {percent(high)})")
            lines.append(
                f"| {devices:,} | {margin:g} pp | {len(new.outcomes):,} | {cells[0]} | {cells[1]} "
                f"| {percent(new.rate(PROMOTE))} |"
            )
    return lines


def time_table(plan: Plan, results: dict) -> list[str]:
    lines = [
        "Median minutes to decision, new gate / naive gate (rollback when the drop exceeds the margin, "
        "promotion in A/A; - when none):",
        "",
        "| devices per arm | margin | promote, A/A | "
        + " | ".join(f"roll back, {d:g} pp" for d in (1.0, 2.0, 5.0))
        + " |",
        "|---:|---:|---:|" + "---:|" * 3,
    ]
    for devices in plan.devices:
        for margin in plan.margins_pp:
            key = f"{margin:g}"
            aa = results[devices, 0.0]
            new, old = aa[key].median_minutes(PROMOTE), aa["naive:" + key].median_minutes(PROMOTE)
            cells = [f"{minutes(new)} / {minutes(old)}"]
            for drop in (1.0, 2.0, 5.0):
                tallies = results[devices, drop]
                if drop <= margin:
                    cells.append("(no drop to catch)")
                    continue
                cells.append(
                    f"{minutes(tallies[key].median_minutes(ROLLBACK))} / "
                    f"{minutes(tallies['naive:' + key].median_minutes(ROLLBACK))}"
                )
            lines.append(f"| {devices:,} | {margin:g} pp | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rollouts per cell (about two minutes)")
    parser.add_argument("--seed", type=int, default=Plan().seed)
    args = parser.parse_args()
    plan = Plan(seed=args.seed, **(QUICK if args.quick else {}))
    started = time.perf_counter()
    results = {}
    for devices in plan.devices:
        for drop in plan.drops_pp:
            cell_started = time.perf_counter()
            results[devices, drop] = run_cell(plan=plan, devices=devices, drop_pp=drop)
            print(
                f"  {devices:>5,} devices per arm, drop {drop:g} pp: "
                f"{time.perf_counter() - cell_started:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    elapsed = time.perf_counter() - started
    command = "bench/gate_simulation.py" + (" --quick" if args.quick else "") + f" --seed {plan.seed}"
    aa = sum(len(results[d, 0.0][f"{plan.margins_pp[0]:g}"].outcomes) for d in plan.devices)
    ab = sum(
        len(next(iter(results[d, drop].values())).outcomes)
        for d in plan.devices
        for drop in plan.drops_pp
        if drop
    )
    print(
        f"`.venv/bin/python {command}`: {aa:,} A/A and {ab:,} A/B rollout stages in {elapsed / 60:.1f} min."
    )
    print()
    print(describe(plan))
    for margin in plan.margins_pp:
        print()
        print("\n".join(rollback_table(plan, results, margin)))
    print()
    print("\n".join(promotion_table(plan, results)))
    print()
    print("\n".join(aa_table(plan, results)))
    print()
    print("\n".join(time_table(plan, results)))


if __name__ == "__main__":
    main()
