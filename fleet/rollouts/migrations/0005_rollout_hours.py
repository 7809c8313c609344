"""Per-rollout hourly telemetry sums (RolloutHour) for the hours the ingest can no longer
change, and the beat task that keeps them (every 15 minutes), so that the rollout page never
adds up a week of per-device rollups (issue 10: under 300 ms at 10,000 devices)."""

import django.db.models.deletion
from django.db import migrations, models

from fleet.core.beat import DEPENDENCY, beat_schedules


class Migration(migrations.Migration):

    dependencies = [
        ('rollouts', '0004_verdict_skipped'),
        DEPENDENCY,
    ]

    operations = [
        migrations.AddField(
            model_name='rollout',
            name='telemetry_summed_until',
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.CreateModel(
            name='RolloutHour',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('version', models.CharField(max_length=64)),
                ('hour', models.DateTimeField()),
                ('inferences', models.PositiveBigIntegerField()),
                ('errors', models.PositiveBigIntegerField()),
                ('latency_p95_weighted_sum', models.FloatField()),
                ('latency_p95_weight', models.PositiveBigIntegerField()),
                ('rollout', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='+', to='rollouts.rollout')),
            ],
            options={
                'ordering': ['rollout', 'version', 'hour'],
                'constraints': [models.UniqueConstraint(fields=('rollout', 'version', 'hour'), name='rollouts_hour_once')],
            },
        ),
        beat_schedules(
            (
                "rollouts: sum settled telemetry hours",
                "fleet.rollouts.tasks.rollouts_telemetry_summarize",
                15,
                "minutes",
            )
        ),
    ]
