"""gunicorn's settings for the web app, read from the working directory by every way this
project runs it (Procfile / make up, docker/Dockerfile, docker/systemd/fleet-web.service).
Command-line flags still win; this file only adds what flags cannot say."""

import os


def child_exit(server, worker):
    """With PROMETHEUS_MULTIPROC_DIR set, /metrics adds up every process of the host: a
    worker that exits must be marked dead, or its live gauges would count forever
    (docs/operations.md, "Metrics and logs")."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
