"""Model inspection cannot hurt the control plane (issue 9, section 3).

Hostile models built here go through the real pipeline on the real Celery worker and each
ends as a failed artifact with a reason in words, while the worker lives on and processes
the next upload. Probes (tests/server/sandbox_probes.py) run inside the sandbox and try to
read the signing key, reach the network, write files and outgrow their limits; each is also
run outside the sandbox as a positive control, so a probe that cannot work anywhere could
never pass a test."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
from pathlib import Path

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema

from fleet.registry import sandbox, services
from fleet.registry.choices import ArtifactStatus
from fleet.registry.models import Artifact
from fleet.registry.signing import load_private_key
from tests.conftest import wait_until
from tests.server import sandbox_probes
from tests.server.conftest import pending_artifact, stored_files, upload

# The Celery worker is a session-wide process started from this environment after collection:
# a CPU limit this small lets the CPU bomb below end in seconds (the default is 60 s). The
# test process reads its settings earlier; in-process tests set the limit with `settings`.
os.environ.setdefault("SANDBOX_CPU_SECONDS", "5")

PROBES = "tests.server.sandbox_probes"
F32, I32, BOOL = schema.TensorType.FLOAT32, schema.TensorType.INT32, schema.TensorType.BOOL


# --- hostile models, written with the TFLite schema that ships in LiteRT


def _tensor(name: str, shape: list[int], dtype: int = F32, buffer: int = 0) -> schema.TensorT:
    return schema.TensorT(name=name, shape=shape, type=dtype, buffer=buffer)


def _op(opcode: int, inputs: list[int], outputs: list[int], options_type: int = 0, options=None):
    return schema.OperatorT(
        opcodeIndex=opcode,
        inputs=inputs,
        outputs=outputs,
        builtinOptionsType=options_type,
        builtinOptions=options,
    )


def _model(subgraphs: list[schema.SubGraphT], ops: list[int], constants: list[bytes] = ()) -> bytes:
    """Buffer 0 is the empty one; constants take buffers 1, 2, …"""
    codes = []
    for code in ops:
        opcode = schema.OperatorCodeT()
        opcode.builtinCode, opcode.version = code, 1
        opcode.deprecatedBuiltinCode = min(code, schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
        codes.append(opcode)
    buffers = [schema.BufferT()]
    for data in constants:
        buffers.append(schema.BufferT(data=np.frombuffer(data, dtype=np.uint8)))
    model = schema.ModelT(
        version=3, operatorCodes=codes, subgraphs=subgraphs, buffers=buffers, description="hostile"
    )
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def huge_tensor_model() -> bytes:
    """A few hundred bytes that declare two 3.7 GiB tensors: x [1, 1e9] -> SOFTMAX -> probs."""
    tensors = [_tensor("x", [1, 1_000_000_000]), _tensor("probs", [1, 1_000_000_000])]
    main = schema.SubGraphT(tensors=tensors, inputs=[0], outputs=[1], name="main")
    main.operators = [
        _op(0, [0], [1], schema.BuiltinOptions.SoftmaxOptions, schema.SoftmaxOptionsT(beta=1.0))
    ]
    return _model([main], [schema.BuiltinOperator.SOFTMAX])


def endless_loop_model() -> bytes:
    """WHILE i < 2**31 - 1: i += 1, on the smoke run's zeros: billions of iterations."""
    main = schema.SubGraphT(
        tensors=[
            _tensor("x", [1, 64]),
            _tensor("i0", [1], I32, 1),
            _tensor("i", [1], I32),
            _tensor("y", [1, 64]),
        ],
        inputs=[0],
        outputs=[3],
        name="main",
    )
    main.operators = [_op(0, [1, 0], [2, 3], schema.BuiltinOptions.WhileOptions, schema.WhileOptionsT(1, 2))]
    cond = schema.SubGraphT(
        tensors=[
            _tensor("i", [1], I32),
            _tensor("v", [1, 64]),
            _tensor("end", [1], I32, 2),
            _tensor("go", [1], BOOL),
        ],
        inputs=[0, 1],
        outputs=[3],
        name="cond",
    )
    cond.operators = [_op(1, [0, 2], [3])]
    body = schema.SubGraphT(
        tensors=[
            _tensor("i", [1], I32),
            _tensor("v", [1, 64]),
            _tensor("one", [1], I32, 3),
            _tensor("i1", [1], I32),
        ],
        inputs=[0, 1],
        outputs=[3, 1],
        name="body",
    )
    body.operators = [_op(2, [0, 2], [3], schema.BuiltinOptions.AddOptions, schema.AddOptionsT())]
    ops = [schema.BuiltinOperator.WHILE, schema.BuiltinOperator.LESS, schema.BuiltinOperator.ADD]
    constants = [struct.pack("<i", value) for value in (0, 2**31 - 1, 1)]
    return _model([main, cond, body], ops, constants)


def crashing_model() -> bytes:
    """A WHILE whose body is the main graph itself: LiteRT recurses while preparing it until
    the stack overflows and the process dies of SIGSEGV (in the worker, before the sandbox)."""
    main = schema.SubGraphT(tensors=[_tensor("x", [1, 64]), _tensor("y", [1, 64])], inputs=[0], outputs=[1])
    main.operators = [_op(0, [0], [1], schema.BuiltinOptions.WhileOptions, schema.WhileOptionsT(1, 0))]
    cond = schema.SubGraphT(
        tensors=[_tensor("v", [1, 64]), _tensor("go", [1], BOOL)], inputs=[0], outputs=[1]
    )
    return _model([main, cond], [schema.BuiltinOperator.WHILE])


def out_of_range_offsets_model(good: bytes) -> bytes:
    """A real model whose root table points its subgraphs vector far past the end of the file."""
    data = bytearray(good)
    (root,) = struct.unpack_from("<I", data, 0)
    (vtable_back,) = struct.unpack_from("<i", data, root)
    vtable = root - vtable_back
    (field,) = struct.unpack_from("<H", data, vtable + 4 + 2 * 2)  # Model field 2: subgraphs
    struct.pack_into("<I", data, root + field, 0x7FFF0000)
    return bytes(data)


# --- the pipeline on the real worker


HOSTILE = {
    "multi-GB tensor": (
        huge_tensor_model,
        "tensor_too_large",
        ["declares shape [1, 1000000000] float32", "GiB"],
    ),
    "interpreter crash": (crashing_model, "sandbox_crashed", ["crashed", "SIGSEGV"]),
    "endless op graph": (endless_loop_model, "sandbox_cpu_limit", ["CPU time"]),
    "out-of-range offsets": (out_of_range_offsets_model, "truncated", ["outside the file"]),
}


def _build(name: str, good: bytes) -> bytes:
    builder = HOSTILE[name][0]
    return builder(good) if name == "out-of-range offsets" else builder()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_model_fails_and_the_worker_processes_the_next_upload(
    name, alice, version_v1, digits, celery_worker_process
):
    good = digits.build_digits_models()["float32"]
    _, code, words = HOSTILE[name]

    response = upload(alice.client(), "digits", "1.0.0", "hostile", _build(name, good), wait=120)

    assert response.status_code == 422, response.content
    error = response.json()["error"]
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], error["message"]
    hostile = Artifact.objects.get(pk=error["artifact"]["id"])
    assert hostile.status == ArtifactStatus.FAILED
    assert (hostile.failure_code, hostile.failure_reason) == (code, error["message"])
    assert hostile.manifest_envelope == hostile.raw_file == hostile.blob_file == ""
    assert celery_worker_process.poll() is None, "the worker died"

    response = upload(alice.client(), "digits", "1.0.0", "float32", good, wait=120)

    assert response.status_code == 201, response.content
    assert response.json()["status"] == "ready"
    assert celery_worker_process.poll() is None


# --- the pipeline in this process


@pytest.mark.django_db
def test_a_ready_artifact_records_what_the_sandbox_reported_and_the_worker_hashed(version_v1, digits):
    good = digits.build_digits_models()["int8"]
    artifact = services.artifact_process(artifact_id=pending_artifact(version_v1, "int8", good).pk)
    assert artifact.status == ArtifactStatus.READY, artifact.failure_reason
    assert artifact.raw_sha256 == hashlib.sha256(good).hexdigest()
    assert artifact.tflite_signature["inputs"] == [{"name": "x", "shape": [1, 64], "dtype": "float32"}]
    assert artifact.tflite_signature["quantization"] == "int8"
    assert artifact.golden_samples == 200


@pytest.mark.django_db
def test_a_report_naming_other_bytes_is_not_signed(version_v1, digits, monkeypatch):
    """A compromised child claims it checked other bytes: the worker signs only what it
    hashed itself, so the artifact fails and no manifest exists."""
    monkeypatch.setattr(services, "CHECK_MODEL_JOB", f"{PROBES}:forged_check")
    good = digits.build_digits_models()["float32"]
    before = stored_files("blobs")

    artifact = services.artifact_process(artifact_id=pending_artifact(version_v1, "float32", good).pk)

    assert (artifact.status, artifact.failure_code) == (ArtifactStatus.FAILED, "raw_changed")
    assert artifact.manifest_envelope == "" and artifact.signing_key is None
    assert stored_files("blobs") == before
    # Positive control: the same artifact bytes pass with the honest job.
    monkeypatch.undo()
    again = services.artifact_process(artifact_id=pending_artifact(version_v1, "float32", good).pk)
    assert again.status == ArtifactStatus.READY


@pytest.mark.django_db
@pytest.mark.parametrize(
    "tamper",
    [
        {"raw_size": "12"},
        {"signature": {"inputs": "x", "outputs": [], "ops": [], "quantization": "none"}},
        {"golden_accuracy": 7.5},
        {"golden_samples": 10**9},
        {"latency_ms": -1.0},
        {"latency_ms": float("nan")},
        {"latency_ms": "fast"},
    ],
    ids=[
        "size-not-a-number",
        "signature-not-tensors",
        "accuracy-over-1",
        "samples-not-the-golden-set",
        "latency-negative",
        "latency-nan",
        "latency-not-a-number",
    ],
)
def test_a_report_that_makes_no_sense_fails_the_artifact(version_v1, tamper):
    honest = {
        "raw_sha256": "0" * 64,
        "raw_size": 12,
        "signature": {
            "inputs": [{"name": "x", "shape": [1, 64], "dtype": "float32"}],
            "outputs": [{"name": "probs", "shape": [1, 10], "dtype": "float32"}],
            "ops": ["SOFTMAX"],
            "quantization": "none",
        },
        "golden_accuracy": 0.9,
        "golden_samples": 200,
        "latency_ms": 0.25,
    }
    assert services._checked_report(honest, version_v1)["raw_size"] == 12  # positive control
    with pytest.raises(services._PipelineError) as caught:
        services._checked_report({**honest, **tamper}, version_v1)
    assert caught.value.code == "sandbox_bad_report"


# --- the sandbox itself: probes inside, positive controls outside


def limits(**overrides) -> sandbox.Limits:
    return sandbox.Limits(
        **{"memory_bytes": 2 * 2**30, "cpu_seconds": 20, "file_bytes": 2**20, "wall_seconds": 60, **overrides}
    )


def probe(name: str, *, readable=(), **kwargs) -> dict:
    return sandbox.run(job=f"{PROBES}:{name}", args=kwargs, readable=list(readable), limits=limits())


@pytest.fixture
def model_file(tmp_path, digits) -> Path:
    path = tmp_path / "model.tflite"
    path.write_bytes(digits.build_digits_models()["float32"])
    return path


@pytest.fixture
def signing_key_file(settings) -> Path:
    load_private_key()  # creates the development key if this run has none yet
    return Path(settings.SIGNING_KEY_FILE)


def test_the_signing_key_cannot_be_read_from_inside_the_sandbox(signing_key_file, model_file, monkeypatch):
    monkeypatch.setenv("SIGNING_KEY_FILE", str(signing_key_file))  # as a worker would have it
    outside = sandbox_probes.read_file(path=str(signing_key_file))
    assert outside["read"], outside  # this process can read it: the file is there

    inside = probe("read_file", readable=[model_file], path=str(signing_key_file))

    assert inside["read"] is False, inside
    assert "Permission" in inside["error"]
    assert inside["isolation"]["landlock_abi"] >= 1
    # The read-attempt code works inside on a file it was given.
    given = probe("read_file", readable=[model_file], path=str(model_file))
    assert given == {**given, "read": True, "sha256": hashlib.sha256(model_file.read_bytes()).hexdigest()}


def test_the_sandbox_sees_no_secret_in_its_environment(monkeypatch):
    for name in ("SIGNING_KEY_FILE", "DATABASE_URL", "SECRET_KEY", "MQTT_PUBLISHER_PASSWORD"):
        monkeypatch.setenv(name, "a secret")
    assert "SIGNING_KEY_FILE" in sandbox_probes.environment()["variables"]  # positive control

    inside = probe("environment")["variables"]

    assert set(inside) <= set(sandbox.CHILD_ENV), inside


@pytest.fixture
def listener():
    """A TCP server on loopback that counts connections."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve():
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            accepted.append(connection.recv(100))
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server, accepted
    server.close()


def test_a_connect_from_inside_the_sandbox_fails(listener):
    server, accepted = listener
    port = server.getsockname()[1]
    assert sandbox_probes.connect_tcp(host="127.0.0.1", port=port)["connected"]  # positive control
    wait_until(lambda: len(accepted) == 1, timeout=5, message="the listener to see the control connection")

    inside = probe("connect_tcp", host="127.0.0.1", port=port)

    assert inside["connected"] is False, inside
    assert inside["isolation"]["network"] == "namespace"
    assert len(accepted) == 1


def test_a_unix_socket_cannot_be_reached_from_inside_the_sandbox(tmp_path):
    path = str(tmp_path / "service.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen()
        assert sandbox_probes.connect_unix(path=path)["connected"]  # positive control

        inside = probe("connect_unix", path=path)

    assert inside["connected"] is False, inside


def test_the_sandbox_inherits_no_socket(listener):
    server, _ = listener
    server.set_inheritable(True)  # even a descriptor the worker forgot to protect
    assert server.fileno() in sandbox_probes.open_descriptors()["fds"]  # positive control

    assert probe("open_descriptors")["fds"] == []


def test_the_sandbox_cannot_write_files(tmp_path):
    target = tmp_path / "dropped.txt"
    assert sandbox_probes.write_file(path=str(tmp_path / "control.txt"))["written"]  # positive control

    inside = probe("write_file", path=str(target))

    assert inside["written"] is False and not target.exists(), inside


def test_the_sandbox_runs_under_its_rlimits():
    inside = probe("limits")
    assert inside["memory"] == [2 * 2**30] * 2
    assert inside["cpu"] == [20, 21]
    assert inside["file"] == [2**20] * 2
    assert inside["core"] == [0, 0]


def test_memory_over_the_limit_stops_the_job_with_a_reason():
    assert probe("allocate", megabytes=64)["allocated"] == 64 * 2**20  # positive control
    with pytest.raises(sandbox.SandboxError) as caught:
        probe("allocate", megabytes=3 * 1024)
    assert caught.value.code == "sandbox_memory_limit"
    assert "2.0 GiB" in caught.value.message


def test_cpu_over_the_limit_stops_the_job_with_a_reason():
    with pytest.raises(sandbox.SandboxError) as caught:
        sandbox.run(job=f"{PROBES}:spin", args={}, readable=[], limits=limits(cpu_seconds=1))
    assert caught.value.code == "sandbox_cpu_limit"
    assert "1 s of CPU time" in caught.value.message


def test_a_job_that_hangs_is_stopped_at_the_wall_clock_limit():
    with pytest.raises(sandbox.SandboxError) as caught:
        sandbox.run(job=f"{PROBES}:sleep", args={"seconds": 60}, readable=[], limits=limits(wall_seconds=2))
    assert caught.value.code == "sandbox_timeout"


def test_a_crash_is_reported_as_a_crash():
    with pytest.raises(sandbox.SandboxError) as caught:
        probe("abort")
    assert caught.value.code == "sandbox_crashed"
    assert "SIGABRT" in caught.value.message


def test_a_flood_on_stdout_is_cut_off_not_read_into_memory():
    with pytest.raises(sandbox.SandboxError) as caught:
        probe("flood_stdout", megabytes=50)
    assert caught.value.code == "sandbox_bad_report"
    assert "no usable report" in caught.value.message


def test_litert_allocating_past_the_memory_limit_fails_in_the_sandbox(tmp_path):
    """The declared-size check switched off: LiteRT itself tries to allocate 7.5 GiB of
    tensors under RLIMIT_AS, fails, and only the child notices."""
    path = tmp_path / "huge.tflite"
    path.write_bytes(huge_tensor_model())
    args = {"model_path": str(path), "golden_path": None, "golden_max_samples": 10, "golden_max_bytes": 2**20}

    with pytest.raises(sandbox.SandboxError) as caught:
        sandbox.run(
            job=services.CHECK_MODEL_JOB,
            args={**args, "max_tensor_bytes": 2**40},
            readable=[path],
            limits=limits(),
        )

    assert caught.value.code in ("unloadable_model", "sandbox_memory_limit"), caught.value.message
    with pytest.raises(sandbox.SandboxError) as caught:  # the check on: the reason in words
        sandbox.run(
            job=services.CHECK_MODEL_JOB,
            args={**args, "max_tensor_bytes": 2**30},
            readable=[path],
            limits=limits(),
        )
    assert caught.value.code == "tensor_too_large"
    assert "declares shape [1, 1000000000] float32" in caught.value.message
