"""Every refusal reason publishes an event with its code and keeps the old model serving."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol
from tests.agent.artifact_server import make_signed_artifact
from tests.agent.conftest import desired_envelope, publish_artifact, publish_desired


def answer(agent, digits) -> dict:
    sample = digits.golden_set()[0][0]
    response = requests.post(
        f"{agent.api.address}/v1/models/digits:predict", json={"inputs": [[sample.tolist()]]}, timeout=5
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def serving(make_agent, publisher, collector, artifact_server, artifacts, signing_key):
    """Returns a factory: an agent that already serves digits 1.0.0 float32 (generation 1)."""

    def make(**overrides):
        agent = make_agent(**overrides)
        device = agent.config.device_id
        v1 = publish_artifact(artifact_server, artifacts[("1.0.0", "float32")])
        publish_desired(publisher, device, desired_envelope(signing_key, device, 1, {"digits": v1}))
        collector.wait_for(device, "reported", lambda m: m["generation"] == 1)
        return agent

    return make


def refuse(agent, publisher, collector, envelope: bytes, reason: str) -> dict:
    device = agent.config.device_id
    publish_desired(publisher, device, envelope)
    return collector.wait_for(device, "events", lambda e: e["type"] == "failed" and e.get("reason") == reason)


def assert_still_serving_v1(agent, digits, collector):
    result = answer(agent, digits)
    assert (result["version"], result["variant"]) == ("1.0.0", "float32")
    assert agent.state.applied_generation <= 3
    assert agent.reported()["models"]["digits"] == {"version": "1.0.0", "variant": "float32"}


def test_signature_invalid(serving, publisher, collector, artifact_server, artifacts, digits):
    agent = serving()
    stranger = Ed25519PrivateKey.generate()
    v2 = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    refuse(
        agent,
        publisher,
        collector,
        desired_envelope(stranger, agent.config.device_id, 2, {"digits": v2}),
        "signature_invalid",
    )
    assert_still_serving_v1(agent, digits, collector)


def test_payload_type(serving, publisher, collector, artifact_server, artifacts, signing_key, digits):
    agent = serving()
    v2 = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    envelope = desired_envelope(
        signing_key, agent.config.device_id, 2, {"digits": v2}, payload_type=protocol.MANIFEST_PAYLOAD_TYPE
    )
    refuse(agent, publisher, collector, envelope, "payload_type")
    assert_still_serving_v1(agent, digits, collector)


def test_replay(serving, publisher, collector, artifact_server, artifacts, signing_key, digits):
    agent = serving()
    device = agent.config.device_id
    v1 = publish_artifact(artifact_server, artifacts[("1.0.0", "float32")])
    v2 = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    publish_desired(publisher, device, desired_envelope(signing_key, device, 3, {"digits": v1}))
    collector.wait_for(device, "reported", lambda m: m["generation"] == 3)
    event = refuse(
        agent, publisher, collector, desired_envelope(signing_key, device, 2, {"digits": v2}), "replay"
    )
    assert event["generation"] == 2
    assert_still_serving_v1(agent, digits, collector)


def test_expired(serving, publisher, collector, artifact_server, artifacts, signing_key, digits):
    agent = serving()
    v2 = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    envelope = desired_envelope(signing_key, agent.config.device_id, 2, {"digits": v2}, expires_in_s=-60)
    refuse(agent, publisher, collector, envelope, "expired")
    assert_still_serving_v1(agent, digits, collector)


def test_wrong_device(serving, publisher, collector, artifact_server, artifacts, signing_key, digits):
    agent = serving()
    v2 = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    refuse(
        agent,
        publisher,
        collector,
        desired_envelope(signing_key, "someone-else", 2, {"digits": v2}),
        "wrong_device",
    )
    assert_still_serving_v1(agent, digits, collector)


def test_manifest_mismatch(serving, publisher, collector, artifact_server, artifacts, signing_key, digits):
    agent = serving()
    v2 = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    v2["manifest_sha256"] = artifacts[("1.0.0", "float32")].manifest_sha256  # pins another manifest
    refuse(
        agent,
        publisher,
        collector,
        desired_envelope(signing_key, agent.config.device_id, 2, {"digits": v2}),
        "manifest_mismatch",
    )
    assert_still_serving_v1(agent, digits, collector)


def test_too_large(serving, publisher, collector, artifact_server, artifacts, signing_key, digits):
    agent = serving(limits={"max_artifact_bytes": 12_000})  # v1 float32 is 10,752 B, v2 15,552 B
    v2 = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    refuse(
        agent,
        publisher,
        collector,
        desired_envelope(signing_key, agent.config.device_id, 2, {"digits": v2}),
        "too_large",
    )
    assert artifact_server.bytes_sent.get(urlparse(v2["blob_url"]).path, 0) == 0
    assert_still_serving_v1(agent, digits, collector)


def test_hash_mismatch(serving, publisher, collector, artifact_server, artifacts, signing_key, digits):
    agent = serving()
    v2 = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    blob = bytearray(artifacts[("2.0.0", "float32")].blob)
    blob[len(blob) // 2] ^= 0xFF  # same size, one byte flipped on the way
    artifact_server.add(urlparse(v2["blob_url"]).path, bytes(blob))
    refuse(
        agent,
        publisher,
        collector,
        desired_envelope(signing_key, agent.config.device_id, 2, {"digits": v2}),
        "hash_mismatch",
    )
    assert_still_serving_v1(agent, digits, collector)


def test_incompatible(serving, publisher, collector, artifact_server, artifacts, signing_key, digits):
    agent = serving(device={"int8": False})
    int8 = publish_artifact(artifact_server, artifacts[("1.0.0", "int8")])
    refuse(
        agent,
        publisher,
        collector,
        desired_envelope(signing_key, agent.config.device_id, 2, {"digits": int8}),
        "incompatible",
    )
    assert_still_serving_v1(agent, digits, collector)


def test_load_failed(serving, publisher, collector, artifact_server, signing_key, digits):
    agent = serving()
    broken = make_signed_artifact(
        private_key=signing_key,
        model="digits",
        version="9.9.9",
        variant="float32",
        tflite=digits.build_unloadable_model(),
        labels=digits.LABELS,
    )
    entry = publish_artifact(artifact_server, broken)
    refuse(
        agent,
        publisher,
        collector,
        desired_envelope(signing_key, agent.config.device_id, 2, {"digits": entry}),
        "load_failed",
    )
    assert_still_serving_v1(agent, digits, collector)


def test_golden_failed(serving, publisher, collector, artifact_server, signing_key, digits):
    """The server measured 97.5 % for this artifact; on this device the bytes score 71 %."""
    agent = serving()
    worse = make_signed_artifact(
        private_key=signing_key,
        model="digits",
        version="3.0.0",
        variant="float32",
        tflite=digits.build_digits_models(quality="worse")["float32"],
        labels=digits.LABELS,
        golden_npz=digits.golden_set_npz(),
        golden_accuracy=0.975,
    )
    entry = publish_artifact(artifact_server, worse)
    event = refuse(
        agent,
        publisher,
        collector,
        desired_envelope(signing_key, agent.config.device_id, 2, {"digits": entry}),
        "golden_failed",
    )
    assert "golden accuracy" in event["message"]
    assert_still_serving_v1(agent, digits, collector)


def test_download_failed(serving, publisher, collector, artifact_server, artifacts, signing_key, digits):
    agent = serving()
    v2 = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    v2["blob_url"] = artifact_server.url("/no/such/blob")
    refuse(
        agent,
        publisher,
        collector,
        desired_envelope(signing_key, agent.config.device_id, 2, {"digits": v2}),
        "download_failed",
    )
    assert_still_serving_v1(agent, digits, collector)


def test_a_refused_generation_is_not_retried_on_redelivery(
    serving, publisher, collector, artifact_server, artifacts, signing_key, digits
):
    agent = serving()
    device = agent.config.device_id
    v2 = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    v2["blob_url"] = artifact_server.url("/no/such/blob")
    envelope = desired_envelope(signing_key, device, 2, {"digits": v2})
    refuse(agent, publisher, collector, envelope, "download_failed")
    assert agent.apply(envelope).status == "unchanged"
    assert len([e for e in collector.of(device, "events") if e.get("reason") == "download_failed"]) == 1


def test_a_transient_download_failure_is_retrying_not_failed_and_the_generation_applies_later(
    serving, publisher, collector, artifact_server, artifacts, signing_key
):
    """A control plane that is away (restarting, 503) is not a verdict on the model: the
    rollout's install-failure gate counts ``failed`` events, so this one is ``retrying``."""
    agent = serving()
    device = agent.config.device_id
    v2 = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    artifact_server.fail(urlparse(v2["manifest_url"]).path, 503, times=3)  # every attempt of one try
    publish_desired(publisher, device, desired_envelope(signing_key, device, 2, {"digits": v2}))
    retrying = collector.wait_for(device, "events", lambda e: e["type"] == "retrying")
    assert (retrying["reason"], retrying["generation"]) == ("download_failed", 2)
    collector.wait_for(device, "reported", lambda m: m["generation"] == 2)
    assert not [e for e in collector.of(device, "events") if e["type"] == "failed"]
