"""Prometheus metrics of the control plane (docs/operations.md, "Metrics and logs").

Every metric name lives here. Three kinds:

* counted in the process where it happens: HTTP requests (middleware below), uploads and
  pipeline durations (registry services), desired states signed and published (devices
  services, mqtt publisher). Web and worker processes share them through
  prometheus-client's multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set;
* read from the database at scrape time by :class:`FleetCollector`: devices online per
  model version, rollouts per state, gate verdicts. Four queries per scrape whatever the
  fleet's size;
* the ingest bridge's own counters, read at scrape time by :class:`IngestCollector` on
  the bridge's own port (the bridge is its own process).

``GET /metrics`` on the web app answers only ``Authorization: Bearer $METRICS_TOKEN``.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import prometheus_client
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from fleet.core.errors import error_body

if TYPE_CHECKING:
    from fleet.devices.ingest import IngestBridge

# No "_created" series beside every counter: nothing here reads them, and they double the
# number of series a scrape returns.
prometheus_client.disable_created_metrics()

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PIPELINE_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

HTTP_REQUESTS = Counter(
    "modelfleet_http_requests",
    "HTTP requests answered, by URL pattern name, method and status code.",
    ["view", "method", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "modelfleet_http_request_duration_seconds",
    "Time to answer an HTTP request, by URL pattern name and method.",
    ["view", "method"],
    buckets=HTTP_BUCKETS,
)
ARTIFACT_UPLOADS = Counter("modelfleet_artifact_uploads", "Model files uploaded and queued for the pipeline.")
ARTIFACT_UPLOAD_BYTES = Counter("modelfleet_artifact_upload_bytes", "Bytes of the model files uploaded.")
ARTIFACT_PIPELINE_SECONDS = Histogram(
    "modelfleet_artifact_pipeline_duration_seconds",
    "Time of the registry pipeline (check, compress, sign) per artifact, by outcome (ready, failed).",
    ["outcome"],
    buckets=PIPELINE_BUCKETS,
)
ARTIFACT_DELTAS = Counter(
    "modelfleet_artifact_deltas",
    "Tensor-level deltas made between versions, by outcome (ready: offered, skipped, failed).",
    ["outcome"],
)
DESIRED_SIGNED = Counter("modelfleet_desired_states_signed", "Desired states signed.")
DESIRED_PUBLISHED = Counter(
    "modelfleet_desired_states_published", "Desired states published and acknowledged by the broker."
)

# A request that matched no URL pattern is counted under this view name (not its path,
# which the client chooses: one series per scanned path would have no end).
UNMATCHED_VIEW = "unmatched"


def metrics_middleware(get_response: Callable[[HttpRequest], HttpResponse]):
    """Count every request and time it, by the name of the URL pattern it matched."""

    def middleware(request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        response = get_response(request)
        match = getattr(request, "resolver_match", None)
        view = (match.view_name or match.route) if match else UNMATCHED_VIEW
        method = request.method if request.method in _METHODS else "other"
        HTTP_REQUESTS.labels(view, method, str(response.status_code)).inc()
        HTTP_REQUEST_SECONDS.labels(view, method).observe(time.perf_counter() - started)
        return response

    return middleware


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class FleetCollector(Collector):
    """Fleet state read from the database when Prometheus scrapes (selectors, one query
    each), so that several web processes report the same numbers."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from fleet.devices.selectors import devices_by_status, online_devices_by_version
        from fleet.rollouts.selectors import active_gate_verdicts, rollouts_by_state

        for name, documentation, labels, counts in (
            (
                "devices",
                "Devices by status and whether they are online.",
                ["status", "online"],
                devices_by_status,
            ),
            (
                "devices_online",
                "Active devices online, by the model version they report serving.",
                ["model", "version"],
                online_devices_by_version,
            ),
            ("rollouts", "Rollouts by state.", ["state"], rollouts_by_state),
            (
                "gate_verdicts",
                "Gates of the latest evaluation of every running or paused rollout, by metric and verdict.",
                ["metric", "verdict"],
                active_gate_verdicts,
            ),
        ):
            family = GaugeMetricFamily(f"modelfleet_{name}", documentation, labels=labels)
            for key, n in sorted(counts().items()):
                family.add_metric([_label(part) for part in (key if isinstance(key, tuple) else (key,))], n)
            yield family


def _label(value: str | bool) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def process_registry() -> CollectorRegistry:
    """Every process's metrics on this host (multiprocess mode, PROMETHEUS_MULTIPROC_DIR)
    or this process's alone."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        registry.register(_ProcessMetrics())
    return registry


def scrape_registry() -> CollectorRegistry:
    """What one scrape of the web app reads: the processes' metrics and the fleet's state
    from the database."""
    registry = process_registry()
    registry.register(FleetCollector())
    return registry


def serve_process_metrics(*, port: int, addr: str) -> None:
    """Serve :func:`process_registry` on ``addr:port`` in a thread (a Celery worker host)."""
    prometheus_client.start_http_server(port, addr=addr, registry=process_registry())


class _ProcessMetrics(Collector):
    """This process's own metrics (the default registry), without registering them twice."""

    def collect(self):
        return prometheus_client.REGISTRY.collect()


def _authorized(request: HttpRequest) -> bool:
    token = settings.METRICS_TOKEN
    given = request.headers.get("Authorization", "")
    scheme, _, credentials = given.partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip(), token)


@csrf_exempt
@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus's text format, for ``Authorization: Bearer $METRICS_TOKEN`` only. With no
    METRICS_TOKEN set the endpoint is off (nobody may read it)."""
    if not settings.METRICS_TOKEN:
        return JsonResponse(
            error_body("metrics_disabled", "Metrics are off: set METRICS_TOKEN to serve them."), status=404
        )
    if not _authorized(request):
        response = JsonResponse(
            error_body("not_authenticated", "Send Authorization: Bearer <METRICS_TOKEN>."), status=401
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(
        prometheus_client.generate_latest(scrape_registry()),
        content_type=prometheus_client.CONTENT_TYPE_LATEST,
    )


class IngestCollector(Collector):
    """The ingest bridge's counters (fleet/devices/ingest.py, ``Counters``) and queue, read
    when Prometheus scrapes: nothing is added to the bridge's per-message work."""

    def __init__(self, bridge: IngestBridge) -> None:
        self.bridge = bridge

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        from fleet.devices.ingest import DROP_REASONS

        counters = self.bridge.counters
        for name, field, documentation in (
            ("received", "received", "Messages taken from the queue by the writer."),
            ("committed", "committed", "Valid messages written to the database (then acknowledged)."),
            ("telemetry_rows", "telemetry_rows", "Telemetry rows inserted (one per model per window)."),
            ("duplicate_rows", "duplicate_rows", "Telemetry rows and events already stored (redeliveries)."),
            ("events", "events", "Device events inserted."),
            ("batches", "batches", "Batches committed."),
            ("db_retries", "db_retries", "Database writes retried after a transient error."),
        ):
            yield CounterMetricFamily(
                f"modelfleet_ingest_{name}", documentation, value=getattr(counters, field)
            )
        dropped = CounterMetricFamily(
            "modelfleet_ingest_dropped",
            "Messages dropped or refused, by reason (docs/ingest.md).",
            labels=["reason"],
        )
        for reason in DROP_REASONS:
            dropped.add_metric([reason], getattr(counters, reason))
        yield dropped
        yield GaugeMetricFamily(
            "modelfleet_ingest_pending_messages",
            "Messages received and not yet written.",
            value=self.bridge.pending_messages(),
        )
        yield GaugeMetricFamily(
            "modelfleet_ingest_pending_bytes",
            "Bytes received and not yet written.",
            value=self.bridge.pending_bytes(),
        )
        yield GaugeMetricFamily(
            "modelfleet_ingest_lag_seconds",
            "How long the oldest message not yet written has waited (0 when none waits).",
            value=self.bridge.lag_s(),
        )
        yield GaugeMetricFamily(
            "modelfleet_ingest_connected",
            "1 while the bridge is connected to the broker.",
            value=1 if self.bridge.connected.is_set() else 0,
        )


def ingest_metrics_serve(bridge: IngestBridge, *, port: int, addr: str) -> Callable[[], None]:
    """Serve the bridge's metrics on ``addr:port`` in a thread; returns a function that
    stops it."""
    registry = CollectorRegistry()
    registry.register(IngestCollector(bridge))
    server, thread = prometheus_client.start_http_server(port, addr=addr, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop
