"""The whole loop at fleet size (issue 13 §2): the production processes, N simulated
devices, and a staged rollout 1 % -> 10 % -> 50 % -> 100 % with gates on, each figure
printed beside its target, measured in the same run.

Real parts: Mosquitto with the project's config (TLS for devices), PostgreSQL (a database
of its own, dropped afterwards), Redis, and the Procfile's processes: gunicorn, a Celery
worker, Celery beat (which runs the gate evaluator every 5 s: one "beat"), and 1 or 2
ingest bridges (``manage.py mqtt_ingest`` on the shared subscription). The devices are
``python -m agent.sim --bulk`` processes: provisioned through ``POST
/api/v1/devices/provision``, connected over mqtts with their own logins, verifying every
desired state and manifest with the agent's code, sending telemetry every 30 s.

    .venv/bin/python bench/fleet.py --devices 10000 [--bridges 2] [--json var/bench-fleet.json]

Figures and targets:

* each stage's devices ``active`` (the bridge received their ``active`` event): time from
  the stage's start, p50/p95/max, beside the fan-out alone for that stage's devices in
  this run, by bench/fanout.py's method: a subscriber on ``fleet/v1/devices/+/desired``
  notes when the last of them got its new desired state; target: max <= 2x. A bare paho
  publisher's time for as many messages of the same size is printed too, for reference;
* gate decision: time from the moment the stored telemetry first satisfies the gates
  (every stage device active, ``min_devices`` devices with a candidate window begun after
  the stage started, ``min_inferences``) to the stage's promotion; target <= 2 beats;
* ingest lag p95 (device window end ``ts`` -> the row is visible in PostgreSQL, seen by a
  poll every 0.2 s, so at most 0.2 s high) while every device sends telemetry; target <= 2 s;
* average CPU share of a core per process over the rollout (psutil; PostgreSQL: the
  backends of the bench's database); target: none above 80 %.

The simulated install takes no time (``--install-seconds 0``): a stage's time is the
control plane's and the protocol's (desired state, manifest and blob through the shared
cache, signature checks, hashing, events), not a pretend model load. Bulk requests carry
10 devices: Mosquitto 2.0's dynamic-security plugin rewrites its whole file per change, so
a request's time grows with the fleet (about 0.3 s per change at 10,000 devices, two
changes a device, two simulator processes queued on one broker), and gunicorn's timeout
(raised to 120 s here, GUNICORN_CMD_ARGS) must not cut it.

Exit 1 if a target fails. The gates use ``soak_seconds`` 0 and small ``min_devices`` /
``min_inferences`` (``--min-devices``, ``--min-inferences``) so that a stage decides as
soon as the real telemetry allows; they still decide on that telemetry.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATABASE = os.environ.get("BENCH_FLEET_DATABASE", "postgres://postgres@127.0.0.1:5432/modelfleet_bench_fleet")
BEAT_S = 5.0  # rollouts_evaluate_running's interval (fleet/core/beat.py, docs/rollouts.md)
STAGES = (1, 10, 50, 100)
TARGET_STAGE_RATIO = 2.0
TARGET_GATE_BEATS = 2.0
TARGET_LAG_P95_S = 2.0
TARGET_CPU_SHARE = 0.80
PROCFILE = ROOT / "Procfile"
# The bench's own PostgreSQL connections (its queries are not the control plane's cost).
BENCH_BACKENDS: set[int] = set()


def _backend_pid(cursor) -> int:
    cursor.execute("SELECT pg_backend_pid()")
    return cursor.fetchone()[0]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--bridges", type=int, choices=(1, 2), default=1)
    parser.add_argument("--sim-processes", type=int, default=2)
    parser.add_argument("--telemetry-interval", type=float, default=30.0)
    parser.add_argument(
        "--min-devices",
        type=int,
        default=4,
        help="the gates' min_devices and each stage's (4: the floor of a single arm)",
    )
    parser.add_argument("--min-inferences", type=int, default=100)
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--json", default=str(ROOT / "var" / "bench-fleet.json"), help="figures as JSON")
    parser.add_argument(
        "--timeout",
        type=float,
        default=3 * 3600,
        help="give up a phase after this many seconds (provisioning 10,000 devices takes about an hour here)",
    )
    return parser.parse_args()


# --- set-up


def fresh_database(*, create: bool) -> None:
    import psycopg

    name = DATABASE.rsplit("/", 1)[1]
    with psycopg.connect(DATABASE.rsplit("/", 1)[0] + "/postgres", autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if create:
            connection.execute(f'CREATE DATABASE "{name}"')


def bench_env(work: Path, broker, web_port: int, web_workers: int) -> dict[str, str]:
    """The processes' environment: the Procfile's variables, this run's services."""
    return {
        "DJANGO_SETTINGS_MODULE": "fleet.settings",
        # DEBUG=1 as in the demo and bench/fanout.py: plain HTTP without a proxy in front.
        "DEBUG": "1",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "VAR_DIR": str(work / "var"),
        "DATABASE_URL": DATABASE,
        "REDIS_URL": os.environ.get("BENCH_FLEET_REDIS_URL", "redis://127.0.0.1:6379/5"),
        "CACHE_URL": os.environ.get("BENCH_FLEET_CACHE_URL", "redis://127.0.0.1:6379/6"),
        "CELERY_QUEUE": f"bench-fleet-{uuid.uuid4().hex[:6]}",
        "MQTT_URL": broker.url,
        "MQTT_PUBLIC_URL": broker.tls_url,
        "MQTT_ADMIN_PASSWORD": broker.admin_password,
        "MQTT_PUBLISHER_PASSWORD": broker.publisher_password,
        "MQTT_INGEST_PASSWORD": broker.ingest_password,
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{web_port}",
        "WEB_BIND": f"127.0.0.1:{web_port}",
        "WEB_WORKERS": str(web_workers),
        "GUNICORN_CMD_ARGS": "--timeout 120",
        "SIGNING_KEY_AUTOGENERATE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def procfile() -> dict[str, str]:
    lines = (line.split(":", 1) for line in PROCFILE.read_text().splitlines() if line and line[0] != "#")
    return {name.strip(): command.strip() for name, command in lines}


def start(name: str, command: str, env: dict[str, str], work: Path) -> subprocess.Popen:
    """A Procfile line, as honcho runs it (a shell expands its variables), in the venv."""
    venv = str(Path(sys.executable).parent)
    return subprocess.Popen(
        ["bash", "-c", f"exec {command}"],
        cwd=ROOT,
        env={**os.environ, **env, "PATH": f"{venv}:{os.environ['PATH']}"},
        stdout=(work / f"{name}.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def world(work: Path) -> tuple:
    """Versions 1.0.0 (everyone runs it first) and 2.0.0 (the rollout), ready and signed; the
    root of trust; an admin's API token for the simulator's bulk provisioning."""
    from django.core.files.uploadedfile import TemporaryUploadedFile
    from django.core.management import call_command

    from fleet.core.choices import Role
    from fleet.core.services import api_token_create, user_ensure
    from fleet.registry import services
    from fleet.registry.trust import trust_bootstrap_dev
    from samples import digits

    call_command("migrate", verbosity=0)
    root_key = trust_bootstrap_dev(root_key_path=work / "root.pem", publish="now")
    model = services.model_create(name="digits", labels=digits.LABELS)
    versions = {}
    for number in ("1.0.0", "2.0.0"):
        version = versions[number] = services.version_create(model=model, version=number)
        for variant, data in digits.build_digits_models(version=number).items():
            upload = TemporaryUploadedFile(f"{variant}.tflite", "application/octet-stream", len(data), None)
            upload.write(data)
            upload.seek(0)
            artifact = services.artifact_upload(version=version, variant=variant, upload=upload)
            assert services.artifact_process(artifact_id=artifact.pk).status == "ready"
    admin = user_ensure(username="bench-admin", role=Role.ADMIN)
    return model, versions, root_key, api_token_create(user=admin, name="bench")[1]


# --- measuring


class CpuMeter:
    """CPU seconds of named process trees, and of the PostgreSQL backends serving the
    bench's database (they come and go: sampled every second, each pid's growth counted)."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self.last: dict[tuple[str, int], float] = {}
        self.total: dict[str, float] = dict.fromkeys([*roots, "postgresql"], 0.0)
        self.started = self.stopped = self.started_wall = 0.0
        self.running = False

    def _pids(self) -> dict[str, list[int]]:
        import psutil

        pids: dict[str, list[int]] = {}
        for name, pid in self.roots.items():
            try:
                root = psutil.Process(pid)
                pids[name] = [root.pid, *(child.pid for child in root.children(recursive=True))]
            except psutil.NoSuchProcess:
                pids[name] = []
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            pids["postgresql"] = [row[0] for row in cursor.fetchall() if row[0] not in BENCH_BACKENDS]
        return pids

    def sample(self) -> None:
        import psutil

        for name, pids in self._pids().items():
            for pid in pids:
                try:
                    process = psutil.Process(pid)
                    times = process.cpu_times()
                    born = process.create_time()
                except psutil.NoSuchProcess:
                    continue
                now = times.user + times.system
                before = self.last.get((name, pid))
                if before is None:
                    # A process born since the start (a backend of a request or a task)
                    # counts whole; one older counts from now. A backend that lives less
                    # than the 1 s between samples is missed: PostgreSQL's share is low.
                    before = 0.0 if self.running and born >= self.started_wall else now
                if self.running:
                    self.total[name] += now - before
                self.last[(name, pid)] = now

    def sample_until(self, stop: threading.Event) -> None:
        from django.db import connection

        with connection.cursor() as cursor:
            BENCH_BACKENDS.add(_backend_pid(cursor))
        while not stop.wait(1.0):
            self.sample()
        connection.close()

    def start(self) -> None:
        self.sample()
        self.running = True
        self.started = time.monotonic()
        self.started_wall = time.time()

    def stop(self) -> dict[str, float]:
        self.sample()
        self.running = False
        self.stopped = time.monotonic()
        return {name: seconds / (self.stopped - self.started) for name, seconds in self.total.items()}


class RowClock:
    """When each telemetry row became visible: ``max(id)`` polled every 0.2 s."""

    def __init__(self) -> None:
        self.samples: list[tuple[int, float]] = []  # (max id, wall time), ids ascending
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from django.db import connection

        while not self.stop.is_set():
            with connection.cursor() as cursor:
                if not self.samples:
                    BENCH_BACKENDS.add(_backend_pid(cursor))
                cursor.execute("SELECT coalesce(max(id), 0) FROM devices_telemetrywindow")
                self.samples.append((cursor.fetchone()[0], time.time()))
            self.stop.wait(0.2)
        connection.close()

    def seen_at(self, row_id: int) -> float | None:
        index = bisect.bisect_left(self.samples, (row_id, 0.0))
        return self.samples[index][1] if index < len(self.samples) else None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class DesiredWatcher:
    """bench/fanout.py's method for the rollout's own fan-out: a subscriber on every
    device's desired topic notes when each device's new desired state arrived (live
    messages only; the retained ones it gets on subscribing are old)."""

    def __init__(self, broker, password: str) -> None:
        from fleet.mqtt.broker import mqtt_client

        self.arrivals: dict[str, list[float]] = {}
        self.client = mqtt_client(
            broker.url, client_id="bench-desired", username="fleet-bench", password=password
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.subscribe("fleet/v1/devices/+/desired", qos=1)
        assert subscribed.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        if not message.retain:
            self.arrivals.setdefault(message.topic.split("/")[3], []).append(time.time())

    def first_after(self, device_id: str, start: float) -> float | None:
        return next((at for at in self.arrivals.get(device_id, []) if at >= start), None)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def bare_fanout(broker, size: int, counts: list[int]) -> tuple[dict[int, float], str]:
    """bench/fanout.py's yardstick: a bare paho client publishes ``count`` messages of the
    desired state's size at QoS 1 to a subscriber; seconds until the subscriber has them."""
    from fleet.mqtt.broker import mqtt_client

    password = secrets.token_urlsafe(12)
    broker.admin().command(
        {
            "command": "createRole",
            "rolename": "fleet-bench",
            "acls": [
                *[
                    {"acltype": acl, "topic": "bench/fanout/#", "priority": 0, "allow": True}
                    for acl in ("publishClientSend", "subscribePattern", "publishClientReceive")
                ],
                # The watcher of the rollout's own fan-out (DesiredWatcher): read only.
                *[
                    {"acltype": acl, "topic": "fleet/v1/devices/+/desired", "priority": 0, "allow": True}
                    for acl in ("subscribePattern", "publishClientReceive")
                ],
            ],
        },
        {
            "command": "createClient",
            "username": "fleet-bench",
            "password": password,
            "roles": [{"rolename": "fleet-bench"}],
        },
    )
    received = [0]
    done = threading.Condition()

    def on_message(client, userdata, message) -> None:
        with done:
            received[0] += 1
            done.notify_all()

    subscriber = mqtt_client(broker.url, client_id="bench-sub", username="fleet-bench", password=password)
    subscriber.on_message = on_message
    subscribed = threading.Event()
    subscriber.on_subscribe = lambda *args: subscribed.set()
    subscriber.subscribe("bench/fanout/#", qos=1)
    assert subscribed.wait(10)
    publisher = mqtt_client(broker.url, client_id="bench-pub", username="fleet-bench", password=password)
    payload = secrets.token_bytes(size)
    seconds = {}
    for count in counts:
        with done:
            received[0] = 0
        started = time.perf_counter()
        for n in range(count):
            publisher.publish(f"bench/fanout/d-{n:05d}", payload, qos=1)
        with done:
            if not done.wait_for(lambda count=count: received[0] >= count, timeout=300):
                raise RuntimeError(f"bare fan-out: {received[0]} of {count} arrived")
        seconds[count] = time.perf_counter() - started
    for client in (publisher, subscriber):
        client.disconnect()
        client.loop_stop()
    return seconds, password


def wait(what: str, check, timeout: float, processes: dict[str, subprocess.Popen], every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        for name, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited ({process.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(every)


# --- the run


def run(args: argparse.Namespace, work: Path) -> dict:
    from fleet.mqtt.broker import free_port, start_broker

    broker = start_broker(work / "broker").provision()
    processes: dict[str, subprocess.Popen] = {}
    try:
        web_port = free_port()
        env = bench_env(work, broker, web_port, args.web_workers)
        os.environ.update(env)
        fresh_database(create=True)
        import django

        django.setup()
        log("migrating, building digits 1.0.0 and 2.0.0 (float32 + int8), root of trust")
        model, versions, root_key, admin_token = world(work)
        commands = procfile()
        for name in ("web", "worker", "beat"):
            processes[name] = start(name, commands[name], env, work)
        for number in range(args.bridges):
            # Each bridge its own client id (one id twice: the broker kicks one for the other).
            name = f"bridge-{number + 1}"
            processes[name] = start(name, f"{commands['ingest']} --client-id fleet-ingest-{name}", env, work)
        wait("the web app", lambda: _http_up(env["PUBLIC_BASE_URL"]), 60, processes, every=0.5)
        sim_cmd = [
            sys.executable, "-m", "agent.sim", "--bulk", "--url", env["PUBLIC_BASE_URL"],
            "--root-key", root_key, "--ca-file", str(broker.ca_file), "--devices", str(args.devices),
            "--processes", str(args.sim_processes), "--id-prefix", "fl", "--seed", "bench",
            "--bulk-batch", "10", "--install-seconds", "0",
            "--telemetry-interval", str(args.telemetry_interval), "--report-interval", "30",
            "--cache-dir", str(work / "sim-cache"), "--stats-file", str(work / "sim-stats.jsonl"),
            "--profile", "1.0.0:accuracy=0.95", "--profile", "2.0.0:accuracy=0.96",
        ]  # fmt: skip
        log(f"simulator: {shlex.join(sim_cmd[2:])}")
        processes["simulator"] = subprocess.Popen(
            sim_cmd,
            cwd=ROOT,
            env={**os.environ, "FLEET_SIM_ADMIN_TOKEN": admin_token},
            stdout=(work / "simulator.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return measure(args, work, broker, processes, model, versions)
    finally:
        for name, process in reversed(processes.items()):
            if process.poll() is None:
                process.send_signal(signal.SIGINT if name == "simulator" else signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        broker.stop()
        from django.db import connections

        connections.close_all()
        fresh_database(create=False)


def _http_up(base: str) -> bool:
    import requests

    try:
        return requests.get(f"{base}/api/v1/", timeout=5).status_code < 500
    except requests.RequestException:  # not listening yet, or still loading
        return False


def measure(args, work: Path, broker, processes, model, versions) -> dict:
    from django.db.models import Max, Min

    from fleet.devices.desired import desired_state_envelope
    from fleet.devices.models import Device, DeviceEvent, TelemetryWindow
    from fleet.devices.services import devices_assign
    from fleet.rollouts import services as rollouts
    from fleet.rollouts.choices import AssignmentState, RolloutState
    from fleet.rollouts.models import Rollout, RolloutPolicy

    n = args.devices
    started = time.monotonic()
    online = lambda: Device.objects.filter(online=True).count()  # noqa: E731
    wait(f"{n} devices online", lambda: online() >= n, args.timeout, processes, every=2)
    provisioned_s = time.monotonic() - started
    stats = [json.loads(line) for line in (work / "sim-stats.jsonl").read_text().splitlines()]
    enroll_s = max((s["enroll_s"] or 0) for s in stats)
    log(f"{n} devices provisioned in {enroll_s:.0f} s and online after {provisioned_s:.0f} s")

    # Everyone runs 1.0.0 first, so that every device sends telemetry from now on.
    devices = list(Device.objects.all())
    by_variant = {a.variant: a for a in versions["1.0.0"].artifacts.all()}
    int8 = [d for d in devices if d.supports_int8]
    floats = [d for d in devices if not d.supports_int8]
    baseline_started = time.monotonic()
    for group, variant in ((int8, "int8"), (floats, "float32")):
        if group:
            devices_assign(devices=group, artifacts={"digits": by_variant[variant]})
    wait(
        "every device to report 1.0.0",
        lambda: Device.objects.filter(reported_models__digits__version="1.0.0").count() >= n,
        args.timeout,
        processes,
    )
    baseline_s = time.monotonic() - baseline_started
    log(f"1.0.0 on all {n} devices in {baseline_s:.1f} s")

    size = len(
        desired_state_envelope(device_id="fl-00000", generation=2, artifacts={"digits": by_variant["int8"]})
    )
    stage_sizes = [max(1, round(n * percent / 100)) for percent in STAGES]
    # A stage covers at least the gates' minimum, or they could never decide on it.
    stage_sizes = [max(size, args.min_devices) for size in stage_sizes]
    # The devices each stage adds: its cover minus the earlier stages'.
    fresh_counts = [cover - before for cover, before in zip(stage_sizes, [0, *stage_sizes], strict=False)]
    bare, bench_password = bare_fanout(broker, size, fresh_counts)
    log("bare fan-out: " + ", ".join(f"{count}: {s:.2f} s" for count, s in bare.items()))
    watcher = DesiredWatcher(broker, bench_password)

    clock = RowClock()
    clock.thread.start()
    from django.db import connection

    with connection.cursor() as cursor:
        BENCH_BACKENDS.add(_backend_pid(cursor))
    meter = CpuMeter(
        {name: process.pid for name, process in processes.items()} | {"broker": broker.process.pid}
    )
    meter.start()
    sampler_stop = threading.Event()
    sampler = threading.Thread(target=meter.sample_until, args=(sampler_stop,), daemon=True)
    sampler.start()
    first_row = TelemetryWindow.objects.aggregate(m=Max("id"))["m"] or 0
    sim_published_before = _sim_published(work)

    policy = RolloutPolicy.objects.create(
        name="bench-staged",
        stages=[
            {"kind": "percent", "value": percent, "min_devices": args.min_devices, "soak_seconds": 0}
            for percent in STAGES
        ],
        gates={
            "max_install_failure_rate": 0.05,
            "max_error_rate": 0.05,
            "min_inferences": args.min_inferences,
            "min_devices": args.min_devices,
        },
        pickup_timeout_seconds=600,
    )
    rollout = rollouts.rollout_create(
        model=model,
        version=versions["2.0.0"],
        targets={"devices": [d.device_id for d in devices]},
        policy=policy,
    )
    rollout = rollouts.rollout_start(rollout=rollout)
    stage_starts: dict[int, datetime] = {}
    finished_at = None
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        rollout = Rollout.objects.get(pk=rollout.pk)
        if rollout.stage_started_at and rollout.current_stage not in stage_starts:
            stage_starts[rollout.current_stage] = rollout.stage_started_at
            log(f"stage {rollout.current_stage} ({STAGES[rollout.current_stage]} %) started")
        if rollout.state != RolloutState.RUNNING:
            finished_at = rollout.audit.order_by("-at").values_list("at", flat=True).first()
            break
        time.sleep(0.5)
    if rollout.state != RolloutState.COMPLETED:
        raise RuntimeError(f"the rollout ended {rollout.state}: {rollout.last_decision}")
    log("rollout completed; one more telemetry interval for the ingest figures")
    time.sleep(args.telemetry_interval + 5)
    sampler_stop.set()
    sampler.join()
    cpu = meter.stop()
    clock.stop.set()
    clock.thread.join()
    measured_s = meter.stopped - meter.started
    sim_published = _sim_published(work) - sim_published_before

    # Per stage: active times, and the gate's evidence vs its decision.
    watcher.close()
    device_ids = dict(Device.objects.values_list("pk", "device_id"))
    # A device is active for the control plane when the bridge receives its `active` event.
    active_at = dict(
        DeviceEvent.objects.filter(type="active", model="digits", version="2.0.0")
        .values("device_id")
        .annotate(at=Min("received_at"))
        .values_list("device_id", "at")
    )
    assignments = [
        (stage, active_at[device], device)
        for stage, device in rollout.assignments.filter(state=AssignmentState.ACTIVE).values_list(
            "stage", "device_id"
        )
    ]
    stages = []
    rows = list(
        TelemetryWindow.objects.filter(id__gt=first_row, version="2.0.0")
        .order_by("id")
        .values_list("id", "device_id", "window_start", "inferences")
    )
    for index, percent in enumerate(STAGES):
        start = stage_starts[index]
        decided = stage_starts.get(index + 1, finished_at)
        covered = [(at, device) for stage, at, device in assignments if stage is not None and stage <= index]
        fresh = [(at - start).total_seconds() for stage, at, _ in assignments if stage == index]
        # The fan-out alone: until the last of this stage's devices had its desired state.
        arrivals = [
            watcher.first_after(device_ids[device], start.timestamp())
            for stage, _, device in assignments
            if stage == index
        ]
        if None in arrivals:
            raise RuntimeError(f"stage {index}: a desired state never reached the watcher")
        fanout = max(arrivals) - start.timestamp()
        all_active = max(at for at, _ in covered).timestamp()
        # The gates' evidence: candidate windows begun after the stage started.
        devices_seen: set[int] = set()
        inferences = 0
        evidence = None
        for row_id, device, window_start, count in rows:
            if window_start < start:
                continue
            devices_seen.add(device)
            inferences += count
            if len(devices_seen) >= args.min_devices and inferences >= args.min_inferences:
                evidence = clock.seen_at(row_id)
                break
        ready = max(all_active, evidence or float("inf"))
        stages.append(
            {
                "percent": percent,
                "devices": len(fresh),
                "active_p50_s": round(percent_or_nan(fresh, 0.5), 2),
                "active_p95_s": round(percent_or_nan(fresh, 0.95), 2),
                "active_max_s": round(max(fresh), 2) if fresh else None,
                "fanout_s": round(fanout, 2),
                "bare_fanout_s": round(bare.get(len(fresh), float("nan")), 2),
                "gate_decision_after_evidence_s": round(decided.timestamp() - ready, 2),
            }
        )
    lags = []
    for row_id, ts in TelemetryWindow.objects.filter(id__gt=first_row).values_list("id", "ts"):
        seen = clock.seen_at(row_id)
        if seen is not None:
            lags.append(seen - ts.timestamp())
    messages = TelemetryWindow.objects.filter(id__gt=first_row).count()
    sizes = _telemetry_size(broker, devices[0].device_id)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "devices": n,
        "bridges": args.bridges,
        "sim_processes": args.sim_processes,
        "telemetry_interval_s": args.telemetry_interval,
        "beat_s": BEAT_S,
        "provisioning_s": round(enroll_s, 1),
        "online_after_s": round(provisioned_s, 1),
        "baseline_all_active_s": round(baseline_s, 1),
        "desired_state_bytes": size,
        "stages": stages,
        "ingest_lag_p50_s": round(percent_or_nan(lags, 0.5), 3),
        "ingest_lag_p95_s": round(percent_or_nan(lags, 0.95), 3),
        "ingest_rows": len(lags),
        "cpu_share": {name: round(share, 3) for name, share in cpu.items()},
        "measured_s": round(measured_s, 1),
        "per_device": {
            "messages_per_s": round(sim_published / measured_s / n, 5),
            "telemetry_windows_per_s": round(messages / measured_s / n, 5),
            "telemetry_payload_bytes": sizes,
        },
        "cpu_us_per_message": {
            name: round(cpu[name] * measured_s / sim_published * 1e6, 1)
            for name in cpu
            if name.startswith("bridge") or name in ("broker", "postgresql")
        },
    }
    result["cpu_us_per_message"]["bridges"] = round(
        sum(v for k, v in result["cpu_us_per_message"].items() if k.startswith("bridge-")), 1
    )
    return result


def percent_or_nan(values: list[float], q: float) -> float:
    return percentile(values, q) if values else float("nan")


def _sim_published(work: Path) -> int:
    """Messages the simulated devices have published so far (their last snapshots)."""
    latest: dict[int, int] = {}
    for line in (work / "sim-stats.jsonl").read_text().splitlines():
        snapshot = json.loads(line)
        latest[snapshot["process"]] = snapshot["published"]
    return sum(latest.values())


def _telemetry_size(broker, device_id: str) -> int | None:
    """The size of one device's telemetry message as the broker forwards it (payload and
    topic), read with the ingest account on that device's topic alone."""
    from fleet.mqtt.broker import mqtt_client

    sizes: list[int] = []
    got = threading.Event()
    client = mqtt_client(
        broker.url,
        client_id=f"bench-size-{uuid.uuid4().hex[:4]}",
        username="fleet-ingest",
        password=broker.ingest_password,
    )

    def on_message(c, u, message) -> None:
        sizes.append(len(message.payload) + len(message.topic))
        got.set()

    client.on_message = on_message
    client.subscribe(f"fleet/v1/devices/{device_id}/telemetry", qos=1)
    got.wait(120)
    client.disconnect()
    client.loop_stop()
    return sizes[0] if sizes else None


def report(result: dict) -> bool:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    ok = True
    table = Table(title=f"Fleet at {result['devices']:,} devices, {result['bridges']} ingest bridge(s)")
    for column in ("figure", "measured", "target", ""):
        table.add_column(column)

    def row(figure: str, measured: str, target: str, passed: bool | None) -> None:
        nonlocal ok
        ok = ok and passed is not False
        table.add_row(figure, measured, target, "" if passed is None else ("PASS" if passed else "FAIL"))

    row("bulk provisioning (simulator, all devices)", f"{result['provisioning_s']:.0f} s", "", None)
    row("1.0.0 on every device (fan-out + install)", f"{result['baseline_all_active_s']:.1f} s", "", None)
    for stage in result["stages"]:
        limit = TARGET_STAGE_RATIO * stage["fanout_s"]
        row(
            f"stage {stage['percent']} %: {stage['devices']:,} devices active p50 / p95 / max",
            f"{stage['active_p50_s']:.2f} / {stage['active_p95_s']:.2f} / {stage['active_max_s']:.2f} s",
            f"max <= 2 x fan-out {stage['fanout_s']:.2f} s = {limit:.2f} s",
            stage["active_max_s"] <= limit,
        )
        row(
            f"stage {stage['percent']} %: bare publisher, as many messages (reference)",
            f"{stage['bare_fanout_s']:.2f} s",
            "",
            None,
        )
        row(
            f"stage {stage['percent']} %: evidence -> gate decision",
            f"{stage['gate_decision_after_evidence_s']:.1f} s",
            f"<= 2 beats = {TARGET_GATE_BEATS * BEAT_S:.0f} s",
            stage["gate_decision_after_evidence_s"] <= TARGET_GATE_BEATS * BEAT_S,
        )
    row(
        f"ingest lag p95 ({result['ingest_rows']:,} rows; p50 {result['ingest_lag_p50_s']:.2f} s)",
        f"{result['ingest_lag_p95_s']:.2f} s",
        f"<= {TARGET_LAG_P95_S:.0f} s",
        result["ingest_lag_p95_s"] <= TARGET_LAG_P95_S,
    )
    for name, share in sorted(result["cpu_share"].items()):
        control_plane = name != "simulator"
        row(
            f"CPU, {name}" + ("" if control_plane else " (not a control-plane process)"),
            f"{share * 100:.0f} % of a core",
            f"<= {TARGET_CPU_SHARE * 100:.0f} %" if control_plane else "",
            share <= TARGET_CPU_SHARE if control_plane else None,
        )
    per_device = result["per_device"]
    row("per device: messages/s (all kinds)", f"{per_device['messages_per_s']:.4f}", "", None)
    row(
        "per device: telemetry bytes per window (payload + topic)",
        f"{per_device['telemetry_payload_bytes']}",
        "",
        None,
    )
    for name, micros in sorted(result["cpu_us_per_message"].items()):
        row(f"CPU per device message, {name}", f"{micros:.0f} µs", "", None)
    console.print(table)
    console.print("all targets met" if ok else "[red]a target failed[/red]")
    return ok


def main() -> int:
    args = parse_args()
    work = ROOT / "var" / f"bench-fleet-{uuid.uuid4().hex[:6]}"
    work.mkdir(parents=True)
    log(f"working in {work} (logs of every process there)")
    result = run(args, work)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    log(f"figures written to {args.json}")
    return 0 if report(result) else 1


if __name__ == "__main__":
    raise SystemExit(main())
