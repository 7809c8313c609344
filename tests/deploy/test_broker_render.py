"""docker/mosquitto/render.py makes a config a real Mosquitto runs with, the way compose's
broker-init and the systemd drop-in use it, and docker/healthcheck.py tells up from down."""

from __future__ import annotations

import getpass
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fleet.core.tls import local_ca_create
from fleet.mqtt.broker import ADMIN_USER, BrokerError, BrokerProcess, DynSec, free_port
from tests.deploy.project_commands import ROOT

RENDER = ROOT / "docker" / "mosquitto" / "render.py"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"


def render(tmp_path: Path, *, port: int, tls_port: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, str(RENDER), "--out", str(tmp_path / "data" / "mosquitto.conf")]
    command += ["--data-dir", str(tmp_path / "data"), "--tls-dir", str(tmp_path / "tls")]
    command += ["--user", getpass.getuser(), "--port", str(port), "--tls-port", str(tls_port)]
    command += ["--tls-bind", "127.0.0.1"]
    return subprocess.run(command, env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True)


@pytest.fixture
def password_file(tmp_path) -> Path:
    path = tmp_path / "secrets" / "mqtt_admin_password"
    path.parent.mkdir()
    path.write_text("admin-password-of-this-test\n")
    return path


@pytest.fixture
def rendered_broker(tmp_path, password_file):
    local_ca_create(tmp_path / "tls")
    port, tls_port = free_port(), free_port()
    result = render(
        tmp_path, port=port, tls_port=tls_port, env={"MQTT_ADMIN_PASSWORD_FILE": str(password_file)}
    )
    assert result.returncode == 0, result.stderr
    # BrokerProcess runs `mosquitto -c data_dir/mosquitto.conf`: the file render.py wrote.
    broker = BrokerProcess(tmp_path / "data", port, "admin-password-of-this-test", tls_port, "127.0.0.1")
    broker.start()
    yield broker
    broker.stop()


def test_the_rendered_config_runs_mosquitto_and_the_admin_logs_in_over_tls(rendered_broker, tmp_path):
    admin = DynSec(
        rendered_broker.tls_url,
        ADMIN_USER,
        "admin-password-of-this-test",
        ca_file=tmp_path / "tls" / "ca.pem",
    )
    assert admin.get_client(ADMIN_USER)["username"] == ADMIN_USER
    assert rendered_broker.admin().get_client(ADMIN_USER) is not None  # the loopback listener too


def test_a_wrong_admin_password_is_refused(rendered_broker):
    with pytest.raises(BrokerError):
        DynSec(rendered_broker.url, ADMIN_USER, "not-the-password", timeout_s=3).get_client(ADMIN_USER)


def test_rendering_again_keeps_the_accounts_the_broker_holds(rendered_broker, tmp_path, password_file):
    rendered_broker.admin().ensure_device("cam-0001", "device-password")
    rendered_broker.stop()
    result = render(
        tmp_path,
        port=rendered_broker.port,
        tls_port=rendered_broker.tls_port,
        env={"MQTT_ADMIN_PASSWORD_FILE": str(password_file)},
    )
    assert result.returncode == 0, result.stderr
    assert "created" not in result.stdout
    rendered_broker.start()
    assert rendered_broker.admin().get_client("cam-0001") is not None


def test_missing_tls_files_or_password_stop_it_with_a_clear_error(tmp_path, password_file):
    result = render(tmp_path, port=1883, tls_port=8883, env={"MQTT_ADMIN_PASSWORD_FILE": str(password_file)})
    assert result.returncode == 2
    assert "ca.pem is missing" in result.stderr
    assert not (tmp_path / "data" / "mosquitto.conf").exists()
    local_ca_create(tmp_path / "tls")
    result = render(tmp_path, port=1883, tls_port=8883, env={})
    assert result.returncode == 2
    assert "MQTT_ADMIN_PASSWORD" in result.stderr
    assert not (tmp_path / "data" / "mosquitto.conf").exists()


def healthcheck(*args: str) -> int:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args], capture_output=True, timeout=30
    ).returncode


def test_the_tcp_healthcheck_tells_a_listening_broker_from_a_closed_port(rendered_broker):
    assert healthcheck("tcp", "127.0.0.1", str(rendered_broker.tls_port)) == 0
    assert healthcheck("tcp", "127.0.0.1", str(free_port())) == 1


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        # Like Django behind the proxy: a redirect to HTTPS unless the proxy's header says so.
        https = self.headers.get("X-Forwarded-Proto") == "https"
        status = {"/ok": 200 if https else 301, "/moved": 302}.get(self.path, 500)
        self.send_response(status)
        self.send_header("Location", "https://example.invalid/")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_http_healthcheck_passes_on_a_page_and_fails_on_an_error_or_redirect():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert healthcheck("http", f"{base}/ok") == 0
        assert healthcheck("http", f"{base}/broken") == 1
        assert healthcheck("http", f"{base}/moved") == 1
    finally:
        server.shutdown()
        server.server_close()
    assert healthcheck("http", f"{base}/ok") == 1  # nothing listens any more
