"""TLS by default (docs/security.md, "TLS"): agents reach the broker over mqtts:// and the
control plane over https://, and trust only the CA they pin and the host name they dialled.

Everything runs for real: Mosquitto with the project's config and its TLS listener, the
certificates of a CA made for the run (fleet.core.tls), in-process agents, and an HTTPS
artifact server. Every refusal has its positive control beside it: the same client with the
right CA, or the same server with the right name, gets through.
"""

from __future__ import annotations

import logging
import secrets
import socket
import ssl
import struct
import uuid

import pytest
import urllib3

from agent.download import Downloader, TransferError
from fleet.core.tls import LocalCA, local_ca_create
from fleet.mqtt.broker import mqtt_client, port_open, start_broker
from tests.agent.artifact_server import ArtifactServer
from tests.agent.conftest import desired_envelope, publish_artifact, publish_desired
from tests.conftest import wait_until


def tls_context(files: LocalCA) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert_file, files.key_file)
    return context


@pytest.fixture
def https_server(broker):
    """The artifact server behind TLS, with a certificate from the run's CA for the
    loopback names (the broker's certificate: one CA, one server certificate per run)."""
    with ArtifactServer(tls=tls_context(broker.tls)) as server:
        yield server


@pytest.fixture
def other_ca(tmp_path) -> LocalCA:
    """A CA the devices do not pin, with a valid certificate for the loopback names."""
    return local_ca_create(tmp_path / "other-ca")


def over_tls(broker, *, control_plane_ca=None) -> dict:
    """make_agent overrides: the broker's TLS listener with the run's CA pinned."""
    overrides = {"broker": {"url": broker.tls_url, "ca_file": str(broker.ca_file)}}
    if control_plane_ca is not None:
        overrides["control_plane"] = {"ca_file": str(control_plane_ca), "token": "md_device-token"}
    return overrides


def refused_connecting(agent, caplog, text: str) -> str:
    """Start the agent and wait until it has logged a failed connection saying ``text``."""
    caplog.set_level(logging.WARNING, logger="agent.mqtt")
    agent.start()
    try:
        message = wait_until(
            lambda: next(
                (
                    r.getMessage()
                    for r in caplog.records
                    if text in r.getMessage() and agent.config.broker.url in r.getMessage()
                ),
                None,
            ),
            timeout=15,
            message=f"the agent to fail connecting with {text!r}",
        )
    finally:
        agent.stop()
    assert agent.link.connects == 0  # not once, before or after the failure we waited for
    return message


def test_an_agent_over_mqtts_installs_a_model_it_downloads_over_https(
    make_agent, broker, https_server, publisher, collector, artifacts, signing_key
):
    agent = make_agent(**over_tls(broker, control_plane_ca=broker.ca_file))
    device = agent.config.device_id
    link = agent.link.client.socket()
    assert isinstance(link, ssl.SSLSocket) and link.version() in ("TLSv1.2", "TLSv1.3")
    assert link.getpeercert()["subjectAltName"][:1] == (("DNS", "localhost"),)
    v1 = publish_artifact(https_server, artifacts[("1.0.0", "float32")])
    assert v1["blob_url"].startswith("https://")
    publish_desired(publisher, device, desired_envelope(signing_key, device, 1, {"digits": v1}))
    collector.wait_for(device, "reported", lambda m: m["generation"] == 1)
    assert agent.models.live()["digits"].version == "1.0.0"
    blob_path = v1["blob_url"].split(str(https_server.port), 1)[1]
    assert https_server.requests[blob_path][0]["Authorization"] == "Bearer md_device-token"


def test_a_client_that_does_not_trust_the_run_ca_is_refused(broker, other_ca, make_agent, caplog):
    device_id, password = f"tls-{uuid.uuid4().hex[:6]}", secrets.token_urlsafe(12)
    broker.admin().ensure_device(device_id, password)
    login = {"client_id": device_id, "username": device_id, "password": password}
    # Positive control: the same login with the run's CA pinned gets in.
    client = mqtt_client(broker.tls_url, ca_file=broker.ca_file, **login)
    client.disconnect()
    client.loop_stop()
    for ca_file in (other_ca.ca_file, None):  # another CA; the system's CAs
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            mqtt_client(broker.tls_url, ca_file=ca_file, **login)
    agent = make_agent(start=False, broker={"url": broker.tls_url, "ca_file": str(other_ca.ca_file)})
    refused_connecting(agent, caplog, "certificate verify failed")


def mqtt_connect_packet(client_id: str, username: str, password: str) -> bytes:
    """An MQTT 3.1.1 CONNECT with a username and password, as plain bytes on the wire."""

    def string(value: str) -> bytes:
        return struct.pack("!H", len(value.encode())) + value.encode()

    body = string("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 30)
    body += string(client_id) + string(username) + string(password)
    assert len(body) < 128  # one byte of remaining length
    return bytes([0x10, len(body)]) + body


def first_answer(port: int, packet: bytes) -> bytes:
    """What the broker answers on ``port`` to ``packet`` sent in the clear: b"" when it
    closes the connection instead."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(packet)
        try:
            return sock.recv(4)
        except ConnectionResetError:
            return b""


def test_plain_mqtt_to_the_tls_port_is_not_answered(broker):
    device_id, password = f"tls-{uuid.uuid4().hex[:6]}", secrets.token_urlsafe(12)
    broker.admin().ensure_device(device_id, password)
    packet = mqtt_connect_packet(device_id, device_id, password)
    # Positive control: the loopback listener answers the same bytes with CONNACK, accepted.
    assert first_answer(broker.port, packet) == bytes([0x20, 2, 0, 0])
    assert first_answer(broker.tls_port, packet) == b""


def test_the_plain_listener_is_reachable_on_loopback_only(tmp_path):
    # The TLS listener on every address, as in production; 127.0.0.2 stands for "not the
    # address the plain listener is bound to" on any machine (all of 127/8 is loopback).
    broker = start_broker(tmp_path / "broker", tls_bind="0.0.0.0", tls_names=("127.0.0.2",))
    try:
        assert port_open("127.0.0.1", broker.port)  # positive control: the plain listener is up
        assert port_open("127.0.0.2", broker.tls_port)  # and a wildcard listener is reached there
        assert not port_open("127.0.0.2", broker.port)
    finally:
        broker.stop()


def test_an_agent_refuses_a_broker_certificate_for_another_host_name(tmp_path, make_agent, caplog):
    # A certificate for "localhost" alone; start_broker keeps what it finds in data_dir/tls.
    local_ca_create(tmp_path / "broker" / "tls", names=["localhost"], loopback=False)
    broker = start_broker(tmp_path / "broker")
    try:
        ca_file = str(broker.ca_file)
        # Positive control: dialled by the name the certificate gives, the broker is trusted.
        make_agent(
            on_broker=broker, broker={"url": f"mqtts://localhost:{broker.tls_port}", "ca_file": ca_file}
        )
        # The same broker, the same CA, dialled as 127.0.0.1: a name the certificate lacks.
        agent = make_agent(
            start=False,
            on_broker=broker,
            broker={"url": f"mqtts://127.0.0.1:{broker.tls_port}", "ca_file": ca_file},
        )
        message = refused_connecting(agent, caplog, "certificate verify failed")
        assert "mismatch" in message
    finally:
        broker.stop()


@pytest.mark.parametrize("case", ["another CA", "the system's CAs", "a certificate for another host"])
def test_the_agent_refuses_an_https_server_it_cannot_verify(
    case, make_agent, broker, other_ca, tmp_path, publisher, collector, artifacts, signing_key
):
    pinned = broker.ca_file
    if case == "another CA":
        server_files = other_ca
    elif case == "the system's CAs":
        server_files, pinned = broker.tls, None
    else:  # signed by the CA the device pins, but for a name that is not the one dialled
        server_files = local_ca_create(tmp_path / "wrong-name", names=["fleet.example.com"], loopback=False)
        pinned = server_files.ca_file
    overrides = over_tls(broker, control_plane_ca=pinned)
    if pinned is None:
        overrides["control_plane"] = {"token": "md_device-token"}
    agent = make_agent(**overrides)
    device = agent.config.device_id
    with ArtifactServer(tls=tls_context(server_files)) as server:
        v1 = publish_artifact(server, artifacts[("1.0.0", "float32")])
        publish_desired(publisher, device, desired_envelope(signing_key, device, 1, {"digits": v1}))
        # Transient for the desired state (the server may be fixed): "retrying", not "failed".
        event = collector.wait_for(
            device, "events", lambda e: e["type"] == "retrying" and e.get("reason") == "tls_failed"
        )
        assert "certificate verify failed" in event["message"]
        # The handshake failed before any request: the device token never reached the server.
        assert not any(server.requests.values())
    assert "digits" not in agent.models.live()


def test_a_handshake_that_fails_on_the_wire_is_retried_like_network_trouble():
    """Only a refused certificate is tls_failed at once; a handshake that fails otherwise
    (here plain HTTP behind an https:// URL) is retried, then download_failed."""
    with ArtifactServer() as server, urllib3.PoolManager() as http:
        server.add("/manifest", b"{}")
        url = server.url("/manifest").replace("http://", "https://")
        downloader = Downloader(http=http, attempts=2, backoff_initial_s=0.001, backoff_max_s=0.01)
        with pytest.raises(TransferError) as caught:
            downloader.fetch_bytes(url, max_bytes=100)
    assert caught.value.reason == "download_failed" and "after 2 attempts" in str(caught.value)
    assert "WRONG_VERSION_NUMBER" in str(caught.value)
