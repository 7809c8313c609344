from celery import shared_task

from fleet.registry import services


@shared_task(acks_late=True)
def artifact_process_task(artifact_id: int) -> str:
    """Thin wrapper: the pipeline lives in services.artifact_process."""
    return services.artifact_process(artifact_id=artifact_id).status
