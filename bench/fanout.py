"""Rollout fan-out (rollouts issue, "Done when"): promote a stage covering 10,000 devices
and time until the broker has delivered every signed desired state to a subscriber on
``fleet/v1/devices/+/desired``, next to a bare paho client publishing 10,000 messages of
the same size at QoS 1 to the same subscriber, in the same run. Target: ratio <= 2.
Also prints the signing cost per desired state.

Real parts: Mosquitto with the project's config, PostgreSQL (a database of its own,
dropped afterwards), a Celery worker process publishing the chunks.

    .venv/bin/python bench/fanout.py [--devices 10000]
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TARGET_RATIO = 2.0
MOONSHOT_RATIO = 1.2  # issue 13, section 3: printed beside the ratio, not enforced
DATABASE = "postgres://postgres@127.0.0.1:5432/modelfleet_bench_fanout"


class Counter:
    """A subscriber on every device's desired topic, counting by topic prefix."""

    def __init__(self, url: str, password: str) -> None:
        from fleet.mqtt.broker import mqtt_client

        self.counts: dict[str, int] = {}
        self.done = threading.Condition()
        self.client = mqtt_client(
            url, client_id=f"bench-counter-{uuid.uuid4().hex[:6]}", username="fleet-bench", password=password
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.subscribe("fleet/v1/devices/+/desired", qos=1)
        assert subscribed.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        prefix = message.topic.split("/")[3].split("-")[0]
        with self.done:
            self.counts[prefix] = self.counts.get(prefix, 0) + 1
            self.done.notify_all()

    def wait(self, prefix: str, count: int, timeout: float) -> float:
        with self.done:
            if not self.done.wait_for(lambda: self.counts.get(prefix, 0) >= count, timeout):
                raise RuntimeError(f"only {self.counts.get(prefix, 0)} of {count} {prefix} messages arrived")
        return time.perf_counter()


def setup(work: Path, broker) -> dict[str, str]:
    import psycopg

    name = DATABASE.rsplit("/", 1)[1]
    with psycopg.connect(DATABASE.rsplit("/", 1)[0] + "/postgres", autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
    env = {
        "DJANGO_SETTINGS_MODULE": "fleet.settings",
        "DEBUG": "1",
        "VAR_DIR": str(work / "var"),
        "DATABASE_URL": DATABASE,
        "MQTT_URL": broker.url,
        "MQTT_PUBLISHER_PASSWORD": broker.publisher_password,
        "CELERY_QUEUE": f"bench-{uuid.uuid4().hex[:8]}",
        "DESIRED_PUBLISH_CHUNK": "500",
    }
    os.environ.update(env)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    return env


def start_worker(env: dict[str, str], work: Path) -> subprocess.Popen:
    from fleet.celery import app

    node = f"{env['CELERY_QUEUE']}@localhost"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "fleet",
            "worker",
            "-c",
            "2",
            "-Q",
            env["CELERY_QUEUE"],
            "-n",
            node,
            "--without-gossip",
            "--without-mingle",
            "-l",
            "warning",
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=(work / "worker.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    app.conf.task_default_queue = env["CELERY_QUEUE"]
    deadline = time.monotonic() + 60
    while not app.control.ping(destination=[node], timeout=0.5):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"celery worker did not start; see {work / 'worker.log'}")
    return worker


def make_world(devices: int):
    from django.core.files.uploadedfile import TemporaryUploadedFile

    from fleet.devices.models import Device
    from fleet.registry import services
    from fleet.rollouts.models import RolloutPolicy
    from samples import digits

    model = services.model_create(name="digits", labels=digits.LABELS)
    version = services.version_create(model=model, version="2.0.0")
    for variant, data in digits.build_digits_models(version="2.0.0").items():
        upload = TemporaryUploadedFile(f"{variant}.tflite", "application/octet-stream", len(data), None)
        upload.write(data)
        upload.seek(0)
        artifact = services.artifact_upload(version=version, variant=variant, upload=upload)
        assert services.artifact_process(artifact_id=artifact.pk).status == "ready"
    Device.objects.bulk_create(
        [
            Device(device_id=f"fan-{n:05d}", status="active", supports_int8=n % 2 == 0, tags=["fan"])
            for n in range(devices)
        ],
        batch_size=2000,
    )
    # A one-device canary, then everyone: the bench times the promotion to all of them.
    policy = RolloutPolicy.objects.create(
        name="fan-out", stages=[{"kind": "count", "value": 1}, {"kind": "percent", "value": 100}], gates={}
    )
    return model, version, policy


def bare_publish(broker, size: int, count: int, counter: Counter) -> tuple[float, float]:
    """A bare paho client: ``count`` messages of ``size`` bytes at QoS 1. Returns the time
    until every PUBACK, and until the subscriber has them all."""
    from fleet.mqtt.broker import mqtt_client

    client = mqtt_client(
        broker.url,
        client_id=f"bench-bare-{uuid.uuid4().hex[:6]}",
        username="fleet-publisher",
        password=broker.publisher_password,
    )
    payload = secrets.token_bytes(size)
    started = time.perf_counter()
    infos = [client.publish(f"fleet/v1/devices/bare-{n:05d}/desired", payload, qos=1) for n in range(count)]
    for info in infos:
        info.wait_for_publish(60)
    acked = time.perf_counter()
    delivered = counter.wait("bare", count, timeout=120)
    client.disconnect()
    client.loop_stop()
    return acked - started, delivered - started


def signing_cost(version, samples: int = 2000) -> float:
    from fleet.devices.desired import desired_state_envelope
    from fleet.registry.signing import signing_key_active

    _, key = signing_key_active()
    artifact = version.artifacts.get(variant="int8")
    started = time.perf_counter()
    for n in range(samples):
        desired_state_envelope(
            device_id=f"fan-{n:05d}", generation=n + 1, artifacts={"digits": artifact}, private_key=key
        )
    return (time.perf_counter() - started) / samples


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=10_000)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from fleet.mqtt.broker import start_broker

    console = Console()
    with tempfile.TemporaryDirectory(prefix="modelfleet-fanout-") as tmp:
        work = Path(tmp)
        broker = start_broker(work / "broker")
        worker = None
        try:
            broker.provision()
            admin = broker.admin()
            bench_password = secrets.token_urlsafe(12)
            admin.command(
                {"command": "createRole", "rolename": "fleet-bench"},
                *[
                    {
                        "command": "addRoleACL",
                        "rolename": "fleet-bench",
                        "acltype": acl,
                        "topic": "fleet/v1/devices/+/desired",
                        "allow": True,
                    }
                    for acl in ("subscribePattern", "publishClientReceive")
                ],
                {
                    "command": "createClient",
                    "username": "fleet-bench",
                    "password": bench_password,
                    "roles": [{"rolename": "fleet-bench"}],
                },
            )
            env = setup(work, broker)
            console.print(f"Creating {args.devices:,} devices and a ready version…")
            _, version, policy = make_world(args.devices)
            worker = start_worker(env, work)
            counter = Counter(broker.url, bench_password)

            from fleet.rollouts import services as rollouts

            rollout = rollouts.rollout_create(
                model=version.model, version=version, targets={"tags": ["fan"]}, policy=policy
            )
            rollout = rollouts.rollout_start(rollout=rollout)  # stage 1: one device
            counter.wait("fan", 1, timeout=60)
            console.print(f"Promoting to a stage that covers all {args.devices:,} devices…")
            started = time.perf_counter()
            if os.environ.get("FANOUT_PROFILE"):
                import cProfile
                import pstats

                profiler = cProfile.Profile()
                profiler.runcall(rollouts.rollout_promote, rollout=rollout)
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
            else:
                rollouts.rollout_promote(rollout=rollout)
            committed = time.perf_counter()
            delivered = counter.wait("fan", args.devices, timeout=600)
            fanout_s = delivered - started
            from fleet.devices.desired import desired_state_envelope

            size = len(
                desired_state_envelope(
                    device_id="fan-00000",
                    generation=1,
                    artifacts={"digits": version.artifacts.get(variant="int8")},
                )
            )
            console.print(f"A bare paho client publishing {args.devices:,} messages of {size} bytes…")
            bare_acked_s, bare_delivered_s = bare_publish(broker, size, args.devices, counter)
            per_state = signing_cost(version)
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(30)
            broker.stop()
            import psycopg
            from django.db import connections

            connections.close_all()
            name = DATABASE.rsplit("/", 1)[1]
            with psycopg.connect(DATABASE.rsplit("/", 1)[0] + "/postgres", autocommit=True) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    ratio = fanout_s / bare_delivered_s
    table = Table(title=f"Rollout fan-out, {args.devices:,} devices")
    for column in ("measure", "value", "limit"):
        table.add_column(column)
    table.add_row(
        "promote → committed (generations, checks, chunks queued)", f"{committed - started:.2f} s", ""
    )
    table.add_row("promote → subscriber has every desired state", f"{fanout_s:.2f} s", "")
    table.add_row(
        f"bare paho: {args.devices:,} x {size} B at QoS 1, all PUBACKs", f"{bare_acked_s:.2f} s", ""
    )
    table.add_row("bare paho: subscriber has every message", f"{bare_delivered_s:.2f} s", "")
    table.add_row(
        "committed → subscriber has every desired state (signing + publishing)",
        f"{delivered - committed:.2f} s",
        f"bare: {bare_delivered_s:.2f} s",
    )
    table.add_row("ratio fan-out / bare", f"{ratio:.2f}", f"<= {TARGET_RATIO} (moonshot {MOONSHOT_RATIO})")
    table.add_row("signing cost per desired state", f"{per_state * 1e6:.0f} µs", "")
    console.print(table)
    verdict = "[green]PASS[/green]" if ratio <= TARGET_RATIO else "[red]FAIL[/red]"
    console.print(f"ratio {ratio:.2f} vs limit {TARGET_RATIO}: {verdict}")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
