"""Real ``.tflite`` sample models for Modelfleet demos, tests and benchmarks.

Modelfleet has to handle genuine TFLite artefacts (upload, validate, run,
roll back), but TensorFlow is not available here. So this module trains a tiny
MLP on scikit-learn's bundled digits dataset and writes the model with the
TFLite flatbuffer schema that ships inside LiteRT. Every model it produces
loads and runs in ``ai_edge_litert.interpreter.Interpreter``.

The version story used by the product demo:

* ``1.0.0`` good model (32 hidden units),
* ``2.0.0`` good model retrained with another seed and 48 hidden units,
* ``3.0.0`` a worse model (trained on only 30 samples), for rollback demos.

Each version comes as a ``float32`` and an ``int8`` (post-training quantized)
variant with identical I/O, so the same golden set and client code work for
all of them: input ``x`` float32 [1, 64] -> output ``probs`` float32 [1, 10].

Run ``python -m samples.digits --out DIR`` to write the files.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

LABELS: list[str] = [str(digit) for digit in range(10)]
VARIANTS: tuple[str, ...] = ("float32", "int8")
INPUT_NAME = "x"
OUTPUT_NAME = "probs"
NUM_FEATURES = 64
NUM_CLASSES = 10
GOLDEN_SIZE = 200
_SPLIT_SEED = 0
_BUFFER_ALIGNMENT = 16
_TFLITE_TYPES = {
    np.float32: schema.TensorType.FLOAT32,
    np.int8: schema.TensorType.INT8,
    np.int32: schema.TensorType.INT32,
}


@dataclass(frozen=True)
class SampleModel:
    """One built model file, identified the way Modelfleet registers it."""

    version: str  # semver, e.g. "1.0.0"
    variant: str  # "float32" | "int8"
    tflite: bytes

    @property
    def filename(self) -> str:
        return f"digits-{self.version}-{self.variant}.tflite"


@dataclass(frozen=True)
class _Recipe:
    """How one model version is trained; hashable so results can be cached."""

    hidden_units: int
    seed: int
    train_samples: int | None  # None means the whole training split
    max_iter: int


_RECIPES: dict[str, _Recipe] = {
    "1.0.0": _Recipe(hidden_units=32, seed=0, train_samples=None, max_iter=300),
    "2.0.0": _Recipe(hidden_units=48, seed=1, train_samples=None, max_iter=300),
    # Few samples gives a plausible "bad retrain" at ~70% instead of ~97%.
    "3.0.0": _Recipe(hidden_units=32, seed=0, train_samples=30, max_iter=300),
    # Another bad retrain (~76 %), on other samples: it disagrees with the good models on
    # about a quarter of the inputs, which the demo's shadow stage catches before it
    # serves anyone.
    "4.0.0": _Recipe(hidden_units=32, seed=5, train_samples=50, max_iter=300),
}
_QUALITY_VERSIONS = {"good": "1.0.0", "worse": "3.0.0"}


@dataclass(frozen=True)
class _Weights:
    """Dense weights in sklearn layout: w1 is [in, hidden], w2 is [hidden, out]."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _dataset() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_test, y_test), features scaled to [0, 1]."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    # Stratified so the golden set covers every class.
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=_SPLIT_SEED, stratify=y
    )
    return x_train, y_train, x_test, y_test


def golden_set() -> tuple[np.ndarray, np.ndarray]:
    """Held-out samples (never trained on) used to score every model version.

    Returns copies so callers cannot corrupt the cached dataset.
    """
    _, _, x_test, y_test = _dataset()
    return x_test[:GOLDEN_SIZE].copy(), y_test[:GOLDEN_SIZE].copy()


def golden_set_npz() -> bytes:
    """The golden set as ``.npz`` bytes with arrays ``x`` (float32) and ``y`` (int64).

    ``np.savez`` stamps the current time into the zip, so we write the archive
    ourselves with a fixed timestamp: identical bytes on every build keep
    checksums (and Modelfleet's content hashes) stable.
    """
    x, y = golden_set()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in (("x", x), ("y", y)):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w") as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return out.getvalue()


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _train(recipe: _Recipe) -> _Weights:
    """Train an MLP deterministically and return its float32 weights."""
    x_train, y_train, _, _ = _dataset()
    if recipe.train_samples is not None:
        x_train = x_train[: recipe.train_samples]
        y_train = y_train[: recipe.train_samples]
    classifier = MLPClassifier(
        hidden_layer_sizes=(recipe.hidden_units,),
        activation="relu",
        max_iter=recipe.max_iter,
        random_state=recipe.seed,
    )
    # The iteration budget is fixed on purpose (fast, reproducible), so the
    # "did not converge" warning is expected noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(x_train, y_train)
    w1, w2 = (w.astype(np.float32) for w in classifier.coefs_)
    b1, b2 = (b.astype(np.float32) for b in classifier.intercepts_)
    return _Weights(w1=w1, b1=b1, w2=w2, b2=b2)


def _hidden_and_logits(weights: _Weights, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float reference forward pass, used to calibrate int8 activation ranges."""
    hidden = np.maximum(x @ weights.w1 + weights.b1, 0.0)
    return hidden, hidden @ weights.w2 + weights.b2


# --------------------------------------------------------------------------
# Flatbuffer writing
# --------------------------------------------------------------------------


class _AlignedBufferT(schema.BufferT):
    """A BufferT whose bytes start on a 16-byte boundary, like the converter's.

    Kernels read weights in place as float32/int32, so unaligned data would
    rely on the CPU tolerating misaligned loads.
    """

    def Pack(self, builder: flatbuffers.Builder) -> int:
        if self.data is not None:
            # Pad so the vector that Pack writes next ends (and so starts) aligned.
            builder.Prep(_BUFFER_ALIGNMENT, len(self.data))
        return super().Pack(builder)


class _Graph:
    """Collects tensors, buffers and operators of a single-subgraph model."""

    def __init__(self) -> None:
        self.tensors: list[schema.TensorT] = []
        # Buffer 0 is the conventional empty buffer for non-constant tensors.
        self.buffers: list[schema.BufferT] = [schema.BufferT()]
        self.opcodes: list[schema.OperatorCodeT] = []
        self.operators: list[schema.OperatorT] = []

    def tensor(
        self,
        name: str,
        shape: list[int],
        dtype: int,
        quant: schema.QuantizationParametersT | None = None,
        *,
        buffer: int = 0,
    ) -> int:
        """Add a tensor and return its index (buffer 0 means computed at runtime)."""
        self.tensors.append(
            schema.TensorT(shape=shape, type=dtype, buffer=buffer, name=name, quantization=quant)
        )
        return len(self.tensors) - 1

    def constant(
        self,
        name: str,
        data: np.ndarray,
        quant: schema.QuantizationParametersT | None = None,
    ) -> int:
        """Add a weight tensor; shape and type come from ``data``, so they agree."""
        buffer = _AlignedBufferT()
        # tobytes() is row-major even for transposed views, as TFLite expects.
        buffer.data = np.frombuffer(data.tobytes(), dtype=np.uint8)
        self.buffers.append(buffer)
        dtype = _TFLITE_TYPES[data.dtype.type]
        return self.tensor(name, list(data.shape), dtype, quant, buffer=len(self.buffers) - 1)

    def op(
        self,
        code: int,
        version: int,
        inputs: list[int],
        outputs: list[int],
        options_type: int = schema.BuiltinOptions.NONE,
        options: object | None = None,
    ) -> None:
        """Append an operator; ``version`` follows TFLite's op_version rules."""
        opcode = schema.OperatorCodeT()
        opcode.builtinCode = code
        # Old runtimes only read the deprecated int8 field.
        opcode.deprecatedBuiltinCode = min(code, schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
        opcode.version = version
        self.opcodes.append(opcode)
        self.operators.append(
            schema.OperatorT(
                opcodeIndex=len(self.opcodes) - 1,
                inputs=inputs,
                outputs=outputs,
                builtinOptionsType=options_type,
                builtinOptions=options,
            )
        )

    def fully_connected(
        self, inputs: list[int], output: int, *, version: int = 1, relu: bool = False
    ) -> None:
        activation = schema.ActivationFunctionType.RELU if relu else schema.ActivationFunctionType.NONE
        options = schema.FullyConnectedOptionsT(fusedActivationFunction=activation)
        self.op(
            schema.BuiltinOperator.FULLY_CONNECTED,
            version,
            inputs,
            [output],
            schema.BuiltinOptions.FullyConnectedOptions,
            options,
        )

    def softmax(self, logits: int, probs: int) -> None:
        options = schema.SoftmaxOptionsT(beta=1.0)
        self.op(
            schema.BuiltinOperator.SOFTMAX,
            1,
            [logits],
            [probs],
            schema.BuiltinOptions.SoftmaxOptions,
            options,
        )

    def serialize(self, *, inputs: list[int], outputs: list[int], description: str) -> bytes:
        """Pack everything into a TFL3 flatbuffer with a serving signature."""
        subgraph = schema.SubGraphT(
            tensors=self.tensors,
            inputs=inputs,
            outputs=outputs,
            operators=self.operators,
            name="main",
        )
        # A signature lets clients use Interpreter.get_signature_runner().
        signature = schema.SignatureDefT(
            inputs=[schema.TensorMapT(name=INPUT_NAME, tensorIndex=inputs[0])],
            outputs=[schema.TensorMapT(name=OUTPUT_NAME, tensorIndex=outputs[0])],
            signatureKey="serving_default",
            subgraphIndex=0,
        )
        model = schema.ModelT(
            version=3,
            operatorCodes=self.opcodes,
            subgraphs=[subgraph],
            description=description,
            buffers=self.buffers,
            signatureDefs=[signature],
        )
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def _float_mlp(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, *, description: str) -> bytes:
    """x -> FC(+bias, RELU) -> FC(+bias) -> SOFTMAX -> probs, all float32.

    Weights come in sklearn layout ([in, out]); TFLite wants [out, in].
    """
    f32 = schema.TensorType.FLOAT32
    hidden_units, classes = w1.shape[1], w2.shape[1]
    g = _Graph()
    x = g.tensor(INPUT_NAME, [1, NUM_FEATURES], f32)
    fc1_w = g.constant("dense/weights", w1.T)
    fc1_b = g.constant("dense/bias", b1)
    hidden = g.tensor("dense/relu", [1, hidden_units], f32)
    fc2_w = g.constant("logits/weights", w2.T)
    fc2_b = g.constant("logits/bias", b2)
    logits = g.tensor("logits", [1, classes], f32)
    probs = g.tensor(OUTPUT_NAME, [1, classes], f32)
    g.fully_connected([x, fc1_w, fc1_b], hidden, relu=True)
    g.fully_connected([hidden, fc2_w, fc2_b], logits)
    g.softmax(logits, probs)
    return g.serialize(inputs=[x], outputs=[probs], description=description)


# --------------------------------------------------------------------------
# Post-training int8 quantization
# --------------------------------------------------------------------------


def _quant(scale: float, zero_point: int) -> schema.QuantizationParametersT:
    return schema.QuantizationParametersT(scale=[float(scale)], zeroPoint=[int(zero_point)])


def _activation_params(values: np.ndarray) -> tuple[float, int]:
    """Asymmetric int8 scale/zero point covering the observed range.

    The range is widened to include 0 so that zero (ReLU output, padding) is
    exactly representable, as TFLite's quantization spec requires.
    """
    low = min(float(values.min()), 0.0)
    high = max(float(values.max()), 0.0)
    scale = (high - low) / 255.0 or 1.0  # all-zero range: any scale works
    zero_point = int(np.clip(round(-128 - low / scale), -128, 127))
    return scale, zero_point


def _symmetric_int8(weights: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-tensor symmetric weights in [-127, 127] with zero point 0 (TFLite spec)."""
    scale = float(np.abs(weights).max()) / 127.0 or 1.0
    quantized = np.clip(np.round(weights / scale), -127, 127).astype(np.int8)
    return quantized, scale


def _int8_mlp(weights: _Weights, calibration: np.ndarray, *, description: str) -> bytes:
    """int8 MLP (integer FC kernels) with float I/O, a drop-in for the float32 one.

    x -> QUANTIZE -> FC(int8, RELU) -> FC(int8) -> DEQUANTIZE -> SOFTMAX -> probs.
    Activation ranges come from a float forward pass over ``calibration``.
    Softmax stays float so ``probs`` is not coarsened to 256 levels.
    """
    f32, i8 = schema.TensorType.FLOAT32, schema.TensorType.INT8
    hidden_units = weights.w1.shape[1]
    hidden_values, logit_values = _hidden_and_logits(weights, calibration)
    x_scale, x_zp = _activation_params(calibration)
    h_scale, h_zp = _activation_params(hidden_values)
    l_scale, l_zp = _activation_params(logit_values)
    w1_q, w1_scale = _symmetric_int8(weights.w1.T)
    w2_q, w2_scale = _symmetric_int8(weights.w2.T)
    # Bias scale must be input_scale * weight_scale for the int8 FC kernel.
    b1_scale, b2_scale = x_scale * w1_scale, h_scale * w2_scale
    b1_q = np.round(weights.b1 / b1_scale).astype(np.int32)
    b2_q = np.round(weights.b2 / b2_scale).astype(np.int32)

    g = _Graph()
    x = g.tensor(INPUT_NAME, [1, NUM_FEATURES], f32)
    x_q = g.tensor("x/quantized", [1, NUM_FEATURES], i8, quant=_quant(x_scale, x_zp))
    fc1_w = g.constant("dense/weights", w1_q, _quant(w1_scale, 0))
    fc1_b = g.constant("dense/bias", b1_q, _quant(b1_scale, 0))
    hidden = g.tensor("dense/relu", [1, hidden_units], i8, quant=_quant(h_scale, h_zp))
    fc2_w = g.constant("logits/weights", w2_q, _quant(w2_scale, 0))
    fc2_b = g.constant("logits/bias", b2_q, _quant(b2_scale, 0))
    logits_q = g.tensor("logits/quantized", [1, NUM_CLASSES], i8, quant=_quant(l_scale, l_zp))
    logits = g.tensor("logits", [1, NUM_CLASSES], f32)
    probs = g.tensor(OUTPUT_NAME, [1, NUM_CLASSES], f32)
    # Versions from TFLite's op_version.cc for these type signatures.
    g.op(schema.BuiltinOperator.QUANTIZE, 1, [x], [x_q])
    g.fully_connected([x_q, fc1_w, fc1_b], hidden, version=4, relu=True)
    g.fully_connected([hidden, fc2_w, fc2_b], logits_q, version=4)
    g.op(schema.BuiltinOperator.DEQUANTIZE, 2, [logits_q], [logits])
    g.softmax(logits, probs)
    return g.serialize(inputs=[x], outputs=[probs], description=description)


# --------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _build_version(version: str) -> tuple[tuple[str, bytes], ...]:
    """Both variants of one version; a tuple so the cached value is immutable."""
    recipe = _RECIPES[version]
    weights = _train(recipe)
    x_train, _, _, _ = _dataset()
    arch = f"MLP {NUM_FEATURES}-{recipe.hidden_units}-{NUM_CLASSES}"
    float_model = _float_mlp(
        weights.w1,
        weights.b1,
        weights.w2,
        weights.b2,
        description=f"Modelfleet sample: digits {arch}, float32, v{version}",
    )
    # Calibrate on the full training split even for the worse model: calibration
    # is a property of the deployment data, not of how the model was trained.
    int8_model = _int8_mlp(
        weights,
        x_train,
        description=f"Modelfleet sample: digits {arch}, int8 PTQ, v{version}",
    )
    return (("float32", float_model), ("int8", int8_model))


def build_digits_models(*, quality: str = "good", version: str | None = None) -> dict[str, bytes]:
    """Build ``{"float32": ..., "int8": ...}`` for one model version.

    ``quality`` picks the demo's good (v1.0.0) or worse (v3.0.0) model; pass
    ``version`` ("1.0.0", "2.0.0", "3.0.0", "4.0.0") to choose explicitly instead.
    Results are cached in-process because tests call this repeatedly.
    """
    if version is None:
        if quality not in _QUALITY_VERSIONS:
            raise ValueError(f"quality must be one of {sorted(_QUALITY_VERSIONS)}, got {quality!r}")
        version = _QUALITY_VERSIONS[quality]
    if version not in _RECIPES:
        raise ValueError(f"version must be one of {sorted(_RECIPES)}, got {version!r}")
    return dict(_build_version(version))


@lru_cache(maxsize=2)
def _head_retrained(version: str, epochs: int) -> tuple[tuple[str, bytes], ...]:
    weights = _train(_RECIPES["1.0.0"])
    x_train, y_train, _, _ = _dataset()
    # New data: the training split with a little pixel noise, as a camera in the field sees it.
    rng = np.random.default_rng(7)
    x_new = np.clip(x_train + rng.normal(0, 0.05, x_train.shape), 0, 1).astype(np.float32)
    hidden = np.maximum(x_new @ weights.w1 + weights.b1, 0)
    onehot = np.eye(NUM_CLASSES, dtype=np.float32)[y_train]
    w2, b2 = weights.w2.copy(), weights.b2.copy()
    for _ in range(epochs):  # full-batch gradient descent on the softmax head, from its weights
        logits = hidden @ w2 + b2
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        grad = (probs - onehot) / len(hidden)
        w2 -= 0.05 * (hidden.T @ grad)
        b2 -= 0.05 * grad.sum(axis=0)
    tuned = _Weights(w1=weights.w1, b1=weights.b1, w2=w2.astype(np.float32), b2=b2.astype(np.float32))
    arch = f"MLP {NUM_FEATURES}-{_RECIPES['1.0.0'].hidden_units}-{NUM_CLASSES}"
    return (
        (
            "float32",
            _float_mlp(
                *(tuned.w1, tuned.b1, tuned.w2, tuned.b2),
                description=f"Modelfleet sample: digits {arch}, float32, v1.0.0 head retrained",
            ),
        ),
        (
            "int8",
            _int8_mlp(
                tuned,
                x_train,
                description=f"Modelfleet sample: digits {arch}, int8 PTQ, v1.0.0 head retrained",
            ),
        ),
    )


def build_head_retrained_models(*, epochs: int = 30) -> dict[str, bytes]:
    """Version 1.0.0 with its classifier head (the last layer) retrained on new data,
    starting from its weights, and the hidden layer frozen: what a team ships when it
    refreshes a model, and what a tensor-level delta is for (docs/protocol.md, addition 11).
    ``{"float32": ..., "int8": ...}``; the hidden layer's bytes are those of 1.0.0."""
    return dict(_head_retrained("1.0.0", epochs))


def sample_models() -> list[SampleModel]:
    """Every version/variant of the demo story, oldest first."""
    return [
        SampleModel(version=version, variant=variant, tflite=tflite)
        for version in _RECIPES
        for variant, tflite in _build_version(version)
    ]


def build_large_model(size_mb: float, *, seed: int = 0) -> bytes:
    """A float32 model of about ``size_mb`` MiB (2**20 bytes) with the digits I/O.

    For upload/download/storage benchmarks: a real, runnable model whose size
    comes from a wide hidden layer of seeded random weights. Its predictions
    are meaningless.
    """
    if size_mb <= 0:
        raise ValueError(f"size_mb must be positive, got {size_mb}")
    # Each hidden unit costs 64 input weights + 10 output weights + 1 bias.
    bytes_per_unit = (NUM_FEATURES + NUM_CLASSES + 1) * 4
    hidden_units = max(1, round(size_mb * 2**20 / bytes_per_unit))
    rng = np.random.default_rng(seed)
    # Scale by 1/sqrt(fan_in) so activations (and softmax) stay finite.
    w1 = rng.standard_normal((NUM_FEATURES, hidden_units), dtype=np.float32)
    w1 /= np.float32(np.sqrt(NUM_FEATURES))
    w2 = rng.standard_normal((hidden_units, NUM_CLASSES), dtype=np.float32)
    w2 /= np.float32(np.sqrt(hidden_units))
    b1 = np.zeros(hidden_units, dtype=np.float32)
    b2 = np.zeros(NUM_CLASSES, dtype=np.float32)
    return _float_mlp(
        w1,
        b1,
        w2,
        b2,
        description=f"Modelfleet benchmark model: {hidden_units} random hidden units",
    )


def build_unloadable_model() -> bytes:
    """A well-formed TFL3 flatbuffer that the interpreter refuses to allocate.

    For negative tests: it parses with the schema and every tensor matches its
    buffer, but the first FC has 32 units and only 31 bias values, so
    ``allocate_tensors()`` fails in the FC kernel itself. (A weight/input width
    mismatch is not enough: only the XNNPACK delegate rejects that, the builtin
    kernel silently runs it.)
    """
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((NUM_FEATURES, 32), dtype=np.float32)
    w2 = rng.standard_normal((32, NUM_CLASSES), dtype=np.float32)
    return _float_mlp(
        w1,
        np.zeros(31, dtype=np.float32),
        w2,
        np.zeros(NUM_CLASSES, dtype=np.float32),
        description="Modelfleet sample: deliberately broken (FC bias size mismatch)",
    )


# --------------------------------------------------------------------------
# Evaluation and files
# --------------------------------------------------------------------------


def evaluate(tflite: bytes, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of ``tflite`` on (x, y), run in LiteRT one sample at a time.

    One sample per invoke matches how devices call the model ([1, 64] input),
    so this also proves the file really runs, not just that it parses.
    """
    interpreter = Interpreter(model_content=tflite)
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    correct = 0
    for features, label in zip(x, y, strict=True):
        interpreter.set_tensor(input_index, features.reshape(1, -1).astype(np.float32))
        interpreter.invoke()
        correct += int(np.argmax(interpreter.get_tensor(output_index)[0]) == label)
    return correct / len(y)


def write_samples(out_dir: Path) -> dict:
    """Write every sample model plus ``golden.npz`` into ``out_dir``.

    Returns a JSON-friendly description (file, version, variant, size,
    golden-set accuracy) so callers can print or register what was written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x, y = golden_set()
    golden_path = out_dir / "golden.npz"
    golden_path.write_bytes(golden_set_npz())
    models = []
    for sample in sample_models():
        (out_dir / sample.filename).write_bytes(sample.tflite)
        models.append(
            {
                "file": sample.filename,
                "version": sample.version,
                "variant": sample.variant,
                "size_bytes": len(sample.tflite),
                "accuracy": evaluate(sample.tflite, x, y),
            }
        )
    return {
        "out_dir": str(out_dir),
        "golden": {"file": golden_path.name, "samples": len(y)},
        "labels": LABELS,
        "input": {"name": INPUT_NAME, "shape": [1, NUM_FEATURES], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": [1, NUM_CLASSES], "dtype": "float32"},
        "models": models,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m samples.digits",
        description=(
            "Train tiny digits classifiers and write them as real .tflite files "
            "(v1.0.0 good, v2.0.0 good, v3.0.0 worse; float32 and int8 each) "
            "plus golden.npz, then print each file's golden-set accuracy."
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory to write into (created if missing)",
    )
    args = parser.parse_args(argv)
    summary = write_samples(args.out)
    print(f"{'file':<30} {'size':>10} {'accuracy':>9}")
    for model in summary["models"]:
        print(f"{model['file']:<30} {model['size_bytes']:>10,} {model['accuracy']:>9.3f}")
    golden = summary["golden"]
    print(f"{golden['file']:<30} {golden['samples']:>10} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
