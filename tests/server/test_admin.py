"""The registry admin: pages an ops person uses, and the upload door (same service as the API)."""

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from fleet.registry.choices import ArtifactStatus, VersionStatus
from fleet.registry.models import Artifact, SigningKey
from tests.server.conftest import ready_artifact as make_ready
from tests.server.conftest import stored_files


@pytest.fixture
def admin_client(ada):
    client = Client()
    client.force_login(ada.user)
    return client


@pytest.fixture
def ready_artifact(version_v1, digits, alice):
    return make_ready(version_v1, "int8", digits.build_digits_models()["int8"], alice.user)


def test_it_lists_artifacts_with_sizes_ratio_and_accuracy(admin_client, ready_artifact):
    page = admin_client.get("/admin/registry/artifact/").content.decode()
    assert "int8" in page
    assert "Ready" in page
    assert f"{ready_artifact.golden_accuracy:.1%}" in page
    assert f"{ready_artifact.compression_ratio:.2f}x" in page
    assert "alice" in page


def test_the_artifact_page_shows_the_signed_manifest_read_only(admin_client, ready_artifact):
    page = admin_client.get(f"/admin/registry/artifact/{ready_artifact.pk}/change/").content.decode()
    assert ready_artifact.manifest_sha256 in page
    assert ready_artifact.raw_sha256 in page  # inside the decoded manifest payload
    assert ready_artifact.signing_key.keyid in page
    assert 'name="variant"' not in page  # nothing editable


def test_the_admin_upload_form_runs_the_same_service(admin_client, version_v1, digits):
    response = admin_client.post(
        "/admin/registry/artifact/add/",
        {
            "version": version_v1.pk,
            "variant": "float32",
            "file": SimpleUploadedFile("m.tflite", digits.build_digits_models()["float32"]),
        },
    )
    assert response.status_code == 302
    artifact = Artifact.objects.get(variant="float32")
    assert artifact.status == ArtifactStatus.PENDING  # the pipeline runs on the worker
    assert artifact.tflite_signature is None  # filled by the sandboxed pipeline on the worker
    assert len(stored_files("raw")) == 1


def test_the_admin_upload_form_sets_the_hardware_classes_the_variant_is_for(admin_client, version_v1, digits):
    form = {"version": version_v1.pk, "variant": "int8", "hardware": "rpi5, rpi4"}
    data = digits.build_digits_models()["int8"]
    response = admin_client.post(
        "/admin/registry/artifact/add/", {**form, "file": SimpleUploadedFile("m.tflite", data)}
    )
    assert response.status_code == 302
    artifact = Artifact.objects.get(variant="int8")
    assert artifact.requires_hardware == ["rpi4", "rpi5"]
    page = admin_client.get(f"/admin/registry/artifact/{artifact.pk}/change/").content.decode()
    assert "rpi4, rpi5 only" in page
    bad = {**form, "hardware": "rpi 4", "file": SimpleUploadedFile("m.tflite", data)}
    refused = admin_client.post("/admin/registry/artifact/add/", bad, follow=True).content.decode()
    assert "is not a hardware class" in refused
    assert Artifact.objects.filter(variant="int8").count() == 1


def test_the_admin_upload_form_refuses_garbage_with_a_message(admin_client, version_v1):
    response = admin_client.post(
        "/admin/registry/artifact/add/",
        {
            "version": version_v1.pk,
            "variant": "float32",
            "file": SimpleUploadedFile("m.tflite", b"garbage" * 10),
        },
        follow=True,
    )
    assert "Upload refused" in response.content.decode()
    assert not Artifact.objects.exists()
    assert stored_files("raw") == []


def test_it_releases_and_revokes_versions_with_admin_actions(admin_client, version_v1):
    url = "/admin/registry/modelversion/"
    admin_client.post(url, {"action": "release", "_selected_action": [version_v1.pk]})
    version_v1.refresh_from_db()
    assert version_v1.status == VersionStatus.RELEASED
    admin_client.post(url, {"action": "revoke", "_selected_action": [version_v1.pk]})
    response = admin_client.post(url, {"action": "release", "_selected_action": [version_v1.pk]}, follow=True)
    version_v1.refresh_from_db()
    assert version_v1.status == VersionStatus.REVOKED
    assert "revoked is final" in response.content.decode()


def test_signing_keys_show_only_the_public_half(admin_client, ready_artifact):
    key = SigningKey.objects.get()
    page = admin_client.get(f"/admin/registry/signingkey/{key.pk}/change/").content.decode()
    assert key.public_key in page
    assert "PRIVATE" not in page
    assert admin_client.get("/admin/registry/signingkey/add/").status_code == 403


@pytest.mark.parametrize(
    "url",
    ["/admin/", "/admin/registry/mlmodel/", "/admin/registry/modelversion/", "/admin/core/apitoken/"],
)
def test_admin_pages_render(admin_client, ready_artifact, url):
    assert admin_client.get(url).status_code == 200


def test_people_without_a_role_cannot_open_the_admin(charlie):
    client = Client()
    client.force_login(charlie.user)
    response = client.get("/admin/registry/artifact/")
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_the_manifest_page_payload_is_the_signed_one(admin_client, ready_artifact):
    envelope = json.loads(ready_artifact.manifest_envelope)
    assert envelope["payloadType"] == "application/vnd.modelfleet.manifest+json"
