"""Uploading a .tflite variant: the full pipeline on a real Celery worker, and every kind
of bad input refused with a JSON error that leaves nothing behind."""

import hashlib

import pytest

from fleet.registry.choices import ArtifactStatus
from fleet.registry.models import Artifact
from tests.server.conftest import upload

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("celery_worker_process")]


def test_it_processes_float32_and_int8_variants_to_ready(alice, version_v1, digits):
    models = digits.build_digits_models()
    x, y = digits.golden_set()
    for variant in ("float32", "int8"):
        response = upload(alice.client(), "digits", "1.0.0", variant, models[variant])
        assert response.status_code == 201, response.json()
        body = response.json()
        assert body["status"] == "ready"
        assert body["raw_sha256"] == hashlib.sha256(models[variant]).hexdigest()
        assert body["raw_size"] == len(models[variant])
        assert 0 < body["blob_size"] < body["raw_size"]
        assert body["golden_samples"] == len(x)
        assert body["golden_accuracy"] == pytest.approx(digits.evaluate(models[variant], x, y))
        assert body["tflite_signature"]["inputs"] == [{"name": "x", "shape": [1, 64], "dtype": "float32"}]
        assert len(body["manifest_sha256"]) == 64
    int8 = Artifact.objects.get(variant="int8")
    assert int8.tflite_signature["quantization"] == "int8"
    assert "QUANTIZE" in int8.tflite_signature["ops"]


def test_without_wait_it_answers_202_and_the_worker_finishes(alice, version_v1, digits):
    from tests.conftest import wait_until

    response = upload(
        alice.client(), "digits", "1.0.0", "float32", digits.build_digits_models()["float32"], wait=0
    )
    assert response.status_code == 202
    assert response.json()["status"] == "pending"
    assert response["Location"].endswith(f"/api/v1/artifacts/{response.json()['id']}/")
    artifact = Artifact.objects.get(pk=response.json()["id"])
    wait_until(
        lambda: Artifact.objects.get(pk=artifact.pk).status != ArtifactStatus.PENDING,
        timeout=60,
        message="the worker to process the artifact",
    )
    assert Artifact.objects.get(pk=artifact.pk).status == ArtifactStatus.READY
