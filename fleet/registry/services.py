"""Registry writes: models, versions, golden sets, artifact upload and the artifact pipeline.

Pipeline (registry issue, 4): the upload streams to storage and is inspected at once, so
most bad files are refused in the request; then ``artifact_process`` (a Celery task) loads
the model in LiteRT, smoke-runs it and scores the golden set, compresses it with zstd,
hashes raw and blob, signs the manifest and marks the artifact ready. Every failure
leaves the artifact ``failed`` with a code and reason, and deletes its files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import zstandard
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.files import File
from django.core.files.storage import Storage, storages
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone

from agent import protocol, runtime
from fleet.core.errors import Conflict, InvalidInput, TooLarge, Unprocessable
from fleet.registry import tflite
from fleet.registry.choices import (
    COMPRESSION_ZSTD,
    VERSION_TRANSITIONS,
    ArtifactStatus,
    Task,
    VersionStatus,
)
from fleet.registry.models import Artifact, MLModel, ModelVersion, name_validator
from fleet.registry.signing import signing_key_active

log = logging.getLogger(__name__)
CHUNK_BYTES = 1024 * 1024


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
    created_by: AbstractBaseUser | None = None,
) -> MLModel:
    _require_name(name, "name")
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
        x, _ = runtime.read_golden_set(upload)
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
    return version


# --- artifacts


def _inspect_upload(path: Path) -> dict[str, Any]:
    try:
        return tflite.inspect_file(path)
    except tflite.InvalidModel as exc:
        raise Unprocessable(f"Not a usable TFLite model: {exc.message}", code=exc.code, field="file") from exc


def _check_golden_fits(version: ModelVersion, signature: dict[str, Any]) -> None:
    if not version.has_golden_set:
        return
    inputs = signature["inputs"]
    if len(inputs) != 1 or list(inputs[0]["shape"][1:]) != list(version.golden_input_shape):
        raise Unprocessable(
            f"The golden set of {version} has samples of shape {version.golden_input_shape}, "
            f"but this model's input is {[i['shape'] for i in inputs]}.",
            code="golden_shape_mismatch",
            field="file",
        )


def artifact_upload(
    *, version: ModelVersion, variant: str, upload: Any, created_by: AbstractBaseUser | None = None
) -> Artifact:
    """Store an uploaded .tflite as a pending variant and queue its pipeline.

    ``upload`` is a Django uploaded file on disk (our upload handler makes sure); it is
    consumed: local storage moves it into place instead of copying it.
    """
    _require_name(variant, "variant")
    if version.status == VersionStatus.REVOKED:
        raise Conflict(f"{version} is revoked; it takes no new artifacts.", code="version_revoked")
    if version.artifacts.filter(variant=variant).exclude(status=ArtifactStatus.FAILED).exists():
        raise Conflict(
            f"{version} already has a {variant!r} variant.", code="duplicate_variant", field="variant"
        )
    if not upload.size:
        raise InvalidInput("The uploaded file is empty.", code="empty_file", field="file")
    signature = _inspect_upload(Path(upload.temporary_file_path()))
    _check_golden_fits(version, signature)

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
                tflite_signature=signature,
                created_by=created_by,
                task_id=task_id,
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
    return artifact


def _queue_processing(artifact_id: int, task_id: str) -> None:
    from fleet.registry.tasks import artifact_process_task

    artifact_process_task.apply_async((artifact_id,), task_id=task_id)


class _PipelineError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _run_checks(path: Path, version: ModelVersion) -> tuple[float | None, int | None]:
    """Load in LiteRT, smoke-run on zeros, score the golden set if the version has one."""
    try:
        interpreter = runtime.load(path)
        runtime.smoke_run(interpreter)
    except runtime.RuntimeLoadError as exc:
        raise _PipelineError("unloadable_model", f"LiteRT cannot run this model: {exc}") from exc
    if not version.has_golden_set:
        return None, None
    with artifact_storage().open(version.golden_file, "rb") as handle:
        x, y = runtime.read_golden_set(handle)
    try:
        return runtime.golden_accuracy(interpreter, x, y), len(x)
    except (runtime.GoldenSetError, ValueError) as exc:
        raise _PipelineError(
            "golden_shape_mismatch", f"The golden set does not fit this model: {exc}"
        ) from exc


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
    )


def _sign_manifest(artifact: Artifact) -> None:
    key_row, private_key = signing_key_active()
    created_at = timezone.now().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
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
            raise _PipelineError("raw_changed", "The stored upload changed size since it was received.")
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
    blob_name = ""
    try:
        with _local_path(artifact.raw_file) as raw_path:
            artifact.tflite_signature = _inspect_upload(raw_path)
            artifact.golden_accuracy, artifact.golden_samples = _run_checks(raw_path, artifact.version)
            blob_name = _compress_and_store(artifact, raw_path)
        _sign_manifest(artifact)
    except _PipelineError as exc:
        _artifact_fail(artifact, exc.code, exc.message, blob_name)
    except Unprocessable as exc:
        _artifact_fail(artifact, exc.code, exc.message, blob_name)
    except BaseException as exc:
        # Timeouts and bugs: never leave a half-made artifact that looks usable.
        _artifact_fail(artifact, "pipeline_error", f"{type(exc).__name__}: {exc}", blob_name)
        raise
    else:
        updated = Artifact.objects.filter(pk=artifact.pk, status=ArtifactStatus.PENDING).update(
            status=ArtifactStatus.READY,
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
                    "manifest_envelope",
                    "manifest_sha256",
                    "signing_key",
                )
            },
        )
        if not updated:
            _delete_quietly(blob_name)
    artifact.refresh_from_db()
    return artifact


# --- desired states (what a device should run), signed for the device to verify


def _public_url(name: str, artifact: Artifact) -> str:
    return settings.PUBLIC_BASE_URL + reverse(name, args=[artifact.pk])


def desired_model_entry(artifact: Artifact) -> dict[str, Any]:
    """One model's entry of a desired state. Refuses artifacts that are not ready and
    versions that are revoked: a revoked version can never be assigned again."""
    if artifact.status != ArtifactStatus.READY:
        raise Conflict(f"Artifact {artifact.pk} is {artifact.status}, not ready.", code="artifact_not_ready")
    if artifact.version.status == VersionStatus.REVOKED:
        raise Conflict(f"{artifact.version} is revoked; it cannot be assigned.", code="version_revoked")
    return {
        "version": artifact.version.version,
        "variant": artifact.variant,
        "manifest_url": _public_url("artifact-manifest", artifact),
        "blob_url": _public_url("artifact-blob", artifact),
        "golden_url": _public_url("artifact-golden", artifact) if artifact.version.has_golden_set else None,
        "manifest_sha256": artifact.manifest_sha256,
    }


def desired_state_envelope(
    *,
    device_id: str,
    generation: int,
    artifacts: dict[str, Artifact] | None = None,
    entries: dict[str, dict[str, Any]] | None = None,
    rollout: dict[str, Any] | None = None,
    private_key: Any = None,
    check: bool = True,
) -> bytes:
    """Sign a device's desired state naming ``artifacts`` (model name -> ready artifact), or
    ready-made ``entries`` (desired_model_entry), which callers signing thousands of states
    build once per artifact. ``check=False`` skips the schema check for states of a batch
    whose first member was checked (they differ only in device id and generation)."""
    models = (
        entries
        if entries is not None
        else {name: desired_model_entry(artifact) for name, artifact in (artifacts or {}).items()}
    )
    now = timezone.now().astimezone(UTC)
    payload = protocol.build_desired(
        device_id=device_id,
        generation=generation,
        models=models,
        issued_at=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        expires_at=(now + timedelta(seconds=settings.DESIRED_STATE_TTL_SECONDS)).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        ),
        rollout=rollout,
        check=check,
    )
    if private_key is None:  # callers signing many states fetch the key once and pass it
        _, private_key = signing_key_active()
    envelope = protocol.sign(
        protocol.canonical_json(payload), payload_type=protocol.DESIRED_PAYLOAD_TYPE, private_key=private_key
    )
    return protocol.envelope_bytes(envelope)
