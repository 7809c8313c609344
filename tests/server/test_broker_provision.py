"""manage.py broker_provision on a fresh Mosquitto with the project's config: default deny,
the service accounts and their roles; idempotent; bad password sources change nothing."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from fleet.mqtt.broker import BrokerError, mqtt_client, start_broker

ROOT = Path(__file__).resolve().parents[2]
PUBLISHER, INGEST = "publisher-secret-1", "ingest-secret-1"


@pytest.fixture
def fresh(tmp_path, settings):
    """A broker nobody provisioned yet (only the dynamic-security admin exists)."""
    broker = start_broker(tmp_path / "mosquitto")
    settings.MQTT_URL = broker.url
    settings.MQTT_ADMIN_PASSWORD = broker.admin_password
    settings.MQTT_PUBLISHER_PASSWORD = PUBLISHER
    settings.MQTT_INGEST_PASSWORD = INGEST
    yield broker
    broker.stop()


def provision(*args: str) -> str:
    out = io.StringIO()
    call_command("broker_provision", *args, stdout=out)
    return out.getvalue()


def state(broker) -> list:
    """Everything provisioning decides, as the broker reports it."""
    admin = broker.admin()
    return [
        admin.command({"command": "getDefaultACLAccess"}),
        admin.command({"command": "listClients", "verbose": True}),
        admin.command({"command": "listRoles", "verbose": True}),
    ]


def can_log_in(broker, username: str, password: str) -> bool:
    return broker.admin().login_works(username, password)


class Session:
    """A connected client that waits for the broker's answer to each subscribe and publish."""

    def __init__(self, broker, username: str, password: str, client_id: str = ""):
        client_id = client_id or f"prov-{uuid.uuid4().hex[:6]}"
        self.client = mqtt_client(broker.url, client_id=client_id, username=username, password=password)
        self.acks: dict[int, object] = {}
        self.messages: list[str] = []
        self.cond = threading.Condition()
        self.client.on_subscribe = self.client.on_publish = self._ack
        self.client.on_message = self._message

    def _ack(self, client, userdata, mid, reason, properties):
        with self.cond:
            self.acks[mid] = reason[0] if isinstance(reason, list) else reason
            self.cond.notify_all()

    def _message(self, client, userdata, message):
        with self.cond:
            self.messages.append(message.topic)
            self.cond.notify_all()

    def wait(self, condition) -> object:
        with self.cond:
            assert self.cond.wait_for(condition, timeout=10)

    def subscribe(self, topic: str) -> bool:
        mid = self.client.subscribe(topic, qos=1)[1]
        self.wait(lambda: mid in self.acks)
        return not self.acks[mid].is_failure

    def publish(self, topic: str) -> bool:
        mid = self.client.publish(topic, b"{}", qos=1).mid
        self.wait(lambda: mid in self.acks)
        return not self.acks[mid].is_failure

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_it_provisions_and_a_second_run_changes_nothing(fresh):
    first = provision()
    assert "default access set to deny" in first
    assert "account fleet-publisher created with role fleet-publisher" in first
    assert "account fleet-ingest created with role fleet-ingest" in first
    after_first = state(fresh)
    assert provision() == "The broker is already provisioned: nothing changed.\n"
    assert state(fresh) == after_first
    assert can_log_in(fresh, "fleet-publisher", PUBLISHER) and can_log_in(fresh, "fleet-ingest", INGEST)
    assert PUBLISHER not in first and INGEST not in first


def test_it_puts_back_what_drifted_and_rotates_a_password(fresh, settings):
    provision()
    settled = state(fresh)
    admin = fresh.admin()
    admin.command(
        {"command": "addRoleACL", "rolename": "fleet-publisher", "acltype": "subscribePattern", "topic": "#"},
        {
            "command": "removeRoleACL",
            "rolename": "fleet-ingest",
            "acltype": "publishClientSend",
            "topic": "fleet/v1/replay",
        },
        {"command": "disableClient", "username": "fleet-ingest"},
    )
    settings.MQTT_PUBLISHER_PASSWORD = "publisher-secret-2"
    changes = provision()
    assert "role fleet-publisher: 0 ACL entries added, 1 removed" in changes
    assert "role fleet-ingest: 1 ACL entries added, 0 removed" in changes
    assert "account fleet-ingest enabled, password set" in changes
    assert "account fleet-publisher: password changed" in changes
    assert state(fresh) == settled
    assert can_log_in(fresh, "fleet-publisher", "publisher-secret-2")
    assert not can_log_in(fresh, "fleet-publisher", PUBLISHER)


def test_default_deny_holds_for_an_account_no_role_grants(fresh):
    provision()
    fresh.admin().command({"command": "createClient", "username": "stranger", "password": "pw"})
    stranger = Session(fresh, "stranger", "pw")
    ingest = Session(fresh, "fleet-ingest", INGEST)
    publisher = Session(fresh, "fleet-publisher", PUBLISHER)
    try:
        assert not stranger.subscribe("fleet/v1/devices/+/telemetry")
        assert not stranger.subscribe("#")
        assert not stranger.publish("fleet/v1/devices/cam-1/desired")
        # Positive controls: the provisioned accounts may do exactly their jobs.
        assert ingest.subscribe("fleet/v1/devices/+/telemetry")
        assert publisher.publish("fleet/v1/devices/cam-1/desired")
        assert not publisher.subscribe("fleet/v1/devices/+/telemetry")
        # Receiving is denied by default too: the stranger gets nothing a device sends.
        fresh.admin().ensure_device("cam-1", "device-pw")
        device = Session(fresh, "cam-1", "device-pw", client_id="cam-1")
        assert device.publish("fleet/v1/devices/cam-1/telemetry")
        ingest.wait(lambda: "fleet/v1/devices/cam-1/telemetry" in ingest.messages)
        assert stranger.messages == []
        device.close()
    finally:
        for session in (stranger, ingest, publisher):
            session.close()


def test_nobody_connects_before_it_is_provisioned(fresh):
    with pytest.raises(BrokerError):
        mqtt_client(fresh.url, username="fleet-publisher", password=PUBLISHER)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"MQTT_INGEST_PASSWORD": ""}, "no password for the ingest account: set MQTT_INGEST_PASSWORD"),
        ({"MQTT_ADMIN_PASSWORD": "not-the-admin-password"}, "refused 'fleet-admin' with the admin password"),
    ],
)
def test_a_missing_or_wrong_password_changes_nothing(fresh, settings, override, message):
    before = state(fresh)
    for name, value in override.items():
        setattr(settings, name, value)
    with pytest.raises(CommandError, match=message) as raised:
        provision()
    assert raised.value.returncode == 2
    assert state(fresh) == before


def test_an_unreadable_or_empty_password_file_changes_nothing(fresh, tmp_path):
    before = state(fresh)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path, message in ((tmp_path / "missing", "cannot read"), (empty, "is empty")):
        with pytest.raises(CommandError, match=f"--publisher-password-file: .*{message}") as raised:
            provision(f"--publisher-password-file={path}")
        assert raised.value.returncode == 2
    assert state(fresh) == before


def test_the_command_reads_password_files_and_never_prints_them(fresh, tmp_path):
    """As an operator runs it: a process, passwords in files (Docker/systemd secrets)."""
    files = {}
    for name, password in (("admin", fresh.admin_password), ("publisher", "from-a-file"), ("ingest", INGEST)):
        files[name] = tmp_path / name
        files[name].write_text(password + "\n")  # editors add the newline; it is not part of it
    env = {
        **os.environ,
        "DEBUG": "1",
        "MQTT_URL": fresh.url,
        "MQTT_ADMIN_PASSWORD_FILE": str(files["admin"]),
        "MQTT_INGEST_PASSWORD_FILE": str(files["ingest"]),
    }
    argv = [
        sys.executable,
        "manage.py",
        "broker_provision",
        f"--publisher-password-file={files['publisher']}",
    ]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "account fleet-publisher created" in done.stdout
    for secret in ("from-a-file", INGEST, fresh.admin_password):
        assert secret not in done.stdout + done.stderr
    assert can_log_in(fresh, "fleet-publisher", "from-a-file")

    files["admin"].write_text("wrong\n")
    refused = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "refused 'fleet-admin'" in refused.stderr and "Traceback" not in refused.stderr


def test_an_unreadable_password_file_in_the_environment_is_one_line_and_changes_nothing(fresh, tmp_path):
    before = state(fresh)
    env = {
        **os.environ,
        "DEBUG": "1",
        "MQTT_URL": fresh.url,
        "MQTT_ADMIN_PASSWORD": fresh.admin_password,
        "MQTT_PUBLISHER_PASSWORD": PUBLISHER,
        "MQTT_INGEST_PASSWORD_FILE": str(tmp_path / "no-such-file"),
    }
    done = subprocess.run(
        [sys.executable, "manage.py", "broker_provision"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: MQTT_INGEST_PASSWORD_FILE: cannot read ")
    assert "Traceback" not in done.stderr and fresh.admin_password not in done.stderr
    assert state(fresh) == before
