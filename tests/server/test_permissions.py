"""Who may call what: every /api/v1/ endpoint against every persona (ada is an admin, alice
an operator, bob a viewer, charlie has no role), and every way a bearer token can be wrong.

Each case runs in a fresh database on the same small world: digits 1.0.0 (a draft with a
golden set and a ready float32 artifact, made in-process) and digits 0.9.0 (released).
Refused requests must leave that world exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone
from rest_framework.test import APIClient

from fleet.core.models import ApiToken
from fleet.registry import services
from fleet.registry.choices import ArtifactStatus, VersionStatus
from fleet.registry.models import Artifact, MLModel, ModelVersion
from tests.server.conftest import ready_artifact as make_ready

pytestmark = pytest.mark.django_db


@dataclass(frozen=True)
class Endpoint:
    name: str  # the URL name in fleet/urls.py
    method: str
    path: str  # "{artifact}" stands for the ready artifact's id
    write: bool = False
    ok: int = 200  # the answer for someone who may call it
    body: Callable[[Any], dict[str, Any]] | None = None  # digits sample module -> request data
    format: str = "json"

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def _int8_upload(digits) -> dict[str, Any]:
    data = digits.build_digits_models()["int8"]
    return {"variant": "int8", "file": SimpleUploadedFile("int8.tflite", data)}


V1 = "/api/v1/models/digits/versions/1.0.0"
ENDPOINTS = [
    Endpoint("model-list", "GET", "/api/v1/models/"),
    Endpoint("model-list", "POST", "/api/v1/models/", True, 201, lambda _: {"name": "letters"}),
    Endpoint("model-detail", "GET", "/api/v1/models/digits/"),
    Endpoint("version-list", "GET", "/api/v1/models/digits/versions/"),
    Endpoint(
        "version-list", "POST", "/api/v1/models/digits/versions/", True, 201, lambda _: {"version": "2.0.0"}
    ),
    Endpoint("version-detail", "GET", f"{V1}/"),
    Endpoint("version-compatibility", "GET", f"{V1}/compatibility"),
    Endpoint("version-release", "POST", f"{V1}/release", True),
    Endpoint("version-deprecate", "POST", "/api/v1/models/digits/versions/0.9.0/deprecate", True),
    Endpoint("version-revoke", "POST", f"{V1}/revoke", True),
    Endpoint("version-artifacts", "GET", f"{V1}/artifacts/"),
    Endpoint("version-artifacts", "POST", f"{V1}/artifacts/?wait=0", True, 202, _int8_upload, "multipart"),
    Endpoint("artifact-list", "GET", "/api/v1/artifacts/"),
    Endpoint("artifact-detail", "GET", "/api/v1/artifacts/{artifact}/"),
    Endpoint("artifact-manifest", "GET", "/api/v1/artifacts/{artifact}/manifest"),
    Endpoint("artifact-blob", "GET", "/api/v1/artifacts/{artifact}/blob"),
    Endpoint("artifact-golden", "GET", "/api/v1/artifacts/{artifact}/golden"),
    Endpoint("signing-key-list", "GET", "/api/v1/signing-keys/"),
]
READS = [e for e in ENDPOINTS if not e.write]
WRITES = [e for e in ENDPOINTS if e.write]


@pytest.fixture
def ready_artifact(version_v1, alice, digits) -> Artifact:
    """A ready artifact, through the real pipeline run in-process (no worker needed:
    on_commit never fires in this non-transactional test, so nothing is queued)."""
    artifact = make_ready(version_v1, "float32", digits.build_digits_models()["float32"], alice.user)
    assert artifact.status == ArtifactStatus.READY, artifact.failure_reason
    return artifact


@pytest.fixture
def world(ready_artifact, digits_model, alice) -> Artifact:
    released = services.version_create(model=digits_model, version="0.9.0", created_by=alice.user)
    services.version_set_status(version=released, status=VersionStatus.RELEASED)
    return ready_artifact


def registry_state() -> tuple:
    """Everything a write endpoint could change."""
    return (
        sorted(MLModel.objects.values_list("name", flat=True)),
        sorted(ModelVersion.objects.values_list("model__name", "version", "status")),
        sorted(Artifact.objects.values_list("version__version", "variant", "status")),
    )


def call(client: APIClient, endpoint: Endpoint, artifact: Artifact, digits):
    path = endpoint.path.format(artifact=artifact.pk)
    data = endpoint.body(digits) if endpoint.body else None
    return getattr(client, endpoint.method.lower())(path, data, format=endpoint.format)


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"code", "message", "field"}
    assert error["code"] == code
    assert error["message"]
    return error


def assert_allowed(response, endpoint: Endpoint) -> None:
    assert response.status_code == endpoint.ok, (response.status_code, response.content[:300])
    if response.streaming:
        assert b"".join(response.streaming_content)
    else:
        assert response.content


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_it_asks_anonymous_to_authenticate(endpoint, world, anonymous, digits):
    before = registry_state()
    response = call(anonymous, endpoint, world, digits)
    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"] == "Bearer"
    assert registry_state() == before


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_it_refuses_an_account_without_a_role(endpoint, world, charlie, digits):
    before = registry_state()
    assert_error(call(charlie.client(), endpoint, world, digits), 403, "permission_denied")
    assert registry_state() == before


@pytest.mark.parametrize("endpoint", READS, ids=str)
def test_it_lets_a_viewer_read(endpoint, world, bob, digits):
    assert_allowed(call(bob.client(), endpoint, world, digits), endpoint)


@pytest.mark.parametrize("endpoint", WRITES, ids=str)
def test_it_refuses_every_write_to_a_viewer(endpoint, world, bob, digits):
    before = registry_state()
    assert_error(call(bob.client(), endpoint, world, digits), 403, "permission_denied")
    assert registry_state() == before


@pytest.mark.parametrize("persona", ["alice", "ada"])
@pytest.mark.parametrize("endpoint", READS, ids=str)
def test_it_lets_operators_and_admins_read(endpoint, persona, world, digits, request):
    client = request.getfixturevalue(persona).client()
    assert_allowed(call(client, endpoint, world, digits), endpoint)


@pytest.mark.parametrize("persona", ["alice", "ada"])
@pytest.mark.parametrize("endpoint", WRITES, ids=str)
def test_it_lets_operators_and_admins_write(endpoint, persona, world, digits, request):
    client = request.getfixturevalue(persona).client()
    before = registry_state()
    assert_allowed(call(client, endpoint, world, digits), endpoint)
    assert registry_state() != before


# --- bad credentials: each is a 401 that says how to authenticate, never a quiet anonymous


def assert_unauthenticated(response) -> None:
    assert_error(response, 401, "authentication_failed")
    assert response["WWW-Authenticate"] == "Bearer"


def test_it_refuses_a_revoked_token(world, alice):
    ApiToken.objects.filter(user=alice.user).update(revoked_at=timezone.now())
    assert_unauthenticated(alice.client().get("/api/v1/models/"))
    assert_unauthenticated(alice.client().post("/api/v1/models/", {"name": "letters"}, format="json"))
    assert not MLModel.objects.filter(name="letters").exists()


def test_it_refuses_the_token_of_an_inactive_user(world, bob):
    bob.user.is_active = False
    bob.user.save()
    assert_unauthenticated(bob.client().get(f"/api/v1/artifacts/{world.pk}/manifest"))


def test_it_refuses_an_unknown_token(world, anonymous):
    anonymous.credentials(HTTP_AUTHORIZATION="Bearer mf_" + "x" * 43)
    assert_unauthenticated(anonymous.get("/api/v1/models/"))


@pytest.mark.parametrize(
    "header",
    ["Bearer", "Bearer ", "Token", "Bearer two words", "Bearer mf_a mf_b", "Bearer mf_\xe9t\xe9"],
    ids=repr,
)
def test_it_refuses_a_malformed_authorization_header(header, world, anonymous):
    anonymous.credentials(HTTP_AUTHORIZATION=header)
    assert_unauthenticated(anonymous.get("/api/v1/models/"))


def test_it_refuses_a_token_of_another_scheme(world, anonymous):
    """A key without the mf_ prefix is left to other authenticators; none knows it."""
    anonymous.credentials(HTTP_AUTHORIZATION="Bearer not-a-modelfleet-key")
    assert_error(anonymous.get("/api/v1/models/"), 401, "not_authenticated")


def test_it_accepts_the_token_keyword_too(world, bob):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {bob.token}")
    assert client.get("/api/v1/models/").status_code == 200


def test_it_refuses_a_revoked_token_even_when_the_user_has_another(world, alice):
    from fleet.core.services import api_token_create

    _, fresh = api_token_create(user=alice.user, name="second")
    ApiToken.objects.filter(user=alice.user, name="tests").update(revoked_at=timezone.now())
    assert_unauthenticated(alice.client().get("/api/v1/models/"))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {fresh}")
    assert client.get("/api/v1/models/").status_code == 200
