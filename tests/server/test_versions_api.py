"""Versions through the API: create (with and without a golden set), the refusals, and the
release / deprecate / revoke state machine, in which revoked is final."""

from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from fleet.registry.choices import VersionStatus
from fleet.registry.models import Artifact, ModelVersion
from tests.server.conftest import stored_files, upload

pytestmark = pytest.mark.django_db

VERSIONS = "/api/v1/models/digits/versions/"


def assert_error(response, status: int, code: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert (error["code"], error["field"]) == (code, field)
    assert error["message"]
    return error


def npz(**arrays) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def create(client, data: dict, model: str = "digits"):
    fmt = "multipart" if "golden_set" in data else "json"
    return client.post(f"/api/v1/models/{model}/versions/", data, format=fmt)


def golden_file(content: bytes, name: str = "golden.npz") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, content, content_type="application/octet-stream")


# --- create


def test_it_creates_a_version_from_json_without_a_golden_set(digits_model, alice):
    response = create(alice.client(), {"version": "1.0.0", "notes": "first cut"})
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["model"] == "digits"
    assert body["version"] == "1.0.0"
    assert body["notes"] == "first cut"
    assert body["status"] == "draft"
    assert body["golden_set"] is None
    assert body["artifacts"] == []
    assert body["created_by"] == "alice"
    assert ModelVersion.objects.get(version="1.0.0").created_by == alice.user


def test_it_creates_a_version_with_a_golden_set(digits_model, golden_npz, digits, alice):
    before = stored_files("golden")
    response = create(alice.client(), {"version": "1.0.0", "golden_set": golden_file(golden_npz)})
    assert response.status_code == 201, response.json()
    x, _ = digits.golden_set()
    assert response.json()["golden_set"] == {
        "sha256": hashlib.sha256(golden_npz).hexdigest(),
        "size": len(golden_npz),
        "samples": len(x),
        "input_shape": [64],
    }
    added = sorted(set(stored_files("golden")) - set(before))
    assert len(added) == 1
    assert added[0].read_bytes() == golden_npz
    assert ModelVersion.objects.get(version="1.0.0").has_golden_set


def test_it_lists_and_shows_versions(digits_model, version_v1, alice, bob):
    create(alice.client(), {"version": "1.1.0"})
    listed = bob.client().get(VERSIONS)
    assert listed.status_code == 200
    assert sorted(v["version"] for v in listed.json()["results"]) == ["1.0.0", "1.1.0"]
    shown = bob.client().get(f"{VERSIONS}1.0.0/")
    assert shown.status_code == 200
    assert shown.json()["version"] == "1.0.0"
    assert shown.json()["golden_set"]["sha256"] == version_v1.golden_sha256


def test_it_answers_404_for_an_unknown_version(version_v1, bob):
    assert_error(bob.client().get(f"{VERSIONS}9.9.9/"), 404, "unknown_version")


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "1.0.0.0", "01.0.0", "latest", ""], ids=repr)
def test_it_refuses_a_version_that_is_not_semver(version, digits_model, alice):
    response = create(alice.client(), {"version": version})
    assert response.status_code == 400, response.content
    assert response.json()["error"]["field"] == "version"
    assert not ModelVersion.objects.exists()


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "1.0.0.0", "01.0.0", "latest"], ids=repr)
def test_it_says_invalid_semver(version, digits_model, alice):
    assert_error(create(alice.client(), {"version": version}), 400, "invalid_semver", "version")


def test_it_accepts_prerelease_and_build_metadata(digits_model, alice):
    response = create(alice.client(), {"version": "2.0.0-rc.1+build.7"})
    assert response.status_code == 201, response.json()
    assert alice.client().get(f"{VERSIONS}2.0.0-rc.1+build.7/").status_code == 200


def test_it_refuses_a_duplicate_version(version_v1, alice):
    assert_error(create(alice.client(), {"version": "1.0.0"}), 409, "duplicate_version", "version")
    assert ModelVersion.objects.count() == 1


def test_it_stores_no_golden_set_for_a_duplicate_version(version_v1, golden_npz, alice):
    before = stored_files("golden")
    response = create(alice.client(), {"version": "1.0.0", "golden_set": golden_file(golden_npz)})
    assert_error(response, 409, "duplicate_version", "version")
    assert stored_files("golden") == before


def test_it_answers_404_when_listing_the_versions_of_an_unknown_model(digits_model, bob):
    assert_error(bob.client().get("/api/v1/models/letters/versions/"), 404, "unknown_model")


def test_it_filters_versions_by_status(version_v1, alice, bob):
    create(alice.client(), {"version": "1.1.0"})
    act(alice.client(), "release", "1.1.0")
    response = bob.client().get(f"{VERSIONS}?status=released")
    assert [v["version"] for v in response.json()["results"]] == ["1.1.0"]
    assert_error(bob.client().get(f"{VERSIONS}?status=bogus"), 400, "invalid_choice", "status")


def test_it_answers_404_when_creating_a_version_of_an_unknown_model(digits_model, alice):
    response = create(alice.client(), {"version": "1.0.0"}, model="letters")
    assert_error(response, 404, "unknown_model")
    assert not ModelVersion.objects.exists()


BAD_GOLDEN_SETS = {
    "not a zip": b"this is not an npz file",
    "empty file": b"",
    "zip of something else": None,  # filled below: a valid zip without .npy members
    "no x": npz(y=np.arange(4)),
    "no y": npz(x=np.zeros((4, 64), dtype=np.float32)),
    "lengths differ": npz(x=np.zeros((4, 64), dtype=np.float32), y=np.arange(3)),
    "no samples": npz(x=np.zeros((0, 64), dtype=np.float32), y=np.arange(0)),
    "one-dimensional samples": npz(x=np.zeros(4, dtype=np.float32), y=np.arange(4)),
    "text samples": npz(x=np.array([["a"] * 64] * 4), y=np.arange(4)),
    "float labels": npz(x=np.zeros((4, 64), dtype=np.float32), y=np.zeros(4)),
    "pickled objects": npz(x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4)),
}
_zip = io.BytesIO()
with zipfile.ZipFile(_zip, "w") as _archive:
    _archive.writestr("readme.txt", "hello")
BAD_GOLDEN_SETS["zip of something else"] = _zip.getvalue()


@pytest.mark.parametrize("content", BAD_GOLDEN_SETS.values(), ids=BAD_GOLDEN_SETS.keys())
def test_it_refuses_an_invalid_golden_set_and_stores_nothing(content, digits_model, alice):
    before = stored_files("golden")
    response = create(alice.client(), {"version": "1.0.0", "golden_set": golden_file(content)})
    assert_error(response, 422, "invalid_golden_set", "golden_set")
    assert stored_files("golden") == before
    assert not ModelVersion.objects.exists()


def test_it_refuses_a_golden_set_over_the_size_limit(digits_model, golden_npz, alice, settings):
    settings.GOLDEN_SET_MAX_BYTES = len(golden_npz) - 1
    before = stored_files("golden")
    response = create(alice.client(), {"version": "1.0.0", "golden_set": golden_file(golden_npz)})
    assert_error(response, 413, "too_large", "golden_set")
    assert stored_files("golden") == before
    assert not ModelVersion.objects.exists()


# --- transitions


def act(client, action: str, version: str = "1.0.0"):
    return client.post(f"{VERSIONS}{version}/{action}")


def test_it_walks_release_deprecate_release_revoke(version_v1, alice):
    client = alice.client()
    for action, status in (
        ("release", "released"),
        ("deprecate", "deprecated"),
        ("release", "released"),
        ("revoke", "revoked"),
    ):
        response = act(client, action)
        assert response.status_code == 200, response.json()
        assert response.json()["status"] == status
        version_v1.refresh_from_db()
        assert version_v1.status == status
        assert version_v1.status_changed_at is not None


def test_it_revokes_a_draft(version_v1, alice):
    assert act(alice.client(), "revoke").json()["status"] == "revoked"


@pytest.mark.parametrize("action", ["release", "deprecate", "revoke"])
def test_revoked_is_final(action, version_v1, alice):
    act(alice.client(), "revoke")
    error = assert_error(act(alice.client(), action), 409, "illegal_transition")
    assert "revoked" in error["message"]
    version_v1.refresh_from_db()
    assert version_v1.status == VersionStatus.REVOKED


def test_a_draft_cannot_be_deprecated(version_v1, alice):
    assert_error(act(alice.client(), "deprecate"), 409, "illegal_transition")
    version_v1.refresh_from_db()
    assert version_v1.status == VersionStatus.DRAFT


def test_a_released_version_cannot_be_released_again(version_v1, alice):
    act(alice.client(), "release")
    assert_error(act(alice.client(), "release"), 409, "illegal_transition")


def test_it_answers_404_for_an_action_on_an_unknown_version(version_v1, alice):
    assert_error(act(alice.client(), "release", "9.9.9"), 404, "unknown_version")


@pytest.mark.parametrize("action", ["release", "deprecate", "revoke"])
def test_an_action_is_a_post(action, version_v1, alice):
    assert_error(alice.client().get(f"{VERSIONS}1.0.0/{action}"), 405, "method_not_allowed")
    version_v1.refresh_from_db()
    assert version_v1.status == VersionStatus.DRAFT


def test_it_refuses_an_artifact_for_a_revoked_version(version_v1, digits, alice):
    act(alice.client(), "revoke")
    before = stored_files("raw")
    response = upload(
        alice.client(), "digits", "1.0.0", "float32", digits.build_digits_models()["float32"], 0
    )
    assert_error(response, 409, "version_revoked")
    assert not Artifact.objects.exists()
    assert stored_files("raw") == before
