"""Run the demo's steps in order with a progress display; see the package docstring."""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import sys
import time
from contextlib import ExitStack

from . import agents, fleet_sim, registry, services, story
from .common import VAR, Demo, console, new_progress, signal_all


def keep_running(demo: Demo) -> None:
    """Keep the control plane, the broker and the agents running until Ctrl-C (or stop right
    away with DEMO_EXIT=1); cleaning up follows."""
    if os.environ.get("DEMO_EXIT") == "1":
        console.print("DEMO_EXIT=1: stopping.")
        return
    console.print("Press Ctrl-C to stop the demo.")
    processes = [*demo.processes.values(), *(a["process"] for a in demo.agents)]
    try:
        while all(process.poll() is None for process in processes):
            time.sleep(1)
    except KeyboardInterrupt:
        pass


def steps() -> list[tuple[str, object]]:
    """The demo's steps in order, each with its title; the simulated fleet only with
    DEMO_DEVICES > 0."""
    simulated = fleet_sim.device_count() > 0
    return [
        ("Set up the services", services.start_services),
        ("Upload digits 1.0.0", registry.upload_v1),
        ("Twelve real agents", agents.start_agents),
        *([("A simulated fleet", fleet_sim.start_simulator)] if simulated else []),
        ("Where to look", registry.show_access),
        ("Upload 2.0.0, 3.0.0 and 4.0.0", story.upload_versions),
        ("Roll out v2 in stages", story.rollout_v2),
        ("v3: a canary the accuracy gate rolls back", story.rollout_v3),
        ("v4: stopped in shadow", story.rollout_v4),
        ("Report", story.what_devices_serve),
        *([("The simulated fleet at the end", fleet_sim.simulator_summary)] if simulated else []),
        ("Keep running", keep_running),
    ]


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: every process started is stopped


def until(plan: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """The steps up to DEMO_UNTIL (a step's function name, e.g. rollout_v2), then "Keep
    running"; all of them without it."""
    name = os.environ.get("DEMO_UNTIL", "")
    names = [step.__name__ for _, step in plan]
    if not name:
        return plan
    if name not in names:
        raise SystemExit(f"DEMO_UNTIL must name a step: one of {', '.join(names)}; got {name!r}.")
    return [*plan[: names.index(name) + 1], plan[-1]]


def main(argv: list[str]) -> int:
    plan = until(steps())
    if "--steps" in argv:
        for number, (title, step) in enumerate(plan, 1):
            doc = " ".join(inspect.getdoc(step).split())
            console.print(f"[bold]{number}. {title}[/bold] ({step.__name__}): {doc}\n")
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    shutil.rmtree(VAR, ignore_errors=True)
    (VAR / "logs").mkdir(parents=True)
    started = time.monotonic()
    try:
        with ExitStack() as stack:
            demo = Demo(stack=stack, progress=new_progress())
            try:
                for number, (title, step) in enumerate(plan, 1):
                    console.rule(f"[bold]{number}/{len(plan)}[/bold] {title}", align="left")
                    # One spinner list per step, under its rule: each line ticks when done.
                    with new_progress() as demo.progress:
                        step(demo)
            finally:
                stack.callback(signal_all)  # runs first: every process is asked to stop at once
            console.rule(
                "Cleaning up: stopping every process started, dropping the demo's database", align="left"
            )
    except KeyboardInterrupt:
        console.print("Stopped; every process the demo started is stopped and its database dropped.")
        return 130
    console.print(
        f"Done in {time.monotonic() - started:.0f} s; every process the demo started is stopped "
        "and its database dropped."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
