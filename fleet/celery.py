"""Celery on Redis. Tasks are thin wrappers over services (STYLE.md); time limits are
global settings (CELERY_TASK_SOFT_TIME_LIMIT / CELERY_TASK_TIME_LIMIT)."""

import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fleet.settings")

app = Celery("fleet")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.worker_process_shutdown.connect
def _forget_dead_process(pid: int, **kwargs) -> None:
    """Multiprocess metrics: a pool process that exits leaves its gauges behind unless told."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


@signals.worker_ready.connect
def _serve_metrics(sender, **kwargs) -> None:
    """WORKER_METRICS_PORT: the worker's own metrics port, for a host with no web process
    (docs/operations.md, "Metrics and logs"). Pool processes count in PROMETHEUS_MULTIPROC_DIR."""
    from django.conf import settings

    if settings.WORKER_METRICS_PORT:
        from fleet.core.metrics import serve_process_metrics

        serve_process_metrics(port=settings.WORKER_METRICS_PORT, addr=settings.WORKER_METRICS_ADDR)
