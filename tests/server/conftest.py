"""Personas (healthchecks style): ada is an admin, alice an operator, bob a viewer,
charlie has an account but no role. Each has an API token."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile, TemporaryUploadedFile
from rest_framework.test import APIClient

from fleet.core.choices import Role
from fleet.core.services import api_token_create, user_ensure
from fleet.registry import services


@dataclass
class Persona:
    user: object
    token: str

    def client(self) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {self.token}")
        return client


@pytest.fixture(autouse=True)
def _empty_artifact_storage():
    """Each test starts with empty artifact storage, so orphan checks see only its files."""
    from django.conf import settings

    shutil.rmtree(settings.ARTIFACT_ROOT, ignore_errors=True)
    settings.ARTIFACT_ROOT.mkdir(parents=True, exist_ok=True)


@pytest.fixture(autouse=True)
def _fresh_rate_limits():
    """Rate limits count per client IP, and every test client is 127.0.0.1."""
    from django.core.cache import cache

    cache.clear()  # the cache has a Redis database of its own in tests (CACHE_URL)


def _persona(username: str, role: Role | None) -> Persona:
    from django.contrib.auth.models import User

    user = user_ensure(username=username, role=role) if role else User.objects.create(username=username)
    return Persona(user, api_token_create(user=user, name="tests")[1])


@pytest.fixture
def key_file(settings, tmp_path):
    """A signing key file of the test's own (created on first use, as in development)."""
    path = tmp_path / "secrets" / "signing-key.pem"
    settings.SIGNING_KEY_FILE = path
    settings.SIGNING_KEY_AUTOGENERATE = True
    return path


@pytest.fixture
def ada(db):
    return _persona("ada", Role.ADMIN)


@pytest.fixture
def alice(db):
    return _persona("alice", Role.OPERATOR)


@pytest.fixture
def bob(db):
    return _persona("bob", Role.VIEWER)


@pytest.fixture
def charlie(db):
    return _persona("charlie", None)


@pytest.fixture
def anonymous():
    return APIClient()


@pytest.fixture
def digits_model(alice):
    from samples import digits

    return services.model_create(name="digits", labels=digits.LABELS, created_by=alice.user)


@pytest.fixture
def golden_npz(digits) -> bytes:
    return digits.golden_set_npz()


@pytest.fixture
def version_v1(digits_model, golden_npz, alice):
    return services.version_create(
        model=digits_model,
        version="1.0.0",
        golden_set=SimpleUploadedFile("golden.npz", golden_npz),
        created_by=alice.user,
    )


def pending_artifact(version, variant: str, data: bytes, created_by=None, **options):
    """Upload through the service as the API does (an on-disk upload). In a `db` test the
    on_commit hook that queues the Celery task never fires: callers process it themselves."""
    upload = TemporaryUploadedFile(f"{variant}.tflite", "application/octet-stream", len(data), None)
    upload.write(data)
    upload.seek(0)
    return services.artifact_upload(
        version=version, variant=variant, upload=upload, created_by=created_by, **options
    )


def ready_artifact(version, variant: str, data: bytes, created_by=None):
    """A ready artifact through the real pipeline, run in-process (no worker needed)."""
    artifact = pending_artifact(version, variant, data, created_by)
    return services.artifact_process(artifact_id=artifact.pk)


def upload(client: APIClient, model: str, version: str, variant: str, data: bytes, wait: float = 60):
    """POST a .tflite through the real multipart parser and upload handler."""
    return client.post(
        f"/api/v1/models/{model}/versions/{version}/artifacts/?wait={wait}",
        {"variant": variant, "file": SimpleUploadedFile(f"{variant}.tflite", data)},
        format="multipart",
    )


def stored_files(prefix: str = "") -> list[Path]:
    root = Path(settings.ARTIFACT_ROOT)
    return sorted(p for p in root.rglob("*") if p.is_file() and str(p.relative_to(root)).startswith(prefix))


@pytest.fixture
def enrollment_key(db, ada):
    from fleet.devices import services as device_services

    return device_services.enrollment_token_create(name="factory", auto_approve=True, created_by=ada.user)[1]


def enroll(client: APIClient, device_id: str, **body):
    return client.post("/api/v1/enroll", {"device_id": device_id, **body}, format="json")
