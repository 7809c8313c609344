"""Agent fixtures: a real Mosquitto with the project's config (dynamic security, per-device
credentials and ACLs), a real HTTP server holding artifacts signed with agent.protocol,
real LiteRT, and in-process agents."""

from __future__ import annotations

import json
import secrets
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol
from agent.config import parse_config
from agent.protocol.trust import build_bundle
from agent.trust import TrustStore
from agent.trustctl import make_keyring, make_root
from fleet.mqtt.broker import mqtt_client
from tests.agent.artifact_server import ArtifactServer, SignedArtifact, make_signed_artifact
from tests.conftest import wait_until


@pytest.fixture(scope="session")
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def public_key_hex(signing_key) -> str:
    return protocol.public_key_bytes(signing_key.public_key()).hex()


@pytest.fixture(scope="session")
def root_key() -> Ed25519PrivateKey:
    """The fleet's offline root key in these tests (docs/security.md, "Keys and rotation")."""
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def root_key_hex(root_key) -> str:
    return protocol.public_key_bytes(root_key.public_key()).hex()


@pytest.fixture(scope="session")
def trust_bundle(root_key, signing_key) -> bytes:
    """Root version 1 and keyring version 1 naming the session's signing key."""
    return trust_bundle_bytes(
        roots=[make_root(keys=[root_key])],
        keyring=make_keyring(root_keys=[root_key], version=1, signing_keys=[signing_key.public_key()]),
    )


def trust_bundle_bytes(*, roots: list[bytes], keyring: bytes | None) -> bytes:
    return json.dumps(build_bundle(roots=roots, keyring=keyring)).encode()


def publish_trust(publisher, bundle: bytes) -> None:
    publisher.publish("fleet/v1/trust", bundle, qos=1, retain=True).wait_for_publish(10)


def seed_trust(state_dir: Path, *, root_key_hex: str, bundle: bytes) -> None:
    """Give a device the keyring it would have fetched on its first connection."""
    state_dir.mkdir(parents=True, exist_ok=True)
    TrustStore(root_keys=(root_key_hex,), root_threshold=1, state_dir=state_dir).update(bundle)


@pytest.fixture
def artifact_server():
    with ArtifactServer() as server:
        yield server


@pytest.fixture(scope="session")
def artifacts(signing_key, digits) -> dict[tuple[str, str], SignedArtifact]:
    """Signed artifacts of the digits sample: (version, variant) -> SignedArtifact."""
    golden = digits.golden_set_npz()
    x, y = digits.golden_set()
    built = {}
    for version, quality in (("1.0.0", "good"), ("2.0.0", "good2"), ("3.0.0", "worse")):
        models = (
            digits.build_digits_models(version="2.0.0")
            if quality == "good2"
            else digits.build_digits_models(quality=quality)
        )
        for variant, tflite in models.items():
            built[(version, variant)] = make_signed_artifact(
                private_key=signing_key,
                model="digits",
                version=version,
                variant=variant,
                tflite=tflite,
                labels=digits.LABELS,
                golden_npz=golden,
                golden_accuracy=digits.evaluate(tflite, x, y),  # what the registry measures
            )
    return built


def publish_artifact(server: ArtifactServer, artifact: SignedArtifact) -> dict[str, str]:
    """Serve an artifact; return the desired state's model entry for it."""
    base = f"/artifacts/{artifact.manifest['version']}-{artifact.manifest['variant']}-{uuid.uuid4().hex[:6]}"
    server.add(f"{base}/manifest", artifact.manifest_envelope)
    server.add(f"{base}/blob", artifact.blob)
    if artifact.golden is not None:
        server.add(f"{base}/golden", artifact.golden)
    return {
        "version": artifact.manifest["version"],
        "variant": artifact.manifest["variant"],
        "manifest_url": server.url(f"{base}/manifest"),
        "blob_url": server.url(f"{base}/blob"),
        "manifest_sha256": artifact.manifest_sha256,
    }


def desired_envelope(
    private_key,
    device_id: str,
    generation: int,
    models: dict[str, dict],
    *,
    expires_in_s: float = 3600,
    payload_type: str = protocol.DESIRED_PAYLOAD_TYPE,
) -> bytes:
    now = datetime.now(UTC)
    payload = {
        "schema": 1,
        "device_id": device_id,
        "generation": generation,
        "issued_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "expires_at": (now + timedelta(seconds=expires_in_s)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "models": models,
        "rollout": None,
    }
    envelope = protocol.sign(
        protocol.canonical_json(payload), payload_type=payload_type, private_key=private_key
    )
    return protocol.envelope_bytes(envelope)


@dataclass
class Collector:
    """Everything devices publish, as the ingest service account sees it."""

    messages: list[tuple[str, dict]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, device_id: str, kind: str) -> list[dict]:
        with self.lock:
            return [m for topic, m in self.messages if topic == f"fleet/v1/devices/{device_id}/{kind}"]

    def wait_for(self, device_id: str, kind: str, predicate=lambda m: True, timeout: float = 20) -> dict:
        return wait_until(
            lambda: next((m for m in self.of(device_id, kind) if predicate(m)), None),
            timeout=timeout,
            message=f"{kind} from {device_id}",
        )


@pytest.fixture
def collector(broker):
    found = Collector()

    def on_message(client, userdata, message):
        try:
            body = json.loads(message.payload)
        except ValueError:
            body = {"raw": message.payload}
        with found.lock:
            found.messages.append((message.topic, body))

    client = mqtt_client(
        broker.url,
        client_id=f"collector-{uuid.uuid4().hex[:6]}",
        username="fleet-ingest",
        password=broker.ingest_password,
    )
    client.on_message = on_message
    subscribed = threading.Event()
    client.on_subscribe = lambda *args: subscribed.set()
    client.subscribe(
        [(f"fleet/v1/devices/+/{kind}", 1) for kind in ("status", "reported", "events", "telemetry")]
    )
    assert subscribed.wait(10)
    yield found
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def publisher(broker):
    client = mqtt_client(
        broker.url,
        client_id=f"publisher-{uuid.uuid4().hex[:6]}",
        username="fleet-publisher",
        password=broker.publisher_password,
    )
    yield client
    client.disconnect()
    client.loop_stop()


def agent_config_dict(
    *, device_id: str, password: str, broker_url: str, state_dir: Path, root_key_hex: str, **overrides: Any
) -> dict[str, Any]:
    config = {
        "device_id": device_id,
        "state_dir": str(state_dir),
        "telemetry_interval_s": 0.5,
        "broker": {"url": broker_url, "username": device_id, "password": password},
        "trust": {"root_keys": [root_key_hex]},
        "local_api": {"bind": "127.0.0.1:0"},
        "limits": {
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5,
            "reconnect_initial_s": 0.1,
            "reconnect_max_s": 1.0,
            "download_attempts": 3,
            "download_timeout_s": 10,
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    return config


@pytest.fixture
def make_agent(broker, root_key_hex, trust_bundle, tmp_path):
    """Factory: a started in-process Agent with its own device credentials and state dir.
    It pins the session's root key and already holds the session's keyring; the same bundle
    is retained on the broker (a rotation test may have left another one there)."""
    from agent.core import Agent

    started = []
    retained = set()

    def make(
        device_id: str | None = None,
        *,
        start: bool = True,
        state_dir: Path | None = None,
        on_broker=None,
        **overrides,
    ):
        device_id = device_id or f"dev-{uuid.uuid4().hex[:8]}"
        password = secrets.token_urlsafe(12)
        target = on_broker or broker
        target.admin().ensure_device(device_id, password)
        if target is broker and start and not retained:
            client = mqtt_client(
                broker.url,
                client_id=f"trust-{uuid.uuid4().hex[:6]}",
                username="fleet-publisher",
                password=broker.publisher_password,
            )
            publish_trust(client, trust_bundle)
            client.disconnect()
            client.loop_stop()
            retained.add(broker.url)
        state_dir = state_dir or tmp_path / device_id
        seed_trust(state_dir, root_key_hex=root_key_hex, bundle=trust_bundle)
        config = parse_config(
            agent_config_dict(
                device_id=device_id,
                password=password,
                broker_url=target.url,
                state_dir=state_dir,
                root_key_hex=root_key_hex,
                **overrides,
            )
        )
        agent = Agent(config)
        agent.broker_password = password
        if start:
            agent.start()
            started.append(agent)
            wait_until(agent.link.connected.is_set, timeout=15, message=f"{device_id} to connect")
        return agent

    yield make
    for agent in started:
        agent.stop()


def publish_desired(publisher, device_id: str, envelope: bytes) -> None:
    publisher.publish(f"fleet/v1/devices/{device_id}/desired", envelope, qos=1, retain=True).wait_for_publish(
        10
    )
