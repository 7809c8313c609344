"""Wire contract v1: DSSE envelopes, schemas and topics (agent/protocol)."""

import base64
import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol
from agent.protocol import (
    DESIRED_PAYLOAD_TYPE,
    MANIFEST_PAYLOAD_TYPE,
    EnvelopeMalformed,
    PayloadTypeMismatch,
    SchemaError,
    SignatureInvalid,
    Topics,
)

# Fixed test vector. The same vector lives in tests/server/test_signing.py so that
# both sides of the contract prove they agree on it.
VECTOR_SEED = bytes(range(32))
VECTOR_PUBLIC_HEX = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
VECTOR_KEYID = "56475aa75463474c0285df5dbf2bcab73da651358839e9b77481b2eab107708c"
VECTOR_PAYLOAD = b'{"hello":"world"}'
VECTOR_SIG_B64 = "XzpDFeRqCQgov9pX2eXNQvjfMI6sbffGUidax5m5ORJLVTKtusbcMg/sRr2ZmNwVMaaMm0ybuz54zAuqU/2jCQ=="


# --- An independent from-spec implementation: RFC 8032 section 6 reference Ed25519 and
# --- DSSE's PAE written from the DSSE spec. It shares no code with agent.protocol.
_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_I = pow(2, (_P - 1) // 4, _P)


def _xrecover(y):
    xx = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    x = pow(xx, (_P + 3) // 8, _P)
    if (x * x - xx) % _P != 0:
        x = (x * _I) % _P
    if x % 2 != 0:
        x = _P - x
    return x


_BY = 4 * pow(5, _P - 2, _P) % _P
_B = (_xrecover(_BY), _BY, 1, _xrecover(_BY) * _BY % _P)


def _add(p, q):
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _mul(s, p):
    q = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            q = _add(q, p)
        p = _add(p, p)
        s >>= 1
    return q


def _compress(p):
    zinv = pow(p[2], _P - 2, _P)
    x, y = p[0] * zinv % _P, p[1] * zinv % _P
    return int.to_bytes(y | ((x & 1) << 255), 32, "little")


def _reference_sign(seed: bytes, message: bytes) -> tuple[bytes, bytes]:
    h = hashlib.sha512(seed).digest()
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    public = _compress(_mul(a, _B))
    r = int.from_bytes(hashlib.sha512(h[32:] + message).digest(), "little") % _L
    big_r = _compress(_mul(r, _B))
    k = int.from_bytes(hashlib.sha512(big_r + public + message).digest(), "little") % _L
    s = (r + k * a) % _L
    return public, big_r + int.to_bytes(s, 32, "little")


def _reference_envelope(seed: bytes, payload_type: str, payload: bytes) -> str:
    pae = b" ".join(
        [
            b"DSSEv1",
            str(len(payload_type.encode())).encode(),
            payload_type.encode(),
            str(len(payload)).encode(),
            payload,
        ]
    )
    public, sig = _reference_sign(seed, pae)
    return json.dumps(
        {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": payload_type,
            "signatures": [
                {"sig": base64.b64encode(sig).decode(), "keyid": hashlib.sha256(public).hexdigest()}
            ],
        },
        indent=2,
    )


# --- tests


@pytest.fixture
def vector_key():
    return Ed25519PrivateKey.from_private_bytes(VECTOR_SEED)


@pytest.fixture
def keys(vector_key):
    return protocol.trusted_keys([VECTOR_PUBLIC_HEX])


def test_pae_matches_the_dsse_spec_example():
    # Example from the DSSE protocol document.
    assert protocol.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters():
    assert protocol.pae("t/é", "ü".encode()) == "DSSEv1 4 t/é 2 ü".encode()


def test_the_fixed_vector_signs_to_the_expected_signature(vector_key):
    envelope = protocol.sign(VECTOR_PAYLOAD, payload_type=MANIFEST_PAYLOAD_TYPE, private_key=vector_key)
    assert envelope["signatures"] == [{"keyid": VECTOR_KEYID, "sig": VECTOR_SIG_B64}]
    assert protocol.public_key_bytes(vector_key.public_key()).hex() == VECTOR_PUBLIC_HEX


def test_the_reference_implementation_agrees_on_the_fixed_vector():
    envelope = json.loads(_reference_envelope(VECTOR_SEED, MANIFEST_PAYLOAD_TYPE, VECTOR_PAYLOAD))
    assert envelope["signatures"][0] == {"sig": VECTOR_SIG_B64, "keyid": VECTOR_KEYID}


def test_it_verifies_an_envelope_from_an_independent_implementation(keys):
    payload = json.dumps({"schema": 1, "note": "signed elsewhere ✓"}).encode()
    serialized = _reference_envelope(VECTOR_SEED, DESIRED_PAYLOAD_TYPE, payload)
    assert protocol.verify(serialized, payload_type=DESIRED_PAYLOAD_TYPE, keys=keys) == payload


def test_it_refuses_a_tampered_payload(vector_key, keys):
    envelope = protocol.sign(b'{"a":1}', payload_type=MANIFEST_PAYLOAD_TYPE, private_key=vector_key)
    envelope["payload"] = base64.b64encode(b'{"a":2}').decode()
    with pytest.raises(SignatureInvalid):
        protocol.verify(envelope, payload_type=MANIFEST_PAYLOAD_TYPE, keys=keys)


def test_it_refuses_a_signature_by_an_untrusted_key(keys):
    stranger = Ed25519PrivateKey.generate()
    envelope = protocol.sign(b"{}", payload_type=MANIFEST_PAYLOAD_TYPE, private_key=stranger)
    with pytest.raises(SignatureInvalid):
        protocol.verify(envelope, payload_type=MANIFEST_PAYLOAD_TYPE, keys=keys)


def test_it_refuses_a_stranger_claiming_a_trusted_keyid(keys):
    stranger = Ed25519PrivateKey.generate()
    envelope = protocol.sign(b"{}", payload_type=MANIFEST_PAYLOAD_TYPE, private_key=stranger)
    envelope["signatures"][0]["keyid"] = VECTOR_KEYID
    with pytest.raises(SignatureInvalid):
        protocol.verify(envelope, payload_type=MANIFEST_PAYLOAD_TYPE, keys=keys)


def test_it_refuses_a_valid_envelope_of_another_payload_type(vector_key, keys):
    envelope = protocol.sign(b"{}", payload_type=MANIFEST_PAYLOAD_TYPE, private_key=vector_key)
    with pytest.raises(PayloadTypeMismatch) as excinfo:
        protocol.verify(envelope, payload_type=DESIRED_PAYLOAD_TYPE, keys=keys)
    assert excinfo.value.reason == "payload_type"


def test_the_signature_does_not_cover_the_type_loosely(vector_key, keys):
    # Relabelling the type changes PAE, so the old signature cannot verify.
    envelope = protocol.sign(b"{}", payload_type=MANIFEST_PAYLOAD_TYPE, private_key=vector_key)
    envelope["payloadType"] = DESIRED_PAYLOAD_TYPE
    with pytest.raises(SignatureInvalid):
        protocol.verify(envelope, payload_type=DESIRED_PAYLOAD_TYPE, keys=keys)


@pytest.mark.parametrize(
    "garbage",
    [b"not json", b"[]", b'{"payloadType": "x"}', b'{"signatures": [], "payload": ""}'],
)
def test_it_refuses_malformed_envelopes(garbage, keys):
    with pytest.raises(EnvelopeMalformed):
        protocol.verify(garbage, payload_type=MANIFEST_PAYLOAD_TYPE, keys=keys)


def test_bad_base64_is_malformed(vector_key, keys):
    envelope = protocol.sign(b"{}", payload_type=MANIFEST_PAYLOAD_TYPE, private_key=vector_key)
    envelope["payload"] = "***"
    with pytest.raises(EnvelopeMalformed):
        protocol.verify(envelope, payload_type=MANIFEST_PAYLOAD_TYPE, keys=keys)


def _manifest(**overrides):
    manifest = {
        "schema": 1,
        "model": "digits",
        "version": "1.4.0",
        "variant": "int8",
        "created_at": "2026-11-28T07:00:00Z",
        "raw": {"sha256": "a" * 64, "size": 10, "format": "tflite"},
        "blob": {"sha256": "b" * 64, "size": 5, "compression": "zstd"},
        "tflite": {
            "inputs": [{"name": "x", "shape": [1, 64], "dtype": "float32"}],
            "outputs": [{"name": "probs", "shape": [1, 10], "dtype": "float32"}],
            "ops": ["FULLY_CONNECTED"],
            "quantization": "int8",
        },
        "requires": {"hardware": ["any"], "runtime": ["litert>=1.0"]},
        "labels": ["0", "1"],
    }
    manifest.update(overrides)
    return manifest


def test_the_contract_manifest_example_validates():
    assert protocol.validate("manifest", _manifest())["variant"] == "int8"


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ({"version": "1.4"}, "version"),
        ({"schema": 2}, "schema"),
        ({"raw": {"sha256": "xyz", "size": 1, "format": "tflite"}}, "raw/sha256"),
        ({"model": "Bad Name"}, "model"),
    ],
)
def test_a_manifest_that_breaks_the_contract_names_the_field(override, path):
    with pytest.raises(SchemaError) as excinfo:
        protocol.validate("manifest", _manifest(**override))
    assert excinfo.value.path == path


def test_parse_refuses_bytes_that_are_not_json():
    with pytest.raises(SchemaError):
        protocol.parse("status", b"\xff\xfe")


def test_desired_state_example_validates():
    desired = {
        "schema": 1,
        "device_id": "cam-0042",
        "generation": 17,
        "issued_at": "2026-11-28T07:00:00Z",
        "expires_at": "2026-11-29T07:00:00Z",
        "models": {
            "digits": {
                "version": "1.4.0",
                "variant": "int8",
                "manifest_url": "https://x/manifest",
                "blob_url": "https://x/blob",
                "manifest_sha256": "c" * 64,
            }
        },
        "rollout": {"id": 12, "stage": 1},
    }
    assert protocol.validate("desired", desired)["generation"] == 17
    desired["generation"] = 0
    with pytest.raises(SchemaError):
        protocol.validate("desired", desired)


@pytest.mark.parametrize("good", ["1.0.0", "0.0.1-alpha.1", "10.2.3+build.7", "1.0.0-rc.1+x"])
def test_semver_accepts(good):
    assert protocol.is_semver(good)


@pytest.mark.parametrize("bad", ["1.0", "01.0.0", "v1.0.0", "1.0.0-", "1.0.0 "])
def test_semver_refuses(bad):
    assert not protocol.is_semver(bad)


def test_topics_follow_the_contract():
    topics = Topics()
    assert topics.desired("cam-0042") == "fleet/v1/devices/cam-0042/desired"
    assert topics.device("cam-0042", "telemetry") == "fleet/v1/devices/cam-0042/telemetry"
    assert topics.shared("telemetry") == "$share/fleet-ingest/fleet/v1/devices/+/telemetry"
    assert topics.parse("fleet/v1/devices/cam-0042/events") == ("cam-0042", "events")


@pytest.mark.parametrize("bad", ["a/b", "+", "#", ""])
def test_topics_refuse_device_ids_that_would_escape(bad):
    with pytest.raises(ValueError):
        Topics().desired(bad)


def test_topics_parse_refuses_foreign_topics():
    with pytest.raises(ValueError):
        Topics().parse("fleet/v1/devices/a/b/telemetry")
    with pytest.raises(ValueError):
        Topics(prefix="other").parse("fleet/v1/devices/a/telemetry")
