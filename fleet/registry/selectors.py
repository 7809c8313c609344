"""Registry reads."""

from __future__ import annotations

from django.db.models import QuerySet

from fleet.core.choices import Role
from fleet.core.errors import Conflict, NotFound
from fleet.core.permissions import has_role
from fleet.registry.choices import ArtifactStatus
from fleet.registry.models import Artifact, MLModel, ModelVersion, SigningKey


def model_get(*, name: str) -> MLModel:
    model = MLModel.objects.filter(name=name).first()
    if model is None:
        raise NotFound(f"No model named {name!r}.", code="unknown_model")
    return model


def version_get(*, model_name: str, version: str) -> ModelVersion:
    found = (
        ModelVersion.objects.select_related("model").filter(model__name=model_name, version=version).first()
    )
    if found is None:
        model_get(name=model_name)  # says which of the two is unknown
        raise NotFound(f"Model {model_name!r} has no version {version!r}.", code="unknown_version")
    return found


def artifact_list() -> QuerySet[Artifact]:
    return Artifact.objects.select_related("version__model", "signing_key", "created_by")


def artifact_ready(artifact: Artifact) -> Artifact:
    """Manifests and blobs exist only for ready artifacts."""
    if artifact.status != ArtifactStatus.READY:
        raise Conflict(
            f"Artifact {artifact.pk} is {artifact.status}, not ready"
            + (f" ({artifact.failure_code}: {artifact.failure_reason})" if artifact.failure_code else "")
            + ".",
            code="artifact_not_ready",
        )
    return artifact


def artifact_fetchable_by(*, principal, artifact: Artifact) -> bool:
    """May ``principal`` download this artifact's manifest, blob and golden set?

    People need the viewer role. Device principals (devices issue) bring their own rule as
    a ``may_fetch_artifact(artifact)`` method: a device sees only artifacts assigned to it.
    """
    may_fetch = getattr(principal, "may_fetch_artifact", None)
    if may_fetch is not None:
        return bool(may_fetch(artifact))
    return has_role(principal, Role.VIEWER)


def signing_keys() -> QuerySet[SigningKey]:
    return SigningKey.objects.all()
