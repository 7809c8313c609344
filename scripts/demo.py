"""`make demo`: the control plane end to end on this machine.

Starts the web app and a Celery worker (Redis and PostgreSQL are started by
scripts/with-services.sh when missing), creates an admin and an operator with an API
token, uploads the digits sample model v1 as float32 and int8 through the HTTP API,
waits for both artifacts to be ready and prints what the registry made of them. Then it
keeps the admin running until Ctrl-C (DEMO_EXIT=1 makes it stop right away, for tests).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import redis
import requests
from rich.console import Console
from rich.panel import Panel
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleet.mqtt.broker import free_port as any_free_port  # noqa: E402
from fleet.mqtt.broker import start_broker  # noqa: E402
from samples import digits  # noqa: E402

console = Console()
VAR = Path(os.environ.get("DEMO_VAR_DIR", ROOT / "var" / "demo"))


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port")


# The demo's database, dropped and created anew on every run.
DEMO_DATABASE = os.environ.get("DEMO_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/modelfleet_demo")


def fresh_database(url: str, *, create: bool = True) -> None:
    """The demo's own PostgreSQL database, created anew each run (the ingest bridge and
    the JSON filters need PostgreSQL; SQLite stays fine for the registry alone), and
    dropped when the demo ends (``create=False``)."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if create:
            connection.execute(f'CREATE DATABASE "{name}"')


def demo_env(port: int, broker) -> dict[str, str]:
    env = dict(os.environ)
    env["DATABASE_URL"] = DEMO_DATABASE
    # The control plane's own accounts use the broker's loopback listener; devices are told
    # (enrollment answer) to use its TLS listener, whose certificate the run's CA signed.
    env["MQTT_URL"] = broker.url
    env["MQTT_PUBLIC_URL"] = broker.tls_url
    env["MQTT_PUBLISHER_PASSWORD"] = broker.publisher_password
    env["MQTT_ADMIN_PASSWORD"] = broker.admin_password
    env["MQTT_INGEST_PASSWORD"] = broker.ingest_password
    env["PUBLIC_BASE_URL"] = f"http://127.0.0.1:{port}"
    env.setdefault("DEBUG", "1")
    env.setdefault("VAR_DIR", str(VAR))
    env.setdefault("REDIS_URL", "redis://127.0.0.1:6379/14")
    # A cache of its own, emptied at start like the database: rate limits (enrollment counts
    # per address and minute) must not carry over from an earlier run or a test.
    env["CACHE_URL"] = env.get("DEMO_CACHE_URL", "redis://127.0.0.1:6379/12")
    redis.Redis.from_url(env["CACHE_URL"]).flushdb()
    env.setdefault("CELERY_QUEUE", f"demo-{os.getpid()}")
    env.setdefault("ALLOWED_HOSTS", "127.0.0.1,localhost")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if result.returncode:
        console.print(f"[red]manage.py {' '.join(args)} failed:[/red]\n{result.stderr}")
        raise SystemExit(1)
    return result.stdout.strip()


def start(stack: ExitStack, name: str, env: dict[str, str], *args: str) -> subprocess.Popen:
    log = (VAR / "logs" / f"{name}.log").open("wb")
    stack.callback(log.close)
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop() -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()

    stack.callback(stop)
    return process


def wait_for(what: str, check, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if process.poll() is not None:
            raise SystemExit(f"{what} exited; see {VAR / 'logs'}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up in {timeout:.0f}s; see {VAR / 'logs'}")
        time.sleep(0.2)


def http_up(base: str) -> bool:
    try:
        return requests.get(f"{base}/api/v1/signing-keys/", timeout=2).status_code == 401
    except requests.ConnectionError:
        return False


def worker_up(env: dict[str, str]) -> bool:
    ping = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "fleet",
            "inspect",
            "ping",
            "-t",
            "1",
            "-d",
            f"{env['CELERY_QUEUE']}@localhost",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    return ping.returncode == 0


def api_call(session: requests.Session, method: str, url: str, expect: int, **kwargs) -> dict:
    response = session.request(method, url, timeout=300, **kwargs)
    if response.status_code != expect:
        raise SystemExit(f"{method} {url} answered {response.status_code}: {response.text}")
    return response.json()


def upload_digits(base: str, token: str, progress: Progress) -> list[dict]:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    api = f"{base}/api/v1"
    step = progress.add_task("Creating model 'digits' and version 1.0.0 with its golden set", total=None)
    api_call(
        session,
        "POST",
        f"{api}/models/",
        201,
        json={
            "name": "digits",
            "task": "classification",
            "labels": digits.LABELS,
            "description": "8x8 handwritten digits (scikit-learn), MLP 64-32-10",
        },
    )
    api_call(
        session,
        "POST",
        f"{api}/models/digits/versions/",
        201,
        data={"version": "1.0.0", "notes": "first release"},
        files={"golden_set": ("golden.npz", digits.golden_set_npz())},
    )
    progress.update(step, total=1, completed=1)
    artifacts = []
    for variant, tflite in digits.build_digits_models().items():
        step = progress.add_task(
            f"Uploading {variant} ({len(tflite):,} bytes): inspect, smoke-run, golden set, zstd, sign",
            total=None,
        )
        artifacts.append(
            api_call(
                session,
                "POST",
                f"{api}/models/digits/versions/1.0.0/artifacts/?wait=120",
                201,
                data={"variant": variant},
                files={"file": (f"{variant}.tflite", tflite)},
            )
        )
        progress.update(step, total=1, completed=1)
    api_call(session, "POST", f"{api}/models/digits/versions/1.0.0/release", 200)
    return artifacts


def report(artifacts: list[dict], base: str, admin_password: str, token: str) -> None:
    table = Table(title="digits 1.0.0 in the registry")
    for column in ("variant", "status", "size", "compressed", "ratio", "golden accuracy", "manifest sha256"):
        table.add_column(column, justify="right" if column in ("size", "compressed", "ratio") else "left")
    for artifact in artifacts:
        table.add_row(
            artifact["variant"],
            f"[green]{artifact['status']}[/green]",
            f"{artifact['raw_size']:,} B",
            f"{artifact['blob_size']:,} B",
            f"{artifact['compression_ratio']:.2f}x",
            f"{artifact['golden_accuracy']:.1%} of {artifact['golden_samples']}",
            artifact["manifest_sha256"][:16] + "…",
        )
    console.print(table)
    console.print(
        Panel.fit(
            f"Admin:     [bold]{base}/admin/[/bold]  "
            f"user [bold]admin[/bold] / password [bold]{admin_password}[/bold]\n"
            f"API docs:  {base}/api/docs/\n"
            f"Operator:  olivia, API token [bold]{token}[/bold]\n"
            f"Try:       curl -H 'Authorization: Bearer {token}' {base}/api/v1/artifacts/",
            title="Modelfleet control plane is running",
        )
    )


# Twelve devices, ten of them int8: the gates count devices, not labels, compare each variant
# with itself and set one device aside each way, so a canary needs at least four devices of
# a variant on each side (six canaries always hold four int8 ones, and leave four behind).
DEMO_AGENTS = tuple((f"demo-cam-{n}", "float32" if n in (3, 7) else "int8") for n in range(1, 13))


def start_agents(
    stack: ExitStack, env: dict[str, str], base: str, progress: Progress, *, broker_ca_file: Path
) -> list[dict]:
    """Real agent processes, each enrolled through the real enrollment API with
    `fleet-agent enroll`, which writes its config (broker login over mqtts:// with the
    run's CA pinned, device token)."""
    step = progress.add_task(
        f"Enrolling {len(DEMO_AGENTS)} agents and publishing their desired state", total=None
    )
    enrollment_token = manage(
        env,
        "create_enrollment_token",
        "demo devices",
        "--auto-approve",
        "--max-uses",
        str(len(DEMO_AGENTS)),
        "--tag",
        "demo",
    )
    # The fleet's root of trust: in production the root key lives on an offline machine
    # (docs/security.md, "Keys and rotation"); the demo keeps one under var/demo. Agents pin
    # only the root key and learn the signing key from the keyring it signs.
    root_key_hex = manage(
        env, "trust", "dev-bootstrap", "--root-key", str(VAR / "offline-root" / "root.pem")
    ).split()[-1]
    console.print(
        f"Agents pin only the fleet's root key {root_key_hex[:16]}…; they learn the signing key "
        "from the keyring it signs, retained on fleet/v1/trust (docs/security.md, 'Keys and rotation')."
    )
    agents = []
    for device_id, variant in DEMO_AGENTS:
        home = VAR / "agents" / device_id
        port = any_free_port()
        config = home / "agent.toml"
        enroll = [
            sys.executable,
            "-m",
            "agent.cli",
            "enroll",
            "--url",
            base,
            "--device-id",
            device_id,
            "--token",
            enrollment_token,
            "--config-out",
            str(config),
            "--state-dir",
            str(home / "state"),
            "--local-api",
            f"127.0.0.1:{port}",
            "--telemetry-interval",
            "2",
            "--hardware",
            "demo-box",
            "--root-key",
            root_key_hex,
            "--broker-ca-file",
            str(broker_ca_file),
            *([] if variant == "int8" else ["--no-int8"]),
        ]
        result = subprocess.run(enroll, cwd=ROOT, env=env, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"fleet-agent enroll failed for {device_id}: {result.stderr}")
        process = start(
            stack,
            f"agent-{device_id}",
            env,
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "--config",
            str(config),
        )
        agents.append({"device_id": device_id, "variant": variant, "port": port, "process": process})
    for variant in sorted({variant for _, variant in DEMO_AGENTS}):
        devices = [device_id for device_id, v in DEMO_AGENTS if v == variant]
        manage(
            env,
            "publish_desired",
            *devices,
            "--model",
            "digits",
            "--model-version",
            "1.0.0",
            "--variant",
            variant,
        )
    progress.update(step, total=1, completed=1)
    return agents


def agent_health(port: int) -> dict | None:
    try:
        return requests.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).json()
    except requests.RequestException:
        return None


def agents_answer(agents: list[dict], progress: Progress) -> list[dict]:
    step = progress.add_task("Waiting for the agents to verify, install and serve digits 1.0.0", total=None)
    for agent in agents:
        wait_for(
            f"agent {agent['device_id']}",
            lambda a=agent: ((agent_health(a["port"]) or {}).get("models") or {}).get("digits"),
            agent["process"],
        )
    progress.update(step, total=1, completed=1)
    x, y = digits.golden_set()
    answers = []
    for index, agent in enumerate(agents):
        sample, label = x[index * 7], int(y[index * 7])
        answer = requests.post(
            f"http://127.0.0.1:{agent['port']}/v1/models/digits:predict",
            json={"inputs": [[sample.tolist()]]},
            timeout=10,
        ).json()
        answers.append({**answer, "device_id": agent["device_id"], "truth": label})
    return answers


def devices_online(base: str, token: str, expected: int) -> list[dict]:
    """The control plane's view (what the ingest bridge wrote): every demo device online
    and reporting digits."""

    def fetch() -> list[dict]:
        response = requests.get(
            f"{base}/api/v1/devices/?online=true&tag=demo",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        return [d for d in response.json()["results"] if d["reported_models"].get("digits")]

    deadline = time.monotonic() + 60
    while len(found := fetch()) < expected:
        if time.monotonic() > deadline:
            raise SystemExit("the control plane did not see every agent online; see var/demo/logs/ingest.log")
        time.sleep(0.5)
    return found


def report_agents(answers: list[dict], online: list[dict]) -> None:
    seen = {device["device_id"]: device for device in online}
    table = Table(title="Agents: predict on their local API, and what the control plane sees")
    for column in ("device", "version", "variant", "predicted", "true label", "latency", "control plane"):
        table.add_column(column)
    for answer in answers:
        device = seen.get(answer["device_id"], {})
        reported = device.get("reported_models", {}).get("digits", {})
        state = (
            f"online, reports {reported.get('version')} [{reported.get('variant')}]" if device else "offline"
        )
        table.add_row(
            answer["device_id"],
            answer["version"],
            answer["variant"],
            str(answer["label"]),
            str(answer["truth"]),
            f"{answer['latency_ms']:.2f} ms",
            state,
        )
    console.print(table)


# --- the rollout story: v2 promoted through its stages, v3 rolled back by the accuracy gate


def upload_version(
    session: requests.Session, api: str, version: str, models: dict[str, bytes], notes: str
) -> None:
    api_call(
        session,
        "POST",
        f"{api}/models/digits/versions/",
        201,
        data={"version": version, "notes": notes},
        files={"golden_set": ("golden.npz", digits.golden_set_npz())},
    )
    for variant, tflite in models.items():
        api_call(
            session,
            "POST",
            f"{api}/models/digits/versions/{version}/artifacts/?wait=120",
            201,
            data={"variant": variant},
            files={"file": (f"{variant}.tflite", tflite)},
        )
    api_call(session, "POST", f"{api}/models/digits/versions/{version}/release", 200)


class Apps:
    """The apps on the demo devices: predict on their agent, then post the true label."""

    def __init__(self, agents: list[dict]) -> None:
        self.agents = agents
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        x, y = digits.golden_set()
        session = requests.Session()
        index = 0
        while not self.stop.is_set():
            for agent in self.agents:
                base = f"http://127.0.0.1:{agent['port']}/v1"
                try:
                    answer = session.post(
                        f"{base}/models/digits:predict", json={"inputs": [[x[index].tolist()]]}, timeout=5
                    ).json()
                    session.post(
                        f"{base}/feedback",
                        json={"prediction_id": answer["prediction_id"], "label": int(y[index])},
                        timeout=5,
                    )
                except (requests.RequestException, KeyError):
                    pass  # an agent swapping or restarting; the next call will do
            index = (index + 1) % len(y)
            self.stop.wait(0.01)

    def __enter__(self) -> Apps:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def follow(session: requests.Session, api: str, rollout_id: int, label: str, timeout: float = 300) -> dict:
    """Print the rollout's progress as it happens, until it finishes."""
    started, last = time.monotonic(), None
    while True:
        rollout = api_call(session, "GET", f"{api}/rollouts/{rollout_id}", 200)
        counts = ", ".join(f"{n} {state}" for state, n in rollout["counts"].items() if n)
        line = (
            f"{label}: {rollout['state']}, stage {rollout['current_stage'] + 1} of {len(rollout['stages'])}"
            f" ({counts})"
        )
        if line != last:
            console.print(f"  [dim]{time.monotonic() - started:6.1f} s[/dim]  {line}")
            last = line
        if rollout["state"] in ("completed", "rolled_back", "aborted", "paused"):
            return rollout
        if time.monotonic() - started > timeout:
            raise SystemExit(f"{label} did not finish in {timeout:.0f} s; see {VAR / 'logs'}")
        time.sleep(0.5)


def rollout_story(base: str, token: str, agents: list[dict]) -> None:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    api = f"{base}/api/v1"
    console.rule("Rollouts")
    console.print(
        "Uploading digits 2.0.0 (a retrained model), 3.0.0 and 4.0.0 (two deliberately worse ones)…"
    )
    upload_version(session, api, "2.0.0", digits.build_digits_models(version="2.0.0"), "retrained, 48 units")
    upload_version(
        session, api, "3.0.0", digits.build_digits_models(quality="worse"), "trained on 30 samples"
    )
    upload_version(
        session, api, "4.0.0", digits.build_digits_models(version="4.0.0"), "trained on 50 samples"
    )
    policies = {
        "staged": {
            "stages": [{"kind": "percent", "value": v, "soak_seconds": 3} for v in (10, 50, 100)],
            "gates": {"max_install_failure_rate": 0.0},
        },
        "accuracy-canary": {
            "on_failure": "rollback",
            "stages": [
                {"kind": "percent", "value": 50, "soak_seconds": 3},
                {"kind": "percent", "value": 100},
            ],
            "gates": {
                "accuracy": {"min_samples": 100, "min_devices": 3, "max_drop_pp": 2.0, "confidence": 0.95}
            },
        },
        "shadow-first": {
            "on_failure": "rollback",
            "stages": [
                {"kind": "percent", "value": 50, "mode": "shadow", "sample_rate": 0.5, "soak_seconds": 3},
                {"kind": "percent", "value": 100},
            ],
            "gates": {
                "max_install_failure_rate": 0.0,
                "shadow": {"min_agreement": 0.9, "min_samples": 100, "min_devices": 5},
            },
        },
    }
    for name, body in policies.items():
        api_call(session, "POST", f"{api}/rollout-policies/", 201, json={"name": name, **body})
    targets = {"tags": ["demo"]}
    with Apps(agents):
        for version, policy, label in (
            ("2.0.0", "staged", "v2 canary"),
            ("3.0.0", "accuracy-canary", "v3 canary"),
            ("4.0.0", "shadow-first", "v4 in shadow"),
        ):
            rollout = api_call(
                session,
                "POST",
                f"{api}/rollouts/",
                201,
                json={"model": "digits", "version": version, "policy": policy, "targets": targets},
            )
            console.print(f"Rollout {rollout['id']}: digits {version} with policy '{policy}'")
            api_call(session, "POST", f"{api}/rollouts/{rollout['id']}/start", 200, json={"reason": "demo"})
            final = follow(session, api, rollout["id"], label)
            console.print(f"  [bold]{final['last_decision']}[/bold]")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        served = {
            a["device_id"]: ((agent_health(a["port"]) or {}).get("models") or {}).get("digits", {})
            for a in agents
        }
        if all(model.get("version") == "2.0.0" for model in served.values()):
            break
        time.sleep(0.5)
    table = Table(title="After the story: what each device serves (4.0.0 never answered a request)")
    for column in ("device", "version", "variant"):
        table.add_column(column)
    for device_id, model in sorted(served.items(), key=lambda item: int(item[0].rsplit("-", 1)[1])):
        table.add_row(device_id, model.get("version", "?"), model.get("variant", "?"))
    console.print(table)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: every process started is stopped


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    shutil.rmtree(VAR, ignore_errors=True)
    (VAR / "logs").mkdir(parents=True)
    port = free_port(int(os.environ.get("DEMO_PORT", "8000")))
    base = f"http://127.0.0.1:{port}"
    broker = start_broker(VAR / "mosquitto").provision()
    env = demo_env(port, broker)
    fresh_database(DEMO_DATABASE)
    admin_password = secrets.token_urlsafe(9)
    with (
        ExitStack() as stack,
        Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
        ) as progress,
    ):
        # Registered first, so it runs last: once every process that used it has stopped.
        stack.callback(fresh_database, DEMO_DATABASE, create=False)
        stack.callback(broker.stop)
        step = progress.add_task("Migrating the database", total=None)
        manage(env, "migrate", "--noinput")
        # "--password=…": a random password may start with "-", which argparse takes for an option
        manage(env, "ensure_user", "admin", "--role", "admin", f"--password={admin_password}")
        token = manage(env, "create_api_token", "olivia", "--role", "operator", "--name", "demo")
        progress.update(step, total=1, completed=1)

        step = progress.add_task(
            f"Starting the web app on {base}, a Celery worker and beat, the ingest bridge", total=None
        )
        web = start(
            stack, "web", env, sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"
        )
        worker = start(
            stack,
            "worker",
            env,
            sys.executable,
            "-m",
            "celery",
            "-A",
            "fleet",
            "worker",
            "-P",
            "solo",
            "-Q",
            env["CELERY_QUEUE"],
            "-n",
            f"{env['CELERY_QUEUE']}@localhost",
            "-l",
            "info",
        )
        beat = start(
            stack,
            "beat",
            env,
            sys.executable,
            "-m",
            "celery",
            "-A",
            "fleet",
            "beat",
            "-l",
            "info",
            "--schedule",
            str(VAR / "beat-schedule"),
        )
        ingest = start(
            stack,
            "ingest",
            env,
            sys.executable,
            "manage.py",
            "mqtt_ingest",
            "--client-id",
            f"demo-ingest-{os.getpid()}",
            "--stats-interval",
            "30",
        )
        wait_for("the web app", lambda: http_up(base), web)
        wait_for("the Celery worker", lambda: worker_up(env), worker)
        progress.update(step, total=1, completed=1)

        artifacts = upload_digits(base, token, progress)
        env["DEMO_VIEWER_TOKEN"] = manage(env, "create_api_token", "demo-viewer", "--role", "viewer")
        agents = start_agents(stack, env, base, progress, broker_ca_file=broker.ca_file)
        answers = agents_answer(agents, progress)
        step = progress.add_task("Waiting for the control plane to see the agents online", total=None)
        online = devices_online(base, env["DEMO_VIEWER_TOKEN"], len(agents))
        progress.update(step, total=1, completed=1)
        progress.stop()
        report(artifacts, base, admin_password, token)
        report_agents(answers, online)
        console.print(
            f"Agents connect to the broker over TLS: {broker.tls_url}, verifying its certificate "
            f"against the run's CA {broker.ca_file} (the loopback listener {broker.url} is the "
            "control plane's)."
        )
        console.print(f"Devices in the admin: {base}/admin/devices/device/")
        rollout_story(base, token, agents)
        console.print(f"Rollouts in the admin: {base}/admin/rollouts/rollout/")
        if os.environ.get("DEMO_EXIT") == "1":
            console.print("DEMO_EXIT=1: stopping.")
            return 0
        console.print("Press Ctrl-C to stop the demo.")
        try:
            while (
                web.poll() is None
                and worker.poll() is None
                and ingest.poll() is None
                and beat.poll() is None
                and all(a["process"].poll() is None for a in agents)
            ):
                time.sleep(1)
        except KeyboardInterrupt:
            console.print("Stopping…")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
