"""The control plane's lists of the contract's codes are the protocol's (issue 11 §4): the
admin's labels cover every code, and nothing else."""

from agent.protocol import EventType, Reason
from fleet.devices.choices import DeviceEventType, EventReason, event_type_label, reason_label
from fleet.rollouts.choices import EVENT_STATES, AssignmentState


def test_every_event_reason_is_a_protocol_reason_and_back():
    assert set(EventReason.values) == {str(code) for code in Reason}
    assert len(EventReason.values) == len(Reason)
    for code in Reason:
        assert EventReason(code).label not in ("", code.value, code.name)  # words, not the code again


def test_every_device_event_type_is_a_protocol_event_type_and_back():
    assert set(DeviceEventType.values) == {str(kind) for kind in EventType}
    assert len(DeviceEventType.values) == len(EventType)


def test_the_assignment_follows_every_event_type_but_retrying_and_trust():
    assert set(EVENT_STATES) == set(EventType) - {EventType.RETRYING, EventType.TRUST}
    assert EVENT_STATES["failed"] == AssignmentState.FAILED  # a stored (plain string) type finds it


def test_labels_of_codes_from_a_newer_agent_are_the_codes():
    assert reason_label("golden_failed") == "Failed its golden-set check (golden_failed)"
    assert reason_label("from_the_future") == "from_the_future"
    assert event_type_label("active") == "Serving the new version"
    assert event_type_label("swap") == "swap"
