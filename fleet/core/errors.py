"""One error shape for the whole API: {"error": {"code", "message", "field"}}.

Services raise :class:`ServiceError` subclasses; DRF's own exceptions are mapped to the
same shape, so a client never has to parse two formats. Errors that happen outside a DRF
view (an unknown path, a bad Host header, an unhandled crash) get the same shape from the
Django handlers at the bottom, for every path under /api/; the admin keeps Django's HTML.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import BadRequest, RequestDataTooBig, SuspiciousOperation
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponsePermanentRedirect, JsonResponse
from django.urls import Resolver404, resolve
from django.views import csrf, defaults
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import set_rollback

API_PREFIX = "/api/"


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


def _django_bad_request(exc: Exception) -> exceptions.APIException | None:
    """Django's own 400s (an oversized body, too many fields, a suspicious request) as DRF
    exceptions, so they answer JSON even with DEBUG on, where Django would render HTML."""
    if isinstance(exc, RequestDataTooBig):
        error = exceptions.APIException(str(exc), code="too_large")
        error.status_code = 413
        return error
    if isinstance(exc, SuspiciousOperation):
        # Django logs these to django.security.<class>; keep that trail for the operators.
        logging.getLogger(f"django.security.{type(exc).__name__}").error(str(exc))
        return exceptions.ParseError(str(exc), code="bad_request")
    if isinstance(exc, BadRequest):
        return exceptions.ParseError(str(exc), code="bad_request")
    return None


def _render_as_json(context: dict) -> None:
    """Errors are JSON even for a browser that negotiated the browsable API's HTML."""
    request = context.get("request")
    if request is not None:
        request.accepted_renderer = JSONRenderer()
        request.accepted_media_type = JSONRenderer.media_type


def api_exception_handler(exc: Exception, context: dict) -> Response | None:
    if isinstance(exc, ServiceError):
        set_rollback()
        _render_as_json(context)
        return Response(error_body(exc.code, exc.message, exc.field), status=exc.status_code)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    else:
        exc = _django_bad_request(exc) or exc
    if not isinstance(exc, exceptions.APIException):
        return None  # a real bug: let Django log it and answer 500
    set_rollback()
    _render_as_json(context)
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


def is_api_path(request: HttpRequest) -> bool:
    return request.path.startswith(API_PREFIX)


def _json_error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse(error_body(code, message), status=status)


@csrf_exempt  # any method may reach it; a CSRF refusal would be Django's HTML 403 page
def api_not_found(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    """The last URL pattern under /api/: an unknown endpoint is a JSON 404 whatever DEBUG
    says (with DEBUG on, Django answers Http404 with its HTML debug page, not handler404).

    It also stands in for CommonMiddleware's APPEND_SLASH, which no longer sees /api/ 404s:
    a GET or HEAD is redirected as before, but any other method gets a 404 that names the
    right path, since a redirect would drop its body (and, with DEBUG on, Django raises)."""
    message = f"No such endpoint: {request.path}"
    if settings.APPEND_SLASH and not request.path.endswith("/"):
        try:
            match = resolve(request.path + "/")
        except Resolver404:
            match = None
        if match is not None and match.func is not api_not_found:
            if request.method in ("GET", "HEAD"):
                return HttpResponsePermanentRedirect(request.get_full_path(force_append_slash=True))
            message += f" (did you mean {request.path}/ ?)"
    return _json_error(404, "not_found", message)


def json_400(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """Django's 400 (a disallowed Host header, a malformed request) before any view ran."""
    if not is_api_path(request):
        return defaults.bad_request(request, exception)
    return _json_error(400, "bad_request", "The request is malformed.")


def json_403(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if not is_api_path(request):
        return defaults.permission_denied(request, exception)
    return _json_error(403, "permission_denied", "You do not have permission to perform this action.")


def json_404(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """JSON for API clients, Django's HTML page for people in the admin."""
    if not is_api_path(request):
        return defaults.page_not_found(request, exception)
    return _json_error(404, "not_found", f"No such endpoint: {request.path}")


def json_500(request: HttpRequest) -> HttpResponse:
    if not is_api_path(request):
        return defaults.server_error(request)
    return _json_error(500, "server_error", "The server failed; the error has been logged.")


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """CSRF_FAILURE_VIEW: Django's CSRF refusal (a session-authenticated unsafe request
    without a valid token) in the error shape under /api/, worded as DRF words its own
    (DRF's views check CSRF themselves and answer through the exception handler)."""
    if not is_api_path(request):
        return csrf.csrf_failure(request, reason)
    return _json_error(403, "permission_denied", f"CSRF Failed: {reason}")
