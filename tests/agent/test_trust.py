"""The root of trust and the keyring (docs/protocol.md, addition 6; issue 9, section 2).

The first half attacks the trust rules with real Ed25519 keys and the agent's own trust
store (state files on disk); the second runs real agents on the project's Mosquitto, which
learn their keyring from the retained trust topic and rotate signing keys without any
change to their config."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol
from agent.protocol import trust
from agent.trust import TRUST_FILE, TrustStore
from agent.trustctl import make_keyring, make_root
from tests.agent.conftest import (
    desired_envelope,
    publish_artifact,
    publish_desired,
    publish_trust,
    trust_bundle_bytes,
)


def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def hex_of(private_key) -> str:
    return protocol.public_key_bytes(private_key.public_key()).hex()


def signed_desired(private_key) -> bytes:
    return desired_envelope(private_key, "cam-1", 1, {})


class Fleet:
    """An operator's offline root keys and the documents they sign."""

    def __init__(self) -> None:
        self.root_keys = [key()]
        self.roots = [make_root(keys=self.root_keys)]

    def rotate_root(self, new_keys=None, *, threshold: int = 1) -> list:
        new_keys = new_keys or [key()]
        self.roots.append(
            make_root(
                keys=new_keys, threshold=threshold, version=len(self.roots) + 1, previous_keys=self.root_keys
            )
        )
        self.root_keys = new_keys
        return new_keys

    def keyring(self, version: int, signing_keys, *, revoked=(), signers=None, expires_at=None) -> bytes:
        return make_keyring(
            root_keys=signers or self.root_keys,
            version=version,
            signing_keys=[k.public_key() for k in signing_keys],
            revoked=[protocol.keyid_for(k.public_key()) for k in revoked],
            expires_at=expires_at,
        )

    def bundle(self, keyring: bytes | None) -> bytes:
        return trust_bundle_bytes(roots=self.roots, keyring=keyring)


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


@pytest.fixture
def device(fleet, tmp_path):
    """A device's trust store pinning the fleet's first root key."""

    pinned = hex_of(fleet.root_keys[0])  # flashed once; later root steps come over the air

    def make() -> TrustStore:
        return TrustStore(root_keys=(pinned,), root_threshold=1, state_dir=tmp_path)

    return make


def refused(store: TrustStore, bundle: bytes, reason: str) -> None:
    before = store.versions()
    with pytest.raises(protocol.EnvelopeError) as excinfo:
        store.update(bundle)
    assert excinfo.value.reason == reason, excinfo.value
    assert store.versions() == before  # a refused bundle changes nothing


def test_a_keyring_signed_by_the_root_is_trusted_and_its_keys_verify(fleet, device):
    signer = key()
    store = device()
    assert store.update(fleet.bundle(fleet.keyring(1, [signer])))
    assert store.versions() == {"root_version": 1, "keyring_version": 1}
    payload = store.verify(signed_desired(signer), payload_type=protocol.DESIRED_PAYLOAD_TYPE)
    assert json.loads(payload)["device_id"] == "cam-1"


def test_a_keyring_signed_by_a_key_that_is_not_the_root_is_refused(fleet, device):
    store = device()
    store.update(fleet.bundle(fleet.keyring(1, [key()])))  # positive control: root-signed
    impostor = key()
    forged = fleet.keyring(2, [impostor], signers=[impostor])
    refused(store, fleet.bundle(forged), "signature_invalid")
    with pytest.raises(protocol.SignatureInvalid):
        store.verify(signed_desired(impostor), payload_type=protocol.DESIRED_PAYLOAD_TYPE)


def test_a_root_not_signed_by_the_pinned_keys_gives_no_keyring(fleet, tmp_path):
    # A device pinning another fleet's root ignores this fleet's roots altogether.
    store = TrustStore(root_keys=(hex_of(key()),), root_threshold=1, state_dir=tmp_path)
    refused(store, fleet.bundle(fleet.keyring(1, [key()])), "signature_invalid")
    assert store.versions() == {"root_version": None, "keyring_version": None}


def test_an_old_keyring_replayed_is_refused_even_after_a_restart(fleet, device):
    old_signer, new_signer = key(), key()
    keyring_1 = fleet.keyring(1, [old_signer])
    keyring_2 = fleet.keyring(2, [new_signer])
    store = device()
    store.update(fleet.bundle(keyring_1))
    store.update(fleet.bundle(keyring_2))
    refused(store, fleet.bundle(keyring_1), "keyring_rollback")

    restarted = device()  # the state file keeps the version across a restart
    assert restarted.versions() == {"root_version": 1, "keyring_version": 2}
    refused(restarted, fleet.bundle(keyring_1), "keyring_rollback")
    # The same keyring again (the retained copy on every reconnect) is no change, no error.
    assert restarted.update(fleet.bundle(keyring_2)) is False


def test_a_different_keyring_with_the_same_version_is_refused(fleet, device):
    store = device()
    store.update(fleet.bundle(fleet.keyring(3, [key()])))
    refused(store, fleet.bundle(fleet.keyring(3, [key()])), "keyring_rollback")


def test_a_key_removed_from_the_keyring_is_refused_as_revoked(fleet, device):
    leaked, fresh = key(), key()
    store = device()
    store.update(fleet.bundle(fleet.keyring(1, [leaked, fresh])))
    assert store.verify(signed_desired(leaked), payload_type=protocol.DESIRED_PAYLOAD_TYPE)  # control

    store.update(fleet.bundle(fleet.keyring(2, [fresh], revoked=[leaked])))
    with pytest.raises(trust.KeyRevoked) as excinfo:
        store.verify(signed_desired(leaked), payload_type=protocol.DESIRED_PAYLOAD_TYPE)
    assert excinfo.value.reason == "key_revoked"
    assert store.verify(signed_desired(fresh), payload_type=protocol.DESIRED_PAYLOAD_TYPE)

    # Dropped without being listed as revoked: still refused as revoked, after a restart too.
    store.update(fleet.bundle(fleet.keyring(3, [key()])))
    with pytest.raises(trust.KeyRevoked):
        device().verify(signed_desired(fresh), payload_type=protocol.DESIRED_PAYLOAD_TYPE)


def test_an_expired_keyring_is_refused_and_an_expired_key_stops_verifying(fleet, device):
    store = device()
    signer = key()
    past = datetime.now(UTC) - timedelta(minutes=1)
    refused(store, fleet.bundle(fleet.keyring(1, [signer], expires_at=past)), "keyring_expired")

    payload = trust.build_keyring(
        version=1, expires_at=datetime.now(UTC) + timedelta(days=1), keys=[(signer.public_key(), past)]
    )
    keyring = trust.sign_document(
        payload, payload_type=protocol.KEYRING_PAYLOAD_TYPE, private_keys=fleet.root_keys
    )
    store.update(fleet.bundle(keyring))
    with pytest.raises(trust.KeyExpired):
        store.verify(signed_desired(signer), payload_type=protocol.DESIRED_PAYLOAD_TYPE)


def test_the_root_rotates_across_two_steps_and_old_root_keys_lose_their_power(fleet, device):
    first_root = fleet.root_keys
    store = device()
    store.update(fleet.bundle(fleet.keyring(1, [key()])))
    second_root = fleet.rotate_root()
    store.update(fleet.bundle(fleet.keyring(2, [key()])))
    fleet.rotate_root([key(), key(), key()], threshold=2)
    signer = key()
    store.update(fleet.bundle(fleet.keyring(3, [signer])))
    assert store.versions() == {"root_version": 3, "keyring_version": 3}
    assert store.verify(signed_desired(signer), payload_type=protocol.DESIRED_PAYLOAD_TYPE)

    # Neither an earlier root's keys nor one key of a 2-of-3 root can sign a keyring now.
    for signers in (first_root, second_root, fleet.root_keys[:1]):
        refused(store, fleet.bundle(fleet.keyring(4, [key()], signers=signers)), "signature_invalid")
    store.update(fleet.bundle(fleet.keyring(4, [key()], signers=fleet.root_keys[1:])))  # two of three
    assert store.versions()["keyring_version"] == 4


def test_a_root_step_needs_both_the_old_and_the_new_keys(fleet, device):
    store = device()
    store.update(fleet.bundle(fleet.keyring(1, [key()])))
    newcomer = key()
    # Signed by the new key alone: whoever stole a key cannot start a chain of their own.
    alone = make_root(keys=[newcomer], version=2)
    refused(store, trust_bundle_bytes(roots=[*fleet.roots, alone], keyring=None), "signature_invalid")
    # Signed by the old key alone, not by the key it names: proves nobody holds that key.
    payload = trust.build_root(
        version=2,
        public_keys=[newcomer.public_key()],
        threshold=1,
        expires_at=datetime.now(UTC) + timedelta(days=9),
    )
    unproven = trust.sign_document(
        payload, payload_type=protocol.ROOT_PAYLOAD_TYPE, private_keys=fleet.root_keys
    )
    refused(store, trust_bundle_bytes(roots=[*fleet.roots, unproven], keyring=None), "signature_invalid")
    # Skipping a version is refused too: the chain moves one step at a time.
    skipped = make_root(keys=[newcomer], version=3, previous_keys=fleet.root_keys)
    refused(store, trust_bundle_bytes(roots=[*fleet.roots, skipped], keyring=None), "keyring_rollback")
    assert store.versions() == {"root_version": 1, "keyring_version": 1}


def test_a_device_offline_during_two_rotations_catches_up_from_one_bundle(fleet, device):
    store = device()
    store.update(fleet.bundle(fleet.keyring(1, [key()])))
    # While the device is away: the root moves twice and the keyring three times.
    fleet.rotate_root()
    fleet.keyring(2, [key()])
    fleet.rotate_root()
    signer = key()
    latest = fleet.keyring(5, [signer])

    assert device().update(fleet.bundle(latest))
    assert device().versions() == {"root_version": 3, "keyring_version": 5}
    assert device().verify(signed_desired(signer), payload_type=protocol.DESIRED_PAYLOAD_TYPE)


def test_a_device_flashed_after_a_root_rotation_starts_from_the_root_it_pins(fleet, tmp_path):
    fleet.rotate_root()
    signer = key()
    bundle = fleet.bundle(fleet.keyring(2, [signer]))
    store = TrustStore(root_keys=(hex_of(fleet.root_keys[0]),), root_threshold=1, state_dir=tmp_path)
    assert store.update(bundle)
    assert store.versions() == {"root_version": 2, "keyring_version": 2}


def test_a_tampered_trust_file_is_ignored_for_the_pinned_root(fleet, device, tmp_path):
    device().update(fleet.bundle(fleet.keyring(1, [key()])))
    saved = json.loads((tmp_path / TRUST_FILE).read_text())
    forger = key()
    saved["keyring"] = json.loads(fleet.keyring(9, [forger], signers=[forger]))
    (tmp_path / TRUST_FILE).write_text(json.dumps(saved))
    assert device().versions() == {"root_version": None, "keyring_version": None}


# --- real agents on the project's Mosquitto


def wait_for_keyring(collector, device_id: str, version: int) -> dict:
    return collector.wait_for(
        device_id, "reported", lambda m: (m.get("trust") or {}).get("keyring_version") == version
    )


def test_an_agent_rotates_its_signing_key_over_the_air_without_a_config_change(
    make_agent, publisher, collector, artifact_server, artifacts, signing_key, root_key, digits
):
    agent = make_agent()
    device = agent.config.device_id
    config_before = agent.config
    root = make_root(keys=[root_key])
    v1 = publish_artifact(artifact_server, artifacts[("1.0.0", "float32")])
    publish_desired(publisher, device, desired_envelope(signing_key, device, 1, {"digits": v1}))
    collector.wait_for(device, "reported", lambda m: m["generation"] == 1)

    # Step 1: the keyring names the old and the new signing key.
    new_key = Ed25519PrivateKey.generate()
    both = make_keyring(
        root_keys=[root_key], version=2, signing_keys=[signing_key.public_key(), new_key.public_key()]
    )
    publish_trust(publisher, trust_bundle_bytes(roots=[root], keyring=both))
    wait_for_keyring(collector, device, 2)
    v2 = publish_artifact(artifact_server, artifacts[("2.0.0", "float32")])
    publish_desired(publisher, device, desired_envelope(new_key, device, 2, {"digits": v2}))
    collector.wait_for(device, "reported", lambda m: m["generation"] == 2)

    # Step 2: the old key leaves the keyring; what it signs is refused from then on.
    only_new = make_keyring(
        root_keys=[root_key],
        version=3,
        signing_keys=[new_key.public_key()],
        revoked=[protocol.keyid_for(signing_key.public_key())],
    )
    publish_trust(publisher, trust_bundle_bytes(roots=[root], keyring=only_new))
    wait_for_keyring(collector, device, 3)
    publish_desired(publisher, device, desired_envelope(signing_key, device, 3, {"digits": v1}))
    event = collector.wait_for(
        device, "events", lambda e: e["type"] == "failed" and e.get("reason") == "key_revoked"
    )
    assert "revoked" in event["message"]
    assert agent.state.applied_generation == 2

    # The replayed old keyring is refused and changes nothing.
    publish_trust(publisher, trust_bundle_bytes(roots=[root], keyring=both))
    collector.wait_for(
        device, "events", lambda e: e["type"] == "failed" and e.get("reason") == "keyring_rollback"
    )
    assert agent.trust.versions()["keyring_version"] == 3

    # Positive control: the new key's desired state is applied, naming a manifest the new
    # key re-signed (the control plane re-signs every manifest before revoking a key).
    old_v1 = artifacts[("1.0.0", "float32")]
    resigned = dataclasses.replace(
        old_v1,
        manifest_envelope=protocol.envelope_bytes(
            protocol.sign(
                protocol.canonical_json(old_v1.manifest),
                payload_type=protocol.MANIFEST_PAYLOAD_TYPE,
                private_key=new_key,
            )
        ),
    )
    v1 = publish_artifact(artifact_server, resigned)
    publish_desired(publisher, device, desired_envelope(new_key, device, 4, {"digits": v1}))
    collector.wait_for(device, "reported", lambda m: m["generation"] == 4)
    assert agent.config == config_before


def test_a_desired_state_that_arrives_before_its_keyring_is_applied_when_the_keyring_does(
    make_agent, publisher, collector, artifact_server, artifacts, signing_key, root_key
):
    agent = make_agent()
    device = agent.config.device_id
    new_key = Ed25519PrivateKey.generate()
    v1 = publish_artifact(artifact_server, artifacts[("1.0.0", "float32")])
    publish_desired(publisher, device, desired_envelope(new_key, device, 1, {"digits": v1}))
    collector.wait_for(
        device, "events", lambda e: e["type"] == "failed" and e.get("reason") == "signature_invalid"
    )

    keyring = make_keyring(
        root_keys=[root_key], version=2, signing_keys=[signing_key.public_key(), new_key.public_key()]
    )
    publish_trust(publisher, trust_bundle_bytes(roots=[make_root(keys=[root_key])], keyring=keyring))
    collector.wait_for(device, "reported", lambda m: m["generation"] == 1)


def test_a_root_step_comes_with_a_keyring_the_new_root_signed_or_not_at_all(fleet, device):
    signer = key()
    keyring_1 = fleet.keyring(1, [signer])
    store = device()
    store.update(fleet.bundle(keyring_1))
    fleet.rotate_root()
    # The step without a keyring the new root signed is refused whole: a device holding a
    # keyring its current root did not sign could not check it again after a restart.
    refused(store, fleet.bundle(keyring_1), "signature_invalid")
    refused(store, fleet.bundle(None), "signature_invalid")
    assert store.update(fleet.bundle(fleet.keyring(2, [signer])))
    assert store.versions() == {"root_version": 2, "keyring_version": 2}
    assert device().versions() == {"root_version": 2, "keyring_version": 2}  # and after a restart


def test_a_keyring_an_old_root_key_signs_into_the_trust_file_is_not_restored(fleet, device, tmp_path):
    first_root = fleet.root_keys
    store = device()
    store.update(fleet.bundle(fleet.keyring(1, [key()])))
    fleet.rotate_root()
    store.update(fleet.bundle(fleet.keyring(2, [key()])))
    saved = json.loads((tmp_path / TRUST_FILE).read_text())
    forger = key()
    saved["keyring"] = json.loads(fleet.keyring(2**31 - 1, [forger], signers=first_root))
    (tmp_path / TRUST_FILE).write_text(json.dumps(saved))
    restarted = device()
    assert restarted.versions()["keyring_version"] != 2**31 - 1
    with pytest.raises(protocol.EnvelopeError):
        restarted.verify(signed_desired(forger), payload_type=protocol.DESIRED_PAYLOAD_TYPE)


@pytest.mark.parametrize("content", ["null", "[]", "[" * 100_000, "not json"])
def test_a_trust_file_that_is_not_a_state_is_ignored(fleet, device, tmp_path, content):
    (tmp_path / TRUST_FILE).write_text(content)
    store = device()
    assert store.versions() == {"root_version": None, "keyring_version": None}
    assert store.update(fleet.bundle(fleet.keyring(1, [key()])))  # and it recovers


@pytest.mark.parametrize(
    "bundle",
    [
        b"[" * 100_000,
        json.dumps(
            {
                "schema": 1,
                "roots": [{"payloadType": protocol.ROOT_PAYLOAD_TYPE, "payload": "", "signatures": [{}]}],
                "keyring": None,
            }
        ).encode(),
        b"null",
        json.dumps({"schema": 1, "roots": "x", "keyring": None}).encode(),
    ],
    ids=["nested", "empty root", "null", "roots not a list"],
)
def test_a_bundle_that_is_garbage_is_refused_with_a_reason_and_changes_nothing(fleet, device, bundle):
    store = device()
    store.update(fleet.bundle(fleet.keyring(1, [key()])))
    with pytest.raises(protocol.EnvelopeError):
        store.update(bundle)
    assert store.versions() == {"root_version": 1, "keyring_version": 1}


def test_a_padded_or_oversized_root_is_refused(fleet, device):
    store = device()
    root = json.loads(fleet.roots[0])
    root["signatures"] = root["signatures"] * 20  # the same signature, padded
    refused(store, trust_bundle_bytes(roots=[json.dumps(root).encode()], keyring=None), "payload_type")


def test_a_keyring_time_that_is_not_utc_is_refused(fleet, device):
    store = device()
    payload = trust.build_keyring(
        version=1, expires_at=datetime.now(UTC) + timedelta(days=1), keys=[(key().public_key(), None)]
    )
    payload["expires_at"] = "9999-12-31T23:30:00-01:00"  # one hour past what a datetime holds
    signed = trust.sign_document(
        payload, payload_type=protocol.KEYRING_PAYLOAD_TYPE, private_keys=fleet.root_keys
    )
    refused(store, fleet.bundle(signed), "payload_type")


def test_a_trust_state_that_cannot_be_saved_is_not_used(fleet, device, tmp_path):
    (tmp_path / TRUST_FILE).mkdir()  # the rename onto it fails, as on a full disk
    store = device()
    refused(store, fleet.bundle(fleet.keyring(1, [key()])), "trust_not_saved")
    with pytest.raises(trust.NoKeyring):
        store.verify(signed_desired(key()), payload_type=protocol.DESIRED_PAYLOAD_TYPE)


def test_garbage_on_the_trust_topic_does_not_stop_an_agent_listening(
    make_agent, publisher, collector, artifact_server, artifacts, signing_key, trust_bundle
):
    agent = make_agent()
    device_id = agent.config.device_id
    try:
        publish_trust(publisher, b"[" * 100_000)
        collector.wait_for(
            device_id, "events", lambda e: e["type"] == "failed" and e.get("reason") == "payload_type"
        )
        assert agent.link.alive() and agent.alive()
        v1 = publish_artifact(artifact_server, artifacts[("1.0.0", "float32")])
        publish_desired(publisher, device_id, desired_envelope(signing_key, device_id, 1, {"digits": v1}))
        collector.wait_for(device_id, "reported", lambda m: m["generation"] == 1)  # still listening
    finally:
        publish_trust(publisher, trust_bundle)  # the session's bundle back for later tests
