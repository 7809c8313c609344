"""How the admin shows things to people: counts with their noun, durations, and JSON only
folded away in a "raw" section for experts (issue 10, section 2)."""

from __future__ import annotations

import json
from datetime import datetime

from django.contrib import admin
from django.template.defaultfilters import filesizeformat
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString


def count(n: int, noun: str) -> str:
    """``count(1, "device")`` → "1 device"; ``count(2043, "device")`` → "2,043 devices"."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def duration(seconds: float) -> str:
    """A rounded duration: "45 s", "12 min", "5 h 3 min", "3 d 4 h"."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 3600:
        return f"{minutes} min"
    if seconds < 86400:
        return f"{hours} h {minutes % 60} min"
    return f"{days} d {hours % 24} h"


def moment(value: datetime | None) -> str:
    """A time to the second, with its zone: "2026-11-30 16:24:03 UTC"."""
    return "—" if value is None else f"{timezone.localtime(value):%Y-%m-%d %H:%M:%S %Z}"


def raw_details(document) -> SafeString:
    """The document as JSON, folded: closed unless someone opens it."""
    text = json.dumps(document, indent=2)
    return format_html('<details class="raw"><summary>raw</summary><pre>{}</pre></details>', text)


def size(n_bytes: int | None) -> str:
    """A size in bytes, rounded with its unit: "4.1 KB" (binary multiples, as ``ls -h``)."""
    return "—" if n_bytes is None else filesizeformat(n_bytes).replace("\xa0", " ")


def percent(fraction: float | None, digits: int = 1) -> str:
    """0.975 → "97.5 %"."""
    return "—" if fraction is None else f"{fraction * 100:.{digits}f} %"


def short_hash(value: str, what: str = "sha256") -> SafeString:
    """The first 12 hex digits of a hash, the whole one in a tooltip, and a button that copies
    it (fleet/core/static/fleet/copy.js; without JavaScript the title still holds it)."""
    if not value:
        return format_html("—")
    return format_html(
        '<code title="{}">{}…</code> <button type="button" class="copy-button" data-copy="{}"'
        ' aria-label="Copy the {} {}">copy</button>',
        value,
        value[:12],
        value,
        what,
        value[:12],
    )


def time_column(field: str, description: str | None = None):
    """A ModelAdmin column (or read-only field) showing a time to the second with its zone:
    ``created_at_text = time_column("created_at")`` (Django's own shows neither)."""

    @admin.display(description=description or field.replace("_", " "), ordering=field)
    def column(model_admin, obj) -> str:
        return moment(getattr(obj, field))

    column.__name__ = f"{field}_text"
    return column
