"""The artifact pipeline at service level (services.artifact_process and compress_file):
idempotent, one blob per artifact however many runs, exact zstd round trips, and golden
accuracies that agree with an independent evaluation of the same bytes."""

import hashlib
import io
import threading

import pytest
import zstandard
from django.core.files.base import ContentFile
from django.db import connection, connections, transaction

from agent import protocol
from fleet.registry import services
from fleet.registry.choices import ArtifactStatus
from fleet.registry.models import Artifact
from tests.conftest import wait_until
from tests.server.conftest import pending_artifact, stored_files

pytestmark = pytest.mark.django_db


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_blobs(before: list) -> list[str]:
    """Blob files stored since ``before`` was taken, as storage names."""
    root = services.artifact_storage().path("")
    return [str(path.relative_to(root)) for path in stored_files("blobs") if path not in before]


def test_running_the_pipeline_again_on_a_ready_artifact_changes_nothing(version_v1, digits):
    artifact = pending_artifact(version_v1, "float32", digits.build_digits_models()["float32"])
    blobs_before = stored_files("blobs")
    ready = services.artifact_process(artifact_id=artifact.pk)
    assert ready.status == ArtifactStatus.READY
    assert new_blobs(blobs_before) == [ready.blob_file]
    files = stored_files()
    fields = ("blob_file", "blob_sha256", "raw_file", "manifest_envelope", "manifest_sha256", "processed_at")
    first = {field: getattr(ready, field) for field in fields}

    again = services.artifact_process(artifact_id=artifact.pk)
    assert again.status == ArtifactStatus.READY
    assert {field: getattr(again, field) for field in fields} == first
    assert stored_files() == files


def test_a_second_run_after_another_finished_does_not_write_a_second_blob(version_v1, digits):
    artifact = pending_artifact(version_v1, "int8", digits.build_digits_models()["int8"])
    blobs_before = stored_files("blobs")
    services.artifact_process(artifact_id=artifact.pk)
    services.artifact_process(artifact_id=artifact.pk)
    ready = Artifact.objects.get(pk=artifact.pk)
    assert new_blobs(blobs_before) == [ready.blob_file]
    with services.artifact_storage().open(ready.blob_file, "rb") as blob:
        assert sha256(blob.read()) == ready.blob_sha256


def test_a_late_failure_from_a_losing_run_does_not_touch_a_ready_artifact(version_v1, digits):
    artifact = pending_artifact(version_v1, "float32", digits.build_digits_models()["float32"])
    stale_copy = Artifact.objects.get(pk=artifact.pk)  # what a slower worker loaded, still pending
    ready = services.artifact_process(artifact_id=artifact.pk)
    files = stored_files()

    services._artifact_fail(stale_copy, "pipeline_error", "the slower worker timed out")

    after = Artifact.objects.get(pk=artifact.pk)
    assert after.status == ArtifactStatus.READY
    assert (after.failure_code, after.failure_reason) == ("", "")
    assert (after.raw_file, after.blob_file) == (ready.raw_file, ready.blob_file)
    assert stored_files() == files


def _race(artifact_id: int, racers: int) -> list:
    """Run artifact_process in ``racers`` threads that all reach the final compare-and-set
    together, as workers handed the same task twice (acks_late redelivery) would."""
    results = []

    def run() -> None:
        try:
            results.append(services.artifact_process(artifact_id=artifact_id))
        except BaseException as exc:
            results.append(exc)
        finally:
            connections.close_all()

    # Holding the row lock lets every run compress, store and sign, then queue on its
    # UPDATE; releasing it lets them through one at a time.
    with transaction.atomic():
        Artifact.objects.select_for_update().get(pk=artifact_id)
        threads = [threading.Thread(target=run) for _ in range(racers)]
        for thread in threads:
            thread.start()
        # A run that crashed early never queues: count it as arrived so the test fails fast.
        wait_until(
            lambda: _backends_waiting_on_a_lock() + sum(not t.is_alive() for t in threads) >= racers,
            timeout=60,
            message="every run to reach the CAS",
        )
    for thread in threads:
        thread.join(timeout=60)
    return results


@pytest.mark.django_db(transaction=True)
def test_two_runs_racing_to_the_finish_leave_a_ready_artifact_with_its_one_blob(version_v1, digits):
    model = digits.build_digits_models()["float32"]
    # The two runs store their blobs at the same instant only now and then: race 30 times.
    for attempt in range(30):
        variant = f"race-{attempt}"
        # Made by hand: artifact_upload would queue a Celery task on commit, one more racer.
        raw_name = services.artifact_storage().save(f"raw/digits/1.0.0/{variant}.tflite", ContentFile(model))
        artifact = Artifact.objects.create(
            version=version_v1, variant=variant, raw_file=raw_name, raw_size=len(model)
        )

        blobs_before = stored_files("blobs")

        results = _race(artifact.pk, racers=2)

        ready = Artifact.objects.get(pk=artifact.pk)
        assert [getattr(result, "status", result) for result in results] == [ArtifactStatus.READY] * 2
        assert {result.blob_file for result in results} == {ready.blob_file}
        assert services.artifact_storage().exists(ready.blob_file), (
            f"attempt {attempt}: the ready artifact's blob {ready.blob_file} is gone"
        )
        assert new_blobs(blobs_before) == [ready.blob_file]
        with services.artifact_storage().open(ready.blob_file, "rb") as blob:
            assert sha256(zstandard.ZstdDecompressor().decompress(blob.read())) == sha256(model)


def _backends_waiting_on_a_lock() -> int:
    with connection.cursor() as cursor:
        # Inside a transaction PostgreSQL keeps serving its first statistics snapshot.
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0]


@pytest.mark.parametrize(
    ("size_mb", "level", "threads"),
    [(None, 19, 0), (2.5, 3, 2), (2.5, 1, -1)],
    ids=["digits-level19-single-thread", "2.5MiB-level3-two-threads", "2.5MiB-level1-all-cpus"],
)
def test_compress_file_round_trips_and_hashes_both_sides(digits, tmp_path, size_mb, level, threads):
    raw = digits.build_large_model(size_mb) if size_mb else digits.build_digits_models()["float32"]
    source = tmp_path / "model.tflite"
    source.write_bytes(raw)
    target = io.BytesIO()

    hashes = services.compress_file(source, target, level=level, threads=threads)

    blob = target.getvalue()
    assert zstandard.ZstdDecompressor().decompress(blob) == raw
    assert zstandard.frame_content_size(blob) == len(raw)
    assert zstandard.get_frame_parameters(blob).has_checksum
    assert hashes == {
        "raw_sha256": sha256(raw),
        "raw_size": len(raw),
        "blob_sha256": sha256(blob),
        "blob_size": len(blob),
    }
    assert len(blob) < len(raw)


@pytest.mark.parametrize("variant", ["float32", "int8"])
def test_the_golden_accuracy_equals_an_independent_evaluation(version_v1, digits, variant):
    model = digits.build_digits_models()[variant]
    x, y = digits.golden_set()
    artifact = services.artifact_process(artifact_id=pending_artifact(version_v1, variant, model).pk)

    expected = digits.evaluate(model, x, y)
    assert artifact.status == ArtifactStatus.READY
    assert artifact.golden_accuracy == expected
    assert artifact.golden_samples == len(y) == 200
    keys = protocol.trusted_keys([artifact.signing_key.public_key])
    payload = protocol.verify(
        artifact.manifest_envelope, payload_type=protocol.MANIFEST_PAYLOAD_TYPE, keys=keys
    )
    manifest = protocol.parse("manifest", payload)
    assert manifest["golden"]["accuracy"] == expected


def test_compress_file_keeps_the_window_within_what_devices_decode(tmp_path):
    """Level 21 on 40 MiB would want a 64 MiB window; devices decode at most 32 MiB
    (agent.download.ZSTD_MAX_WINDOW_BYTES), so the registry caps it and devices unpack the blob."""
    from agent.download import ZSTD_MAX_WINDOW_BYTES, decompress_blob

    raw = bytes(40 * 1024 * 1024)  # zeros: compressible fast even at level 21
    source = tmp_path / "model.tflite"
    source.write_bytes(raw)
    natural = zstandard.ZstdCompressionParameters.from_level(21, source_size=len(raw))
    assert 2**natural.window_log > ZSTD_MAX_WINDOW_BYTES  # without the cap devices would refuse it
    blob = tmp_path / "model.tflite.zst"

    with open(blob, "wb") as target:
        hashes = services.compress_file(source, target, level=21, threads=0)

    assert zstandard.get_frame_parameters(blob.read_bytes()).window_size <= ZSTD_MAX_WINDOW_BYTES
    decompress_blob(blob, tmp_path / "out.tflite", raw_size=len(raw), raw_sha256=hashes["raw_sha256"])
    assert hashes["raw_sha256"] == sha256(raw)
