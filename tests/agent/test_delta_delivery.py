"""Delta delivery on a real agent (docs/protocol.md, addition 11; issue 12 §1).

A real agent, a real broker with the project's ACLs, a real HTTP server and LiteRT on the
digits sample: offered a delta from the version it runs, the agent rebuilds the new one,
checks it against the *target's* signed manifest and reports ``delivery.path = delta`` with
the bytes it downloaded. Every way a delta can be wrong (a missing base, a delta that is
not what its manifest pins, one that rebuilds another model, a manifest signed by a key the
device does not trust, a manifest naming another target) ends in the full blob, with the
reason in ``delivery.fallback``, and the device still serves the version it was asked for.
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlparse

import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.codes import DeliveryPath, DeltaFallback
from agent.protocol.delta import make_delta
from agent.store import Installed, Store
from fleet.mqtt.broker import free_port
from tests.agent.artifact_server import ArtifactServer, SignedDelta, make_signed_artifact, make_signed_delta
from tests.agent.conftest import desired_envelope, publish_artifact, publish_desired
from tests.agent.test_resilience import (
    apply_until_killed,
    assert_store_consistent,
    restart_and_finish,
    write_config,
)


@pytest.fixture(scope="module")
def tuned(signing_key, digits):
    """Version 1.1.0: version 1.0.0's float32 model fine-tuned (every weight nudged), the
    kind of update a delta is for."""
    from samples.retrained import fine_tune

    tflite = fine_tune(digits.build_digits_models()["float32"])
    x, y = digits.golden_set()
    return make_signed_artifact(
        private_key=signing_key,
        model="digits",
        version="1.1.0",
        variant="float32",
        tflite=tflite,
        labels=digits.LABELS,
        golden_npz=digits.golden_set_npz(),
        golden_accuracy=digits.evaluate(tflite, x, y),
    )


def publish_delta(server: ArtifactServer, delta: SignedDelta, *, blob: bytes | None = None) -> dict:
    """Serve a delta; return the desired state's ``delta`` offer for it."""
    base = f"/deltas/{delta.manifest_sha256[:12]}"
    server.add(f"{base}/manifest", delta.manifest_envelope)
    server.add(f"{base}/blob", delta.blob if blob is None else blob)
    return {
        "base_version": delta.manifest["base"]["version"],
        "base_variant": delta.manifest["base"]["variant"],
        "manifest_url": server.url(f"{base}/manifest"),
        "blob_url": server.url(f"{base}/blob"),
        "manifest_sha256": delta.manifest_sha256,
        "size": len(delta.blob),
    }


def verifying(collector, device: str, generation: int) -> dict:
    return collector.wait_for(
        device, "events", lambda e: e["type"] == "verifying" and e.get("generation") == generation
    )


def agent_on_v1(make_agent, publisher, collector, artifact_server, artifacts, signing_key):
    agent = make_agent()
    device = agent.config.device_id
    v1 = publish_artifact(artifact_server, artifacts[("1.0.0", "float32")])
    publish_desired(publisher, device, desired_envelope(signing_key, device, 1, {"digits": v1}))
    collector.wait_for(device, "reported", lambda m: m["generation"] == 1)
    return agent, device


def test_a_delta_from_the_installed_version_rebuilds_the_new_one(
    make_agent, publisher, collector, artifact_server, artifacts, signing_key, tuned
):
    agent, device = agent_on_v1(make_agent, publisher, collector, artifact_server, artifacts, signing_key)
    # Positive control: the first install had no base, so it came whole.
    first = verifying(collector, device, 1)
    assert first["delivery"]["path"] == DeliveryPath.FULL and "fallback" not in first["delivery"]

    base, target = artifacts[("1.0.0", "float32")], tuned
    delta = make_signed_delta(private_key=signing_key, base=base, target=target)
    entry = {**publish_artifact(artifact_server, target), "delta": publish_delta(artifact_server, delta)}
    publish_desired(publisher, device, desired_envelope(signing_key, device, 2, {"digits": entry}))
    collector.wait_for(
        device, "reported", lambda m: m["generation"] == 2 and m["models"]["digits"]["version"] == "1.1.0"
    )

    delivery = verifying(collector, device, 2)["delivery"]
    assert delivery["path"] == DeliveryPath.DELTA and "fallback" not in delivery
    # What it downloaded: the delta and its manifest, not the blob.
    assert len(delta.blob) <= delivery["bytes"] <= len(delta.blob) + len(delta.manifest_envelope)
    assert artifact_server.bytes_sent[urlparse(entry["blob_url"]).path] == 0
    store = Store(agent.config.state_dir)
    rebuilt = store.model_path("digits", Installed("1.1.0", "float32")).read_bytes()
    assert hashlib.sha256(rebuilt).hexdigest() == target.manifest["raw"]["sha256"]
    assert agent.models.slot("digits").live.version == "1.1.0"
    assert not list(store.downloads_dir.iterdir())  # the delta and the scratch file are gone


def _forged_key_delta(signing_key, base, target):
    return make_signed_delta(private_key=Ed25519PrivateKey.generate(), base=base, target=target)


def _other_target_delta(signing_key, base, target, artifacts):
    """A correctly signed delta whose bytes rebuild version 3.0.0, offered for 1.1.0."""
    other = artifacts[("3.0.0", "float32")]
    honest = make_signed_delta(private_key=signing_key, base=base, target=other)
    return make_signed_delta(private_key=signing_key, base=base, target=target, delta=honest.blob)


@pytest.mark.parametrize(
    "case, fallback",
    [
        ("base_not_installed", DeltaFallback.BASE_MISSING),
        ("blob_not_what_the_manifest_pins", DeltaFallback.DELTA_DOWNLOAD),
        ("rebuilds_another_model", DeltaFallback.TARGET_MISMATCH),
        ("signed_by_an_untrusted_key", DeltaFallback.DELTA_REFUSED),
        ("manifest_for_another_version", DeltaFallback.DELTA_REFUSED),
        ("delta_bytes_corrupt", DeltaFallback.CORRUPT),
    ],
)
def test_any_bad_delta_falls_back_to_the_full_blob(
    case, fallback, make_agent, publisher, collector, artifact_server, artifacts, signing_key, tuned
):
    agent, device = agent_on_v1(make_agent, publisher, collector, artifact_server, artifacts, signing_key)
    base, target = artifacts[("1.0.0", "float32")], tuned
    served_blob = None
    if case == "base_not_installed":
        delta = make_signed_delta(
            private_key=signing_key, base=artifacts[("3.0.0", "float32")], target=target
        )
    elif case == "blob_not_what_the_manifest_pins":
        delta = make_signed_delta(private_key=signing_key, base=base, target=target)
        served_blob = bytes([delta.blob[0] ^ 1]) + delta.blob[1:]
    elif case == "rebuilds_another_model":
        delta = _other_target_delta(signing_key, base, target, artifacts)
    elif case == "signed_by_an_untrusted_key":
        delta = _forged_key_delta(signing_key, base, target)
    elif case == "manifest_for_another_version":
        delta = make_signed_delta(
            private_key=signing_key, base=base, target=target, manifest_overrides={"version": "3.0.0"}
        )
    else:  # a delta whose manifest is honest about its bytes, and the bytes are garbage
        honest = make_signed_delta(private_key=signing_key, base=base, target=target)
        garbage = honest.blob[:200] + bytes(b ^ 0x5A for b in honest.blob[200:])
        delta = make_signed_delta(private_key=signing_key, base=base, target=target, delta=garbage)
    entry = {
        **publish_artifact(artifact_server, target),
        "delta": publish_delta(artifact_server, delta, blob=served_blob),
    }
    publish_desired(publisher, device, desired_envelope(signing_key, device, 2, {"digits": entry}))
    collector.wait_for(
        device, "reported", lambda m: m["generation"] == 2 and m["models"]["digits"]["version"] == "1.1.0"
    )
    delivery = verifying(collector, device, 2)["delivery"]
    assert delivery == {"path": DeliveryPath.FULL, "bytes": delivery["bytes"], "fallback": fallback}
    # The full blob came, and it is what serves.
    assert delivery["bytes"] >= len(target.blob)
    assert artifact_server.bytes_sent[urlparse(entry["blob_url"]).path] == len(target.blob)
    rebuilt = Store(agent.config.state_dir).model_path("digits", Installed("1.1.0", "float32")).read_bytes()
    assert hashlib.sha256(rebuilt).hexdigest() == target.manifest["raw"]["sha256"]
    assert not collector.of(device, "events") or all(
        e["type"] != "failed" for e in collector.of(device, "events") if e.get("generation") == 2
    )


def test_a_delta_larger_than_the_full_blob_is_not_downloaded(
    make_agent, publisher, collector, artifact_server, artifacts, signing_key, tuned
):
    _, device = agent_on_v1(make_agent, publisher, collector, artifact_server, artifacts, signing_key)
    base, target = artifacts[("1.0.0", "float32")], tuned
    honest = make_delta(*(zstandard.ZstdDecompressor().decompress(a.blob) for a in (base, target)))
    padded = honest + bytes(len(target.blob))  # signed, pinned, and too big to be worth it
    delta = make_signed_delta(private_key=signing_key, base=base, target=target, delta=padded)
    entry = {**publish_artifact(artifact_server, target), "delta": publish_delta(artifact_server, delta)}
    publish_desired(publisher, device, desired_envelope(signing_key, device, 2, {"digits": entry}))
    delivery = verifying(collector, device, 2)["delivery"]
    assert delivery["fallback"] == DeltaFallback.TOO_LARGE
    assert artifact_server.bytes_sent[urlparse(entry["delta"]["blob_url"]).path] == 0


def test_a_delta_that_cannot_be_downloaded_falls_back_and_one_that_fails_for_a_while_resumes(
    make_agent, publisher, collector, artifact_server, artifacts, signing_key, tuned
):
    _, device = agent_on_v1(make_agent, publisher, collector, artifact_server, artifacts, signing_key)
    base, target = artifacts[("1.0.0", "float32")], tuned
    delta = make_signed_delta(private_key=signing_key, base=base, target=target)
    entry = {**publish_artifact(artifact_server, target), "delta": publish_delta(artifact_server, delta)}
    delta_path = urlparse(entry["delta"]["blob_url"]).path
    artifact_server.fail(delta_path, 502, times=1000)  # a proxy failing only on deltas
    publish_desired(publisher, device, desired_envelope(signing_key, device, 2, {"digits": entry}))
    delivery = verifying(collector, device, 2)["delivery"]
    assert delivery["path"] == DeliveryPath.FULL and delivery["fallback"] == DeltaFallback.DELTA_DOWNLOAD
    collector.wait_for(device, "reported", lambda m: m["generation"] == 2)
    assert artifact_server.bytes_sent[urlparse(entry["blob_url"]).path] == len(target.blob)

    # A 404 (the delta gone from storage) also ends in the blob, for another version.
    other = make_signed_delta(private_key=signing_key, base=target, target=artifacts[("3.0.0", "float32")])
    entry3 = {
        **publish_artifact(artifact_server, artifacts[("3.0.0", "float32")]),
        "delta": {**publish_delta(artifact_server, other), "blob_url": artifact_server.url("/nothing-here")},
    }
    publish_desired(publisher, device, desired_envelope(signing_key, device, 3, {"digits": entry3}))
    delivery = verifying(collector, device, 3)["delivery"]
    assert delivery["path"] == DeliveryPath.FULL and delivery["fallback"] == DeltaFallback.DELTA_DOWNLOAD


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", ["during_delta_download", "after_download", "during_rebuild"])
def test_a_power_cut_while_rebuilding_leaves_the_store_valid(
    crash_at,
    make_agent,
    broker,
    publisher,
    collector,
    artifact_server,
    artifacts,
    signing_key,
    root_key_hex,
    tuned,
    tmp_path,
):
    first, device = agent_on_v1(make_agent, publisher, collector, artifact_server, artifacts, signing_key)
    state_dir = first.config.state_dir
    first.stop()
    base, target = artifacts[("1.0.0", "float32")], tuned
    delta = make_signed_delta(private_key=signing_key, base=base, target=target)
    entry = {**publish_artifact(artifact_server, target), "delta": publish_delta(artifact_server, delta)}
    delta_path = urlparse(entry["delta"]["blob_url"]).path
    port = free_port()
    config = write_config(
        tmp_path / "agent.toml",
        device_id=device,
        password=first.broker_password,
        broker_url=broker.url,
        state_dir=state_dir,
        key_hex=root_key_hex,
        port=port,
    )
    throttled = crash_at == "during_delta_download"
    partial = None
    if throttled:
        artifact_server.throttle(delta_path, 256)
        partial = Store(state_dir).partial_path(delta.manifest["delta"]["sha256"])
    apply_until_killed(
        config,
        crash_at,
        lambda: publish_desired(
            publisher, device, desired_envelope(signing_key, device, 2, {"digits": entry})
        ),
        partial=partial,
    )

    # Power back: v1 still intact and named by the state file; the restarted agent serves
    # at once and finishes from the retained desired state, by the delta again.
    assert assert_store_consistent(state_dir) == {"digits": "1.0.0"}
    artifact_server.throttle(delta_path, None)
    restart_and_finish(config, port, collector, device, "1.1.0")
    assert assert_store_consistent(state_dir) == {"digits": "1.1.0"}
    deliveries = [
        e["delivery"]
        for e in collector.of(device, "events")
        if e["type"] == "verifying" and e.get("generation") == 2 and "delivery" in e
    ]
    store = Store(state_dir)
    assert not [p.name for p in store.downloads_dir.iterdir()]  # no partial, scratch or mark left
    if crash_at == "during_rebuild":
        # Killed while rebuilding (as the OOM killer would): the next try takes the blob
        # rather than risking the same end again.
        assert deliveries[-1] == {
            "path": DeliveryPath.FULL,
            "bytes": deliveries[-1]["bytes"],
            "fallback": DeltaFallback.INTERRUPTED,
        }
        assert artifact_server.bytes_sent[urlparse(entry["blob_url"]).path] == len(target.blob)
        return
    assert deliveries and deliveries[-1]["path"] == DeliveryPath.DELTA
    if throttled:  # the second process resumed the delta rather than starting over
        assert any("Range" in headers for headers in artifact_server.requests[delta_path][1:])
    assert artifact_server.bytes_sent[urlparse(entry["blob_url"]).path] == 0
