"""The Grafana dashboard (docs/grafana/modelfleet.json): every control-plane panel reads
series that the web app's `/metrics` or an ingest bridge's port shows after real traffic
(an API request, an upload through the pipeline, desired states through the broker,
telemetry through the bridge, devices and rollouts in the database)."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from fleet.core.metrics import ingest_metrics_serve
from fleet.devices.models import Device
from fleet.mqtt.broker import free_port
from fleet.rollouts.choices import Decision, Metric, RolloutState, Verdict
from fleet.rollouts.models import GateEvaluation, Rollout, RolloutPolicy
from tests.conftest import wait_until
from tests.grafana import AGENT_PREFIX, metric_names_by_panel, missing
from tests.server import test_ingest
from tests.server.conftest import ready_artifact
from tests.server.test_ingest import telemetry
from tests.server.test_ingest_metrics import scrape as scrape_bridge
from tests.server.test_metrics import TOKEN, parse

bridge = test_ingest.bridge
devices = test_ingest.devices
marker = test_ingest.marker
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("broker_settings")]


def test_every_panel_reads_modelfleet_series_and_both_sides_have_panels():
    panels = metric_names_by_panel()
    assert all(panels.values()), [title for title, names in panels.items() if not names]
    names = set().union(*panels.values())
    assert any(name.startswith(AGENT_PREFIX) for name in names)
    assert any(not name.startswith(AGENT_PREFIX) for name in names)


def test_the_control_plane_panels_read_series_shown_after_real_traffic(
    settings, bridge, devices, version_v1, digits, alice
):
    settings.METRICS_TOKEN = TOKEN
    assert alice.client().get("/api/v1/models/").status_code == 200
    ready_artifact(version_v1, "int8", digits.build_digits_models()["int8"], alice.user)
    cam = devices("cam")
    Device.objects.filter(device_id=cam.device_id).update(
        online=True, reported_models={"digits": {"version": "1.0.0"}}
    )
    call_command(
        "publish_desired", cam.device_id, "--model", "digits", "--model-version", "1.0.0", "--variant", "int8"
    )
    rollout = Rollout.objects.create(
        model=version_v1.model,
        target_version=version_v1,
        policy=RolloutPolicy.objects.create(name="canary", gates={}),
        state=RolloutState.RUNNING,
    )
    GateEvaluation.objects.create(
        rollout=rollout,
        stage=0,
        metric=Metric.ERROR_RATE,
        verdict=Verdict.PASS,
        decision=Decision.WAIT,
        evaluated_at=timezone.now(),
    )
    port = free_port()
    stop = ingest_metrics_serve(bridge.bridge, port=port, addr="127.0.0.1")
    try:
        cam.publish("telemetry", telemetry())
        wait_until(lambda: bridge.delta("committed") >= 1, timeout=10, message="the window to be written")
        web = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
        scraped = {name for name, _ in parse(web.content.decode())} | {
            name for name, _ in scrape_bridge(port)
        }
    finally:
        stop()
    assert missing(scraped, agent=False) == {}
    # Positive control: a series the scrape lacks is reported against its panel.
    assert "Rollouts by state" in missing(scraped - {"modelfleet_rollouts"}, agent=False)
