"""Desired state → download → verify → swap → reported, with telemetry carrying feedback
accuracy. Real Mosquitto (project config, per-device ACL), real HTTP, real LiteRT."""

import requests

from tests.agent.conftest import desired_envelope, publish_artifact, publish_desired


def predict(agent, sample):
    return requests.post(
        f"{agent.api.address}/v1/models/digits:predict", json={"inputs": [[sample.tolist()]]}, timeout=5
    )


def test_it_installs_the_desired_model_and_reports_it(
    make_agent, publisher, collector, artifact_server, artifacts, signing_key, digits
):
    agent = make_agent()
    entry = publish_artifact(artifact_server, artifacts[("1.0.0", "int8")])
    publish_desired(
        publisher,
        agent.config.device_id,
        desired_envelope(signing_key, agent.config.device_id, 1, {"digits": entry}),
    )

    reported = collector.wait_for(agent.config.device_id, "reported", lambda m: m["generation"] == 1)
    assert reported["models"] == {"digits": {"version": "1.0.0", "variant": "int8"}}
    events = [e["type"] for e in collector.of(agent.config.device_id, "events")]
    assert events[:4] == ["notified", "downloading", "verifying", "active"]

    x, y = digits.golden_set()
    correct = 0
    for sample, label in zip(x[:40], y[:40], strict=True):
        answer = predict(agent, sample).json()
        assert answer["version"] == "1.0.0" and answer["variant"] == "int8"
        feedback = requests.post(
            f"{agent.api.address}/v1/feedback",
            json={"prediction_id": answer["prediction_id"], "label": int(label)},
            timeout=5,
        )
        correct += feedback.json()["correct"]
    window = collector.wait_for(
        agent.config.device_id,
        "telemetry",
        lambda m: m["models"].get("digits", {}).get("feedback", {}).get("labeled", 0) > 0,
    )
    digits_window = window["models"]["digits"]
    assert digits_window["version"] == "1.0.0"
    assert digits_window["feedback"]["correct"] <= digits_window["feedback"]["labeled"]
    assert correct >= 36  # the good model is ~97 % accurate
    assert set(window["health"]) >= {"cpu_pct", "rss_mb", "disk_free_mb", "uptime_s"}
