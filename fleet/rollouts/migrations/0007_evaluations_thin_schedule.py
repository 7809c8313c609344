"""Beat schedule: thin the gate evaluations older than GATE_EVALUATION_RETENTION_DAYS every
hour (fleet/rollouts/tasks.py, services.evaluations_thin)."""

from django.db import migrations

from fleet.core.beat import DEPENDENCY, beat_schedules


class Migration(migrations.Migration):
    dependencies = [("rollouts", "0006_assignment_skip_code"), DEPENDENCY]

    operations = [
        beat_schedules(
            ("rollouts: thin old gate evaluations", "fleet.rollouts.tasks.rollouts_evaluations_thin", 1, "hours")
        )
    ]
