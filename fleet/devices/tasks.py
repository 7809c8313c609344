"""Tasks of the devices app: the beat tasks (schedules: migrations 0002_beat_schedules and
0004_partition_schedule; the work is in fleet.devices.ingest) and the publishing of desired
states in chunks (the work is in fleet.devices.desired)."""

from celery import shared_task

from fleet.devices import ingest
from fleet.devices.desired import sign_desired_states
from fleet.mqtt.publisher import PUBLISH_RETRY, publish_desired


@shared_task
def telemetry_cleanup() -> dict[str, int]:
    return ingest.telemetry_cleanup()


@shared_task
def telemetry_partitions() -> list[str]:
    return ingest.telemetry_partitions_ensure()


@shared_task
def devices_mark_stale() -> int:
    return ingest.devices_mark_stale()


# The name is the one this task had in fleet.mqtt.tasks (before desired state had one home,
# issue 11): tasks queued in Redis by an older release still run after an upgrade.
@shared_task(name="fleet.mqtt.tasks.publish_desired_task", **PUBLISH_RETRY)
def publish_desired_task(states: list, entries: dict[str, dict], rollout: dict | None) -> int:
    """Sign and publish one chunk of desired states (thin: the work is in fleet.devices.desired)."""
    signed = sign_desired_states(
        states=[tuple(state) for state in states],
        entries={int(pk): entry for pk, entry in entries.items()},  # JSON made the keys strings
        rollout=rollout,
    )
    return publish_desired(signed)
