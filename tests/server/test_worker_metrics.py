"""Metrics of Celery workers (docs/operations.md, "Metrics and logs"): with
PROMETHEUS_MULTIPROC_DIR, what a prefork pool process counts is served by the worker's
own metrics port (WORKER_METRICS_PORT), after a real upload through the pipeline."""

from __future__ import annotations

import uuid

import pytest
import requests

from fleet.mqtt.broker import free_port
from fleet.registry.choices import ArtifactStatus
from fleet.registry.models import Artifact
from tests.conftest import celery_worker, wait_until, worker_env
from tests.server.conftest import pending_artifact
from tests.server.test_metrics import parse, value

pytestmark = pytest.mark.django_db(transaction=True)
PIPELINE_COUNT = "modelfleet_artifact_pipeline_duration_seconds_count"


def scrape(port: int):
    return parse(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)


@pytest.fixture
def queue():
    """A queue of this test's own, where uploads queue their pipeline task meanwhile."""
    from fleet.celery import app

    previous, app.conf.task_default_queue = app.conf.task_default_queue, f"metrics-{uuid.uuid4().hex[:8]}"
    yield app.conf.task_default_queue
    app.conf.task_default_queue = previous


def test_a_pool_process_counts_the_pipeline_on_the_workers_port(
    broker, tmp_path, queue, version_v1, digits, alice
):
    (tmp_path / "prometheus").mkdir()
    port = free_port()
    env = {
        **worker_env(broker),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
        "WORKER_METRICS_PORT": str(port),
    }
    pool = ("-P", "prefork", "-c", "1")  # the task runs in a child process, not the one serving
    with celery_worker(env=env, queue=queue, log_path=tmp_path / "worker.log", pool=pool):
        assert value(scrape(port), PIPELINE_COUNT, outcome="ready") == 0
        artifact = pending_artifact(version_v1, "int8", digits.build_digits_models()["int8"], alice.user)
        wait_until(
            lambda: value(scrape(port), PIPELINE_COUNT, outcome="ready") == 1,
            timeout=60,
            message="the pool process's pipeline to show on the worker's port",
        )
    assert Artifact.objects.get(pk=artifact.pk).status == ArtifactStatus.READY
    assert list((tmp_path / "prometheus").glob("*.db")), "the pool process wrote no multiprocess file"
