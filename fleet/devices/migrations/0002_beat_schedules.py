"""Beat schedules of the devices app: telemetry cleanup every hour, stale devices every
minute (fleet/devices/tasks.py)."""

from django.db import migrations

from fleet.core.beat import DEPENDENCY, beat_schedules


class Migration(migrations.Migration):
    dependencies = [("devices", "0001_initial"), DEPENDENCY]

    operations = [
        beat_schedules(
            ("devices: telemetry cleanup", "fleet.devices.tasks.telemetry_cleanup", 1, "hours"),
            ("devices: mark stale devices offline", "fleet.devices.tasks.devices_mark_stale", 1, "minutes"),
        )
    ]
