"""Step (with DEMO_DEVICES=N): a simulated fleet of N virtual devices beside the real agents.

`python -m agent.sim` (docs/operations.md, "Fleet simulator") enrolls N devices through the
enrollment API with a token of their own (tags "demo" and "demo-sim", room for N), connects
them to the broker over TLS and lets them follow the same rollouts as the real agents; they
send telemetry with a per-version accuracy, so the accuracy gate sees 3.0.0 fail on them too.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from agent.sim.cli import device_specs, parser

from .common import VAR, Demo, console, manage, start

SIM_TAGS = ("demo", "demo-sim")
SIM_HARDWARE = "demo-sim-box"
PREFIX = "demo-sim"


def device_count() -> int:
    raw = os.environ.get("DEMO_DEVICES", "0") or "0"
    if not raw.isdigit():
        raise SystemExit(f"DEMO_DEVICES must be a whole number of simulated devices, got {raw!r}.")
    return int(raw)


def count(demo: Demo, query: str) -> int:
    """How many devices the control plane lists for QUERY (the API's `count`)."""
    response = demo.session.get(f"{demo.api}/devices/?limit=1&tag=demo-sim&{query}", timeout=30)
    response.raise_for_status()
    return response.json()["count"]


def simulator_args(demo: Demo, devices: int) -> list[str]:
    return [
        *("--url", demo.base, "--root-key", demo.root_key_hex, "--ca-file", str(demo.broker.ca_file)),
        *("--devices", str(devices), "--processes", "2", "--id-prefix", PREFIX, "--seed", "demo"),
        *("--hardware", SIM_HARDWARE, "--telemetry-interval", "5", "--report-interval", "10"),
        *("--cache-dir", str(VAR / "sim-cache"), "--stats-file", str(VAR / "logs" / "sim-stats.jsonl")),
        # 2.0.0 is better than 1.0.0, 3.0.0 clearly worse: the accuracy gate's verdict on the
        # simulated devices matches the one on the real agents.
        *("--profile", "1.0.0:accuracy=0.95", "--profile", "2.0.0:accuracy=0.97"),
        *("--profile", "3.0.0:accuracy=0.80"),
    ]


def start_simulator(demo: Demo) -> None:
    """Start a simulated fleet of DEMO_DEVICES virtual devices (python -m agent.sim) beside
    the real agents: they enroll through the enrollment API, connect to the broker over TLS,
    get digits 1.0.0, and follow the rollouts that come next; the admin and the charts show
    them. Prints how many enrolled and went active."""
    devices = device_count()
    env = demo.env
    tags = [arg for tag in SIM_TAGS for arg in ("--tag", tag)]
    token = manage(
        env,
        "create_enrollment_token",
        "demo simulated fleet",
        "--auto-approve",
        "--max-uses",
        str(devices),
        *tags,
    )
    args = simulator_args(demo, devices)
    specs = device_specs(parser().parse_args(args))
    started = time.monotonic()
    process = start(
        demo.stack,
        "simulator",
        {**env, "FLEET_SIM_ENROLLMENT_TOKEN": token},
        *(sys.executable, "-m", "agent.sim", *args),
        stop_signal=signal.SIGINT,  # devices publish `offline` and disconnect
    )
    demo.simulator = {"process": process, "devices": devices}
    # Enrollment runs a few at once per process; every one provisions a broker login.
    deadline = started + 120 + devices
    with demo.task(f"Enrolling {devices:,} simulated devices (python -m agent.sim, 2 processes)"):
        while (enrolled := count(demo, "online=true")) < devices:
            if process.poll() is not None:
                raise SystemExit(f"the simulator exited; see {VAR / 'logs' / 'simulator.log'}")
            if time.monotonic() > deadline:
                break
            time.sleep(1)
    enrolled_s = time.monotonic() - started
    with demo.task("Publishing digits 1.0.0 to them and waiting for them to go active"):
        for int8, variant in ((True, "int8"), (False, "float32")):
            ids = [spec.device_id for spec in specs if spec.int8 == int8]
            if ids:
                manage(
                    env,
                    "publish_desired",
                    *ids,
                    *("--model", "digits", "--model-version", "1.0.0", "--variant", variant),
                )
        deadline = time.monotonic() + 60 + devices / 10
        while (active := count(demo, "online=true&model=digits&version=1.0.0")) < enrolled:
            if time.monotonic() > deadline:
                break
            time.sleep(1)
    total = count(demo, "")
    console.print(
        f"Simulated fleet: {total:,} of {devices:,} devices enrolled ({enrolled:,} online after "
        f"{enrolled_s:.0f} s), {active:,} went active on digits 1.0.0; "
        f"admin: {demo.base}/admin/devices/device/?q={SIM_TAGS[1]}"
    )
    if active < devices:
        raise SystemExit(f"only {active} of {devices} simulated devices went active; see {VAR / 'logs'}")


def simulator_summary(demo: Demo) -> None:
    """How the simulated fleet ended the story: the devices on 2.0.0."""
    if demo.simulator is None:
        return
    devices = demo.simulator["devices"]
    on_v2 = count(demo, "online=true&model=digits&version=2.0.0")
    console.print(
        f"Simulated fleet after the story: {on_v2:,} of {devices:,} devices online on digits 2.0.0."
    )
