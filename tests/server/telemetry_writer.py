"""Telemetry windows stored the way the ingest bridge stores them: a wire message parsed by
``agent.protocol`` and written by the bridge's own batch writer (``IngestBridge._write``:
COPY, the windows' INSERT and, in the same statement, the per-device hourly sums that the
gates read for whole hours). No broker: the writer is called directly."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta

from agent import protocol
from fleet.devices.ingest import IngestBridge

_bridge: IngestBridge | None = None


def _writer() -> IngestBridge:
    global _bridge
    if _bridge is None:
        _bridge = IngestBridge(client_id="tests-telemetry-writer", url="mqtt://127.0.0.1:1")
    # Device pks differ from test to test, and a test's rollback drops the temporary
    # tables the writer made on the connection.
    _bridge._devices.clear()
    _bridge._temp_tables_on = None
    return _bridge


def ingest_window(
    device_id: str,
    *,
    start: datetime,
    version: str,
    variant: str,
    model: str = "digits",
    inferences: int = 100,
    errors: int = 0,
    labeled: int = 0,
    correct: int = 0,
    latency_p95_ms: float | None = 1.0,
    shadow: dict | None = None,
    window_s: float = 30,
    message_id: str | None = None,
) -> int:
    """One window of ``model`` that began at ``start``; returns the windows the bridge
    committed (0 if it refused the message: the caller asserts what it expects)."""
    entry: dict = {"version": version, "variant": variant, "inferences": inferences, "errors": errors}
    if latency_p95_ms is not None:
        entry["latency_ms"] = {"p50": latency_p95_ms / 2, "p95": latency_p95_ms, "p99": latency_p95_ms}
    if labeled:
        entry["feedback"] = {"labeled": labeled, "correct": correct}
    if shadow is not None:
        entry["shadow"] = {"errors": 0, "skipped": 0, "mean_abs_diff": None, **shadow}
    message = {
        "id": message_id or uuid.uuid4().hex,
        "ts": protocol.format_time(start + timedelta(seconds=window_s), fraction=True),
        "window_s": window_s,
        "models": {model: entry},
    }
    data = protocol.parse("telemetry", json.dumps(message).encode())
    bridge = _writer()
    before = bridge.counters.telemetry_rows
    bridge._write([("telemetry", device_id, data, False, f"fleet/v1/devices/{device_id}/telemetry")])
    return bridge.counters.telemetry_rows - before
