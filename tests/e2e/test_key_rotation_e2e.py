"""Signing keys rotate and are revoked over the air (issue 9, section 2), with real parts:
agents enrolled through the API that pin only the root key, the control plane's uploads and
re-signing, the retained trust topic on the project's Mosquitto, the ingest bridge.

Two rotations run while one device is switched off; the second also moves the root to a
new key. The online devices follow each step; a desired state signed by a revoked key is
refused; the device that was off catches up from the retained bundle alone; nobody's
config changes."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol
from agent.core import Agent
from agent.trustctl import load_key_file, make_root
from fleet.core.errors import InvalidInput
from fleet.devices.desired import desired_state_envelope
from fleet.devices.models import Device, DeviceEvent
from fleet.mqtt.publisher import publish_desired
from fleet.registry import trust
from fleet.registry.choices import SigningKeyStatus
from fleet.registry.models import Artifact, SigningKey
from fleet.registry.signing import signing_key_active
from tests.conftest import wait_until
from tests.e2e.conftest import put_everywhere
from tests.server.test_signing import pem

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("broker_settings", "celery_worker_process"),
]


@pytest.fixture
def signing_key_file(settings):
    """The control plane's key file (the worker process reads the same path); put back as
    it was afterwards, so later tests sign with the key they expect."""
    path = settings.SIGNING_KEY_FILE
    before = path.read_bytes()
    yield path
    path.write_bytes(before)


def upload_keyring(root_keys, **draft_options) -> int:
    """What an operator does: draft here, sign offline, upload the signed file."""
    draft = trust.keyring_draft(**draft_options)
    signed = protocol.trust.sign_document(
        draft, payload_type=protocol.KEYRING_PAYLOAD_TYPE, private_keys=root_keys
    )
    return trust.trust_upload(envelope=signed, publish="now").version


def rotate_signing_key(signing_key_file, root_keys):
    """The documented procedure: add the new key, activate it and re-sign everything,
    then revoke the old key. Returns the old private key (to try it afterwards)."""
    old_row, old_private = signing_key_active()
    new_key = Ed25519PrivateKey.generate()
    upload_keyring(root_keys, add_public_keys=[protocol.public_key_bytes(new_key.public_key()).hex()])
    signing_key_file.write_bytes(pem(new_key))
    trust.signing_resign_all(publish="now")
    upload_keyring(root_keys, remove_keyids=[old_row.keyid])
    assert SigningKey.objects.get(keyid=old_row.keyid).status == SigningKeyStatus.REVOKED
    return old_private


def settled(ids, keyring_version: int) -> bool:
    """Every device reports that keyring and has applied its newest desired state."""
    rows = list(Device.objects.filter(device_id__in=ids))
    return len(rows) == len(ids) and all(
        d.keyring_version == keyring_version and d.applied_generation == d.desired_generation for d in rows
    )


def test_signing_keys_rotate_twice_and_a_device_that_was_off_catches_up(
    control_plane, agents, root_key_path, signing_key_file
):
    configs = {agent.config.device_id: agent.config for agent in agents}
    put_everywhere(agents, control_plane, "1.0.0")
    sleeper = agents.pop()  # stopped here, started again below: not the fixture's to stop
    sleeper.stop()
    awake = [agent.config.device_id for agent in agents[:-1]]
    first_root = [load_key_file(root_key_path)]

    # Rotation 1 (keyrings 2 and 3) while one device is off.
    revoked_private = rotate_signing_key(signing_key_file, first_root)
    wait_until(lambda: settled(awake, 3), timeout=60, message="the devices on keyring 3")

    # A desired state signed by the revoked key is refused by a running device.
    target = Device.objects.get(device_id=awake[0])
    artifact = Artifact.objects.get(pk=target.desired_artifacts["digits"])
    forged = desired_state_envelope(
        device_id=target.device_id,
        generation=target.desired_generation + 1,
        artifacts={"digits": artifact},
        private_key=revoked_private,
    )
    publish_desired([(target.device_id, forged)])
    wait_until(
        lambda: DeviceEvent.objects.filter(device=target, type="failed", reason="key_revoked").exists(),
        timeout=30,
        message="the key_revoked refusal",
    )
    target.refresh_from_db()
    assert target.applied_generation == target.desired_generation  # still the real one

    # Rotation 2 moves the root to a new key first (a chain step signed by both), then the
    # signing key again, with keyrings the new root signs (4 and 5).
    second_root = [Ed25519PrivateKey.generate()]
    trust.trust_upload(
        envelope=make_root(keys=second_root, version=2, previous_keys=first_root), publish="now"
    )
    rotate_signing_key(signing_key_file, second_root)
    wait_until(lambda: settled(awake, 5), timeout=60, message="the devices on keyring 5")
    assert all(d.root_version == 2 for d in Device.objects.filter(device_id__in=awake))

    # The device that was off comes back with the same config and state directory.
    back = Agent(sleeper.config)
    back.start()
    try:
        wait_until(lambda: settled([back.config.device_id], 5), timeout=60, message="the sleeper to catch up")
        assert back.trust.versions() == {"root_version": 2, "keyring_version": 5}
        assert back.models.live()["digits"].version == "1.0.0"
    finally:
        back.stop()
    assert all(agent.config == configs[agent.config.device_id] for agent in [*agents, back])
    # The first root key has lost its power: a keyring it signs is refused.
    with pytest.raises(InvalidInput) as excinfo:
        upload_keyring(first_root)
    assert excinfo.value.code == "signature_invalid"
