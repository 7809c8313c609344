"""One error shape for the whole API: {"error": {"code", "message", "field"}}.

Services raise :class:`ServiceError` subclasses; DRF's own exceptions are mapped to the
same shape, so a client never has to parse two formats.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, JsonResponse
from django.views import defaults
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import set_rollback


class ServiceError(Exception):
    status_code = 400
    code = "invalid"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code:
            self.code = code


class InvalidInput(ServiceError):
    status_code = 400


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class TooLarge(ServiceError):
    status_code = 413
    code = "too_large"


class Unprocessable(ServiceError):
    status_code = 422
    code = "unprocessable"


def error_body(code: str, message: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field, **extra}}


def _first_validation_error(detail: Any, field: str | None = None) -> tuple[str | None, Any]:
    """DRF nests validation errors in dicts and lists; report the first leaf."""
    if isinstance(detail, dict):
        key, value = next(iter(detail.items()))
        name = None if key == "non_field_errors" else str(key)
        return _first_validation_error(value, f"{field}.{name}" if field and name else name or field)
    if isinstance(detail, list) and detail:
        return _first_validation_error(detail[0], field)
    return field, detail


def api_exception_handler(exc: Exception, context: dict) -> Response | None:
    if isinstance(exc, ServiceError):
        set_rollback()
        return Response(error_body(exc.code, exc.message, exc.field), status=exc.status_code)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    if not isinstance(exc, exceptions.APIException):
        return None  # a real bug: let Django log it and answer 500
    set_rollback()
    if isinstance(exc, exceptions.ValidationError):
        field, leaf = _first_validation_error(exc.detail)
        code = getattr(leaf, "code", None) or "invalid"
        body = error_body(code, str(leaf), field)
    else:
        body = error_body(
            exc.default_code if not isinstance(exc.get_codes(), str) else exc.get_codes(), str(exc.detail)
        )
    headers = {}
    if getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = exc.auth_header
    if getattr(exc, "wait", None):
        headers["Retry-After"] = str(int(exc.wait))
    return Response(body, status=exc.status_code, headers=headers)


def json_404(request, exception=None):
    """JSON for API clients, Django's HTML page for people in the admin."""
    if not request.path.startswith("/api/"):
        return defaults.page_not_found(request, exception)
    return JsonResponse(error_body("not_found", f"No such endpoint: {request.path}"), status=404)


def json_500(request):
    if not request.path.startswith("/api/"):
        return defaults.server_error(request)
    return JsonResponse(
        error_body("server_error", "The server failed; the error has been logged."), status=500
    )
