"""A real HTTP artifact server for agent tests, with fault injection.

It serves files from memory with the semantics of the control plane's
``ranged_file_response`` (fleet/registry/api.py): ETag ``"<sha256 hex>"``, one ``Range``
(suffix ranges too), ``If-Range``, ``If-None-Match``, 206/416 and ``Content-Length``. On
top of that it can misbehave the ways networks and servers do, so agent code is tested
against real sockets rather than mocks:

- ``cut_after``: announce the full length, then drop the connection mid-body;
- ``send_extra``: a lying server that serves more bytes than the file has;
- ``fail``: answer with an error status;
- ``ignore_range``: answer a range request with the whole file (200), as many servers do;
- ``throttle``: send slowly, so a test can stop or kill a client mid-download;
- ``require_token``: 401 without ``Authorization: Bearer <token>``.

Given an ``ssl.SSLContext`` it serves HTTPS instead, as a control plane behind TLS does.

``make_signed_artifact`` builds a manifest envelope and blob the way the registry does,
with only ``agent.protocol``, zstandard and LiteRT: no ``fleet`` import, so agent tests
run without Django.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import ssl
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK_BYTES = 256 * 1024
# Throttled bodies go out in slices this often, so a throttled client sees steady progress.
THROTTLE_TICK_S = 0.02


@dataclass
class _File:
    data: bytes
    sha256: str

    @property
    def etag(self) -> str:
        return f'"{self.sha256}"'


@dataclass
class _Fault:
    """A misbehaviour for the next ``times`` requests to a path (``-1``: every request)."""

    times: int
    value: int = 0
    declare_length: bool = True


class _Unsatisfiable(Exception):
    pass


def requested_range(headers: Any, size: int, etag: str) -> tuple[int, int] | None:
    """The single range to send, or None for the whole file; same rules as the control plane."""
    header = headers.get("Range", "")
    if not header or headers.get("If-Range", etag) != etag:
        return None
    match = _RANGE.match(header.replace(" ", ""))
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        length = int(last)
        if length == 0 or size == 0:
            raise _Unsatisfiable()
        return max(0, size - length), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if end < start:
        return None
    if start >= size:
        raise _Unsatisfiable()
    return start, min(end, size - 1)


class ArtifactServer:
    """``with ArtifactServer() as server: server.add("/blob", data); get(server.url("/blob"))``."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.files: dict[str, _File] = {}
        self.bytes_sent: defaultdict[str, int] = defaultdict(int)
        self.requests: defaultdict[str, list[dict[str, str]]] = defaultdict(list)
        self.token: str | None = None
        self._cuts: dict[str, _Fault] = {}
        self._extras: dict[str, _Fault] = {}
        self._failures: dict[str, _Fault] = {}
        self._ignored_ranges: dict[str, _Fault] = {}
        self._throttles: dict[str, int] = {}
        # One condition guards all state and wakes tests that wait for progress.
        self._changed = threading.Condition()
        self._closing = threading.Event()
        self._httpd = _QuietServer(("127.0.0.1", 0), _handler_class(self))
        if tls is not None:
            # The handshake runs in accept(); one a client aborts (it does not trust the
            # certificate) raises an OSError there, which socketserver ignores.
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="artifact-server",
            daemon=True,
        )
        self._thread.start()

    # --- lifecycle

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self._closing.set()  # throttled responses stop early instead of holding the test up
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ArtifactServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- content and faults

    def add(self, path: str, data: bytes) -> None:
        with self._changed:
            self.files[path] = _File(data, hashlib.sha256(data).hexdigest())

    def cut_after(self, path: str, n_bytes: int, times: int = 1) -> None:
        """Announce the full Content-Length, then close the connection after ``n_bytes``."""
        with self._changed:
            self._cuts[path] = _Fault(times, n_bytes)

    def send_extra(self, path: str, n_bytes: int, *, declare_length: bool = True, times: int = -1) -> None:
        """Serve ``n_bytes`` more than the file has (a lying server). With ``declare_length``
        the Content-Length announces them; without, the body ends when the connection closes,
        so only a client that counts what it reads notices. ``times=-1`` means every request."""
        with self._changed:
            self._extras[path] = _Fault(times, n_bytes, declare_length)

    def fail(self, path: str, status: int, times: int = 1) -> None:
        """Answer with ``status`` (and a JSON error body) before anything else is checked."""
        with self._changed:
            self._failures[path] = _Fault(times, status)

    def ignore_range(self, path: str, times: int = 1) -> None:
        """Answer the next range request(s) with the whole file and 200."""
        with self._changed:
            self._ignored_ranges[path] = _Fault(times)

    def throttle(self, path: str, bytes_per_s: int | None) -> None:
        """Send the body of ``path`` at about ``bytes_per_s``; ``None`` lifts the limit."""
        with self._changed:
            if bytes_per_s:
                self._throttles[path] = bytes_per_s
            else:
                self._throttles.pop(path, None)

    def require_token(self, token: str | None) -> None:
        with self._changed:
            self.token = token

    # --- waiting (tests wait on conditions, never on sleeps)

    def wait_for(self, predicate: Callable[[ArtifactServer], bool], timeout: float = 10.0) -> None:
        """Block until ``predicate(server)`` holds; fail loudly after ``timeout`` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self), timeout):
                raise AssertionError(f"artifact server: condition not met within {timeout}s")

    # --- used by the handler

    def _take(self, faults: dict[str, _Fault], path: str) -> _Fault | None:
        """The fault for ``path`` if one is armed, counting this use."""
        with self._changed:
            fault = faults.get(path)
            if fault is None:
                return None
            if fault.times > 0:
                fault.times -= 1
                if fault.times == 0:
                    del faults[path]
            return fault

    def _record_request(self, path: str, headers: dict[str, str]) -> None:
        with self._changed:
            self.requests[path].append(headers)
            self._changed.notify_all()

    def _record_sent(self, path: str, n_bytes: int) -> None:
        with self._changed:
            self.bytes_sent[path] += n_bytes
            self._changed.notify_all()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up (a cut-off lying server, a stopped download) are what these
        # tests are about, not errors; anything else still gets its traceback.
        if not isinstance(sys.exception(), ConnectionError):
            super().handle_error(request, client_address)


def _handler_class(server: ArtifactServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_ArtifactHandler):
        artifacts = server

    return Handler


class _ArtifactHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 so that clients keep connections alive, like against a real server.
    protocol_version = "HTTP/1.1"
    artifacts: ArtifactServer

    def setup(self) -> None:
        super().setup()
        # Headers and body are separate writes: without NODELAY, Nagle and the client's
        # delayed ACK add 40 ms to every small response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read counters, not access logs

    def do_GET(self) -> None:
        server = self.artifacts
        path = self.path.split("?", 1)[0]
        server._record_request(path, dict(self.headers.items()))
        failure = server._take(server._failures, path)
        if failure is not None:
            self._send_error(failure.value, "injected", "An injected failure.")
            return
        if server.token is not None and self.headers.get("Authorization") != f"Bearer {server.token}":
            self._send_error(401, "not_authenticated", "A valid bearer token is required.")
            return
        file = server.files.get(path)
        if file is None:
            self._send_error(404, "not_found", f"No file at {path}.")
            return
        self._send_file(path, file)

    def _send_error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": {"code": code, "message": message, "field": None}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(body)

    def _send_file(self, path: str, file: _File) -> None:
        server = self.artifacts
        size = len(file.data)
        if self.headers.get("If-None-Match") == file.etag:
            self.send_response(304)
            self.send_header("ETag", file.etag)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        try:
            byte_range = requested_range(self.headers, size, file.etag)
        except _Unsatisfiable:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if byte_range is not None and server._take(server._ignored_ranges, path) is not None:
            byte_range = None
        start, end = byte_range if byte_range else (0, size - 1)
        body = file.data[start : end + 1]
        declared = len(body)
        extra = server._take(server._extras, path)
        if extra is not None:
            body += b"\x00" * extra.value
            if extra.declare_length:
                declared = len(body)
        cut = server._take(server._cuts, path)

        self.send_response(206 if byte_range else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", file.etag)
        if byte_range:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if extra is not None and not extra.declare_length:
            # No length: the body ends when the connection does (RFC 9112, 6.3).
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(declared))
        self.end_headers()
        if cut is not None:
            body = body[: cut.value]
            self.close_connection = True
        self._write_body(path, body)

    def _write_body(self, path: str, body: bytes) -> None:
        server = self.artifacts
        rate = server._throttles.get(path)
        piece = max(1, int(rate * THROTTLE_TICK_S)) if rate else CHUNK_BYTES
        for offset in range(0, len(body), piece):
            if server._closing.is_set():
                self.close_connection = True
                return
            chunk = body[offset : offset + piece]
            try:
                self.wfile.write(chunk)
                self.wfile.flush()
            except OSError:  # the client hung up; what it did not take was not sent
                self.close_connection = True
                return
            server._record_sent(path, len(chunk))
            if rate:
                server._closing.wait(THROTTLE_TICK_S)


@dataclass(frozen=True)
class SignedArtifact:
    manifest_envelope: bytes
    manifest: dict[str, Any]
    manifest_sha256: str  # of the payload bytes (docs/protocol.md, addition 1)
    blob: bytes
    golden: bytes | None


def tflite_signature(tflite: bytes, *, variant: str) -> dict[str, Any]:
    """Inputs and outputs as LiteRT reads them; the registry's own inspector lives in
    ``fleet``, which agent tests do not import."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite)

    def tensors(details: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {"name": d["name"], "shape": [int(n) for n in d["shape"]], "dtype": np.dtype(d["dtype"]).name}
            for d in details
        ]

    return {
        "inputs": tensors(interpreter.get_input_details()),
        "outputs": tensors(interpreter.get_output_details()),
        "ops": [],
        "quantization": "int8" if "int8" in variant else "none",
    }


def make_signed_artifact(
    *,
    private_key: Ed25519PrivateKey,
    model: str,
    version: str,
    variant: str,
    tflite: bytes,
    labels: list[str],
    golden_npz: bytes | None = None,
    golden_accuracy: float | None = None,
    zstd_level: int = 3,
) -> SignedArtifact:
    """A manifest envelope and blob as the registry would publish them for ``tflite``."""
    compressor = zstandard.ZstdCompressor(level=zstd_level, write_checksum=True, write_content_size=True)
    blob = compressor.compress(tflite)
    golden = None
    if golden_npz is not None:
        with np.load(io.BytesIO(golden_npz), allow_pickle=False) as arrays:
            samples = len(arrays["y"])
        golden = {
            "sha256": hashlib.sha256(golden_npz).hexdigest(),
            "size": len(golden_npz),
            "samples": samples,
            "accuracy": golden_accuracy,
        }
    manifest = protocol.build_manifest(
        model=model,
        version=version,
        variant=variant,
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        raw_sha256=hashlib.sha256(tflite).hexdigest(),
        raw_size=len(tflite),
        blob_sha256=hashlib.sha256(blob).hexdigest(),
        blob_size=len(blob),
        tflite=tflite_signature(tflite, variant=variant),
        labels=labels,
        golden=golden,
    )
    payload = protocol.canonical_json(manifest)
    envelope = protocol.sign(payload, payload_type=protocol.MANIFEST_PAYLOAD_TYPE, private_key=private_key)
    return SignedArtifact(
        manifest_envelope=protocol.envelope_bytes(envelope),
        manifest=manifest,
        manifest_sha256=hashlib.sha256(payload).hexdigest(),
        blob=blob,
        golden=golden_npz,
    )


@dataclass
class SignedDelta:
    manifest_envelope: bytes
    manifest: dict[str, Any]
    manifest_sha256: str
    blob: bytes


def make_signed_delta(
    *,
    private_key: Ed25519PrivateKey,
    base: SignedArtifact,
    target: SignedArtifact,
    delta: bytes | None = None,
    manifest_overrides: dict[str, Any] | None = None,
) -> SignedDelta:
    """A delta from ``base`` to ``target`` and its signed manifest, as the registry makes
    them (docs/protocol.md, addition 11). ``delta`` replaces the honest delta bytes and
    ``manifest_overrides`` top-level manifest fields, for tests that lie."""
    from agent.protocol.delta import make_delta

    decompressor = zstandard.ZstdDecompressor()
    base_raw, target_raw = decompressor.decompress(base.blob), decompressor.decompress(target.blob)
    blob = make_delta(base_raw, target_raw) if delta is None else delta
    manifest = protocol.build_delta_manifest(
        model=target.manifest["model"],
        version=target.manifest["version"],
        variant=target.manifest["variant"],
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        base_version=base.manifest["version"],
        base_variant=base.manifest["variant"],
        base_raw={"sha256": base.manifest["raw"]["sha256"], "size": base.manifest["raw"]["size"]},
        target_raw={"sha256": target.manifest["raw"]["sha256"], "size": target.manifest["raw"]["size"]},
        delta_sha256=hashlib.sha256(blob).hexdigest(),
        delta_size=len(blob),
    )
    manifest.update(manifest_overrides or {})
    payload = protocol.canonical_json(manifest)
    envelope = protocol.sign(payload, payload_type=protocol.DELTA_PAYLOAD_TYPE, private_key=private_key)
    return SignedDelta(
        manifest_envelope=protocol.envelope_bytes(envelope),
        manifest=manifest,
        manifest_sha256=hashlib.sha256(payload).hexdigest(),
        blob=blob,
    )
