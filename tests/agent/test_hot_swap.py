"""Hot swap under load: 20 swaps between two versions while a client predicts without
pause. Zero errors, every answer names one of the two versions, and every answer's
outputs are exactly what the version it names computes (no answer mixes them)."""

import threading

import numpy as np
import requests

from agent import runtime
from tests.agent.conftest import desired_envelope, publish_artifact, publish_desired
from tests.conftest import wait_until

SWAPS = 20


def expected_outputs(tflite: bytes, sample: np.ndarray, tmp_path, name: str) -> np.ndarray:
    path = tmp_path / f"{name}.tflite"
    path.write_bytes(tflite)
    return runtime.invoke(runtime.load(path), [sample[np.newaxis, :]])[0]


def test_twenty_swaps_under_load_drop_and_mix_nothing(
    make_agent, publisher, collector, artifact_server, artifacts, signing_key, digits, tmp_path
):
    agent = make_agent()
    device = agent.config.device_id
    entries = {
        "1.0.0": publish_artifact(artifact_server, artifacts[("1.0.0", "float32")]),
        "2.0.0": publish_artifact(artifact_server, artifacts[("2.0.0", "float32")]),
    }
    sample = digits.golden_set()[0][3]
    expected = {
        "1.0.0": expected_outputs(digits.build_digits_models()["float32"], sample, tmp_path, "v1"),
        "2.0.0": expected_outputs(
            digits.build_digits_models(version="2.0.0")["float32"], sample, tmp_path, "v2"
        ),
    }
    assert not np.allclose(expected["1.0.0"], expected["2.0.0"])  # otherwise mixing could not be seen

    publish_desired(publisher, device, desired_envelope(signing_key, device, 1, {"digits": entries["1.0.0"]}))
    collector.wait_for(device, "reported", lambda m: m["generation"] == 1)

    answers, errors, done = [], [], threading.Event()

    def client():
        session = requests.Session()
        while not done.is_set():
            response = session.post(
                f"{agent.api.address}/v1/models/digits:predict",
                json={"inputs": [[sample.tolist()]]},
                timeout=10,
            )
            (answers if response.status_code == 200 else errors).append(response.json())

    thread = threading.Thread(target=client)
    thread.start()
    try:
        for generation in range(2, SWAPS + 2):
            version = "2.0.0" if generation % 2 == 0 else "1.0.0"
            publish_desired(
                publisher,
                device,
                desired_envelope(signing_key, device, generation, {"digits": entries[version]}),
            )
            collector.wait_for(device, "reported", lambda m, g=generation: m["generation"] == g)
            seen = len(answers)
            # Let the client run on the new version before the next swap.
            wait_until(lambda s=seen: len(answers) >= s + 5, timeout=10, message="answers after a swap")
    finally:
        done.set()
        thread.join(timeout=10)

    assert errors == []
    versions = {a["version"] for a in answers}
    assert versions == {"1.0.0", "2.0.0"}
    for a in answers:
        np.testing.assert_allclose(np.asarray(a["outputs"][0]), expected[a["version"]], rtol=1e-6, atol=1e-7)
    swaps = [e for e in collector.of(device, "events") if e["type"] == "active"]
    assert len(swaps) == SWAPS + 1
