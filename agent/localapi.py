"""The local HTTP API that apps on the device call (docs/agent.md, "Local API").

``POST /v1/models/{name}:predict``  ``{"inputs": [tensor, …]}`` → outputs, label, version…
``POST /v1/feedback``               ``{"prediction_id", "label"}`` → counted in telemetry
``GET  /v1/health``
``GET  /metrics``                   Prometheus text format (agent/metrics.py)

Bad requests get a 4xx JSON error and never take the server down. Listens on a TCP port
on localhost or on a unix socket.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import socketserver
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.metrics import CONTENT_TYPE
from agent.serving import BadInput, UnknownModel

if TYPE_CHECKING:
    from agent.core import Agent

log = logging.getLogger(__name__)
PREDICT = re.compile(r"^/v1/models/([a-z0-9][a-z0-9_.-]*):predict$")


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            # Headers and body go out as separate writes; without NODELAY, Nagle holds the
            # body until the client's delayed ACK (40 ms on Linux) on kept-alive connections.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("local api: " + format, *args)

    def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        self._reply_bytes(status, json.dumps(body).encode(), "application/json")

    def _reply_bytes(self, status: HTTPStatus, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError as exc:
            raise ApiError(
                HTTPStatus.LENGTH_REQUIRED, "length_required", "Send a Content-Length header."
            ) from exc
        limit = self.server.agent.config.local_api.max_body_bytes
        if length > limit:
            self.close_connection = True  # do not read a body we refuse
            raise ApiError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "too_large", f"The body is over {limit} bytes."
            )
        try:
            return json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, "malformed_json", f"The body is not JSON: {exc}") from exc

    def _check_host(self) -> None:
        """Refuse a Host header that does not name this agent (DNS rebinding: a web page
        whose name resolves to 127.0.0.1 makes the device's browser call us with its own
        host name). A unix socket has no such caller."""
        allowed = self.server.allowed_hosts
        if allowed is None:
            return
        host, _, port = (self.headers.get("Host") or "").lower().rpartition(":")
        if not host or "]" in port:  # no port given ("localhost", "[::1]")
            host, port = (self.headers.get("Host") or "").lower(), ""
        if host.strip("[]") not in allowed or (port and port != str(self.server.server_address[1])):
            raise ApiError(
                HTTPStatus.FORBIDDEN,
                "bad_host",
                "The Host header does not name this agent; call it by its bound address.",
            )

    def _dispatch(self, method: str) -> None:
        agent = self.server.agent
        try:
            self._check_host()
            if agent.stopping:
                self.close_connection = True
                raise ApiError(
                    HTTPStatus.SERVICE_UNAVAILABLE, "stopping", "The agent is stopping; retry shortly."
                )
            path = self.path.split("?", 1)[0]
            if method == "GET" and path == "/v1/health":
                return self._reply(HTTPStatus.OK, agent.health())
            if method == "GET" and path == "/metrics":
                return self._reply_bytes(HTTPStatus.OK, agent.metrics.exposition(), CONTENT_TYPE)
            if method == "POST" and (match := PREDICT.match(path)):
                return self._reply(HTTPStatus.OK, self._predict(match.group(1), self._body()))
            if method == "POST" and path == "/v1/feedback":
                return self._reply(HTTPStatus.OK, self._feedback(self._body()))
            if path in ("/v1/health", "/metrics", "/v1/feedback") or PREDICT.match(path):
                raise ApiError(
                    HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed", f"{method} is not allowed here."
                )
            raise ApiError(HTTPStatus.NOT_FOUND, "not_found", f"No endpoint {path}.")
        except ApiError as exc:
            self._reply(exc.status, {"error": {"code": exc.code, "message": exc.message}})
        except Exception as exc:  # never let one request take the agent down
            log.exception("local api request failed")
            self._reply(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"error": {"code": "internal", "message": str(exc)}}
            )

    def _predict(self, name: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise ApiError(HTTPStatus.BAD_REQUEST, "bad_request", 'Send {"inputs": [tensor, ...]}.')
        try:
            return self.server.agent.predict(name, body["inputs"])
        except UnknownModel as exc:
            raise ApiError(
                HTTPStatus.NOT_FOUND, "unknown_model", f"No model {name!r} is being served."
            ) from exc
        except BadInput as exc:
            raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, "bad_input", str(exc)) from exc

    def _feedback(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or "prediction_id" not in body or "label" not in body:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, "bad_request", 'Send {"prediction_id": ..., "label": ...}.'
            )
        try:
            return self.server.agent.feedback(str(body["prediction_id"]), body["label"])
        except KeyError as exc:
            raise ApiError(HTTPStatus.NOT_FOUND, "unknown_prediction", str(exc.args[0])) from exc
        except ValueError as exc:
            raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, "bad_label", str(exc)) from exc

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    agent: Agent
    allowed_hosts: frozenset[str] | None = None


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    agent: Agent
    allowed_hosts: frozenset[str] | None = None  # no Host check on a unix socket

    def get_request(self):
        request, _ = super().get_request()
        return request, ("unix", 0)  # BaseHTTPRequestHandler wants a (host, port) pair


class LocalApi:
    def __init__(self, agent: Agent) -> None:
        config = agent.config.local_api
        if config.unix_path is not None:
            config.unix_path.parent.mkdir(parents=True, exist_ok=True)
            if config.unix_path.exists():
                os.unlink(config.unix_path)
            self.server: Any = _UnixServer(str(config.unix_path), _Handler)
            self.address = f"unix:{config.unix_path}"
        else:
            self.server = _Server((config.host, config.port), _Handler)
            host, port = self.server.server_address[:2]
            self.address = f"http://{host}:{port}"
            names = {"localhost", "127.0.0.1", "::1", *config.allowed_hosts}
            if host not in ("0.0.0.0", "::"):
                names.add(host.lower())
            self.server.allowed_hosts = frozenset(names)
        self.server.agent = agent
        self._thread = threading.Thread(target=self.server.serve_forever, name="local-api", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting; requests in flight run to completion on their own threads."""
        self.server.shutdown()
        self.server.server_close()


def as_inputs(raw: list[Any], details: list[dict]) -> list[np.ndarray]:
    """JSON lists → arrays of the model's input dtypes, refusing wrong shapes and types."""
    if len(raw) != len(details):
        raise BadInput(f"the model takes {len(details)} input tensor(s), got {len(raw)}")
    arrays = []
    for value, detail in zip(raw, details, strict=True):
        try:
            array = np.asarray(value)
        except ValueError as exc:
            raise BadInput(f"input {detail['name']!r} is not a rectangular array") from exc
        if array.dtype.kind not in "biuf":
            raise BadInput(f"input {detail['name']!r} must be numbers, got {array.dtype}")
        expected = list(detail["shape"])
        if list(array.shape) != expected:
            if array.size == int(np.prod(expected)) and array.ndim == len(expected) - 1:
                array = array.reshape(expected)  # a single sample without the batch axis
            else:
                raise BadInput(f"input {detail['name']!r} needs shape {expected}, got {list(array.shape)}")
        dtype = np.dtype(detail["dtype"])
        if dtype.kind == "f":
            array = array.astype(dtype)
        elif array.dtype.kind == "f":
            raise BadInput(f"input {detail['name']!r} takes {dtype.name}, got floats")
        arrays.append(array)
    return arrays


def unix_request(path: str, method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    """A tiny HTTP client for the unix-socket variant (tests and `fleet-agent status`)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        headers = f"{method} {url} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        if body is not None:
            headers += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        sock.sendall(headers.encode() + b"\r\n" + (body or b""))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), payload
