"""Every kind of bad upload answers a JSON error with its own code, and leaves no file in
raw/ or blobs/ and no ready artifact behind."""

import io

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from fleet.registry import services
from fleet.registry.choices import ArtifactStatus, VersionStatus
from fleet.registry.models import Artifact, ModelVersion
from fleet.registry.uploads import LimitedTemporaryFileUploadHandler
from tests.server.conftest import stored_files, upload

pytestmark = pytest.mark.django_db


def artifact_files() -> list:
    return stored_files("raw") + stored_files("blobs")


def assert_refused(response, status_code: int, code: str, files_before: list) -> dict:
    assert response.status_code == status_code, response.content
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    assert artifact_files() == files_before
    assert not Artifact.objects.filter(status=ArtifactStatus.READY).exists()
    return error


@pytest.fixture
def float32_model(digits) -> bytes:
    return digits.build_digits_models()["float32"]


def test_it_refuses_an_empty_file(alice, version_v1):
    before = artifact_files()
    response = upload(alice.client(), "digits", "1.0.0", "float32", b"", wait=0)
    error = assert_refused(response, 400, "empty_file", before)
    assert error["field"] == "file"
    assert not Artifact.objects.exists()


def test_it_refuses_a_file_that_is_not_a_flatbuffer(alice, version_v1):
    before = artifact_files()
    response = upload(
        alice.client(), "digits", "1.0.0", "float32", b"this is a text file, not a model\n" * 4, wait=0
    )
    assert_refused(response, 422, "not_flatbuffer", before)
    assert not Artifact.objects.exists()


def test_it_refuses_a_flatbuffer_with_the_wrong_file_identifier(alice, version_v1, float32_model):
    before = artifact_files()
    wrong = float32_model[:4] + b"XXXX" + float32_model[8:]
    response = upload(alice.client(), "digits", "1.0.0", "float32", wrong, wait=0)
    assert_refused(response, 422, "wrong_identifier", before)
    assert not Artifact.objects.exists()


def assert_failed_in_the_pipeline(response, code: str, files_before: list) -> Artifact:
    """The request only checks the header (the sandbox parses the rest): the upload is
    accepted, and the pipeline fails the artifact with ``code`` and removes its files."""
    assert response.status_code == 202, response.content
    artifact = services.artifact_process(artifact_id=response.json()["id"])
    assert (artifact.status, artifact.failure_code) == (ArtifactStatus.FAILED, code), artifact.failure_reason
    assert artifact.failure_reason
    assert artifact.raw_file == artifact.blob_file == artifact.manifest_envelope == ""
    assert artifact_files() == files_before
    return artifact


def test_the_pipeline_refuses_a_truncated_model(alice, version_v1, float32_model):
    before = artifact_files()
    half = float32_model[: len(float32_model) // 2]
    response = upload(alice.client(), "digits", "1.0.0", "float32", half, wait=0)
    artifact = assert_failed_in_the_pipeline(response, "truncated", before)
    assert "outside the file" in artifact.failure_reason


def test_it_refuses_an_upload_over_the_size_limit(alice, version_v1, float32_model, settings):
    settings.ARTIFACT_MAX_UPLOAD_BYTES = 1000
    assert len(float32_model) > 10 * 1000
    before = artifact_files()
    response = upload(alice.client(), "digits", "1.0.0", "float32", float32_model, wait=0)
    error = assert_refused(response, 413, "too_large", before)
    assert "ARTIFACT_MAX_UPLOAD_BYTES" in error["message"]
    assert not Artifact.objects.exists()


def test_it_refuses_a_request_that_announces_a_big_content_length(alice, version_v1, settings):
    settings.ARTIFACT_MAX_UPLOAD_BYTES = 1000
    before = artifact_files()
    # The body itself is tiny: only the declared length can be what is refused.
    declared = 1000 + LimitedTemporaryFileUploadHandler.ENVELOPE_SLACK_BYTES + 1
    response = alice.client().post(
        "/api/v1/models/digits/versions/1.0.0/artifacts/",
        {"variant": "float32", "file": SimpleUploadedFile("float32.tflite", b"tiny")},
        format="multipart",
        CONTENT_LENGTH=str(declared),
    )
    assert_refused(response, 413, "too_large", before)
    assert not Artifact.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("celery_worker_process")
def test_the_worker_fails_a_model_the_interpreter_cannot_load(alice, version_v1, digits):
    before = artifact_files()
    response = upload(alice.client(), "digits", "1.0.0", "float32", digits.build_unloadable_model(), wait=60)
    error = assert_refused(response, 422, "unloadable_model", before)
    assert error["field"] == "file"
    assert error["artifact"]["status"] == "failed"
    artifact = Artifact.objects.get(pk=error["artifact"]["id"])
    assert artifact.status == ArtifactStatus.FAILED
    assert artifact.failure_code == "unloadable_model"
    assert artifact.failure_reason
    assert artifact.raw_file == artifact.blob_file == ""
    assert artifact.manifest_envelope == ""


def test_it_refuses_a_version_that_is_not_semver(alice, digits_model, golden_npz):
    golden_before = stored_files("golden")
    response = alice.client().post(
        "/api/v1/models/digits/versions/",
        {"version": "1.0", "golden_set": SimpleUploadedFile("golden.npz", golden_npz)},
        format="multipart",
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_semver"
    assert response.json()["error"]["field"] == "version"
    assert not ModelVersion.objects.exists()
    assert stored_files("golden") == golden_before


def test_it_refuses_a_duplicate_version(alice, version_v1, golden_npz):
    golden_before = stored_files("golden")
    response = alice.client().post(
        "/api/v1/models/digits/versions/",
        {"version": "1.0.0", "golden_set": SimpleUploadedFile("golden.npz", golden_npz)},
        format="multipart",
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "duplicate_version"
    assert ModelVersion.objects.count() == 1
    assert stored_files("golden") == golden_before


def test_it_refuses_a_duplicate_variant(alice, version_v1, float32_model):
    first = upload(alice.client(), "digits", "1.0.0", "float32", float32_model, wait=0)
    assert first.status_code == 202, first.json()
    before = artifact_files()
    response = upload(alice.client(), "digits", "1.0.0", "float32", float32_model, wait=0)
    error = assert_refused(response, 409, "duplicate_variant", before)
    assert error["field"] == "variant"
    assert Artifact.objects.count() == 1


def test_a_failed_variant_does_not_block_a_new_upload_of_the_same_name(
    alice, version_v1, float32_model, digits
):
    broken = upload(alice.client(), "digits", "1.0.0", "float32", digits.build_unloadable_model(), wait=0)
    assert broken.status_code == 202, broken.json()
    failed = services.artifact_process(artifact_id=broken.json()["id"])
    assert failed.status == ArtifactStatus.FAILED

    retry = upload(alice.client(), "digits", "1.0.0", "float32", float32_model, wait=0)
    assert retry.status_code == 202, retry.json()
    ready = services.artifact_process(artifact_id=retry.json()["id"])
    assert ready.status == ArtifactStatus.READY
    assert ready.variant == "float32"
    assert Artifact.objects.filter(version=version_v1, variant="float32").count() == 2


def test_it_refuses_an_upload_to_an_unknown_model(alice, float32_model):
    before = artifact_files()
    response = upload(alice.client(), "nope", "1.0.0", "float32", float32_model, wait=0)
    assert_refused(response, 404, "unknown_model", before)


def test_it_refuses_an_upload_to_an_unknown_version(alice, version_v1, float32_model):
    before = artifact_files()
    response = upload(alice.client(), "digits", "9.9.9", "float32", float32_model, wait=0)
    assert_refused(response, 404, "unknown_version", before)
    assert not Artifact.objects.exists()


def test_the_pipeline_refuses_a_model_whose_input_does_not_fit_the_golden_set(
    alice, digits_model, float32_model
):
    npz = io.BytesIO()
    np.savez(npz, x=np.zeros((5, 32), dtype=np.float32), y=np.arange(5))
    services.version_create(
        model=digits_model,
        version="2.0.0",
        golden_set=SimpleUploadedFile("golden.npz", npz.getvalue()),
        created_by=alice.user,
    )
    before = artifact_files()
    response = upload(alice.client(), "digits", "2.0.0", "float32", float32_model, wait=0)
    artifact = assert_failed_in_the_pipeline(response, "golden_shape_mismatch", before)
    assert "32" in artifact.failure_reason


def _npz(compressed: bool = True, **arrays) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("golden", "words"),
    [
        # 20 000 samples deflate to a few kilobytes: the file limit alone would let them in.
        (lambda: _npz(x=np.zeros((20_000, 64), np.float32), y=np.zeros(20_000, np.int64)), "20000 samples"),
        # 4 096 samples of 4 096 floats: 64 MiB unpacked from about 70 KiB.
        (lambda: _npz(x=np.zeros((4096, 4096), np.float32), y=np.zeros(4096, np.int64)), "bytes unpacked"),
        (
            lambda: _npz(compressed=False, x=np.array([{"a": 1}] * 3, dtype=object), y=np.arange(3)),
            "Python objects",
        ),
    ],
    ids=["too-many-samples", "zip-bomb", "pickled-objects"],
)
def test_it_refuses_a_golden_set_over_the_limits_or_with_pickles(alice, digits_model, golden, words):
    data = golden()
    assert len(data) < 1024 * 1024
    golden_before = stored_files("golden")
    response = alice.client().post(
        "/api/v1/models/digits/versions/",
        {"version": "2.0.0", "golden_set": SimpleUploadedFile("golden.npz", data)},
        format="multipart",
    )
    assert response.status_code == 422, response.content
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_golden_set", "golden_set")
    assert words in error["message"], error["message"]
    assert not ModelVersion.objects.exists()
    assert stored_files("golden") == golden_before


def test_a_golden_set_at_the_limits_is_accepted(alice, digits_model, settings):
    settings.GOLDEN_SET_MAX_SAMPLES = 20_000
    data = _npz(x=np.zeros((20_000, 64), np.float32), y=np.zeros(20_000, np.int64))
    response = alice.client().post(
        "/api/v1/models/digits/versions/",
        {"version": "2.0.0", "golden_set": SimpleUploadedFile("golden.npz", data)},
        format="multipart",
    )
    assert response.status_code == 201, response.content


@pytest.mark.parametrize(
    ("variant", "code"),
    [
        ("Float32", "invalid_variant"),
        ("int 8", "invalid_variant"),
        ("-int8", "invalid_variant"),
        ("../int8", "invalid_variant"),
        # Over 64 characters the serializer refuses it before the service sees it.
        ("x" * 65, "max_length"),
    ],
)
def test_it_refuses_an_invalid_variant_name(alice, version_v1, float32_model, variant, code):
    before = artifact_files()
    response = upload(alice.client(), "digits", "1.0.0", variant, float32_model, wait=0)
    error = assert_refused(response, 400, code, before)
    assert error["field"] == "variant"
    assert not Artifact.objects.exists()


def test_it_refuses_an_upload_without_a_file(alice, version_v1):
    before = artifact_files()
    response = alice.client().post(
        "/api/v1/models/digits/versions/1.0.0/artifacts/", {"variant": "float32"}, format="multipart"
    )
    error = assert_refused(response, 400, "required", before)
    assert error["field"] == "file"
    assert not Artifact.objects.exists()


def test_it_refuses_an_upload_without_a_variant(alice, version_v1, float32_model):
    before = artifact_files()
    response = alice.client().post(
        "/api/v1/models/digits/versions/1.0.0/artifacts/",
        {"file": SimpleUploadedFile("float32.tflite", float32_model)},
        format="multipart",
    )
    error = assert_refused(response, 400, "required", before)
    assert error["field"] == "variant"
    assert not Artifact.objects.exists()


def test_it_refuses_an_upload_to_a_revoked_version(alice, version_v1, float32_model):
    services.version_set_status(version=version_v1, status=VersionStatus.REVOKED)
    before = artifact_files()
    response = upload(alice.client(), "digits", "1.0.0", "float32", float32_model, wait=0)
    assert_refused(response, 409, "version_revoked", before)
    assert not Artifact.objects.exists()


def test_bob_the_viewer_cannot_upload(bob, version_v1, float32_model):
    before = artifact_files()
    response = upload(bob.client(), "digits", "1.0.0", "float32", float32_model, wait=0)
    assert_refused(response, 403, "permission_denied", before)
    assert not Artifact.objects.exists()
