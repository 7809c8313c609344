"""The agent's Prometheus metrics, served at ``GET /metrics`` on the local API
(docs/agent.md, "Metrics"), and its JSON log format.

One registry per :class:`~agent.core.Agent` (no module-level state: several agents may
share a process, as the tests' do). Counted where they happen: inferences and their
latency per model, swaps, refusals by reason code (the codes of
``agent.protocol.Reason``). Read when Prometheus scrapes: download bytes and
resumes (the downloader's own counters) and the process's resident memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pythonjsonlogger.json import JsonFormatter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# From 50 µs (a small model on a desktop CPU) to 2.5 s (a large one on a small board).
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
    2.5,
)


class AgentMetrics:
    def __init__(
        self,
        *,
        download_bytes: Callable[[], int],
        download_resumes: Callable[[], int],
        rss_bytes: Callable[[], int],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.inferences = Counter(
            "modelfleet_agent_inferences",
            "Inferences served, by model, version and outcome (ok, error).",
            ["model", "version", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "modelfleet_agent_inference_duration_seconds",
            "Time the interpreter took per inference, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.swaps = Counter(
            "modelfleet_agent_swaps",
            "Hot swaps: a new version of a model made live.",
            ["model"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "modelfleet_agent_refusals",
            "Desired states, models and trust bundles refused, by reason code and event (failed, retrying).",
            ["reason", "event"],
            registry=self.registry,
        )
        self.deliveries = Counter(
            "modelfleet_agent_deliveries",
            "Models downloaded, by path (delta, full) and why a delta offered was not used "
            "(fallback, empty when none was).",
            ["path", "fallback"],
            registry=self.registry,
        )
        self.registry.register(_ReadAtScrape(download_bytes, download_resumes, rss_bytes))

    def inference(self, model: str, version: str, latency_s: float | None) -> None:
        """One inference; ``latency_s`` None for one that failed."""
        if latency_s is None:
            self.inferences.labels(model, version, "error").inc()
        else:
            self.inferences.labels(model, version, "ok").inc()
            self.latency.labels(model).observe(latency_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ReadAtScrape(Collector):
    def __init__(self, download_bytes, download_resumes, rss_bytes) -> None:
        self.download_bytes, self.download_resumes, self.rss_bytes = (
            download_bytes,
            download_resumes,
            rss_bytes,
        )

    def collect(self) -> Iterator[Any]:
        yield CounterMetricFamily(
            "modelfleet_agent_download_bytes",
            "Bytes received from the control plane (manifests and blobs).",
            value=self.download_bytes(),
        )
        yield CounterMetricFamily(
            "modelfleet_agent_download_resumes",
            "Blob downloads resumed with Range from a partial file.",
            value=self.download_resumes(),
        )
        yield GaugeMetricFamily(
            "modelfleet_agent_resident_memory_bytes",
            "Resident memory of the agent process.",
            value=self.rss_bytes(),
        )


def json_formatter(**static_fields: str) -> JsonFormatter:
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, the fields
    given, any ``extra`` of the call and the traceback. The control plane uses it too."""
    return JsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
        static_fields=static_fields,
    )


def log_setup(*, level: str, log_format: str, device_id: str) -> None:
    """The agent's logging: one line of text, or with ``json`` one JSON object a line that
    names the device (the fields match the control plane's, fleet/core/logs.py)."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(json_formatter(device_id=device_id))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
