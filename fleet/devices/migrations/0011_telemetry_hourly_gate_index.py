"""The gate's whole hours from the hourly sums (issue 13, fleet/devices/selectors.py
telemetry_sums): a covering index, built without blocking the ingest's upserts on a table
that keeps 90 days."""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class AddIndexConcurrentlyOnPostgres(AddIndexConcurrently):
    """CONCURRENTLY on PostgreSQL; a plain CREATE INDEX elsewhere (SQLite, for a demo)."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            return super().database_forwards(app_label, schema_editor, from_state, to_state)
        return migrations.AddIndex.database_forwards(self, app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            return super().database_backwards(app_label, schema_editor, from_state, to_state)
        return migrations.AddIndex.database_backwards(self, app_label, schema_editor, from_state, to_state)


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [
        ("devices", "0010_event_delivery"),
    ]

    operations = [
        AddIndexConcurrentlyOnPostgres(
            model_name="telemetryhourly",
            index=models.Index(
                fields=["model", "device", "hour"],
                include=(
                    "version",
                    "variant",
                    "shadow_version",
                    "shadow_variant",
                    "windows",
                    "inferences",
                    "errors",
                    "labeled",
                    "correct",
                    "latency_p95_weighted_sum",
                    "latency_p95_weight",
                    "latency_p95_max_ms",
                    "shadow_sampled",
                    "shadow_compared",
                    "shadow_agreed",
                    "shadow_errors",
                    "shadow_latency_p95_weighted_sum",
                    "shadow_latency_p95_weight",
                ),
                name="devices_hourly_gate",
            ),
        ),
    ]
