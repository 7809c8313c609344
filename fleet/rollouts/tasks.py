from celery import shared_task

from fleet.rollouts import services


@shared_task
def rollouts_evaluate_running() -> dict[int, str]:
    """Beat task: evaluate every running rollout (thin; the logic is in services)."""
    return services.evaluate_running()


@shared_task
def rollouts_telemetry_summarize() -> dict[int, int]:
    """Beat task: sum the settled hours of each rollout's telemetry (thin; see services)."""
    return services.telemetry_summarize()


@shared_task
def rollouts_evaluations_thin() -> int:
    """Beat task: retention of old gate evaluations (thin; see services.evaluations_thin)."""
    return services.evaluations_thin()
