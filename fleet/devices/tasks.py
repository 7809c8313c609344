"""Beat tasks of the devices app (schedules: migrations 0002_beat_schedules and
0004_partition_schedule). Thin: the work is in fleet.devices.ingest."""

from celery import shared_task

from fleet.devices import ingest


@shared_task
def telemetry_cleanup() -> dict[str, int]:
    return ingest.telemetry_cleanup()


@shared_task
def telemetry_partitions() -> list[str]:
    return ingest.telemetry_partitions_ensure()


@shared_task
def devices_mark_stale() -> int:
    return ingest.devices_mark_stale()
