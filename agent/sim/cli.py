"""``python -m agent.sim``: the knobs, the processes, and the figures it prints."""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import queue
import random
import signal
import sys
import time
import uuid
from dataclasses import replace
from typing import Any

from agent.protocol.codes import Reason
from agent.sim.device import Behaviour, DeviceSpec, VersionProfile
from agent.sim.fleet import SimConfig, run_process

TOKEN_ENV = "FLEET_SIM_ENROLLMENT_TOKEN"
ADMIN_TOKEN_ENV = "FLEET_SIM_ADMIN_TOKEN"

DESCRIPTION = """\
Run N virtual devices against a real Modelfleet control plane and MQTT broker.

Each device enrolls through POST /api/v1/enroll, connects to the broker with its own login,
client id and last will, verifies trust bundles, desired states and manifests with the
agent's own code, downloads through a shared on-disk cache (every device hashes the blob
itself), "installs" without LiteRT, reports `active`, and sends synthetic telemetry windows.

What to do:
  1. make an auto-approving enrollment token with room for the fleet (admin page, the
     API, or `manage.py create_enrollment_token sim --auto-approve --max-uses 10000`),
     and raise ENROLL_RATE on the control plane for large fleets (the default,
     30/minute per client address, makes 1,000 devices take half an hour);
  2. run, e.g.
       FLEET_SIM_ENROLLMENT_TOKEN=me_... python -m agent.sim --url https://fleet.example \\
           --root-key HEX --ca-file ca.pem --devices 1000 --processes 2
  3. start rollouts as usual; stop with Ctrl-C (devices publish `offline` and disconnect).

With --bulk, step 1 is an admin's API token in $FLEET_SIM_ADMIN_TOKEN instead: each
process provisions its devices in bulk requests (docs/enrollment.md, "Bulk provisioning").
"""

EPILOG = """\
Version profiles: --profile 2.0.0:accuracy=0.97,error_rate=0.001,latency_ms=4 (repeatable);
versions without one use --accuracy, --error-rate and --latency-ms.
Prints one status line per --report-interval and, at the end, the bench figures: enrollment
time and rate, time until every device was online, and per process its devices, CPU share,
memory and event-loop lag.
"""


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction between 0 and 1")
    return value


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def hardware_mix(text: str) -> list[tuple[str, float]]:
    """``rpi4=3,jetson-nano=1`` -> weighted hardware classes."""
    mix = []
    for part in text.split(","):
        name, _, weight = part.partition("=")
        try:
            mix.append((name.strip(), float(weight) if weight else 1.0))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"bad hardware weight in {part!r}") from exc
    if not mix or any(not name or weight <= 0 for name, weight in mix):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME[=WEIGHT],...")
    return mix


def profile(text: str) -> tuple[str, dict[str, float]]:
    """``2.0.0:accuracy=0.97,error_rate=0.01,latency_ms=4`` -> (version, fields)."""
    version, _, rest = text.partition(":")
    fields: dict[str, float] = {}
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        if key not in ("accuracy", "error_rate", "latency_ms"):
            raise argparse.ArgumentTypeError(
                f"unknown profile field {key!r} (accuracy, error_rate, latency_ms)"
            )
        try:
            fields[key] = float(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number") from exc
    if not version or not fields:
        raise argparse.ArgumentTypeError(f"{text!r} is not VERSION:field=value,...")
    return version, fields


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m agent.sim",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_argument_group("where")
    where.add_argument("--url", required=True, help="control plane base URL (enrollment and artifacts)")
    where.add_argument(
        "--enrollment-token",
        default=os.environ.get(TOKEN_ENV),
        help=f"fleet enrollment token; better ${TOKEN_ENV}, which keeps it off the process list",
    )
    where.add_argument(
        "--bulk",
        action="store_true",
        help=f"provision the devices in bulk (POST /api/v1/devices/provision) with the admin API "
        f"token in ${ADMIN_TOKEN_ENV}, instead of enrolling each one",
    )
    where.add_argument(
        "--bulk-batch", type=int, default=500, help="devices per bulk request (500; the server caps it)"
    )
    where.add_argument(
        "--root-key", action="append", required=True, help="pinned root public key, hex (repeatable)"
    )
    where.add_argument("--root-threshold", type=int, default=1, help="root signatures required (default 1)")
    where.add_argument("--ca-file", help="CA that signed the broker's and control plane's TLS certificates")
    fleet = p.add_argument_group("fleet")
    fleet.add_argument("--devices", type=int, default=100, help="number of virtual devices (default 100)")
    fleet.add_argument("--processes", type=int, default=2, help="processes to spread them over (default 2)")
    fleet.add_argument("--id-prefix", help="device id prefix (default sim-<random>); ids are PREFIX-00042")
    fleet.add_argument(
        "--int8-fraction", type=fraction, default=0.5, help="devices that run int8 (default 0.5)"
    )
    fleet.add_argument(
        "--hardware", type=hardware_mix, default=[("sim-box", 1.0)], help="hardware mix NAME[=WEIGHT],..."
    )
    fleet.add_argument("--seed", default="sim", help="seed for every random choice (default 'sim')")
    behaviour = p.add_argument_group("misbehaviour")
    behaviour.add_argument("--offline-fraction", type=fraction, default=0.0, help="enrolled, never connect")
    behaviour.add_argument(
        "--flap-fraction", type=fraction, default=0.0, help="lose the connection and come back"
    )
    behaviour.add_argument(
        "--flap-online-s", type=positive, default=20.0, help="flapping: seconds up (±20 %%)"
    )
    behaviour.add_argument("--flap-offline-s", type=positive, default=5.0, help="flapping: seconds down")
    behaviour.add_argument("--fail-fraction", type=fraction, default=0.0, help="every install fails")
    behaviour.add_argument(
        "--fail-reason",
        type=Reason,
        choices=list(Reason),
        default=Reason.LOAD_FAILED,
        help="their reason (default load_failed)",
    )
    telemetry = p.add_argument_group("telemetry")
    telemetry.add_argument(
        "--telemetry-interval", type=positive, default=30.0, help="seconds per window (30)"
    )
    telemetry.add_argument("--inferences-per-s", type=float, default=5.0, help="per device (default 5)")
    telemetry.add_argument(
        "--label-rate", type=fraction, default=0.1, help="inferences labeled by apps (0.1)"
    )
    telemetry.add_argument("--accuracy", type=fraction, default=0.95, help="default accuracy (0.95)")
    telemetry.add_argument("--error-rate", type=fraction, default=0.0, help="default error rate (0)")
    telemetry.add_argument("--latency-ms", type=positive, default=5.0, help="default p50 latency (5 ms)")
    telemetry.add_argument(
        "--profile", type=profile, action="append", default=[], help="per version, see below"
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--install-seconds", type=float, default=0.2, help="simulated install time (0.2 s ±50 %%)"
    )
    run.add_argument("--enroll-concurrency", type=int, default=4, help="enrollments at once per process (4)")
    run.add_argument("--cache-dir", default="var/sim-cache", help="shared artifact cache (var/sim-cache)")
    run.add_argument("--keepalive", type=int, default=30, help="MQTT keepalive seconds (30)")
    run.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: at Ctrl-C)")
    run.add_argument("--report-interval", type=positive, default=10.0, help="seconds between status lines")
    run.add_argument("--stats-file", help="also write every status snapshot here, as JSON lines")
    run.add_argument("--log-level", default="WARNING", help="WARNING (default), INFO, DEBUG")
    return p


def device_specs(args: argparse.Namespace) -> list[DeviceSpec]:
    """Who is who, reproducibly from the seed: exact counts for every fraction (rounded),
    the misbehaviours on disjoint devices."""
    n = args.devices
    rng = random.Random(args.seed)
    prefix = args.id_prefix or f"sim-{uuid.uuid4().hex[:4]}"
    order = list(range(n))
    rng.shuffle(order)
    behaviour: dict[int, str] = {}
    taken = 0
    for kind, share in (
        (Behaviour.OFFLINE, args.offline_fraction),
        (Behaviour.FLAPPING, args.flap_fraction),
        (Behaviour.FAILING, args.fail_fraction),
    ):
        count = round(share * n)
        for index in order[taken : taken + count]:
            behaviour[index] = kind
        taken += count
    int8 = set(rng.sample(range(n), round(args.int8_fraction * n)))
    names, weights = zip(*args.hardware, strict=True)
    hardware = rng.choices(names, weights=weights, k=n)
    width = max(5, len(str(n - 1)))
    return [
        DeviceSpec(
            index=i,
            device_id=f"{prefix}-{i:0{width}d}",
            hardware=hardware[i],
            int8=i in int8,
            behaviour=behaviour.get(i, Behaviour.NORMAL),
        )
        for i in range(n)
    ]


def sim_config(args: argparse.Namespace) -> SimConfig:
    default = VersionProfile(accuracy=args.accuracy, error_rate=args.error_rate, latency_ms=args.latency_ms)
    return SimConfig(
        url=args.url,
        enrollment_token=args.enrollment_token,
        root_keys=tuple(args.root_key),
        root_threshold=args.root_threshold,
        ca_file=args.ca_file,
        cache_dir=args.cache_dir,
        seed=args.seed,
        profiles={version: replace(default, **fields) for version, fields in args.profile},
        default_profile=default,
        inferences_per_s=args.inferences_per_s,
        label_rate=args.label_rate,
        telemetry_interval_s=args.telemetry_interval,
        install_s=args.install_seconds,
        fail_reason=args.fail_reason,
        flap_online_s=args.flap_online_s,
        flap_offline_s=args.flap_offline_s,
        keepalive_s=args.keepalive,
        enroll_concurrency=args.enroll_concurrency,
        provision_token=os.environ.get(ADMIN_TOKEN_ENV) if args.bulk else None,
        provision_batch=args.bulk_batch,
    )


def status_line(elapsed: float, snapshots: dict[int, dict[str, Any]], total: int) -> str:
    enrolled = sum(s["enrolled"] for s in snapshots.values())
    online = sum(s["online"] for s in snapshots.values())
    active: dict[str, int] = {}
    for snapshot in snapshots.values():
        for key, count in snapshot["active"].items():
            active[key] = active.get(key, 0) + count
    serving = ", ".join(f"{key}: {count}" for key, count in sorted(active.items())) or "nothing yet"
    telemetry = sum(s["telemetry"] for s in snapshots.values())
    failed = sum(s["failed"] for s in snapshots.values())
    return (
        f"[{elapsed:7.1f} s] enrolled {enrolled}/{total}, online {online}, serving {serving}; "
        f"{failed} refused, {telemetry} telemetry windows, "
        f"{sum(s['connects'] for s in snapshots.values())} connects"
    )


def summary(elapsed: float, snapshots: dict[int, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"fleet simulator: {args.devices} devices in {args.processes} processes, ran {elapsed:.0f} s"]
    enrolled = sum(s["enrolled"] for s in snapshots.values())
    enroll_s = max((s["enroll_s"] or 0 for s in snapshots.values()), default=0)
    rate = enrolled / enroll_s if enroll_s else 0
    lines.append(
        f"  enrollment: {enrolled} devices in {enroll_s:.1f} s ({rate:.0f} per s, "
        f"{args.enroll_concurrency} at once per process)"
    )
    all_online = [s["first_all_online_s"] for s in snapshots.values()]
    if all(value is not None for value in all_online) and all_online:
        lines.append(f"  every connecting device online {max(all_online):.1f} s after start")
    lines.append(
        f"  running (after enrollment), telemetry every {args.telemetry_interval:g} s:"
        " process, devices, CPU share of a core, memory, event-loop lag p95"
    )
    per_core = []
    for number, s in sorted(snapshots.items()):
        busy_s = s["cpu_s"] - s["cpu_s_enrolled"]
        share = busy_s / s["running_s"] if s["running_s"] else 0.0
        if share:
            per_core.append(s["devices"] / share)
        lines.append(
            f"  {number:7d}  {s['devices']:7d}  {share * 100:5.1f} %  {s['rss_mb']:5.0f} MB"
            f"  {s['loop_lag_p95_ms']:6.1f} ms"
        )
    lines.append(f"  devices per process: {args.devices / args.processes:.0f}")
    if per_core:
        lines.append(f"  at this load one core would carry about {min(per_core):,.0f} devices")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.bulk and not os.environ.get(ADMIN_TOKEN_ENV):
        parser().error(f"--bulk needs an admin API token in ${ADMIN_TOKEN_ENV}")
    if not args.bulk and not args.enrollment_token:
        parser().error(f"an enrollment token is needed: --enrollment-token or ${TOKEN_ENV}")
    if args.bulk_batch < 1:
        parser().error("--bulk-batch must be at least 1")
    if args.devices < 1 or args.processes < 1:
        parser().error("--devices and --processes must be at least 1")
    args.processes = min(args.processes, args.devices)
    logging.basicConfig(level=args.log_level, format="%(asctime)s sim %(levelname)s %(message)s")
    specs = device_specs(args)
    config = sim_config(args)
    context = multiprocessing.get_context("spawn")
    stop, reports = context.Event(), context.Queue()
    processes = [
        context.Process(
            target=run_process,
            args=(config, specs[number :: args.processes], number, stop, reports, args.log_level),
            name=f"sim-{number}",
        )
        for number in range(args.processes)
    ]
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    started = time.monotonic()
    for process in processes:
        process.start()
    print(
        f"fleet simulator: {args.devices} devices, ids {specs[0].device_id} …, {args.processes} processes",
        flush=True,
    )
    snapshots: dict[int, dict[str, Any]] = {}
    stats_file = open(args.stats_file, "a") if args.stats_file else None  # noqa: SIM115 (closed below)
    next_report = started + args.report_interval
    try:
        while not all(s.get("done") for s in snapshots.values()) or len(snapshots) < len(processes):
            if args.duration and time.monotonic() - started >= args.duration:
                stop.set()
            try:
                snapshot = reports.get(timeout=0.5)
                snapshots[snapshot["process"]] = snapshot
                if stats_file:
                    stats_file.write(
                        json.dumps({"elapsed_s": round(time.monotonic() - started, 2), **snapshot}) + "\n"
                    )
                    stats_file.flush()  # read while the simulator runs (bench/fleet.py)
            except queue.Empty:
                if not any(p.is_alive() for p in processes):
                    break
            if time.monotonic() >= next_report and snapshots:
                print(status_line(time.monotonic() - started, snapshots, args.devices), flush=True)
                next_report = time.monotonic() + args.report_interval
    finally:
        stop.set()
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.terminate()
        if stats_file:
            stats_file.close()
    elapsed = time.monotonic() - started
    print(status_line(elapsed, snapshots, args.devices), flush=True)
    print(summary(elapsed, snapshots, args), flush=True)
    failed = [p for p in processes if p.exitcode not in (0, None)]
    enroll_failed = sum(s["enroll_failed"] for s in snapshots.values())
    return 1 if failed or enroll_failed else 0


if __name__ == "__main__":
    sys.exit(main())
