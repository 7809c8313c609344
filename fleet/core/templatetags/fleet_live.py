"""{% live_status url %}: the status line of a page that refreshes itself (fleet/core/live.py)."""

from django import template

from fleet.core.live import LIVE_REFRESH_SECONDS

register = template.Library()


@register.inclusion_tag("admin/includes/live_status.html")
def live_status(url: str) -> dict:
    return {"live_url": url, "live_seconds": LIVE_REFRESH_SECONDS}
