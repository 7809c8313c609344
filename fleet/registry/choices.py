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
    # A variant the registry produced itself (quantization factory) that lost more accuracy
    # against its float32 parent than the model allows: checked and signed, never released.
    REJECTED = "rejected", "Rejected (accuracy)"


class ArtifactFailure(models.TextChoices):
    """Why an artifact failed (Artifact.failure_code); the reason text says it in words."""

    # The flatbuffer (fleet/registry/tflite.py)
    NOT_FLATBUFFER = "not_flatbuffer", "Not a flatbuffer"
    WRONG_IDENTIFIER = "wrong_identifier", "Not a TFLite file identifier"
    TRUNCATED = "truncated", "Truncated or out-of-range offsets"
    MALFORMED_TFLITE = "malformed_tflite", "Malformed TFLite model"
    TENSOR_TOO_LARGE = "tensor_too_large", "Tensors declare too much memory"
    # LiteRT and the golden set
    UNLOADABLE_MODEL = "unloadable_model", "LiteRT cannot load or run it"
    GOLDEN_SHAPE_MISMATCH = "golden_shape_mismatch", "Golden set does not fit the model"
    INVALID_GOLDEN_SET = "invalid_golden_set", "Golden set is not usable"
    # The sandbox (fleet/registry/sandbox.py) stopped the check
    SANDBOX_CRASHED = "sandbox_crashed", "Crashed the model check"
    SANDBOX_CPU_LIMIT = "sandbox_cpu_limit", "Over the CPU time limit"
    SANDBOX_MEMORY_LIMIT = "sandbox_memory_limit", "Over the memory limit"
    SANDBOX_FILE_LIMIT = "sandbox_file_limit", "Over the file size limit"
    SANDBOX_TIMEOUT = "sandbox_timeout", "Over the wall-clock limit"
    SANDBOX_UNAVAILABLE = "sandbox_unavailable", "Host cannot confine the check"
    SANDBOX_BAD_REPORT = "sandbox_bad_report", "The check's report made no sense"
    INSPECTION_FAILED = "inspection_failed", "The check failed unexpectedly"
    # The worker
    RAW_CHANGED = "raw_changed", "Stored upload changed"
    PIPELINE_ERROR = "pipeline_error", "Pipeline error"
    # The quantization factory
    QUANTIZATION_FAILED = "quantization_failed", "The quantizer could not produce it"
    ACCURACY_DROP = "accuracy_drop", "Lost too much accuracy"


class DeltaStatus(models.TextChoices):
    """A tensor-level delta between two versions (docs/protocol.md, addition 11)."""

    READY = "ready", "Offered"
    # Made, or tried, and not worth offering (no smaller than DELTA_MAX_RATIO of the full
    # blob) or not expressible (DeltaRefused): devices get the full blob.
    SKIPPED = "skipped", "Not offered"
    FAILED = "failed", "Failed"


class QuantRecipe(models.TextChoices):
    """Variants the registry can produce from a float32 artifact (fleet/registry/quantize.py).
    The value is also the produced artifact's variant name."""

    DYNAMIC_INT8 = "int8-dynamic", "Dynamic-range int8 weights"
    FLOAT16 = "float16", "float16 weights"
    FULL_INT8 = "int8-full", "Full-integer int8 (calibrated)"


class SigningKeyStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    RETIRED = "retired", "Retired"
    REVOKED = "revoked", "Revoked"


COMPRESSION_ZSTD = "zstd"
