"""Fixtures for the end-to-end tests: the control plane serving artifacts over HTTP, the
ingest bridge, and real in-process agents enrolled through the API, on a real Mosquitto
with the project's config; the agents connect to its TLS listener and pin the run's CA."""

from __future__ import annotations

import os
import threading
import uuid

import pytest
import requests
from django.core.files.uploadedfile import SimpleUploadedFile

from agent.config import parse_config
from agent.core import Agent
from fleet.devices.ingest import IngestBridge
from fleet.devices.models import Device
from fleet.devices.services import devices_assign, enrollment_token_create
from fleet.registry import services as registry
from fleet.registry.models import MLModel
from fleet.registry.trust import trust_bootstrap_dev
from fleet.rollouts import services as rollouts
from tests.conftest import wait_until
from tests.server.conftest import ready_artifact

DEVICES = 20
EVALUATE_SCHEDULE = "rollouts: evaluate running rollouts"
EVALUATE_TASK = "fleet.rollouts.tasks.rollouts_evaluate_running"
VERSIONS = ("1.0.0", "2.0.0", "3.0.0", "4.0.0")  # 3.0.0 and 4.0.0 are the bad retrains


@pytest.fixture(scope="session")
def root_key_path(tmp_path_factory):
    """The fleet's root key, on the test machine as on an operator's offline one."""
    return tmp_path_factory.mktemp("offline-root") / "root.pem"


@pytest.fixture
def control_plane(live_server, settings, broker_settings, digits, root_key_path):
    settings.PUBLIC_BASE_URL = live_server.url
    settings.MQTT_PUBLIC_URL = broker_settings.tls_url  # what the enrollment answer tells devices
    settings.MQTT_INGEST_PASSWORD = broker_settings.ingest_password
    settings.ENROLL_RATE = "1000/minute"  # twenty devices enroll from one address in a second
    model = MLModel.objects.create(name="digits", labels=digits.LABELS)
    golden = digits.golden_set_npz()
    artifacts = {}
    for version in VERSIONS:
        row = registry.version_create(
            model=model, version=version, golden_set=SimpleUploadedFile("golden.npz", golden)
        )
        for variant, data in digits.build_digits_models(version=version).items():
            artifacts[(version, variant)] = ready_artifact(row, variant, data)
    # Root version 1 and a keyring naming the signing key, published retained before any
    # agent connects; agents pin only the root key.
    settings.SIGNING_KEY_AUTOGENERATE = True
    root_key_hex = trust_bootstrap_dev(root_key_path=root_key_path, publish="now")
    return {"url": live_server.url, "artifacts": artifacts, "model": model, "root_key_hex": root_key_hex}


@pytest.fixture
def bridge(broker, settings):
    # The agents here send a window every half second to keep the tests short; production
    # agents send one every 30 s, and the bridge refuses windows under a second by default.
    settings.INGEST_MIN_WINDOW_S = 0.2
    running = IngestBridge(
        client_id=f"e2e-ingest-{uuid.uuid4().hex[:6]}",
        url=broker.url,
        username="fleet-ingest",
        password=broker.ingest_password,
        flush_ms=50,
        session_expiry_s=0,
    )
    stop = threading.Event()
    thread = threading.Thread(target=running.run, args=(stop,), daemon=True)
    thread.start()
    wait_until(running.subscribed.is_set, timeout=10, message="the ingest bridge")
    yield running
    stop.set()
    thread.join(20)


@pytest.fixture
def int8_rule():
    """Which of the agents declare int8 support (by their number): half of them."""
    return lambda n: n % 2 == 0


@pytest.fixture
def enrollment(control_plane, broker):
    """An auto-approving enrollment token whose devices carry this run's tag. Ids and tags
    are fresh each test: the broker keeps the retained messages of earlier tests' devices."""
    run = uuid.uuid4().hex[:4]
    _, key = enrollment_token_create(name=f"e2e-{run}", auto_approve=True, tags=[f"e2e-{run}"])
    return {"run": run, "key": key, "tag": f"e2e-{run}"}


def enroll(control_plane, enrollment, device_id: str, *, int8: bool) -> dict:
    answer = requests.post(
        f"{control_plane['url']}/api/v1/enroll",
        json={
            "device_id": device_id,
            "enrollment_token": enrollment["key"],
            "identity": {"hardware": "test-box", "supports_int8": int8, "agent_version": "0.1.0"},
        },
        timeout=10,
    )
    assert answer.status_code in (200, 201), answer.text
    return answer.json()


def start_agent(control_plane, broker, tmp_path, enrollment, device_id: str, *, int8: bool) -> Agent:
    """A real agent, enrolled through the API, on the broker's TLS listener; started."""
    answer = enroll(control_plane, enrollment, device_id, int8=int8)
    config = parse_config(
        {
            "device_id": device_id,
            "state_dir": str(tmp_path / device_id),
            "telemetry_interval_s": 0.5,
            "broker": {
                "url": answer["mqtt"]["url"],  # mqtts://, the broker's TLS listener
                "username": answer["mqtt"]["username"],
                "password": answer["mqtt"]["password"],
                "ca_file": str(broker.ca_file),
            },
            "control_plane": {"url": control_plane["url"], "token": answer["token"]},
            "trust": {"root_keys": [control_plane["root_key_hex"]]},
            "local_api": {"bind": "127.0.0.1:0"},
            "device": {"int8": int8},
            "limits": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "reconnect_initial_s": 0.1},
        }
    )
    agent = Agent(config)
    agent.start()
    return agent


@pytest.fixture
def agents(control_plane, bridge, broker, tmp_path, int8_rule, enrollment):
    running = []
    try:
        for n in range(DEVICES):
            device_id = f"e2e-{enrollment['run']}-{n:02d}"
            running.append(
                start_agent(control_plane, broker, tmp_path, enrollment, device_id, int8=int8_rule(n))
            )
        for agent in running:
            wait_until(
                agent.link.connected.is_set, timeout=20, message=f"{agent.config.device_id} to connect"
            )
        assert all(agent.config.broker.tls for agent in running)
        yield running
    finally:  # also when setting up failed half-way: no agent outlives its test
        for agent in running:
            agent.stop()


def everyone_on(agents, version: str) -> bool:
    live = [agent.models.live().get("digits") for agent in agents]
    return all(model is not None and model.version == version for model in live)


def evaluate_until(rollout, states: set[str], timeout: float, *, stage: int | None = None) -> None:
    """The beat task, called directly until the rollout reaches one of ``states`` (or,
    given ``stage``, that stage)."""

    def reached() -> bool:
        rollouts.rollout_evaluate(rollout_id=rollout.pk)
        rollout.refresh_from_db()
        return rollout.state in states or (stage is not None and rollout.current_stage >= stage)

    try:
        wait_until(reached, timeout=timeout, interval=0.2, message="the rollout to reach its state")
    except AssertionError as exc:
        raise AssertionError(
            f"rollout stuck: {rollout.state} stage {rollout.current_stage}: {rollout.last_decision}; "
            f"assignments {list(rollout.assignments.values_list('device__device_id', 'state', 'reason'))}"
        ) from exc


def post_feedback(agent, digits, samples: int, *, offset: int = 0) -> None:
    """What an app on the device does: predict, then report the true label."""
    x, y = digits.golden_set()
    session = requests.Session()
    for number in range(samples):
        index = (offset + number) % len(y)
        answer = session.post(
            f"{agent.api.address}/v1/models/digits:predict", json={"inputs": [[x[index].tolist()]]}, timeout=5
        ).json()
        session.post(
            f"{agent.api.address}/v1/feedback",
            json={"prediction_id": answer["prediction_id"], "label": int(y[index])},
            timeout=5,
        )


def put_everywhere(agents, control_plane, version: str) -> None:
    """Put ``version`` on every agent (the variant by the rule) and wait until the agents
    serve it and the control plane, through the ingest bridge, sees it."""
    artifacts = control_plane["artifacts"]
    ids = [agent.config.device_id for agent in agents]
    devices = list(Device.objects.filter(device_id__in=ids))
    for variant, group in (
        ("int8", [d for d in devices if d.supports_int8]),
        ("float32", [d for d in devices if not d.supports_int8]),
    ):
        if group:
            devices_assign(devices=group, artifacts={"digits": artifacts[(version, variant)]}, publish="now")
    wait_until(lambda: everyone_on(agents, version), timeout=60, message=f"{version} everywhere")
    wait_until(
        lambda: (
            Device.objects.filter(
                device_id__in=ids, reported_models__digits__version=version, online=True
            ).count()
            == len(ids)
        ),
        timeout=30,
        message=f"the control plane to see {version} everywhere",
    )


def schedule_evaluation(*, every_s: int) -> None:
    """The rollout evaluation's beat schedule (migration rollouts 0002), at a test pace,
    for the tests that run beat as a process. Made here too: a transactional test that ran
    before flushed it away."""
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    every, _ = IntervalSchedule.objects.get_or_create(every=every_s, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.update_or_create(
        name=EVALUATE_SCHEDULE,
        defaults={"task": EVALUATE_TASK, "interval": every, "enabled": True},
    )


def processes_database_url() -> str:
    """The test database, as the control plane's processes reach it."""
    from django.db import connection

    return os.environ["DATABASE_URL"].rsplit("/", 1)[0] + "/" + connection.settings_dict["NAME"]
