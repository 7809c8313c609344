from celery import shared_task

from fleet.mqtt.broker import BrokerError
from fleet.mqtt.publisher import publish_desired


@shared_task(autoretry_for=(BrokerError, OSError), retry_backoff=True, retry_backoff_max=60, max_retries=10)
def publish_desired_task(states: list, entries: dict[str, dict], rollout: dict | None) -> int:
    """Sign and publish one chunk of desired states (thin: the work is in the services)."""
    from fleet.devices.services import sign_desired_states

    signed = sign_desired_states(
        states=[tuple(state) for state in states],
        entries={int(pk): entry for pk, entry in entries.items()},  # JSON made the keys strings
        rollout=rollout,
    )
    return publish_desired(signed)


@shared_task(autoretry_for=(BrokerError, OSError), retry_backoff=True, retry_backoff_max=60, max_retries=10)
def publish_trust_task() -> None:
    """Publish the current trust bundle (it is rebuilt from the database, so a retry or a
    late run publishes the newest one)."""
    from fleet.registry.trust import trust_publish

    trust_publish(now=True)
