"""Agent benchmarks (agent issue, "Done when"), each figure printed beside its limit.

1. Predict latency through the local HTTP API, p50/p99, at steady state and while the
   agent swaps between digits v1 and v2 over and over (golden check included).
   Target: p99 during swaps <= 2 x steady p99, zero errors.
2. Desired state received -> new model serving, for a ~30 MB model, against the sum of
   sha256 + zstd decompression + interpreter load of the same bytes measured alone in the
   same run. Target: ratio <= 1.5.
3. RSS of a real agent process serving the digits model against a bare
   ``python -c "import ai_edge_litert.interpreter"``. Target: <= 25 MB above it, with one
   interpreter and with two (a shadow loaded beside the live model).
4. Shadow evaluation (docs/protocol.md addition 5): predict p99 with a shadow mirroring
   every request (sample rate 1.0) and one in ten (0.1), beside the steady p99 without a
   shadow measured right before; and the request path's added cost, ``offer()`` timed
   alone. Targets: p99 with shadow <= 2 x steady p99, offer() p99 <= 50 µs, zero errors.

    .venv/bin/python bench/agent_hot_swap.py [--seconds 5] [--size-mb 30]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import requests
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import protocol, runtime  # noqa: E402
from agent.config import parse_config  # noqa: E402
from agent.core import Agent  # noqa: E402
from agent.protocol.trust import build_bundle  # noqa: E402
from agent.trust import TrustStore  # noqa: E402
from agent.trustctl import make_keyring, make_root  # noqa: E402
from fleet.mqtt.broker import free_port, start_broker  # noqa: E402
from samples import digits  # noqa: E402
from tests.agent.artifact_server import ArtifactServer, make_signed_artifact  # noqa: E402
from tests.agent.conftest import desired_envelope, publish_artifact  # noqa: E402

P99_RATIO_LIMIT = 2.0
APPLY_RATIO_LIMIT = 1.5
RSS_LIMIT_MB = 25.0
SHADOW_P99_RATIO_LIMIT = 2.0
OFFER_P99_LIMIT_US = 50.0


def percentiles(samples_ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples_ms, 50)), float(np.percentile(samples_ms, 99))


def _client(address: str, sample: list[float], seconds: float, results) -> None:
    """An app on the device: a separate process calling predict back to back."""
    session = requests.Session()
    latencies, errors = [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        response = session.post(f"{address}/v1/models/digits:predict", json={"inputs": [[sample]]})
        latencies.append((time.perf_counter() - started) * 1000)
        errors += response.status_code != 200
    results.put((latencies, errors))


class Load:
    """Runs :func:`_client` in its own process, as an app on the device would be."""

    def __init__(self, address: str, sample: list[float], seconds: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.results = context.Queue()
        self.process = context.Process(target=_client, args=(address, sample, seconds, self.results))
        self.latencies_ms: list[float] = []
        self.errors = 0

    def __enter__(self) -> Load:
        self.process.start()
        return self

    def __exit__(self, *exc) -> None:
        self.latencies_ms, self.errors = self.results.get(timeout=120)
        self.process.join()


def trust_for(key) -> tuple[str, bytes]:
    """A root key of its own and the bundle whose keyring names the bench's signing key;
    returns (root public hex, bundle)."""
    root = Ed25519PrivateKey.generate()
    bundle = build_bundle(
        roots=[make_root(keys=[root])],
        keyring=make_keyring(root_keys=[root], version=1, signing_keys=[key.public_key()]),
    )
    return protocol.public_key_bytes(root.public_key()).hex(), json.dumps(bundle).encode()


def seed_trust(state_dir: Path, trust: tuple[str, bytes]) -> None:
    """The keyring an agent would fetch on first connect, in place before it starts."""
    state_dir.mkdir(parents=True, exist_ok=True)
    TrustStore(root_keys=(trust[0],), root_threshold=1, state_dir=state_dir).update(trust[1])


def make_agent(broker, trust: tuple[str, bytes], state_dir: Path, device_id: str) -> Agent:
    seed_trust(state_dir, trust)
    password = secrets.token_urlsafe(12)
    broker.admin().ensure_device(device_id, password)
    config = parse_config(
        {
            "device_id": device_id,
            "state_dir": str(state_dir),
            "telemetry_interval_s": 5,
            "broker": {"url": broker.url, "username": device_id, "password": password},
            "trust": {"root_keys": [trust[0]]},
            "local_api": {"bind": "127.0.0.1:0"},
        }
    )
    agent = Agent(config)
    agent.start()
    return agent


def bench_latency(agent: Agent, server: ArtifactServer, key, seconds: float, swap_interval_s: float) -> dict:
    x, y = digits.golden_set()
    golden = digits.golden_set_npz()
    entries = {}
    for version in ("1.0.0", "2.0.0"):
        tflite = digits.build_digits_models(version=version)["float32"]
        artifact = make_signed_artifact(
            private_key=key,
            model="digits",
            version=version,
            variant="float32",
            tflite=tflite,
            labels=digits.LABELS,
            golden_npz=golden,
            golden_accuracy=digits.evaluate(tflite, x, y),
        )
        entries[version] = publish_artifact(server, artifact)
    device = agent.config.device_id
    assert agent.apply(desired_envelope(key, device, 1, {"digits": entries["1.0.0"]})).status == "applied"
    assert agent.apply(desired_envelope(key, device, 2, {"digits": entries["2.0.0"]})).status == "applied"

    sample = x[0].tolist()
    with Load(agent.api.address, sample, seconds) as steady:
        pass
    generation = 2

    def swap_for(load_seconds: float, interval_s: float) -> tuple[Load, int]:
        """Swap v1 <-> v2 through the agent's own apply thread (as a desired state from
        MQTT goes), one swap every ``interval_s``, while an app process calls predict."""
        nonlocal generation
        swaps = 0
        with Load(agent.api.address, sample, load_seconds) as load:
            deadline = time.monotonic() + load_seconds
            while time.monotonic() < deadline:
                started = time.monotonic()
                generation += 1
                version = "1.0.0" if generation % 2 else "2.0.0"
                with agent.applied:
                    agent.submit_desired(
                        desired_envelope(key, device, generation, {"digits": entries[version]})
                    )
                    agent.applied.wait_for(
                        lambda g=generation: agent.state.applied_generation == g, timeout=30
                    )
                assert agent.last_result.status == "applied", agent.last_result
                swaps += 1
                time.sleep(max(0.0, interval_s - (time.monotonic() - started)))
        return load, swaps

    swapping, swaps = swap_for(seconds, swap_interval_s)
    stress, stress_swaps = swap_for(seconds, 0.0)
    return {
        "steady": steady,
        "swapping": swapping,
        "swaps": swaps,
        "stress": stress,
        "stress_swaps": stress_swaps,
    }


def bench_shadow(agent: Agent, server: ArtifactServer, key, seconds: float) -> dict:
    """Steady without a shadow, then with digits 3.0.0 (a model that disagrees often) in
    shadow at sample rate 1.0 and 0.1; the request path's own cost timed alone at the end."""
    from agent.localapi import as_inputs
    from agent.serving import Prediction
    from agent.telemetry import ShadowOutcome

    x, y = digits.golden_set()
    device = agent.config.device_id
    entries = {}
    for version, quality in (("1.0.0", "good"), ("3.0.0", "worse")):
        tflite = digits.build_digits_models(quality=quality)["float32"]
        artifact = make_signed_artifact(
            private_key=key,
            model="digits",
            version=version,
            variant="float32",
            tflite=tflite,
            labels=digits.LABELS,
            golden_npz=digits.golden_set_npz(),
            golden_accuracy=digits.evaluate(tflite, x, y),
        )
        entries[version] = publish_artifact(server, artifact)
    outcomes: dict[str, int] = {}
    record = agent.window.record_shadow

    def counting(*args, outcome: ShadowOutcome, **kwargs) -> None:
        outcomes[outcome.value] = outcomes.get(outcome.value, 0) + 1
        record(*args, outcome=outcome, **kwargs)

    agent.window.record_shadow = counting  # count outcomes before the telemetry loop takes them

    def apply(models: dict) -> None:
        generation = agent.state.applied_generation + 1
        result = agent.apply(desired_envelope(key, device, generation, models))
        assert result.status == "applied", result

    sample = x[0].tolist()
    apply({"digits": entries["1.0.0"]})
    with Load(agent.api.address, sample, seconds) as off:
        pass
    phases = {"off": (off, {})}
    for rate in (1.0, 0.1):
        apply({"digits": {**entries["1.0.0"], "shadow": {**entries["3.0.0"], "sample_rate": rate}}})
        assert agent.shadows.get("digits") is not None, "the shadow did not load"
        outcomes.clear()
        with Load(agent.api.address, sample, seconds) as load:
            pass
        agent.shadows.drain(timeout=30)
        phases[f"rate {rate:g}"] = (load, dict(outcomes))

    # The request path's share, alone: one offer() per answered request, as predict does
    # it, at sample rate 1.0 with the worker running (so the queue is sometimes full).
    apply({"digits": {**entries["1.0.0"], "shadow": {**entries["3.0.0"], "sample_rate": 1.0}}})
    live = agent.models.get("digits").live
    raw = [[sample]]
    prediction = Prediction(
        live.predict(as_inputs(raw, live.input_details())), live.version, live.variant, 0.0, live.details[1]
    )
    offer_us = []
    for _ in range(20_000):
        started = time.perf_counter_ns()
        agent.shadows.offer("digits", raw, prediction)
        offer_us.append((time.perf_counter_ns() - started) / 1000)
    agent.shadows.drain(timeout=30)
    agent.window.record_shadow = record
    apply({"digits": entries["1.0.0"]})  # shadow off again
    return {"phases": phases, "offer_us": offer_us}


def bench_apply(
    agent: Agent, server: ArtifactServer, key, size_mb: float, work: Path, repeats: int = 3
) -> dict:
    """Best of ``repeats`` for both sides; each repeat is a new model (another seed)."""
    apply_runs, alone_runs = [], []
    for seed in range(repeats):
        raw = digits.build_large_model(size_mb, seed=seed)
        artifact = make_signed_artifact(
            private_key=key,
            model="large",
            version=f"1.0.{seed}",
            variant="float32",
            tflite=raw,
            labels=digits.LABELS,
            zstd_level=19,
        )
        entry = publish_artifact(server, artifact)
        generation = agent.state.applied_generation + 1
        result = agent.apply(desired_envelope(key, agent.config.device_id, generation, {"large": entry}))
        assert result.status == "applied", result
        # Measured by the agent: from entering apply to the swap (the "active" event says it too).
        apply_runs.append(agent.last_serving_ms / 1000)

        # The same bytes, the unavoidable work alone: sha256 of the blob, zstd
        # decompression, interpreter load (from a file, as the agent does).
        path = work / f"alone-{seed}.tflite"
        started = time.perf_counter()
        hashlib.sha256(artifact.blob).hexdigest()
        path.write_bytes(zstandard.ZstdDecompressor().decompress(artifact.blob))
        runtime.load(path)
        alone_runs.append(time.perf_counter() - started)
    return {
        "apply_s": min(apply_runs),
        "alone_s": min(alone_runs),
        "raw_mb": len(raw) / 2**20,
        "blob_mb": len(artifact.blob) / 2**20,
    }


def bench_rss(broker, key, trust: tuple[str, bytes], server: ArtifactServer, work: Path) -> dict:
    bare = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ai_edge_litert.interpreter, psutil; print(psutil.Process().memory_info().rss)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    bare_mb = int(bare.stdout) / 2**20
    device_id = f"rss-{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(12)
    broker.admin().ensure_device(device_id, password)
    port = free_port()
    config = work / "agent.toml"
    seed_trust(work / "rss-state", trust)
    config.write_text(
        f'device_id = "{device_id}"\nstate_dir = "{work / "rss-state"}"\n'
        f'[broker]\nurl = "{broker.url}"\nusername = "{device_id}"\npassword = "{password}"\n'
        f'[trust]\nroot_keys = ["{trust[0]}"]\n[local_api]\nbind = "127.0.0.1:{port}"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        tflite = digits.build_digits_models()["int8"]
        x, y = digits.golden_set()
        artifact = make_signed_artifact(
            private_key=key,
            model="digits",
            version="1.0.0",
            variant="int8",
            tflite=tflite,
            labels=digits.LABELS,
            golden_npz=digits.golden_set_npz(),
            golden_accuracy=digits.evaluate(tflite, x, y),
        )
        envelope = desired_envelope(key, device_id, 1, {"digits": publish_artifact(server, artifact)})
        from fleet.mqtt.broker import mqtt_client

        publisher = mqtt_client(broker.url, username="fleet-publisher", password=broker.publisher_password)
        publisher.publish(
            f"fleet/v1/devices/{device_id}/desired", envelope, qos=1, retain=True
        ).wait_for_publish()
        deadline = time.monotonic() + 60
        while True:
            try:
                health = requests.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).json()
                if health["models"].get("digits"):
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("agent process did not start serving")
            time.sleep(0.1)
        for _ in range(200):
            requests.post(
                f"http://127.0.0.1:{port}/v1/models/digits:predict", json={"inputs": [[x[0].tolist()]]}
            )
        agent_mb = psutil.Process(process.pid).memory_info().rss / 2**20

        # Two interpreters: digits 3.0.0 int8 in shadow on every request beside the live 1.0.0.
        worse = digits.build_digits_models(quality="worse")["int8"]
        shadow = make_signed_artifact(
            private_key=key,
            model="digits",
            version="3.0.0",
            variant="int8",
            tflite=worse,
            labels=digits.LABELS,
            golden_npz=digits.golden_set_npz(),
            golden_accuracy=digits.evaluate(worse, x, y),
        )
        live_entry = publish_artifact(server, artifact)
        shadow_entry = {**publish_artifact(server, shadow), "sample_rate": 1.0}
        envelope = desired_envelope(key, device_id, 2, {"digits": {**live_entry, "shadow": shadow_entry}})
        publisher.publish(
            f"fleet/v1/devices/{device_id}/desired", envelope, qos=1, retain=True
        ).wait_for_publish()
        deadline = time.monotonic() + 60
        while (
            "shadow"
            not in requests.get(f"http://127.0.0.1:{port}/v1/health", timeout=5).json()["models"]["digits"]
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("agent process did not load the shadow")
            time.sleep(0.1)
        for _ in range(200):
            requests.post(
                f"http://127.0.0.1:{port}/v1/models/digits:predict", json={"inputs": [[x[0].tolist()]]}
            )
        shadow_mb = psutil.Process(process.pid).memory_info().rss / 2**20
        publisher.disconnect()
    finally:
        process.terminate()
        process.wait(timeout=30)
    return {"bare_mb": bare_mb, "agent_mb": agent_mb, "shadow_mb": shadow_mb}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per latency phase (default 5)")
    parser.add_argument("--size-mb", type=float, default=30.0, help="large model size in MiB (default 30)")
    parser.add_argument(
        "--swap-interval-ms",
        type=float,
        default=100.0,
        help="time between swaps in the measured phase (default 100 ms: 10 swaps a second)",
    )
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    key = Ed25519PrivateKey.generate()
    trust = trust_for(key)
    with tempfile.TemporaryDirectory(prefix="modelfleet-agent-bench-") as tmp:
        work = Path(tmp)
        broker = start_broker(work / "broker").provision()
        try:
            with ArtifactServer() as server:
                agent = make_agent(broker, trust, work / "state", "bench-agent")
                try:
                    console.print(f"Predict latency: {args.seconds:g} s each steady, swapping, and stress…")
                    latency = bench_latency(agent, server, key, args.seconds, args.swap_interval_ms / 1000)
                    console.print(f"Shadow evaluation: {args.seconds:g} s each off, rate 1.0, rate 0.1…")
                    shadow = bench_shadow(agent, server, key, args.seconds)
                    console.print(f"Desired state to serving, {args.size_mb:g} MiB model…")
                    apply = bench_apply(agent, server, key, args.size_mb, work)
                finally:
                    agent.stop()
                console.print("RSS of an agent process serving digits…")
                rss = bench_rss(broker, key, trust, server, work)
        finally:
            broker.stop()

    steady_p50, steady_p99 = percentiles(latency["steady"].latencies_ms)
    swap_p50, swap_p99 = percentiles(latency["swapping"].latencies_ms)
    stress_p50, stress_p99 = percentiles(latency["stress"].latencies_ms)
    errors = latency["steady"].errors + latency["swapping"].errors + latency["stress"].errors
    p99_ratio = swap_p99 / steady_p99
    apply_ratio = apply["apply_s"] / apply["alone_s"]
    rss_extra = rss["agent_mb"] - rss["bare_mb"]
    rss_shadow_extra = rss["shadow_mb"] - rss["bare_mb"]
    _off_p50, off_p99 = percentiles(shadow["phases"]["off"][0].latencies_ms)
    shadow_ratios = {
        name: percentiles(load.latencies_ms)[1] / off_p99
        for name, (load, _outcomes) in shadow["phases"].items()
        if name != "off"
    }
    shadow_errors = sum(load.errors for load, _outcomes in shadow["phases"].values())
    offer_p50_us, offer_p99_us = percentiles(shadow["offer_us"])

    table = Table(title="Agent benchmarks")
    for column in ("measure", "value", "limit", "verdict"):
        table.add_column(column)

    def verdict(ok: bool) -> str:
        return "[green]PASS[/green]" if ok else "[red]FAIL[/red]"

    table.add_row(
        "predict steady p50 / p99",
        f"{steady_p50:.3f} / {steady_p99:.3f} ms ({len(latency['steady'].latencies_ms)} calls)",
        "",
        "",
    )
    table.add_row(
        f"predict during {latency['swaps']} swaps (one per {args.swap_interval_ms:g} ms) p50 / p99",
        f"{swap_p50:.3f} / {swap_p99:.3f} ms ({len(latency['swapping'].latencies_ms)} calls)",
        "",
        "",
    )
    table.add_row(
        "p99 swapping / steady",
        f"{p99_ratio:.2f}",
        f"<= {P99_RATIO_LIMIT}",
        verdict(p99_ratio <= P99_RATIO_LIMIT),
    )
    table.add_row("predict errors", str(errors), "0", verdict(errors == 0))
    table.add_row(
        f"stress, for information: {latency['stress_swaps']} swaps back to back, p50 / p99",
        f"{stress_p50:.3f} / {stress_p99:.3f} ms ({stress_p99 / steady_p99:.2f}x steady p99)",
        "",
        "",
    )
    table.add_row(
        f"desired -> serving, {apply['raw_mb']:.0f} MiB (blob {apply['blob_mb']:.0f} MiB)",
        f"{apply['apply_s'] * 1000:.0f} ms",
        "",
        "",
    )
    table.add_row(
        "sha256 + zstd -d + load alone (best of 3 each)", f"{apply['alone_s'] * 1000:.0f} ms", "", ""
    )
    table.add_row(
        "ratio", f"{apply_ratio:.2f}", f"<= {APPLY_RATIO_LIMIT}", verdict(apply_ratio <= APPLY_RATIO_LIMIT)
    )
    table.add_row("RSS bare `import ai_edge_litert.interpreter`", f"{rss['bare_mb']:.1f} MB", "", "")
    table.add_row("RSS agent serving digits", f"{rss['agent_mb']:.1f} MB", "", "")
    table.add_row(
        "RSS above bare", f"{rss_extra:.1f} MB", f"<= {RSS_LIMIT_MB:g} MB", verdict(rss_extra <= RSS_LIMIT_MB)
    )
    table.add_row("RSS agent with a shadow (two interpreters)", f"{rss['shadow_mb']:.1f} MB", "", "")
    table.add_row(
        "RSS above bare, with a shadow",
        f"{rss_shadow_extra:.1f} MB",
        f"<= {RSS_LIMIT_MB:g} MB",
        verdict(rss_shadow_extra <= RSS_LIMIT_MB),
    )
    for name, (load, outcomes) in shadow["phases"].items():
        p50, p99 = percentiles(load.latencies_ms)
        resolved = ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
        table.add_row(
            f"predict p50 / p99, shadow {name}",
            f"{p50:.3f} / {p99:.3f} ms ({len(load.latencies_ms)} calls{'; ' + resolved if resolved else ''})",
            "",
            "",
        )
    for name, ratio in shadow_ratios.items():
        table.add_row(
            f"p99 shadow {name} / shadow off",
            f"{ratio:.2f}",
            f"<= {SHADOW_P99_RATIO_LIMIT}",
            verdict(ratio <= SHADOW_P99_RATIO_LIMIT),
        )
    table.add_row("predict errors with shadow", str(shadow_errors), "0", verdict(shadow_errors == 0))
    table.add_row(
        "request path's added cost: offer() p50 / p99 (20,000 calls, rate 1.0)",
        f"{offer_p50_us:.1f} / {offer_p99_us:.1f} µs",
        f"p99 <= {OFFER_P99_LIMIT_US:g} µs",
        verdict(offer_p99_us <= OFFER_P99_LIMIT_US),
    )
    console.print(table)
    ok = (
        p99_ratio <= P99_RATIO_LIMIT
        and errors == 0
        and apply_ratio <= APPLY_RATIO_LIMIT
        and rss_extra <= RSS_LIMIT_MB
        and rss_shadow_extra <= RSS_LIMIT_MB
        and all(ratio <= SHADOW_P99_RATIO_LIMIT for ratio in shadow_ratios.values())
        and shadow_errors == 0
        and offer_p99_us <= OFFER_P99_LIMIT_US
    )
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
