"""Shadow evaluation on the device (docs/protocol.md addition 5): a real agent, real
LiteRT, a real broker and artifact server. The shadow is verified like any candidate,
runs beside the live model on sampled requests, reports agreement in telemetry, and never
changes what the caller gets."""

from __future__ import annotations

import gc
import random
import threading
import weakref
from urllib.parse import urlparse

import numpy as np
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol, runtime
from agent.localapi import as_inputs
from agent.serving import LoadedModel, Prediction
from agent.shadow import Shadow, ShadowRunner, compare
from agent.telemetry import LoadedShadow, TelemetryWindow, telemetry_message
from samples import digits
from tests.agent.artifact_server import make_signed_artifact
from tests.agent.conftest import desired_envelope, publish_artifact, publish_desired
from tests.conftest import wait_until

SAMPLES = 120


def with_shadow(live: dict, shadow: dict, sample_rate: float) -> dict:
    return {**live, "shadow": {**shadow, "sample_rate": sample_rate}}


def first_outputs(tflite: bytes, x: np.ndarray, tmp_path, name: str) -> np.ndarray:
    path = tmp_path / f"{name}.tflite"
    path.write_bytes(tflite)
    interpreter = runtime.load(path)
    return np.stack([runtime.invoke(interpreter, [sample[np.newaxis, :]])[0][0] for sample in x])


def predict_all(agent, x: np.ndarray) -> list[dict]:
    session = requests.Session()
    answers = []
    for sample in x:
        response = session.post(
            f"{agent.api.address}/v1/models/digits:predict", json={"inputs": [[sample.tolist()]]}, timeout=10
        )
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


def shadow_totals(collector, device: str, version: str) -> dict[str, int]:
    """The shadow counters of every telemetry window so far, summed, for one shadow version."""
    totals = dict.fromkeys(("sampled", "compared", "agreed", "errors", "skipped", "windows"), 0)
    for message in collector.of(device, "telemetry"):
        shadow = message["models"].get("digits", {}).get("shadow")
        if shadow and shadow["version"] == version:
            for key in ("sampled", "compared", "agreed", "errors", "skipped"):
                totals[key] += shadow[key]
            totals["windows"] += 1
    return totals


def wait_resolved(collector, device: str, version: str, count: int) -> dict[str, int]:
    """Wait until ``count`` samples of ``version`` have been reported (compared, failed or
    skipped); every window's counters already passed the schema and its invariants."""
    return wait_until(
        lambda: (totals := shadow_totals(collector, device, version))["sampled"] >= count and totals,
        timeout=30,
        message=f"{count} shadow samples of {version} in telemetry",
    )


@pytest.fixture
def serving_v1(make_agent, publisher, collector, artifact_server, artifacts, signing_key):
    """An agent serving digits 1.0.0 float32 at generation 1, and that model's entry."""
    agent = make_agent()
    device = agent.config.device_id
    v1 = publish_artifact(artifact_server, artifacts[("1.0.0", "float32")])
    publish_desired(publisher, device, desired_envelope(signing_key, device, 1, {"digits": v1}))
    collector.wait_for(device, "reported", lambda m: m["generation"] == 1)
    return agent, v1


def start_shadow(agent, publisher, collector, signing_key, generation: int, models: dict) -> dict:
    device = agent.config.device_id
    publish_desired(publisher, device, desired_envelope(signing_key, device, generation, models))
    return collector.wait_for(device, "reported", lambda m: m["generation"] == generation)


# --- agreement


def test_a_shadow_identical_to_live_agrees_on_every_compared_request(
    serving_v1, publisher, collector, artifact_server, signing_key, digits, tmp_path
):
    agent, v1 = serving_v1
    device = agent.config.device_id
    x, y = digits.golden_set()
    tflite = digits.build_digits_models()["float32"]
    same = make_signed_artifact(  # the live model's very bytes, under another version
        private_key=signing_key,
        model="digits",
        version="1.0.1",
        variant="float32",
        tflite=tflite,
        labels=digits.LABELS,
        golden_npz=digits.golden_set_npz(),
        golden_accuracy=digits.evaluate(tflite, x, y),
    )
    shadow = publish_artifact(artifact_server, same)
    reported = start_shadow(
        agent, publisher, collector, signing_key, 2, {"digits": with_shadow(v1, shadow, 1.0)}
    )
    assert reported["models"]["digits"] == {
        "version": "1.0.0",
        "variant": "float32",
        "shadow": {"version": "1.0.1", "variant": "float32"},
    }
    events = [
        (e["type"], e.get("version"))
        for e in collector.of(device, "events")
        if e.get("generation") == 2 and e["type"] != "notified"
    ]
    assert events == [("downloading", "1.0.1"), ("verifying", "1.0.1"), ("shadow", "1.0.1")]

    answers = predict_all(agent, x[:SAMPLES])
    assert {a["version"] for a in answers} == {"1.0.0"}
    totals = wait_resolved(collector, device, "1.0.1", SAMPLES)
    assert totals["sampled"] == SAMPLES  # sample_rate 1.0: every request, and no more
    assert totals["compared"] == totals["agreed"] == SAMPLES - totals["skipped"] > 0
    assert totals["errors"] == 0
    windows = [
        m["models"]["digits"]
        for m in collector.of(device, "telemetry")
        if m["models"].get("digits", {}).get("shadow", {}).get("compared")
    ]
    assert all(w["shadow"]["mean_abs_diff"] == 0.0 for w in windows)
    assert all(w["shadow"]["latency_ms"]["p99"] > 0 for w in windows)
    # The live entry keeps counting the live version's own requests.
    # (A window that closed before 1.0.0 went live names no model.)
    live = [m["models"]["digits"] for m in collector.of(device, "telemetry") if "digits" in m["models"]]
    assert sum(entry["inferences"] for entry in live) >= SAMPLES
    assert {entry["version"] for entry in live} == {"1.0.0"}


def test_a_worse_shadow_agrees_clearly_less_often_and_callers_still_get_the_live_answer(
    serving_v1, publisher, collector, artifact_server, artifacts, signing_key, digits, tmp_path
):
    agent, v1 = serving_v1
    device = agent.config.device_id
    x = digits.golden_set()[0][:SAMPLES]
    live_outputs = first_outputs(digits.build_digits_models()["float32"], x, tmp_path, "v1")
    worse_outputs = first_outputs(digits.build_digits_models(quality="worse")["float32"], x, tmp_path, "v3")
    agreeing = int(np.sum(live_outputs.argmax(-1) == worse_outputs.argmax(-1)))
    assert agreeing < 0.9 * SAMPLES  # the worse model really disagrees, or this test could not fail

    shadow = publish_artifact(artifact_server, artifacts[("3.0.0", "float32")])
    start_shadow(agent, publisher, collector, signing_key, 2, {"digits": with_shadow(v1, shadow, 1.0)})
    answers = predict_all(agent, x)
    for answer, expected in zip(answers, live_outputs, strict=True):
        assert answer["version"] == "1.0.0"
        np.testing.assert_allclose(np.asarray(answer["outputs"][0][0]), expected, rtol=1e-6, atol=1e-7)

    totals = wait_resolved(collector, device, "3.0.0", SAMPLES)
    assert totals["errors"] == 0 and totals["compared"] > 0.8 * SAMPLES
    # Exactly the agreement the two models show offline, on the samples that were compared.
    assert totals["agreed"] < 0.9 * totals["compared"]
    if totals["skipped"] == 0:
        assert totals["agreed"] == agreeing
    diffs = [
        m["models"]["digits"]["shadow"]["mean_abs_diff"]
        for m in collector.of(device, "telemetry")
        if m["models"].get("digits", {}).get("shadow", {}).get("compared")
    ]
    assert diffs and all(d > 0.01 for d in diffs)


def test_answers_during_shadow_all_come_from_live_under_concurrent_load(
    serving_v1, publisher, collector, artifact_server, artifacts, signing_key, digits
):
    """Four clients at once with every request mirrored: the queue fills, samples are
    skipped, and not one caller waits for the shadow or gets its answer."""
    agent, v1 = serving_v1
    device = agent.config.device_id
    shadow = publish_artifact(artifact_server, artifacts[("3.0.0", "float32")])
    start_shadow(agent, publisher, collector, signing_key, 2, {"digits": with_shadow(v1, shadow, 1.0)})
    x = digits.golden_set()[0]
    results: list[list[dict]] = []
    failures: list[BaseException] = []

    def client(offset: int) -> None:
        try:
            results.append(predict_all(agent, x[offset : offset + 50]))
        except BaseException as exc:  # surfaced below
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(i * 50,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    answers = [a for batch in results for a in batch]
    assert len(answers) == 200
    assert {a["version"] for a in answers} == {"1.0.0"}
    totals = wait_resolved(collector, device, "3.0.0", 200)
    assert totals["sampled"] == totals["compared"] + totals["errors"] + totals["skipped"] == 200


# --- refusals


def tampered_blob(artifact_server, artifacts, signing_key):
    entry = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    blob = bytearray(artifacts[("2.0.0", "float32")].blob)
    blob[len(blob) // 2] ^= 0xFF
    artifact_server.add(urlparse(entry["blob_url"]).path, bytes(blob))
    return entry


def stranger_signed(artifact_server, artifacts, signing_key):
    """The same model, signed by a key the device does not trust."""
    good = artifacts[("2.0.0", "float32")]
    x, y = digits.golden_set()
    tflite = digits.build_digits_models(version="2.0.0")["float32"]
    forged = make_signed_artifact(
        private_key=Ed25519PrivateKey.generate(),
        model="digits",
        version="2.0.0",
        variant="float32",
        tflite=tflite,
        labels=digits.LABELS,
        golden_npz=digits.golden_set_npz(),
        golden_accuracy=digits.evaluate(tflite, x, y),
    )
    assert forged.blob == good.blob
    return publish_artifact(artifact_server, forged)


@pytest.mark.parametrize(
    ("make_entry", "reason"), [(tampered_blob, "hash_mismatch"), (stranger_signed, "signature_invalid")]
)
def test_a_bad_shadow_is_refused_and_live_keeps_serving_with_the_generation_applied(
    serving_v1, publisher, collector, artifact_server, artifacts, signing_key, digits, make_entry, reason
):
    agent, v1 = serving_v1
    device = agent.config.device_id
    bad = make_entry(artifact_server, artifacts, signing_key)
    reported = start_shadow(
        agent, publisher, collector, signing_key, 2, {"digits": with_shadow(v1, bad, 0.5)}
    )
    failed = collector.wait_for(device, "events", lambda e: e["type"] == "failed")
    assert (failed["generation"], failed["model"], failed["version"], failed["reason"]) == (
        2,
        "digits",
        "2.0.0",
        reason,
    )
    assert reported["models"]["digits"] == {"version": "1.0.0", "variant": "float32"}
    assert agent.state.applied_generation == 2
    assert agent.shadows.get("digits") is None
    assert not (
        agent.store.model_dir("digits", agent.state.models["digits"].active).parent / "2.0.0-float32"
    ).exists()
    assert {a["version"] for a in predict_all(agent, digits.golden_set()[0][:5])} == {"1.0.0"}

    # Positive control: the same desired state with an honest artifact starts the shadow.
    good = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    reported = start_shadow(
        agent, publisher, collector, signing_key, 3, {"digits": with_shadow(v1, good, 0.5)}
    )
    assert reported["models"]["digits"]["shadow"] == {"version": "2.0.0", "variant": "float32"}
    event = collector.wait_for(device, "events", lambda e: e["type"] == "shadow")
    assert (event["generation"], event["version"]) == (3, "2.0.0")
    assert "50 %" in event["message"]


# --- removing and promoting


def test_a_desired_state_without_the_shadow_unloads_it(
    serving_v1, publisher, collector, artifact_server, artifacts, signing_key, digits
):
    agent, v1 = serving_v1
    device = agent.config.device_id
    shadow = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    start_shadow(agent, publisher, collector, signing_key, 2, {"digits": with_shadow(v1, shadow, 1.0)})
    predict_all(agent, digits.golden_set()[0][:10])
    loaded = weakref.ref(agent.shadows.get("digits").model)
    shadow_dir = agent.store.model_dir("digits", agent.state.models["digits"].shadow)
    assert shadow_dir.is_dir()

    reported = start_shadow(agent, publisher, collector, signing_key, 3, {"digits": v1})
    assert reported["models"]["digits"] == {"version": "1.0.0", "variant": "float32"}
    assert agent.shadows.get("digits") is None
    # Nothing in the agent holds the interpreter any more: its memory goes back.
    wait_until(lambda: gc.collect() >= 0 and loaded() is None, timeout=10, message="the shadow to be freed")
    assert not shadow_dir.exists()
    assert agent.state.models["digits"].shadow is None
    # The window open at the removal may still report the samples taken before it; after
    # that, requests are no longer sampled and windows carry no shadow.
    start = len(collector.of(device, "telemetry"))
    wait_until(
        lambda: any(
            "shadow" not in m["models"].get("digits", {}) for m in collector.of(device, "telemetry")[start:]
        ),
        timeout=10,
        message="a window without the shadow",
    )
    seen = len(collector.of(device, "telemetry"))
    predict_all(agent, digits.golden_set()[0][:10])
    wait_until(lambda: len(collector.of(device, "telemetry")) >= seen + 2, timeout=10, message="two windows")
    assert all(
        "shadow" not in m["models"].get("digits", {}) for m in collector.of(device, "telemetry")[seen:]
    )


def test_promoting_the_shadow_version_to_live_reuses_its_stored_file(
    serving_v1, publisher, collector, artifact_server, artifacts, signing_key, digits
):
    agent, v1 = serving_v1
    device = agent.config.device_id
    v2 = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    start_shadow(agent, publisher, collector, signing_key, 2, {"digits": with_shadow(v1, v2, 0.1)})
    blob_requests = len(artifact_server.requests[urlparse(v2["blob_url"]).path])
    assert blob_requests >= 1

    reported = start_shadow(agent, publisher, collector, signing_key, 3, {"digits": v2})
    assert reported["models"]["digits"] == {"version": "2.0.0", "variant": "float32"}
    active = collector.wait_for(device, "events", lambda e: e["type"] == "active" and e["generation"] == 3)
    assert active["version"] == "2.0.0"
    assert (
        len(artifact_server.requests[urlparse(v2["blob_url"]).path]) == blob_requests
    )  # not downloaded again
    assert {a["version"] for a in predict_all(agent, digits.golden_set()[0][:5])} == {"2.0.0"}
    assert agent.shadows.get("digits") is None
    state = agent.state.models["digits"]
    assert (state.active.version, state.previous.version, state.shadow) == ("2.0.0", "1.0.0", None)


def test_a_restarted_agent_resumes_its_shadow(
    make_agent, serving_v1, publisher, collector, artifact_server, artifacts, signing_key, digits
):
    agent, v1 = serving_v1
    v2 = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    start_shadow(agent, publisher, collector, signing_key, 2, {"digits": with_shadow(v1, v2, 0.25)})
    agent.stop()
    # The retained desired state is generation 2 again: applied already, so only the
    # state file can bring the shadow back.
    again = make_agent(agent.config.device_id, state_dir=agent.config.state_dir)
    assert again.reported()["models"]["digits"]["shadow"] == {"version": "2.0.0", "variant": "float32"}
    assert again.shadows.get("digits").sample_rate == 0.25


# --- the runner itself


@pytest.fixture
def v1_model(digits, tmp_path) -> LoadedModel:
    path = tmp_path / "v1.tflite"
    path.write_bytes(digits.build_digits_models()["float32"])
    return LoadedModel.load("digits", "1.0.0", "float32", path)


def live_prediction(model: LoadedModel, sample: np.ndarray) -> Prediction:
    outputs = model.predict(as_inputs([[sample.tolist()]], model.input_details()))
    return Prediction(outputs, "1.0.0", "float32", 0.1, model.details[1])


def test_a_full_queue_skips_samples_instead_of_blocking_the_caller(v1_model, digits, tmp_path):
    window = TelemetryWindow()
    runner = ShadowRunner(window=window, queue_samples=1, prepare=as_inputs)
    shadow_path = tmp_path / "shadow.tflite"
    shadow_path.write_bytes(digits.build_digits_models()["float32"])
    shadow = LoadedModel.load("digits", "1.0.1", "float32", shadow_path)
    runner.install(Shadow(shadow, 1.0))
    sample = digits.golden_set()[0][0]
    prediction = live_prediction(v1_model, sample)
    with shadow.invoke_lock:  # the shadow is busy: the worker holds at most one sample
        for _ in range(10):
            runner.offer("digits", [[sample.tolist()]], prediction)
    assert runner.drain(timeout=10)
    runner.stop(timeout=10)
    entry = window.take()["digits"]["shadow"]
    assert entry["sampled"] == 10
    assert entry["sampled"] == entry["compared"] + entry["errors"] + entry["skipped"]
    assert entry["skipped"] >= 8  # one in the worker, one in the queue, the rest turned away
    assert entry["agreed"] == entry["compared"] >= 1


def test_the_sample_rate_is_the_fraction_of_requests_mirrored(v1_model, digits):
    window = TelemetryWindow()
    runner = ShadowRunner(window=window, queue_samples=10_000, prepare=as_inputs)
    runner._random = random.Random(8)  # reproducible draws
    runner.install(Shadow(v1_model, 0.1))
    sample = digits.golden_set()[0][0]
    prediction = live_prediction(v1_model, sample)
    for _ in range(2000):
        runner.offer("digits", [[sample.tolist()]], prediction)
    assert runner.drain(timeout=30)
    runner.stop(timeout=10)
    entry = window.take()["digits"]["shadow"]
    assert 140 <= entry["sampled"] <= 260  # 200 expected; 4.5 standard deviations either side
    assert entry["agreed"] == entry["compared"] == entry["sampled"]


def test_a_shadow_that_cannot_take_the_request_counts_an_error(v1_model, digits):
    window = TelemetryWindow()
    runner = ShadowRunner(window=window, queue_samples=8, prepare=as_inputs)
    runner.install(Shadow(v1_model, 1.0))
    prediction = live_prediction(v1_model, digits.golden_set()[0][0])
    runner.offer("digits", [[[1.0, 2.0]]], prediction)  # the wrong shape for the shadow's input
    assert runner.drain(timeout=10)
    runner.stop(timeout=10)
    entry = window.take()["digits"]["shadow"]
    assert (entry["sampled"], entry["errors"], entry["compared"], entry["mean_abs_diff"]) == (1, 1, 0, None)
    assert "latency_ms" not in entry


def test_compare_uses_the_top_class_of_the_last_axis_and_the_mean_absolute_difference():
    live = np.array([[0.1, 0.7, 0.2]], dtype=np.float32)
    assert compare(live, np.array([[0.2, 0.5, 0.3]], dtype=np.float32)) == (
        True,
        pytest.approx(0.1333, abs=1e-4),
    )
    agreed, diff = compare(live, np.array([[0.6, 0.3, 0.1]], dtype=np.float32))
    assert not agreed and diff == pytest.approx(1 / 3, abs=1e-6)
    quantized = np.array([[10, 70, 20]], dtype=np.int8)  # scale 0.01: the same values as live
    assert compare(live, quantized, shadow_detail={"quantization": (0.01, 0)}) == (
        True,
        pytest.approx(0.0, abs=1e-6),
    )


def test_a_window_reports_a_loaded_shadow_even_without_traffic():
    window = TelemetryWindow()
    models = window.take(loaded={"digits": LoadedShadow("1.0.0", "int8", "1.1.0", "int8")})
    assert models["digits"] == {
        "version": "1.0.0",
        "variant": "int8",
        "inferences": 0,
        "errors": 0,
        "feedback": {"labeled": 0, "correct": 0},
        "shadow": {
            "version": "1.1.0",
            "variant": "int8",
            "sampled": 0,
            "compared": 0,
            "agreed": 0,
            "errors": 0,
            "skipped": 0,
            "mean_abs_diff": None,
        },
    }
    telemetry_message(models=models, window_s=1.0, health={}, dropped=0)  # valid on the wire
    assert protocol.validate("telemetry", telemetry_message(models={}, window_s=1.0, health={}, dropped=0))
