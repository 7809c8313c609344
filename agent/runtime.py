"""The TFLite runtime, shared by the agent and the registry's smoke run.

Prefers LiteRT (``ai_edge_litert``), the successor of tflite-runtime, and falls back to
``tflite_runtime`` on devices where only that is packaged. One implementation of "load,
smoke-run, score the golden set" serves the server check and the device's pre-swap check,
so both measure accuracy the same way.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

RUNTIME_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")


class RuntimeLoadError(Exception):
    """The interpreter refused the model (unsupported op, bad shapes, corrupt buffer…)."""


class GoldenSetError(ValueError):
    """The golden set does not fit the model (wrong shape, not a classifier output…)."""


@dataclass(frozen=True)
class Runtime:
    name: str  # "ai_edge_litert" or "tflite_runtime"
    version: str
    interpreter_class: type


@lru_cache(maxsize=1)
def runtime() -> Runtime:
    errors = []
    for module_name in RUNTIME_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            errors.append(f"{module_name}: {exc}")
            continue
        package = module_name.split(".")[0]
        try:
            from importlib.metadata import version

            dist_version = version(package.replace("_", "-"))
        except Exception:  # a vendored build may have no metadata; the name still helps
            dist_version = "unknown"
        return Runtime(package, dist_version, module.Interpreter)
    raise RuntimeLoadError("no TFLite runtime installed: " + "; ".join(errors))


def load(path: str | Path, *, num_threads: int = 1) -> Any:
    """Load and allocate a model; raise :class:`RuntimeLoadError` with the runtime's reason."""
    try:
        interpreter = runtime().interpreter_class(model_path=str(path), num_threads=num_threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise RuntimeLoadError(str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)) from exc
    return interpreter


def _to_input(detail: dict, value: np.ndarray) -> np.ndarray:
    """Cast (and quantize, for integer inputs) a float sample to what the tensor takes."""
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(value.dtype, np.integer):
        scale, zero_point = detail["quantization"]
        if scale:
            value = np.round(value / scale + zero_point)
        info = np.iinfo(dtype)
        value = np.clip(value, info.min, info.max)
    return value.astype(dtype, copy=False)


Details = tuple[list[dict], list[dict]]


def io_details(interpreter: Any) -> Details:
    """Input and output tensor details. Fetching them costs more than a small model's
    inference, so callers that invoke often keep them."""
    return interpreter.get_input_details(), interpreter.get_output_details()


def invoke(interpreter: Any, inputs: list[np.ndarray], details: Details | None = None) -> list[np.ndarray]:
    """Run one inference. Not thread-safe: callers serialise use of one interpreter."""
    input_details, output_details = details or io_details(interpreter)
    if len(inputs) != len(input_details):
        raise ValueError(f"the model takes {len(input_details)} inputs, got {len(inputs)}")
    for detail, value in zip(input_details, inputs, strict=True):
        value = np.asarray(value)
        if tuple(value.shape) != tuple(detail["shape"]):
            raise ValueError(
                f"input {detail['name']!r} needs shape {list(detail['shape'])}, got {list(value.shape)}"
            )
        interpreter.set_tensor(detail["index"], _to_input(detail, value))
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in output_details]


def smoke_run(interpreter: Any) -> None:
    """One inference on zeros: proves the kernels resolve and run, not that answers are right."""
    zeros = [np.zeros(d["shape"], dtype=d["dtype"]) for d in interpreter.get_input_details()]
    try:
        outputs = invoke(interpreter, zeros)
    except (ValueError, RuntimeError) as exc:
        raise RuntimeLoadError(f"smoke inference failed: {exc}") from exc
    for output in outputs:
        if np.issubdtype(output.dtype, np.floating) and not np.all(np.isfinite(output)):
            raise RuntimeLoadError("smoke inference produced NaN or infinite outputs")


def check_golden_fits(interpreter: Any, x: np.ndarray, y: np.ndarray) -> None:
    inputs = interpreter.get_input_details()
    if len(inputs) != 1:
        raise GoldenSetError("golden sets are supported for single-input models only")
    sample_shape = list(inputs[0]["shape"][1:])
    if list(x.shape[1:]) != sample_shape:
        raise GoldenSetError(
            f"golden set samples have shape {list(x.shape[1:])}, the model input takes {sample_shape}"
        )
    if len(x) != len(y):
        raise GoldenSetError(f"golden set has {len(x)} samples but {len(y)} labels")


def golden_accuracy(interpreter: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the first output over the golden set, one sample at a time
    (the batch size a device serves with)."""
    check_golden_fits(interpreter, x, y)
    if len(x) == 0:
        raise GoldenSetError("golden set is empty")
    details = io_details(interpreter)
    correct = 0
    for number, (sample, label) in enumerate(zip(x, y, strict=True)):
        output = invoke(interpreter, [sample[np.newaxis, ...]], details)[0]
        correct += int(np.argmax(output.reshape(-1)) == int(label))
        if number % 8 == 7:
            # On a device this runs beside the live model: hand the GIL to serving
            # threads now and then instead of making them wait a whole switch interval.
            time.sleep(0)
    return correct / len(x)


def read_golden_set(source: Any) -> tuple[np.ndarray, np.ndarray]:
    """Read an .npz golden set (``x`` samples, ``y`` integer labels) without pickles."""
    try:
        with np.load(source, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise GoldenSetError("golden set must contain arrays 'x' and 'y'")
            x, y = data["x"], data["y"]
    except GoldenSetError:
        raise
    except Exception as exc:  # numpy raises many kinds for a bad zip/npy
        raise GoldenSetError(f"not a readable .npz file: {exc}") from exc
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise GoldenSetError(
            "golden set needs x of shape [N, ...] and y of shape [N] with N > 0; "
            f"got {list(x.shape)} and {list(y.shape)}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise GoldenSetError("golden set labels 'y' must be integers (class indices)")
    if not (np.issubdtype(x.dtype, np.number)):
        raise GoldenSetError("golden set samples 'x' must be numeric")
    return x, y
