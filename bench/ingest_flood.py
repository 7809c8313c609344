"""The ingest bridge under a one-device QoS 0 flood (issue 8, section 1), figures beside limits.

A Mosquitto with the project's config, the bridge as its own process (``manage.py
mqtt_ingest``, default per-device limit: INGEST_DEVICE_RATE 5/s, INGEST_DEVICE_BURST 100)
against a PostgreSQL database of its own, honest devices sending one telemetry window a
second each at QoS 1, and one device with its own login publishing QoS 0 telemetry as fast
as a paho client can for ``--seconds``.

* bridge RSS: sampled every 50 ms; peak minus the RSS before the flood. Limit 30 MB.
* honest lag: ``received_at - ts`` of the honest devices' windows sent during the flood
  (p50 / p95 / max). Limit: p95 within the flood's own length, since MQTT carries no
  per-publisher priority and the bridge must read each flood message to refuse it.
* flood: messages/s offered vs stored, and stored beside rate x time + burst.

    .venv/bin/python bench/ingest_flood.py [--seconds 10] [--honest 20]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import (  # noqa: E402
    DATABASE,
    SERVER_URL,
    create_database,
    create_devices,
    drop_database,
    postgres,
    publisher,
    wait_for_line,
)
from fleet.mqtt.broker import start_broker  # noqa: E402

RATE, BURST = 5, 100  # the settings' defaults, passed explicitly
LIMIT_RSS_GROWTH_MB = 30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10, help="flood length (default 10)")
    parser.add_argument("--honest", type=int, default=20, help="honest devices, 1 window/s each (default 20)")
    return parser.parse_args()


def flooder(device: tuple[str, str], port: int, seconds: float, go, out) -> None:
    """QoS 0 telemetry as fast as one paho client can, each window valid and unique."""
    import json
    from datetime import UTC, datetime

    from fleet.mqtt.broker import mqtt_client  # connects and waits for the CONNACK

    device_id, password = device
    client = mqtt_client(
        f"mqtt://127.0.0.1:{port}", client_id=device_id, username=device_id, password=password
    )
    out.put(("ready", None))
    go.wait()
    topic = f"fleet/v1/devices/{device_id}/telemetry"
    entry = {
        "version": "1.4.0",
        "variant": "int8",
        "inferences": 10,
        "errors": 0,
        "feedback": {"labeled": 1000, "correct": 1000},
    }
    sent, started = 0, time.time()
    end = started + seconds
    while time.time() < end:
        body = {
            "id": f"flood-{sent}",
            "ts": datetime.now(UTC).isoformat(),
            "window_s": 30,
            "models": {"digits": entry},
        }
        client.publish(topic, json.dumps(body), qos=0)
        sent += 1
    client.disconnect()  # after the queued messages are written
    client.loop_stop()
    out.put(("flood", (sent, started, time.time())))


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def main() -> int:
    args = parse_args()
    import psutil
    from rich.console import Console
    from rich.table import Table

    console = Console()
    var_dir = Path(tempfile.mkdtemp(prefix="modelfleet-bench-flood-"))
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
            "INGEST_DEVICE_RATE": str(RATE),
            "INGEST_DEVICE_BURST": str(BURST),
        }
        console.print(f"Creating database {DATABASE}, {args.honest} honest devices and a flooder…")
        create_database(env)
        devices = create_devices(broker, args.honest + 1)
        flood_device, honest = devices[0], devices[1:]

        bridge_log = var_dir / "bridge.log"
        with open(bridge_log, "wb") as log:
            bridge = subprocess.Popen(
                [
                    sys.executable,
                    "manage.py",
                    "mqtt_ingest",
                    "--client-id",
                    "bench-flood",
                    "--stats-interval",
                    "5",
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_line(bridge_log, "ingest: subscribed", bridge)

        out, go = context.Queue(), context.Event()
        # Honest devices keep sending a little after the flood, so that their last windows
        # show how long the backlog took to drain.
        honest_seconds = args.seconds + 5
        processes = [
            context.Process(target=flooder, args=(flood_device, broker.port, args.seconds, go, out)),
            context.Process(
                target=publisher,
                args=(honest, broker.port, len(honest), honest_seconds, 10**9, go, out),
            ),
        ]
        for process in processes:
            process.start()
        for _ in processes:
            assert out.get(timeout=120)[0] == "ready"

        rss: list[int] = []
        sampling = threading.Event()
        sampling.set()
        memory = psutil.Process(bridge.pid)

        def sample() -> None:
            while sampling.is_set():
                rss.append(memory.memory_info().rss)
                time.sleep(0.05)

        baseline = memory.memory_info().rss
        threading.Thread(target=sample, daemon=True).start()
        console.print(f"Flooding for {args.seconds:g} s while {len(honest)} devices send 1 window/s each…")
        go.set()
        results = {}
        while len(results) < 2:
            kind, value = out.get(timeout=args.seconds + 120)
            results[kind] = value
        offered, flood_started, flood_ended = results["flood"]
        _, honest_acked, _, _ = results["done"]

        flooder_id = flood_device[0]
        with postgres(DATABASE) as conn:
            windows_of = "FROM devices_telemetrywindow w JOIN devices_device d ON d.id = w.device_id "

            def honest_count() -> int:
                return conn.execute(
                    f"SELECT count(*) {windows_of} WHERE d.device_id <> %s", (flooder_id,)
                ).fetchone()[0]

            deadline = time.monotonic() + 60
            while honest_count() < honest_acked and time.monotonic() < deadline:
                time.sleep(0.25)
            # The refusal counts are saved every flush: wait until they stop moving.
            last = -1
            while True:
                refused = conn.execute(
                    "SELECT coalesce(sum(r.count), 0) FROM devices_ingestrefusal r "
                    "JOIN devices_device d ON d.id = r.device_id "
                    "WHERE d.device_id = %s AND r.reason = 'rate_limited'",
                    (flooder_id,),
                ).fetchone()[0]
                stored = conn.execute(
                    f"SELECT count(*) {windows_of} WHERE d.device_id = %s", (flooder_id,)
                ).fetchone()[0]
                if refused + stored == last or time.monotonic() > deadline:
                    break
                last = refused + stored
                time.sleep(1)
            landed = honest_count()
            # How long the bridge was reading the flood: the paho publisher queues faster than
            # it writes, and the broker queues what the bridge has not read yet, so this is
            # longer than the publishing loop. The bucket refills over this time.
            span_s = conn.execute(
                f"SELECT extract(epoch FROM max(received_at) - min(received_at))::float {windows_of} "
                "WHERE d.device_id = %s",
                (flooder_id,),
            ).fetchone()[0]
            lags = [
                row[0]
                for row in conn.execute(
                    "SELECT extract(epoch FROM received_at - ts)::float FROM devices_telemetrywindow w "
                    "JOIN devices_device d ON d.id = w.device_id WHERE d.device_id <> %s "
                    "AND ts BETWEEN to_timestamp(%s) AND to_timestamp(%s)",
                    (flooder_id, flood_started, flood_ended),
                )
            ]
        sampling.clear()
        bridge.send_signal(signal.SIGTERM)
        bridge.wait(30)
        summary = next((line for line in bridge_log.read_text().splitlines() if "stopped:" in line), "")

        flood_s = flood_ended - flood_started
        growth_mb = (max(rss) - baseline) / 2**20
        allowed = RATE * (span_s + 1) + BURST  # + 1 s: a flush interval at each end
        p50, p95, worst = percentile(lags, 0.5), percentile(lags, 0.95), max(lags or [0.0])

        def verdict(ok: bool) -> str:
            return "[green]PASS[/green]" if ok else "[red]FAIL[/red]"

        table = Table(title=f"Ingest bridge under a one-device QoS 0 flood ({flood_s:.1f} s)")
        for column in ("measure", "figure", "limit", ""):
            table.add_column(column, justify="left" if column == "measure" else "right")
        table.add_row(
            "bridge RSS before / peak / growth",
            f"{baseline / 2**20:.1f} / {max(rss) / 2**20:.1f} / {growth_mb:.1f} MB",
            f"growth <= {LIMIT_RSS_GROWTH_MB} MB",
            verdict(growth_mb <= LIMIT_RSS_GROWTH_MB),
        )
        table.add_row(
            "honest lag publish -> commit, p50 / p95 / max",
            f"{p50:.2f} / {p95:.2f} / {worst:.2f} s ({len(lags)} windows)",
            f"p95 <= flood length {flood_s:.1f} s",
            verdict(p95 <= flood_s),
        )
        table.add_row(
            "honest windows committed / acknowledged by the broker",
            f"{landed:,} / {honest_acked:,}",
            "all",
            verdict(landed == honest_acked),
        )
        table.add_row("flood offered", f"{offered:,} ({offered / flood_s:,.0f} msg/s)", "", "")
        table.add_row(
            "flood stored",
            f"{stored:,} ({stored / flood_s:,.1f} msg/s)",
            f"<= rate x ({span_s:.1f} s at the bridge + 1) + burst = {allowed:,.0f}",
            verdict(BURST <= stored <= allowed),
        )
        table.add_row(
            "flood refused as rate_limited (per-device count)",
            f"{refused:,}",
            f"stored + refused = {stored + refused:,} of {offered:,}",
            "",
        )
        console.print(table)
        console.print(f"bridge: {summary.split('stopped: ', 1)[-1]}")
        ok = (
            growth_mb <= LIMIT_RSS_GROWTH_MB
            and p95 <= flood_s
            and landed == honest_acked
            and BURST <= stored <= allowed
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
