"""Rollout and assignment states, and the transitions allowed between them."""

from django.db import models

from agent.protocol import EventType


class RolloutState(models.TextChoices):
    DRAFT = "draft", "Draft"
    RUNNING = "running", "Running"
    PAUSED = "paused", "Paused"
    COMPLETED = "completed", "Completed"
    ABORTED = "aborted", "Aborted"
    ROLLED_BACK = "rolled_back", "Rolled back"


# Every state change goes through this table with a compare-and-set update.
ROLLOUT_TRANSITIONS: dict[str, tuple[str, ...]] = {
    RolloutState.DRAFT: (RolloutState.RUNNING, RolloutState.ABORTED),
    RolloutState.RUNNING: (
        RolloutState.PAUSED,
        RolloutState.COMPLETED,
        RolloutState.ABORTED,
        RolloutState.ROLLED_BACK,
    ),
    RolloutState.PAUSED: (RolloutState.RUNNING, RolloutState.ABORTED, RolloutState.ROLLED_BACK),
    RolloutState.COMPLETED: (RolloutState.ROLLED_BACK,),
    RolloutState.ABORTED: (),
    RolloutState.ROLLED_BACK: (),
}
ACTIVE_STATES = (RolloutState.RUNNING, RolloutState.PAUSED)


class AssignmentState(models.TextChoices):
    SKIPPED = "skipped", "Skipped (not eligible)"
    PENDING = "pending", "Pending (later stage)"
    NOTIFIED = "notified", "Notified"
    DOWNLOADING = "downloading", "Downloading"
    VERIFYING = "verifying", "Verifying"
    SHADOW = "shadow", "Running in shadow"
    ACTIVE = "active", "Active"
    FAILED = "failed", "Failed"
    REVERTED = "reverted", "Reverted"
    ROLLED_BACK = "rolled_back", "Rolled back"


class SkipReason(models.TextChoices):
    """Why a targeted device is not in the rollout (``Assignment.skip_code``); the
    assignment's ``reason`` says the particulars ("int8: needs op SOFTMAX")."""

    NO_VARIANT_FITS = "no_variant_fits", "No variant fits the device"
    DEVICE_INACTIVE = "device_inactive", "Device not active"


IN_FLIGHT = (AssignmentState.NOTIFIED, AssignmentState.DOWNLOADING, AssignmentState.VERIFYING)
# Device event types (agent) -> the assignment state they mean. ``retrying`` (a transient
# failure the agent retries, docs/protocol.md addition 8) is left out on purpose: the device
# is still installing, and only ``failed`` counts against the install-failure gate.
EVENT_STATES = {
    EventType.NOTIFIED: AssignmentState.NOTIFIED,
    EventType.DOWNLOADING: AssignmentState.DOWNLOADING,
    EventType.VERIFYING: AssignmentState.VERIFYING,
    EventType.SHADOW: AssignmentState.SHADOW,
    EventType.ACTIVE: AssignmentState.ACTIVE,
    EventType.FAILED: AssignmentState.FAILED,
}
# Where a device has finished with its stage (installed, shadowing or failed).
SETTLED = (AssignmentState.ACTIVE, AssignmentState.SHADOW, AssignmentState.FAILED)


class StageMode(models.TextChoices):
    LIVE = "live", "Live (devices serve the candidate)"
    SHADOW = "shadow", "Shadow (devices run the candidate beside the live model, unseen)"


class Verdict(models.TextChoices):
    PASS = "pass", "Pass"
    FAIL = "fail", "Fail"
    WAIT = "wait", "Wait"
    SKIPPED = "skipped", "Not compared"
    ERROR = "error", "Error"


class Metric(models.TextChoices):
    INSTALL_FAILURE_RATE = "install_failure_rate", "Install failures"
    ERROR_RATE = "error_rate", "Inference errors"
    LATENCY_P95_RATIO = "latency_p95_ratio", "p95 latency ratio"
    ACCURACY = "accuracy", "Accuracy"
    SHADOW_AGREEMENT = "shadow_agreement", "Shadow agreement"
    SHADOW_LATENCY_P95_RATIO = "shadow_latency_p95_ratio", "Shadow p95 latency ratio"
    EVALUATOR = "evaluator", "Evaluator"


class OnFailure(models.TextChoices):
    PAUSE = "pause", "Pause"
    ROLLBACK = "rollback", "Roll back"


class Approval(models.TextChoices):
    AUTOMATIC = "automatic", "Automatic"
    MANUAL = "manual", "Manual (an operator promotes)"


class Decision(models.TextChoices):
    WAIT = "wait", "Wait"
    PROMOTE = "promote", "Promote"
    AWAIT_APPROVAL = "await_approval", "Await approval"
    COMPLETE = "complete", "Complete"
    PAUSE = "pause", "Pause"
    ROLLBACK = "rollback", "Roll back"
    ERROR = "error", "Evaluation failed"
