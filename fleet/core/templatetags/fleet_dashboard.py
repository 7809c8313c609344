"""{% fleet_dashboard as dash %}: the fleet dashboard's figures, for the admin index."""

from django import template

from fleet.core.dashboard import Dashboard, dashboard

register = template.Library()


@register.simple_tag
def fleet_dashboard() -> Dashboard:
    return dashboard()
