"""Shadow evaluation on the device (docs/protocol.md addition 5, docs/agent.md "Shadow").

A desired state may name a candidate to run *beside* the live model. The agent verifies
and loads it like any candidate, then mirrors a sampled fraction of real requests to it,
off the request path, and reports how often it agrees with the live model.

Request path (``ShadowRunner.offer``, called after the live answer is computed): one
dict lookup, one random draw and, for a sampled request, one ``put_nowait`` of references
to the request's inputs and the live outputs (both private to the request: the inputs
were parsed for it, the outputs are copies the runtime handed back). A full queue never
blocks the caller: the sample is counted as ``skipped``. ONE background thread runs the
shadow interpreter on each sample and compares: ``agreed`` when the top-1 class (arg-max
over the first output's last axis) is the same, ``abs_diff`` the mean absolute difference
of the first outputs. So whatever the shadow costs, the caller pays only the offer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.serving import LoadedModel, Prediction
from agent.telemetry import LoadedShadow, ShadowOutcome, TelemetryWindow

log = logging.getLogger(__name__)
# Like the apply loop: on a busy device, serving threads get the CPU before the shadow.
SHADOW_NICENESS = 10


@dataclass(frozen=True)
class Shadow:
    """A loaded shadow model and the fraction of its live model's requests it sees."""

    model: LoadedModel
    sample_rate: float


@dataclass(frozen=True)
class _Sample:
    shadow: Shadow
    raw_inputs: Any
    live_output: np.ndarray
    live_detail: dict[str, Any] | None
    live_version: str
    live_variant: str


class ShadowMismatch(ValueError):
    """The shadow's first output cannot be compared with the live one (another shape)."""


def _as_float(output: np.ndarray, detail: dict[str, Any] | None) -> np.ndarray:
    """Dequantize an integer output so that a float and an int8 variant compare by value."""
    if detail is not None and np.issubdtype(output.dtype, np.integer):
        scale, zero_point = detail.get("quantization", (0.0, 0))
        if scale:
            return (output.astype(np.float32) - zero_point) * scale
    return output.astype(np.float32, copy=False)


def compare(
    live: np.ndarray,
    shadow: np.ndarray,
    *,
    live_detail: dict[str, Any] | None = None,
    shadow_detail: dict[str, Any] | None = None,
) -> tuple[bool, float]:
    """(top-1 agreed, mean absolute difference) of two first outputs."""
    if live.shape != shadow.shape:
        raise ShadowMismatch(f"shadow output has shape {list(shadow.shape)}, live {list(live.shape)}")
    live_f, shadow_f = _as_float(live, live_detail), _as_float(shadow, shadow_detail)
    agreed = bool(np.array_equal(np.argmax(live_f, axis=-1), np.argmax(shadow_f, axis=-1)))
    return agreed, float(np.mean(np.abs(live_f - shadow_f)))


class ShadowRunner:
    """The shadows of one agent (at most one per model) and the thread that runs them."""

    def __init__(
        self,
        *,
        window: TelemetryWindow,
        queue_samples: int,
        prepare: Callable[[Any, list[dict]], list[np.ndarray]],
        name: str = "shadow",
    ) -> None:
        self.window = window
        self._prepare = prepare
        self._queue: queue.Queue[_Sample | None] = queue.Queue(maxsize=queue_samples)
        self._shadows: dict[str, Shadow] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._thread_name = name
        self._random = random.Random()
        self._unresolved = 0  # samples queued or running, for drain()
        self._resolved = threading.Condition()

    # --- which shadows are loaded (apply thread)

    def get(self, model: str) -> Shadow | None:
        return self._shadows.get(model)

    def loaded(self) -> dict[str, Shadow]:
        return dict(self._shadows)

    def install(self, shadow: Shadow) -> Shadow | None:
        """Start shadowing ``shadow.model.name`` with ``shadow``; return the one it replaces."""
        with self._lock:
            previous = self._shadows.get(shadow.model.name)
            self._shadows[shadow.model.name] = shadow
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
                self._thread.start()
        return previous

    def remove(self, model: str) -> Shadow | None:
        """Stop shadowing ``model``. Samples still queued for it are counted as skipped
        and dropped by the worker, so nothing keeps the interpreter alive afterwards."""
        with self._lock:
            return self._shadows.pop(model, None)

    def stop(self, timeout: float | None = None) -> None:
        with self._lock:
            self._shadows.clear()
            thread = self._thread
        if thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)  # the worker skips what is left, then exits
        thread.join(timeout)

    def telemetry_loaded(self, live: dict[str, LoadedModel]) -> dict[str, LoadedShadow]:
        """The loaded shadows as the telemetry window names them (beside their live model)."""
        report = {}
        for model, shadow in self.loaded().items():
            current = live.get(model)
            if current is not None:
                report[model] = LoadedShadow(
                    current.version, current.variant, shadow.model.version, shadow.model.variant
                )
        return report

    # --- request path

    def offer(self, model: str, raw_inputs: Any, prediction: Prediction) -> None:
        """Maybe mirror one answered request to ``model``'s shadow; never blocks."""
        shadow = self._shadows.get(model)
        if shadow is None or self._random.random() >= shadow.sample_rate:
            return
        sample = _Sample(
            shadow,
            raw_inputs,
            prediction.outputs[0],
            prediction.output_details[0] if prediction.output_details else None,
            prediction.version,
            prediction.variant,
        )
        with self._resolved:
            self._unresolved += 1
        try:
            self._queue.put_nowait(sample)
        except queue.Full:
            self._record(sample, ShadowOutcome.SKIPPED)
            self._done()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every sample offered so far is resolved (for tests and benchmarks)."""
        with self._resolved:
            return self._resolved.wait_for(lambda: self._unresolved == 0, timeout)

    def _done(self) -> None:
        with self._resolved:
            self._unresolved -= 1
            if self._unresolved == 0:
                self._resolved.notify_all()

    # --- the worker

    def _record(self, sample: _Sample, outcome: ShadowOutcome, **figures: Any) -> None:
        self.window.record_shadow(
            sample.shadow.model.name,
            sample.shadow.model.version,
            sample.shadow.model.variant,
            live_version=sample.live_version,
            live_variant=sample.live_variant,
            outcome=outcome,
            **figures,
        )

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICENESS)
        stopping = False
        while True:
            sample = self._queue.get()
            if sample is None:
                stopping = True
            elif stopping or self._shadows.get(sample.shadow.model.name) is not sample.shadow:
                # Unloaded or replaced since it was queued: its counts still close the books.
                self._record(sample, ShadowOutcome.SKIPPED)
            else:
                self._evaluate(sample)
            if sample is not None:
                self._done()
            sample = None  # the last reference to an unloaded shadow may be this one
            if stopping and self._queue.empty():
                return

    def _evaluate(self, sample: _Sample) -> None:
        model = sample.shadow.model
        try:
            inputs = self._prepare(sample.raw_inputs, model.input_details())
            started = time.perf_counter()
            outputs = model.predict(inputs)
            latency_ms = (time.perf_counter() - started) * 1000
            agreed, abs_diff = compare(
                sample.live_output,
                outputs[0],
                live_detail=sample.live_detail,
                shadow_detail=model.details[1][0] if model.details else None,
            )
        except Exception as exc:  # a shadow's failure is a figure to report, never a crash
            log.debug("shadow %s %s failed on a sample: %s", model.name, model.version, exc)
            self._record(sample, ShadowOutcome.ERROR)
            return
        self._record(sample, ShadowOutcome.COMPARED, agreed=agreed, abs_diff=abs_diff, latency_ms=latency_ms)
