"""The control plane's side of the root of trust (docs/security.md, "Keys and rotation"):
uploads are checked with the devices' own rules, root keys never reach the server, only
admins upload, anyone can read the bundle, and a signing key the keyring does not list
never signs."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.core.management import call_command

from agent import protocol
from agent.protocol.trust import TrustState
from agent.trustctl import make_keyring, make_root
from fleet.core.errors import Conflict, InvalidInput
from fleet.registry import services as registry_services
from fleet.registry import signing, trust
from fleet.registry.choices import SigningKeyStatus, VersionStatus
from fleet.registry.models import ArtifactDelta, Keyring, SigningKey, TrustRoot
from tests.server.conftest import ready_artifact
from tests.server.test_signing import pem

pytestmark = pytest.mark.django_db


@pytest.fixture
def root_key():
    return Ed25519PrivateKey.generate()


@pytest.fixture
def anchored(ada, root_key, key_file):
    """Root version 1 and keyring version 1 (the active signing key), uploaded by an admin."""
    _, active = signing.signing_key_active()
    client = ada.client()
    assert (
        client.post("/api/v1/trust", json.loads(make_root(keys=[root_key])), format="json").status_code == 201
    )
    keyring = make_keyring(root_keys=[root_key], version=1, signing_keys=[active.public_key()])
    assert client.post("/api/v1/trust", json.loads(keyring), format="json").status_code == 201
    return active


def post(persona, envelope: bytes):
    return persona.client().post("/api/v1/trust", json.loads(envelope), format="json")


def test_anyone_reads_the_bundle_and_a_device_trusts_it_from_its_pinned_root(anchored, anonymous, root_key):
    response = anonymous.get("/api/v1/trust")
    assert response.status_code == 200
    bundle = response.json()
    device = TrustState.pinned([protocol.public_key_bytes(root_key.public_key()).hex()])
    state = device.with_bundle(bundle, now=datetime.now(UTC))
    assert (state.root_version, state.keyring_version) == (1, 1)
    assert protocol.keyid_for(anchored.public_key()) in state.keyring.keys


def test_before_any_root_the_bundle_is_a_json_404(anonymous, db):
    response = anonymous.get("/api/v1/trust")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "no_root"


def test_only_admins_upload(alice, bob, anonymous, root_key, db):
    root = make_root(keys=[root_key])
    assert post(alice, root).status_code == 403  # operator
    assert post(bob, root).status_code == 403  # viewer
    assert anonymous.post("/api/v1/trust", json.loads(root), format="json").status_code == 401
    assert not TrustRoot.objects.exists()


def test_a_keyring_not_signed_by_the_root_is_refused(anchored, ada):
    impostor = Ed25519PrivateKey.generate()
    forged = make_keyring(root_keys=[impostor], version=2, signing_keys=[anchored.public_key()])
    response = post(ada, forged)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "signature_invalid"
    assert Keyring.objects.count() == 1


def test_an_old_or_same_version_keyring_is_refused_as_a_rollback(anchored, ada, root_key):
    again = make_keyring(root_keys=[root_key], version=1, signing_keys=[anchored.public_key()])
    different = make_keyring(
        root_keys=[root_key],
        version=1,
        signing_keys=[Ed25519PrivateKey.generate().public_key(), anchored.public_key()],
    )
    for envelope in (again, different):
        response = post(ada, envelope)
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "keyring_rollback"


def test_a_keyring_without_the_active_signing_key_is_refused(anchored, ada, root_key):
    stranger = Ed25519PrivateKey.generate()
    response = post(ada, make_keyring(root_keys=[root_key], version=2, signing_keys=[stranger.public_key()]))
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "active_key_missing"


def test_a_root_step_is_stored_and_a_root_that_skips_or_lacks_the_old_signature_is_not(
    anchored, ada, root_key
):
    new_root_key = Ed25519PrivateKey.generate()
    alone = make_root(keys=[new_root_key], version=2)
    assert post(ada, alone).json()["error"]["code"] == "signature_invalid"
    skipping = make_root(keys=[new_root_key], version=3, previous_keys=[root_key])
    assert post(ada, skipping).json()["error"]["code"] == "keyring_rollback"
    step = make_root(keys=[new_root_key], version=2, previous_keys=[root_key])
    assert post(ada, step).status_code == 201
    # From now on only the new root key signs keyrings.
    by_old_root = make_keyring(root_keys=[root_key], version=2, signing_keys=[anchored.public_key()])
    assert post(ada, by_old_root).json()["error"]["code"] == "signature_invalid"
    by_new_root = make_keyring(root_keys=[new_root_key], version=2, signing_keys=[anchored.public_key()])
    assert post(ada, by_new_root).status_code == 201
    assert list(TrustRoot.objects.order_by("version").values_list("version", flat=True)) == [1, 2]


def test_garbage_gets_a_json_400_and_stores_nothing(ada, db):
    client = ada.client()
    for body in (
        [1, 2],
        {"payloadType": protocol.KEYRING_PAYLOAD_TYPE},
        {"signatures": [{}], "payload": "!!"},
    ):
        response = client.post("/api/v1/trust", body, format="json")
        assert response.status_code == 400, response.content
        assert "error" in response.json()
    manifest_like = protocol.sign(
        b"{}", payload_type=protocol.MANIFEST_PAYLOAD_TYPE, private_key=Ed25519PrivateKey.generate()
    )
    response = client.post("/api/v1/trust", manifest_like, format="json")
    assert response.json()["error"]["code"] == "payload_type"
    assert not TrustRoot.objects.exists() and not Keyring.objects.exists()


def test_a_signing_key_the_keyring_does_not_list_never_signs(anchored, key_file, version_v1, digits):
    key_file.write_bytes(pem(Ed25519PrivateKey.generate()))  # an operator swaps the file too early
    with pytest.raises(Conflict) as excinfo:
        signing.signing_key_active()
    assert excinfo.value.code == "signing_key_not_in_keyring"
    assert SigningKey.objects.get(status=SigningKeyStatus.ACTIVE).keyid == protocol.keyid_for(
        anchored.public_key()
    )


def test_the_rotation_procedure_resigns_manifests_and_revokes_the_old_key(
    anchored, ada, root_key, key_file, version_v1, digits, tmp_path
):
    artifact = ready_artifact(version_v1, "float32", digits.build_digits_models()["float32"])
    # A later version with a delta from this one: its manifest is signed by the key too.
    registry_services.version_set_status(version=version_v1, status=VersionStatus.RELEASED)
    v2 = registry_services.version_create(model=version_v1.model, version="2.0.0")
    target = ready_artifact(v2, "float32", digits.build_head_retrained_models()["float32"])
    (delta,) = registry_services.artifact_deltas_make(artifact_id=target.pk)
    old_keyid = protocol.keyid_for(anchored.public_key())
    new_key = Ed25519PrivateKey.generate()
    new_hex = protocol.public_key_bytes(new_key.public_key()).hex()

    # 1. Draft a keyring with both keys; sign it "offline"; upload it.
    draft = trust.keyring_draft(add_public_keys=[new_hex])
    assert draft["version"] == 2 and len(draft["keys"]) == 2
    signed = protocol.trust.sign_document(
        draft, payload_type=protocol.KEYRING_PAYLOAD_TYPE, private_keys=[root_key]
    )
    assert post(ada, signed).status_code == 201
    # 2. Activate the new key and re-sign what the old one signed.
    key_file.write_bytes(pem(new_key))
    counts = trust.signing_resign_all(publish="celery")
    assert counts["manifests"] == 3  # two artifacts and the delta
    delta_payload = protocol.verify(
        ArtifactDelta.objects.get(pk=delta.pk).manifest_envelope,
        payload_type=protocol.DELTA_PAYLOAD_TYPE,
        keys=protocol.trusted_keys([new_hex]),
    )
    assert hashlib.sha256(delta_payload).hexdigest() == delta.manifest_sha256  # the pin still holds
    artifact.refresh_from_db()
    payload = protocol.verify(
        artifact.manifest_envelope,
        payload_type=protocol.MANIFEST_PAYLOAD_TYPE,
        keys=protocol.trusted_keys([new_hex]),
    )
    assert payload == base64.b64decode(json.loads(artifact.manifest_envelope)["payload"])
    # 3. Draft without the old key: it is listed as revoked, and the server marks it so.
    draft = trust.keyring_draft(remove_keyids=[old_keyid])
    assert draft["revoked"] == [old_keyid]
    signed = protocol.trust.sign_document(
        draft, payload_type=protocol.KEYRING_PAYLOAD_TYPE, private_keys=[root_key]
    )
    assert post(ada, signed).status_code == 201
    assert SigningKey.objects.get(keyid=old_keyid).status == SigningKeyStatus.REVOKED
    # A revoked key never signs again, even if someone puts its file back.
    key_file.write_bytes(pem(anchored))
    with pytest.raises(Conflict):
        signing.signing_key_active()


def test_dev_bootstrap_is_refused_in_production_settings(settings, tmp_path, db):
    settings.SIGNING_KEY_AUTOGENERATE = False
    with pytest.raises(Exception, match="development only"):
        trust.trust_bootstrap_dev(root_key_path=tmp_path / "root.pem")


def test_the_command_drafts_and_uploads_what_trustctl_signed_offline(anchored, tmp_path, root_key, capsys):
    from agent import trustctl

    root_file = tmp_path / "offline" / "root.pem"
    root_file.parent.mkdir()
    root_file.write_bytes(pem(root_key))
    draft = tmp_path / "draft.json"
    new_hex = protocol.public_key_bytes(Ed25519PrivateKey.generate().public_key()).hex()
    call_command("trust", "draft-keyring", "--add-key", new_hex, "--out", str(draft))
    signed = tmp_path / "keyring-2.json"
    assert trustctl.main(["sign-keyring", str(draft), "--key", str(root_file), "--out", str(signed)]) == 0
    assert trustctl.main(["show", str(signed)]) == 0
    call_command("trust", "status")
    assert Keyring.objects.count() == 1
    # `trust upload` publishes at once (it needs the broker); the service below is what it calls.
    trust.trust_upload(envelope=signed.read_bytes(), publish="celery")
    assert Keyring.objects.get(version=2).keyids == sorted(
        [protocol.keyid_for(anchored.public_key()), protocol.keyid_for(protocol.public_key_from_hex(new_hex))]
    )
    out = capsys.readouterr().out
    assert "keyring version 1" in out and "wrote" in out


def test_the_admin_uploads_signed_files_and_shows_versions_expiry_and_devices(
    ada, bob, root_key, key_file, db
):
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.test import Client

    from fleet.devices.models import Device

    _, active = signing.signing_key_active()
    admin = Client()
    admin.force_login(ada.user)
    for name, envelope in (
        ("root-1.json", make_root(keys=[root_key])),
        ("keyring-1.json", make_keyring(root_keys=[root_key], version=1, signing_keys=[active.public_key()])),
    ):
        response = admin.post(
            "/admin/registry/keyring/add/", {"signed_file": SimpleUploadedFile(name, envelope)}
        )
        assert response.status_code == 302
    forged = make_keyring(
        root_keys=[Ed25519PrivateKey.generate()], version=2, signing_keys=[active.public_key()]
    )
    response = admin.post(
        "/admin/registry/keyring/add/", {"signed_file": SimpleUploadedFile("k.json", forged)}, follow=True
    )
    assert "Refused (signature_invalid)" in response.content.decode()
    assert list(Keyring.objects.values_list("version", flat=True)) == [1]
    assert TrustRoot.objects.count() == 1

    Device.objects.create(device_id="cam-1", keyring_version=1)
    Device.objects.create(device_id="cam-2", keyring_version=None)
    page = admin.get("/admin/registry/keyring/").content.decode()
    assert "?keyring_version=1" in page and ">1</a>" in page  # one device reports version 1
    assert "(in 364 days)" in page or "(in 365 days)" in page
    assert protocol.keyid_for(active.public_key())[:16] in page
    assert admin.get("/admin/registry/trustroot/").status_code == 200
    assert admin.get("/admin/devices/device/?keyring_version=1").status_code == 200

    # A viewer sees the keyring but cannot upload one.
    from fleet.core.choices import Role  # noqa: F401 (bob is a viewer)

    viewer = Client()
    bob.user.is_staff = True
    bob.user.save()
    viewer.force_login(bob.user)
    assert viewer.get("/admin/registry/keyring/add/").status_code == 403


def test_a_root_step_is_published_only_with_a_keyring_the_new_root_signed(anchored, ada, anonymous, root_key):
    new_root_key = Ed25519PrivateKey.generate()
    assert post(ada, make_root(keys=[new_root_key], version=2, previous_keys=[root_key])).status_code == 201
    assert len(anonymous.get("/api/v1/trust").json()["roots"]) == 1  # held back: no keyring of root 2 yet
    assert trust.root_awaiting_keyring().version == 2
    keyring = make_keyring(root_keys=[new_root_key], version=2, signing_keys=[anchored.public_key()])
    assert post(ada, keyring).status_code == 201
    bundle = anonymous.get("/api/v1/trust").json()
    assert len(bundle["roots"]) == 2 and trust.root_awaiting_keyring() is None
    device = TrustState.pinned([protocol.public_key_bytes(root_key.public_key()).hex()])
    assert device.with_bundle(bundle, now=datetime.now(UTC)).root_version == 2


def test_revoking_a_key_that_still_signs_ready_manifests_is_refused(
    anchored, ada, root_key, version_v1, digits
):
    ready_artifact(version_v1, "float32", digits.build_digits_models()["float32"])  # signed by the active key
    other = Ed25519PrivateKey.generate()
    both = make_keyring(
        root_keys=[root_key], version=2, signing_keys=[anchored.public_key(), other.public_key()]
    )
    assert post(ada, both).status_code == 201
    # An operator forgets `trust resign` and revokes the key that signed the manifest:
    # refused, since it is still the active one; make `other` active without re-signing.
    SigningKey.objects.update(status=SigningKeyStatus.RETIRED)
    SigningKey.objects.create(
        keyid=protocol.keyid_for(other.public_key()),
        public_key=protocol.public_key_bytes(other.public_key()).hex(),
        status=SigningKeyStatus.ACTIVE,
    )
    only_other = make_keyring(
        root_keys=[root_key],
        version=3,
        signing_keys=[other.public_key()],
        revoked=[protocol.keyid_for(anchored.public_key())],
    )
    response = post(ada, only_other)
    assert response.status_code == 409 and response.json()["error"]["code"] == "key_still_signs"


def test_a_revoked_key_never_comes_back_and_an_expiring_active_key_is_refused(anchored, ada, root_key):
    leaked = Ed25519PrivateKey.generate()
    leaked_hex = protocol.public_key_bytes(leaked.public_key()).hex()
    with_leaked = make_keyring(
        root_keys=[root_key], version=2, signing_keys=[anchored.public_key(), leaked.public_key()]
    )
    assert post(ada, with_leaked).status_code == 201
    draft = trust.keyring_draft(remove_keyids=[protocol.keyid_for(leaked.public_key())])
    signed = protocol.trust.sign_document(
        draft, payload_type=protocol.KEYRING_PAYLOAD_TYPE, private_keys=[root_key]
    )
    assert post(ada, signed).status_code == 201
    relisted = make_keyring(
        root_keys=[root_key], version=4, signing_keys=[anchored.public_key(), leaked.public_key()]
    )
    assert post(ada, relisted).json()["error"]["code"] == "key_revoked"
    with pytest.raises(InvalidInput) as excinfo:
        trust.keyring_draft(add_public_keys=[leaked_hex])
    assert excinfo.value.code == "key_revoked"

    from datetime import timedelta

    payload = protocol.trust.build_keyring(
        version=4,
        expires_at=datetime.now(UTC) + timedelta(days=30),
        keys=[(anchored.public_key(), datetime.now(UTC) + timedelta(minutes=5))],
    )
    expiring = protocol.trust.sign_document(
        payload, payload_type=protocol.KEYRING_PAYLOAD_TYPE, private_keys=[root_key]
    )
    assert post(ada, expiring).json()["error"]["code"] == "active_key_expiring"


def test_a_hostile_upload_is_a_json_400_never_a_500(ada, anchored, root_key):
    import base64 as b64

    nested = {
        "payloadType": protocol.ROOT_PAYLOAD_TYPE,
        "payload": b64.b64encode(b"[" * 100_000).decode(),
        "signatures": [{"keyid": "a" * 64, "sig": "AA=="}],
    }
    padded = json.loads(make_root(keys=[Ed25519PrivateKey.generate()], version=2, previous_keys=[root_key]))
    padded["signatures"] = padded["signatures"] * 20
    for body in (nested, padded):
        response = ada.client().post("/api/v1/trust", body, format="json")
        assert response.status_code == 400, response.content
        assert "error" in response.json()
    assert TrustRoot.objects.count() == 1
