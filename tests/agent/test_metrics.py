"""The agent's `/metrics` on its local API (agent/metrics.py): after real inferences on
LiteRT, a real download (resumed after a dropped connection), a hot swap and a refused
desired state, the named series say so."""

import json
import logging

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from agent import cli
from agent.localapi import unix_request
from agent.metrics import log_setup
from tests.agent.conftest import desired_envelope, publish_artifact
from tests.grafana import missing


def scrape(agent) -> dict[tuple[str, frozenset], float]:
    response = requests.get(f"{agent.api.address}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return parse(response.text)


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def agent(make_agent, artifact_server, artifacts, signing_key):
    """An agent that downloaded v1, resuming once after the server cut the blob short."""
    agent = make_agent()
    v1 = publish_artifact(artifact_server, artifacts[("1.0.0", "int8")])
    blob_path = "/" + v1["blob_url"].split("/", 3)[3]
    artifact_server.cut_after(blob_path, 100)
    result = agent.apply(desired_envelope(signing_key, agent.config.device_id, 1, {"digits": v1}))
    assert result.status == "applied", result
    return agent


def predict(agent, features):
    response = requests.post(
        f"{agent.api.address}/v1/models/digits:predict", json={"inputs": [[features]]}, timeout=5
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_a_fresh_agent_shows_no_inference_and_no_swap(make_agent):
    samples = scrape(make_agent())
    assert not [key for key in samples if key[0] == "modelfleet_agent_inferences_total"]
    assert not [key for key in samples if key[0] == "modelfleet_agent_swaps_total"]
    assert value(samples, "modelfleet_agent_download_bytes_total") == 0
    assert value(samples, "modelfleet_agent_resident_memory_bytes") > 10 * 1024 * 1024


def test_inferences_are_counted_with_a_latency_histogram_per_model(agent, digits):
    x, _ = digits.golden_set()
    answers = [predict(agent, x[n].tolist()) for n in range(3)]
    samples = scrape(agent)
    assert (
        value(samples, "modelfleet_agent_inferences_total", model="digits", version="1.0.0", outcome="ok")
        == 3
    )
    assert value(samples, "modelfleet_agent_inference_duration_seconds_count", model="digits") == 3
    # The histogram holds what the interpreter took, as the answers reported it (in ms).
    took = sum(answer["latency_ms"] for answer in answers) / 1000
    assert value(samples, "modelfleet_agent_inference_duration_seconds_sum", model="digits") == pytest.approx(
        took, abs=0.001
    )
    assert (
        value(samples, "modelfleet_agent_inference_duration_seconds_bucket", model="digits", le="+Inf") == 3
    )


def test_a_failed_inference_is_counted_as_an_error(agent):
    response = requests.post(
        f"{agent.api.address}/v1/models/digits:predict", json={"inputs": [[[0.0] * 63]]}, timeout=5
    )
    assert response.status_code == 422
    samples = scrape(agent)
    assert (
        value(samples, "modelfleet_agent_inferences_total", model="digits", version="1.0.0", outcome="error")
        == 1
    )
    assert value(samples, "modelfleet_agent_inference_duration_seconds_count", model="digits") is None


def test_the_swap_the_download_and_its_resume_are_counted(agent, artifacts):
    samples = scrape(agent)
    assert value(samples, "modelfleet_agent_swaps_total", model="digits") == 1
    assert value(samples, "modelfleet_agent_download_resumes_total") == 1
    blob = len(artifacts[("1.0.0", "int8")].blob)
    # The manifest, the blob (its first 100 bytes, kept in the partial file, are not asked
    # for again) and the golden set.
    assert value(samples, "modelfleet_agent_download_bytes_total") >= blob
    assert value(samples, "modelfleet_agent_download_bytes_total") == agent.downloader.bytes_received


def test_a_refused_desired_state_is_counted_by_its_reason_code(
    agent, artifact_server, artifacts, signing_key
):
    v1 = publish_artifact(artifact_server, artifacts[("1.0.0", "int8")])
    wrong = desired_envelope(signing_key, "somebody-else", 2, {"digits": v1})
    assert agent.apply(wrong).status == "refused"
    replayed = desired_envelope(signing_key, agent.config.device_id, 1, {"digits": v1})
    assert agent.apply(replayed).status in ("refused", "unchanged")
    samples = scrape(agent)
    assert value(samples, "modelfleet_agent_refusals_total", reason="wrong_device", event="failed") == 1
    # Positive control: a reason that did not happen has no series.
    assert (
        value(samples, "modelfleet_agent_refusals_total", reason="signature_invalid", event="failed") is None
    )


def test_only_get_reads_metrics(agent):
    response = requests.post(f"{agent.api.address}/metrics", timeout=5)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_metrics_on_a_unix_socket(make_agent, tmp_path):
    socket_path = tmp_path / "api.sock"
    make_agent(local_api={"bind": f"unix:{socket_path}"})
    status, body = unix_request(str(socket_path), "GET", "/metrics")
    assert status == 200
    assert value(parse(body.decode()), "modelfleet_agent_download_resumes_total") == 0


def test_the_json_log_format_names_the_device(capsys):
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        log_setup(level="INFO", log_format="json", device_id="cam-7")
        logging.getLogger("agent.core").warning("event failed reason=%s", "hash_mismatch")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    (line,) = [json.loads(text) for text in capsys.readouterr().err.splitlines()]
    assert line["device_id"] == "cam-7"
    assert line["message"] == "event failed reason=hash_mismatch"
    assert (line["level"], line["logger"]) == ("WARNING", "agent.core")


def test_an_unknown_log_format_is_refused_at_start(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LOG_FORMAT", "xml")
    assert cli.main(["run", "--config", str(tmp_path / "missing.toml")]) == cli.EXIT_CONFIG
    assert "LOG_FORMAT" in capsys.readouterr().err


def test_the_dashboards_agent_panels_read_series_the_agent_shows(
    agent, digits, artifact_server, artifacts, signing_key
):
    x, _ = digits.golden_set()
    predict(agent, x[0].tolist())
    requests.post(f"{agent.api.address}/v1/models/digits:predict", json={"inputs": [[[0.0]]]}, timeout=5)
    v1 = publish_artifact(artifact_server, artifacts[("1.0.0", "int8")])
    agent.apply(desired_envelope(signing_key, "somebody-else", 2, {"digits": v1}))
    scraped = {name for name, _ in scrape(agent)}
    assert missing(scraped, agent=True) == {}
    # Positive control: a name the agent does not have is reported.
    assert missing(scraped - {"modelfleet_agent_swaps_total"}, agent=True)
