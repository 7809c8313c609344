"""The fleet simulator (``python -m agent.sim``, issue 13 §1) against the real control
plane: twenty virtual devices in two processes enroll through the API, connect to the
broker's TLS listener, follow a staged rollout until every one is ``active``, send
telemetry that lands in PostgreSQL under each device's own name, and the flapping one
loses its connection (the broker publishes its will) and comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from agent.sim.cli import device_specs, parser
from agent.sim.device import Behaviour
from fleet.core.choices import Role
from fleet.core.services import api_token_create, user_ensure
from fleet.devices.models import Device, DeviceEvent, TelemetryWindow
from fleet.rollouts import services as rollouts
from fleet.rollouts.choices import AssignmentState, RolloutState
from fleet.rollouts.models import RolloutPolicy
from tests.conftest import wait_until
from tests.e2e.conftest import evaluate_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    # Desired states go out through chunked Celery tasks, on a real worker.
    pytest.mark.usefixtures("broker_settings", "celery_worker_process"),
]
DEVICES = 20


@pytest.fixture
def run_simulator(control_plane, bridge, broker, enrollment, tmp_path):
    """Start the simulator as an operator runs it, in its own processes; its output is
    kept, and it is stopped (Ctrl-C) at the end of the test."""
    started = []

    def run(*extra: str, devices: int = DEVICES, env: dict[str, str] | None = None) -> dict:
        args = [
            "--url",
            control_plane["url"],
            "--root-key",
            control_plane["root_key_hex"],
            "--ca-file",
            str(broker.ca_file),
            "--devices",
            str(devices),
            "--processes",
            "2",
            "--id-prefix",
            f"sim-{enrollment['run']}",
            "--seed",
            enrollment["run"],
            "--telemetry-interval",
            "0.5",
            "--install-seconds",
            "0.05",
            "--report-interval",
            "2",
            "--cache-dir",
            str(tmp_path / "cache"),
            *extra,
        ]
        process = subprocess.Popen(
            [sys.executable, "-m", "agent.sim", *args],
            env={**os.environ, "FLEET_SIM_ENROLLMENT_TOKEN": enrollment["key"], **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
        reader.start()
        running = {
            "process": process,
            "output": output,
            "reader": reader,
            "specs": device_specs(parser().parse_args(args)),
        }
        started.append(running)
        return running

    yield run
    for running in started:
        process = running["process"]
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        running["reader"].join(10)


def all_online(simulator, ids: list[str], *, expected: int) -> bool:
    assert simulator["process"].poll() is None, "".join(simulator["output"])
    devices = Device.objects.filter(device_id__in=ids)
    return devices.count() == len(ids) and devices.filter(online=True).count() >= expected


def stopped(simulator) -> str:
    process = simulator["process"]
    process.send_signal(signal.SIGINT)
    process.wait(60)
    return "".join(simulator["output"])


def roll_out_at_once(control_plane, device_ids: list[str], *, name: str):
    """2.0.0 (int8) to ``device_ids`` in one stage, no install failure allowed, evaluated
    until it ends (completed, paused or rolled back)."""
    policy = RolloutPolicy.objects.create(
        name=name,
        stages=[{"kind": "percent", "value": 100, "soak_seconds": 1}],
        gates={"max_install_failure_rate": 0.0},
        pickup_timeout_seconds=60,
    )
    rollout = rollouts.rollout_create(
        model=control_plane["model"],
        version=control_plane["artifacts"][("2.0.0", "int8")].version,
        targets={"devices": device_ids},
        policy=policy,
    )
    rollout = rollouts.rollout_start(rollout=rollout)
    ends = {RolloutState.COMPLETED, RolloutState.PAUSED, RolloutState.ROLLED_BACK}
    evaluate_until(rollout, ends, timeout=60)
    return rollout


def test_a_simulated_fleet_enrolls_follows_a_staged_rollout_reports_telemetry_and_reconnects(
    control_plane, run_simulator
):
    simulator = run_simulator("--flap-fraction", "0.05", "--flap-online-s", "2", "--flap-offline-s", "1")
    specs = simulator["specs"]
    ids = [spec.device_id for spec in specs]
    (flapper,) = [spec.device_id for spec in specs if spec.behaviour == Behaviour.FLAPPING]

    wait_until(
        lambda: all_online(simulator, ids, expected=DEVICES - 1),  # the flapping one may be down
        timeout=90,
        message="twenty enrolled devices online",
    )
    int8 = {d.device_id: d.supports_int8 for d in Device.objects.filter(device_id__in=ids)}
    assert int8 == {spec.device_id: spec.int8 for spec in specs}  # the identity each sent

    # A staged rollout, 10 / 50 / 100 %, with the install-failure gate on.
    artifacts = control_plane["artifacts"]
    staged = RolloutPolicy.objects.create(
        name="sim-staged",
        stages=[{"kind": "percent", "value": v, "soak_seconds": 1} for v in (10, 50, 100)],
        gates={"max_install_failure_rate": 0.0},
        pickup_timeout_seconds=60,
    )
    rollout = rollouts.rollout_create(
        model=control_plane["model"],
        version=artifacts[("2.0.0", "int8")].version,
        targets={"devices": ids},
        policy=staged,
    )
    rollout = rollouts.rollout_start(rollout=rollout)
    evaluate_until(
        rollout, {RolloutState.COMPLETED, RolloutState.PAUSED, RolloutState.ROLLED_BACK}, timeout=90
    )
    assert rollout.state == RolloutState.COMPLETED, rollout.last_decision
    states = dict(rollout.assignments.values_list("device__device_id", "state"))
    assert states == dict.fromkeys(ids, AssignmentState.ACTIVE)
    wait_until(
        lambda: (
            Device.objects.filter(device_id__in=ids, reported_models__digits__version="2.0.0").count()
            == DEVICES
        ),
        timeout=30,
        message="every device to report 2.0.0",
    )
    for device in Device.objects.filter(device_id__in=ids):
        assert device.reported_models["digits"]["variant"] == (
            "int8" if int8[device.device_id] else "float32"
        )

    # Telemetry of 2.0.0 lands in PostgreSQL under each device's own name.
    def telemetry_from_everyone() -> bool:
        rows = TelemetryWindow.objects.filter(device__device_id__in=ids, model="digits", version="2.0.0")
        return rows.values("device").distinct().count() == DEVICES

    wait_until(telemetry_from_everyone, timeout=30, message="telemetry from every device")
    row = TelemetryWindow.objects.filter(device__device_id=ids[0], version="2.0.0").order_by("-id").first()
    assert row.variant == ("int8" if int8[ids[0]] else "float32")
    assert row.inferences > 0 and row.latency_p50_ms > 0

    # The flapping device drops off (its will says offline) and comes back, again and again.
    def flapper_online() -> bool:
        return Device.objects.get(device_id=flapper).online

    for _ in range(2):
        wait_until(lambda: not flapper_online(), timeout=15, interval=0.05, message=f"{flapper} to drop")
        wait_until(flapper_online, timeout=15, interval=0.05, message=f"{flapper} to come back")

    # Ctrl-C: every device says goodbye (retained offline status), then the figures.
    output = stopped(simulator)
    print(output)  # the simulator's status lines and figures, for -s
    assert simulator["process"].returncode == 0, output
    wait_until(
        lambda: not Device.objects.filter(device_id__in=ids, online=True).exists(),
        timeout=30,
        message="every device offline after the simulator stopped",
    )
    assert f"enrollment: {DEVICES} devices in" in output, output
    assert "devices per process: 10" in output, output


def test_simulated_install_failures_carry_their_reason_and_trip_the_failure_gate(
    control_plane, run_simulator
):
    simulator = run_simulator(
        "--offline-fraction", "0.1", "--fail-fraction", "0.3", "--fail-reason", "golden_failed", devices=10
    )
    specs = simulator["specs"]
    ids = [spec.device_id for spec in specs]
    (offline,) = [spec.device_id for spec in specs if spec.behaviour == Behaviour.OFFLINE]
    failing = [spec.device_id for spec in specs if spec.behaviour == Behaviour.FAILING]
    assert len(failing) == 3  # the gate forgives a single failure among few devices
    wait_until(lambda: all_online(simulator, ids, expected=9), timeout=90, message="nine of ten online")
    assert not Device.objects.get(device_id=offline).online  # enrolled, and never connected

    connected = [device_id for device_id in ids if device_id != offline]
    rollout = roll_out_at_once(control_plane, connected, name="sim-all-at-once")
    assert rollout.state in (RolloutState.PAUSED, RolloutState.ROLLED_BACK), rollout.last_decision
    assert "install failures" in rollout.last_decision, rollout.last_decision
    events = DeviceEvent.objects.filter(device__device_id__in=failing, type="failed")
    assert sorted(events.values_list("device__device_id", "reason", "model")) == [
        (device_id, "golden_failed", "digits") for device_id in sorted(failing)
    ]
    # Positive control: the others installed it, as the same events say.
    assert DeviceEvent.objects.filter(device__device_id__in=connected, type="active").count() >= 1
    for device in Device.objects.filter(device_id__in=failing):
        assert "digits" not in (device.reported_models or {})


def test_a_bulk_provisioned_simulated_fleet_connects_and_completes_a_rollout(control_plane, run_simulator):
    """--bulk: each process provisions its devices through POST /api/v1/devices/provision
    with an admin's API token (no enrollment token at all), then runs them as usual."""
    admin = user_ensure(username="sim-admin", role=Role.ADMIN)
    simulator = run_simulator(
        "--bulk",
        "--bulk-batch",
        "4",
        devices=12,
        env={
            "FLEET_SIM_ENROLLMENT_TOKEN": "",
            "FLEET_SIM_ADMIN_TOKEN": api_token_create(user=admin, name="sim")[1],
        },
    )
    specs = simulator["specs"]
    ids = [spec.device_id for spec in specs]
    wait_until(lambda: all_online(simulator, ids, expected=12), timeout=90, message="twelve devices online")
    int8 = dict(Device.objects.filter(device_id__in=ids).values_list("device_id", "supports_int8"))
    assert int8 == {spec.device_id: spec.int8 for spec in specs}
    assert not Device.objects.filter(device_id__in=ids, enrolled_with__isnull=False).exists()

    rollout = roll_out_at_once(control_plane, ids, name="sim-bulk")
    assert rollout.state == RolloutState.COMPLETED, rollout.last_decision
    output = stopped(simulator)
    assert simulator["process"].returncode == 0, output
    assert "enrollment: 12 devices in" in output, output
