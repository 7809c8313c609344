"""The quantization factory's recipes (issue 12, section 2; docs/quantization.md).

Google's ai-edge-quantizer (AEQ) rewrites a float32 ``.tflite`` flatbuffer directly, with
numpy and LiteRT only: no TensorFlow. Each :class:`QuantRecipe` maps to one AEQ recipe:

* ``int8-dynamic``: int8 channel-wise weights, float activations quantized at run time
  (AEQ ``dynamic_wi8_afp32``);
* ``float16``: float16 weights, DEQUANTIZE ops in front of the float kernels (AEQ
  ``float_casting``);
* ``int8-full``: int8 weights and activations, calibrated on the version's golden set
  (AEQ ``static_wi8_ai8``). Its inputs and outputs become int8: LiteRT and the agent
  quantize float samples with the input tensor's scale and zero point (agent/runtime.py).

The produced bytes then go through the same pipeline as an uploaded file (sandboxed
inspection, smoke run, golden set, zstd, signature).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np

from fleet.registry.choices import QuantRecipe

TOOL = "ai-edge-quantizer"
_DIST = "ai-edge-quantizer"
_FLOAT16 = [
    {
        "regex": ".*",
        "operation": "*",
        "algorithm_key": "float_casting",
        "op_config": {
            "weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
            "compute_precision": "FLOAT",
            "explicit_dequantize": True,
        },
    }
]


class QuantizationError(Exception):
    """The quantizer could not produce the variant; the message says why in a sentence."""


def tool_version() -> str:
    """The installed quantizer's version, or "" when it is not installed."""
    try:
        return importlib.metadata.version(_DIST)
    except importlib.metadata.PackageNotFoundError:
        return ""


def needs_calibration(recipe: str) -> bool:
    return recipe == QuantRecipe.FULL_INT8


def _aeq_recipe(recipe: str) -> Any:
    from ai_edge_quantizer import recipe as aeq_recipe

    if recipe == QuantRecipe.DYNAMIC_INT8:
        return aeq_recipe.dynamic_wi8_afp32()
    if recipe == QuantRecipe.FLOAT16:
        return _FLOAT16
    if recipe == QuantRecipe.FULL_INT8:
        return aeq_recipe.static_wi8_ai8()
    raise QuantizationError(f"Unknown recipe {recipe!r}.")


def quantize(model_path: Path, recipe: str, calibration: np.ndarray | None = None) -> bytes:
    """Produce ``recipe``'s variant of the float32 model at ``model_path``.

    ``calibration`` holds samples shaped like the golden set's ``x`` (one sample per row);
    full-integer int8 needs it.
    """
    if not tool_version():
        raise QuantizationError(f"{TOOL} is not installed on this server (requirements/base.txt).")
    from ai_edge_quantizer import quantizer

    try:
        engine = quantizer.Quantizer(str(model_path))
        engine.load_quantization_recipe(_aeq_recipe(recipe))
        calibration_result = None
        if engine.need_calibration:
            if calibration is None or not len(calibration):
                raise QuantizationError(
                    "Full-integer int8 needs calibration samples: give the version a golden set."
                )
            key, input_name = _calibration_input(model_path)
            rows = calibration.astype(np.float32)
            samples = [{input_name: rows[i : i + 1]} for i in range(len(rows))]
            calibration_result = engine.calibrate({key: samples})
        produced = engine.quantize(calibration_result).quantized_model
    except QuantizationError:
        raise
    except Exception as exc:  # AEQ raises ValueError, KeyError, RuntimeError… for models it cannot take
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise QuantizationError(f"{TOOL} could not apply {recipe}: {detail}") from exc
    if produced is None or not len(produced):
        raise QuantizationError(f"{TOOL} produced no model for {recipe}.")
    return bytes(produced)


def _calibration_input(model_path: Path) -> tuple[str, str]:
    """(signature key, input name) AEQ's calibration expects for the model's only input."""
    from agent import runtime

    interpreter = runtime.load(model_path)
    signatures = interpreter.get_signature_list()
    if signatures:
        key = next(iter(signatures))
        names = list(signatures[key]["inputs"])
    else:  # AEQ calls a signature-less model's signature serving_default, inputs by tensor name
        key, names = "serving_default", [detail["name"] for detail in interpreter.get_input_details()]
    if len(names) != 1:
        raise QuantizationError(f"Calibration needs a single-input model; this one takes {len(names)}.")
    return key, names[0]
