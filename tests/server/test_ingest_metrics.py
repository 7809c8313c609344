"""The ingest bridge's own metrics port (fleet/core/metrics.py, IngestCollector): after a
real batch through the project's Mosquitto into PostgreSQL, the scrape shows the messages
written and each refusal under its reason; `manage.py mqtt_ingest --metrics-port` serves
them, and without the option nothing listens."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import requests
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families

from fleet.core.metrics import ingest_metrics_serve
from fleet.mqtt.broker import free_port
from tests.conftest import ROOT, wait_until
from tests.server import test_ingest
from tests.server.test_ingest import telemetry

bridge = test_ingest.bridge
devices = test_ingest.devices
marker = test_ingest.marker
pytestmark = pytest.mark.django_db(transaction=True)


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def metrics_port(bridge):
    port = free_port()
    stop = ingest_metrics_serve(bridge.bridge, port=port, addr="127.0.0.1")
    yield port
    stop()


def test_a_batch_shows_messages_written_and_refusals_by_reason(bridge, devices, metrics_port):
    cam = devices("cam")
    before = scrape(metrics_port)
    cam.publish("telemetry", telemetry())
    cam.publish("telemetry", telemetry())
    broken = telemetry()
    broken["models"]["digits"]["feedback"] = {"labeled": 10, "correct": 11}  # more right than asked
    cam.publish("telemetry", broken)
    cam.publish("telemetry", b"not JSON")
    wait_until(
        lambda: (
            bridge.delta("committed") >= 2
            and bridge.delta("invariant") == 1
            and bridge.delta("malformed") == 1
        ),
        timeout=10,
        message="the batch to be written",
    )
    after = scrape(metrics_port)
    assert (
        value(after, "modelfleet_ingest_committed_total") - value(before, "modelfleet_ingest_committed_total")
        == 2
    )
    assert (
        value(after, "modelfleet_ingest_received_total") - value(before, "modelfleet_ingest_received_total")
        == 4
    )
    for reason, n in (("invariant", 1), ("malformed", 1), ("clock", 0), ("rate_limited", 0)):
        dropped = "modelfleet_ingest_dropped_total"
        assert value(after, dropped, reason=reason) - value(before, dropped, reason=reason) == n, reason
    assert value(after, "modelfleet_ingest_connected") == 1
    assert value(after, "modelfleet_ingest_pending_messages") == 0
    assert value(after, "modelfleet_ingest_lag_seconds") == 0


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _bridge_process(broker, tmp_path, *args: str, log_format: str) -> tuple[subprocess.Popen, object]:
    env = {
        **os.environ,
        "LOG_FORMAT": log_format,
        "DATABASE_URL": os.environ["DATABASE_URL"].rsplit("/", 1)[0] + "/" + connection.settings_dict["NAME"],
        "MQTT_URL": broker.url,
        "MQTT_INGEST_PASSWORD": broker.ingest_password,
    }
    env.pop("INGEST_METRICS_PORT", None)
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "ingest.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "mqtt_ingest", "--session-expiry", "0", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def subscribed() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"mqtt_ingest exited:\n{log.read_text()}")
        return "ingest: subscribed" in log.read_text()

    wait_until(subscribed, timeout=30, message="the bridge process to subscribe")
    return process, log


@pytest.mark.parametrize("serve", [True, False], ids=["with-metrics-port", "off-by-default"])
def test_the_bridge_command_serves_metrics_only_when_asked(broker, tmp_path, serve):
    port = free_port()
    args = ("--client-id", f"metrics-{port}", *(("--metrics-port", str(port)) if serve else ()))
    process, log = _bridge_process(broker, tmp_path, *args, log_format="plain")
    try:
        if serve:
            assert value(scrape(port), "modelfleet_ingest_connected") == 1
        else:
            assert not _port_open(port)
            assert "/metrics" not in log.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0, log.read_text()


def _logged(log) -> list[str]:
    return [line for line in log.read_text().splitlines() if "ingest: " in line]


def test_with_log_format_json_the_bridge_logs_one_json_object_a_line(broker, tmp_path):
    process, log = _bridge_process(broker, tmp_path / "json", "--client-id", "json-logs", log_format="json")
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0, log.read_text()
    lines = [json.loads(line) for line in _logged(log) if line.startswith("{")]
    assert any(line["message"].startswith("ingest: subscribed") for line in lines)
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
        assert line["logger"] == "fleet.devices.ingest"
    # Positive control: the same lines in the plain format are not JSON.
    plain, plain_log = _bridge_process(
        broker, tmp_path / "plain", "--client-id", "plain-logs", log_format="plain"
    )
    plain.send_signal(signal.SIGTERM)
    assert plain.wait(20) == 0
    assert _logged(plain_log) and not any(line.startswith("{") for line in _logged(plain_log))
