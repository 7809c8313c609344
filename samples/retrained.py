"""Retrained versions of real ``.tflite`` models, for the delta codec's tests and benchmark.

TensorFlow is not available here, so a "new version" is made the way it would differ after
training: by rewriting weight buffers inside the flatbuffer bytes, leaving everything else
(graph, quantization parameters, offsets) untouched, so the result is still a valid model
that LiteRT loads and runs.

* :func:`head_warm_retrain` (the judged "head retrain" of bench/delta.py): the head (the
  last two conv/fully-connected layers; the last one of a two-layer MLP) retrained
  *starting from its previous weights* on new data, as a fleet retrains a head. Float
  weights move by training steps: each by a normal step of 1 % of the layer's weight
  standard deviation (what a few SGD steps at learning rate 1e-3 do to a dense head:
  measured on the 16 MiB digits-shaped model, 8 steps of 32 digits move its head weights by
  a median 1.2 %; at 1e-4, 0.14 %). An int8 layer is re-quantized the way the converter does it: its float
  weights (int8 x scale, per channel) move by a normal step of one quantization step, each
  channel's scale becomes max|w| / 127 again (so it changes slightly), the weights are
  rounded to the new scale (so int8 values move by a few steps) and the int32 bias is
  re-expressed at the new bias scale. The new scales are written into the tensors'
  quantization parameters: the flatbuffer skeleton changes by those few bytes.
* :func:`head_retrain` (reported, "head redrawn"): the weights of the last layers are
  replaced with freshly drawn values of the same scale (a cold start from random init).
* :func:`fine_tune`: every float weight is perturbed slightly (relative noise of 1e-3);
  int8 weights, which have no "slightly" below one step, move by one step in 5 % of places.

The published models come from the ``pymicro-wakeword`` package (microWakeWord streaming
keyword spotters, int8, Apache-2.0), pinned in requirements/dev.txt.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from samples.digits import build_digits_models, build_large_model

_DTYPES = {
    schema.TensorType.FLOAT32: np.float32,
    schema.TensorType.FLOAT16: np.float16,
    schema.TensorType.INT8: np.int8,
    schema.TensorType.INT32: np.int32,
}
WAKEWORD_MODELS = ("alexa", "hey_jarvis", "hey_mycroft", "okay_nabu")


@dataclass(frozen=True)
class _Weight:
    buffer: int
    offset: int  # of the data in the file
    length: int
    dtype: type
    scale_offset: int = 0  # of the float32 quantization scales in the file (0: not quantized)
    scales: int = 0
    axis: int = 0  # the quantized dimension
    shape: tuple[int, ...] = ()


# Operators whose inputs 1 and 2 are the layer's weights and bias.
_LAYER_OPS = {
    schema.BuiltinOperator.CONV_2D,
    schema.BuiltinOperator.DEPTHWISE_CONV_2D,
    schema.BuiltinOperator.FULLY_CONNECTED,
    schema.BuiltinOperator.TRANSPOSE_CONV,
}


def _layers(model_bytes: bytes) -> list[list[_Weight]]:
    """Per layer (conv / fully connected operator, in execution order) its constant weight and bias.

    Other constants (shapes, slice bounds, axes) are left alone: changing them would change
    the graph, not the weights.
    """
    model = schema.Model.GetRootAs(model_bytes, 0)
    subgraph = model.Subgraphs(0)
    layers = []
    for o in range(subgraph.OperatorsLength()):
        operator = subgraph.Operators(o)
        code = model.OperatorCodes(operator.OpcodeIndex())
        if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) not in _LAYER_OPS:
            continue
        layer = []
        for i in [int(i) for i in operator.InputsAsNumpy()][1:3]:
            if i < 0:
                continue
            tensor = subgraph.Tensors(i)
            buffer = model.Buffers(tensor.Buffer())
            field = buffer._tab.Offset(4)
            if not field or tensor.Type() not in _DTYPES or buffer.Offset() > 1:
                continue
            offset, length = buffer._tab.Vector(field), buffer._tab.VectorLen(field)
            if length:
                layer.append(
                    _Weight(tensor.Buffer(), offset, length, _DTYPES[tensor.Type()], *_scales(tensor))
                )
        if layer:
            layers.append(layer)
    return layers


def _scales(tensor: schema.Tensor) -> tuple[int, int, int, tuple[int, ...]]:
    """Where the tensor's float32 quantization scales lie in the file, how many, their axis."""
    shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
    quantization = tensor.Quantization()
    field = quantization._tab.Offset(8) if quantization is not None else 0  # .scale, [float]
    if not field:
        return 0, 0, 0, shape
    table = quantization._tab
    return table.Vector(field), table.VectorLen(field), quantization.QuantizedDimension(), shape


def _write(model: bytearray, weight: _Weight, values: np.ndarray) -> None:
    model[weight.offset : weight.offset + weight.length] = values.astype(weight.dtype).tobytes()


def _values(model_bytes: bytes, weight: _Weight) -> np.ndarray:
    count = weight.length // np.dtype(weight.dtype).itemsize
    return np.frombuffer(model_bytes, weight.dtype, count, weight.offset)


def head_retrain(model_bytes: bytes, *, layers: int = 1, seed: int = 1) -> bytes:
    """New values, of the same scale, for the weights and bias of the last ``layers`` layers."""
    rng = np.random.default_rng(seed)
    out = bytearray(model_bytes)
    for layer in _layers(model_bytes)[-layers:]:
        for weight in layer:
            old = _values(model_bytes, weight)
            if np.issubdtype(weight.dtype, np.floating):
                new = rng.normal(0.0, float(np.std(old)) or 0.1, old.shape)
            else:
                new = rng.integers(int(old.min()), int(old.max()) + 1, old.shape)
            _write(out, weight, new)
    return bytes(out)


def _per_channel(weight: _Weight, model_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The weight's integer values and scales, shaped so that they broadcast together."""
    values = _values(model_bytes, weight).astype(np.float64)
    scales = np.frombuffer(model_bytes, np.float32, weight.scales, weight.scale_offset).astype(np.float64)
    if weight.scales > 1:
        values = np.moveaxis(values.reshape(weight.shape), weight.axis, -1)
    return values, scales


def _store_per_channel(out: bytearray, weight: _Weight, values: np.ndarray, scales: np.ndarray) -> None:
    if weight.scales > 1:
        values = np.moveaxis(values, -1, weight.axis).reshape(-1)
    _write(out, weight, values)
    start = weight.scale_offset
    out[start : start + 4 * weight.scales] = scales.astype(np.float32).tobytes()


def head_warm_retrain(
    model_bytes: bytes,
    *,
    layers: int | None = None,
    float_step: float = 0.01,
    int8_steps: float = 1.0,
    seed: int = 3,
) -> bytes:
    """The head retrained from its previous weights on new data (see the module's doc).

    The head is the last ``layers`` layers; by default the last two, or the last one of a
    model with only two (retraining both would retrain the whole network). ``float_step``: a
    float weight's move, in units of the layer's weight standard deviation; ``int8_steps``:
    an int8 layer's float move, in quantization steps, before re-quantization.
    """
    rng = np.random.default_rng(seed)
    out = bytearray(model_bytes)
    all_layers = _layers(model_bytes)
    if layers is None:
        layers = 2 if len(all_layers) > 2 else 1
    for layer in all_layers[-layers:]:
        weights = [w for w in layer if w.dtype is not np.int32]
        biases = [w for w in layer if w.dtype is np.int32]
        ratio = None  # new weight scale / old weight scale, per output channel
        for weight in weights:
            if np.issubdtype(weight.dtype, np.floating):
                old = _values(model_bytes, weight)
                spread = float(np.std(old)) or 0.1
                _write(out, weight, old + float_step * spread * rng.standard_normal(old.shape))
            elif weight.dtype is np.int8 and weight.scales:
                values, scales = _per_channel(weight, model_bytes)
                moved = (values + int8_steps * rng.standard_normal(values.shape)) * scales
                reach = np.abs(moved).reshape(-1, weight.scales).max(axis=0)
                new_scales = np.maximum(reach, 1e-12) / 127
                _store_per_channel(out, weight, np.clip(np.rint(moved / new_scales), -127, 127), new_scales)
                ratio = new_scales / scales
        for bias in biases:
            old = _values(model_bytes, bias).astype(np.float64)
            if ratio is None or bias.scales not in (1, len(ratio)) or len(ratio) not in (1, bias.scales):
                continue  # no int8 weight was re-scaled in this layer: its int32 bias stays
            _, bias_scales = _per_channel(bias, model_bytes)
            # The bias's scale is input scale x weight scale; its float value moves as the weights do.
            moved = old + int8_steps * rng.standard_normal(old.shape) * np.sqrt(np.mean(old**2) or 1) / 127
            new_scales = bias_scales * ratio
            _store_per_channel(out, bias, np.rint(moved * bias_scales / new_scales), new_scales)
    return bytes(out)


def fine_tune(model_bytes: bytes, *, seed: int = 2) -> bytes:
    """Every float weight scaled by (1 + 1e-3 noise); int8 weights moved one step in 5 % of places."""
    rng = np.random.default_rng(seed)
    out = bytearray(model_bytes)
    # dict.fromkeys, not a set: the same order (so the same noise) in every process.
    for weight in dict.fromkeys(w for layer in _layers(model_bytes) for w in layer):
        old = _values(model_bytes, weight)
        if np.issubdtype(weight.dtype, np.floating):
            _write(out, weight, old * (1 + 1e-3 * rng.standard_normal(old.shape)))
        elif weight.dtype is np.int8:
            step = rng.choice([-1, 0, 1], old.shape, p=[0.025, 0.95, 0.025])
            _write(out, weight, np.clip(old.astype(np.int16) + step, -127, 127))
    return bytes(out)


def changed_float_weights(base: bytes, target: bytes) -> list[tuple[np.ndarray, np.ndarray]]:
    """(old, new) values of each float32 layer weight that differs between two versions."""
    pairs = []
    for weight in dict.fromkeys(w for layer in _layers(base) for w in layer):
        if weight.dtype is np.float32:
            old, new = _values(base, weight), _values(target, weight)
            if not np.array_equal(old.view(np.uint32), new.view(np.uint32)):
                pairs.append((old, new))
    return pairs


def external_buffers(model_bytes: bytes, *, alignment: int = 16) -> bytes:
    """The same model in TFLite's "large model" layout: weights after the flatbuffer.

    Each non-empty buffer loses its inline ``data`` and gets ``offset``/``size`` (from the
    start of the file) pointing at its bytes, appended aligned after the flatbuffer.
    """
    model = schema.ModelT.InitFromPackedBuf(model_bytes, 0)
    moved = []
    for buffer in model.buffers:
        if buffer.data is not None and len(buffer.data):
            moved.append((buffer, np.asarray(buffer.data, np.uint8).tobytes()))
            # Placeholders as wide as the real values, so the second pack has the same size.
            buffer.data, buffer.offset, buffer.size = None, 1 << 40, 1 << 40

    def pack() -> bytes:
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    head, tail = pack(), bytearray()
    for buffer, data in moved:
        tail += bytes(-(len(head) + len(tail)) % alignment)
        buffer.offset, buffer.size = len(head) + len(tail), len(data)
        tail += data
    final = pack()
    assert len(final) == len(head), "offsets changed the flatbuffer's size"
    return final + bytes(tail)


def run_once(model_bytes: bytes) -> np.ndarray:
    """Load ``model_bytes`` in LiteRT and run one inference on zeros: proof that it is valid."""
    interpreter = Interpreter(model_content=model_bytes)
    interpreter.allocate_tensors()
    for detail in interpreter.get_input_details():
        interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def wakeword_model(name: str) -> bytes:
    """One of the microWakeWord models that ``pymicro-wakeword`` ships."""
    return (importlib.resources.files("pymicro_wakeword") / "models" / f"{name}.tflite").read_bytes()


def delta_cases() -> dict[str, bytes]:
    """The base models the delta tests and benchmark use, by name."""
    digits = build_digits_models(version="1.0.0")
    cases = {
        "digits float32": digits["float32"],
        "digits int8": digits["int8"],
        "digits 4 MiB float32": build_large_model(4),
    }
    cases |= {f"{name} (pymicro-wakeword)": wakeword_model(name) for name in WAKEWORD_MODELS}
    return cases
