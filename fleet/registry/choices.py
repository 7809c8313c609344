"""States of the registry and the transitions allowed between them."""

from django.db import models


class Task(models.TextChoices):
    CLASSIFICATION = "classification", "Classification"
    DETECTION = "detection", "Object detection"
    SEGMENTATION = "segmentation", "Segmentation"
    REGRESSION = "regression", "Regression"
    OTHER = "other", "Other"


class VersionStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    RELEASED = "released", "Released"
    DEPRECATED = "deprecated", "Deprecated"
    REVOKED = "revoked", "Revoked"


# Revoked is final: a revoked version can never be assigned to a device again.
VERSION_TRANSITIONS: dict[str, tuple[str, ...]] = {
    VersionStatus.DRAFT: (VersionStatus.RELEASED, VersionStatus.REVOKED),
    VersionStatus.RELEASED: (VersionStatus.DEPRECATED, VersionStatus.REVOKED),
    VersionStatus.DEPRECATED: (VersionStatus.RELEASED, VersionStatus.REVOKED),
    VersionStatus.REVOKED: (),
}


class ArtifactStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    READY = "ready", "Ready"
    FAILED = "failed", "Failed"


class SigningKeyStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    RETIRED = "retired", "Retired"


COMPRESSION_ZSTD = "zstd"
