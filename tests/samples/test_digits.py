"""Tests for samples.digits: the generated files must be real, runnable TFLite."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from samples import digits

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def golden() -> tuple[np.ndarray, np.ndarray]:
    return digits.golden_set()


@pytest.fixture(scope="module")
def accuracies(golden: tuple[np.ndarray, np.ndarray]) -> dict[tuple[str, str], float]:
    """Golden-set accuracy per (version, variant), computed once for the module."""
    x, y = golden
    return {(m.version, m.variant): digits.evaluate(m.tflite, x, y) for m in digits.sample_models()}


def _parse(tflite: bytes) -> schema.ModelT:
    return schema.ModelT.InitFromPackedBuf(bytearray(tflite), 0)


def _fc_weight_types(tflite: bytes) -> list[int]:
    """Tensor type of the weights input (index 1) of every FULLY_CONNECTED."""
    model = _parse(tflite)
    subgraph = model.subgraphs[0]
    types = []
    for op in subgraph.operators:
        if model.operatorCodes[op.opcodeIndex].builtinCode == (schema.BuiltinOperator.FULLY_CONNECTED):
            types.append(subgraph.tensors[op.inputs[1]].type)
    return types


# --- file format and I/O -------------------------------------------------


@pytest.mark.parametrize("sample", digits.sample_models(), ids=lambda m: m.filename)
def test_every_sample_is_tfl3_with_expected_io(sample: digits.SampleModel) -> None:
    assert sample.tflite[4:8] == b"TFL3"
    assert schema.Model.ModelBufferHasIdentifier(sample.tflite, 0)
    model = _parse(sample.tflite)
    assert model.version == 3
    assert model.description

    interpreter = Interpreter(model_content=sample.tflite)
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    assert (inp["name"], list(inp["shape"]), inp["dtype"]) == ("x", [1, 64], np.float32)
    assert (out["name"], list(out["shape"]), out["dtype"]) == (
        "probs",
        [1, 10],
        np.float32,
    )
    assert interpreter.get_signature_list() == {"serving_default": {"inputs": ["x"], "outputs": ["probs"]}}


def test_probs_are_a_distribution(golden: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = golden
    for tflite in digits.build_digits_models().values():
        interpreter = Interpreter(model_content=tflite)
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x[:1])
        interpreter.invoke()
        probs = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        assert np.all(probs >= 0)
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)


def test_int8_variant_is_really_quantized() -> None:
    models = digits.build_digits_models()
    assert _fc_weight_types(models["float32"]) == [schema.TensorType.FLOAT32] * 2
    assert _fc_weight_types(models["int8"]) == [schema.TensorType.INT8] * 2

    ops = _parse(models["int8"]).operatorCodes
    assert [op.builtinCode for op in ops] == [
        schema.BuiltinOperator.QUANTIZE,
        schema.BuiltinOperator.FULLY_CONNECTED,
        schema.BuiltinOperator.FULLY_CONNECTED,
        schema.BuiltinOperator.DEQUANTIZE,
        schema.BuiltinOperator.SOFTMAX,
    ]
    # Weights dominate the file, so int8 weights should make it far smaller.
    assert len(models["int8"]) < 0.5 * len(models["float32"])


def test_int8_quantization_params_follow_tflite_spec() -> None:
    interpreter = Interpreter(model_content=digits.build_digits_models()["int8"])
    tensors = {t["name"]: t for t in interpreter.get_tensor_details()}
    # Each FC layer and the int8 activation feeding it.
    for layer, layer_input in (("dense", "x/quantized"), ("logits", "dense/relu")):
        weights, bias = tensors[f"{layer}/weights"], tensors[f"{layer}/bias"]
        assert weights["dtype"] == np.int8 and bias["dtype"] == np.int32
        weight_scale, weight_zp = weights["quantization"]
        bias_scale, bias_zp = bias["quantization"]
        input_scale = tensors[layer_input]["quantization"][0]
        assert weight_zp == 0 and bias_zp == 0  # symmetric
        assert bias_scale == pytest.approx(input_scale * weight_scale)


# --- accuracy ------------------------------------------------------------


def test_golden_set_shape_and_npz_roundtrip() -> None:
    x, y = digits.golden_set()
    assert x.dtype == np.float32 and x.shape == (digits.GOLDEN_SIZE, 64)
    assert y.dtype == np.int64 and y.shape == (digits.GOLDEN_SIZE,)
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert set(y.tolist()) == set(range(10))

    loaded = np.load(io.BytesIO(digits.golden_set_npz()))
    np.testing.assert_array_equal(loaded["x"], x)
    np.testing.assert_array_equal(loaded["y"], y)


@pytest.mark.parametrize("version", ["1.0.0", "2.0.0"])
def test_good_versions_are_accurate(accuracies: dict[tuple[str, str], float], version: str) -> None:
    assert accuracies[(version, "float32")] >= 0.9
    assert abs(accuracies[(version, "int8")] - accuracies[(version, "float32")]) <= 0.03


def test_v2_is_at_least_comparable_to_v1(
    accuracies: dict[tuple[str, str], float],
) -> None:
    assert accuracies[("2.0.0", "float32")] >= accuracies[("1.0.0", "float32")] - 0.02


@pytest.mark.parametrize("variant", digits.VARIANTS)
def test_worse_version_is_clearly_worse(accuracies: dict[tuple[str, str], float], variant: str) -> None:
    good, worse = accuracies[("1.0.0", variant)], accuracies[("3.0.0", variant)]
    assert good - worse >= 0.15
    assert 0.5 <= worse <= 0.8  # still a plausible model, just a bad one


def test_quality_maps_to_versions() -> None:
    assert digits.build_digits_models(quality="good") == digits.build_digits_models(version="1.0.0")
    assert digits.build_digits_models(quality="worse") == digits.build_digits_models(version="3.0.0")
    with pytest.raises(ValueError):
        digits.build_digits_models(quality="great")
    with pytest.raises(ValueError):
        digits.build_digits_models(version="9.9.9")


# --- determinism ---------------------------------------------------------


def test_building_twice_gives_identical_bytes() -> None:
    first = {m.filename: m.tflite for m in digits.sample_models()}
    first_npz = digits.golden_set_npz()
    # Clear the in-process caches so the second build really retrains.
    for cached in (digits._build_version, digits._train, digits._dataset):
        cached.cache_clear()
    second = {m.filename: m.tflite for m in digits.sample_models()}
    assert first == second
    assert digits.golden_set_npz() == first_npz
    assert digits.build_large_model(0.5) == digits.build_large_model(0.5)
    assert digits.build_unloadable_model() == digits.build_unloadable_model()


# --- benchmark and negative-test helpers ---------------------------------


def test_large_model_has_requested_size_and_runs() -> None:
    size_mb = 5.0
    tflite = digits.build_large_model(size_mb)
    assert abs(len(tflite) - size_mb * 2**20) <= 0.1 * size_mb * 2**20

    interpreter = Interpreter(model_content=tflite)
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    assert (inp["name"], list(inp["shape"])) == ("x", [1, 64])
    assert (out["name"], list(out["shape"])) == ("probs", [1, 10])
    interpreter.set_tensor(inp["index"], digits.golden_set()[0][:1])
    interpreter.invoke()
    assert np.all(np.isfinite(interpreter.get_tensor(out["index"])))


def test_large_model_rejects_non_positive_size() -> None:
    with pytest.raises(ValueError):
        digits.build_large_model(0)


def test_unloadable_model_parses_but_interpreter_refuses() -> None:
    tflite = digits.build_unloadable_model()
    assert tflite[4:8] == b"TFL3"
    assert _parse(tflite).subgraphs[0].operators  # well-formed flatbuffer
    with pytest.raises((RuntimeError, ValueError)):
        interpreter = Interpreter(model_content=tflite)
        interpreter.allocate_tensors()


# --- files and CLI -------------------------------------------------------


def test_write_samples_writes_all_files(tmp_path: Path) -> None:
    summary = digits.write_samples(tmp_path)
    expected = {
        f"digits-{version}-{variant}.tflite"
        for version in ("1.0.0", "2.0.0", "3.0.0", "4.0.0")
        for variant in ("float32", "int8")
    }
    assert {p.name for p in tmp_path.iterdir()} == expected | {"golden.npz"}
    assert {m["file"] for m in summary["models"]} == expected
    for model in summary["models"]:
        assert (tmp_path / model["file"]).stat().st_size == model["size_bytes"]
    assert summary["labels"] == [str(d) for d in range(10)]


def test_cli_writes_files_and_prints_table(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "samples.digits", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "digits-1.0.0-float32.tflite" in result.stdout
    assert "accuracy" in result.stdout
    assert (tmp_path / "golden.npz").exists()
