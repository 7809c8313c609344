"""The contract's small schema validator agrees with the jsonschema package (a dev-only
dependency) on every message kind, valid and broken in hundreds of ways; beyond JSON
Schema, it refuses a shadow window whose counters contradict each other (addition 5)."""

import copy

import pytest
from jsonschema import Draft202012Validator

from agent import protocol
from agent.protocol.schemas import SCHEMAS

SHA = "a" * 64
EXAMPLES = {
    "manifest": {
        "schema": 1,
        "model": "digits",
        "version": "1.4.0",
        "variant": "int8",
        "created_at": "2026-11-28T07:00:00Z",
        "raw": {"sha256": SHA, "size": 10, "format": "tflite"},
        "blob": {"sha256": SHA, "size": 5, "compression": "zstd"},
        "tflite": {
            "inputs": [{"name": "x", "shape": [1, 64], "dtype": "float32"}],
            "outputs": [{"name": "probs", "shape": [1, 10], "dtype": "float32"}],
            "ops": ["FULLY_CONNECTED"],
            "quantization": "int8",
        },
        "requires": {"hardware": ["any"], "runtime": ["litert>=1.0"]},
        "labels": ["0", "1"],
        "golden": {"sha256": SHA, "size": 100, "samples": 10, "accuracy": 0.9},
    },
    "desired": {
        "schema": 1,
        "device_id": "cam-0042",
        "generation": 17,
        "issued_at": "2026-11-28T07:00:00Z",
        "expires_at": "2026-11-29T07:00:00Z",
        "models": {
            "digits": {
                "version": "1.4.0",
                "variant": "int8",
                "manifest_url": "https://x/m",
                "blob_url": "https://x/b",
                "manifest_sha256": SHA,
                "golden_url": None,
                "shadow": {
                    "version": "1.5.0",
                    "variant": "int8",
                    "manifest_url": "https://x/m2",
                    "blob_url": "https://x/b2",
                    "golden_url": "https://x/g2",
                    "manifest_sha256": SHA,
                    "sample_rate": 0.25,
                },
                "delta": {
                    "base_version": "1.3.0",
                    "base_variant": "int8",
                    "manifest_url": "https://x/dm",
                    "blob_url": "https://x/db",
                    "manifest_sha256": SHA,
                    "size": 321,
                },
            }
        },
        "rollout": {"id": 12, "stage": 1},
    },
    "delta_manifest": {
        "schema": 1,
        "model": "digits",
        "version": "1.4.0",
        "variant": "int8",
        "created_at": "2026-11-28T07:00:00Z",
        "base": {"version": "1.3.0", "variant": "int8", "raw": {"sha256": SHA, "size": 4000}},
        "target": {"raw": {"sha256": SHA, "size": 4192}},
        "delta": {"sha256": SHA, "size": 321, "format": "mfdelta"},
    },
    "status": {
        "online": True,
        "agent_version": "0.1.0",
        "ts": "2026-11-28T07:00:00Z",
        "capabilities": {
            "hardware": "rpi4",
            "runtime": "ai_edge_litert",
            "runtime_version": "2.3.0",
            "int8": True,
            "unsupported_ops": ["GELU"],
        },
    },
    "root": {
        "schema": 1,
        "version": 2,
        "expires_at": "2036-11-28T07:00:00Z",
        "threshold": 1,
        "keys": [{"keyid": SHA, "public_key": "b" * 64}],
    },
    "keyring": {
        "schema": 1,
        "version": 7,
        "expires_at": "2027-11-28T07:00:00Z",
        "keys": [
            {"keyid": SHA, "public_key": "b" * 64, "expires_at": None},
            {"keyid": "c" * 64, "public_key": "d" * 64, "expires_at": "2027-06-01T00:00:00Z"},
        ],
        "revoked": ["e" * 64],
    },
    "reported": {
        "generation": 3,
        "ts": "t",
        "models": {
            "digits": {
                "version": "1.0.0",
                "variant": "int8",
                "shadow": {"version": "1.1.0", "variant": "int8"},
            }
        },
        "trust": {"root_version": 2, "keyring_version": 7},
    },
    "events": {
        "id": "e1",
        "ts": "t",
        "type": "failed",
        "generation": 2,
        "model": "digits",
        "version": "1.0.0",
        "variant": "int8",
        "reason": "hash_mismatch",
        "message": "boom",
        "delivery": {"path": "full", "bytes": 3044, "fallback": "base_missing"},
    },
    "telemetry": {
        "id": "t1",
        "ts": "t",
        "window_s": 30,
        "dropped": 0,
        "models": {
            "digits": {
                "version": "1.0.0",
                "variant": "int8",
                "inferences": 10,
                "errors": 0,
                "latency_ms": {"p50": 0.4, "p95": 0.9, "p99": 1.3},
                "feedback": {"labeled": 5, "correct": 4},
                "shadow": {
                    "version": "1.1.0",
                    "variant": "int8",
                    "sampled": 9,
                    "compared": 6,
                    "agreed": 5,
                    "errors": 1,
                    "skipped": 2,
                    "mean_abs_diff": 0.01,
                    "latency_ms": {"p50": 0.5, "p95": 1.0, "p99": 1.5},
                },
            }
        },
        "health": {"cpu_pct": 1.0},
    },
}
REPLACEMENTS = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    2,
    "",
    "x",
    "Bad Name",
    "1.0",
    SHA,
    [],
    ["x"],
    [1],
    {},
    {"a": 1},
    "x" * 3000,
]


def paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, (*prefix, index))


def mutations(document):
    for path in paths(document):
        if not path:
            continue
        for replacement in [*REPLACEMENTS, "<delete>"]:
            mutated = copy.deepcopy(document)
            parent = mutated
            for step in path[:-1]:
                parent = parent[step]
            if replacement == "<delete>":
                if isinstance(parent, dict):
                    del parent[path[-1]]
                else:
                    parent.pop(path[-1])
            else:
                parent[path[-1]] = replacement
            yield path, replacement, mutated
        if isinstance(document, dict):
            extra = copy.deepcopy(document)
            extra["unexpected"] = 1
            yield ("unexpected",), 1, extra


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_the_examples_are_valid(kind):
    assert protocol.validate(kind, EXAMPLES[kind]) is EXAMPLES[kind]


def shadow_counters_consistent(document) -> bool:
    """Addition 5's invariants, written out again here (not imported) as the reference."""
    for entry in document.get("models", {}).values():
        shadow = entry.get("shadow") if isinstance(entry, dict) else None
        if isinstance(shadow, dict):
            count = {key: shadow.get(key) for key in ("sampled", "compared", "agreed", "errors", "skipped")}
            if all(isinstance(v, int) for v in count.values()) and not (
                count["agreed"] <= count["compared"] <= count["sampled"]
                and count["errors"] <= count["sampled"]
                and count["skipped"] <= count["sampled"]
            ):
                return False
    return True


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_it_agrees_with_jsonschema_on_every_mutation(kind):
    reference = Draft202012Validator(SCHEMAS[kind])
    checked = refused = 0
    for path, replacement, document in mutations(EXAMPLES[kind]):
        expected = reference.is_valid(document) and (
            kind != "telemetry" or shadow_counters_consistent(document)
        )
        try:
            protocol.validate(kind, document)
            ours = True
        except protocol.SchemaError:
            ours = False
        assert ours == expected, (path, replacement)
        checked += 1
        refused += not ours
    assert checked > 50 and refused > 20  # the mutations really probe the schema


def test_the_error_names_the_path():
    document = copy.deepcopy(EXAMPLES["telemetry"])
    document["models"]["digits"]["feedback"]["labeled"] = -1
    with pytest.raises(protocol.SchemaError) as excinfo:
        protocol.validate("telemetry", document)
    assert excinfo.value.path == "models/digits/feedback/labeled"


# --- addition 5: shadow


def shadow_window(**counters):
    document = copy.deepcopy(EXAMPLES["telemetry"])
    document["models"]["digits"]["shadow"].update(counters)
    return document


@pytest.mark.parametrize(
    ("counters", "path"),
    [
        ({"agreed": 7, "compared": 6}, "models/digits/shadow/agreed"),
        ({"compared": 10, "sampled": 9, "agreed": 0}, "models/digits/shadow/compared"),
        ({"errors": 10}, "models/digits/shadow/errors"),
        ({"skipped": 10}, "models/digits/shadow/skipped"),
    ],
)
def test_a_shadow_window_whose_counters_contradict_each_other_is_refused(counters, path):
    with pytest.raises(protocol.InvariantError) as excinfo:
        protocol.validate("telemetry", shadow_window(**counters))
    assert excinfo.value.path == path
    assert isinstance(excinfo.value, protocol.SchemaError)  # consumers that catch only that still refuse it


def test_a_shadow_window_at_the_edges_of_its_invariants_is_valid():
    """The positive control: equal counters are allowed, and a window without comparisons
    carries no difference and no latency."""
    protocol.validate("telemetry", shadow_window(sampled=6, compared=6, agreed=6, errors=0, skipped=0))
    empty = shadow_window(sampled=3, compared=0, agreed=0, errors=1, skipped=2, mean_abs_diff=None)
    del empty["models"]["digits"]["shadow"]["latency_ms"]
    protocol.validate("telemetry", empty)


@pytest.mark.parametrize("rate", [0, -0.1, 1.01, "0.5", None])
def test_a_desired_shadow_needs_a_sample_rate_in_0_to_1(rate):
    document = copy.deepcopy(EXAMPLES["desired"])
    document["models"]["digits"]["shadow"]["sample_rate"] = rate
    with pytest.raises(protocol.SchemaError) as excinfo:
        protocol.validate("desired", document)
    assert excinfo.value.path == "models/digits/shadow/sample_rate"


def test_a_desired_state_without_a_shadow_or_with_a_null_one_is_valid():
    document = copy.deepcopy(EXAMPLES["desired"])
    document["models"]["digits"]["shadow"] = None
    protocol.validate("desired", document)
    del document["models"]["digits"]["shadow"]
    protocol.validate("desired", document)
    document["models"]["digits"]["shadow"] = {"version": "1.5.0", "variant": "int8"}  # no URLs, no rate
    with pytest.raises(protocol.SchemaError):
        protocol.validate("desired", document)


@pytest.mark.parametrize(
    ("capabilities", "valid"),
    [
        ({}, True),
        ({"runtime_version": "2.18.0rc1"}, True),
        ({"hardware": "jetson-nano"}, True),
        ({"hardware": "rpi 4"}, False),
        ({"hardware": "-rpi4"}, False),
        ({"runtime_version": "latest"}, False),
        ({"unsupported_ops": ["GELU"] * 501}, False),
        ({"int8": "yes"}, False),
    ],
)
def test_a_status_says_what_the_device_can_run_within_the_rules_of_addition_10(capabilities, valid):
    status = {"online": True, "capabilities": capabilities}
    if valid:
        assert protocol.validate("status", status) is status
    else:
        with pytest.raises(protocol.SchemaError):
            protocol.validate("status", status)
    # Older agents send none at all.
    assert protocol.validate("status", {"online": True})
