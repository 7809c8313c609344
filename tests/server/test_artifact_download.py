"""Downloading a ready artifact the way a device does: the signed manifest, the zstd blob
in Range pieces (ETag, If-Range, 416), and the golden set; and the JSON errors for
artifacts that are not ready or do not exist."""

import hashlib
import subprocess

import pytest

from agent import protocol
from agent.protocol import MANIFEST_PAYLOAD_TYPE
from fleet.registry import services
from fleet.registry.choices import ArtifactStatus
from fleet.registry.models import Artifact
from tests.server.conftest import upload

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("celery_worker_process")]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def body(response) -> bytes:
    if response.streaming:
        return b"".join(response.streaming_content)
    return response.content


@pytest.fixture
def float32_model(digits) -> bytes:
    return digits.build_digits_models()["float32"]


@pytest.fixture
def ready_artifact(alice, version_v1, float32_model) -> Artifact:
    response = upload(alice.client(), "digits", "1.0.0", "float32", float32_model, wait=60)
    assert response.status_code == 201, response.json()
    return Artifact.objects.get(pk=response.json()["id"])


def verified_manifest(client, artifact: Artifact) -> tuple[bytes, dict]:
    keys = client.get("/api/v1/signing-keys/")
    assert keys.status_code == 200
    trusted = protocol.trusted_keys([key["public_key"] for key in keys.json()["results"]])
    response = client.get(f"/api/v1/artifacts/{artifact.pk}/manifest")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    payload = protocol.verify(response.content, payload_type=MANIFEST_PAYLOAD_TYPE, keys=trusted)
    return payload, protocol.parse("manifest", payload)


def get_blob(client, artifact: Artifact, **headers):
    return client.get(f"/api/v1/artifacts/{artifact.pk}/blob", headers=headers)


def test_it_serves_a_manifest_that_verifies_with_the_published_keys(bob, ready_artifact):
    payload, manifest = verified_manifest(bob.client(), ready_artifact)
    assert (manifest["model"], manifest["version"], manifest["variant"]) == ("digits", "1.0.0", "float32")
    assert sha256(payload) == ready_artifact.manifest_sha256
    assert manifest["raw"]["sha256"] == ready_artifact.raw_sha256
    assert manifest["blob"] == {
        "sha256": ready_artifact.blob_sha256,
        "size": ready_artifact.blob_size,
        "compression": "zstd",
    }


def test_a_manifest_does_not_verify_as_a_desired_state(bob, ready_artifact):
    trusted = protocol.trusted_keys(
        [key["public_key"] for key in bob.client().get("/api/v1/signing-keys/").json()["results"]]
    )
    response = bob.client().get(f"/api/v1/artifacts/{ready_artifact.pk}/manifest")
    with pytest.raises(protocol.PayloadTypeMismatch):
        protocol.verify(response.content, payload_type=protocol.DESIRED_PAYLOAD_TYPE, keys=trusted)


def test_it_downloads_the_blob_in_two_ranges_that_decompress_to_the_uploaded_model(
    bob, ready_artifact, float32_model, tmp_path
):
    client = bob.client()
    _, manifest = verified_manifest(client, ready_artifact)
    size = ready_artifact.blob_size
    split = size // 2

    first = get_blob(client, ready_artifact, Range=f"bytes=0-{split}")
    assert first.status_code == 206
    assert first["Content-Range"] == f"bytes 0-{split}/{size}"
    assert first["Content-Length"] == str(split + 1)
    etag = first["ETag"]
    second = get_blob(client, ready_artifact, Range=f"bytes={split + 1}-", **{"If-Range": etag})
    assert second.status_code == 206
    assert second["Content-Range"] == f"bytes {split + 1}-{size - 1}/{size}"
    assert second["ETag"] == etag

    blob = body(first) + body(second)
    assert len(blob) == size
    assert sha256(blob) == manifest["blob"]["sha256"] == ready_artifact.blob_sha256
    compressed, restored = tmp_path / "model.tflite.zst", tmp_path / "model.tflite"
    compressed.write_bytes(blob)
    subprocess.run(["zstd", "-d", "-q", "-o", str(restored), str(compressed)], check=True)
    assert sha256(restored.read_bytes()) == manifest["raw"]["sha256"] == sha256(float32_model)


def test_a_full_download_has_etag_length_and_accepts_ranges(bob, ready_artifact):
    response = get_blob(bob.client(), ready_artifact)
    assert response.status_code == 200
    assert response["Accept-Ranges"] == "bytes"
    assert response["ETag"] == f'"{ready_artifact.blob_sha256}"'
    assert response["Content-Length"] == str(ready_artifact.blob_size)
    assert response["Content-Type"] == "application/zstd"
    assert sha256(body(response)) == ready_artifact.blob_sha256


def test_it_answers_304_when_the_etag_matches(bob, ready_artifact):
    etag = f'"{ready_artifact.blob_sha256}"'
    response = get_blob(bob.client(), ready_artifact, **{"If-None-Match": etag})
    assert response.status_code == 304
    assert body(response) == b""


def test_a_suffix_range_returns_the_last_bytes(bob, ready_artifact):
    client = bob.client()
    full = body(get_blob(client, ready_artifact))
    size = len(full)
    response = get_blob(client, ready_artifact, Range="bytes=-10")
    assert response.status_code == 206
    assert response["Content-Range"] == f"bytes {size - 10}-{size - 1}/{size}"
    assert body(response) == full[-10:]


def test_an_open_ended_range_returns_the_rest(bob, ready_artifact):
    client = bob.client()
    full = body(get_blob(client, ready_artifact))
    response = get_blob(client, ready_artifact, Range="bytes=5-")
    assert response.status_code == 206
    assert response["Content-Range"] == f"bytes 5-{len(full) - 1}/{len(full)}"
    assert body(response) == full[5:]


@pytest.mark.parametrize(
    "past_end", ["{size}-", "{size}-{beyond}", "{beyond}-"], ids=["open-at-size", "closed", "open-beyond"]
)
def test_a_range_past_the_end_answers_416_with_the_size(bob, ready_artifact, past_end):
    size = ready_artifact.blob_size
    header = "bytes=" + past_end.format(size=size, beyond=size + 100)
    response = get_blob(bob.client(), ready_artifact, Range=header)
    assert response.status_code == 416
    assert response["Content-Range"] == f"bytes */{size}"
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["error"]["code"] == "range_not_satisfiable"


def test_a_stale_if_range_gets_the_whole_file(bob, ready_artifact):
    stale = f'"{"0" * 64}"'
    response = get_blob(bob.client(), ready_artifact, Range="bytes=0-9", **{"If-Range": stale})
    assert response.status_code == 200
    assert "Content-Range" not in response
    assert sha256(body(response)) == ready_artifact.blob_sha256


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "bytes=abc", "pages=0-9", "bytes=9-2", "bytes=-"])
def test_a_multi_range_or_malformed_range_gets_the_whole_file(bob, ready_artifact, header):
    response = get_blob(bob.client(), ready_artifact, Range=header)
    assert response.status_code == 200
    assert "Content-Range" not in response
    assert sha256(body(response)) == ready_artifact.blob_sha256


def test_it_serves_the_exact_golden_set_that_was_uploaded(bob, ready_artifact, golden_npz):
    response = bob.client().get(f"/api/v1/artifacts/{ready_artifact.pk}/golden")
    assert response.status_code == 200
    assert response["ETag"] == f'"{sha256(golden_npz)}"'
    assert sha256(body(response)) == sha256(golden_npz)


def test_a_version_without_golden_set_answers_404_no_golden_set(alice, bob, digits_model, float32_model):
    services.version_create(model=digits_model, version="2.0.0", created_by=alice.user)
    uploaded = upload(alice.client(), "digits", "2.0.0", "float32", float32_model, wait=60)
    assert uploaded.status_code == 201, uploaded.json()
    response = bob.client().get(f"/api/v1/artifacts/{uploaded.json()['id']}/golden")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "no_golden_set"


@pytest.mark.parametrize("state", [ArtifactStatus.PENDING, ArtifactStatus.FAILED])
@pytest.mark.parametrize("document", ["manifest", "blob"])
def test_an_artifact_that_is_not_ready_answers_409(bob, version_v1, state, document):
    artifact = Artifact.objects.create(
        version=version_v1, variant="float32", status=state, failure_code="unloadable_model"
    )
    response = bob.client().get(f"/api/v1/artifacts/{artifact.pk}/{document}")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "artifact_not_ready"


@pytest.mark.parametrize("document", ["manifest", "blob", "golden"])
def test_an_unknown_artifact_answers_404(bob, document):
    response = bob.client().get(f"/api/v1/artifacts/999999/{document}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_artifact"


@pytest.mark.parametrize("document", ["manifest", "blob"])
def test_a_client_accepting_only_zstd_still_gets_json_errors(bob, version_v1, document):
    pending = Artifact.objects.create(version=version_v1, variant="float32")
    client = bob.client()
    for artifact_id, status_code, code in (
        (999999, 404, "unknown_artifact"),
        (pending.pk, 409, "artifact_not_ready"),
    ):
        response = client.get(
            f"/api/v1/artifacts/{artifact_id}/{document}", headers={"Accept": "application/zstd"}
        )
        assert response.status_code == status_code
        assert response["Content-Type"].startswith("application/json")
        assert response.json()["error"]["code"] == code


def test_charlie_without_a_role_cannot_download(charlie, ready_artifact):
    for document in ("manifest", "blob", "golden"):
        response = charlie.client().get(f"/api/v1/artifacts/{ready_artifact.pk}/{document}")
        assert response.status_code == 403
        assert "error" in response.json()


def test_an_anonymous_client_cannot_download(anonymous, ready_artifact):
    response = anonymous.get(f"/api/v1/artifacts/{ready_artifact.pk}/blob")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"
