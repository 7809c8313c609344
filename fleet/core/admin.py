import json

from django.contrib import admin
from django_celery_beat import admin as beat_admin
from django_celery_beat.models import (
    ClockedSchedule,
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
    SolarSchedule,
)

from fleet.core.display import raw_details
from fleet.core.models import ApiToken

admin.site.site_header = "Modelfleet control room"
admin.site.site_title = "Modelfleet"
admin.site.index_title = "Fleet"
admin.site.index_template = "admin/fleet_index.html"  # the fleet dashboard (fleet/core/dashboard.py)


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


# --- the beat schedule (django-celery-beat's pages, for admins): the fleet's periodic tasks
# are created by migrations (fleet/core/beat.py) and take no arguments, so their JSON
# arguments and headers are not typed here; experts still read them, folded.


class PeriodicTaskAdmin(beat_admin.PeriodicTaskAdmin):
    fieldsets = tuple(
        (title, {**options, "fields": ("arguments",)})
        if "args" in options["fields"]
        else (title, {**options, "fields": tuple(f for f in options["fields"] if f != "headers")})
        for title, options in beat_admin.PeriodicTaskAdmin.fieldsets
    )
    readonly_fields = (*beat_admin.PeriodicTaskAdmin.readonly_fields, "arguments")

    @admin.display(description="arguments")
    def arguments(self, obj):
        if obj.pk is None:
            return "none"
        document = {name: json.loads(getattr(obj, name) or "null") for name in ("args", "kwargs", "headers")}
        return raw_details(document)


class PeriodicTaskInline(beat_admin.PeriodicTaskInline):
    fields = readonly_fields = ("name", "task", "enabled")


admin.site.unregister(PeriodicTask)
admin.site.register(PeriodicTask, PeriodicTaskAdmin)
for schedule in (ClockedSchedule, CrontabSchedule, SolarSchedule, IntervalSchedule):
    schedule_admin = type(admin.site.get_model_admin(schedule))
    admin.site.unregister(schedule)
    admin.site.register(
        schedule, type(schedule_admin.__name__, (schedule_admin,), {"inlines": [PeriodicTaskInline]})
    )
