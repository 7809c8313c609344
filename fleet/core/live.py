"""Live refresh for the control-room pages (issue 10, section 2: "Pages refresh live …
without a full reload"): one mechanism for every page.

A page marks its read-only parts ``data-live-part="name"`` and draws its status line with
its live URL (``{% load fleet_live %}{% live_status url %}``). Every few seconds
fleet/core/static/fleet/live.js asks that URL for ``{"parts": {name: html}, "fields":
{name: html}, "charts": {...}, "updated": "…"}`` and replaces each part in place; parts
are rendered by the same templates as the page, so a part equals what a reload would show.
``fields`` are the page's read-only admin fields (``.field-<name> .readonly``). Forms never
sit inside a part, so a refresh cannot wipe what someone is typing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.contrib.admin.helpers import AdminReadonlyField
from django.http import HttpRequest, JsonResponse
from django.template.loader import render_to_string
from django.utils import timezone

# Every live page polls this often (seconds); the script backs off on errors, up to a minute.
LIVE_REFRESH_SECONDS = 5

# A part: a template rendered with the page's context, or (template, extra context) for one
# item of a list (one sparkline of several).
PartSpec = str | tuple[str, dict[str, Any]]


def render_parts(request: HttpRequest, parts: dict[str, PartSpec], context: dict[str, Any]) -> dict[str, str]:
    rendered = {}
    for name, spec in parts.items():
        template, extra = (spec, {}) if isinstance(spec, str) else spec
        rendered[name] = render_to_string(template, {**context, **extra}, request=request)
    return rendered


def render_fields(request: HttpRequest, model_admin, obj, names: Iterable[str]) -> dict[str, str]:
    """Read-only admin fields exactly as the change form shows them (Django's own
    AdminReadonlyField, on the form the page is drawn with)."""
    form = model_admin.get_form(request, obj)(instance=obj)
    return {name: str(AdminReadonlyField(form, name, True, model_admin).contents()) for name in names}


def live_response(
    request: HttpRequest,
    *,
    parts: dict[str, PartSpec],
    context: dict[str, Any],
    fields: dict[str, str] | None = None,
    charts: Any = None,
) -> JsonResponse:
    return JsonResponse(
        {
            "parts": render_parts(request, parts, context),
            "fields": fields or {},
            "charts": charts,
            # The server's clock, in the zone every time on the page is shown in.
            "updated": f"{timezone.localtime():%H:%M:%S %Z}",
        }
    )
