"""Registry writes: models, versions, golden sets, artifact upload and the artifact pipeline.

Pipeline (registry issue, 4; issue 9, section 3): the upload streams to storage; the
request only checks the 8-byte flatbuffer header, never parses the model. Then
``artifact_process`` (a Celery task) has the sandbox (sandbox.py: a confined child process
with rlimits, no network, no access to the signing key) inspect the flatbuffer, load the
model in LiteRT, smoke-run it and score the golden set. The worker takes the child's report
as data: it checks it, compresses the bytes with zstd while hashing them itself, and signs
only hashes it computed, once they agree with the report. Every failure leaves the artifact
``failed`` with a code (ArtifactFailure) and a reason, and deletes its files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zstandard
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.files import File
from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages
from django.db import IntegrityError, transaction
from django.utils import timezone

from agent import download, protocol, runtime
from agent.protocol.delta import DeltaError, DeltaRefused, apply_delta, make_delta
from fleet.core import display, metrics
from fleet.core.capabilities import HARDWARE_CLASS
from fleet.core.errors import Conflict, InvalidInput, TooLarge, Unprocessable
from fleet.registry import quantize, sandbox, selectors, tflite
from fleet.registry.choices import (
    COMPRESSION_ZSTD,
    VERSION_TRANSITIONS,
    ArtifactFailure,
    ArtifactStatus,
    DeltaStatus,
    QuantRecipe,
    Task,
    VersionStatus,
)
from fleet.registry.models import Artifact, ArtifactDelta, MLModel, ModelVersion, name_validator
from fleet.registry.signing import signing_key_active

log = logging.getLogger(__name__)
CHUNK_BYTES = 1024 * 1024
# Address space kept for the sandboxed interpreter itself: Python + numpy + LiteRT map about
# 0.2 GiB before any tensor; the rest leaves room for the golden set and LiteRT's arenas.
# What remains of SANDBOX_MEMORY_BYTES is what a model's tensors may declare.
SANDBOX_BASELINE_BYTES = 512 * 1024 * 1024
CHECK_MODEL_JOB = "fleet.registry.sandbox:check_model"


def artifact_storage() -> Storage:
    return storages["artifacts"]


class _MovableFile(File):
    """A local temporary file that FileSystemStorage may move into place instead of copying."""

    def temporary_file_path(self) -> str:
        return self.name


@contextlib.contextmanager
def _local_path(name: str) -> Iterator[Path]:
    """A local path for a stored file: the file itself on local storage, else a temp copy."""
    storage = artifact_storage()
    try:
        yield Path(storage.path(name))
        return
    except NotImplementedError:
        pass
    with tempfile.NamedTemporaryFile(dir=settings.FILE_UPLOAD_TEMP_DIR) as copy:
        with storage.open(name, "rb") as source:
            while chunk := source.read(CHUNK_BYTES):
                copy.write(chunk)
        copy.flush()
        yield Path(copy.name)


def _delete_quietly(name: str) -> None:
    if name:
        try:
            artifact_storage().delete(name)
        except OSError:
            log.exception("could not delete %s from artifact storage", name)


def _require_name(value: str, field: str) -> None:
    try:
        name_validator(value)
    except Exception as exc:
        raise InvalidInput(
            f"{value!r} is not a valid {field}: use lowercase letters, digits, '.', '_' or '-'.",
            code=f"invalid_{field}",
            field=field,
        ) from exc


# --- models and versions


def model_create(
    *,
    name: str,
    task: str = Task.CLASSIFICATION,
    labels: list[str] | None = None,
    description: str = "",
    quantize_recipes: list[str] | None = None,
    max_accuracy_drop_pp: float | None = None,
    created_by: AbstractBaseUser | None = None,
) -> MLModel:
    _require_name(name, "name")
    recipes = _check_recipes(quantize_recipes or [])
    if max_accuracy_drop_pp is not None and not 0 <= max_accuracy_drop_pp <= 100:
        raise InvalidInput(
            "max_accuracy_drop_pp must be between 0 and 100 percentage points.",
            code="invalid_limit",
            field="max_accuracy_drop_pp",
        )
    if task not in Task.values:
        raise InvalidInput(
            f"Unknown task {task!r}; use one of {', '.join(Task.values)}.", code="invalid_task", field="task"
        )
    try:
        with transaction.atomic():
            return MLModel.objects.create(
                name=name,
                task=task,
                labels=list(labels or []),
                description=description,
                quantize_recipes=recipes,
                max_accuracy_drop_pp=max_accuracy_drop_pp,
                created_by=created_by,
            )
    except IntegrityError as exc:
        raise Conflict(
            f"A model named {name!r} already exists.", code="duplicate_model", field="name"
        ) from exc


def _golden_store(*, model: MLModel, version: str, upload: Any) -> dict[str, Any]:
    """Validate an uploaded .npz golden set and store it; return the version's golden fields."""
    if upload.size > settings.GOLDEN_SET_MAX_BYTES:
        raise TooLarge(
            f"The golden set is larger than {settings.GOLDEN_SET_MAX_BYTES} bytes (GOLDEN_SET_MAX_BYTES).",
            code="too_large",
            field="golden_set",
        )
    digest = hashlib.sha256()
    upload.seek(0)
    for chunk in upload.chunks(CHUNK_BYTES):
        digest.update(chunk)
    upload.seek(0)
    try:
        # Header first, arrays only within the limits, never a pickle: the archive is untrusted.
        x, _ = download.read_golden_set(
            upload, max_samples=settings.GOLDEN_SET_MAX_SAMPLES, max_bytes=settings.GOLDEN_SET_MAX_ARRAY_BYTES
        )
    except runtime.GoldenSetError as exc:
        raise Unprocessable(
            f"Invalid golden set: {exc}", code="invalid_golden_set", field="golden_set"
        ) from exc
    upload.seek(0)
    sha256 = digest.hexdigest()
    name = artifact_storage().save(f"golden/{model.name}/{version}-{sha256[:16]}.npz", upload)
    return {
        "golden_file": name,
        "golden_sha256": sha256,
        "golden_size": upload.size,
        "golden_samples": len(x),
        "golden_input_shape": list(x.shape[1:]),
    }


def version_create(
    *,
    model: MLModel,
    version: str,
    notes: str = "",
    golden_set: Any | None = None,
    created_by: AbstractBaseUser | None = None,
) -> ModelVersion:
    if not protocol.is_semver(version):
        raise InvalidInput(
            f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH, e.g. 1.4.0).",
            code="invalid_semver",
            field="version",
        )
    if ModelVersion.objects.filter(model=model, version=version).exists():
        raise Conflict(f"{model.name} {version} already exists.", code="duplicate_version", field="version")
    golden = _golden_store(model=model, version=version, upload=golden_set) if golden_set is not None else {}
    try:
        with transaction.atomic():
            return ModelVersion.objects.create(
                model=model, version=version, notes=notes, created_by=created_by, **golden
            )
    except IntegrityError as exc:  # lost a race with an identical request
        _delete_quietly(golden.get("golden_file", ""))
        raise Conflict(
            f"{model.name} {version} already exists.", code="duplicate_version", field="version"
        ) from exc


def version_set_status(*, version: ModelVersion, status: str) -> ModelVersion:
    """Move a version along VERSION_TRANSITIONS with a compare-and-set update."""
    allowed = VERSION_TRANSITIONS.get(version.status, ())
    if status not in allowed:
        raise Conflict(
            f"{version} is {version.status}; it cannot become {status}"
            + (f" (allowed: {', '.join(allowed)})." if allowed else " (revoked is final)."),
            code="illegal_transition",
        )
    updated = ModelVersion.objects.filter(pk=version.pk, status=version.status).update(
        status=status, status_changed_at=timezone.now()
    )
    if not updated:
        raise Conflict(
            f"{version} changed while you were looking; reload and try again.", code="concurrent_change"
        )
    version.refresh_from_db()
    if status == VersionStatus.RELEASED:
        deltas_queue_for_release(version)
    return version


# --- artifacts


def _check_header(path: Path) -> None:
    """Refuse what is plainly not a TFLite file from its first 8 bytes. Parsing the rest is
    the sandbox's job: the web process never walks the untrusted flatbuffer."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    try:
        tflite.check_header(head, size=path.stat().st_size)
    except tflite.InvalidModel as exc:
        raise Unprocessable(f"Not a usable TFLite model: {exc.message}", code=exc.code, field="file") from exc


def artifact_upload(
    *,
    version: ModelVersion,
    variant: str,
    upload: Any,
    created_by: AbstractBaseUser | None = None,
    requires_hardware: list[str] | None = None,
    quantize_recipes: list[str] | None = None,
) -> Artifact:
    """Store an uploaded .tflite as a pending variant and queue its pipeline.

    ``upload`` is a Django uploaded file on disk (our upload handler makes sure); it is
    consumed: local storage moves it into place instead of copying it.
    """
    _require_name(variant, "variant")
    hardware = _hardware_classes(requires_hardware)
    # Recipes the factory runs once this upload is ready (a float32 model only); None: the
    # model's setting.
    recipes = _check_recipes(version.model.quantize_recipes if quantize_recipes is None else quantize_recipes)
    if version.status == VersionStatus.REVOKED:
        raise Conflict(f"{version} is revoked; it takes no new artifacts.", code="version_revoked")
    if version.artifacts.filter(variant=variant).exclude(status=ArtifactStatus.FAILED).exists():
        raise Conflict(
            f"{version} already has a {variant!r} variant.", code="duplicate_variant", field="variant"
        )
    if not upload.size:
        raise InvalidInput("The uploaded file is empty.", code="empty_file", field="file")
    _check_header(Path(upload.temporary_file_path()))

    raw_name = artifact_storage().save(
        f"raw/{version.model.name}/{version.version}/{variant}-{uuid.uuid4().hex[:12]}.tflite", upload
    )
    upload.close()  # local storage moved the temporary file into place; nothing left to read
    task_id = str(uuid.uuid4())
    try:
        with transaction.atomic():
            artifact = Artifact.objects.create(
                version=version,
                variant=variant,
                raw_file=raw_name,
                raw_size=upload.size,
                requires_hardware=hardware,
                created_by=created_by,
                task_id=task_id,
                requested_recipes=[r for r in recipes if r != variant],
            )
            transaction.on_commit(lambda: _queue_processing(artifact.pk, task_id))
    except IntegrityError as exc:
        _delete_quietly(raw_name)
        raise Conflict(
            f"{version} already has a {variant!r} variant.", code="duplicate_variant", field="variant"
        ) from exc
    except BaseException:
        _delete_quietly(raw_name)
        raise
    metrics.ARTIFACT_UPLOADS.inc()
    metrics.ARTIFACT_UPLOAD_BYTES.inc(upload.size)
    return artifact


def _hardware_classes(classes: list[str] | None) -> list[str]:
    """The hardware classes a variant targets: names like device hardware classes, "any"
    alone meaning every device (the default)."""
    classes = sorted({c.strip() for c in classes or [] if c.strip()}) or ["any"]
    if len(classes) > 32:
        raise InvalidInput("At most 32 hardware classes.", code="invalid", field="requires_hardware")
    for name in classes:
        if not HARDWARE_CLASS.fullmatch(name):
            raise InvalidInput(
                f"{name!r} is not a hardware class (letters, digits, '.', '_', '-'; up to 64).",
                code="invalid",
                field="requires_hardware",
            )
    if "any" in classes and len(classes) > 1:
        raise InvalidInput(
            '"any" means every device; list it alone.', code="invalid", field="requires_hardware"
        )
    return classes


def _queue_processing(artifact_id: int, task_id: str) -> None:
    from fleet.registry.tasks import artifact_process_task

    artifact_process_task.apply_async((artifact_id,), task_id=task_id)


class _PipelineError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _sandbox_limits() -> sandbox.Limits:
    return sandbox.Limits(
        memory_bytes=settings.SANDBOX_MEMORY_BYTES,
        cpu_seconds=settings.SANDBOX_CPU_SECONDS,
        file_bytes=settings.SANDBOX_FILE_BYTES,
        wall_seconds=settings.SANDBOX_WALL_SECONDS,
        require_isolation=settings.SANDBOX_REQUIRE_ISOLATION,
    )


def _run_checks(raw_path: Path, golden_path: Path | None, version: ModelVersion) -> dict[str, Any]:
    """Inspect, load, smoke-run and score the model in the sandbox; return its checked report."""
    try:
        report = sandbox.run(
            job=CHECK_MODEL_JOB,
            args={
                "model_path": str(raw_path),
                "golden_path": str(golden_path) if golden_path else None,
                "max_tensor_bytes": max(settings.SANDBOX_MEMORY_BYTES - SANDBOX_BASELINE_BYTES, 0),
                "golden_max_samples": settings.GOLDEN_SET_MAX_SAMPLES,
                "golden_max_bytes": settings.GOLDEN_SET_MAX_ARRAY_BYTES,
                "latency_runs": settings.LATENCY_RUNS,
            },
            readable=[p for p in (raw_path, golden_path) if p],
            limits=_sandbox_limits(),
        )
    except sandbox.SandboxError as exc:
        if exc.code not in ArtifactFailure.values:
            raise _PipelineError(
                ArtifactFailure.SANDBOX_BAD_REPORT, f"The model check failed: {exc.message}"
            ) from exc
        raise _PipelineError(exc.code, exc.message) from exc
    return _checked_report(report, version)


def _bad_report(what: str) -> _PipelineError:
    return _PipelineError(
        ArtifactFailure.SANDBOX_BAD_REPORT, f"The model check sent a report that makes no sense: {what}."
    )


def _short_str(value: Any, limit: int = 256) -> bool:
    return isinstance(value, str) and len(value) <= limit


def _check_tensors(value: Any, what: str) -> None:
    if not isinstance(value, list) or not 0 < len(value) <= 256:
        raise _bad_report(f"{what} is not a list of tensors")
    for tensor in value:
        shape = tensor.get("shape") if isinstance(tensor, dict) else None
        if not (
            isinstance(tensor, dict)
            and set(tensor) == {"name", "shape", "dtype"}
            and _short_str(tensor["name"])
            and _short_str(tensor["dtype"], 32)
            and isinstance(shape, list)
            and len(shape) <= 16
            and all(type(d) is int for d in shape)
        ):
            raise _bad_report(f"an entry of {what} is not a tensor description")


def _checked_report(report: dict[str, Any], version: ModelVersion) -> dict[str, Any]:
    """The sandbox's report is data from a process that ran hostile bytes: check every field
    before it reaches the database or a manifest."""
    signature = report.get("signature")
    if not (isinstance(report.get("raw_sha256"), str) and len(report["raw_sha256"]) == 64):
        raise _bad_report("raw_sha256")
    if type(report.get("raw_size")) is not int:
        raise _bad_report("raw_size")
    if not isinstance(signature, dict):
        raise _bad_report("signature")
    _check_tensors(signature.get("inputs"), "inputs")
    _check_tensors(signature.get("outputs"), "outputs")
    ops = signature.get("ops")
    if not (isinstance(ops, list) and len(ops) <= 1024 and all(_short_str(op, 128) for op in ops)):
        raise _bad_report("ops")
    if not _short_str(signature.get("quantization"), 16):
        raise _bad_report("quantization")
    if not _short_str(signature.get("description", ""), 4096) or not all(
        type(signature.get(key, 0)) is int for key in ("schema_version", "subgraphs", "tensors", "operators")
    ):
        raise _bad_report("description or counts")
    op_versions = signature.get("op_versions", {})
    if not (
        isinstance(op_versions, dict)
        and set(op_versions) <= set(ops)
        and all(type(v) is int and 0 <= v < 1000 for v in op_versions.values())
    ):
        raise _bad_report("op_versions")
    min_runtime = signature.get("min_runtime")
    if min_runtime is not None and not (
        _short_str(min_runtime, 32) and tflite.RUNTIME_VERSION.fullmatch(min_runtime)
    ):
        raise _bad_report("min_runtime")
    accuracy, samples = report.get("golden_accuracy"), report.get("golden_samples")
    if version.has_golden_set:
        if not (isinstance(accuracy, float | int) and 0 <= accuracy <= 1):
            raise _bad_report("golden_accuracy")
        if samples != version.golden_samples:
            raise _bad_report(f"golden_samples {samples!r} for a golden set of {version.golden_samples}")
    elif accuracy is not None or samples is not None:
        raise _bad_report("a golden accuracy for a version without a golden set")
    latency = report.get("latency_ms")
    if latency is not None and not (isinstance(latency, float | int) and 0 <= latency < 3_600_000):
        raise _bad_report("latency_ms")
    keys = ("inputs", "outputs", "ops", "op_versions", "min_runtime", "quantization", "schema_version")
    keys += ("description", "subgraphs")
    return {
        "raw_sha256": report["raw_sha256"],
        "raw_size": report["raw_size"],
        "signature": {key: signature[key] for key in (*keys, "tensors", "operators") if key in signature},
        "golden_accuracy": float(accuracy) if accuracy is not None else None,
        "golden_samples": samples,
        "latency_ms": float(latency) if latency is not None else None,
    }


class _HashingWriter:
    def __init__(self, target: Any) -> None:
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.target.write(data)


def compress_file(source: Path, target: Any, *, level: int, threads: int) -> dict[str, Any]:
    """zstd-compress ``source`` into the open file ``target``, hashing both sides in one pass.

    The frame records the content size and a checksum, so a device can cap its
    decompression output and detect corruption even before comparing hashes.
    """
    raw_size = source.stat().st_size
    raw_sha256 = hashlib.sha256()
    compressor = zstandard.ZstdCompressor(
        level=level, threads=threads, write_checksum=True, write_content_size=True
    )
    # Levels 20-22 would ask devices for a window of up to 128 MiB; they decode at most
    # download.ZSTD_MAX_WINDOW_BYTES, so cap the window there (the ratio barely changes).
    max_window_log = download.ZSTD_MAX_WINDOW_BYTES.bit_length() - 1
    if (
        zstandard.ZstdCompressionParameters.from_level(level, source_size=raw_size).window_log
        > max_window_log
    ):
        params = zstandard.ZstdCompressionParameters.from_level(
            level,
            source_size=raw_size,
            window_log=max_window_log,
            threads=threads,
            write_checksum=1,
            write_content_size=1,
        )
        compressor = zstandard.ZstdCompressor(compression_params=params)
    sink = _HashingWriter(target)
    with open(source, "rb") as raw, compressor.stream_writer(sink, size=raw_size, closefd=False) as writer:
        while chunk := raw.read(CHUNK_BYTES):
            raw_sha256.update(chunk)
            writer.write(chunk)
    return {
        "raw_sha256": raw_sha256.hexdigest(),
        "raw_size": raw_size,
        "blob_sha256": sink.sha256.hexdigest(),
        "blob_size": sink.size,
    }


def manifest_payload(*, artifact: Artifact, created_at: str) -> dict[str, Any]:
    """The manifest of ARCHITECTURE.md "Artifact manifest", built by the wire contract."""
    version = artifact.version
    golden = None
    if version.has_golden_set:
        golden = {
            "sha256": version.golden_sha256,
            "size": version.golden_size,
            "samples": version.golden_samples,
            "accuracy": artifact.golden_accuracy,
        }
    return protocol.schemas.build_manifest(
        model=version.model.name,
        version=version.version,
        variant=artifact.variant,
        created_at=created_at,
        raw_sha256=artifact.raw_sha256,
        raw_size=artifact.raw_size,
        blob_sha256=artifact.blob_sha256,
        blob_size=artifact.blob_size,
        tflite=artifact.tflite_signature,
        labels=list(version.model.labels),
        golden=golden,
        hardware=list(artifact.requires_hardware or ["any"]),
        runtime=[f"tflite>={min_runtime}"]
        if (min_runtime := (artifact.tflite_signature or {}).get("min_runtime"))
        else None,
    )


def _sign_manifest(artifact: Artifact) -> None:
    key_row, private_key = signing_key_active()
    created_at = protocol.format_time(timezone.now())
    payload = protocol.canonical_json(manifest_payload(artifact=artifact, created_at=created_at))
    envelope = protocol.sign(payload, payload_type=protocol.MANIFEST_PAYLOAD_TYPE, private_key=private_key)
    artifact.manifest_envelope = protocol.envelope_bytes(envelope).decode("utf-8")
    artifact.manifest_sha256 = hashlib.sha256(payload).hexdigest()
    artifact.signing_key = key_row


def _compress_and_store(artifact: Artifact, raw_path: Path) -> str:
    level, threads = settings.ARTIFACT_ZSTD_LEVEL, settings.ARTIFACT_ZSTD_THREADS
    with tempfile.NamedTemporaryFile(
        dir=settings.FILE_UPLOAD_TEMP_DIR, suffix=".zst", delete=False
    ) as handle:
        temp_name = handle.name
        hashes = compress_file(raw_path, handle, level=level, threads=threads)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        if artifact.raw_size is not None and hashes["raw_size"] != artifact.raw_size:
            raise _PipelineError(
                ArtifactFailure.RAW_CHANGED, "The stored upload changed size since it was received."
            )
        version = artifact.version
        with open(temp_name, "rb") as blob:
            name = artifact_storage().save(
                f"blobs/{version.model.name}/{version.version}/{artifact.variant}-{artifact.pk}-{uuid.uuid4().hex[:12]}"
                ".tflite.zst",
                _MovableFile(blob, name=temp_name),
            )
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
    for field, value in hashes.items():
        setattr(artifact, field, value)
    artifact.compression, artifact.compression_level = COMPRESSION_ZSTD, level
    return name


def _artifact_fail(artifact: Artifact, code: str, message: str, blob_name: str = "") -> None:
    updated = Artifact.objects.filter(pk=artifact.pk, status=ArtifactStatus.PENDING).update(
        status=ArtifactStatus.FAILED,
        failure_code=code,
        failure_reason=message,
        processed_at=timezone.now(),
        raw_file="",
        blob_file="",
    )
    _delete_quietly(blob_name)
    if updated:
        _delete_quietly(artifact.raw_file)
    log.warning("artifact %s failed: %s: %s", artifact.pk, code, message)


def artifact_process(*, artifact_id: int) -> Artifact:
    """Run the pipeline for a pending artifact. Idempotent: a ready or failed artifact is
    returned unchanged, and when two workers race only one compare-and-set wins; the
    loser removes the blob it wrote (each run writes a blob of its own name, so the loser
    can never delete the winner's)."""
    artifact = Artifact.objects.select_related("version__model").get(pk=artifact_id)
    if artifact.status != ArtifactStatus.PENDING:
        return artifact
    started = time.perf_counter()
    try:
        artifact = _artifact_pipeline(artifact)
    except BaseException:
        metrics.ARTIFACT_PIPELINE_SECONDS.labels(ArtifactStatus.FAILED).observe(time.perf_counter() - started)
        raise
    metrics.ARTIFACT_PIPELINE_SECONDS.labels(artifact.status).observe(time.perf_counter() - started)
    return artifact


def _artifact_pipeline(artifact: Artifact) -> Artifact:
    blob_name = ""
    version = artifact.version
    try:
        with contextlib.ExitStack() as files:
            raw_path = files.enter_context(_local_path(artifact.raw_file))
            golden_path = (
                files.enter_context(_local_path(version.golden_file)) if version.has_golden_set else None
            )
            report = _run_checks(raw_path, golden_path, version)
            artifact.tflite_signature = report["signature"]
            artifact.golden_accuracy, artifact.golden_samples = (
                report["golden_accuracy"],
                report["golden_samples"],
            )
            artifact.latency_ms = report["latency_ms"]
            blob_name = _compress_and_store(artifact, raw_path)  # hashes computed here, by the worker
        if (artifact.raw_sha256, artifact.raw_size) != (report["raw_sha256"], report["raw_size"]):
            raise _PipelineError(
                ArtifactFailure.RAW_CHANGED,
                "The bytes the sandbox checked are not the bytes being signed (the stored upload changed).",
            )
        # Only now, with the child gone, does this process read the signing key.
        _sign_manifest(artifact)
    except _PipelineError as exc:
        _artifact_fail(artifact, exc.code, exc.message, blob_name)
    except Unprocessable as exc:
        _artifact_fail(artifact, exc.code, exc.message, blob_name)
    except BaseException as exc:
        # Timeouts and bugs: never leave a half-made artifact that looks usable.
        _artifact_fail(artifact, ArtifactFailure.PIPELINE_ERROR, f"{type(exc).__name__}: {exc}", blob_name)
        raise
    else:
        rejection = _accuracy_rejection(artifact)
        updated = Artifact.objects.filter(pk=artifact.pk, status=ArtifactStatus.PENDING).update(
            status=ArtifactStatus.REJECTED if rejection else ArtifactStatus.READY,
            failure_code=ArtifactFailure.ACCURACY_DROP if rejection else "",
            failure_reason=rejection,
            blob_file=blob_name,
            processed_at=timezone.now(),
            **{
                field: getattr(artifact, field)
                for field in (
                    "raw_sha256",
                    "raw_size",
                    "blob_sha256",
                    "blob_size",
                    "compression",
                    "compression_level",
                    "tflite_signature",
                    "golden_accuracy",
                    "golden_samples",
                    "latency_ms",
                    "manifest_envelope",
                    "manifest_sha256",
                    "signing_key",
                )
            },
        )
        if not updated:
            _delete_quietly(blob_name)
        else:
            if not rejection:
                _queue_deltas([artifact.pk])
            if artifact.requested_recipes:
                artifact.refresh_from_db()
                _produce_variants(artifact)
    artifact.refresh_from_db()
    return artifact


# --- the quantization factory (docs/quantization.md)


def _accuracy_rejection(artifact: Artifact) -> str:
    """The reason a produced variant is not released, or "" when it may be."""
    drop = selectors.accuracy_drop_pp(artifact, artifact.parent)
    if drop is None:
        return ""
    limit = selectors.max_accuracy_drop_pp(artifact.version.model)
    if drop <= limit + 1e-9:
        return ""
    return (
        f"Rejected: golden accuracy {artifact.golden_accuracy * 100:.1f} % is {drop:.1f} pp below the "
        f"float32 parent's {artifact.parent.golden_accuracy * 100:.1f} %, over the {limit:.1f} pp limit."
    )


def _check_recipes(recipes: Any) -> list[str]:
    if not isinstance(recipes, list | tuple) or not all(isinstance(r, str) for r in recipes):
        raise InvalidInput(
            "quantize must be a list of recipe names.", code="invalid_recipe", field="quantize"
        )
    unknown = sorted(set(recipes) - set(QuantRecipe.values))
    if unknown:
        raise InvalidInput(
            f"Unknown recipe {unknown[0]!r}; choose from {', '.join(QuantRecipe.values)}.",
            code="invalid_recipe",
            field="quantize",
        )
    return list(dict.fromkeys(recipes))


def _golden_calibration(version: ModelVersion) -> np.ndarray | None:
    if not version.has_golden_set:
        return None
    with _local_path(version.golden_file) as golden_path:
        x, _ = download.read_golden_set(
            golden_path,
            max_samples=settings.GOLDEN_SET_MAX_SAMPLES,
            max_bytes=settings.GOLDEN_SET_MAX_ARRAY_BYTES,
        )
    return x[: settings.QUANT_CALIBRATION_SAMPLES]


def _produce_variants(parent: Artifact) -> list[Artifact]:
    """Quantize a ready float32 artifact with each recipe it asked for; every produced file
    becomes a pending artifact of its own and runs the whole pipeline."""
    version = parent.version
    signature = parent.tflite_signature or {}
    if signature.get("quantization") != "none":
        log.info("artifact %s is not a float32 model; no variants produced", parent.pk)
        return []
    produced = []
    version_tool = quantize.tool_version()
    for recipe in parent.requested_recipes:
        if version.artifacts.filter(variant=recipe).exclude(status=ArtifactStatus.FAILED).exists():
            continue  # uploaded or produced already: never two artifacts of one variant
        fields = {
            "version": version,
            "variant": recipe,
            "parent": parent,
            "recipe": recipe,
            "tool": quantize.TOOL,
            "tool_version": version_tool,
            "created_by": parent.created_by,
        }
        try:
            calibration = _golden_calibration(version) if quantize.needs_calibration(recipe) else None
            with _local_path(parent.raw_file) as raw_path:
                data = quantize.quantize(raw_path, recipe, calibration)
        except (quantize.QuantizationError, runtime.GoldenSetError) as exc:
            produced.append(
                Artifact.objects.create(
                    status=ArtifactStatus.FAILED,
                    failure_code=ArtifactFailure.QUANTIZATION_FAILED,
                    failure_reason=str(exc),
                    processed_at=timezone.now(),
                    **fields,
                )
            )
            continue
        raw_name = artifact_storage().save(
            f"raw/{version.model.name}/{version.version}/{recipe}-{uuid.uuid4().hex[:12]}.tflite",
            ContentFile(data),
        )
        task_id = str(uuid.uuid4())
        try:
            with transaction.atomic():
                child = Artifact.objects.create(
                    raw_file=raw_name,
                    raw_size=len(data),
                    task_id=task_id,
                    calibration_samples=len(calibration) if calibration is not None else None,
                    **fields,
                )
                transaction.on_commit(lambda pk=child.pk, tid=task_id: _queue_processing(pk, tid))
        except IntegrityError:
            _delete_quietly(raw_name)  # a concurrent upload of the same variant won
            continue
        produced.append(child)
    return produced


# --- tensor-level deltas (docs/protocol.md, addition 11)


def delta_bases(artifact: Artifact) -> list[Artifact]:
    """The artifacts a delta to ``artifact`` is made from: the ready artifacts of the same
    variant of the DELTA_BASES most recent earlier versions of the model that were released
    (released or deprecated: what devices may run)."""
    if settings.DELTA_BASES == 0:
        return []
    version = artifact.version
    return list(
        Artifact.objects.filter(
            version__model_id=version.model_id,
            variant=artifact.variant,
            status=ArtifactStatus.READY,
            version__status__in=[VersionStatus.RELEASED, VersionStatus.DEPRECATED],
            version__created_at__lt=version.created_at,
        )
        .select_related("version__model")
        .order_by("-version__created_at")[: settings.DELTA_BASES]
    )


def _delta_manifest_sign(delta: ArtifactDelta) -> None:
    target, base = delta.target, delta.base
    key_row, private_key = signing_key_active()
    manifest = protocol.build_delta_manifest(
        model=target.version.model.name,
        version=target.version.version,
        variant=target.variant,
        created_at=protocol.format_time(timezone.now()),
        base_version=base.version.version,
        base_variant=base.variant,
        base_raw={"sha256": base.raw_sha256, "size": base.raw_size},
        target_raw={"sha256": target.raw_sha256, "size": target.raw_size},
        delta_sha256=delta.blob_sha256,
        delta_size=delta.blob_size,
    )
    payload = protocol.canonical_json(manifest)
    envelope = protocol.sign(payload, payload_type=protocol.DELTA_PAYLOAD_TYPE, private_key=private_key)
    delta.manifest_envelope = protocol.envelope_bytes(envelope).decode("utf-8")
    delta.manifest_sha256 = hashlib.sha256(payload).hexdigest()
    delta.signing_key = key_row


def _delta_build(target: Artifact, base: Artifact) -> ArtifactDelta:
    """Make, check and (when worth it) store and sign the delta from ``base`` to ``target``.

    Both files already passed the sandbox's inspection; the delta is made here with the
    codec's pure-Python flatbuffer reader, and signed only after this process rebuilt the
    target from it (``apply_delta``, no parser) and found the target's sha256."""
    delta = ArtifactDelta(target=target, base=base)
    started = time.perf_counter()
    with _local_path(base.raw_file) as base_path, _local_path(target.raw_file) as target_path:
        base_raw, target_raw = base_path.read_bytes(), target_path.read_bytes()
    if hashlib.sha256(base_raw).hexdigest() != base.raw_sha256 or (
        hashlib.sha256(target_raw).hexdigest() != target.raw_sha256
    ):
        delta.status, delta.reason = DeltaStatus.FAILED, "A stored model no longer matches its signed sha256."
        return delta
    try:
        data = make_delta(base_raw, target_raw, level=settings.ARTIFACT_ZSTD_LEVEL)
        rebuilt = apply_delta(
            base_raw,
            data,
            max_output=len(target_raw),
            base_sha256=base.raw_sha256,
            target_sha256=target.raw_sha256,
        )
    except DeltaRefused as exc:
        delta.status, delta.reason = DeltaStatus.SKIPPED, f"No delta: {exc}."
        return delta
    except DeltaError as exc:
        delta.status, delta.reason = DeltaStatus.FAILED, f"The delta did not rebuild the model: {exc}."
        return delta
    except Exception as exc:  # a time limit, memory: recorded, so that no later trigger redoes it
        log.exception("making the delta from %s to %s failed", base, target)
        delta.status, delta.reason = DeltaStatus.FAILED, f"Making the delta failed: {type(exc).__name__}."
        return delta
    delta.seconds = time.perf_counter() - started
    if hashlib.sha256(rebuilt).hexdigest() != target.raw_sha256:
        delta.status, delta.reason = DeltaStatus.FAILED, "The delta did not rebuild the model exactly."
        return delta
    size, full = len(data), target.blob_size
    sizes = f"{display.size(size)} against the full blob's {display.size(full)} ({size / full * 100:.0f} %)"
    if size >= settings.DELTA_MAX_RATIO * full:
        delta.status = DeltaStatus.SKIPPED
        delta.reason = (
            f"Not offered: the delta from {base.version.version} would be {sizes}, "
            f"over the {settings.DELTA_MAX_RATIO * 100:.0f} % limit (DELTA_MAX_RATIO)."
        )
        return delta
    version = target.version
    delta.blob_file = artifact_storage().save(
        f"deltas/{version.model.name}/{version.version}/{target.variant}-from-{base.version.version}"
        f"-{uuid.uuid4().hex[:12]}.mfdelta",
        ContentFile(data),
    )
    delta.blob_sha256, delta.blob_size = hashlib.sha256(data).hexdigest(), size
    _delta_manifest_sign(delta)
    delta.status = DeltaStatus.READY
    delta.reason = f"Offered to devices running {base.version.version}: {sizes}."
    return delta


def artifact_delta_make(*, target: Artifact, base: Artifact) -> ArtifactDelta | None:
    """Make the delta from ``base`` to ``target`` (both ready, same model and variant) and
    record what was decided: offered, skipped or failed, with the reason. A pair done
    already is left alone (None), so a retry or a second worker changes nothing."""
    if ArtifactDelta.objects.filter(target=target, base=base).exists():
        return None
    if (target.version.model_id, target.variant) != (base.version.model_id, base.variant) or (
        target.status != ArtifactStatus.READY or base.status != ArtifactStatus.READY
    ):
        raise Conflict("A delta needs two ready artifacts of one model and variant.", code="delta_mismatch")
    delta = _delta_build(target, base)
    try:
        with transaction.atomic():
            delta.save()
    except IntegrityError:  # another worker made it meanwhile: keep theirs
        _delete_quietly(delta.blob_file)
        return None
    log.info("delta %s: %s", delta, delta.reason)
    metrics.ARTIFACT_DELTAS.labels(delta.status).inc()
    return delta


def artifact_deltas_make(*, artifact_id: int) -> list[ArtifactDelta]:
    """Make the deltas to a ready artifact from its bases (``delta_bases``). Returns the
    deltas made by this call."""
    target = Artifact.objects.select_related("version__model").filter(pk=artifact_id).first()
    if target is None or target.status != ArtifactStatus.READY:
        return []
    made = (artifact_delta_make(target=target, base=base) for base in delta_bases(target))
    return [delta for delta in made if delta is not None]


def _queue_deltas(artifact_ids: list[int]) -> None:
    from fleet.registry.tasks import artifact_deltas_task

    for artifact_id in artifact_ids:
        transaction.on_commit(lambda pk=artifact_id: artifact_deltas_task.delay(pk))


def deltas_queue_for_release(version: ModelVersion) -> None:
    """A version just released becomes a base: queue deltas to the ready artifacts of the
    model's later versions (the task skips pairs it made already)."""
    later = Artifact.objects.filter(
        version__model_id=version.model_id,
        version__created_at__gt=version.created_at,
        status=ArtifactStatus.READY,
    ).values_list("pk", flat=True)
    _queue_deltas(list(later))
