"""The quantization factory (issue 12, section 2; docs/quantization.md): a float32 upload
yields int8 and float16 variants through the same pipeline as an upload, each records where
it came from, the version's comparison reports size, accuracy, drop and latency, and a
variant that loses more accuracy than the model allows is rejected, never served."""

import re
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from agent import runtime
from fleet.core.errors import Conflict, InvalidInput
from fleet.devices import desired
from fleet.registry import quantize, selectors, services
from fleet.registry.choices import ArtifactFailure, ArtifactStatus, QuantRecipe
from fleet.registry.models import Artifact
from tests.conftest import wait_until
from tests.server.conftest import pending_artifact

pytestmark = pytest.mark.django_db
ALL_RECIPES = [QuantRecipe.DYNAMIC_INT8, QuantRecipe.FLOAT16, QuantRecipe.FULL_INT8]


def produce(version, data: bytes, recipes) -> tuple[Artifact, dict[str, Artifact]]:
    """Upload a float32 model asking for ``recipes`` and run every pipeline in-process (a
    `db` test never fires on_commit, so the produced artifacts are processed here; with
    eager Celery in a transactional test they already ran, and this changes nothing)."""
    parent = pending_artifact(version, "float32", data, quantize_recipes=list(recipes))
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
        desired.desired_model_entry(rejected)


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


# --- a real published model: Spotify's Basic Pitch (tests/data/basic_pitch/README.md)

BASIC_PITCH = Path(__file__).resolve().parent.parent / "data" / "basic_pitch" / "nmp.tflite"


def basic_pitch_outputs(tflite: bytes) -> list[np.ndarray]:
    """The model's three outputs (onsets, notes, contours: probabilities) for two seconds of
    a 440 Hz tone with a 660 Hz overtone, straight from LiteRT."""
    interpreter = Interpreter(model_content=tflite)
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]
    t = np.arange(source["shape"][1]) / 22050
    audio = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 660 * t)
    interpreter.set_tensor(source["index"], audio.astype(np.float32).reshape(source["shape"]))
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


def test_a_real_published_float32_model_yields_int8_and_float16_variants(digits_model, alice):
    """No labelled golden set exists for Basic Pitch, so the variants are compared with the
    float32 outputs directly; full-integer int8 has nothing to calibrate on and says so."""
    version = services.version_create(model=digits_model, version="2.0.0", created_by=alice.user)
    float32 = BASIC_PITCH.read_bytes()
    parent, children = produce(version, float32, ALL_RECIPES)
    assert parent.tflite_signature["quantization"] == "none" and parent.latency_ms > 0

    # Outputs, in LiteRT's order: onsets, notes, contours (probabilities). On a steady tone
    # the notes carry the signal (the onsets barely move: their spread is 0.02).
    reference = basic_pitch_outputs(float32)
    assert int((reference[1] > 0.5).sum()) > 100, "the tone must switch notes on, or the check is void"
    for variant, quantization in (("int8-dynamic", "int8"), ("float16", "float16")):
        child = children[variant]
        assert child.status == ArtifactStatus.READY, child.failure_reason
        assert child.tflite_signature["quantization"] == quantization
        assert child.raw_size < 0.7 * parent.raw_size and child.latency_ms > 0
        assert {"CONV_2D", "MIRROR_PAD", "LOG"} <= set(child.tflite_signature["ops"])
        with services.artifact_storage().open(child.raw_file, "rb") as raw:
            outputs = basic_pitch_outputs(raw.read())
        for expected, got in zip(reference, outputs, strict=True):
            assert np.abs(expected - got).mean() < 0.03
        notes = np.corrcoef(reference[1].ravel(), outputs[1].ravel())[0, 1]
        contours = np.corrcoef(reference[2].ravel(), outputs[2].ravel())[0, 1]
        assert notes > 0.95 and contours > 0.85, (variant, notes, contours)
    assert children["int8-full"].status == ArtifactStatus.FAILED
    assert "golden set" in children["int8-full"].failure_reason


# --- the admin's version page and the API


def test_the_version_page_compares_variants_in_rounded_units(version_v1, digits, settings, bob):
    settings.QUANT_MAX_ACCURACY_DROP_PP = 1.0
    parent, children = produce(
        version_v1, outlier_float_model(digits), [QuantRecipe.DYNAMIC_INT8, QuantRecipe.FLOAT16]
    )
    client = Client()
    client.force_login(bob.user)
    response = client.get(f"/admin/registry/modelversion/{version_v1.pk}/change/")
    assert response.status_code == 200
    html = response.content.decode()

    def cells(variant: str) -> tuple[str, dict[str, str]]:
        row = re.search(rf'<tr data-variant="{variant}">(.*?)</tr>', html, re.S).group(1)
        return row, dict(re.findall(r'data-figure="([a-z]+)">([^<]*)<', row))

    rejected_row, rejected = cells("int8-dynamic")
    drop = (parent.golden_accuracy - children["int8-dynamic"].golden_accuracy) * 100
    assert rejected["drop"] == f"{drop:.1f} pp lower"
    assert rejected["latency"] == f"{children['int8-dynamic'].latency_ms:.2f} ms"
    assert rejected["origin"] == f"Dynamic-range int8 weights by ai-edge-quantizer {quantize.tool_version()}"
    assert "Rejected (accuracy)" in rejected_row and rejected["reason"].startswith(
        "Rejected: golden accuracy"
    )
    _, kept = cells("float16")
    assert kept["drop"] == "no change" and kept["origin"].startswith("float16 weights by ")
    _, uploaded = cells("float32")
    assert (uploaded["drop"], uploaded["origin"]) == ("—", "uploaded")
    assert not re.search(r"\d\.\d{3,}", re.sub(r"<[^>]+>", "", rejected_row))  # no unrounded number

    child = children["int8-dynamic"]
    artifact_page = client.get(f"/admin/registry/artifact/{child.pk}/change/").content.decode()
    assert (
        f'Dynamic-range int8 weights of <a href="/admin/registry/artifact/{parent.pk}/change/">'
        in artifact_page
    )
    assert f"{child.latency_ms:.2f} ms" in artifact_page
    model_page = client.get(f"/admin/registry/mlmodel/{version_v1.model.pk}/change/").content.decode()
    assert "1.0 percentage points (the server&#x27;s default)" in model_page


@pytest.mark.django_db(transaction=True)
def test_the_api_takes_recipes_per_upload_and_shows_the_comparison(
    version_v1, digits, alice, celery_worker_process
):
    client = alice.client()
    response = client.post(
        "/api/v1/models/digits/versions/1.0.0/artifacts/?wait=60",
        {
            "variant": "float32",
            "file": SimpleUploadedFile("float32.tflite", digits.build_digits_models()["float32"]),
            "quantize": ["float16", "int8-dynamic"],
        },
        format="multipart",
    )
    assert response.status_code == 201, response.json()
    assert response.json()["requested_recipes"] == ["float16", "int8-dynamic"]

    def produced_ready() -> bool:
        statuses = Artifact.objects.filter(parent_id=response.json()["id"]).values_list("status", flat=True)
        return sorted(statuses) == [ArtifactStatus.READY] * 2

    wait_until(produced_ready, timeout=120, message="the produced variants to be ready")
    body = client.get("/api/v1/models/digits/versions/1.0.0/").json()
    rows = {row["variant"]: row for row in body["comparison"]}
    assert sorted(rows) == ["float16", "float32", "int8-dynamic"]
    assert rows["float16"]["recipe"] == "float16" and rows["float16"]["parent_id"] == response.json()["id"]
    assert rows["int8-dynamic"]["latency_ms"] > 0 and rows["int8-dynamic"]["blob_size"] > 0
    produced = {a["variant"]: a for a in body["artifacts"]}
    assert produced["float16"]["tool"] == "ai-edge-quantizer" and produced["float16"]["parent"]


def test_the_api_refuses_an_unknown_recipe_with_a_clear_error(version_v1, digits, alice):
    response = alice.client().post(
        "/api/v1/models/digits/versions/1.0.0/artifacts/",
        {
            "variant": "float32",
            "file": SimpleUploadedFile("float32.tflite", digits.build_digits_models()["float32"]),
            "quantize": ["int3"],
        },
        format="multipart",
    )
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "quantize"
    assert not Artifact.objects.exists()
