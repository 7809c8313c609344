from celery import shared_task

from fleet.mqtt.publisher import PUBLISH_RETRY
from fleet.registry import services, trust


@shared_task(acks_late=True)
def artifact_process_task(artifact_id: int) -> str:
    """Thin wrapper: the pipeline lives in services.artifact_process."""
    return services.artifact_process(artifact_id=artifact_id).status


@shared_task(acks_late=True)
def artifact_deltas_task(artifact_id: int) -> int:
    """Thin wrapper: services.artifact_deltas_make; returns how many deltas it made."""
    return len(services.artifact_deltas_make(artifact_id=artifact_id))


# The name is the one this task had in fleet.mqtt.tasks (before fleet.mqtt became a broker
# adapter that imports no other app, issue 11): tasks queued by an older release still run.
@shared_task(name="fleet.mqtt.tasks.publish_trust_task", **PUBLISH_RETRY)
def publish_trust_task() -> None:
    """Publish the current trust bundle (it is rebuilt from the database, so a retry or a
    late run publishes the newest one)."""
    trust.trust_publish(now=True)
