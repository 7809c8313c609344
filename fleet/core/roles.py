"""What each role may do in the admin site, as Django permissions on the role's group.

Viewers read everything an ops person needs; operators also add and change what the API
lets them add and change. No role has a delete permission: rollouts, gate evaluations,
audit entries and device events are append-only, a device is retired rather than deleted,
and the rest is kept for the history it explains. (Admins are superusers, so the admin
classes of the append-only models refuse deletion themselves, whoever asks.)
"""

from __future__ import annotations

from django.db.models import Q

from fleet.core.choices import Role

# The apps ops staff work in, and the models an operator may add and change (as in the API).
FLEET_APPS = ("registry", "devices", "rollouts")
OPERATOR_WRITES = {
    "registry": ("mlmodel", "modelversion", "artifact"),
    "devices": ("device", "devicegroup", "enrollmenttoken"),
    "rollouts": ("rolloutpolicy", "rollout"),
}
# Never deleted, by anyone, through any door.
APPEND_ONLY = (
    ("rollouts", "rollout"),
    ("rollouts", "gateevaluation"),
    ("rollouts", "auditentry"),
    ("devices", "deviceevent"),
)


def role_permission_query(role: Role) -> Q:
    """The permissions the role's group holds (each role includes the ones below it)."""
    query = Q(content_type__app_label__in=FLEET_APPS, codename__startswith="view_")
    if role in (Role.OPERATOR, Role.ADMIN):
        for app, models in OPERATOR_WRITES.items():
            for action in ("add", "change"):
                codenames = [f"{action}_{model}" for model in models]
                query |= Q(content_type__app_label=app, codename__in=codenames)
    if role == Role.ADMIN:
        query |= Q(content_type__app_label="core", codename__in=["view_apitoken", "change_apitoken"])
    return query
