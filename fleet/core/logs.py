"""Log context and the JSON log format (docs/operations.md, "Metrics and logs").

Every process of the control plane (web, worker, beat, ingest) logs through the root
logger that settings.LOGGING configures; ``LOG_FORMAT=json`` makes that one JSON object
a line. The request id, device id and rollout id live in context variables, so a log line
carries them wherever the code that logs sits: the request-id middleware sets the first,
services set the others with :func:`log_context` around the work they log about.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import uuid
from collections.abc import Callable, Iterator

from django.http import HttpRequest, HttpResponse

REQUEST_ID_HEADER = "X-Request-ID"
# A client's request id is kept only if it is short and plain: it ends up in log lines.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
device_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("device_id", default=None)
rollout_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("rollout_id", default=None)
CONTEXT = {"request_id": request_id, "device_id": device_id, "rollout_id": rollout_id}


@contextlib.contextmanager
def log_context(**values: str | int | None) -> Iterator[None]:
    """Set some of request_id, device_id, rollout_id for the lines logged inside."""
    tokens = [(CONTEXT[name], CONTEXT[name].set(value)) for name, value in values.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Copies the context variables that are set onto each record (a handler filter, so
    records of every logger get them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in CONTEXT.items():
            value = var.get()
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        # Django logs a 4xx/5xx answer ("Not Found: /api/…") after the middleware returned,
        # outside the request's context, but with the request itself.
        request_id = getattr(getattr(record, "request", None), "request_id", None)
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


def _with_request_id(get_response, request: HttpRequest, value: str) -> HttpResponse:
    request_id.set(value)
    return get_response(request)


def request_id_middleware(get_response: Callable[[HttpRequest], HttpResponse]):
    """Give every request an id: the client's ``X-Request-ID`` if it is a plain token,
    a new one otherwise. Logged with every line of the request and sent back.

    The request runs in a copy of the context: whatever it sets (the device id of a device
    login, say) is gone with it and never leaks into the next request on this thread."""

    def middleware(request: HttpRequest) -> HttpResponse:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        value = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        request.request_id = value
        response = contextvars.copy_context().run(_with_request_id, get_response, request, value)
        response[REQUEST_ID_HEADER] = value
        return response

    return middleware
