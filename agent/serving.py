"""Serving models to local apps, with hot swap that never drops or mixes a request.

A ``ModelSlot`` holds one reference to the live ``LoadedModel``. A request takes that
reference once, at its start, and runs to the end on it; a swap replaces the reference
under a lock. Requests already running finish on the old interpreter, which is released
once its in-flight count drains to zero. No request can see a half-loaded model, because
a candidate is loaded, smoke-run and checked before it is ever put in the slot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent import runtime


class UnknownModel(KeyError):
    pass


class BadInput(ValueError):
    pass


@dataclass
class LoadedModel:
    name: str
    version: str
    variant: str
    path: Path
    interpreter: Any
    # TFLite interpreters are not thread-safe: one invoke at a time per interpreter.
    invoke_lock: threading.Lock = field(default_factory=threading.Lock)
    inflight: int = 0
    drained: threading.Condition = field(default_factory=threading.Condition)
    details: runtime.Details | None = None

    @classmethod
    def load(cls, name: str, version: str, variant: str, path: Path, *, num_threads: int = 1) -> LoadedModel:
        interpreter = runtime.load(path, num_threads=num_threads)
        runtime.smoke_run(interpreter)
        return cls(name, version, variant, path, interpreter, details=runtime.io_details(interpreter))

    def input_details(self) -> list[dict]:
        return self.details[0]

    def predict(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        with self.invoke_lock:
            return runtime.invoke(self.interpreter, inputs, self.details)

    def wait_drained(self, timeout: float | None = None) -> bool:
        with self.drained:
            return self.drained.wait_for(lambda: self.inflight == 0, timeout)


@dataclass
class Prediction:
    outputs: list[np.ndarray]
    version: str
    variant: str
    latency_ms: float
    output_details: list[dict] | None = None  # of the model that answered, for shadow comparison


class ModelSlot:
    def __init__(self, name: str) -> None:
        self.name = name
        self._live: LoadedModel | None = None
        self._lock = threading.Lock()

    @property
    def live(self) -> LoadedModel | None:
        return self._live

    def _acquire(self) -> LoadedModel:
        with self._lock:
            model = self._live
            if model is None:
                raise UnknownModel(self.name)
            with model.drained:
                model.inflight += 1
            return model

    @staticmethod
    def _release(model: LoadedModel) -> None:
        with model.drained:
            model.inflight -= 1
            if model.inflight == 0:
                model.drained.notify_all()

    def predict(self, raw_inputs: Any, prepare: Callable[[Any, list[dict]], list[np.ndarray]]) -> Prediction:
        """Run one request on the model that is live when it starts. ``prepare`` turns the
        request's inputs into arrays for *that* model's input details."""
        model = self._acquire()
        try:
            started = time.perf_counter()
            try:
                outputs = model.predict(prepare(raw_inputs, model.input_details()))
            except ValueError as exc:
                raise BadInput(str(exc)) from exc
            latency_ms = (time.perf_counter() - started) * 1000
            return Prediction(
                outputs, model.version, model.variant, latency_ms, model.details[1] if model.details else None
            )
        finally:
            self._release(model)

    def swap(self, candidate: LoadedModel) -> LoadedModel | None:
        """Make ``candidate`` live; return the previous model (still draining)."""
        with self._lock:
            previous, self._live = self._live, candidate
        return previous


class Models:
    """All slots of one agent. No module-level state: many agents may share a process."""

    def __init__(self) -> None:
        self._slots: dict[str, ModelSlot] = {}
        self._lock = threading.Lock()

    def slot(self, name: str) -> ModelSlot:
        with self._lock:
            return self._slots.setdefault(name, ModelSlot(name))

    def get(self, name: str) -> ModelSlot:
        slot = self._slots.get(name)
        if slot is None or slot.live is None:
            raise UnknownModel(name)
        return slot

    def live(self) -> dict[str, LoadedModel]:
        return {name: slot.live for name, slot in list(self._slots.items()) if slot.live is not None}

    def swap(self, candidate: LoadedModel, *, drain_timeout: float = 30.0) -> LoadedModel | None:
        """Swap and wait (bounded) for the old model's in-flight requests to finish."""
        previous = self.slot(candidate.name).swap(candidate)
        if previous is not None:
            previous.wait_drained(drain_timeout)
        return previous
