"""Prometheus metrics of the control plane (fleet/core/metrics.py): `/metrics` is refused
without the METRICS_TOKEN bearer, and the named series move after real traffic (API
requests, the registry pipeline, desired states through the real broker, fleet state from
PostgreSQL). The ingest bridge's port has its tests in test_ingest_metrics.py."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device
from fleet.rollouts.choices import Decision, Metric, RolloutState, Verdict
from fleet.rollouts.models import GateEvaluation, Rollout, RolloutPolicy
from tests.server.conftest import ready_artifact

pytestmark = pytest.mark.django_db
TOKEN = "metrics-test-token-0123456789"


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape: (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(**labels_by_name) -> dict[tuple[str, frozenset], float]:
    response = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return parse(response.content.decode())


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(autouse=True)
def _token(settings):
    settings.METRICS_TOKEN = TOKEN


def test_metrics_are_refused_without_the_token_and_with_a_wrong_one():
    for headers in ({}, {"HTTP_AUTHORIZATION": "Bearer wrong"}, {"HTTP_AUTHORIZATION": f"Basic {TOKEN}"}):
        response = Client().get("/metrics", **headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "not_authenticated"
        assert response["WWW-Authenticate"].startswith("Bearer")
        assert b"modelfleet_" not in response.content
    # Positive control: the same request with the token is answered.
    allowed = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert allowed.status_code == 200 and b"modelfleet_http_requests_total" in allowed.content


def test_without_a_metrics_token_the_endpoint_is_off(settings):
    settings.METRICS_TOKEN = ""
    for headers in ({}, {"HTTP_AUTHORIZATION": "Bearer "}, {"HTTP_AUTHORIZATION": f"Bearer {TOKEN}"}):
        response = Client().get("/metrics", **headers)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "metrics_disabled"


def test_an_api_token_of_an_admin_does_not_open_metrics(ada):
    response = ada.client().get("/metrics")
    assert response.status_code == 401


def test_an_api_request_is_counted_by_view_method_and_status(bob):
    labels = {"view": "model-list", "method": "GET", "status": "200"}
    before = scrape()
    assert bob.client().get("/api/v1/models/").status_code == 200
    assert bob.client().get("/api/v1/models/").status_code == 200
    assert bob.client().get("/api/v1/nothing-here").status_code == 404
    after = scrape()
    assert value(after, "modelfleet_http_requests_total", **labels) == (
        value(before, "modelfleet_http_requests_total", **labels) + 2
    )
    count = "modelfleet_http_request_duration_seconds_count"
    assert (
        value(after, count, view="model-list", method="GET")
        == value(before, count, view="model-list", method="GET") + 2
    )
    # The unknown path is counted under its catch-all pattern's name, not its own path.
    unknown = {"view": "api-not-found", "method": "GET", "status": "404"}
    assert value(after, "modelfleet_http_requests_total", **unknown) >= 1
    assert not any("nothing-here" in str(key) for key in after)


def test_an_upload_and_its_pipeline_are_counted_and_timed(version_v1, digits, alice):
    before = scrape()
    data = digits.build_digits_models()["int8"]
    artifact = ready_artifact(version_v1, "int8", data, alice.user)
    assert artifact.status == "ready"
    after = scrape()
    assert (
        value(after, "modelfleet_artifact_uploads_total")
        == value(before, "modelfleet_artifact_uploads_total") + 1
    )
    assert value(after, "modelfleet_artifact_upload_bytes_total") == (
        value(before, "modelfleet_artifact_upload_bytes_total") + len(data)
    )
    count = "modelfleet_artifact_pipeline_duration_seconds_count"
    total = "modelfleet_artifact_pipeline_duration_seconds_sum"
    assert value(after, count, outcome="ready") == value(before, count, outcome="ready") + 1
    assert value(after, total, outcome="ready") > value(before, total, outcome="ready")


def test_a_failed_pipeline_is_timed_as_failed(version_v1, alice):
    before = scrape()
    broken = ready_artifact(version_v1, "float32", b"\x18\0\0\0TFL3" + b"\0" * 200, alice.user)
    assert broken.status == "failed"
    count = "modelfleet_artifact_pipeline_duration_seconds_count"
    assert value(scrape(), count, outcome="failed") == value(before, count, outcome="failed") + 1


@pytest.mark.django_db(transaction=True)  # states are published once the assignment commits
@pytest.mark.usefixtures("broker_settings")
def test_desired_states_signed_and_published_through_the_broker_are_counted(version_v1, digits, alice):
    ready_artifact(version_v1, "int8", digits.build_digits_models()["int8"], alice.user)
    for name in ("cam-m1", "cam-m2"):
        Device.objects.create(device_id=name, status=DeviceStatus.ACTIVE)
    before = scrape()
    call_command(
        "publish_desired",
        "cam-m1",
        "cam-m2",
        "--model",
        "digits",
        "--model-version",
        "1.0.0",
        "--variant",
        "int8",
    )
    after = scrape()
    for name in ("modelfleet_desired_states_signed_total", "modelfleet_desired_states_published_total"):
        assert value(after, name) == value(before, name) + 2, name


def test_fleet_state_comes_from_the_database(version_v1, digits, alice):
    serving = {"digits": {"version": "1.0.0"}}
    for device_id, status, online, reported in (
        ("m-a", DeviceStatus.ACTIVE, True, serving),
        ("m-b", DeviceStatus.ACTIVE, True, {**serving, "faces": {"version": "0.3.0"}}),
        # Offline, or not active: not counted as serving anything.
        ("m-c", DeviceStatus.ACTIVE, False, serving),
        ("m-d", DeviceStatus.DISABLED, True, serving),
    ):
        Device.objects.create(device_id=device_id, status=status, online=online, reported_models=reported)
    policy = RolloutPolicy.objects.create(name="canary", gates={})
    running, paused, done = (
        Rollout.objects.create(model=version_v1.model, target_version=version_v1, policy=policy, state=state)
        for state in (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.COMPLETED)
    )
    old = GateEvaluation.objects.create(
        rollout=running, stage=0, metric=Metric.ERROR_RATE, verdict=Verdict.FAIL, decision=Decision.WAIT
    )
    GateEvaluation.objects.filter(pk=old.pk).update(evaluated_at=old.evaluated_at.replace(year=2020))
    now = timezone.now()  # one evaluation: its gates share their time
    for metric, verdict in ((Metric.ERROR_RATE, Verdict.PASS), (Metric.ACCURACY, Verdict.WAIT)):
        GateEvaluation.objects.create(
            rollout=running, stage=0, metric=metric, verdict=verdict, decision=Decision.WAIT, evaluated_at=now
        )
    GateEvaluation.objects.create(
        rollout=paused, stage=0, metric=Metric.ERROR_RATE, verdict=Verdict.PASS, decision=Decision.WAIT
    )
    GateEvaluation.objects.create(
        rollout=done, stage=0, metric=Metric.ACCURACY, verdict=Verdict.FAIL, decision=Decision.WAIT
    )

    samples = scrape()
    assert value(samples, "modelfleet_devices_online", model="digits", version="1.0.0") == 2
    assert value(samples, "modelfleet_devices_online", model="faces", version="0.3.0") == 1
    assert value(samples, "modelfleet_devices", status="active", online="true") == 2
    assert value(samples, "modelfleet_devices", status="active", online="false") == 1
    assert value(samples, "modelfleet_devices", status="disabled", online="true") == 1
    for state in ("running", "paused", "completed"):
        assert value(samples, "modelfleet_rollouts", state=state) == 1
    # The latest evaluation of each running or paused rollout: the old failure and the
    # completed rollout's are history.
    assert value(samples, "modelfleet_gate_verdicts", metric="error_rate", verdict="pass") == 2
    assert value(samples, "modelfleet_gate_verdicts", metric="accuracy", verdict="wait") == 1
    assert value(samples, "modelfleet_gate_verdicts", metric="error_rate", verdict="fail") == 0
    assert value(samples, "modelfleet_gate_verdicts", metric="accuracy", verdict="fail") == 0


def test_a_scrape_costs_a_fixed_number_of_queries(django_assert_max_num_queries):
    for n in range(30):
        Device.objects.create(
            device_id=f"q-{n}",
            status=DeviceStatus.ACTIVE,
            online=True,
            reported_models={"digits": {"version": "1.0.0"}},
        )
    with django_assert_max_num_queries(4):
        scrape()
