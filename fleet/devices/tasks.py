"""Beat tasks of the devices app (schedules: migration 0002_beat_schedules). Thin: the
work is in fleet.devices.ingest."""

from celery import shared_task

from fleet.devices import ingest


@shared_task
def telemetry_cleanup() -> dict[str, int]:
    return ingest.telemetry_cleanup()


@shared_task
def devices_mark_stale() -> int:
    return ingest.devices_mark_stale()
