"""Step: set up the services (database, broker, web app, Celery worker and beat, ingest bridge)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import redis
import requests

from fleet.mqtt.broker import start_broker

from .common import DEMO_DATABASE, ROOT, VAR, Demo, free_port, manage, start, wait_for


def fresh_database(url: str, *, create: bool = True) -> None:
    """The demo's own PostgreSQL database, created anew each run (the ingest bridge and
    the JSON filters need PostgreSQL; SQLite stays fine for the registry alone), and
    dropped when the demo ends (``create=False``)."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if create:
            connection.execute(f'CREATE DATABASE "{name}"')


def demo_env(port: int, broker) -> dict[str, str]:
    env = dict(os.environ)
    env["DATABASE_URL"] = DEMO_DATABASE
    # The control plane's own accounts use the broker's loopback listener; devices are told
    # (enrollment answer) to use its TLS listener, whose certificate the run's CA signed.
    env["MQTT_URL"] = broker.url
    env["MQTT_PUBLIC_URL"] = broker.tls_url
    env["MQTT_PUBLISHER_PASSWORD"] = broker.publisher_password
    env["MQTT_ADMIN_PASSWORD"] = broker.admin_password
    env["MQTT_INGEST_PASSWORD"] = broker.ingest_password
    env["PUBLIC_BASE_URL"] = f"http://127.0.0.1:{port}"
    env.setdefault("DEBUG", "1")
    env.setdefault("VAR_DIR", str(VAR))
    env.setdefault("REDIS_URL", "redis://127.0.0.1:6379/14")
    # A cache of its own, emptied at start like the database: rate limits (enrollment counts
    # per address and minute) must not carry over from an earlier run or a test.
    env["CACHE_URL"] = env.get("DEMO_CACHE_URL", "redis://127.0.0.1:6379/12")
    redis.Redis.from_url(env["CACHE_URL"]).flushdb()
    env.setdefault("CELERY_QUEUE", f"demo-{os.getpid()}")
    env.setdefault("ALLOWED_HOSTS", "127.0.0.1,localhost")
    env["PYTHONUNBUFFERED"] = "1"
    if int(os.environ.get("DEMO_DEVICES", "0") or 0) > 0:
        # A simulated fleet enrolls from one address: the default limit (30 a minute per
        # address) would make 1,000 devices take half an hour (docs/operations.md).
        env.setdefault("ENROLL_RATE", "100000/minute")
    return env


def http_up(base: str) -> bool:
    try:
        return requests.get(f"{base}/api/v1/signing-keys/", timeout=2).status_code == 401
    except requests.ConnectionError:
        return False


def worker_up(env: dict[str, str]) -> bool:
    ping = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "fleet",
            "inspect",
            "ping",
            "-t",
            "1",
            "-d",
            f"{env['CELERY_QUEUE']}@localhost",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    return ping.returncode == 0


def start_services(demo: Demo) -> None:
    """Set up the services: a fresh PostgreSQL database, a Mosquitto with the project's
    config (default deny, service accounts, a TLS listener with a CA made for the run), an
    admin and an operator with an API token; then the web app, a Celery worker and beat,
    and the ingest bridge."""
    port = free_port(int(os.environ.get("DEMO_PORT", "8000")))
    demo.base = f"http://127.0.0.1:{port}"
    # Registered first, so it runs last: once every process that used it has stopped.
    demo.stack.callback(fresh_database, DEMO_DATABASE, create=False)
    demo.broker = broker = start_broker(VAR / "mosquitto").provision()
    demo.stack.callback(broker.stop)
    env = demo.env = demo_env(port, broker)
    fresh_database(DEMO_DATABASE)
    demo.admin_password = secrets.token_urlsafe(9)
    with demo.task("Migrating the database"):
        manage(env, "migrate", "--noinput")
        # "--password=…": a random password may start with "-", which argparse takes for an option
        manage(env, "ensure_user", "admin", "--role", "admin", f"--password={demo.admin_password}")
        demo.token = manage(env, "create_api_token", "olivia", "--role", "operator", "--name", "demo")
    demo.session.headers["Authorization"] = f"Bearer {demo.token}"
    with demo.task(f"Starting the web app on {demo.base}, a Celery worker and beat, the ingest bridge"):
        stack, python = demo.stack, sys.executable
        processes = demo.processes
        processes["web"] = start(
            stack, "web", env, python, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"
        )
        queue = env["CELERY_QUEUE"]
        processes["worker"] = start(
            stack,
            "worker",
            env,
            *(python, "-m", "celery", "-A", "fleet", "worker", "-P", "solo", "-Q", queue),
            *("-n", f"{queue}@localhost", "-l", "info"),
        )
        processes["beat"] = start(
            stack,
            "beat",
            env,
            *(python, "-m", "celery", "-A", "fleet", "beat", "-l", "info"),
            *("--schedule", str(VAR / "beat-schedule")),
        )
        processes["ingest"] = start(
            stack,
            "ingest",
            env,
            *(python, "manage.py", "mqtt_ingest", "--client-id", f"demo-ingest-{os.getpid()}"),
            *("--stats-interval", "30"),
        )
        wait_for("the web app", lambda: http_up(demo.base), processes["web"])
        wait_for("the Celery worker", lambda: worker_up(env), processes["worker"])
