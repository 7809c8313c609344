"""The local API apps call: every bad request is a 4xx JSON error and never a crash."""

import json
import socket

import pytest
import requests

from agent.localapi import unix_request
from tests.agent.conftest import desired_envelope, publish_artifact


@pytest.fixture
def agent(make_agent, artifact_server, artifacts, signing_key):
    agent = make_agent()
    v1 = publish_artifact(artifact_server, artifacts[("1.0.0", "int8")])
    assert (
        agent.apply(desired_envelope(signing_key, agent.config.device_id, 1, {"digits": v1})).status
        == "applied"
    )
    return agent


@pytest.fixture
def sample(digits):
    x, y = digits.golden_set()
    return x[5].tolist(), int(y[5])


def post(agent, path, body=None, data=None, headers=None):
    return requests.post(f"{agent.api.address}{path}", json=body, data=data, headers=headers, timeout=5)


def assert_error(response, status, code):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == code


def test_predict_answers_outputs_label_version_and_an_id(agent, sample):
    features, label = sample
    body = post(agent, "/v1/models/digits:predict", {"inputs": [[features]]}).json()
    assert (body["model"], body["version"], body["variant"]) == ("digits", "1.0.0", "int8")
    assert len(body["outputs"][0][0]) == 10
    assert body["label"] == str(label)  # the labels come from the signed manifest
    assert len(body["prediction_id"]) == 32


def test_a_single_sample_without_the_batch_axis_is_accepted(agent, sample):
    assert post(agent, "/v1/models/digits:predict", {"inputs": [sample[0]]}).status_code == 200


def test_feedback_counts_right_and_wrong(agent, sample):
    features, label = sample
    prediction = post(agent, "/v1/models/digits:predict", {"inputs": [[features]]}).json()
    right = post(agent, "/v1/feedback", {"prediction_id": prediction["prediction_id"], "label": label}).json()
    wrong = post(
        agent, "/v1/feedback", {"prediction_id": prediction["prediction_id"], "label": (label + 1) % 10}
    )
    by_name = post(agent, "/v1/feedback", {"prediction_id": prediction["prediction_id"], "label": str(label)})
    assert right["correct"] is True
    assert wrong.json()["correct"] is False
    assert by_name.json()["correct"] is True
    window = agent.window.take()["digits"]
    assert window["feedback"] == {"labeled": 3, "correct": 2}


@pytest.mark.parametrize(
    ("inputs", "code"),
    [
        ([[[0.0] * 63]], "bad_input"),  # wrong shape
        ([[["a"] * 64]], "bad_input"),  # wrong dtype
        ([[[0.0] * 64], [[0.0] * 64]], "bad_input"),  # too many tensors
        ([[[0.0] * 64, [0.0] * 10]], "bad_input"),  # ragged
    ],
)
def test_wrong_inputs_are_422(agent, inputs, code):
    assert_error(post(agent, "/v1/models/digits:predict", {"inputs": inputs}), 422, code)


def test_bad_requests_are_4xx_json(agent):
    assert_error(post(agent, "/v1/models/nope:predict", {"inputs": [[[0.0] * 64]]}), 404, "unknown_model")
    assert_error(
        post(
            agent,
            "/v1/models/digits:predict",
            data=b"{not json",
            headers={"Content-Type": "application/json"},
        ),
        400,
        "malformed_json",
    )
    assert_error(post(agent, "/v1/models/digits:predict", {"no": "inputs"}), 400, "bad_request")
    assert_error(
        post(agent, "/v1/feedback", {"prediction_id": "nope", "label": 1}), 404, "unknown_prediction"
    )
    assert_error(
        requests.get(f"{agent.api.address}/v1/models/digits:predict", timeout=5), 405, "method_not_allowed"
    )
    assert_error(requests.get(f"{agent.api.address}/v2/else", timeout=5), 404, "not_found")


def test_an_oversized_body_is_refused_before_it_is_read(agent):
    limit = agent.config.local_api.max_body_bytes
    assert_error(post(agent, "/v1/models/digits:predict", data=b"x" * (limit + 1)), 413, "too_large")


def test_a_bad_feedback_label_is_422(agent, sample):
    prediction = post(agent, "/v1/models/digits:predict", {"inputs": [[sample[0]]]}).json()
    assert_error(
        post(agent, "/v1/feedback", {"prediction_id": prediction["prediction_id"], "label": "cat"}),
        422,
        "bad_label",
    )


def test_the_server_survives_a_client_that_hangs_up_mid_request(agent, sample):
    host, port = agent.api.address.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b'POST /v1/models/digits:predict HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{"inp')
    assert post(agent, "/v1/models/digits:predict", {"inputs": [[sample[0]]]}).status_code == 200


def test_health_names_the_runtime_and_what_is_served(agent):
    health = requests.get(f"{agent.api.address}/v1/health", timeout=5).json()
    assert health["runtime"]["name"] in ("ai_edge_litert", "tflite_runtime")
    assert health["models"] == {"digits": {"version": "1.0.0", "variant": "int8"}}
    assert health["mqtt_connected"] is True


def test_it_can_listen_on_a_unix_socket(
    make_agent, tmp_path, artifact_server, artifacts, signing_key, sample
):
    socket_path = tmp_path / "agent.sock"
    agent = make_agent(local_api={"bind": f"unix:{socket_path}"})
    v1 = publish_artifact(artifact_server, artifacts[("1.0.0", "float32")])
    agent.apply(desired_envelope(signing_key, agent.config.device_id, 1, {"digits": v1}))
    status, body = unix_request(
        str(socket_path), "POST", "/v1/models/digits:predict", json.dumps({"inputs": [[sample[0]]]}).encode()
    )
    assert status == 200 and json.loads(body)["variant"] == "float32"


def test_a_stopping_agent_answers_503_to_new_requests(agent, sample):
    session = requests.Session()
    assert session.post(f"{agent.api.address}/v1/models/digits:predict", json={"inputs": [[sample[0]]]}).ok
    agent._stop.set()  # what stop() does first
    response = session.post(f"{agent.api.address}/v1/models/digits:predict", json={"inputs": [[sample[0]]]})
    assert_error(response, 503, "stopping")


def test_many_agents_run_in_one_process(make_agent, artifact_server, artifacts, signing_key, sample):
    agents = [make_agent() for _ in range(4)]
    for n, agent in enumerate(agents):
        variant = "int8" if n % 2 else "float32"
        entry = publish_artifact(artifact_server, artifacts[("1.0.0", variant)])
        assert agent.apply(
            desired_envelope(signing_key, agent.config.device_id, 1, {"digits": entry})
        ).status == ("applied")
    answers = [post(a, "/v1/models/digits:predict", {"inputs": [[sample[0]]]}).json() for a in agents]
    assert [a["variant"] for a in answers] == ["float32", "int8", "float32", "int8"]
    assert len({a.config.state_dir for a in agents}) == 4
    assert len({a.api.address for a in agents}) == 4


def test_a_request_naming_another_host_is_refused(agent):
    """DNS rebinding: a web page on evil.example whose name resolves to 127.0.0.1 makes the
    device's browser call the agent with Host: evil.example."""
    port = agent.api.address.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{int(port) + 1}"):
        response = requests.get(f"{agent.api.address}/v1/health", headers={"Host": host}, timeout=5)
        assert_error(response, 403, "bad_host")
    # Positive controls: the bound address and the loopback names are answered.
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        response = requests.get(f"{agent.api.address}/v1/health", headers={"Host": host}, timeout=5)
        assert response.status_code == 200, (host, response.text)


def test_binding_beyond_loopback_needs_an_explicit_setting(tmp_path):
    from agent.config import ConfigError, parse_config

    base = {
        "device_id": "cam-1",
        "state_dir": str(tmp_path),
        "broker": {"url": "mqtt://127.0.0.1:1883", "username": "cam-1", "password": "x"},
        "control_plane": {"url": "http://127.0.0.1:8000", "token": "t"},
        "trust": {"root_keys": ["00" * 32]},
    }
    with pytest.raises(ConfigError) as excinfo:
        parse_config({**base, "local_api": {"bind": "0.0.0.0:8787"}})
    assert "local_api.bind" in str(excinfo.value) and "allow_remote" in str(excinfo.value)
    allowed = parse_config({**base, "local_api": {"bind": "0.0.0.0:8787", "allow_remote": True}})
    assert allowed.local_api.allow_remote
    assert parse_config({**base, "local_api": {"bind": "[::1]:8787"}}).local_api.host == "::1"
