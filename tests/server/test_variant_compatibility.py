"""Variants chosen by what each device can run (issue 12 §3, docs/rollouts.md "Who gets
what" and "Compatibility matrix"): skip codes on the rollout, the matrix in the API, the
flatbuffer's ops and minimum runtime on the artifact, the checks on what devices declare."""

from __future__ import annotations

import base64
import html
import json
import re

import flatbuffers
import pytest
from ai_edge_litert import schema_py_generated as schema
from django.core.files.uploadedfile import SimpleUploadedFile, TemporaryUploadedFile
from django.test import Client
from rest_framework.test import APIClient

from agent import protocol
from fleet.devices.choices import DeviceStatus
from fleet.devices.models import Device, DeviceGroup
from fleet.registry import services as registry
from fleet.rollouts import selectors
from fleet.rollouts import services as rollouts
from fleet.rollouts.choices import AssignmentState, SkipReason
from fleet.rollouts.models import RolloutPolicy
from tests.server.conftest import enroll, ready_artifact

pytestmark = pytest.mark.django_db
COMPAT = "/api/v1/models/digits/versions/1.0.0/compatibility"
BOTH_NEED_SOFTMAX = "int8: needs op SOFTMAX; float32: needs op SOFTMAX"


def ready_for(version, variant: str, data: bytes, hardware: list[str]):
    upload = TemporaryUploadedFile(f"{variant}.tflite", "application/octet-stream", len(data), None)
    upload.write(data)
    upload.seek(0)
    artifact = registry.artifact_upload(
        version=version, variant=variant, upload=upload, requires_hardware=hardware
    )
    return registry.artifact_process(artifact_id=artifact.pk)


def with_min_runtime(tflite: bytes, runtime: str) -> bytes:
    """The model with the ``min_runtime_version`` metadata the TFLite converter writes."""
    model = schema.ModelT.InitFromPackedBuf(bytearray(tflite), 0)
    buffer = schema.BufferT()
    buffer.data = list(runtime.encode().ljust(16, b"\0"))
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = "min_runtime_version", len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    builder = flatbuffers.Builder(len(tflite) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def device(device_id: str, **capabilities) -> Device:
    return Device.objects.create(
        device_id=device_id, status=DeviceStatus.ACTIVE, tags=["fleet"], **capabilities
    )


@pytest.fixture
def fleet(digits_model, digits):
    """1.0.0: float32 for any hardware, int8 for rpi4 only. Four devices: an rpi4 with int8,
    an rpi4 without, a jetson with int8 (int8 is not for it) and an rpi4 whose runtime lacks
    SOFTMAX (both variants use it). The "pilot" group holds the first and the last."""
    version = registry.version_create(model=digits_model, version="1.0.0")
    models = digits.build_digits_models(version="1.0.0")
    ready_artifact(version, "float32", models["float32"])
    ready_for(version, "int8", models["int8"], ["rpi4"])
    devices = {
        "rpi-int8": device("rpi-int8", hardware="rpi4", supports_int8=True),
        "rpi-float": device("rpi-float", hardware="rpi4", supports_int8=False),
        "jetson": device("jetson", hardware="jetson", supports_int8=True),
        "no-softmax": device("no-softmax", hardware="rpi4", unsupported_ops=["SOFTMAX"]),
    }
    pilot = DeviceGroup.objects.create(name="pilot")
    pilot.members.set([devices["rpi-int8"], devices["no-softmax"]])
    policy = RolloutPolicy.objects.create(
        name="all-at-once", stages=[{"kind": "percent", "value": 100, "soak_seconds": 0}], gates={}
    )
    return {"version": version, "devices": devices, "policy": policy}


def start(fleet):
    rollout = rollouts.rollout_create(
        model=fleet["version"].model,
        version=fleet["version"],
        targets={"tags": ["fleet"]},
        policy=fleet["policy"],
    )
    return rollouts.rollout_start(rollout=rollout, reason="test")


def test_each_device_gets_the_variant_it_can_run_and_the_one_nothing_fits_is_skipped_with_a_code(
    fleet, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        rollout = start(fleet)
    placed = {a.device.device_id: a for a in rollout.assignments.select_related("device")}
    assert {d: a.variant for d, a in placed.items()} == {
        "rpi-int8": "int8",
        "rpi-float": "float32",
        "jetson": "float32",
        "no-softmax": "",
    }
    skipped = placed["no-softmax"]
    assert (skipped.state, skipped.skip_code, skipped.reason) == (
        AssignmentState.SKIPPED,
        SkipReason.NO_VARIANT_FITS,
        BOTH_NEED_SOFTMAX,
    )
    assert "int8: hardware rpi4-only" in placed["jetson"].reason
    # Never sent anything: no desired generation was issued to it.
    assert Device.objects.get(device_id="no-softmax").desired_generation in (None, 0)


def test_the_rollout_api_lists_skipped_devices_with_their_code_and_reason(fleet, alice):
    rollout = start(fleet)
    body = alice.client().get(f"/api/v1/rollouts/{rollout.pk}").json()
    assert body["skipped"] == [
        {"device_id": "no-softmax", "code": "no_variant_fits", "reason": BOTH_NEED_SOFTMAX}
    ]


def test_the_preview_names_the_skipped_device_and_why(fleet):
    preview = selectors.placement_preview(
        model=fleet["version"].model,
        version=fleet["version"],
        targets={"tags": ["fleet"]},
        stages=fleet["policy"].stages,
    )
    assert preview.skipped == [(BOTH_NEED_SOFTMAX, 1, ["no-softmax"])]


def test_the_compatibility_matrix_counts_devices_by_group_and_hardware(fleet, bob):
    response = bob.client().get(COMPAT)
    assert response.status_code == 200
    body = response.json()
    assert [(v["variant"], v["requires_hardware"]) for v in body["variants"]] == [
        ("int8", ["rpi4"]),
        ("float32", ["any"]),
    ]
    assert body["variants"][1]["ops"] == ["FULLY_CONNECTED", "SOFTMAX"]
    rows = {(r["group"], r["hardware"]): r for r in body["rows"]}
    assert set(rows) == {(None, "jetson"), (None, "rpi4"), ("pilot", "rpi4")}
    assert rows[None, "jetson"] == {
        "group": None,
        "hardware": "jetson",
        "devices": 1,
        "runs": {"float32": 1},
        "gets": {"float32": 1},
        "skipped": 0,
        "skipped_reasons": {},
    }
    fleet_rpi = rows[None, "rpi4"]
    assert (fleet_rpi["devices"], fleet_rpi["runs"], fleet_rpi["gets"]) == (
        3,
        {"int8": 1, "float32": 2},
        {"int8": 1, "float32": 1},
    )
    assert fleet_rpi["skipped_reasons"] == {BOTH_NEED_SOFTMAX: 1}
    pilot = rows["pilot", "rpi4"]
    assert (pilot["devices"], pilot["gets"], pilot["skipped"]) == (2, {"int8": 1}, 1)


def test_the_matrix_of_an_unknown_version_is_a_json_404(fleet, bob):
    response = bob.client().get("/api/v1/models/digits/versions/9.9.9/compatibility")
    assert response.status_code == 404
    assert response.json()["error"]["code"]


def test_the_artifact_records_its_op_versions_and_the_runtime_it_needs(fleet, digits):
    version = registry.version_create(model=fleet["version"].model, version="2.0.0")
    tflite = with_min_runtime(digits.build_digits_models(version="2.0.0")["float32"], "2.3.0")
    artifact = ready_artifact(version, "float32", tflite)
    assert artifact.status == "ready", artifact.failure_reason
    assert artifact.tflite_signature["min_runtime"] == "2.3.0"
    assert set(artifact.tflite_signature["op_versions"]) == {"FULLY_CONNECTED", "SOFTMAX"}
    payload = base64.b64decode(json.loads(artifact.manifest_envelope)["payload"])
    manifest = protocol.parse("manifest", payload)
    assert manifest["requires"] == {"hardware": ["any"], "runtime": ["tflite>=2.3.0"]}


def test_a_device_with_an_older_runtime_is_skipped_with_both_versions_named(fleet, digits):
    version = registry.version_create(model=fleet["version"].model, version="2.0.0")
    ready_artifact(
        version, "float32", with_min_runtime(digits.build_digits_models(version="2.0.0")["float32"], "2.3.0")
    )
    old = device("old-runtime", hardware="rpi4", runtime="tflite_runtime", runtime_version="2.1.0")
    new = device("new-runtime", hardware="rpi4", runtime="tflite_runtime", runtime_version="2.14.0")
    litert = device("litert", hardware="rpi4", runtime="ai_edge_litert", runtime_version="1.2.0")
    available = rollouts.ready_artifacts(version)
    placed = {
        d.device_id: rollouts.device_placement(rollout_id=1, device=d, available=available)
        for d in (old, new, litert)
    }
    assert (placed["old-runtime"].variant, placed["old-runtime"].reason) == (
        "",
        "float32: runtime 2.1.0 < 2.3.0",
    )
    assert placed["new-runtime"].variant == placed["litert"].variant == "float32"


def test_an_upload_for_a_bad_hardware_class_is_refused_with_the_field(version_v1, alice, digits):
    data = digits.build_digits_models(version="1.0.0")["float32"]
    response = alice.client().post(
        "/api/v1/models/digits/versions/1.0.0/artifacts/?wait=0",
        {"variant": "float32", "file": SimpleUploadedFile("m.tflite", data), "requires_hardware": ["rpi 4!"]},
        format="multipart",
    )
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "requires_hardware"
    ok = alice.client().post(
        "/api/v1/models/digits/versions/1.0.0/artifacts/?wait=0",
        {
            "variant": "float32",
            "file": SimpleUploadedFile("m.tflite", data),
            "requires_hardware": ["rpi4", "rpi5"],
        },
        format="multipart",
    )
    assert ok.status_code in (201, 202)
    assert ok.json()["requires_hardware"] == ["rpi4", "rpi5"]


@pytest.mark.parametrize(
    ("identity", "field"),
    [
        ({"hardware": "rpi 4"}, "identity.hardware"),
        ({"runtime_version": "latest"}, "identity.runtime_version"),
        ({"unsupported_ops": ["NOT_AN_OP"]}, "identity.unsupported_ops"),
        ({"supported_ops": "SOFTMAX"}, "identity.supported_ops"),
    ],
)
def test_enrollment_refuses_capabilities_that_break_the_rules(enrollment_key, identity, field):
    response = enroll(APIClient(), "cam-1", enrollment_token=enrollment_key, identity=identity)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == field
    assert not Device.objects.filter(device_id="cam-1").exists()


def test_enrollment_keeps_what_the_device_can_run(enrollment_key, broker_settings):
    ops = ["softmax", "CUSTOM:MyOp"]
    identity = {
        "hardware": "rpi4",
        "runtime_version": "2.14.0",
        "supports_int8": False,
        "unsupported_ops": ops,
    }
    response = enroll(APIClient(), "cam-1", enrollment_token=enrollment_key, identity=identity)
    assert response.status_code == 201, response.content
    saved = Device.objects.get(device_id="cam-1")
    assert (saved.hardware, saved.runtime_version, saved.supports_int8) == ("rpi4", "2.14.0", False)
    assert saved.unsupported_ops == ["CUSTOM:MyOp", "SOFTMAX"]


def test_the_version_page_shows_the_matrix_with_counts_that_link_to_the_device_list(fleet, bob):
    client = Client()
    client.force_login(bob.user)
    page = client.get(f"/admin/registry/modelversion/{fleet['version'].pk}/change/").content.decode()
    table = re.search(r'<div class="registry-table" id="compatibility".*?</table>', page, re.S).group(0)
    row = re.search(r'<tr data-group="pilot" data-hardware="rpi4">(.*?)</tr>', table, re.S).group(1)
    link = re.search(r'<a href="([^"]+)" data-devices="2">', row).group(1)
    assert html.unescape(link) == "/admin/devices/device/?status__exact=active&hardware=rpi4&group=pilot"
    assert re.findall(r"(\d+) can run", row) == ["1", "1"]  # int8, float32
    assert 'data-skipped="1"' in row and f"1 device: {BOTH_NEED_SOFTMAX}" in html.unescape(row)
    assert "rpi4 only, int8 support" in table
    # The link opens the list of exactly those devices.
    listed = client.get(html.unescape(link)).content.decode()
    assert "rpi-int8" in listed and "no-softmax" in listed and "rpi-float" not in listed


def test_the_rollout_page_shows_the_skip_code_and_why_in_the_device_table(fleet, bob):
    rollout = start(fleet)
    client = Client()
    client.force_login(bob.user)
    page = client.get(f"/admin/rollouts/rollout/{rollout.pk}/change/?state=skipped").content.decode()
    row = re.search(r'<tr data-device="no-softmax" data-state="skipped">(.*?)</tr>', page, re.S).group(1)
    assert 'data-skip-code="no_variant_fits"' in row
    assert f"No variant fits the device: {BOTH_NEED_SOFTMAX}" in html.unescape(row)
