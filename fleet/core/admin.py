from django.contrib import admin

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
