from celery import shared_task

from fleet.mqtt.broker import BrokerError
from fleet.mqtt.publisher import publish_desired


@shared_task(autoretry_for=(BrokerError, OSError), retry_backoff=True, retry_backoff_max=60, max_retries=10)
def publish_desired_task(envelopes: list[tuple[str, str]]) -> int:
    """Publish one chunk of signed desired states (thin: fleet.mqtt.publisher)."""
    return publish_desired([(device_id, envelope.encode()) for device_id, envelope in envelopes])
