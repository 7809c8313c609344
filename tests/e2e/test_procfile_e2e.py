"""`make up` as an operator runs it: ``scripts/up.py`` prepares a production host's state,
provisions the broker and becomes ``honcho start`` on the Procfile (gunicorn over HTTPS,
Celery worker and beat, the ingest bridge, Mosquitto with its TLS listener), with
``DEBUG=0`` on free ports against the test database. One model is uploaded through
gunicorn, rolled out through the API, and an agent enrolled through gunicorn over HTTPS
and connected to the TLS broker serves it; then SIGINT (Ctrl-C) stops everything, and no
process of the run is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from agent.config import parse_config
from agent.core import Agent
from fleet.mqtt.broker import free_port, port_open
from tests.conftest import wait_until
from tests.e2e.conftest import processes_database_url, schedule_evaluation

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = ("web", "worker", "beat", "ingest", "broker")


def run_marker(var: Path) -> str:
    """In the environment of every process of the run, and of nothing else."""
    return f"UP_VAR_DIR={var}"


def processes_of_the_run(var: Path) -> list[int]:
    marker = run_marker(var).encode() + b"\0"
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


@pytest.fixture
def up(tmp_path):
    """scripts/up.py on free ports; stopped with SIGINT, as Ctrl-C stops make up."""
    var = tmp_path / "up"
    ports = {name: free_port() for name in ("UP_WEB_PORT", "UP_MQTT_PORT", "UP_MQTTS_PORT")}
    env = {
        **os.environ,
        **{name: str(port) for name, port in ports.items()},
        "UP_VAR_DIR": str(var),
        "UP_DATABASE_URL": processes_database_url(),
        "UP_REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"),
        "UP_CACHE_URL": os.environ.get("CACHE_URL", os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")),
        "CELERY_QUEUE": f"up-{uuid.uuid4().hex[:8]}",  # no other test's worker takes its tasks
    }
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "scripts/up.py"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    run = {"var": var, "ports": ports, "process": process, "log": log_path}
    base = f"https://127.0.0.1:{ports['UP_WEB_PORT']}"
    run["url"], run["ca"] = base, str(var / "tls" / "ca.pem")

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"make up exited with {process.returncode}:\n{log_path.read_text()}")
        text = log_path.read_text(errors="replace")
        if "ingest: subscribed" not in text or "beat: Starting" not in text or "ready." not in text:
            return False
        try:
            return requests.get(f"{base}/api/v1/devices/", verify=run["ca"], timeout=5).status_code == 401
        except requests.RequestException:
            return False

    try:
        wait_until(ready, timeout=60, interval=0.2, message="make up's processes")
        yield run
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                for pid in processes_of_the_run(var):
                    os.kill(pid, signal.SIGKILL)
                raise


class Api:
    """An operator's API client over HTTPS, verifying gunicorn against the run's CA (given
    with each request: a Session's own ``verify`` loses to REQUESTS_CA_BUNDLE)."""

    def __init__(self, up, token: str):
        self.base, self.ca, self.token = f"{up['url']}/api/v1", up["ca"], token

    def post(self, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return requests.post(f"{self.base}{path}", headers=headers, verify=self.ca, timeout=90, **kwargs)


def upload(api: Api, digits) -> None:
    assert api.post("/models/", json={"name": "digits", "labels": digits.LABELS}).status_code == 201
    version = api.post(
        "/models/digits/versions/",
        data={"version": "1.0.0"},
        files={"golden_set": ("golden.npz", digits.golden_set_npz())},
    )
    assert version.status_code == 201, version.text
    tflite = digits.build_digits_models(version="1.0.0")["float32"]
    artifact = api.post(
        "/models/digits/versions/1.0.0/artifacts/?wait=60",
        data={"variant": "float32"},
        files={"file": ("float32.tflite", tflite)},
    )
    assert artifact.status_code == 201 and artifact.json()["status"] == "ready", artifact.text
    assert api.post("/models/digits/versions/1.0.0/release").status_code == 200


def start_agent(up, tmp_path, enrollment_key: str, root_key_hex: str) -> Agent:
    answer = requests.post(
        f"{up['url']}/api/v1/enroll",
        json={
            "device_id": "up-cam-1",
            "enrollment_token": enrollment_key,
            "identity": {"hardware": "test-box", "supports_int8": False, "agent_version": "0.1.0"},
        },
        verify=up["ca"],
        timeout=10,
    )
    assert answer.status_code in (200, 201), answer.text
    enrolled = answer.json()
    assert enrolled["mqtt"]["url"] == f"mqtts://127.0.0.1:{up['ports']['UP_MQTTS_PORT']}"
    agent = Agent(
        parse_config(
            {
                "device_id": "up-cam-1",
                "state_dir": str(tmp_path / "agent"),
                "broker": {
                    **{k: enrolled["mqtt"][k] for k in ("url", "username", "password")},
                    "ca_file": up["ca"],
                },
                "control_plane": {"url": up["url"], "token": enrolled["token"], "ca_file": up["ca"]},
                "trust": {"root_keys": [root_key_hex]},
                "local_api": {"bind": "127.0.0.1:0"},
                "limits": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "reconnect_initial_s": 0.1},
            }
        )
    )
    agent.start()
    return agent


def test_make_up_serves_an_upload_rollout_and_agent_then_stops_cleanly(up, tmp_path, digits):
    from django.test import override_settings

    from fleet.core.choices import Role
    from fleet.core.services import api_token_create, user_ensure
    from fleet.devices.models import Device
    from fleet.devices.services import enrollment_token_create
    from fleet.registry.trust import trust_bootstrap_dev
    from fleet.rollouts.choices import RolloutState
    from fleet.rollouts.models import Rollout, RolloutPolicy

    var, base = up["var"], up["url"]
    log = up["log"].read_text(errors="replace")
    for secret in ("mqtt-admin", "mqtt-publisher", "mqtt-ingest", "admin-login"):  # the log names none
        assert (var / "secrets" / secret).read_text() not in log
    assert "--password=…" in log  # (the command that made the admin login is shown, masked)
    # Production settings: no debug page (positive control: the page is a 404 at all).
    missing = requests.get(f"{base}/no-such-page/", verify=up["ca"], timeout=10)
    assert missing.status_code == 404 and "DEBUG = True" not in missing.text
    schedule_evaluation(every_s=1)
    _, token = api_token_create(user=user_ensure(username="olga", role=Role.OPERATOR), name="make-up")
    api = Api(up, token)
    upload(api, digits)
    # Static files come from gunicorn (whitenoise), with production settings.
    css = requests.get(f"{base}/static/admin/css/base.css", verify=up["ca"], timeout=10)
    assert css.status_code == 200 and "Strict-Transport-Security" in css.headers

    # The fleet's root (development shortcut, in this process against the same key and broker).
    with override_settings(
        SIGNING_KEY_FILE=var / "signing-key.pem",
        SIGNING_KEY_AUTOGENERATE=True,
        MQTT_URL=f"mqtt://127.0.0.1:{up['ports']['UP_MQTT_PORT']}",
        MQTT_PUBLISHER_PASSWORD=(var / "secrets" / "mqtt-publisher").read_text(),
    ):
        root_key_hex = trust_bootstrap_dev(root_key_path=tmp_path / "root.pem", publish="now")
    tag = "make-up"
    _, enrollment_key = enrollment_token_create(name=tag, auto_approve=True, tags=[tag])
    agent = start_agent(up, tmp_path, enrollment_key, root_key_hex)
    try:
        wait_until(agent.link.connected.is_set, timeout=20, message="the agent to connect over TLS")
        RolloutPolicy.objects.create(
            name="everywhere",
            stages=[{"kind": "percent", "value": 100}],
            gates={"max_install_failure_rate": 0.0},
        )
        created = api.post(
            "/rollouts/",
            json={"model": "digits", "version": "1.0.0", "policy": "everywhere", "targets": {"tags": [tag]}},
        )
        assert created.status_code == 201, created.text
        rollout_id = created.json()["id"]
        assert api.post(f"/rollouts/{rollout_id}/start", json={}).status_code == 200

        def serving() -> bool:
            live = agent.models.live().get("digits")
            return live is not None and live.version == "1.0.0"

        wait_until(serving, timeout=30, message="the agent to serve 1.0.0")
        wait_until(
            lambda: Device.objects.filter(
                device_id="up-cam-1", reported_models__digits__version="1.0.0"
            ).exists(),
            timeout=20,
            message="the ingest bridge to record the agent's report",
        )
        wait_until(
            lambda: Rollout.objects.get(pk=rollout_id).state == RolloutState.COMPLETED,
            timeout=20,
            message="beat to complete the rollout",
        )
    finally:
        agent.stop()

    # /metrics through gunicorn adds up the host's processes (PROMETHEUS_MULTIPROC_DIR,
    # gunicorn.conf.py): the upload counted in a web worker, the pipeline and the desired
    # state in a Celery pool process. Refused without the token (positive control after).
    assert requests.get(f"{base}/metrics", verify=up["ca"], timeout=10).status_code == 401
    scraped = requests.get(
        f"{base}/metrics",
        headers={"Authorization": f"Bearer {(var / 'secrets' / 'metrics-token').read_text()}"},
        verify=up["ca"],
        timeout=10,
    )
    assert scraped.status_code == 200, scraped.text
    series = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in scraped.text.splitlines()
        if line and not line.startswith("#")
    }
    assert series["modelfleet_artifact_uploads_total"] == 1
    assert series['modelfleet_artifact_pipeline_duration_seconds_count{outcome="ready"}'] == 1
    assert series["modelfleet_desired_states_published_total"] >= 1

    # Positive control for the check below: the run's processes are found while it runs
    # (honcho, and under it gunicorn with its workers, Celery, the bridge, Mosquitto).
    assert len(processes_of_the_run(var)) > len(PROCESSES)
    process = up["process"]
    process.send_signal(signal.SIGINT)  # Ctrl-C
    process.wait(timeout=30)
    log = up["log"].read_text(errors="replace")
    assert "SIGINT received" in log
    for name in PROCESSES:
        assert f"{name}.1 stopped" in log, log[-3000:]
    assert processes_of_the_run(var) == [], "a process of make up outlived it"
    for port in up["ports"].values():
        assert not port_open("127.0.0.1", port)
