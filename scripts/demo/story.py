"""Steps of the rollout story: v2 promoted through its stages, v3 rolled back by the accuracy
gate, v4 stopped in shadow before it answers a single request."""

from __future__ import annotations

import threading
import time

import requests
from rich.table import Table

from samples import digits

from .common import VAR, Demo, agent_health, api_call, console
from .registry import upload_version

POLICIES = {
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
        "gates": {"accuracy": {"min_samples": 100, "min_devices": 3, "max_drop_pp": 2.0, "confidence": 0.95}},
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


def upload_versions(demo: Demo) -> None:
    """Upload digits 2.0.0 (1.0.0's classifier head retrained on new data), 3.0.0 and 4.0.0
    (two deliberately worse ones), create the three rollout policies, and start the devices'
    apps, which predict and post the true label (the accuracy gate's evidence)."""
    console.rule("Rollouts")
    console.print(
        "Uploading digits 2.0.0 (1.0.0 with its head retrained on new data), "
        "3.0.0 and 4.0.0 (two deliberately worse ones)…"
    )
    session, api = demo.session, demo.api
    upload_version(
        session, api, "2.0.0", digits.build_head_retrained_models(), "1.0.0's head retrained", demo
    )
    show_deltas(demo, "2.0.0")
    upload_version(
        session, api, "3.0.0", digits.build_digits_models(quality="worse"), "trained on 30 samples", demo
    )
    upload_version(
        session, api, "4.0.0", digits.build_digits_models(version="4.0.0"), "trained on 50 samples", demo
    )
    for name, body in POLICIES.items():
        api_call(session, "POST", f"{api}/rollout-policies/", 201, json={"name": name, **body})
    demo.stack.enter_context(Apps(demo.agents))


def show_deltas(demo: Demo, version: str, timeout: float = 60) -> None:
    """Wait for the worker to make the deltas to ``version`` from the released versions
    before it (docs/protocol.md, addition 11) and show them beside the full blobs."""
    with demo.task(f"Making tensor-level deltas to {version} from the released versions"):
        deadline = time.monotonic() + timeout
        while True:
            found = api_call(demo.session, "GET", f"{demo.api}/models/digits/versions/{version}/", 200)
            artifacts = [a for a in found["artifacts"] if a["status"] == "ready"]
            if all(a["deltas"] for a in artifacts) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    table = Table(title=f"digits {version}: what a device running an earlier version downloads")
    for column in ("variant", "full blob", "from", "delta", "decision"):
        table.add_column(column, justify="right" if column in ("full blob", "delta") else "left")
    for artifact in artifacts:
        for delta in artifact["deltas"] or [None]:
            table.add_row(
                artifact["variant"],
                f"{artifact['blob_size']:,} B",
                delta["base_version"] if delta else "—",
                f"{delta['blob_size']:,} B" if delta and delta["blob_size"] else "—",
                delta["reason"] if delta else "no delta made yet: devices get the full blob",
            )
    console.print(table)


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


def roll_out(demo: Demo, version: str, policy: str, label: str, tags: list[str]) -> dict:
    rollout = api_call(
        demo.session,
        "POST",
        f"{demo.api}/rollouts/",
        201,
        json={"model": "digits", "version": version, "policy": policy, "targets": {"tags": tags}},
    )
    console.print(f"Rollout {rollout['id']}: digits {version} with policy '{policy}'")
    api_call(demo.session, "POST", f"{demo.api}/rollouts/{rollout['id']}/start", 200, json={"reason": "demo"})
    final = follow(demo.session, demo.api, rollout["id"], label)
    console.print(f"  [bold]{final['last_decision']}[/bold]")
    if final["delivery"]["summary"]:
        console.print(f"  Delivery: {final['delivery']['summary']}")
    return final


def rollout_v2(demo: Demo) -> None:
    """Roll digits 2.0.0 out to every demo device in stages (10 %, 50 %, 100 %, three
    seconds' soak each, no install may fail); it completes."""
    roll_out(demo, "2.0.0", "staged", "v2 canary", ["demo"])


def rollout_v3(demo: Demo) -> None:
    """Roll the worse digits 3.0.0 out as a canary to half the devices; the accuracy gate
    compares the labels the apps post with those of 2.0.0 and rolls it back."""
    roll_out(demo, "3.0.0", "accuracy-canary", "v3 canary", ["demo"])


def rollout_v4(demo: Demo) -> None:
    """Run digits 4.0.0 in shadow beside 2.0.0 on half the real agents; the agreement gate
    stops it before it answers a single request. Simulated devices do not run shadows, so
    this rollout targets the real agents only."""
    roll_out(demo, "4.0.0", "shadow-first", "v4 in shadow", ["demo-agent"])


def what_devices_serve(demo: Demo) -> None:
    """Show what each real agent serves after the story: 2.0.0 everywhere."""
    deadline = time.monotonic() + 60
    while True:
        served = {
            a["device_id"]: ((agent_health(a["port"]) or {}).get("models") or {}).get("digits", {})
            for a in demo.agents
        }
        if all(model.get("version") == "2.0.0" for model in served.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    table = Table(title="After the story: what each device serves (4.0.0 never answered a request)")
    for column in ("device", "version", "variant"):
        table.add_column(column)
    for device_id, model in sorted(served.items(), key=lambda item: int(item[0].rsplit("-", 1)[1])):
        table.add_row(device_id, model.get("version", "?"), model.get("variant", "?"))
    console.print(table)
    console.print(f"Rollouts in the admin: {demo.base}/admin/rollouts/rollout/")
