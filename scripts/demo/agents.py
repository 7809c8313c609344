"""Step: twelve real agent processes enroll, install digits 1.0.0 and answer predict."""

from __future__ import annotations

import subprocess
import sys
import time

import requests
from rich.table import Table

from fleet.mqtt.broker import free_port as any_free_port
from samples import digits

from .common import ROOT, VAR, Demo, agent_health, console, manage, start, wait_for

# Twelve devices, ten of them int8: the gates count devices, not labels, compare each variant
# with itself and set one device aside each way, so a canary needs at least four devices of
# a variant on each side (six canaries always hold four int8 ones, and leave four behind).
DEMO_AGENTS = tuple((f"demo-cam-{n}", "float32" if n in (3, 7) else "int8") for n in range(1, 13))
HARDWARE = "demo-box"
# Every demo device has the tag "demo" (the rollouts' target); the real agents have
# "demo-agent" too, the simulated ones "demo-sim".
AGENT_TAGS = ("demo", "demo-agent")


def trust_root(demo: Demo) -> None:
    """Make the fleet's root of trust and the signing key it signs. In production the root
    key lives on an offline machine (docs/security.md, "Keys and rotation"); the demo keeps
    one under var/demo. Agents pin only the root key and learn the signing key from the
    keyring it signs."""
    demo.root_key_hex = manage(
        demo.env, "trust", "dev-bootstrap", "--root-key", str(VAR / "offline-root" / "root.pem")
    ).split()[-1]
    console.print(
        f"Agents pin only the fleet's root key {demo.root_key_hex[:16]}…; they learn the signing key "
        "from the keyring it signs, retained on fleet/v1/trust (docs/security.md, 'Keys and rotation')."
    )


def enroll_and_start(demo: Demo) -> None:
    """Real agent processes, each enrolled through the real enrollment API with
    `fleet-agent enroll`, which writes its config (broker login over mqtts:// with the
    run's CA pinned, device token); then digits 1.0.0 is published to them."""
    env = demo.env
    with demo.task(f"Enrolling {len(DEMO_AGENTS)} agents and publishing their desired state"):
        tags = [arg for tag in AGENT_TAGS for arg in ("--tag", tag)]
        enrollment_token = manage(
            env, "create_enrollment_token", "demo devices", "--auto-approve", "--max-uses", "12", *tags
        )
        for device_id, variant in DEMO_AGENTS:
            home = VAR / "agents" / device_id
            port = any_free_port()
            config = home / "agent.toml"
            enroll = [
                *(sys.executable, "-m", "agent.cli", "enroll", "--url", demo.base, "--device-id", device_id),
                *("--token", enrollment_token, "--config-out", str(config)),
                *("--state-dir", str(home / "state"), "--local-api", f"127.0.0.1:{port}"),
                *("--telemetry-interval", "2", "--hardware", HARDWARE, "--root-key", demo.root_key_hex),
                *("--broker-ca-file", str(demo.broker.ca_file)),
                *([] if variant == "int8" else ["--no-int8"]),
            ]
            result = subprocess.run(enroll, cwd=ROOT, env=env, capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(f"fleet-agent enroll failed for {device_id}: {result.stderr}")
            process = start(
                demo.stack,
                f"agent-{device_id}",
                env,
                *(sys.executable, "-m", "agent.cli", "run", "--config", str(config)),
            )
            demo.agents.append({"device_id": device_id, "variant": variant, "port": port, "process": process})
        for variant in sorted({variant for _, variant in DEMO_AGENTS}):
            devices = [device_id for device_id, v in DEMO_AGENTS if v == variant]
            manage(
                env,
                "publish_desired",
                *devices,
                *("--model", "digits", "--model-version", "1.0.0", "--variant", variant),
            )


def agents_answer(demo: Demo) -> list[dict]:
    with demo.task("Waiting for the agents to verify, install and serve digits 1.0.0"):
        for agent in demo.agents:
            wait_for(
                f"agent {agent['device_id']}",
                lambda a=agent: ((agent_health(a["port"]) or {}).get("models") or {}).get("digits"),
                agent["process"],
            )
    x, y = digits.golden_set()
    answers = []
    for index, agent in enumerate(demo.agents):
        sample, label = x[index * 7], int(y[index * 7])
        answer = requests.post(
            f"http://127.0.0.1:{agent['port']}/v1/models/digits:predict",
            json={"inputs": [[sample.tolist()]]},
            timeout=10,
        ).json()
        answers.append({**answer, "device_id": agent["device_id"], "truth": label})
    return answers


def devices_online(demo: Demo, expected: int) -> list[dict]:
    """The control plane's view (what the ingest bridge wrote): every demo agent online
    and reporting digits."""

    def fetch() -> list[dict]:
        response = requests.get(
            f"{demo.api}/devices/?online=true&tag=demo-agent",
            headers={"Authorization": f"Bearer {demo.viewer_token}"},
            timeout=10,
        )
        return [d for d in response.json()["results"] if d["reported_models"].get("digits")]

    deadline = time.monotonic() + 60
    while len(found := fetch()) < expected:
        if time.monotonic() > deadline:
            raise SystemExit(
                f"the control plane did not see every agent online; see {VAR / 'logs' / 'ingest.log'}"
            )
        time.sleep(0.5)
    return found


def start_agents(demo: Demo) -> None:
    """Start twelve real agents (ten int8, two float32): they enroll through the enrollment
    API, connect to the broker over TLS, verify and install digits 1.0.0, answer predict on
    their local API, and the control plane sees them online through the ingest bridge."""
    demo.viewer_token = manage(demo.env, "create_api_token", "demo-viewer", "--role", "viewer")
    trust_root(demo)
    enroll_and_start(demo)
    answers = agents_answer(demo)
    with demo.task("Waiting for the control plane to see the agents online"):
        online = devices_online(demo, len(demo.agents))
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
    broker = demo.broker
    console.print(
        f"Agents connect to the broker over TLS: {broker.tls_url}, verifying its certificate "
        f"against the run's CA {broker.ca_file} (the loopback listener {broker.url} is the "
        "control plane's)."
    )
    console.print(f"Devices in the admin: {demo.base}/admin/devices/device/")
