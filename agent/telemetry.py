"""Telemetry windows (ARCHITECTURE.md, "Telemetry window").

The agent counts inferences, errors, latency and app feedback per model between two
publishes, then takes a snapshot and starts a new window. Serving threads call
``record_*`` on every request, so recording is O(1) and keeps no list of samples:
latencies go into a fixed log-spaced histogram whose percentiles are exact to one bucket.
"""

from __future__ import annotations

import enum
import math
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from agent import protocol

# Histogram range and resolution: 10 µs (a tiny model on a fast core) to a minute, 5 % steps.
MIN_MS = 0.01
MAX_MS = 60_000.0
GROWTH = 1.05
BUCKETS = math.ceil(math.log(MAX_MS / MIN_MS) / math.log(GROWTH)) + 1
UPPER_BOUNDS_MS = tuple(MIN_MS * GROWTH**i for i in range(BUCKETS))


class LatencyHistogram:
    """Latencies in fixed log-spaced buckets from ``MIN_MS`` to ``MAX_MS``.

    Bucket 0 holds everything up to ``MIN_MS``; bucket ``i`` holds
    ``(MIN_MS * GROWTH**(i-1), MIN_MS * GROWTH**i]``, so every bucket is 5 % wide and a
    percentile read from it is at most 5 % above the true sample. Anything beyond the last
    bucket (over a minute) is counted in the last one. Not thread-safe on its own; the
    window that owns it holds a lock.
    """

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.count = 0

    @staticmethod
    def bucket_of(ms: float) -> int:
        if not ms > MIN_MS:  # also catches NaN and negative clock differences
            return 0
        if ms >= UPPER_BOUNDS_MS[-1]:  # also catches infinity, which log() would not take
            return BUCKETS - 1
        return min(BUCKETS - 1, math.ceil(math.log(ms / MIN_MS) / math.log(GROWTH)))

    def record(self, ms: float) -> None:
        self.counts[self.bucket_of(ms)] += 1
        self.count += 1

    def percentile(self, q: float) -> float:
        """The upper bound of the bucket holding the nearest-rank ``q``-th percentile."""
        if not 0 <= q <= 100:
            raise ValueError(f"percentile must be within [0, 100], got {q}")
        if self.count == 0:
            return 0.0
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for index, bucket_count in enumerate(self.counts):
            seen += bucket_count
            if seen >= rank:
                return UPPER_BOUNDS_MS[index]
        return UPPER_BOUNDS_MS[-1]


@dataclass
class _ModelWindow:
    inferences: int = 0
    errors: int = 0
    labeled: int = 0
    correct: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def as_message(self, version: str, variant: str) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "version": version,
            "variant": variant,
            "inferences": self.inferences,
            "errors": self.errors,
            "feedback": {"labeled": self.labeled, "correct": self.correct},
        }
        # Without a successful inference there is no latency to report; zeros would read
        # as "very fast" to a latency gate, so the (optional) field is left out instead.
        if self.latency.count:
            entry["latency_ms"] = {
                name: round(self.latency.percentile(q), 3)
                for name, q in (("p50", 50), ("p95", 95), ("p99", 99))
            }
        return entry


class ShadowOutcome(enum.StrEnum):
    """What became of one request sampled for the shadow (docs/protocol.md addition 5)."""

    COMPARED = "compared"  # the shadow answered; agreement and difference recorded
    ERROR = "error"  # the shadow failed on the request (bad input for it, runtime error)
    SKIPPED = "skipped"  # never ran: the queue was full, or the shadow was unloaded meanwhile


@dataclass
class _ShadowWindow:
    # The live version the samples were compared with most recently: a window whose live
    # model served nothing still needs a live entry to carry the shadow's.
    live_version: str
    live_variant: str
    sampled: int = 0
    compared: int = 0
    agreed: int = 0
    errors: int = 0
    skipped: int = 0
    abs_diff_sum: float = 0.0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def as_message(self, version: str, variant: str) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "version": version,
            "variant": variant,
            "sampled": self.sampled,
            "compared": self.compared,
            "agreed": self.agreed,
            "errors": self.errors,
            "skipped": self.skipped,
            "mean_abs_diff": self.abs_diff_sum / self.compared if self.compared else None,
        }
        if self.latency.count:
            entry["latency_ms"] = {
                name: round(self.latency.percentile(q), 3)
                for name, q in (("p50", 50), ("p95", 95), ("p99", 99))
            }
        return entry


@dataclass(frozen=True)
class LoadedShadow:
    """A shadow loaded beside a live model when a window closes: reported even if nothing
    was sampled, so a gate can tell "no traffic" from "no shadow"."""

    live_version: str
    live_variant: str
    version: str
    variant: str


class TelemetryWindow:
    """Counters per (model, version, variant) for the current window; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str, str], _ModelWindow] = {}
        self._shadows: dict[tuple[str, str, str], _ShadowWindow] = {}

    def _window(self, key: tuple[str, str, str]) -> _ModelWindow:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _ModelWindow()
        return window

    def record_inference(
        self, model: str, version: str, variant: str, latency_ms: float, *, error: bool = False
    ) -> None:
        """Count one request. ``inferences`` counts every request, ``errors`` the failed
        ones; only successful requests feed the latency percentiles, because a request
        refused in a microsecond for a bad input says nothing about the model's speed."""
        with self._lock:
            window = self._window((model, version, variant))
            window.inferences += 1
            if error:
                window.errors += 1
            else:
                window.latency.record(latency_ms)

    def record_feedback(self, model: str, version: str, variant: str, *, correct: bool) -> None:
        with self._lock:
            window = self._window((model, version, variant))
            window.labeled += 1
            window.correct += int(correct)

    def record_shadow(
        self,
        model: str,
        version: str,
        variant: str,
        *,
        live_version: str,
        live_variant: str,
        outcome: ShadowOutcome,
        agreed: bool = False,
        abs_diff: float = 0.0,
        latency_ms: float = 0.0,
    ) -> None:
        """Count one sample of the shadow ``version``/``variant`` once its outcome is known.
        Counting at resolution (not when the sample is queued) keeps every window's own
        invariants: sampled = compared + errors + skipped, agreed <= compared."""
        with self._lock:
            window = self._shadows.get((model, version, variant))
            if window is None:
                window = self._shadows[(model, version, variant)] = _ShadowWindow(live_version, live_variant)
            window.live_version, window.live_variant = live_version, live_variant
            window.sampled += 1
            if outcome is ShadowOutcome.COMPARED:
                window.compared += 1
                window.agreed += int(agreed)
                window.abs_diff_sum += abs_diff
                window.latency.record(latency_ms)
            elif outcome is ShadowOutcome.ERROR:
                window.errors += 1
            else:
                window.skipped += 1

    def take(self, *, loaded: dict[str, LoadedShadow] | None = None) -> dict[str, dict[str, Any]]:
        """Return the window's counters per model name and start a new window.

        ``loaded`` names the shadows loaded right now (model -> :class:`LoadedShadow`).
        A model's entry gets a ``shadow`` object when a shadow is loaded or anything was
        sampled; of several shadow versions in one window (a new shadow replaced the old
        one) the one with the most samples is reported, as for the live entry. A model
        whose live version served nothing still gets a live entry with zero counters when
        it carries a shadow.

        The contract has one entry per model name, but a hot swap inside a window leaves
        counters for two versions of one model. We report the version that served the
        most inferences (on a tie, the one seen last, i.e. the newer one) and drop the
        other's counters rather than merge them: a merged entry would credit one version
        with the other's errors and accuracy, and rollout gates judge versions on exactly
        those numbers. The swap itself is reported as an event, so nothing is hidden.
        """
        with self._lock:
            windows, self._windows = self._windows, {}
            shadows, self._shadows = self._shadows, {}
        chosen: dict[str, tuple[str, str, _ModelWindow]] = {}
        # Dicts keep insertion order, so a later version comes later in this loop.
        for (model, version, variant), window in windows.items():
            current = chosen.get(model)
            if current is None or window.inferences >= current[2].inferences:
                chosen[model] = (version, variant, window)
        chosen_shadows: dict[str, tuple[str, str, _ShadowWindow]] = {}
        for model, shadow in (loaded or {}).items():
            chosen_shadows[model] = (
                shadow.version,
                shadow.variant,
                _ShadowWindow(shadow.live_version, shadow.live_variant),
            )
        for (model, version, variant), shadow_window in shadows.items():
            current = chosen_shadows.get(model)
            if current is None or shadow_window.sampled >= current[2].sampled:
                chosen_shadows[model] = (version, variant, shadow_window)
        report = {
            model: window.as_message(version, variant) for model, (version, variant, window) in chosen.items()
        }
        for model, (version, variant, shadow_window) in chosen_shadows.items():
            if model not in report:
                report[model] = _ModelWindow().as_message(
                    shadow_window.live_version, shadow_window.live_variant
                )
            report[model]["shadow"] = shadow_window.as_message(version, variant)
        return report


def _temperature_c() -> float | None:
    """The hottest sensor reading, or None where psutil has no sensors (not Linux/BSD,
    containers, boards without a driver). The hottest one is what throttles the CPU."""
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None
    try:
        sensors = read()
    except (OSError, RuntimeError):
        return None
    readings = [entry.current for entries in sensors.values() for entry in entries if entry.current]
    return round(max(readings), 1) if readings else None


def health_snapshot(*, state_dir: Path, started_at: float, process: psutil.Process | None = None) -> dict:
    """Device health for the telemetry window.

    ``started_at`` is the agent's start as ``time.monotonic()``: boards without a
    real-time clock jump years when NTP first syncs, which would wreck a wall-clock uptime.
    ``cpu_pct`` is this process's CPU use since the previous call on the same ``process``
    (psutil's semantics: 0.0 on the first call, and above 100 when several cores are busy),
    so pass the same ``psutil.Process`` every window.
    """
    process = process or psutil.Process()
    health: dict[str, Any] = {
        "cpu_pct": round(process.cpu_percent(interval=None), 1),
        "rss_mb": round(process.memory_info().rss / 2**20, 1),
        "disk_free_mb": shutil.disk_usage(state_dir).free // 2**20,
        "uptime_s": max(0, int(time.monotonic() - started_at)),
    }
    temperature = _temperature_c()
    if temperature is not None:
        health["temp_c"] = temperature
    return health


def telemetry_message(
    *,
    models: dict,
    window_s: float,
    health: dict,
    dropped: int,
    message_id: str | None = None,
    ts: str | None = None,
) -> dict:
    """The telemetry message (ARCHITECTURE.md, "Telemetry window"; ``id`` and ``dropped``
    are docs/protocol.md additions 3 and 4), validated: raises ``protocol.SchemaError``."""
    message = {
        "id": message_id or uuid.uuid4().hex,
        "ts": ts or protocol.format_time(datetime.now(UTC)),
        "window_s": window_s,
        "models": models,
        "health": health,
        "dropped": dropped,
    }
    return protocol.validate("telemetry", message)
