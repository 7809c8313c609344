"""The contract's event types and reason codes (agent/protocol/codes.py): one home, and the
same bytes on the wire as the plain strings they replaced (issue 11 §4)."""

import ast
import json
import re
from pathlib import Path

import pytest

from agent import protocol
from agent.apply import event_message
from agent.protocol import EventType, Reason
from agent.protocol.schemas import SCHEMAS
from agent.sim.cli import parser

AGENT = Path(__file__).resolve().parents[2] / "agent"
# String literals equal to a reason code that are not one: each with why.
NOT_REASONS = {
    ("localapi.py", "too_large"),  # the local HTTP API's own error code (413)
    ("protocol/delta.py", "too_large"),  # DeltaFailure, the delta codec's own enum
    ("protocol/topics.py", "replay"),  # the fleet-wide replay topic's name
}


def reason_literals(source: str) -> list[str]:
    """The string constants of ``source`` that spell a reason code."""
    codes = set(Reason)
    return [
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in codes
    ]


def test_a_code_serialises_to_exactly_the_bytes_of_its_string():
    event = event_message(EventType.FAILED, generation=3, model="digits", reason=Reason.GOLDEN_FAILED)
    plain = {**event, "type": "failed", "reason": "golden_failed"}
    assert type(event["type"]) is EventType and type(plain["type"]) is str  # control: not the same objects
    assert json.dumps(event).encode() == json.dumps(plain).encode()
    assert protocol.canonical_json(event) == protocol.canonical_json(plain)
    assert json.loads(json.dumps(event)) == plain


def test_codes_read_from_the_wire_are_their_members():
    assert Reason("tls_failed") is Reason.TLS_FAILED and EventType("retrying") is EventType.RETRYING
    assert {EventType.FAILED: 1}.get("failed") == 1  # plain strings find enum-keyed entries
    with pytest.raises(ValueError):
        Reason("no_such_reason")


def test_the_events_schema_takes_every_code_and_stays_open_to_newer_ones():
    for kind in EventType:
        for reason in (None, *Reason):
            protocol.validate(
                "events", {"id": "e", "ts": "2026-11-30T12:00:00Z", "type": kind, "reason": reason}
            )
    # A newer agent's code is stored and shown as is (docs/protocol.md), not refused.
    protocol.validate("events", {"id": "e", "ts": "2026-11-30T12:00:00Z", "type": "swap", "reason": "newer"})


def enums_of(schema, path=()):
    """(path, values) of every ``enum`` and ``const`` in a JSON schema."""
    if isinstance(schema, dict):
        if "enum" in schema:
            yield path, set(schema["enum"])
        if "const" in schema:
            yield path, {schema["const"]}
        for key, value in schema.items():
            yield from enums_of(value, (*path, key))
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            yield from enums_of(value, (*path, str(index)))


def test_every_code_the_schemas_enumerate_is_the_enums_whole_list():
    codes = {"type": set(EventType), "reason": set(Reason)}
    checked = []
    for kind, schema in SCHEMAS.items():
        for path, values in enums_of(schema):
            for field, members in codes.items():
                if path[-1:] == (field,) or values & members:
                    checked.append((kind, path))
                    assert values == members, f"{kind} {'/'.join(path)} lists {values}, the enum {members}"
    # Today the events schema leaves both open; the walk itself finds enums where they are.
    assert list(enums_of({"properties": {"reason": {"enum": ["x"]}}})) == [(("properties", "reason"), {"x"})]
    assert all(kind == "events" for kind, _ in checked)


@pytest.mark.parametrize("path", sorted(AGENT.rglob("*.py")), ids=lambda p: str(p.relative_to(AGENT)))
def test_the_agent_spells_no_reason_code_by_hand(path):
    name = str(path.relative_to(AGENT))
    if name == "protocol/codes.py":
        return
    spelled = {code for code in reason_literals(path.read_text()) if (name, code) not in NOT_REASONS}
    assert not spelled, f"agent/{name} spells {sorted(spelled)}: use agent.protocol.Reason"
    assert not re.search(r'_event\(\s*"', path.read_text()), f"agent/{name}: use agent.protocol.EventType"


def test_the_scan_finds_a_code_spelled_by_hand():
    source = 'raise Refusal("load_failed", f"{x} failed")\nlabel = "loaded"\n'
    assert reason_literals(source) == ["load_failed"]


def test_the_simulator_fails_with_a_protocol_reason_only():
    required = ["--url", "http://127.0.0.1:8000", "--root-key", "00" * 32]
    args = parser().parse_args([*required, "--fail-reason", "golden_failed"])
    assert args.fail_reason is Reason.GOLDEN_FAILED
    assert parser().parse_args(required).fail_reason is Reason.LOAD_FAILED
    with pytest.raises(SystemExit):
        parser().parse_args([*required, "--fail-reason", "exploded"])
