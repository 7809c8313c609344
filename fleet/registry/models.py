from __future__ import annotations

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

from agent.protocol.schemas import NAME_PATTERN, SEMVER_PATTERN
from fleet.registry.choices import (
    ArtifactStatus,
    DeltaStatus,
    QuantRecipe,
    SigningKeyStatus,
    Task,
    VersionStatus,
)

name_validator = RegexValidator(
    NAME_PATTERN, "Use lowercase letters, digits, '.', '_' or '-' (at most 64 characters)."
)
semver_validator = RegexValidator(SEMVER_PATTERN, "Not a semantic version (e.g. 1.4.0).")


class MLModel(models.Model):
    """A model as ops know it ("digits"), independent of its versions and variants."""

    name = models.CharField(max_length=64, unique=True, validators=[name_validator])
    task = models.CharField(max_length=20, choices=Task.choices, default=Task.CLASSIFICATION)
    labels = models.JSONField(default=list, blank=True, help_text="Class labels, in output order.")
    description = models.TextField(blank=True)
    quantize_recipes = models.JSONField(
        default=list,
        blank=True,
        help_text="Variants the registry produces from every float32 upload (QuantRecipe values).",
    )
    max_accuracy_drop_pp = models.FloatField(
        null=True,
        blank=True,
        help_text="Largest accuracy drop (percentage points) a produced variant may show; "
        "empty: the server's QUANT_MAX_ACCURACY_DROP_PP.",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "ML model"

    def __str__(self) -> str:
        return self.name


class ModelVersion(models.Model):
    model = models.ForeignKey(MLModel, on_delete=models.PROTECT, related_name="versions")
    version = models.CharField(max_length=64, validators=[semver_validator])
    notes = models.TextField(blank=True)
    status = models.CharField(max_length=12, choices=VersionStatus.choices, default=VersionStatus.DRAFT)
    # The golden set: a small labeled .npz (x, y) run on the server for every variant and
    # on the device before every swap.
    golden_file = models.CharField(max_length=255, blank=True, help_text="Name in artifact storage.")
    golden_sha256 = models.CharField(max_length=64, blank=True)
    golden_size = models.PositiveBigIntegerField(null=True, blank=True)
    golden_samples = models.PositiveIntegerField(null=True, blank=True)
    golden_input_shape = models.JSONField(null=True, blank=True, help_text="Shape of one sample of x.")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    status_changed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["model__name", "-created_at"]
        constraints = [models.UniqueConstraint(fields=["model", "version"], name="registry_version_unique")]

    def __str__(self) -> str:
        return f"{self.model.name} {self.version}"

    @property
    def has_golden_set(self) -> bool:
        return bool(self.golden_file)


class SigningKey(models.Model):
    """The public half of a signing key. The private half lives in a file, never here."""

    keyid = models.CharField(max_length=64, unique=True, help_text="hex sha256 of the raw public key")
    public_key = models.CharField(max_length=64, help_text="raw 32-byte Ed25519 public key, hex")
    status = models.CharField(
        max_length=10, choices=SigningKeyStatus.choices, default=SigningKeyStatus.ACTIVE
    )
    created_at = models.DateTimeField(auto_now_add=True)
    retired_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.keyid[:16]}… ({self.status})"


class SignedDocument(models.Model):
    """A root document or keyring signed offline and uploaded (docs/protocol.md, addition 6).
    Rows only grow: versions are never edited or deleted."""

    version = models.PositiveIntegerField(unique=True)
    envelope = models.TextField(help_text="The DSSE envelope, exactly as served.")
    expires_at = models.DateTimeField()
    uploaded_at = models.DateTimeField(auto_now_add=True)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        abstract = True
        ordering = ["-version"]


class TrustRoot(SignedDocument):
    """A root document. The whole chain is served, so that a device that missed a step can
    catch up."""

    threshold = models.PositiveSmallIntegerField()
    keyids = models.JSONField(default=list, help_text="keyids of the root keys")

    def __str__(self) -> str:
        return f"root version {self.version}"


class Keyring(SignedDocument):
    """A root-signed keyring: the keys devices accept manifests and desired states from."""

    root_version = models.PositiveIntegerField(help_text="The root version whose keys signed it")
    keyids = models.JSONField(default=list, help_text="keyids of the signing keys it lists")
    revoked_keyids = models.JSONField(default=list)

    def __str__(self) -> str:
        return f"keyring version {self.version}"


def list_any() -> list[str]:
    return ["any"]


class Artifact(models.Model):
    """One variant (float32, int8, …) of a version: the uploaded .tflite, its zstd blob
    and the signed manifest that names both by sha256."""

    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="artifacts")
    variant = models.CharField(max_length=64, validators=[name_validator])
    status = models.CharField(max_length=10, choices=ArtifactStatus.choices, default=ArtifactStatus.PENDING)
    failure_code = models.CharField(max_length=40, blank=True)
    failure_reason = models.TextField(blank=True)
    task_id = models.CharField(max_length=64, blank=True)

    raw_file = models.CharField(max_length=255, blank=True, help_text="Name in artifact storage.")
    raw_sha256 = models.CharField(max_length=64, blank=True)
    raw_size = models.PositiveBigIntegerField(null=True, blank=True)
    blob_file = models.CharField(max_length=255, blank=True, help_text="Name in artifact storage.")
    blob_sha256 = models.CharField(max_length=64, blank=True)
    blob_size = models.PositiveBigIntegerField(null=True, blank=True)
    compression = models.CharField(max_length=10, blank=True)
    compression_level = models.PositiveSmallIntegerField(null=True, blank=True)

    tflite_signature = models.JSONField(
        null=True, blank=True, help_text="inputs, outputs (name, shape, dtype), ops, quantization"
    )
    # The hardware classes this variant targets (manifest ``requires.hardware``); ["any"]
    # means every device. Set at upload (docs/rollouts.md, "Who gets what").
    requires_hardware = models.JSONField(default=list_any, blank=True)
    golden_accuracy = models.FloatField(null=True, blank=True)
    golden_samples = models.PositiveIntegerField(null=True, blank=True)
    latency_ms = models.FloatField(
        null=True, blank=True, help_text="Median inference time on the server's CPU, in the sandbox"
    )

    # Provenance of a variant the registry produced itself (quantization factory).
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="derived"
    )
    recipe = models.CharField(max_length=20, choices=QuantRecipe.choices, blank=True)
    tool = models.CharField(max_length=64, blank=True, help_text="Quantizer name")
    tool_version = models.CharField(max_length=32, blank=True)
    calibration_samples = models.PositiveIntegerField(null=True, blank=True)
    # Recipes asked for at upload time (produced once this float32 artifact is ready).
    requested_recipes = models.JSONField(default=list, blank=True)

    manifest_envelope = models.TextField(blank=True, help_text="The DSSE envelope, exactly as served.")
    manifest_sha256 = models.CharField(
        max_length=64, blank=True, help_text="sha256 of the manifest payload (what desired states pin)"
    )
    signing_key = models.ForeignKey(SigningKey, null=True, blank=True, on_delete=models.PROTECT)

    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # A failed upload keeps its row (and reason) but does not block a new try.
            models.UniqueConstraint(
                fields=["version", "variant"],
                condition=~models.Q(status=ArtifactStatus.FAILED),
                name="registry_artifact_variant_unique",
            )
        ]

    def __str__(self) -> str:
        return f"{self.version} [{self.variant}]"

    @property
    def compression_ratio(self) -> float | None:
        if not self.raw_size or not self.blob_size:
            return None
        return self.raw_size / self.blob_size

    @property
    def produced(self) -> bool:
        return self.parent_id is not None


class ArtifactDelta(models.Model):
    """A tensor-level delta that rebuilds ``target``'s raw model from ``base``'s (an earlier
    released version, same model and variant), with a signed manifest of its own naming
    both (docs/protocol.md, addition 11). Desired states offer it to devices that report
    ``base`` installed; the full blob stays named beside it."""

    target = models.ForeignKey(Artifact, on_delete=models.CASCADE, related_name="deltas")
    base = models.ForeignKey(Artifact, on_delete=models.CASCADE, related_name="+")
    status = models.CharField(max_length=10, choices=DeltaStatus.choices)
    reason = models.CharField(max_length=300, help_text="What was decided and why, in one sentence.")
    blob_file = models.CharField(max_length=255, blank=True, help_text="Name in artifact storage.")
    blob_sha256 = models.CharField(max_length=64, blank=True)
    blob_size = models.PositiveBigIntegerField(null=True, blank=True)
    manifest_envelope = models.TextField(blank=True, help_text="The DSSE envelope, exactly as served.")
    manifest_sha256 = models.CharField(max_length=64, blank=True)
    signing_key = models.ForeignKey(SigningKey, null=True, blank=True, on_delete=models.PROTECT)
    seconds = models.FloatField(null=True, blank=True, help_text="Time taken to make and check it")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["target", "base"], name="registry_delta_once")]

    def __str__(self) -> str:
        return f"{self.target} from {self.base.version.version}"

    @property
    def ratio(self) -> float | None:
        """The delta's size as a fraction of the full blob's."""
        if not self.blob_size or not self.target.blob_size:
            return None
        return self.blob_size / self.target.blob_size
