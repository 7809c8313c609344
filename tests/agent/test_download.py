"""Downloading and unpacking artifacts (agent/download.py) against a real HTTP server."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import urllib3
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import runtime
from agent.download import (
    GOLDEN_MAX_SAMPLES,
    ZSTD_MAX_WINDOW_BYTES,
    Downloader,
    TransferError,
    decompress_blob,
    read_golden_set,
)
from tests.agent.artifact_server import ArtifactServer, SignedArtifact, make_signed_artifact

BLOB = "/api/v1/artifacts/1/blob"
MANIFEST = "/api/v1/artifacts/1/manifest"


@pytest.fixture(scope="module")
def artifact(digits) -> SignedArtifact:
    return make_signed_artifact(
        private_key=Ed25519PrivateKey.generate(),
        model="digits",
        version="1.0.0",
        variant="float32",
        tflite=digits.build_digits_models()["float32"],
        labels=digits.LABELS,
        golden_npz=digits.golden_set_npz(),
    )


@pytest.fixture
def server(artifact):
    with ArtifactServer() as server:
        server.add(BLOB, artifact.blob)
        server.add(MANIFEST, artifact.manifest_envelope)
        yield server


@pytest.fixture
def session():
    with urllib3.PoolManager() as http:
        yield http


@pytest.fixture
def partial(tmp_path) -> Path:
    return tmp_path / "downloads" / "blob.part"


def downloader(session: urllib3.PoolManager, **options) -> Downloader:
    """Tiny backoffs keep retry tests fast; the retry logic is the same."""
    return Downloader(
        http=session,
        **{"timeout_s": 5.0, "backoff_initial_s": 0.001, "backoff_max_s": 0.01, **options},
    )


def fetch(downloader: Downloader, server: ArtifactServer, artifact: SignedArtifact, partial: Path) -> Path:
    blob = artifact.manifest["blob"]
    return downloader.fetch_blob(server.url(BLOB), partial=partial, size=blob["size"], sha256=blob["sha256"])


# --- whole and resumed downloads


def test_it_downloads_a_blob_and_verifies_it(server, session, artifact, partial):
    d = downloader(session)
    assert fetch(d, server, artifact, partial) == partial
    assert partial.read_bytes() == artifact.blob
    assert d.bytes_received == len(artifact.blob)
    (request,) = server.requests[BLOB]
    assert "Range" not in request
    assert request["Accept-Encoding"] == "identity"


def test_a_dropped_connection_resumes_where_it_stopped(server, session, artifact, partial):
    half = len(artifact.blob) // 2
    server.cut_after(BLOB, half)
    fetch(downloader(session), server, artifact, partial)
    assert partial.read_bytes() == artifact.blob
    # About one blob over the wire in total: the first half was kept, not fetched again.
    assert server.bytes_sent[BLOB] <= len(artifact.blob) + 1024
    first, second = server.requests[BLOB]
    assert "Range" not in first
    assert second["Range"] == f"bytes={half}-"
    assert second["If-Range"] == f'"{artifact.manifest["blob"]["sha256"]}"'


def test_a_partial_left_by_an_earlier_process_is_resumed(server, session, artifact, partial):
    kept = len(artifact.blob) // 3
    partial.parent.mkdir(parents=True)
    partial.write_bytes(artifact.blob[:kept])
    fetch(downloader(session), server, artifact, partial)
    assert partial.read_bytes() == artifact.blob
    # The server counts a chunk after writing it, so the client may finish first.
    server.wait_for(lambda s: s.bytes_sent[BLOB] >= len(artifact.blob) - kept)
    assert server.bytes_sent[BLOB] == len(artifact.blob) - kept
    (request,) = server.requests[BLOB]
    assert request["Range"] == f"bytes={kept}-"


def test_a_complete_partial_is_verified_without_a_request(server, session, artifact, partial):
    partial.parent.mkdir(parents=True)
    partial.write_bytes(artifact.blob)
    fetch(downloader(session), server, artifact, partial)
    assert server.requests[BLOB] == []


def test_a_corrupt_partial_from_an_earlier_process_is_downloaded_once_more(
    server, session, artifact, partial
):
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\xff" * 100)
    fetch(downloader(session), server, artifact, partial)
    assert partial.read_bytes() == artifact.blob
    first, second = server.requests[BLOB]
    assert first["Range"] == "bytes=100-"
    assert "Range" not in second


def test_a_partial_longer_than_the_blob_is_thrown_away(server, session, artifact, partial):
    partial.parent.mkdir(parents=True)
    partial.write_bytes(artifact.blob + b"tail")
    fetch(downloader(session), server, artifact, partial)
    assert partial.read_bytes() == artifact.blob
    (request,) = server.requests[BLOB]
    assert "Range" not in request


def test_a_200_answer_to_a_range_request_starts_from_the_first_byte(server, session, artifact, partial):
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\x00" * 500)  # what a server that ignores Range must not be appended to
    server.ignore_range(BLOB)
    fetch(downloader(session), server, artifact, partial)
    assert partial.read_bytes() == artifact.blob
    (request,) = server.requests[BLOB]
    assert request["Range"] == "bytes=500-"


def test_a_416_answer_deletes_the_partial_and_starts_again(server, session, artifact, partial):
    partial.parent.mkdir(parents=True)
    partial.write_bytes(artifact.blob[:1000])
    server.fail(BLOB, 416)
    fetch(downloader(session), server, artifact, partial)
    assert partial.read_bytes() == artifact.blob
    first, second = server.requests[BLOB]
    assert first["Range"] == "bytes=1000-"
    assert "Range" not in second


def test_a_bearer_token_on_the_pool_reaches_the_server(server, artifact, partial):
    server.require_token("device-secret")
    with urllib3.PoolManager(headers={"Authorization": "Bearer device-secret"}) as http:
        fetch(downloader(http), server, artifact, partial)
    assert partial.read_bytes() == artifact.blob


# --- refusals


@pytest.mark.parametrize("declare_length", [True, False], ids=["announced", "unannounced"])
@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
def test_a_server_that_sends_more_than_the_blob_is_cut_off(
    server, session, artifact, partial, declare_length, resumed
):
    if resumed:
        partial.parent.mkdir(parents=True)
        partial.write_bytes(artifact.blob[:1000])
    server.send_extra(BLOB, 1 << 20, declare_length=declare_length)
    d = downloader(session)
    with pytest.raises(TransferError) as caught:
        fetch(d, server, artifact, partial)
    assert (caught.value.reason, caught.value.permanent) == ("too_large", True)
    assert not partial.exists()
    assert list(partial.parent.iterdir()) == []
    # Cut off at the first byte too many, not after a megabyte of junk.
    assert d.bytes_received <= len(artifact.blob) + 1
    assert len(server.requests[BLOB]) == 1


@pytest.mark.parametrize(("size_delta", "reason"), [(-1, "too_large"), (+1, "hash_mismatch")])
def test_a_server_file_of_another_size_is_refused(server, session, artifact, partial, size_delta, reason):
    blob = artifact.manifest["blob"]
    with pytest.raises(TransferError) as caught:
        downloader(session).fetch_blob(
            server.url(BLOB), partial=partial, size=blob["size"] + size_delta, sha256=blob["sha256"]
        )
    assert (caught.value.reason, caught.value.permanent) == (reason, True)
    assert not partial.exists()


def test_a_wrong_sha256_is_a_hash_mismatch_and_the_partial_is_deleted(server, session, artifact, partial):
    with pytest.raises(TransferError) as caught:
        downloader(session).fetch_blob(
            server.url(BLOB), partial=partial, size=len(artifact.blob), sha256="0" * 64
        )
    assert (caught.value.reason, caught.value.permanent) == ("hash_mismatch", True)
    assert not partial.exists()


def test_a_404_is_permanent_and_not_retried(server, session, artifact, partial):
    with pytest.raises(TransferError) as caught:
        downloader(session).fetch_blob(
            server.url("/gone"), partial=partial, size=len(artifact.blob), sha256="0" * 64
        )
    assert (caught.value.reason, caught.value.permanent) == ("download_failed", True)
    assert len(server.requests["/gone"]) == 1


def test_a_401_is_permanent_and_not_retried(server, session, artifact, partial):
    server.require_token("device-secret")
    with pytest.raises(TransferError) as caught:
        fetch(downloader(session), server, artifact, partial)
    assert (caught.value.reason, caught.value.permanent) == ("download_failed", True)
    assert len(server.requests[BLOB]) == 1


def test_two_500s_then_success_downloads_the_blob(server, session, artifact, partial):
    server.fail(BLOB, 500, times=2)
    fetch(downloader(session), server, artifact, partial)
    assert partial.read_bytes() == artifact.blob
    assert len(server.requests[BLOB]) == 3


def test_transient_errors_give_up_after_the_last_attempt_without_being_permanent(
    server, session, artifact, partial
):
    server.fail(BLOB, 503, times=10)
    with pytest.raises(TransferError) as caught:
        fetch(downloader(session, attempts=3), server, artifact, partial)
    assert (caught.value.reason, caught.value.permanent) == ("download_failed", False)
    assert len(server.requests[BLOB]) == 3


def test_a_server_that_is_not_there_is_a_transient_failure(session, artifact, partial):
    with ArtifactServer() as gone:
        url = gone.url(BLOB)
    with pytest.raises(TransferError) as caught:
        downloader(session, attempts=2).fetch_blob(url, partial=partial, size=10, sha256="0" * 64)
    assert (caught.value.reason, caught.value.permanent) == ("download_failed", False)


# --- small documents


def test_fetch_bytes_returns_the_document(server, session, artifact):
    d = downloader(session)
    assert d.fetch_bytes(server.url(MANIFEST), max_bytes=64 * 1024) == artifact.manifest_envelope


def test_fetch_bytes_refuses_an_announced_length_over_the_cap_without_reading_it(server, session, artifact):
    d = downloader(session)
    with pytest.raises(TransferError) as caught:
        d.fetch_bytes(server.url(MANIFEST), max_bytes=100)
    assert (caught.value.reason, caught.value.permanent) == ("too_large", True)
    assert d.bytes_received == 0
    assert len(server.requests[MANIFEST]) == 1


def test_fetch_bytes_cuts_off_an_unannounced_body_at_the_cap(server, session):
    server.add("/golden", b"g" * 1000)
    server.send_extra("/golden", 1 << 20, declare_length=False)
    d = downloader(session)
    with pytest.raises(TransferError) as caught:
        d.fetch_bytes(server.url("/golden"), max_bytes=2000)
    assert caught.value.reason == "too_large"
    assert d.bytes_received == 2001


def test_fetch_bytes_retries_429_and_a_dropped_connection(server, session, artifact):
    server.fail(MANIFEST, 429)
    server.cut_after(MANIFEST, 10)
    assert downloader(session).fetch_bytes(server.url(MANIFEST), max_bytes=64 * 1024) == (
        artifact.manifest_envelope
    )
    assert len(server.requests[MANIFEST]) == 3


# --- stopping


def run_in_thread(target) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = target()
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_stop_aborts_a_retry_wait_promptly(server, session):
    server.fail(MANIFEST, 503, times=-1)
    stop = threading.Event()
    d = downloader(session, stop=stop, backoff_initial_s=30.0, backoff_max_s=30.0, attempts=10)
    thread, outcome = run_in_thread(lambda: d.fetch_bytes(server.url(MANIFEST), max_bytes=1024))
    server.wait_for(lambda s: len(s.requests[MANIFEST]) >= 1)
    stopped_at = time.monotonic()
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert time.monotonic() - stopped_at < 1.0
    error = outcome["error"]
    assert isinstance(error, TransferError)
    assert (error.reason, error.permanent, error.args[0]) == ("download_failed", False, "stopped")


def test_a_download_stopped_midway_is_finished_by_the_next_process(server, session, partial):
    data = os.urandom(2 << 20)
    sha256 = hashlib.sha256(data).hexdigest()
    server.add("/big", data)
    server.throttle("/big", 2 << 20)  # about a second for the whole file
    stop = threading.Event()
    first = downloader(session, stop=stop)
    thread, outcome = run_in_thread(
        lambda: first.fetch_blob(server.url("/big"), partial=partial, size=len(data), sha256=sha256)
    )
    server.wait_for(lambda s: s.bytes_sent["/big"] >= 256 * 1024)
    stop.set()
    thread.join(timeout=5)
    assert outcome["error"].args[0] == "stopped"
    kept = partial.stat().st_size
    assert 0 < kept < len(data)
    assert partial.read_bytes() == data[:kept]

    server.throttle("/big", None)
    with urllib3.PoolManager() as fresh_session:  # a new process: nothing shared but the disk
        downloader(fresh_session).fetch_blob(
            server.url("/big"), partial=partial, size=len(data), sha256=sha256
        )
    assert partial.read_bytes() == data
    assert server.requests["/big"][-1]["Range"] == f"bytes={kept}-"
    assert server.bytes_sent["/big"] <= len(data) + 256 * 1024


# --- decompression


@pytest.fixture
def blob_file(tmp_path, artifact) -> Path:
    path = tmp_path / "blob.zst"
    path.write_bytes(artifact.blob)
    return path


def test_decompress_blob_restores_the_model(blob_file, tmp_path, artifact, digits):
    out = tmp_path / "model.tflite"
    raw = artifact.manifest["raw"]
    decompress_blob(blob_file, out, raw_size=raw["size"], raw_sha256=raw["sha256"], chunk_bytes=4096)
    assert out.read_bytes() == digits.build_digits_models()["float32"]
    runtime.smoke_run(runtime.load(out))


def test_decompress_blob_refuses_output_past_raw_size(blob_file, tmp_path, artifact):
    out = tmp_path / "model.tflite"
    raw = artifact.manifest["raw"]
    with pytest.raises(TransferError) as caught:
        decompress_blob(blob_file, out, raw_size=raw["size"] - 1, raw_sha256=raw["sha256"])
    assert (caught.value.reason, caught.value.permanent) == ("too_large", True)
    assert not out.exists()


def test_decompress_blob_refuses_short_output(blob_file, tmp_path, artifact):
    out = tmp_path / "model.tflite"
    raw = artifact.manifest["raw"]
    with pytest.raises(TransferError) as caught:
        decompress_blob(blob_file, out, raw_size=raw["size"] + 1, raw_sha256=raw["sha256"])
    assert caught.value.reason == "hash_mismatch"
    assert not out.exists()


def test_decompress_blob_refuses_a_wrong_raw_sha256(blob_file, tmp_path, artifact):
    out = tmp_path / "model.tflite"
    with pytest.raises(TransferError) as caught:
        decompress_blob(blob_file, out, raw_size=artifact.manifest["raw"]["size"], raw_sha256="0" * 64)
    assert (caught.value.reason, caught.value.permanent) == ("hash_mismatch", True)
    assert not out.exists()


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "not zstd"])
def test_decompress_blob_refuses_a_corrupt_blob(tmp_path, artifact, damage):
    data = bytearray(artifact.blob)
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncated":
        del data[len(data) // 2 :]
    else:
        data = bytearray(b"PK\x03\x04 certainly not a zstd frame")
    blob = tmp_path / "blob.zst"
    blob.write_bytes(data)
    out = tmp_path / "model.tflite"
    raw = artifact.manifest["raw"]
    with pytest.raises(TransferError) as caught:
        decompress_blob(blob, out, raw_size=raw["size"], raw_sha256=raw["sha256"])
    assert (caught.value.reason, caught.value.permanent) == ("hash_mismatch", True)
    assert not out.exists()


# --- limits on what a device unpacks (issue 9, section 3)


def _zstd_frame(data: bytes, *, window_log: int) -> bytes:
    """A frame that declares a ``window_log`` window: streamed without a content size, so
    zstd cannot shrink the window to the data."""
    params = zstandard.ZstdCompressionParameters(
        window_log=window_log, write_content_size=0, write_checksum=1
    )
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
    return compressor.compress(data) + compressor.flush()


def test_decompress_blob_refuses_a_frame_that_asks_for_a_window_over_the_limit(tmp_path, artifact):
    raw = artifact.manifest["raw"]
    tflite = zstandard.ZstdDecompressor().decompress(artifact.blob)
    huge, fitting = tmp_path / "huge.zst", tmp_path / "fitting.zst"
    huge.write_bytes(_zstd_frame(tflite, window_log=27))  # 128 MiB
    fitting.write_bytes(_zstd_frame(tflite, window_log=ZSTD_MAX_WINDOW_BYTES.bit_length() - 1))
    assert zstandard.get_frame_parameters(huge.read_bytes()).window_size == 2**27
    out = tmp_path / "model.tflite"

    decompress_blob(fitting, out, raw_size=raw["size"], raw_sha256=raw["sha256"])  # positive control
    assert out.read_bytes() == tflite

    with pytest.raises(TransferError) as caught:
        decompress_blob(huge, out, raw_size=raw["size"], raw_sha256=raw["sha256"])
    assert (caught.value.reason, caught.value.permanent) == ("too_large", True)
    assert "window" in str(caught.value)
    assert not out.exists()


def _npz(path: Path, compressed: bool = True, **arrays) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def test_read_golden_set_loads_the_real_golden_set(tmp_path, digits):
    path = tmp_path / "golden.npz"
    path.write_bytes(digits.golden_set_npz())
    x, y = read_golden_set(path)
    assert (x.shape, y.shape) == ((200, 64), (200,))


@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        ({"x": np.zeros((GOLDEN_MAX_SAMPLES + 1, 4), np.float32), "y": np.zeros(4, np.int64)}, "samples"),
        ({"x": np.zeros((4096, 4096), np.float32), "y": np.zeros(4096, np.int64)}, "bytes unpacked"),
    ],
    ids=["too-many-samples", "zip-bomb"],
)
def test_read_golden_set_refuses_arrays_over_the_limits_before_loading_them(tmp_path, arrays, words):
    path = _npz(tmp_path / "golden.npz", **arrays)
    assert path.stat().st_size < 1024 * 1024  # small on disk: only the headers give it away
    with pytest.raises(runtime.GoldenSetError, match=words):
        read_golden_set(path)


def test_read_golden_set_refuses_pickles(tmp_path):
    path = _npz(
        tmp_path / "golden.npz", compressed=False, x=np.array([{"a": 1}] * 3, dtype=object), y=np.arange(3)
    )
    with pytest.raises(runtime.GoldenSetError, match="Python objects"):
        read_golden_set(path)
