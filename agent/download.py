"""Downloading and unpacking artifacts (ARCHITECTURE.md, "The agent on a device").

The agent fetches small signed documents (manifest envelope, golden set) whole, and model
blobs resumably with ``Range``/``If-Range`` into a partial file that survives restarts.
Nothing a server sends is trusted before it is verified: every body is capped at the size
the caller expects (a lying or hostile server is cut off at the first byte too many, not
after it has filled the disk), and every blob is checked against the sha256 the signed
manifest names. Decompression is capped the same way, so a zstd bomb cannot fill the disk
either.

Failures raise :class:`TransferError` with the reason code the agent publishes
(``download_failed``, ``tls_failed``, ``too_large``, ``hash_mismatch``; see
``Reason`` in ``agent/protocol/codes.py``) and whether retrying could help.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import queue
import random
import re
import ssl
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import numpy as np
import urllib3
import zstandard

from agent import runtime
from agent.protocol.codes import Reason

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
# The largest zstd window a device decodes: the decoder allocates the window, so a frame
# header asking for 2 GiB must not make it try. The registry caps its encoder at the same
# size (services.compress_file), so every blob it signs decodes here.
ZSTD_MAX_WINDOW_BYTES = 1 << 25
# Golden sets (an .npz of x and y) as devices accept them; the registry's defaults are the same
# (GOLDEN_SET_MAX_BYTES, GOLDEN_SET_MAX_SAMPLES, GOLDEN_SET_MAX_ARRAY_BYTES).
GOLDEN_MAX_FILE_BYTES = 16 * 1024 * 1024
GOLDEN_MAX_SAMPLES = 10_000
GOLDEN_MAX_ARRAY_BYTES = 64 * 1024 * 1024
_NPY_HEADER_MAX_BYTES = 10_000
# Statuses that say "try again later" rather than "this will never work".
TRANSIENT_STATUSES = frozenset({408, 429})
# Compression would make byte ranges and size caps refer to different bytes than the
# manifest does; blobs are already zstd, and the documents are small.
IDENTITY = {"Accept-Encoding": "identity"}
_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")

T = TypeVar("T")


class TransferError(Exception):
    """A download or unpack failed; ``reason`` is the reason code the agent publishes.

    ``permanent`` failures (the server's file is not the one the manifest describes, the
    artifact is gone, access is refused) are not retried by the caller; the others (network
    trouble, a stopping agent) may succeed on a later attempt.
    """

    def __init__(self, reason: Reason, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.permanent = permanent


class _Transient(Exception):
    """Worth another attempt after a backoff (connection trouble, 5xx, 429, short body)."""


class _Restart(Exception):
    """The partial file is useless (416, a range we did not ask for): start again from 0."""


def _transient_or_permanent(response: urllib3.BaseHTTPResponse, url: str) -> NoReturn:
    """Raise for any status the caller did not handle itself."""
    status = response.status
    if status >= 500 or status in TRANSIENT_STATUSES:
        raise _Transient(f"HTTP {status} from {url}")
    raise TransferError(Reason.DOWNLOAD_FAILED, f"HTTP {status} from {url}", permanent=True)


def _certificate_refused(exc: BaseException) -> bool:
    """Whether the TLS handshake failed on the server's certificate (urllib3 wraps the
    ssl module's error), rather than on the network."""
    return any(isinstance(cause, ssl.SSLCertVerificationError) for cause in (*exc.args, exc.__context__))


def _declared_length(response: urllib3.BaseHTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


def _delete(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class Downloader:
    """Fetches documents and blobs with retries, size caps and resume.

    One instance is meant for one thread at a time (``bytes_received`` is a plain counter).
    """

    def __init__(
        self,
        *,
        http: urllib3.PoolManager,
        timeout_s: float = 30.0,
        attempts: int = 5,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        stop: threading.Event | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.http = http
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stop = stop or threading.Event()
        self.bytes_received = 0
        self.resumes = 0  # blob downloads continued from a partial file (HTTP 206)

    # --- retry loop

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise TransferError(Reason.DOWNLOAD_FAILED, "stopped", permanent=False)

    def _backoff_s(self, failures: int) -> float:
        # Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff
        # and Jitter"): a fleet that lost the server at once does not come back at once.
        return random.uniform(0, min(self.backoff_max_s, self.backoff_initial_s * 2 ** (failures - 1)))

    def _with_retries(
        self, url: str, attempt: Callable[[], T], *, on_restart: Callable[[], None] | None = None
    ) -> T:
        last_error = ""
        for number in range(1, self.attempts + 1):
            self._check_stop()
            try:
                return attempt()
            except _Restart as exc:
                # Not the server's fault and not worth a wait: the next attempt starts from 0.
                log.info("download %s: %s; starting again from the first byte", url, exc)
                if on_restart is not None:
                    on_restart()
                last_error = str(exc)
                continue
            except _Transient as exc:
                last_error = str(exc)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if _certificate_refused(exc):
                    # Another CA, another host name, expired: no attempt in the next seconds
                    # changes that, so say so now. Not permanent: the desired state is tried
                    # again later, as for download_failed, in case the server is fixed.
                    raise TransferError(
                        Reason.TLS_FAILED,
                        f"{url}: the server's TLS certificate was refused: {exc}",
                        permanent=False,
                    ) from exc
                last_error = f"{type(exc).__name__}: {exc}"
            if number == self.attempts:
                break
            delay_s = self._backoff_s(number)
            log.info(
                "download %s: attempt %d/%d failed (%s); retrying in %.2fs",
                url,
                number,
                self.attempts,
                last_error,
                delay_s,
            )
            # Waiting on the stop event rather than sleeping lets a stopping agent leave now.
            if self.stop.wait(delay_s):
                self._check_stop()
        raise TransferError(
            Reason.DOWNLOAD_FAILED,
            f"{url}: gave up after {self.attempts} attempts: {last_error}",
            permanent=False,
        )

    @contextlib.contextmanager
    def _get(self, url: str, headers: dict[str, str]) -> Iterator[urllib3.BaseHTTPResponse]:
        """A streamed GET. urllib3 rather than requests: the agent's memory budget on a
        device is tight, and requests adds ~4 MB of imports for nothing we need here."""
        response = self.http.request(
            "GET",
            url,
            # Headers given here replace the pool's (the device token), so merge them.
            headers={**self.http.headers, **IDENTITY, **headers},
            preload_content=False,
            decode_content=False,
            timeout=urllib3.Timeout(connect=self.timeout_s, read=self.timeout_s),
            retries=False,
        )
        try:
            yield response
        finally:
            # Closing (rather than returning the connection to the pool) guarantees that a
            # body we stopped reading never leaks into the next request on that connection.
            response.close()
            response.release_conn()

    def _body(self, response: urllib3.BaseHTTPResponse, limit: int) -> Iterator[bytes]:
        """Yield the body, reading at most ``limit + 1`` bytes: one byte past the limit is
        enough to know the server sends too much, and nothing more is read off the wire.

        ``read1`` returns whatever has arrived instead of waiting for a full chunk, so the
        bytes before a dropped connection reach the caller (``read`` would discard them
        with the error) and a stop request is seen between two packets on a slow link.
        """
        remaining = limit + 1
        while remaining > 0:
            self._check_stop()
            chunk = response.read1(min(CHUNK_BYTES, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            self.bytes_received += len(chunk)
            yield chunk

    # --- small documents

    def fetch_bytes(self, url: str, *, max_bytes: int) -> bytes:
        """GET a small document whole; more than ``max_bytes`` is refused as ``too_large``."""
        return self._with_retries(url, lambda: self._fetch_bytes_once(url, max_bytes))

    def _fetch_bytes_once(self, url: str, max_bytes: int) -> bytes:
        with self._get(url, {}) as response:
            if response.status != 200:
                _transient_or_permanent(response, url)
            declared = _declared_length(response)
            if declared is not None and declared > max_bytes:
                raise TransferError(
                    Reason.TOO_LARGE,
                    f"{url} is {declared} bytes, more than the {max_bytes} allowed",
                    permanent=True,
                )
            body = bytearray()
            for chunk in self._body(response, max_bytes):
                body += chunk
                if len(body) > max_bytes:
                    raise TransferError(
                        Reason.TOO_LARGE,
                        f"{url} sent more than the {max_bytes} bytes allowed",
                        permanent=True,
                    )
        if declared is not None and len(body) < declared:
            raise _Transient(f"{url}: connection closed after {len(body)} of {declared} bytes")
        return bytes(body)

    # --- blobs

    def fetch_blob(
        self, url: str, *, partial: Path, size: int, sha256: str, sink: BlobSink | None = None
    ) -> Path:
        """Download a blob of ``size`` bytes and sha256 ``sha256`` into ``partial``; return it.

        ``partial`` may hold the beginning of the blob from an earlier attempt or an earlier
        process; it is resumed with ``Range`` + ``If-Range`` (the blob's ETag is its quoted
        sha256, as the control plane serves it). The blob is hashed as it arrives, and every
        byte of it, in order, also goes to ``sink`` (which may unpack it meanwhile), so the
        file is never read back.
        """
        partial.parent.mkdir(parents=True, exist_ok=True)
        stream = _BlobStream(sink)
        stream.replay(partial)
        left_over = stream.length > 0
        self._download(url, partial, size, sha256, stream)
        matches = stream.length == size and stream.hexdigest() == sha256
        if not matches and left_over:
            # Bytes an earlier process wrote are the only ones this call cannot vouch for
            # (a power cut may have left garbage in them). Give the blob one clean try
            # before calling it a mismatch, which the caller would publish as a refusal.
            log.warning("download %s: the resumed file does not match; downloading it again", url)
            _delete(partial)
            stream.reset()
            self._download(url, partial, size, sha256, stream)
            matches = stream.length == size and stream.hexdigest() == sha256
        if not matches:
            _delete(partial)
            raise TransferError(
                Reason.HASH_MISMATCH, f"{url}: the downloaded blob's sha256 is not {sha256}", permanent=True
            )
        return partial

    def _download(self, url: str, partial: Path, size: int, sha256: str, stream: _BlobStream) -> None:
        def restart() -> None:
            _delete(partial)
            stream.reset()

        self._with_retries(
            url, lambda: self._fetch_blob_once(url, partial, size, sha256, stream), on_restart=restart
        )

    def _fetch_blob_once(self, url: str, partial: Path, size: int, sha256: str, stream: _BlobStream) -> None:
        have = partial.stat().st_size if partial.exists() else 0
        if have > size or have != stream.length:
            # Not a prefix of the blob we want (or not what we hashed): whatever it is, it goes.
            _delete(partial)
            stream.reset()
            have = 0
        if have == size:
            return  # complete already; the caller verifies it
        headers = {"Range": f"bytes={have}-", "If-Range": f'"{sha256}"'} if have else {}
        with self._get(url, headers) as response:
            if response.status == 206:
                offset = self._check_content_range(
                    response, url, expected_start=have, size=size, partial=partial
                )
                self.resumes += 1
            elif response.status == 200:
                # The server ignored the range or its validator no longer matched: a full body.
                self._check_total_size(_declared_length(response), url, size=size, partial=partial)
                offset = 0
            elif response.status == 416 and have:
                raise _Restart(f"HTTP 416 for bytes {have}- of {url}")
            else:
                _transient_or_permanent(response, url)
            if offset == 0 and stream.length:
                stream.reset()
            self._write_body(response, url, partial, offset=offset, size=size, stream=stream)

    def _check_total_size(self, total: int | None, url: str, *, size: int, partial: Path) -> None:
        """A server that names another length serves another file than the manifest's."""
        if total is None or total == size:
            return
        _delete(partial)
        if total > size:
            raise TransferError(
                Reason.TOO_LARGE, f"{url} is {total} bytes; the manifest says {size}", permanent=True
            )
        raise TransferError(
            Reason.HASH_MISMATCH, f"{url} is {total} bytes; the manifest says {size}", permanent=True
        )

    def _check_content_range(
        self, response: urllib3.BaseHTTPResponse, url: str, *, expected_start: int, size: int, partial: Path
    ) -> int:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
        if match is None:
            raise _Restart(f"206 from {url} without a usable Content-Range")
        start, end, total = match.groups()
        self._check_total_size(None if total == "*" else int(total), url, size=size, partial=partial)
        if int(start) != expected_start or int(end) < int(start):
            raise _Restart(f"206 from {url} is for bytes {start}-{end}, we asked from {expected_start}")
        return expected_start

    def _write_body(
        self,
        response: urllib3.BaseHTTPResponse,
        url: str,
        partial: Path,
        *,
        offset: int,
        size: int,
        stream: _BlobStream,
    ) -> None:
        allowed = size - offset
        declared = _declared_length(response)
        if declared is not None and declared > allowed:
            _delete(partial)
            raise TransferError(
                Reason.TOO_LARGE,
                f"{url} announces {declared} bytes from byte {offset}; the blob is {size} bytes",
                permanent=True,
            )
        written = 0
        # "r+b" keeps the bytes we have; "wb" starts over. Either way everything received
        # is on disk when a connection drops, so the next attempt resumes from there.
        mode = "r+b" if offset and partial.exists() else "wb"
        with open(partial, mode) as handle:
            handle.seek(offset)
            handle.truncate()
            try:
                for chunk in self._body(response, allowed):
                    if written + len(chunk) > allowed:
                        raise TransferError(
                            Reason.TOO_LARGE,
                            f"{url} sent more than the {size} bytes of the blob",
                            permanent=True,
                        )
                    handle.write(chunk)
                    stream.update(chunk)
                    written += len(chunk)
            except TransferError as exc:
                if exc.permanent:
                    handle.close()
                    _delete(partial)
                raise
            finally:
                # What we keep for a resume should survive a power cut as it is. A complete
                # blob is consumed at once, so only an unfinished one is worth the fsync
                # (a resumed file that fails its hash is downloaded again anyway).
                if not handle.closed and offset + written < size:
                    handle.flush()
                    os.fsync(handle.fileno())
        if offset + written < size:
            raise _Transient(f"{url}: got {offset + written} of {size} bytes")


class BlobSink(Protocol):
    """Receives a blob's bytes in order as they arrive (see :class:`StreamingUnpacker`)."""

    def feed(self, chunk: bytes) -> None: ...

    def reset(self) -> None: ...


class _BlobStream:
    """The bytes of the partial file so far: their sha256, their count, and a sink."""

    def __init__(self, sink: BlobSink | None) -> None:
        self.sink = sink
        self.reset(notify=False)

    def reset(self, *, notify: bool = True) -> None:
        self.digest = hashlib.sha256()
        self.length = 0
        if notify and self.sink is not None:
            self.sink.reset()

    def update(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.length += len(chunk)
        if self.sink is not None:
            self.sink.feed(chunk)

    def replay(self, partial: Path) -> None:
        """Take in what an earlier attempt or process left in ``partial``."""
        if not partial.exists():
            return
        with open(partial, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                self.update(chunk)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


_EOF = object()


class StreamingUnpacker:
    """Decompresses a blob on a second thread while it downloads (both cores busy, one
    pass over the bytes), with the same caps and checks as :func:`decompress_blob`.

    If the download had to start over, the unpacker gives up (``finish`` returns False)
    and the caller unpacks the finished file with :func:`decompress_blob` instead.
    """

    def __init__(self, out: Path, *, raw_size: int, raw_sha256: str, queue_chunks: int = 64) -> None:
        self.out, self.raw_size, self.raw_sha256 = out, raw_size, raw_sha256
        self._queue: queue.Queue = queue.Queue(maxsize=queue_chunks)
        self._pending = b""
        self._eof_seen = False
        self.broken = False
        self.error: TransferError | None = None
        self._thread = threading.Thread(target=self._run, name="unpack", daemon=True)
        self._thread.start()

    # producer side
    def feed(self, chunk: bytes) -> None:
        if not self.broken:
            self._queue.put(chunk)

    def reset(self) -> None:
        if not self.broken:
            self.broken = True
            self._queue.put(_EOF)

    def finish(self) -> bool:
        """Wait for the unpacking; True when ``out`` holds the verified model."""
        if not self.broken:
            self._queue.put(_EOF)
        self._thread.join()
        if self.broken:
            _delete(self.out)
            return False
        if self.error is not None:
            raise self.error
        return True

    def close(self) -> None:
        """Stop the thread if the download failed before ``finish``."""
        self.reset()
        self._thread.join()

    # consumer side: a file-like object over the queue, for zstandard's stream_reader
    def read(self, size: int = -1) -> bytes:
        while not self._pending:
            if self._eof_seen:
                return b""
            item = self._queue.get()
            if item is _EOF:
                self._eof_seen = True
                return b""
            self._pending = item
        size = len(self._pending) if size is None or size < 0 else size
        data, self._pending = self._pending[:size], self._pending[size:]
        return data

    def _drain(self) -> None:
        while not self._eof_seen:
            self._eof_seen = self._queue.get() is _EOF

    def _run(self) -> None:
        try:
            _unpack(self, self.out, raw_size=self.raw_size, raw_sha256=self.raw_sha256, name="blob")
        except TransferError as exc:
            self.error = exc
            self._drain()  # keep the producer from blocking on a full queue
        except BaseException as exc:  # report anything else as a corrupt blob, never hang
            self.error = TransferError(Reason.HASH_MISMATCH, f"unpacking failed: {exc}", permanent=True)
            self._drain()


def decompress_blob(
    blob: Path, out: Path, *, raw_size: int, raw_sha256: str, chunk_bytes: int = 1 << 20
) -> None:
    """Stream-decompress the zstd ``blob`` into ``out`` (fsynced), checking size and sha256."""
    with open(blob, "rb") as source:
        _unpack(
            source, out, raw_size=raw_size, raw_sha256=raw_sha256, name=blob.name, chunk_bytes=chunk_bytes
        )


def _unpack(
    source, out: Path, *, raw_size: int, raw_sha256: str, name: str, chunk_bytes: int = 1 << 20
) -> None:
    """Decompress ``source`` (a readable) into ``out`` and verify it.

    Output is capped at ``raw_size`` bytes whatever the frame header claims, so a blob that
    inflates past the manifest's size is refused as ``too_large`` after one chunk too many.
    A corrupt frame (zstd checks the frame checksum), a short output or another sha256 is
    ``hash_mismatch``. ``out`` is removed on any error.
    """
    digest = hashlib.sha256()
    written = 0
    try:
        with (
            zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW_BYTES).stream_reader(
                source, read_across_frames=True, closefd=False
            ) as reader,
            open(out, "wb") as target,
        ):
            while True:
                # Never ask for more than one byte past the cap, so a bomb costs one chunk.
                chunk = reader.read(min(chunk_bytes, raw_size - written + 1))
                if not chunk:
                    break
                written += len(chunk)
                if written > raw_size:
                    raise TransferError(
                        Reason.TOO_LARGE,
                        f"{name} inflates past the manifest's {raw_size} bytes",
                        permanent=True,
                    )
                digest.update(chunk)
                target.write(chunk)
            target.flush()
            os.fsync(target.fileno())
        if written < raw_size:
            raise TransferError(
                Reason.HASH_MISMATCH, f"{name} inflates to {written} bytes, not {raw_size}", permanent=True
            )
        if digest.hexdigest() != raw_sha256:
            raise TransferError(
                Reason.HASH_MISMATCH, f"{name}: the model's sha256 is not {raw_sha256}", permanent=True
            )
    except zstandard.ZstdError as exc:
        _delete(out)
        if "memory" in str(exc):  # the frame asks for a window over ZSTD_MAX_WINDOW_BYTES
            raise TransferError(
                Reason.TOO_LARGE,
                f"{name} needs a zstd window over the {ZSTD_MAX_WINDOW_BYTES >> 20} MiB this agent decodes",
                permanent=True,
            ) from exc
        raise TransferError(
            Reason.HASH_MISMATCH, f"{name} is not a valid zstd frame: {exc}", permanent=True
        ) from exc
    except BaseException:
        _delete(out)
        raise


# numpy parses npy headers with ast.literal_eval, and CPython 3.11's ast constructor is not
# safe to run from several threads at once ("AST constructor recursion depth mismatch",
# seen with twenty agents verifying in one test process, and possible in a threaded web
# server): golden sets are read one at a time. They are small and read once per version.
_NPY_PARSE_LOCK = threading.Lock()


def read_golden_set(
    source: Any,
    *,
    max_samples: int = GOLDEN_MAX_SAMPLES,
    max_bytes: int = GOLDEN_MAX_ARRAY_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """Read an .npz golden set (``x``, ``y``) without pickles and within limits (one thread
    at a time: see _NPY_PARSE_LOCK)."""
    with _NPY_PARSE_LOCK:
        return _read_golden_set(source, max_samples=max_samples, max_bytes=max_bytes)


def _read_golden_set(
    source: Any,
    *,
    max_samples: int,
    max_bytes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Read an .npz golden set (``x``, ``y``) without pickles and within limits.

    The zip may be deflated: a few kilobytes can declare gigabytes. Every member's npy header
    (shape and dtype) is read first and the arrays are loaded only when the samples and the
    bytes they declare fit, and numpy allocates exactly what the header declares. Raises
    :class:`runtime.GoldenSetError`.
    """
    try:
        if hasattr(source, "seek"):
            source.seek(0)
        with zipfile.ZipFile(source) as archive:
            members = archive.infolist()
            if len(members) > 8:
                raise runtime.GoldenSetError(f"golden set has {len(members)} arrays; it needs only x and y")
            declared = 0
            for member in members:
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(handle, max_header_size=_NPY_HEADER_MAX_BYTES)
                if dtype.hasobject:
                    raise runtime.GoldenSetError(f"{member.filename} holds Python objects (pickles)")
                if shape and shape[0] > max_samples:
                    raise runtime.GoldenSetError(
                        f"{member.filename} has {shape[0]} samples, more than the {max_samples} allowed"
                    )
                declared += math.prod(shape) * dtype.itemsize
            if declared > max_bytes:
                raise runtime.GoldenSetError(
                    f"golden set arrays take {declared} bytes unpacked, more than the {max_bytes} allowed"
                )
    except runtime.GoldenSetError:
        raise
    except Exception as exc:  # zipfile and numpy raise many kinds for a bad archive
        raise runtime.GoldenSetError(f"not a readable .npz file: {exc}") from exc
    if hasattr(source, "seek"):
        source.seek(0)
    return runtime.read_golden_set(source)
