from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "fleet.core"
    label = "core"
    verbose_name = "Accounts and API access"

    def ready(self) -> None:
        from django.db import models
        from django.db.models.signals import post_migrate
        from rest_framework.serializers import ModelSerializer

        from fleet.core import checks  # noqa: F401  (registers the deploy checks)
        from fleet.core.fields import JSONField
        from fleet.core.services import roles_sync

        # Every model JSONField behind a ModelSerializer, in every app and those added
        # later, refuses NUL characters with a 400 instead of failing in PostgreSQL (500).
        ModelSerializer.serializer_field_mapping[models.JSONField] = JSONField

        # Permissions are created after each app migrates; the roles get theirs then.
        post_migrate.connect(roles_sync, dispatch_uid="fleet.core.roles_sync")
