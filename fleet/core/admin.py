from django.contrib import admin
from django.contrib.auth import admin as auth_admin
from django.contrib.auth.models import Group, User
from django.core.exceptions import PermissionDenied
from django_celery_beat import models as beat

from fleet.core.choices import Role
from fleet.core.dashboard import dashboard
from fleet.core.live import live_response
from fleet.core.models import ApiToken
from fleet.core.permissions import has_role

admin.site.site_header = "Modelfleet control room"
admin.site.site_title = "Modelfleet"
admin.site.index_title = "Fleet"
admin.site.index_template = "admin/fleet_index.html"  # the fleet dashboard (fleet/core/dashboard.py)


# People and roles: Django's pages, with plain multiple selects instead of the two-list
# widget (whose search icons carry prohibited ARIA attributes), and the login times read-only
# (the system writes them; their two-input widget has no labels).
class UserAdmin(auth_admin.UserAdmin):
    filter_horizontal = ()
    readonly_fields = ("last_login", "date_joined")


class GroupAdmin(auth_admin.GroupAdmin):
    filter_horizontal = ()


for person_model, person_admin in ((User, UserAdmin), (Group, GroupAdmin)):
    admin.site.unregister(person_model)
    admin.site.register(person_model, person_admin)

# The beat schedules are code (each app's schedule migrations, fleet/core/beat.py), not
# something to edit by hand: a disabled "evaluate running rollouts" would freeze every gate
# unseen. django-celery-beat's pages (raw JSON arguments) are left out of the control room.
for schedule_model in (
    beat.PeriodicTask,
    beat.IntervalSchedule,
    beat.CrontabSchedule,
    beat.SolarSchedule,
    beat.ClockedSchedule,
):
    if admin.site.is_registered(schedule_model):
        admin.site.unregister(schedule_model)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("prefix", "name", "user", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "prefix", "user__username")
    readonly_fields = ("user", "prefix", "key_sha256", "created_at", "last_used_at")
    actions = ["revoke"]

    def has_add_permission(self, request):
        return False  # keys are shown once: create them with `manage.py create_api_token`

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke(self, request, queryset):
        from django.utils import timezone

        queryset.filter(revoked_at=None).update(revoked_at=timezone.now())


# The dashboard's live parts (fleet/core/live.py): each its own template, also on the page.
DASHBOARD_PARTS = {
    part: f"admin/dashboard/{part}.html" for part in ("devices", "ingest", "failures", "rollouts", "versions")
}


def dashboard_live(request):
    """The dashboard's figures again, for its refresh without a reload: the same templates
    as the page and the stacked bar's series. Viewers and up, as the API's reads."""
    if not has_role(request.user, Role.VIEWER):
        raise PermissionDenied
    dash = dashboard()
    return live_response(request, parts=DASHBOARD_PARTS, context={"dash": dash}, charts=dash.versions)
