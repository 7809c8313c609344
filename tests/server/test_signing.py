"""The registry's Ed25519 signing key: where it comes from, how it rotates, what the
signing-keys endpoint shows, and the wire-contract test vector signed on the server side."""

import base64
import hashlib
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.core.exceptions import ImproperlyConfigured

from agent import protocol
from agent.protocol import MANIFEST_PAYLOAD_TYPE
from fleet.registry import signing
from fleet.registry.choices import SigningKeyStatus
from fleet.registry.models import SigningKey
from tests.server.conftest import ready_artifact

pytestmark = pytest.mark.django_db

# The same fixed vector as tests/agent/test_protocol.py: both sides must agree on it.
VECTOR_SEED = bytes(range(32))
VECTOR_PUBLIC_HEX = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
VECTOR_KEYID = "56475aa75463474c0285df5dbf2bcab73da651358839e9b77481b2eab107708c"
VECTOR_PAYLOAD = b'{"hello":"world"}'
VECTOR_SIG_B64 = "XzpDFeRqCQgov9pX2eXNQvjfMI6sbffGUidax5m5ORJLVTKtusbcMg/sRr2ZmNwVMaaMm0ybuz54zAuqU/2jCQ=="


def pem(private_key) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def raw_private_hex(private_key: Ed25519PrivateKey) -> str:
    return private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    ).hex()


def test_it_generates_a_missing_dev_key_with_mode_0600(key_file):
    assert not key_file.exists()
    key = signing.load_private_key()
    assert isinstance(key, Ed25519PrivateKey)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # A second start uses the same key, it does not generate another one.
    again = signing.load_private_key()
    assert protocol.public_key_bytes(again.public_key()) == protocol.public_key_bytes(key.public_key())


def test_without_autogenerate_a_missing_key_file_is_a_configuration_error(key_file, settings):
    settings.SIGNING_KEY_AUTOGENERATE = False
    with pytest.raises(ImproperlyConfigured, match="SIGNING_KEY_FILE"):
        signing.load_private_key()
    assert not key_file.exists()


def test_it_refuses_a_key_file_that_is_not_ed25519(key_file):
    key_file.parent.mkdir(parents=True)
    key_file.write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(ImproperlyConfigured, match=r"SIGNING_KEY_FILE.*not an Ed25519 key"):
        signing.signing_key_active()
    assert not SigningKey.objects.exists()


def test_it_refuses_a_key_file_that_is_not_pem(key_file):
    key_file.parent.mkdir(parents=True)
    key_file.write_bytes(b"not a key\n")
    with pytest.raises(ImproperlyConfigured, match="SIGNING_KEY_FILE"):
        signing.load_private_key()


def test_it_registers_the_public_half_with_keyid_the_sha256_of_the_raw_key(key_file):
    row, private_key = signing.signing_key_active()
    raw_public = protocol.public_key_bytes(private_key.public_key())
    assert row.public_key == raw_public.hex()
    assert row.keyid == hashlib.sha256(raw_public).hexdigest()
    assert row.status == SigningKeyStatus.ACTIVE
    assert signing.signing_key_active()[0].pk == row.pk


def test_replacing_the_key_file_rotates_and_keeps_the_old_key_listed(key_file, bob):
    old_row, _ = signing.signing_key_active()
    new_key = Ed25519PrivateKey.generate()
    key_file.write_bytes(pem(new_key))

    new_row, active = signing.signing_key_active()

    assert new_row.keyid == protocol.keyid_for(new_key.public_key()) != old_row.keyid
    assert raw_private_hex(active) == raw_private_hex(new_key)
    old_row.refresh_from_db()
    assert old_row.status == SigningKeyStatus.RETIRED
    assert old_row.retired_at is not None
    listed = {key["keyid"]: key for key in bob.client().get("/api/v1/signing-keys/").json()["results"]}
    assert listed[new_row.keyid]["status"] == "active"
    assert listed[new_row.keyid]["retired_at"] is None
    assert listed[old_row.keyid]["status"] == "retired"
    assert listed[old_row.keyid]["retired_at"] is not None
    for key in listed.values():
        assert key["keyid"] == hashlib.sha256(bytes.fromhex(key["public_key"])).hexdigest()


def test_a_manifest_signed_before_rotation_still_verifies_with_the_listed_keys(
    key_file, bob, version_v1, digits
):
    models = digits.build_digits_models()
    before = ready_artifact(version_v1, "float32", models["float32"])
    key_file.write_bytes(pem(Ed25519PrivateKey.generate()))
    after = ready_artifact(version_v1, "int8", models["int8"])
    assert before.signing_key_id != after.signing_key_id

    keys = protocol.trusted_keys(
        [key["public_key"] for key in bob.client().get("/api/v1/signing-keys/").json()["results"]]
    )
    for artifact in (before, after):
        envelope = bob.client().get(f"/api/v1/artifacts/{artifact.pk}/manifest").content
        payload = protocol.verify(envelope, payload_type=MANIFEST_PAYLOAD_TYPE, keys=keys)
        assert hashlib.sha256(payload).hexdigest() == artifact.manifest_sha256


def test_the_signing_keys_endpoint_shows_public_material_only(key_file, bob):
    _, private_key = signing.signing_key_active()
    response = bob.client().get("/api/v1/signing-keys/")
    assert response.status_code == 200
    keys = response.json()["results"]
    assert len(keys) >= 1
    for key in keys:
        assert set(key) == {"keyid", "public_key", "status", "created_at", "retired_at"}
        assert len(key["public_key"]) == 64
        assert int(key["public_key"], 16) >= 0
    secret_hex = raw_private_hex(private_key)
    secret_raw = bytes.fromhex(secret_hex)
    content = response.content.decode()
    assert secret_hex not in content.lower()
    assert base64.b64encode(secret_raw).decode() not in content
    assert "PRIVATE" not in content
    assert pem(private_key).decode().splitlines()[1] not in content


def test_charlie_without_a_role_cannot_list_signing_keys(charlie, anonymous):
    assert charlie.client().get("/api/v1/signing-keys/").status_code == 403
    assert anonymous.get("/api/v1/signing-keys/").status_code == 401


def test_the_server_signing_path_produces_the_contract_test_vector(key_file):
    key_file.parent.mkdir(parents=True)
    key_file.write_bytes(pem(Ed25519PrivateKey.from_private_bytes(VECTOR_SEED)))

    row, private_key = signing.signing_key_active()
    envelope = protocol.sign(VECTOR_PAYLOAD, payload_type=MANIFEST_PAYLOAD_TYPE, private_key=private_key)

    assert (row.keyid, row.public_key) == (VECTOR_KEYID, VECTOR_PUBLIC_HEX)
    assert envelope["signatures"] == [{"keyid": VECTOR_KEYID, "sig": VECTOR_SIG_B64}]
    assert envelope["payload"] == base64.b64encode(VECTOR_PAYLOAD).decode()
    keys = protocol.trusted_keys([VECTOR_PUBLIC_HEX])
    assert protocol.verify(envelope, payload_type=MANIFEST_PAYLOAD_TYPE, keys=keys) == VECTOR_PAYLOAD
