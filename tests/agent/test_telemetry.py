"""Telemetry windows, latency histogram and health (agent/telemetry.py)."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import psutil
import pytest

from agent import protocol
from agent.telemetry import GROWTH, LatencyHistogram, TelemetryWindow, health_snapshot, telemetry_message

# --- histogram


@pytest.mark.parametrize("q", [1, 50, 90, 95, 99, 100])
def test_histogram_percentiles_are_within_one_bucket_of_numpy(q):
    samples = np.random.default_rng(7).lognormal(mean=0.0, sigma=1.2, size=5000)  # ms, ~0.02 to 100
    histogram = LatencyHistogram()
    for ms in samples:
        histogram.record(float(ms))
    expected = float(np.percentile(samples, q))
    # The answer is a bucket's upper bound: never more than one bucket from the true value.
    assert expected / GROWTH <= histogram.percentile(q) <= expected * GROWTH**2
    assert histogram.count == 5000


def test_an_empty_histogram_reports_zero():
    histogram = LatencyHistogram()
    assert histogram.count == 0
    assert histogram.percentile(50) == 0.0
    assert histogram.percentile(99) == 0.0


def test_histogram_keeps_extreme_values_in_its_edge_buckets():
    histogram = LatencyHistogram()
    for ms in (-3.0, 0.0, float("nan"), 1e-9, 3_600_000.0, float("inf")):
        histogram.record(ms)
    assert histogram.count == 6
    assert histogram.percentile(0) == pytest.approx(0.01)
    assert 60_000 <= histogram.percentile(100) < 60_000 * GROWTH
    assert all(math.isfinite(histogram.percentile(q)) for q in (0, 50, 100))


def test_histogram_refuses_a_percentile_outside_0_to_100():
    with pytest.raises(ValueError):
        LatencyHistogram().percentile(101)


# --- window


def test_take_reports_the_window_and_starts_a_new_one():
    window = TelemetryWindow()
    for ms in (1.0, 2.0, 3.0, 4.0):
        window.record_inference("digits", "1.0.0", "int8", ms)
    window.record_inference("digits", "1.0.0", "int8", 0.0, error=True)

    entry = window.take()["digits"]
    assert (entry["version"], entry["variant"], entry["inferences"], entry["errors"]) == (
        "1.0.0",
        "int8",
        5,
        1,
    )
    assert entry["latency_ms"]["p50"] == pytest.approx(2.0, rel=0.05)
    assert entry["latency_ms"]["p50"] <= entry["latency_ms"]["p95"] <= entry["latency_ms"]["p99"]
    assert entry["feedback"] == {"labeled": 0, "correct": 0}
    assert window.take() == {}


def test_failed_inferences_do_not_feed_the_latency_percentiles():
    window = TelemetryWindow()
    window.record_inference("digits", "1.0.0", "int8", 0.001, error=True)
    entry = window.take()["digits"]
    assert (entry["inferences"], entry["errors"]) == (1, 1)
    assert "latency_ms" not in entry


def test_feedback_is_counted_per_model():
    window = TelemetryWindow()
    for correct in (True, True, False):
        window.record_feedback("digits", "1.0.0", "int8", correct=correct)
    window.record_feedback("faces", "0.1.0", "float32", correct=True)
    report = window.take()
    assert report["digits"]["feedback"] == {"labeled": 3, "correct": 2}
    assert report["faces"]["feedback"] == {"labeled": 1, "correct": 1}
    assert report["faces"]["inferences"] == 0


def test_concurrent_recording_loses_no_inference():
    window = TelemetryWindow()
    start = threading.Barrier(4)

    def serve() -> None:
        start.wait()
        for i in range(10_000):
            window.record_inference("digits", "1.0.0", "int8", 0.5 + i % 7)

    threads = [threading.Thread(target=serve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert window.take()["digits"]["inferences"] == 40_000


@pytest.mark.parametrize(("old_count", "new_count", "reported"), [(10, 30, "2.0.0"), (30, 10, "1.0.0")])
def test_a_swap_within_a_window_reports_the_busier_version_unmerged(old_count, new_count, reported):
    window = TelemetryWindow()
    for _ in range(old_count):
        window.record_inference("digits", "1.0.0", "int8", 1.0)
    window.record_feedback("digits", "1.0.0", "int8", correct=False)
    for _ in range(new_count):
        window.record_inference("digits", "2.0.0", "int8", 1.0)
    window.record_feedback("digits", "2.0.0", "int8", correct=True)

    report = window.take()
    assert list(report) == ["digits"]
    entry = report["digits"]
    assert entry["version"] == reported
    assert entry["inferences"] == max(old_count, new_count)
    assert entry["feedback"] == {"labeled": 1, "correct": int(reported == "2.0.0")}


def test_a_tie_after_a_swap_reports_the_newer_version():
    window = TelemetryWindow()
    window.record_inference("digits", "1.0.0", "int8", 1.0)
    window.record_inference("digits", "2.0.0", "int8", 1.0)
    assert window.take()["digits"]["version"] == "2.0.0"


# --- health and the message


def test_health_snapshot_reports_the_contract_fields(tmp_path):
    started_at = time.monotonic() - 42
    process = psutil.Process()
    health_snapshot(state_dir=tmp_path, started_at=started_at, process=process)  # primes cpu_percent
    health = health_snapshot(state_dir=tmp_path, started_at=started_at, process=process)

    assert isinstance(health["cpu_pct"], float) and health["cpu_pct"] >= 0
    assert isinstance(health["rss_mb"], float) and health["rss_mb"] > 1
    assert isinstance(health["disk_free_mb"], int) and health["disk_free_mb"] >= 0
    assert isinstance(health["uptime_s"], int) and 42 <= health["uptime_s"] < 100
    sensors = psutil.sensors_temperatures()
    if any(entry.current for entries in sensors.values() for entry in entries):
        assert isinstance(health["temp_c"], float)
    else:  # no sensor (this container, many VMs): the field is left out, not faked
        assert "temp_c" not in health


def test_telemetry_message_is_valid_and_built_from_a_window(tmp_path):
    window = TelemetryWindow()
    window.record_inference("digits", "1.4.0", "int8", 0.4)
    window.record_feedback("digits", "1.4.0", "int8", correct=True)
    health = health_snapshot(state_dir=tmp_path, started_at=time.monotonic())

    message = telemetry_message(models=window.take(), window_s=30, health=health, dropped=0)

    assert set(message) == {"id", "ts", "window_s", "models", "health", "dropped"}
    assert message["models"]["digits"]["inferences"] == 1
    assert message["ts"].endswith("Z")
    assert protocol.validate("telemetry", message) is message


def test_telemetry_message_keeps_a_given_id_and_timestamp():
    message = telemetry_message(
        models={}, window_s=30, health={}, dropped=3, message_id="abc", ts="2026-11-28T07:00:00Z"
    )
    assert (message["id"], message["ts"], message["dropped"]) == ("abc", "2026-11-28T07:00:00Z", 3)


@pytest.mark.parametrize("field", ["inferences", "errors", "dropped"])
def test_telemetry_message_refuses_negative_counts(field):
    entry = {"version": "1.4.0", "variant": "int8", "inferences": 1, "errors": 0}
    dropped = 0
    if field == "dropped":
        dropped = -1
    else:
        entry[field] = -1
    with pytest.raises(protocol.SchemaError):
        telemetry_message(models={"digits": entry}, window_s=30, health={}, dropped=dropped)
