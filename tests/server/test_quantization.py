"""The quantization factory (issue 12, section 2; docs/quantization.md): a float32 upload
yields int8 and float16 variants through the same pipeline as an upload, each records where
it came from, the version's comparison reports size, accuracy, drop and latency, and a
variant that loses more accuracy than the model allows is rejected, never served."""

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from agent import runtime
from fleet.core.errors import Conflict, InvalidInput
from fleet.registry import quantize, selectors, services
from fleet.registry.choices import ArtifactFailure, ArtifactStatus, QuantRecipe
from fleet.registry.models import Artifact
from tests.server.conftest import pending_artifact

pytest.importorskip("ai_edge_quantizer", reason="ai-edge-quantizer is in requirements/base.txt")

pytestmark = pytest.mark.django_db
ALL_RECIPES = [QuantRecipe.DYNAMIC_INT8, QuantRecipe.FLOAT16, QuantRecipe.FULL_INT8]


def produce(version, data: bytes, recipes) -> tuple[Artifact, dict[str, Artifact]]:
    """Upload a float32 model asking for ``recipes`` and run every pipeline in-process (a
    `db` test never fires on_commit, so the produced artifacts are processed here)."""
    parent = pending_artifact(version, "float32", data)
    Artifact.objects.filter(pk=parent.pk).update(requested_recipes=list(recipes))
    parent = services.artifact_process(artifact_id=parent.pk)
    assert parent.status == ArtifactStatus.READY, parent.failure_reason
    children = {}
    for child in parent.derived.all():
        children[child.variant] = services.artifact_process(artifact_id=child.pk)
    return parent, children


def accuracy(tflite: bytes, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy straight from LiteRT (not agent.runtime, which the pipeline uses):
    an int8 input is quantized here by hand with the tensor's scale and zero point."""
    interpreter = Interpreter(model_content=tflite)
    interpreter.allocate_tensors()
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    correct = 0
    for sample, label in zip(x, y, strict=True):
        value = sample.reshape(1, -1)
        if source["dtype"] == np.int8:
            scale, zero_point = source["quantization"]
            value = np.clip(np.round(value / scale + zero_point), -128, 127)
        interpreter.set_tensor(source["index"], value.astype(source["dtype"]))
        interpreter.invoke()
        correct += int(np.argmax(interpreter.get_tensor(target["index"])) == label)
    return correct / len(y)


def outlier_float_model(digits) -> bytes:
    """The digits MLP with, in every hidden unit, a huge weight on pixel 0 (the top-left
    corner, 0 in every digits sample). float32 and float16 answer exactly as before; int8
    per-channel scales stretch to the outlier and round the real weights to zero."""
    weights = digits._train(digits._RECIPES["1.0.0"])
    x, _ = digits.golden_set()
    assert not x[:, 0].any(), "the control needs a pixel that is always 0"
    w1 = weights.w1.copy()
    w1[0, :] = 5000 * np.abs(w1).max()
    return digits._float_mlp(w1, weights.b1, weights.w2, weights.b2, description="digits with outliers")


def test_a_float32_upload_yields_three_variants_through_the_whole_pipeline(version_v1, digits):
    float32 = digits.build_digits_models()["float32"]
    parent, children = produce(version_v1, float32, ALL_RECIPES)

    assert sorted(children) == sorted(ALL_RECIPES)
    expected_quantization = {"int8-dynamic": "int8", "float16": "float16", "int8-full": "int8"}
    for variant, child in children.items():
        assert child.status == ArtifactStatus.READY, child.failure_reason
        assert (child.parent_id, child.recipe, child.tool) == (parent.pk, variant, "ai-edge-quantizer")
        assert child.tool_version == quantize.tool_version() != ""
        assert child.tflite_signature["quantization"] == expected_quantization[variant]
        assert child.raw_size < parent.raw_size
        assert child.manifest_sha256 and child.blob_sha256 and child.latency_ms > 0
        # Scored on the same golden set as the parent, independently of the pipeline.
        with services.artifact_storage().open(child.raw_file, "rb") as raw:
            produced = raw.read()
        x, y = digits.golden_set()
        assert child.golden_accuracy == pytest.approx(accuracy(produced, x, y))
        assert abs(child.golden_accuracy - parent.golden_accuracy) <= 0.02
    assert children["int8-full"].calibration_samples == version_v1.golden_samples
    assert "DEQUANTIZE" in children["float16"].tflite_signature["ops"]


def test_the_comparison_has_a_row_per_variant_with_drop_against_float32(version_v1, digits):
    parent, children = produce(version_v1, digits.build_digits_models()["float32"], ALL_RECIPES)
    rows = {row["variant"]: row for row in selectors.version_comparison(version_v1)}

    assert sorted(rows) == sorted(["float32", *ALL_RECIPES])
    assert rows["float32"]["accuracy_drop_pp"] is None and rows["float32"]["recipe"] == ""
    for variant, child in children.items():
        row = rows[variant]
        assert row["accuracy_drop_pp"] == pytest.approx(
            (parent.golden_accuracy - child.golden_accuracy) * 100
        )
        assert (row["raw_size"], row["blob_size"]) == (child.raw_size, child.blob_size)
        assert row["latency_ms"] == child.latency_ms and row["ops"] == child.tflite_signature["ops"]
        assert row["parent_id"] == parent.pk and row["tool"].startswith("ai-edge-quantizer ")


def test_a_variant_over_the_accuracy_limit_is_rejected_and_never_served(version_v1, digits, settings):
    settings.QUANT_MAX_ACCURACY_DROP_PP = 1.0
    parent, children = produce(
        version_v1, outlier_float_model(digits), [QuantRecipe.DYNAMIC_INT8, QuantRecipe.FLOAT16]
    )
    rejected, kept = children["int8-dynamic"], children["float16"]

    # Positive control: the same model's float16 variant keeps its accuracy and is released.
    assert kept.status == ArtifactStatus.READY
    assert kept.golden_accuracy == pytest.approx(parent.golden_accuracy)
    assert rejected.status == ArtifactStatus.REJECTED
    assert rejected.failure_code == ArtifactFailure.ACCURACY_DROP
    drop = (parent.golden_accuracy - rejected.golden_accuracy) * 100
    assert drop > 1.0
    assert f"{drop:.1f} pp" in rejected.failure_reason and "1.0 pp limit" in rejected.failure_reason
    with pytest.raises(Conflict):
        selectors.artifact_ready(rejected)
    with pytest.raises(Exception, match="not ready"):
        services.desired_model_entry(rejected)


def test_a_models_own_limit_overrides_the_servers(version_v1, digits, settings):
    settings.QUANT_MAX_ACCURACY_DROP_PP = 1.0
    version_v1.model.max_accuracy_drop_pp = 100.0
    version_v1.model.save()
    _, children = produce(version_v1, outlier_float_model(digits), [QuantRecipe.DYNAMIC_INT8])
    assert children["int8-dynamic"].status == ArtifactStatus.READY


def test_the_models_setting_applies_when_the_upload_does_not_say(version_v1, digits):
    version_v1.model.quantize_recipes = [QuantRecipe.FLOAT16]
    version_v1.model.save()
    artifact = pending_artifact(version_v1, "float32", digits.build_digits_models()["float32"])
    assert artifact.requested_recipes == ["float16"]


def test_an_int8_upload_asks_for_nothing_it_cannot_give(version_v1, digits):
    parent = pending_artifact(version_v1, "int8", digits.build_digits_models()["int8"])
    Artifact.objects.filter(pk=parent.pk).update(requested_recipes=[QuantRecipe.FLOAT16])
    services.artifact_process(artifact_id=parent.pk)
    assert not Artifact.objects.filter(parent=parent).exists()


def test_an_unknown_recipe_is_a_clear_error(version_v1, digits):
    with pytest.raises(InvalidInput, match="Unknown recipe 'int2'"):
        services.artifact_upload(
            version=version_v1, variant="float32", upload=None, quantize_recipes=["int2"]
        )


def test_full_integer_without_calibration_samples_fails_with_a_reason(digits_model, digits, alice):
    version = services.version_create(model=digits_model, version="1.0.0", created_by=alice.user)
    produce(version, digits.build_digits_models()["float32"], [QuantRecipe.FULL_INT8])
    failed = Artifact.objects.get(variant="int8-full", version=version)
    assert failed.status == ArtifactStatus.FAILED
    assert failed.failure_code == ArtifactFailure.QUANTIZATION_FAILED
    assert "golden set" in failed.failure_reason


def test_produced_int8_full_takes_float_samples_through_the_agent_runtime(version_v1, digits, tmp_path):
    _, children = produce(version_v1, digits.build_digits_models()["float32"], [QuantRecipe.FULL_INT8])
    path = tmp_path / "full.tflite"
    with services.artifact_storage().open(children["int8-full"].raw_file, "rb") as raw:
        path.write_bytes(raw.read())
    interpreter = runtime.load(path)
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    x, y = digits.golden_set()
    assert runtime.golden_accuracy(interpreter, x, y) == pytest.approx(children["int8-full"].golden_accuracy)
