"""Shared fixtures. They start or use real services: PostgreSQL, Redis, a Celery worker
process, LiteRT on the sample .tflite files the project builds itself."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fleet.mqtt.broker import start_broker

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def digits():
    """The sample digits models (real .tflite bytes) and golden set."""
    from samples import digits

    return digits


def wait_until(condition, *, timeout: float, interval: float = 0.05, message: str = "condition"):
    """Poll ``condition`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@contextlib.contextmanager
def celery_worker(*, env: dict[str, str], queue: str, log_path: Path, pool: tuple[str, ...] = ("-P", "solo")):
    """A real `celery worker` process on ``queue``, stopped (then killed) at the end."""
    from fleet.celery import app

    node = f"{queue}@localhost"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "fleet",
                "worker",
                *pool,
                "-Q",
                queue,
                "-n",
                node,
                "--without-gossip",
                "--without-mingle",
                "-l",
                "info",
            ],
            cwd=ROOT,
            env={**os.environ, "CELERY_QUEUE": queue, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: worker.poll() is not None or app.control.ping(destination=[node], timeout=0.5),
            timeout=60,
            message="the Celery worker to answer ping",
        )
        if worker.poll() is not None:
            raise RuntimeError(f"celery worker exited at start:\n{log_path.read_text()}")
        yield worker
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def worker_env(broker) -> dict[str, str]:
    """What a worker process needs to reach the test database and broker."""
    from django.db import connection

    return {
        "DATABASE_URL": os.environ["DATABASE_URL"].rsplit("/", 1)[0] + "/" + connection.settings_dict["NAME"],
        "MQTT_URL": broker.url,
        "MQTT_PUBLISHER_PASSWORD": broker.publisher_password,
    }


@pytest.fixture(scope="session")
def celery_worker_process(django_db_setup, django_db_blocker, tmp_path_factory, broker):
    """A real `celery worker` process on a queue of its own, against the test database."""
    from fleet.celery import app

    queue = f"test-{uuid.uuid4().hex[:10]}"
    app.conf.task_default_queue = queue
    log_path = tmp_path_factory.mktemp("celery") / "worker.log"
    with celery_worker(env=worker_env(broker), queue=queue, log_path=log_path) as worker:
        yield worker


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    broker = start_broker(tmp_path_factory.mktemp("mosquitto")).provision()
    yield broker
    broker.stop()


@pytest.fixture
def broker_settings(settings, broker):
    """Point the control plane at the test broker (the project's config, dynamic security):
    its own accounts on the loopback listener, devices told to use the TLS one."""
    settings.MQTT_URL = broker.url
    settings.MQTT_PUBLIC_URL = broker.tls_url
    settings.MQTT_ADMIN_PASSWORD = broker.admin_password
    settings.MQTT_PUBLISHER_PASSWORD = broker.publisher_password
    return broker
