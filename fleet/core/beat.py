"""Beat schedules as data migrations: one RunPython that creates (and on reverse deletes) the
named periodic tasks of django-celery-beat's database scheduler, and tells a running beat
that its schedule changed. Used by each app's schedule migrations."""

from __future__ import annotations

from django.db import migrations
from django.utils import timezone

# (name, dotted task path, every, period): period is one of IntervalSchedule's
# ("seconds", "minutes", "hours", "days").
Schedule = tuple[str, str, int, str]

DEPENDENCY = ("django_celery_beat", "0019_alter_periodictasks_options")


def _changed(apps) -> None:
    # Historical models send no signals: bump the marker the beat scheduler watches.
    apps.get_model("django_celery_beat", "PeriodicTasks").objects.update_or_create(
        ident=1, defaults={"last_update": timezone.now()}
    )


def beat_schedules(*schedules: Schedule) -> migrations.RunPython:
    def create(apps, schema_editor):
        IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
        PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
        for name, task, every, period in schedules:
            interval, _ = IntervalSchedule.objects.get_or_create(every=every, period=period)
            PeriodicTask.objects.update_or_create(
                name=name, defaults={"task": task, "interval": interval, "enabled": True}
            )
        _changed(apps)

    def delete(apps, schema_editor):
        apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(
            name__in=[name for name, *_ in schedules]
        ).delete()
        _changed(apps)

    return migrations.RunPython(create, delete)
