"""Beat schedule of the telemetry partitions (fleet/devices/tasks.py): every hour, make the
partitions of the days ahead (idempotent), so that the bridge never writes into the DEFAULT
partition in normal operation."""

from django.db import migrations

from fleet.core.beat import DEPENDENCY, beat_schedules


class Migration(migrations.Migration):
    dependencies = [("devices", "0003_telemetry_partitions"), DEPENDENCY]

    operations = [
        beat_schedules(("devices: telemetry partitions", "fleet.devices.tasks.telemetry_partitions", 1, "hours"))
    ]
