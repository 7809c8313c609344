"""Ingest bridge throughput and lag (devices issue, point 4), each figure beside its target.

A Mosquitto with the project's config (``start_broker``), N simulated devices with real
per-device credentials and ACLs (dynamic security) publishing telemetry windows at QoS 1
from separate processes, the bridge as its own process (``manage.py mqtt_ingest``)
against a PostgreSQL database of its own (created, migrated and dropped here), and, in the
same run, a bare paho subscriber process on the same topic that only counts.

* committed/s: telemetry rows in PostgreSQL over time (sampled ``count(*)``), sustained
  over the publishing period after a warm-up. Target >= 5,000/s.
* raw/s: what the bare subscriber received over the same period; committed / raw >= 70 %.
* lag: p95 of ``received_at - ts`` (``ts`` is the publish time in the payload,
  ``received_at`` the bridge's write time, just before its commit). Target <= 2 s.

    .venv/bin/python bench/ingest.py [--devices 200] [--rate 6000] [--seconds 20]

``--rate 0`` publishes flat out (the publishers' own limit) to find the capacity; the
offered load then exceeds what a consumer keeps up with and lag grows with the run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleet.mqtt.broker import start_broker  # noqa: E402

DATABASE = "modelfleet_bench"
SERVER_URL = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")
TARGET_COMMITTED_PER_S = 5000
TARGET_RATIO = 0.70
TARGET_P95_LAG_S = 2.0
DEVICES_PER_CONTROL_MESSAGE = 40  # dynamic-security commands per message (256 KiB packets)

TEMPLATE = (
    '{{"id": "{id}", "ts": "{ts}", "window_s": 30, "models": {{"digits": {{"version": "1.4.0", '
    '"variant": "int8", "inferences": 1520, "errors": 0, "latency_ms": {{"p50": 0.4, "p95": 0.9, '
    '"p99": 1.3}}, "feedback": {{"labeled": 210, "correct": 203}}}}}}, "health": {{"cpu_pct": 12.5, '
    '"rss_mb": 61.2, "temp_c": 48.0, "disk_free_mb": 812, "uptime_s": 86400}}, "dropped": 0}}'
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=200, help="simulated devices (default 200)")
    parser.add_argument(
        "--rate", type=int, default=6000, help="offered telemetry msg/s in total; 0 = flat out"
    )
    parser.add_argument("--seconds", type=float, default=20, help="publishing time (default 20)")
    parser.add_argument("--warmup", type=float, default=3, help="seconds left out of the rates (default 3)")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes (default 2)")
    parser.add_argument("--max-messages", type=int, default=300_000, help="bound on messages published")
    return parser.parse_args()


# --- processes: the devices, and the bare subscriber


def publisher(
    devices: list[tuple[str, str]], port: int, rate: float, seconds: float, limit: int, go, out
) -> None:
    """Devices of one process: one paho client per device (own credentials, MQTT v5), all
    driven by this one thread (no network thread per client). Publishes round robin at
    ``rate`` msg/s (0: as fast as it can), then waits for every PUBACK."""
    import paho.mqtt.client as mqtt

    acked = [0]

    def on_publish(client, userdata, mid, reason_code, properties):
        acked[0] += 1

    clients = []
    selector = selectors.DefaultSelector()
    for device_id, password in devices:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        client.username_pw_set(device_id, password)
        client.max_inflight_messages_set(100)
        client.on_publish = on_publish
        client.connect("127.0.0.1", port, keepalive=60)
        selector.register(client.socket(), selectors.EVENT_READ, client)
        clients.append((client, f"fleet/v1/devices/{device_id}/telemetry", device_id))

    def pump(timeout: float) -> None:
        for key, _ in selector.select(timeout):
            key.data.loop_read()

    deadline = time.monotonic() + 30
    while not all(client.is_connected() for client, _, _ in clients):
        pump(0.05)
        if time.monotonic() > deadline:
            raise RuntimeError("devices could not connect")
    out.put(("ready", None))
    go.wait()

    started, sent, last_misc = time.time(), 0, time.monotonic()
    end = started + seconds
    count = len(clients)
    while sent < limit:
        now = time.time()
        if now >= end:
            break
        due = limit if rate == 0 else min(limit, int((now - started) * rate))
        burst = min(due, sent + 200)  # then read acks, so the brokers' windows stay open
        while sent < burst:
            client, topic, device_id = clients[sent % count]
            stamp = datetime.now(UTC).isoformat()
            client.publish(topic, TEMPLATE.format(id=f"{device_id}-{sent}", ts=stamp), qos=1)
            sent += 1
        pump(0 if sent < due else 0.001)
        if time.monotonic() - last_misc > 1:
            last_misc = time.monotonic()
            for client, _, _ in clients:
                client.loop_misc()
                if client.want_write():
                    client.loop_write()
    finished = time.time()
    deadline = time.monotonic() + 30
    while acked[0] < sent and time.monotonic() < deadline:
        pump(0.05)
        for client, _, _ in clients:
            if client.want_write():
                client.loop_write()
    for client, _, _ in clients:
        client.disconnect()
    out.put(("done", (sent, acked[0], started, finished)))


def bare_subscriber(port: int, password: str, stop, out) -> None:
    """Receives the same telemetry at QoS 1 and only counts: the raw receive rate of a
    paho client on this machine, next to the bridge."""
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    received = [0]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-raw", protocol=mqtt.MQTTv5)
    client.username_pw_set("fleet-ingest", password)
    subscribed = threading.Event()

    def on_message(client, userdata, message):
        received[0] += 1

    client.on_message = on_message
    client.on_connect = lambda client, *args: client.subscribe("fleet/v1/devices/+/telemetry", qos=1)
    client.on_subscribe = lambda *args: subscribed.set()
    properties = Properties(PacketTypes.CONNECT)
    properties.ReceiveMaximum = 65_535  # as the bridge (fleet.devices.ingest.RECEIVE_MAXIMUM)
    client.connect("127.0.0.1", port, properties=properties)
    client.loop_start()
    subscribed.wait(10)
    out.put(("ready", None))
    samples = []
    while not stop.wait(0.25):
        samples.append((time.time(), received[0]))
    samples.append((time.time(), received[0]))
    client.disconnect()
    client.loop_stop()
    out.put(("samples", samples))


# --- setup


def postgres(database: str = "postgres"):
    import psycopg

    return psycopg.connect(f"{SERVER_URL}/{database}", autocommit=True)


def create_database(env: dict[str, str]) -> None:
    with postgres() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DATABASE}")
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)


def drop_database() -> None:
    with postgres() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


def create_devices(broker, count: int) -> list[tuple[str, str]]:
    """Devices with their own credentials and role (exactly DynSec.ensure_device's ACLs),
    in the broker and in the database. ensure_device opens three control connections per
    device (~135 ms); on a fresh broker the same commands go out in batches."""
    admin = broker.admin()
    devices = [(f"bench-{index:05d}", secrets.token_urlsafe(12)) for index in range(count)]
    for start in range(0, count, DEVICES_PER_CONTROL_MESSAGE):
        commands = []
        for device_id, password in devices[start : start + DEVICES_PER_CONTROL_MESSAGE]:
            role = f"device-{device_id}"
            commands += admin._role_commands(role, admin.device_acls(device_id))
            commands.append(
                {
                    "command": "createClient",
                    "username": device_id,
                    "password": password,
                    "clientid": device_id,
                    "roles": [{"rolename": role}],
                }
            )
        admin.command(*commands)
    with postgres(DATABASE) as conn, conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO devices_device (device_id, display_name, status, hardware, runtime, "
            "runtime_version, supports_int8, supported_ops, agent_version, tags, enrollment_code_sha256, "
            "online, applied_generation, reported_models, health, desired_generation, desired_artifacts, "
            "created_at) VALUES (%s, '', 'active', 'any', '', '', true, '[]', '', '[]', '', false, 0, "
            "'{}', '{}', 0, '{}', now())",
            [(device_id,) for device_id, _ in devices],
        )
    return devices


def wait_for_line(path: Path, text: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mqtt_ingest did not get ready:\n{path.read_text()}")
        time.sleep(0.05)


# --- measurement


class CpuMeter:
    """CPU seconds of named processes (with their children) and of the machine since creation."""

    def __init__(self, pids: dict[str, int]) -> None:
        import psutil

        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.start = {name: self._cpu(process) for name, process in self.processes.items()}
        self.machine_start = psutil.cpu_times()

    @staticmethod
    def _cpu(process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    def seconds(self) -> dict[str, float]:
        return {name: self._cpu(process) - self.start[name] for name, process in self.processes.items()}

    def machine_busy(self) -> float:
        import psutil

        now = psutil.cpu_times()
        total = sum(now) - sum(self.machine_start)
        idle = (now.idle + now.iowait) - (self.machine_start.idle + self.machine_start.iowait)
        return 1 - idle / total if total else 0.0


def rate_between(samples: list[tuple[float, int]], start: float, end: float) -> tuple[float, int, int]:
    """Rate over [start, end] from (time, cumulative count) samples, linearly interpolated."""

    def at(when: float) -> float:
        previous = samples[0]
        for sample in samples:
            if sample[0] >= when:
                if sample[0] == previous[0]:
                    return sample[1]
                share = (when - previous[0]) / (sample[0] - previous[0])
                return previous[1] + share * (sample[1] - previous[1])
            previous = sample
        return samples[-1][1]

    first, last = at(start), at(end)
    return (last - first) / (end - start), int(first), int(last)


def lag_p95(start: float, end: float) -> tuple[float, float]:
    with postgres(DATABASE) as conn:
        row = conn.execute(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lag), percentile_cont(0.95) WITHIN GROUP "
            "(ORDER BY lag) FROM (SELECT extract(epoch FROM received_at - ts) AS lag "
            "FROM devices_telemetrywindow WHERE ts BETWEEN to_timestamp(%s) AND to_timestamp(%s)) lags",
            (start, end),
        ).fetchone()
    return float(row[0] or 0), float(row[1] or 0)


def main() -> int:
    args = parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console()
    var_dir = Path(tempfile.mkdtemp(prefix="modelfleet-bench-ingest-"))
    context = multiprocessing.get_context("spawn")
    processes: list = []
    bridge = broker = None
    try:
        broker = start_broker(var_dir / "mosquitto").provision()
        ingest_password = broker.ingest_password
        env = {
            **os.environ,
            "DEBUG": "0",
            "SECRET_KEY": secrets.token_urlsafe(32),
            "VAR_DIR": str(var_dir),
            "DATABASE_URL": f"{SERVER_URL}/{DATABASE}",
            "MQTT_URL": broker.url,
            "MQTT_INGEST_PASSWORD": ingest_password,
            # Each simulated device sends ~30 msg/s (6,000/s over 200), far above an agent (one
            # window per 30 s) and the default per-device limit: set it out of reach. The bucket
            # is still checked for every message. bench/ingest_flood.py measures the limit.
            "INGEST_DEVICE_RATE": "1000000",
            "INGEST_DEVICE_BURST": "1000000",
        }
        console.print(f"Creating database {DATABASE} and {args.devices} devices…")
        create_database(env)
        devices = create_devices(broker, args.devices)

        bridge_log = var_dir / "bridge.log"
        with open(bridge_log, "wb") as log:
            bridge = subprocess.Popen(
                [
                    sys.executable,
                    "manage.py",
                    "mqtt_ingest",
                    "--client-id",
                    "bench-ingest",
                    "--stats-interval",
                    "5",
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_line(bridge_log, "ingest: subscribed", bridge)

        out = context.Queue()
        stop_raw, go = context.Event(), context.Event()
        raw = context.Process(target=bare_subscriber, args=(broker.port, ingest_password, stop_raw, out))
        processes.append(raw)
        share = -(-len(devices) // args.publishers)
        rate = args.rate / args.publishers
        limit = args.max_messages // args.publishers
        for index in range(args.publishers):
            chunk = devices[index * share : (index + 1) * share]
            processes.append(
                context.Process(
                    target=publisher, args=(chunk, broker.port, rate, args.seconds, limit, go, out)
                )
            )
        for process in processes:
            process.start()
        for _ in processes:
            kind, _ = out.get(timeout=120)
            assert kind == "ready"

        offered = f"{args.rate:,} msg/s" if args.rate else "flat out"
        console.print(
            f"Publishing telemetry for {args.seconds:g} s ({offered}) from {args.publishers} processes…"
        )
        committed: list[tuple[float, int]] = []
        cpu = CpuMeter({"bridge": bridge.pid, "bare subscriber": raw.pid, "broker": broker.process.pid})
        go.set()
        done: list[tuple[int, int, float, float]] = []
        with postgres(DATABASE) as conn:
            count_rows = "SELECT count(*) FROM devices_telemetrywindow"
            while len(done) < args.publishers:
                committed.append((time.time(), conn.execute(count_rows).fetchone()[0]))
                while not out.empty():
                    kind, value = out.get()
                    if kind == "done":
                        done.append(value)
                time.sleep(0.25)
            published = sum(sent for sent, _, _, _ in done)
            acked = sum(acks for _, acks, _, _ in done)
            started = min(start for _, _, start, _ in done)
            finished = max(end for _, _, _, end in done)
            # Let the bridge drain (bounded): stop when everything is in, or nothing moves.
            idle_since = time.monotonic()
            while committed[-1][1] < acked and time.monotonic() - idle_since < 10:
                time.sleep(0.25)
                committed.append((time.time(), conn.execute(count_rows).fetchone()[0]))
                if committed[-1][1] > committed[-2][1]:
                    idle_since = time.monotonic()
            drained_at = committed[-1][0]
        cpu_seconds = cpu.seconds()
        stop_raw.set()
        kind, raw_samples = out.get(timeout=30)
        assert kind == "samples"

        window_start, window_end = started + args.warmup, finished
        committed_rate, _, _ = rate_between(committed, window_start, window_end)
        raw_rate, _, _ = rate_between(raw_samples, window_start, window_end)
        p50_lag, p95_lag = lag_p95(window_start, window_end)
        total_committed, total_raw = committed[-1][1], raw_samples[-1][1]
        bridge.send_signal(signal.SIGTERM)
        bridge.wait(30)
        summary = next((line for line in bridge_log.read_text().splitlines() if "stopped:" in line), "")

        ratio = committed_rate / raw_rate if raw_rate else 0.0
        table = Table(title=f"Ingest bridge, {args.devices} devices, {offered} for {args.seconds:g} s")
        table.add_column("measure")
        table.add_column("figure", justify="right")
        table.add_column("target", justify="right")
        table.add_column("")

        def verdict(ok: bool) -> str:
            return "[green]PASS[/green]" if ok else "[red]FAIL[/red]"

        table.add_row("published (PUBACKed by the broker)", f"{acked:,} of {published:,}", "", "")
        table.add_row("publish rate achieved", f"{published / (finished - started):,.0f} msg/s", "", "")
        table.add_row(
            "telemetry committed/s (sustained, PostgreSQL)",
            f"{committed_rate:,.0f}",
            f">= {TARGET_COMMITTED_PER_S:,}",
            verdict(committed_rate >= TARGET_COMMITTED_PER_S),
        )
        table.add_row("raw receive rate, bare paho subscriber", f"{raw_rate:,.0f} msg/s", "", "")
        table.add_row(
            "committed / raw", f"{ratio:.0%}", f">= {TARGET_RATIO:.0%}", verdict(ratio >= TARGET_RATIO)
        )
        table.add_row(
            "lag publish -> commit, p50 / p95",
            f"{p50_lag:.3f} / {p95_lag:.3f} s",
            f"p95 <= {TARGET_P95_LAG_S:g} s",
            verdict(p95_lag <= TARGET_P95_LAG_S),
        )
        table.add_row(
            "committed in total / received by the bare subscriber",
            f"{total_committed:,} / {total_raw:,}",
            f"{acked:,}",
            verdict(total_committed == acked),
        )
        table.add_row("drain after the last publish", f"{max(0.0, drained_at - finished):.1f} s", "", "")
        for name, seconds in cpu_seconds.items():
            handled = total_raw if name == "bare subscriber" else total_committed
            per_message = f"{seconds / handled * 1e6:,.0f} µs/msg" if handled else "-"
            table.add_row(f"CPU, {name}", f"{seconds:.1f} s ({per_message})", "", "")
        table.add_row("CPU, whole machine (2 cores)", f"{cpu.machine_busy():.0%} busy", "", "")
        console.print(table)
        console.print(f"bridge: {summary.split('stopped: ', 1)[-1]}")
        ok = (
            committed_rate >= TARGET_COMMITTED_PER_S
            and ratio >= TARGET_RATIO
            and p95_lag <= TARGET_P95_LAG_S
            and total_committed == acked
        )
        return 0 if ok else 1
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join(10)
        if bridge is not None and bridge.poll() is None:
            bridge.kill()
            bridge.wait()
        if broker is not None:
            broker.stop()
        drop_database()
        shutil.rmtree(var_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
