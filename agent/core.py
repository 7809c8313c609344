"""The agent: apply loop, serving, telemetry (ARCHITECTURE.md, "The agent on a device").

An ``Agent`` owns everything it uses (store, slots, MQTT client, HTTP session, threads):
no module-level state, so a fleet simulator can run hundreds in one process.

Apply loop for one desired-state envelope: verify the DSSE signature and payload type;
check device id, generation (must exceed the applied one) and expiry; for each model whose
version or variant differs: fetch and verify the manifest and its pinned sha256, check the
size limits and that the variant fits this device, download the blob (resumable, capped),
verify its sha256, stream-decompress with an output cap, verify the raw sha256, store it
crash-safely, load the candidate beside the live interpreter, smoke-run it and run the
golden set, swap, persist the state, and report. Every refusal publishes an event with a
reason code and leaves the old model serving.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import mmap
import os
import random
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import urllib3

from agent import __version__, protocol, runtime
from agent.apply import (
    MANIFEST_MAX_BYTES,
    DeltaUnusable,
    Refusal,
    check_fits,
    check_freshness,
    event_message,
    reported_message,
    verify_delta_manifest,
    verify_desired,
    verify_manifest,
)
from agent.config import Config
from agent.download import (
    GOLDEN_MAX_FILE_BYTES,
    Downloader,
    StreamingUnpacker,
    TransferError,
    decompress_blob,
    read_golden_set,
)
from agent.localapi import LocalApi, as_inputs
from agent.metrics import AgentMetrics
from agent.mqtt import MqttLink
from agent.protocol.codes import DeliveryPath, DeltaFallback, EventType, Reason
from agent.protocol.delta import DeltaError, apply_delta
from agent.serving import LoadedModel, Models
from agent.shadow import Shadow, ShadowRunner
from agent.store import Installed, ModelState, Store, atomic_write
from agent.telemetry import TelemetryWindow, health_snapshot, telemetry_message
from agent.trust import TrustStore

log = logging.getLogger(__name__)
# Where a crash-consistency test may ask the agent to SIGKILL itself (FLEET_AGENT_CRASH_AT).
SWITCH_INTERVAL_S = 0.001
APPLY_NICENESS = 10
CRASH_POINTS = (
    "after_download",
    "during_rebuild",
    "after_install",
    "before_swap",
    "after_swap",
    "after_state",
)


@dataclass
class ApplyResult:
    status: str  # applied | unchanged | refused
    generation: int | None = None
    reason: Reason | None = None
    message: str = ""
    permanent: bool = True


def _mapped(path) -> mmap.mmap:
    """A file's bytes, read-only and mapped, not copied into the agent's heap. The mapping
    is released with its last reference (never closed while a view, or a traceback, may
    still point into it). A rebuild still allocates up to about three times the target's
    size (docs/protocol.md, addition 9)."""
    with open(path, "rb") as handle:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


class Agent:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.state_dir)
        self.state = self.store.load_state()
        self.models = Models()
        self.window = TelemetryWindow()
        self.shadows = ShadowRunner(
            window=self.window,
            queue_samples=config.limits.shadow_queue_samples,
            prepare=as_inputs,
            name=f"shadow-{config.device_id}",
        )
        self.trust = TrustStore(
            root_keys=config.trust.root_keys,
            root_threshold=config.trust.root_threshold,
            state_dir=config.state_dir,
        )
        headers = {"User-Agent": f"fleet-agent/{__version__}"}
        if config.control_plane.token:
            headers["Authorization"] = f"Bearer {config.control_plane.token}"
        # urllib3 verifies an https server's certificate and host name: against the pinned
        # CA when there is one, the system's CAs otherwise (docs/security.md, "TLS").
        ca_file = config.control_plane.ca_file
        self.http = urllib3.PoolManager(
            headers=headers, maxsize=2, **({"ca_certs": str(ca_file)} if ca_file else {})
        )
        self._stop = threading.Event()
        limits = config.limits
        self.downloader = Downloader(
            http=self.http,
            timeout_s=limits.download_timeout_s,
            attempts=limits.download_attempts,
            backoff_initial_s=limits.backoff_initial_s,
            backoff_max_s=limits.backoff_max_s,
            stop=self._stop,
        )
        self.link = MqttLink(config, on_desired=self.submit_desired, on_trust=self.submit_trust)
        self.api: LocalApi | None = None
        self.labels: dict[str, list[str]] = {}
        self._pending: bytes | None = None
        self._last_desired: bytes | None = None  # re-checked when the keyring changes
        self._pending_cond = threading.Condition()
        self._apply_lock = threading.Lock()  # one apply at a time (loop or direct call)
        self.applied = threading.Condition()  # notified after every apply, for waiters
        self._refused: set[int] = set()  # generations refused for good: no retry on redelivery
        self._predictions: collections.OrderedDict[str, tuple[str, str, str, int | None]] = (
            collections.OrderedDict()
        )
        self._predictions_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.last_result: ApplyResult | None = None
        self._apply_started = 0.0
        self.last_serving_ms: float | None = None
        self.started_at = time.monotonic()
        self._process = psutil.Process()
        self.metrics = AgentMetrics(
            download_bytes=lambda: self.downloader.bytes_received,
            download_resumes=lambda: self.downloader.resumes,
            rss_bytes=lambda: self._process.memory_info().rss,
        )
        self.crash_at = os.environ.get("FLEET_AGENT_CRASH_AT", "")

    # --- lifecycle

    def load_from_disk(self) -> None:
        """Serve what the state file names, before touching the network. If the active
        model cannot load (a corrupt disk), fall back to the previous one."""
        for name, entry in self.state.models.items():
            for installed in (entry.active, entry.previous):
                if installed is None or not self.store.is_complete(name, installed):
                    continue
                try:
                    model = LoadedModel.load(
                        name, installed.version, installed.variant, self.store.model_path(name, installed)
                    )
                except runtime.RuntimeLoadError as exc:
                    log.error("cannot load %s %s from disk: %s", name, installed.key, exc)
                    continue
                self.models.swap(model)
                self._remember_labels(name, installed)
                if installed != entry.active:
                    log.warning("serving previous version %s of %s", installed.key, name)
                    self.state.models[name] = dataclasses.replace(entry, active=installed, previous=None)
                break
            self._load_shadow_from_disk(name)

    def _load_shadow_from_disk(self, name: str) -> None:
        """Resume the shadow the state file names: the desired state that asked for it is
        applied already, so its retained copy will not ask again."""
        entry = self.state.models[name]
        if entry.shadow is None:
            return
        try:
            if not self.store.is_complete(name, entry.shadow):
                raise runtime.RuntimeLoadError("its files are incomplete")
            model = LoadedModel.load(
                name, entry.shadow.version, entry.shadow.variant, self.store.model_path(name, entry.shadow)
            )
        except runtime.RuntimeLoadError as exc:
            log.error("cannot resume shadow %s %s from disk: %s", name, entry.shadow.key, exc)
            self.state.models[name] = dataclasses.replace(entry, shadow=None, shadow_sample_rate=None)
            return
        self.shadows.install(Shadow(model, entry.shadow_sample_rate or 1.0))

    def start(self) -> None:
        # Serving threads wait for the GIL while an update loads and checks a candidate;
        # a 1 ms switch interval (default 5 ms) bounds that wait. Process-wide, and the same
        # value for every agent, so many agents in one process agree on it.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.load_from_disk()
        self.api = LocalApi(self)
        self.api.start()
        self.link.start()
        self._publish_reported()
        for target, name in ((self._apply_loop, "apply"), (self._telemetry_loop, "telemetry")):
            thread = threading.Thread(target=target, name=f"{name}-{self.config.device_id}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Graceful stop: no new requests, in-flight ones finish, last telemetry window
        flushed, offline status published, MQTT disconnected."""
        self._stop.set()
        with self._pending_cond:
            self._pending_cond.notify_all()
        if self.api is not None:
            self.api.stop()  # new requests now get 503; running ones finish below
        for model in self.models.live().values():
            model.wait_drained(self.config.limits.drain_timeout_s)
        for thread in self._threads:
            thread.join(timeout=self.config.limits.drain_timeout_s)
        self.shadows.stop(timeout=self.config.limits.drain_timeout_s)
        self._publish_telemetry()
        self.link.stop()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def alive(self) -> bool:
        """For the systemd watchdog: the apply, telemetry and MQTT threads all run."""
        return all(thread.is_alive() for thread in self._threads) and self.link.alive()

    def run_forever(self) -> None:
        """Foreground service for systemd (Type=notify, watchdog); returns after SIGTERM."""
        import sdnotify

        notifier = sdnotify.SystemdNotifier()
        stop_requested = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop_requested.set())
        self.start()
        notifier.notify(f"READY=1\nSTATUS=serving {', '.join(self.models.live()) or 'no model yet'}")
        log.info(
            "agent %s ready; local API at %s", self.config.device_id, self.api.address if self.api else "-"
        )
        watchdog_s = int(os.environ.get("WATCHDOG_USEC", "0")) / 2e6 or 10.0
        while not stop_requested.wait(watchdog_s):
            if self.alive():
                notifier.notify("WATCHDOG=1")
        notifier.notify("STOPPING=1")
        self.stop()

    def _crash_point(self, name: str) -> None:
        if self.crash_at == name:
            log.warning("crash point %s reached: killing myself (test hook)", name)
            os.kill(os.getpid(), signal.SIGKILL)

    # --- reporting

    def _event(
        self,
        kind: EventType,
        *,
        generation: int | None = None,
        model: str | None = None,
        version: str | None = None,
        variant: str | None = None,
        reason: Reason | None = None,
        message: str | None = None,
        delivery: dict[str, Any] | None = None,
    ) -> None:
        if reason:
            self.metrics.refusals.labels(reason, kind).inc()
            log.warning(
                "event %s reason=%s generation=%s model=%s: %s", kind, reason, generation, model, message
            )
        else:
            log.info("event %s generation=%s model=%s %s", kind, generation, model, version or "")
        self.link.publish(
            "events",
            event_message(
                kind,
                generation=generation,
                model=model,
                version=version,
                variant=variant,
                reason=reason,
                message=message,
                delivery=delivery,
            ),
        )

    def _versions(self, name: str, version: str, variant: str) -> dict[str, Any]:
        """A model's version and variant, with its shadow's while one is loaded (addition 5)."""
        entry: dict[str, Any] = {"version": version, "variant": variant}
        shadow = self.shadows.get(name)
        if shadow is not None:
            entry["shadow"] = {"version": shadow.model.version, "variant": shadow.model.variant}
        return entry

    def reported(self) -> dict[str, Any]:
        return reported_message(
            generation=self.state.applied_generation,
            models={
                name: self._versions(name, entry.active.version, entry.active.variant)
                for name, entry in self.state.models.items()
                if entry.active is not None
            },
            trust_versions=self.trust.versions(),
        )

    def _publish_reported(self) -> None:
        self.link.publish("reported", self.reported(), retain=True)

    def _publish_telemetry(self) -> None:
        message = telemetry_message(
            models=self.window.take(loaded=self.shadows.telemetry_loaded(self.models.live())),
            window_s=self.config.telemetry_interval_s,
            health=health_snapshot(
                state_dir=self.config.state_dir, started_at=self.started_at, process=self._process
            ),
            dropped=self.link.dropped,
        )
        self.link.publish("telemetry", message)

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.config.telemetry_interval_s):
            try:
                self._publish_telemetry()
            except Exception:
                log.exception("telemetry window failed")

    def health(self) -> dict[str, Any]:
        rt = runtime.runtime()
        return {
            "status": "ok" if self.models.live() else "no_model",
            "device_id": self.config.device_id,
            "agent_version": __version__,
            "runtime": {"name": rt.name, "version": rt.version},
            "models": {
                name: self._versions(name, m.version, m.variant) for name, m in self.models.live().items()
            },
            "applied_generation": self.state.applied_generation,
            "mqtt_connected": self.link.connected.is_set(),
            "uptime_s": round(time.monotonic() - self.started_at, 1),
        }

    # --- serving

    def _remember_labels(self, name: str, installed: Installed) -> None:
        manifest_path = self.store.model_dir(name, installed) / "manifest.json"
        try:
            self.labels[name] = protocol.parse("manifest", manifest_path.read_bytes()).get("labels", [])
        except (OSError, protocol.SchemaError):
            self.labels[name] = []

    def predict(self, name: str, raw_inputs: list[Any]) -> dict[str, Any]:
        slot = self.models.get(name)
        try:
            prediction = slot.predict(raw_inputs, as_inputs)
        except Exception:
            live = slot.live
            if live is not None:
                self.window.record_inference(name, live.version, live.variant, 0.0, error=True)
                self.metrics.inference(name, live.version, None)
            raise
        self.window.record_inference(name, prediction.version, prediction.variant, prediction.latency_ms)
        self.metrics.inference(name, prediction.version, prediction.latency_ms / 1000)
        # The live answer is computed; mirroring it to a shadow costs the caller only this.
        self.shadows.offer(name, raw_inputs, prediction)
        first = prediction.outputs[0]
        predicted = int(np.argmax(first.reshape(-1))) if first.ndim <= 2 and first.shape[0] == 1 else None
        labels = self.labels.get(name) or []
        prediction_id = uuid.uuid4().hex
        with self._predictions_lock:
            self._predictions[prediction_id] = (name, prediction.version, prediction.variant, predicted)
            while len(self._predictions) > self.config.limits.recent_predictions:
                self._predictions.popitem(last=False)
        return {
            "model": name,
            "version": prediction.version,
            "variant": prediction.variant,
            "prediction_id": prediction_id,
            "outputs": [output.tolist() for output in prediction.outputs],
            "label": labels[predicted] if predicted is not None and predicted < len(labels) else predicted,
            "latency_ms": round(prediction.latency_ms, 3),
        }

    def feedback(self, prediction_id: str, label: Any) -> dict[str, Any]:
        with self._predictions_lock:
            entry = self._predictions.get(prediction_id)
        if entry is None:
            raise KeyError(f"unknown or expired prediction_id {prediction_id!r}")
        name, version, variant, predicted = entry
        labels = self.labels.get(name) or []
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise ValueError("label must be a class index or one of the model's labels")
        if isinstance(label, str) and label in labels:
            index = labels.index(label)
        elif isinstance(label, int) or label.isdigit():
            index = int(label)
        else:
            raise ValueError(f"unknown label {label!r}; known labels: {labels}")
        correct = predicted is not None and index == predicted
        self.window.record_feedback(name, version, variant, correct=correct)
        return {"prediction_id": prediction_id, "correct": correct}

    # --- desired state

    def submit_desired(self, envelope: bytes) -> None:
        """Called from the MQTT thread: keep only the newest envelope and return at once."""
        with self._pending_cond:
            self._pending = self._last_desired = envelope
            self._pending_cond.notify_all()

    def submit_trust(self, bundle: bytes) -> None:
        """Called from the MQTT thread with a trust bundle (docs/protocol.md, addition 6).
        Verifying it takes a few signature checks; nothing here waits on the network."""
        try:
            changed = self.trust.update(bundle)
        except protocol.EnvelopeError as exc:
            self._event(EventType.FAILED, reason=exc.reason, message=f"trust bundle refused: {exc}")
            return
        if not changed:
            return
        # Refusals of earlier generations may have been about keys: let them be tried again.
        self._refused.clear()
        versions = self.trust.versions()
        log.info("trust updated: %s", versions)
        self._event(
            EventType.TRUST,
            message=f"now trusting keyring version {versions['keyring_version']}"
            f" under root version {versions['root_version']}",
        )
        self._publish_reported()
        # A desired state that arrived before its keyring (or was signed by a key the new
        # keyring revokes) is checked again against the new one.
        with self._pending_cond:
            if self._pending is None and self._last_desired is not None:
                self._pending = self._last_desired
                self._pending_cond.notify_all()

    def _next_desired(self, timeout: float | None) -> bytes | None:
        with self._pending_cond:
            self._pending_cond.wait_for(lambda: self._pending is not None or self._stop.is_set(), timeout)
            envelope, self._pending = self._pending, None
            return envelope

    def _apply_loop(self) -> None:
        # Updates are background work: on a busy device, serving threads get the CPU first.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), APPLY_NICENESS)
        limits = self.config.limits
        retry: bytes | None = None
        delay = limits.backoff_initial_s
        while not self._stop.is_set():
            # A transient failure is retried after a backoff, unless something newer arrives.
            envelope = self._next_desired(random.uniform(0, delay) if retry else None) or retry
            if envelope is None or self._stop.is_set():
                continue
            try:
                result = self.apply(envelope)
            except Exception:
                log.exception("apply failed unexpectedly")
                result = ApplyResult("refused", permanent=False)
            with self.applied:
                self.last_result = result
                self.applied.notify_all()
            if result.status == "refused" and not result.permanent:
                retry, delay = envelope, min(delay * 2, limits.backoff_max_s)
            else:
                retry, delay = None, limits.backoff_initial_s

    def apply(self, envelope: bytes) -> ApplyResult:
        with self._apply_lock:
            self._apply_started = time.perf_counter()
            try:
                desired = self._verify_desired(envelope)
            except Refusal as refusal:
                self._event(EventType.FAILED, reason=refusal.reason, message=refusal.message)
                return ApplyResult("refused", None, refusal.reason, refusal.message)
            generation = desired["generation"]
            if generation == self.state.applied_generation:
                # The retained copy, redelivered on a reconnect, or sent again by a control
                # plane that has not heard that it was applied (a report lost in a crash):
                # say so again.
                self._publish_reported()
                return ApplyResult("unchanged", generation)
            if generation in self._refused:
                return ApplyResult("unchanged", generation)
            try:
                self._check_freshness(desired)
                self._event(EventType.NOTIFIED, generation=generation)
                for name, spec in sorted(desired["models"].items()):
                    self._apply_model(name, spec, generation)
            except Refusal as refusal:
                if refusal.permanent:
                    self._refused.add(generation)
                self._event(
                    refusal.event_type,
                    generation=generation,
                    model=refusal.model,
                    reason=refusal.reason,
                    message=refusal.message,
                )
                return ApplyResult("refused", generation, refusal.reason, refusal.message, refusal.permanent)
            self.state.applied_generation = generation
            self.store.save_state(self.state)
            self._crash_point("after_state")
            self._publish_reported()
            return ApplyResult("applied", generation)

    def _verify_desired(self, envelope: bytes) -> dict[str, Any]:
        return verify_desired(self.trust.state, envelope, device_id=self.config.device_id)

    def _check_freshness(self, desired: dict[str, Any]) -> None:
        check_freshness(desired, applied_generation=self.state.applied_generation)

    # --- one model

    def _apply_model(self, name: str, spec: dict[str, Any], generation: int) -> None:
        self._apply_live(name, spec, generation)
        self._apply_shadow(name, spec.get("shadow"), generation)

    def _fetch_and_check(
        self, name: str, spec: dict[str, Any], wanted: Installed, common: dict[str, Any]
    ) -> tuple[LoadedModel, dict[str, Any]]:
        """Everything a candidate goes through before it may serve (or shadow): the
        manifest's signature and pin, the size and hardware fit, the blob and raw hashes,
        the golden set; then a loaded, smoke-run interpreter beside the live one."""
        self._event(EventType.DOWNLOADING, **common)
        manifest_payload, manifest = self._fetch_manifest(name, spec)
        self._check_fits(manifest)
        delivery = None
        if not self.store.is_complete(name, wanted):
            raw_temp, golden, delivery = self._fetch_artifact(name, spec, manifest)
            self._crash_point("after_download")
            self.store.install(name, wanted, tflite_temp=raw_temp, manifest=manifest_payload, golden=golden)
            self._crash_point("after_install")
        self._event(EventType.VERIFYING, **common, delivery=delivery)
        return self._load_and_check(name, wanted, manifest), manifest

    def _apply_live(self, name: str, spec: dict[str, Any], generation: int) -> None:
        wanted = Installed(spec["version"], spec["variant"])
        entry = self.state.models.get(name, ModelState())
        if entry.active == wanted and self.models.slot(name).live is not None:
            return
        common = {
            "generation": generation,
            "model": name,
            "version": wanted.version,
            "variant": wanted.variant,
        }
        try:
            candidate, manifest = self._fetch_and_check(name, spec, wanted, common)
        except Refusal as refusal:
            refusal.model = name
            raise
        self._crash_point("before_swap")
        previous = self.models.swap(candidate, drain_timeout=self.config.limits.drain_timeout_s)
        self.metrics.swaps.labels(name).inc()
        self._crash_point("after_swap")
        # From the desired state's arrival to the new model answering requests.
        self.last_serving_ms = (time.perf_counter() - self._apply_started) * 1000
        self.labels[name] = manifest.get("labels", [])
        old = entry.active if previous is not None else None
        self.state.models[name] = dataclasses.replace(
            entry, active=wanted, previous=old if old != wanted else entry.previous
        )
        self.store.save_state(self.state)
        self.store.prune(name, self.state.models[name].kept())
        self._event(
            EventType.ACTIVE,
            **common,
            message=f"serving {self.last_serving_ms:.0f} ms after the desired state",
        )

    # --- one model's shadow (docs/protocol.md addition 5)

    def _apply_shadow(self, name: str, spec: dict[str, Any] | None, generation: int) -> None:
        """Run the shadow ``spec`` names beside the live model, or none when it is None.

        A shadow goes through every check a live candidate does, with events naming the
        shadow's version. A refused shadow publishes ``failed`` with its reason code and
        changes nothing else: the live model keeps serving and the generation is applied.
        """
        if spec is None:
            self._unload_shadow(name)
            return
        wanted = Installed(spec["version"], spec["variant"])
        rate = float(spec["sample_rate"])
        current = self.shadows.get(name)
        if current is not None and Installed(current.model.version, current.model.variant) == wanted:
            if current.sample_rate != rate:
                self.shadows.install(Shadow(current.model, rate))
                self._set_shadow_state(name, wanted, rate)
            return
        common = {
            "generation": generation,
            "model": name,
            "version": wanted.version,
            "variant": wanted.variant,
        }
        try:
            candidate, _manifest = self._fetch_and_check(name, spec, wanted, common)
        except Exception as exc:  # a shadow never refuses the live part of a desired state
            if isinstance(exc, Refusal):
                reason, message = exc.reason, exc.message
            else:
                log.exception("shadow %s %s failed unexpectedly", name, wanted.key)
                reason, message = Reason.LOAD_FAILED, f"unexpected error: {exc}"
            self._event(EventType.FAILED, **common, reason=reason, message=f"shadow: {message}")
            # The desired state no longer names the shadow that ran so far: stop it too.
            self._unload_shadow(name)
            return
        self.shadows.install(Shadow(candidate, rate))
        self._set_shadow_state(name, wanted, rate)
        self._event(EventType.SHADOW, **common, message=f"running in shadow on {rate * 100:g} % of requests")

    def _set_shadow_state(self, name: str, shadow: Installed | None, rate: float | None) -> None:
        entry = self.state.models.get(name, ModelState())
        self.state.models[name] = dataclasses.replace(entry, shadow=shadow, shadow_sample_rate=rate)
        self.store.save_state(self.state)
        self.store.prune(name, self.state.models[name].kept())

    def _unload_shadow(self, name: str) -> None:
        """Stop shadowing ``name``: the interpreter is freed once the shadow thread lets go
        of the sample it may be running, and its files once nothing else keeps them."""
        removed = self.shadows.remove(name)
        if removed is not None:
            log.info("shadow %s %s-%s unloaded", name, removed.model.version, removed.model.variant)
        entry = self.state.models.get(name)
        if entry is not None and entry.shadow is not None:
            self._set_shadow_state(name, None, None)
        elif entry is not None:
            self.store.prune(name, entry.kept())  # a refused shadow may have left its files

    def _transfer(self, exc: TransferError) -> Refusal:
        return Refusal(exc.reason, str(exc), permanent=exc.permanent)

    def _fetch_manifest(self, name: str, spec: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        try:
            envelope = self.downloader.fetch_bytes(spec["manifest_url"], max_bytes=MANIFEST_MAX_BYTES)
        except TransferError as exc:
            raise self._transfer(exc) from exc
        return verify_manifest(self.trust.state, envelope, name=name, spec=spec)

    def _check_fits(self, manifest: dict[str, Any]) -> None:
        device = self.config.device
        check_fits(
            manifest,
            max_artifact_bytes=self.config.limits.max_artifact_bytes,
            hardware=device.hardware,
            int8=device.int8,
            unsupported_ops=device.unsupported_ops,
            runtime_name=runtime.runtime().name,
        )

    def _fetch_artifact(
        self, name: str, spec: dict[str, Any], manifest: dict[str, Any]
    ) -> tuple[Any, bytes | None, dict[str, Any]]:
        """The verified raw model in a scratch file, the golden set, and how the bytes came
        (``delivery``, addition 11): rebuilt from a delta when the desired state offers one
        and every check passes, else the full blob, with the reason the delta was not used."""
        received = self.downloader.bytes_received
        raw_temp, path, fallback, offer = None, DeliveryPath.FULL, None, spec.get("delta")
        if offer is not None:
            try:
                raw_temp, path = self._fetch_delta(name, spec, offer, manifest), DeliveryPath.DELTA
            except DeltaUnusable as exc:
                fallback = exc.code
                log.warning(
                    "delta for %s %s not used (%s): %s; downloading the full blob",
                    name,
                    spec["version"],
                    exc.code,
                    exc.message,
                )
        try:
            if raw_temp is None:
                raw_temp = self._fetch_full(spec, manifest)
            delivery: dict[str, Any] = {"path": path, "bytes": self.downloader.bytes_received - received}
            if fallback is not None:
                delivery["fallback"] = fallback
            self.metrics.deliveries.labels(path, fallback or "").inc()
            golden = None
            if manifest.get("golden"):
                golden_url = spec.get("golden_url") or spec["manifest_url"].rsplit("/", 1)[0] + "/golden"
                if manifest["golden"]["size"] > GOLDEN_MAX_FILE_BYTES:
                    raise Refusal(
                        Reason.TOO_LARGE,
                        f"golden set is {manifest['golden']['size']} bytes; "
                        f"this agent takes at most {GOLDEN_MAX_FILE_BYTES}",
                    )
                golden = self.downloader.fetch_bytes(golden_url, max_bytes=manifest["golden"]["size"])
                if hashlib.sha256(golden).hexdigest() != manifest["golden"]["sha256"]:
                    raise Refusal(Reason.HASH_MISMATCH, "golden set sha256 differs from the manifest")
        except TransferError as exc:
            raise self._transfer(exc) from exc
        return raw_temp, golden, delivery

    def _fetch_full(self, spec: dict[str, Any], manifest: dict[str, Any]):
        """Download the zstd blob (resumable, capped) and unpack it into a scratch file."""
        blob, raw = manifest["blob"], manifest["raw"]
        raw_temp = self.store.scratch_path(f"{raw['sha256']}.tflite.tmp")
        # Unpack on a second thread while the blob arrives: one pass, two cores.
        unpacker = StreamingUnpacker(raw_temp, raw_size=raw["size"], raw_sha256=raw["sha256"])
        try:
            partial = self.downloader.fetch_blob(
                spec["blob_url"],
                partial=self.store.partial_path(blob["sha256"]),
                size=blob["size"],
                sha256=blob["sha256"],
                sink=unpacker,
            )
        except BaseException:
            unpacker.close()
            raise
        if not unpacker.finish():  # the download started over: unpack the file instead
            decompress_blob(partial, raw_temp, raw_size=raw["size"], raw_sha256=raw["sha256"])
        partial.unlink(missing_ok=True)
        return raw_temp

    def _delta_transfer(self, exc: TransferError, partial: Path | None = None) -> DeltaUnusable:
        """A delta that cannot be downloaded falls back to the full blob, whatever failed
        (its retries used up, 404, wrong size or sha256): the blob may well come where the
        delta did not. Only a stop request stays one. After a transient failure the partial
        delta is kept (a later offer resumes it); after a permanent one it goes."""
        if self._stop.is_set():
            raise self._transfer(exc) from exc
        if exc.permanent and partial is not None:
            partial.unlink(missing_ok=True)
        return DeltaUnusable(DeltaFallback.DELTA_DOWNLOAD, str(exc))

    def _fetch_delta(self, name: str, spec: dict[str, Any], offer: dict[str, Any], manifest: dict[str, Any]):
        """Rebuild the target's raw model from the installed base and a delta (addition 11).

        The delta's manifest is checked against the target's verified manifest, and the
        rebuilt bytes against the target's signed raw sha256 (``apply_delta`` hashes what it
        builds): nothing a delta carries is trusted on its own. The delta downloads like a
        blob (resumable, size-capped, hashed); the rebuilt model goes to a scratch file that
        only ``Store.install`` moves into place, so a kill at any point leaves the store as
        it was. Raises :class:`DeltaUnusable`."""
        base = Installed(offer["base_version"], offer["base_variant"])
        try:
            base_manifest = protocol.parse("manifest", self.store.manifest(name, base))
        except (OSError, protocol.SchemaError) as exc:
            raise DeltaUnusable(DeltaFallback.BASE_MISSING, f"{name} {base.key} is not installed") from exc
        base_raw = base_manifest["raw"]
        try:
            envelope = self.downloader.fetch_bytes(offer["manifest_url"], max_bytes=MANIFEST_MAX_BYTES)
        except TransferError as exc:
            raise self._delta_transfer(exc) from exc
        delta = verify_delta_manifest(
            self.trust.state,
            envelope,
            name=name,
            spec=spec,
            offer=offer,
            target=manifest,
            base_raw_sha256=base_raw["sha256"],
            max_bytes=self.config.limits.max_artifact_bytes,
        )["delta"]
        partial = self.store.partial_path(delta["sha256"])
        # Marks a rebuild under way: found on a later try, the last one never finished (the
        # agent was killed, by a power cut or the OOM killer, or the disk filled), and the
        # full blob is used rather than risking the same end again and again.
        attempt = self.store.scratch_path(f"{delta['sha256']}.attempt")
        if attempt.exists():
            attempt.unlink(missing_ok=True)
            partial.unlink(missing_ok=True)
            raise DeltaUnusable(DeltaFallback.INTERRUPTED, "the last rebuild from this delta did not finish")
        try:
            self.downloader.fetch_blob(
                offer["blob_url"], partial=partial, size=delta["size"], sha256=delta["sha256"]
            )
        except TransferError as exc:
            raise self._delta_transfer(exc, partial) from exc
        raw = manifest["raw"]
        raw_temp = self.store.scratch_path(f"{raw['sha256']}.tflite.tmp")
        try:
            base_bytes = _mapped(self.store.model_path(name, base))
        except (OSError, ValueError) as exc:
            partial.unlink(missing_ok=True)
            raise DeltaUnusable(DeltaFallback.BASE_MISSING, f"{name} {base.key}: {exc}") from exc
        atomic_write(attempt, b"")
        try:
            self._rebuild(base_bytes, partial, raw, base_raw["sha256"], raw_temp)
        finally:
            # Whatever happened, it finished: a crash never gets here and leaves the mark.
            attempt.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        return raw_temp

    def _rebuild(
        self, base_bytes, partial: Path, raw: dict[str, Any], base_sha256: str, raw_temp: Path
    ) -> None:
        """``apply_delta`` into ``raw_temp`` (fsynced); :class:`DeltaUnusable` on any failure."""
        try:
            # The target's signed sha256 is what the rebuilt bytes must hash to, whatever the
            # delta itself names (a different one is refused as target_mismatch).
            rebuilt = memoryview(
                apply_delta(
                    base_bytes,
                    _mapped(partial),
                    max_output=raw["size"],
                    base_sha256=base_sha256,
                    target_sha256=raw["sha256"],
                )
            )
        except Exception as exc:  # any failure of a delta means the full blob
            # Whatever is wrong with it, this delta will not do: do not resume it next time.
            partial.unlink(missing_ok=True)
            code = DeltaFallback(exc.code) if isinstance(exc, DeltaError) else DeltaFallback.CORRUPT
            raise DeltaUnusable(code, f"delta not applied: {exc}") from exc
        if len(rebuilt) != raw["size"]:  # apply_delta checked it; a cheap second look
            partial.unlink(missing_ok=True)
            raise DeltaUnusable(DeltaFallback.TARGET_MISMATCH, "the rebuilt model has the wrong size")
        try:
            with open(raw_temp, "wb") as out:
                half = len(rebuilt) // 2
                out.write(rebuilt[:half])
                out.flush()
                self._crash_point("during_rebuild")
                out.write(rebuilt[half:])
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:  # a full disk, say: the blob's path streams and may still fit
            raw_temp.unlink(missing_ok=True)
            partial.unlink(missing_ok=True)
            raise DeltaUnusable(
                DeltaFallback.INTERRUPTED, f"the rebuilt model could not be written: {exc}"
            ) from exc

    def _load_and_check(self, name: str, wanted: Installed, manifest: dict[str, Any]) -> LoadedModel:
        path = self.store.model_path(name, wanted)
        try:
            candidate = LoadedModel.load(name, wanted.version, wanted.variant, path)
        except runtime.RuntimeLoadError as exc:
            raise Refusal(Reason.LOAD_FAILED, str(exc)) from exc
        golden = manifest.get("golden")
        if golden:
            golden_path = self.store.model_dir(name, wanted) / "golden.npz"
            try:
                x, y = read_golden_set(golden_path)  # without pickles, within the agent's limits
                accuracy = runtime.golden_accuracy(candidate.interpreter, x, y)
            except (runtime.GoldenSetError, ValueError, OSError) as exc:
                raise Refusal(Reason.GOLDEN_FAILED, f"golden set could not run: {exc}") from exc
            floor = (golden.get("accuracy") or 0.0) - self.config.device.golden_tolerance
            if accuracy < floor:
                raise Refusal(Reason.GOLDEN_FAILED, f"golden accuracy {accuracy:.3f} is below {floor:.3f}")
        return candidate
