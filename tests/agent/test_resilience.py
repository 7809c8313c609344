"""Flaky links, broker outages, power cuts: the agent resumes, catches up and never loses
its working model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests

from agent import runtime
from agent.store import Store
from fleet.mqtt.broker import free_port, mqtt_client, start_broker
from tests.agent.conftest import Collector, desired_envelope, publish_artifact, publish_desired
from tests.conftest import ROOT, wait_until


def test_a_download_cut_half_way_resumes_with_range(
    make_agent, publisher, collector, artifact_server, artifacts, signing_key
):
    agent = make_agent()
    device = agent.config.device_id
    artifact = artifacts[("2.0.0", "float32")]
    entry = publish_artifact(artifact_server, artifact)
    blob_path = urlparse(entry["blob_url"]).path
    artifact_server.cut_after(blob_path, len(artifact.blob) // 2)
    publish_desired(publisher, device, desired_envelope(signing_key, device, 1, {"digits": entry}))
    collector.wait_for(device, "reported", lambda m: m["generation"] == 1)

    requests_made = artifact_server.requests[blob_path]
    assert len(requests_made) == 2
    assert requests_made[1]["Range"] == f"bytes={len(artifact.blob) // 2}-"
    assert requests_made[1]["If-Range"] == f'"{artifact.manifest["blob"]["sha256"]}"'
    # About one blob in total: the first half once, the second half once.
    assert len(artifact.blob) <= artifact_server.bytes_sent[blob_path] <= len(artifact.blob) + 64


def test_after_a_broker_outage_it_reconnects_and_delivers_what_happened_meanwhile(
    make_agent, artifact_server, artifacts, signing_key, digits, tmp_path
):
    broker = start_broker(tmp_path / "own-broker")
    try:
        broker.provision()
        found = Collector()

        def on_message(client, userdata, message):
            with found.lock:
                found.messages.append((message.topic, json.loads(message.payload)))

        # A persistent session: the broker keeps what arrives while this client is away too.
        watcher = mqtt_client(
            broker.url,
            client_id=f"watcher-{uuid.uuid4().hex[:6]}",
            username="fleet-ingest",
            password=broker.ingest_password,
            clean_start=False,
            session_expiry_s=3600,
        )
        watcher.on_message = on_message
        subscribed = threading.Event()
        watcher.on_subscribe = lambda *args: subscribed.set()
        watcher.subscribe([("fleet/v1/devices/+/events", 1), ("fleet/v1/devices/+/telemetry", 1)])
        assert subscribed.wait(10)

        agent = make_agent(on_broker=broker)
        device = agent.config.device_id
        v1 = publish_artifact(artifact_server, artifacts[("1.0.0", "float32")])
        assert agent.apply(desired_envelope(signing_key, device, 1, {"digits": v1})).status == "applied"

        broker.stop()
        wait_until(
            lambda: not agent.link.connected.is_set(), timeout=10, message="the agent to see the outage"
        )
        sample = digits.golden_set()[0][0].tolist()
        for _ in range(25):
            response = requests.post(
                f"{agent.api.address}/v1/models/digits:predict", json={"inputs": [[sample]]}, timeout=5
            )
            assert response.status_code == 200
        v2 = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
        assert agent.apply(desired_envelope(signing_key, device, 2, {"digits": v2})).status == "applied"
        wait_until(lambda: len(agent.link.queue) >= 6, timeout=10, message="events and telemetry to queue up")

        broker.start()
        wait_until(agent.link.connected.is_set, timeout=20, message="the agent to reconnect")
        found.wait_for(device, "events", lambda e: e["type"] == "active" and e.get("generation") == 2)
        window = found.wait_for(
            device, "telemetry", lambda m: m["models"].get("digits", {}).get("inferences", 0) >= 25
        )
        assert window["dropped"] == 0
        watcher.disconnect()
        watcher.loop_stop()
    finally:
        broker.stop()


def test_a_full_offline_queue_drops_the_oldest_and_counts_them(make_agent):
    agent = make_agent(start=False, limits={"offline_queue_messages": 3})
    for n in range(5):
        agent.link.publish("events", {"id": str(n), "ts": "2026-11-28T00:00:00Z", "type": "test"})
    assert agent.link.dropped == 2
    assert [json.loads(item.payload)["id"] for item in agent.link.queue.take_all()] == ["2", "3", "4"]


# --- a real agent process, killed with SIGKILL


def write_config(
    path: Path, *, device_id: str, password: str, broker_url: str, state_dir: Path, key_hex: str, port: int
) -> Path:
    path.write_text(
        f'device_id = "{device_id}"\nstate_dir = "{state_dir}"\ntelemetry_interval_s = 1\n'
        f'[broker]\nurl = "{broker_url}"\nusername = "{device_id}"\npassword = "{password}"\n'
        f'[trust]\nroot_keys = ["{key_hex}"]\n'
        f'[local_api]\nbind = "127.0.0.1:{port}"\n'
        "[limits]\nbackoff_initial_s = 0.05\nbackoff_max_s = 0.5\nreconnect_initial_s = 0.1\n"
    )
    return path


def start_process(config: Path, crash_at: str = "") -> subprocess.Popen:
    env = {**os.environ, "FLEET_AGENT_CRASH_AT": crash_at}
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def health(port: int) -> dict | None:
    try:
        return requests.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).json()
    except requests.RequestException:
        return None


def assert_store_consistent(state_dir: Path) -> dict[str, str]:
    """The state file parses and every model it names is complete on disk and loads."""
    store = Store(state_dir)
    state = store.load_state()
    named = {}
    for name, entry in state.models.items():
        assert entry.active is not None
        for installed in filter(None, (entry.active, entry.previous)):
            assert store.is_complete(name, installed), installed
            runtime.load(store.model_path(name, installed))
        named[name] = entry.active.version
    return named


def apply_until_killed(config: Path, crash_at: str, publish, *, partial: Path | None = None) -> None:
    """Start an agent process and ``publish`` its desired state; it must die by SIGKILL: at
    ``crash_at`` (its own test hook), or, given ``partial``, from outside once the download
    into that file has started."""
    process = start_process(config, "" if partial else crash_at)
    try:
        publish()
        if partial is not None:
            wait_until(
                lambda: partial.exists() and partial.stat().st_size > 0,
                timeout=20,
                message="the download to start",
            )
            process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


def restart_and_finish(config: Path, port: int, collector, device: str, version: str) -> None:
    """Power back: the restarted agent serves at once, finishes the update from the retained
    desired state (generation 2, ``version``), and stops cleanly."""
    process = start_process(config)
    try:
        served = wait_until(
            lambda: (h := health(port)) and h["models"].get("digits"),
            timeout=30,
            message="the restarted agent to serve",
        )
        assert served["version"] in ("1.0.0", version)
        collector.wait_for(
            device,
            "reported",
            lambda m: m["generation"] == 2 and m["models"]["digits"]["version"] == version,
            timeout=30,
        )
        assert health(port)["models"]["digits"]["version"] == version
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "crash_at",
    ["during_download", "after_download", "after_install", "before_swap", "after_swap", "after_state"],
)
def test_a_power_cut_at_any_point_leaves_a_valid_model(
    crash_at,
    make_agent,
    broker,
    publisher,
    collector,
    artifact_server,
    artifacts,
    signing_key,
    root_key_hex,
    digits,
    tmp_path,
):
    # An agent that serves v1, then stops.
    first = make_agent()
    device, state_dir = first.config.device_id, first.config.state_dir
    v1 = publish_artifact(artifact_server, artifacts[("1.0.0", "float32")])
    publish_desired(publisher, device, desired_envelope(signing_key, device, 1, {"digits": v1}))
    collector.wait_for(device, "reported", lambda m: m["generation"] == 1)
    first.stop()

    v2_artifact = artifacts[("2.0.0", "float32")]
    v2 = publish_artifact(artifact_server, v2_artifact)
    blob_path = urlparse(v2["blob_url"]).path
    port = free_port()
    config = write_config(
        tmp_path / "agent.toml",
        device_id=device,
        password=first.broker_password,
        broker_url=broker.url,
        state_dir=state_dir,
        key_hex=root_key_hex,
        port=port,
    )
    partial = None
    if crash_at == "during_download":
        artifact_server.throttle(blob_path, 2048)
        partial = Store(state_dir).partial_path(v2_artifact.manifest["blob"]["sha256"])
    apply_until_killed(
        config,
        crash_at,
        lambda: publish_desired(publisher, device, desired_envelope(signing_key, device, 2, {"digits": v2})),
        partial=partial,
    )

    # Power back: the state on disk is consistent and the agent serves at once.
    assert assert_store_consistent(state_dir)["digits"] in ("1.0.0", "2.0.0")
    artifact_server.throttle(blob_path, None)
    restart_and_finish(config, port, collector, device, "2.0.0")
    if crash_at == "during_download":
        assert any("Range" in headers for headers in artifact_server.requests[blob_path][1:])
    assert assert_store_consistent(state_dir) == {"digits": "2.0.0"}
    offline = collector.wait_for(device, "status", lambda m: m["online"] is False)
    assert offline["agent_version"]


def test_a_config_with_three_mistakes_exits_2_naming_all_three(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(
        'device_id = "has/slash"\nstate_dir = "/tmp/x"\n'
        '[broker]\nurl = "mqtt://127.0.0.1:1883"\nkeepalive = 5\n'
        '[trust]\nroot_keys = ["not-hex"]\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "3 problem(s)" in result.stderr
    for key in ("device_id", "broker.keepalive", "trust.root_keys"):
        assert key in result.stderr


def test_it_serves_from_disk_before_it_touches_the_network(
    make_agent, artifact_server, artifacts, signing_key, tmp_path, digits
):
    first = make_agent()
    v1 = publish_artifact(artifact_server, artifacts[("1.0.0", "float32")])
    assert (
        first.apply(desired_envelope(signing_key, first.config.device_id, 1, {"digits": v1})).status
        == "applied"
    )
    first.stop()

    # The broker is unreachable (nothing listens on that port): serving must not wait for it.
    again = make_agent(
        first.config.device_id,
        start=False,
        state_dir=first.config.state_dir,
        broker={"url": f"mqtt://127.0.0.1:{free_port()}"},
    )
    again.start()
    try:
        sample = digits.golden_set()[0][0].tolist()
        response = requests.post(
            f"{again.api.address}/v1/models/digits:predict", json={"inputs": [[sample]]}, timeout=5
        )
        assert response.status_code == 200
        assert response.json()["version"] == "1.0.0"
        assert not again.link.connected.is_set()
    finally:
        again.stop()


def test_the_previous_version_stays_on_disk_for_an_instant_revert(
    make_agent, artifact_server, artifacts, signing_key
):
    agent = make_agent()
    device = agent.config.device_id
    v1 = publish_artifact(artifact_server, artifacts[("1.0.0", "float32")])
    v2 = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    assert agent.apply(desired_envelope(signing_key, device, 1, {"digits": v1})).status == "applied"
    assert agent.apply(desired_envelope(signing_key, device, 2, {"digits": v2})).status == "applied"
    v1_blob = urlparse(v1["blob_url"]).path
    sent_before = artifact_server.bytes_sent[v1_blob]
    assert agent.apply(desired_envelope(signing_key, device, 3, {"digits": v1})).status == "applied"
    assert artifact_server.bytes_sent[v1_blob] == sent_before  # no second download
    assert agent.models.live()["digits"].version == "1.0.0"
    state = agent.store.load_state().models["digits"]
    assert (state.active.version, state.previous.version) == ("1.0.0", "2.0.0")
