"""Tensor-level delta codec (agent/protocol/delta.py; issue 12 §1, docs/protocol.md "Delta format")."""

import hashlib
import random
import struct

import flatbuffers
import numpy as np
import pytest
import zstandard
from ai_edge_litert import schema_py_generated as schema

from agent.protocol.delta import (
    COPY,
    HEADER_SIZE,
    LITERAL,
    XOR,
    DeltaError,
    DeltaRefused,
    apply_delta,
    make_delta,
    read_header,
)
from samples.digits import build_digits_models, build_large_model
from samples.retrained import (
    WAKEWORD_MODELS,
    external_buffers,
    fine_tune,
    head_retrain,
    run_once,
    wakeword_model,
)

DIGITS = build_digits_models(version="1.0.0")
DIGITS_V2 = build_digits_models(version="2.0.0")


def _round_trip(base: bytes, target: bytes) -> bytes:
    delta = make_delta(base, target, level=3)
    assert apply_delta(base, delta, max_output=len(target)) == target
    return delta


@pytest.mark.parametrize("variant", ["float32", "int8"])
@pytest.mark.parametrize("change", [head_retrain, fine_tune])
def test_it_rebuilds_a_retrained_digits_model_byte_for_byte(variant, change):
    base = DIGITS[variant]
    target = change(base)
    assert target != base and len(target) == len(base)
    run_once(target)  # still a model LiteRT loads and runs
    _round_trip(base, target)


@pytest.mark.parametrize("variant", ["float32", "int8"])
def test_it_rebuilds_another_architecture(variant):
    # v2 has 48 hidden units instead of 32: every buffer and the skeleton change size.
    _round_trip(DIGITS[variant], DIGITS_V2[variant])


@pytest.mark.parametrize("name", WAKEWORD_MODELS)
def test_it_rebuilds_published_wakeword_models(name):
    base = wakeword_model(name)
    for change in (head_retrain, fine_tune):
        target = change(base)
        assert target != base
        run_once(target)
        delta = _round_trip(base, target)
        assert len(delta) < len(zstandard.ZstdCompressor(level=3).compress(target)) / 4


def test_a_head_retrain_stores_only_the_head():
    base = DIGITS["float32"]
    target = head_retrain(base)
    header = read_header(make_delta(base, target))
    changed = sum(a != b for a, b in zip(base, target, strict=True))
    # The payload carries the changed head and nothing like the whole 10 KiB model.
    assert changed <= header.payload_size < changed + 512


def test_an_unchanged_buffer_is_found_by_content_not_by_index():
    base = DIGITS["float32"]
    # The same model with its buffers in reverse order: every weight has another index.
    model = schema.ModelT.InitFromPackedBuf(base, 0)
    order = list(range(len(model.buffers)))
    order[1:] = order[1:][::-1]  # keep the empty buffer 0 first, reverse the others
    model.buffers = [model.buffers[i] for i in order]
    position = {old: new for new, old in enumerate(order)}
    for tensor in model.subgraphs[0].tensors:
        tensor.buffer = position[tensor.buffer]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    target = bytes(builder.Output())
    assert target != base
    np.testing.assert_array_equal(run_once(target), run_once(base))
    delta = _round_trip(base, target)
    weights = sum(len(b.data) for b in model.buffers if b.data is not None)
    assert read_header(delta).payload_size < len(target) - weights  # no weight stored again


def test_the_same_model_costs_little_more_than_its_header():
    base = DIGITS["float32"]
    delta = _round_trip(base, base)
    assert len(delta) < HEADER_SIZE + 64
    assert read_header(delta).payload_size == 0


def test_it_handles_the_large_model_layout_with_weights_after_the_flatbuffer():
    base = external_buffers(DIGITS["float32"])
    target = external_buffers(head_retrain(DIGITS["float32"]))
    np.testing.assert_array_equal(run_once(base), run_once(DIGITS["float32"]))
    delta = _round_trip(base, target)
    assert read_header(delta).payload_size < 2048  # the head (1.3 KiB), not the 8 KiB first layer
    _round_trip(DIGITS["float32"], target)  # and across layouts


def test_it_refuses_to_make_a_delta_of_something_that_is_not_tflite():
    with pytest.raises(DeltaRefused, match="TFL3"):
        make_delta(b"not a model at all", DIGITS["float32"])
    with pytest.raises(DeltaRefused):
        make_delta(DIGITS["float32"], DIGITS["float32"][:200])


def test_a_wrong_base_is_named_as_such():
    base, target = DIGITS["float32"], head_retrain(DIGITS["float32"])
    delta = make_delta(base, target, level=3)
    other = fine_tune(base)  # same size, other bytes
    with pytest.raises(DeltaError, match="made from base sha256") as caught:
        apply_delta(other, delta, max_output=len(target))
    assert caught.value.code == "wrong_base"
    with pytest.raises(DeltaError, match="-byte base") as caught:
        apply_delta(DIGITS["int8"], delta, max_output=len(target))
    assert caught.value.code == "wrong_base"
    # A caller that vouches for its base's hash is checked against the delta too.
    with pytest.raises(DeltaError) as caught:
        apply_delta(base, delta, max_output=len(target), base_sha256=hashlib.sha256(other).hexdigest())
    assert caught.value.code == "wrong_base"
    assert apply_delta(base, delta, max_output=len(target), base_sha256=hashlib.sha256(base).hexdigest())


def test_a_base_that_lies_about_its_hash_is_caught_by_the_target_hash():
    base, target = DIGITS["float32"], head_retrain(DIGITS["float32"])
    delta = make_delta(base, target, level=3)
    corrupt = bytearray(base)
    corrupt[-100] ^= 0xFF  # bit rot in a weight the delta copies
    with pytest.raises(DeltaError) as caught:
        apply_delta(
            bytes(corrupt), delta, max_output=len(target), base_sha256=hashlib.sha256(base).hexdigest()
        )
    assert caught.value.code == "target_mismatch"


def test_it_never_rebuilds_more_than_max_output():
    base, target = DIGITS["float32"], head_retrain(DIGITS["float32"])
    delta = make_delta(base, target, level=3)
    with pytest.raises(DeltaError) as caught:
        apply_delta(base, delta, max_output=len(target) - 1)
    assert caught.value.code == "too_large"


def _with_payload(delta: bytes, payload_frame: bytes, payload_size: int) -> bytes:
    """``delta`` with its payload frame replaced and the header's sizes made to match."""
    header = read_header(delta)
    fields = list(struct.unpack_from("<8sHHQQ32s32sIQQQ", delta, 0))
    fields[-2:] = [payload_size, len(payload_frame)]
    table = delta[HEADER_SIZE : HEADER_SIZE + header.table_zsize]
    return struct.pack("<8sHHQQ32s32sIQQQ", *fields) + table + payload_frame


def test_a_zstd_bomb_in_the_payload_is_refused_before_it_inflates():
    base, target = DIGITS["float32"], head_retrain(DIGITS["float32"])
    delta = make_delta(base, target, level=3)
    size = read_header(delta).payload_size
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(256 << 20))  # 256 MiB of zeros
    assert len(bomb) < 64 << 10
    with pytest.raises(DeltaError, match="holds 268435456 bytes") as caught:
        apply_delta(base, _with_payload(delta, bomb, size), max_output=len(target))
    assert caught.value.code == "corrupt"
    # Without a content size in the frame header the cap still holds.
    streamed = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(bytes(256 << 20))
    with pytest.raises(DeltaError) as caught:
        apply_delta(base, _with_payload(delta, streamed, size), max_output=len(target))
    assert caught.value.code == "corrupt"
    # Positive control: the original payload frame, spliced back the same way, applies.
    original = delta[HEADER_SIZE + read_header(delta).table_zsize :]
    assert apply_delta(base, _with_payload(delta, original, size), max_output=len(target)) == target


def test_other_format_versions_and_foreign_bytes_are_refused():
    base, target = DIGITS["float32"], head_retrain(DIGITS["float32"])
    delta = bytearray(make_delta(base, target, level=3))
    delta[8] = 2
    with pytest.raises(DeltaError) as caught:
        apply_delta(base, bytes(delta), max_output=1 << 20)
    assert caught.value.code == "unsupported"
    with pytest.raises(DeltaError, match="wrong magic"):
        apply_delta(base, b"\x28\xb5\x2f\xfd" + bytes(200), max_output=1 << 20)


def test_fuzzed_deltas_fail_cleanly_or_rebuild_the_exact_target():
    base = DIGITS["int8"]
    target = fine_tune(base)
    delta = make_delta(base, target, level=3)
    rng = random.Random(12)
    outcomes = {"refused": 0, "rebuilt": 0}
    for _ in range(400):
        mutated = bytearray(delta)
        if rng.random() < 0.3:
            mutated = mutated[: rng.randrange(len(mutated))]
        else:
            for _ in range(rng.randint(1, 3)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        try:
            rebuilt = apply_delta(base, bytes(mutated), max_output=len(target))
        except DeltaError:
            outcomes["refused"] += 1
        else:
            assert rebuilt == target  # only flips in bytes the format ignores (padding)
            outcomes["rebuilt"] += 1
    assert outcomes["refused"] > 350
    assert apply_delta(base, delta, max_output=len(target)) == target  # positive control


def test_segments_copy_unchanged_runs_in_one_piece():
    base = wakeword_model("okay_nabu") if _has_wakeword() else DIGITS["int8"]
    target = head_retrain(base)
    delta = make_delta(base, target, level=3)
    kinds = _segment_kinds(delta)
    # A head retrain is: copy the unchanged run, store the head, copy or store the rest.
    assert kinds.count(COPY) <= 3 and len(kinds) <= 8, kinds
    assert LITERAL in kinds or XOR in kinds


def _has_wakeword() -> bool:
    try:
        import pymicro_wakeword  # noqa: F401
    except ImportError:
        return False
    return True


def _segment_kinds(delta: bytes) -> list[int]:
    header = read_header(delta)
    table = zstandard.ZstdDecompressor().decompress(delta[HEADER_SIZE : HEADER_SIZE + header.table_zsize])
    return [table[i * 20] for i in range(header.segments)]


def test_a_fine_tune_travels_as_shuffled_xor_and_costs_far_less_than_the_full_blob():
    base = build_large_model(0.5)
    target = fine_tune(base)
    delta = _round_trip(base, target)
    assert XOR in _segment_kinds(delta)
    full = len(zstandard.ZstdCompressor(level=3).compress(target))
    assert len(delta) < 0.7 * full  # float32 weights x (1 + 1e-3 noise): the top bytes repeat


def test_threads_can_apply_deltas_at_the_same_time():
    # Each thread has its own table decompressor (zstd contexts are not shareable).
    from concurrent.futures import ThreadPoolExecutor

    pairs = [
        (DIGITS[v], change(DIGITS[v])) for v in ("float32", "int8") for change in (head_retrain, fine_tune)
    ]
    deltas = [(base, target, make_delta(base, target, level=3)) for base, target in pairs]

    def apply_all(_: int) -> bool:
        return all(apply_delta(b, d, max_output=len(t)) == t for _ in range(25) for b, t, d in deltas)

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(apply_all, range(8)))
