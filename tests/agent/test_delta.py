"""Tensor-level delta codec (agent/protocol/delta.py; issue 12 §1, docs/protocol.md "Delta format")."""

import hashlib
import random

import flatbuffers
import numpy as np
import pytest
import zstandard
from ai_edge_litert import schema_py_generated as schema

from agent.protocol.delta import (
    COPY,
    FLAG_HASHES,
    FLAG_PAYLOAD_ZSTD,
    FLAG_TABLE_ZSTD,
    HEADER_SIZE,
    LITERAL,
    MAGIC,
    SUB,
    XOR,
    DeltaError,
    DeltaFailure,
    DeltaRefused,
    _transformed,
    _untransform_into,
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
    head_warm_retrain,
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
@pytest.mark.parametrize("change", [head_warm_retrain, head_retrain, fine_tune])
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
    for change in (head_warm_retrain, head_retrain, fine_tune):
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
    assert len(delta) < 6 + 4 * 3 + 64 + 8  # magic, version, flags, small sizes, hashes, one row
    assert read_header(delta).payload_size == 0 and len(delta) <= HEADER_SIZE
    bare = make_delta(base, base, embed_hashes=False)
    assert len(bare) == len(delta) - 56  # the full sha256 pair left to the signed manifest
    target_sha256 = hashlib.sha256(base).hexdigest()
    assert apply_delta(base, bare, max_output=len(base), target_sha256=target_sha256) == base


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


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value >> 7 else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _assemble(flags: int, sizes: list[int], digests: bytes, table: bytes, payload: bytes) -> bytes:
    """A delta laid out as docs/protocol.md addition 9 says, from its parts."""
    return MAGIC + bytes([2, flags]) + b"".join(map(_varint, sizes)) + digests + table + payload


def _parts(delta: bytes) -> tuple[int, bytes, bytes, bytes]:
    """(flags, digests, stored table, stored payload) of a delta."""
    header = read_header(delta)
    table_start = header.header_size
    digests = delta[table_start - (64 if header.flags & FLAG_HASHES else 8) : table_start]
    table_end = table_start + header.table_zsize
    return header.flags, digests, delta[table_start:table_end], delta[table_end:]


def _with_payload(delta: bytes, payload_frame: bytes, payload_size: int) -> bytes:
    """``delta`` with its payload replaced by a zstd frame, the header's sizes made to match."""
    header = read_header(delta)
    flags, digests, table, _ = _parts(delta)
    sizes = [header.base_size, header.target_size, header.segments, len(table)]
    sizes += [header.table_size] if flags & FLAG_TABLE_ZSTD else []
    sizes += [payload_size, len(payload_frame)]
    return _assemble(flags | FLAG_PAYLOAD_ZSTD, sizes, digests, table, payload_frame)


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
    original = _parts(delta)[3]
    assert read_header(delta).flags & FLAG_PAYLOAD_ZSTD
    assert apply_delta(base, _with_payload(delta, original, size), max_output=len(target)) == target


def test_other_format_versions_and_foreign_bytes_are_refused():
    base, target = DIGITS["float32"], head_retrain(DIGITS["float32"])
    delta = make_delta(base, target, level=3)
    assert apply_delta(base, delta, max_output=1 << 20) == target  # positive control
    for at, value in ((len(MAGIC), 3), (len(MAGIC), 1), (len(MAGIC) + 1, 0x10)):  # version, flags
        changed = bytearray(delta)
        changed[at] = value
        with pytest.raises(DeltaError) as caught:
            apply_delta(base, bytes(changed), max_output=1 << 20)
        assert caught.value.code == DeltaFailure.UNSUPPORTED
    # A format-1 delta (120-byte header, magic MFDELTA1) is named as such.
    with pytest.raises(DeltaError, match="format version 1;") as caught:
        apply_delta(base, b"MFDELTA1" + bytes(112), max_output=1 << 20)
    assert caught.value.code == DeltaFailure.UNSUPPORTED
    with pytest.raises(DeltaError, match="wrong magic") as caught:
        apply_delta(base, b"\x28\xb5\x2f\xfd" + bytes(200), max_output=1 << 20)
    assert caught.value.code == DeltaFailure.CORRUPT


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
    """The kind of each segment: the low 3 bits of each row's first byte (varints follow)."""
    flags, _, table, _ = _parts(delta)
    if flags & FLAG_TABLE_ZSTD:
        table = zstandard.ZstdDecompressor().decompress(table)
    kinds, position = [], 0
    while position < len(table):
        kinds.append(table[position] & 7)
        position += 1
        for _ in range(1 if kinds[-1] == LITERAL else 2):  # the varints: high bit = more bytes
            while table[position] & 0x80:
                position += 1
            position += 1
    assert len(kinds) == read_header(delta).segments
    return kinds


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


@pytest.mark.parametrize("kind", [XOR, SUB])
@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_each_transform_round_trips_at_every_width(kind, width):
    rng = np.random.default_rng(width)
    old = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    new = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()  # carries and wraps everywhere
    shuffled = _transformed(kind, memoryview(new), memoryview(old), width)
    assert shuffled != new and len(shuffled) == len(new)
    out = bytearray(len(new))
    _untransform_into(memoryview(out), kind, memoryview(shuffled), memoryview(old), width)
    assert bytes(out) == new
    # SUB is arithmetic per element: +1 on each little-endian element is a 1 in its low plane.
    if kind == SUB:
        bumped = (np.frombuffer(old, f"<u{width}") + 1).tobytes()
        planes = _transformed(SUB, memoryview(bumped), memoryview(old), width)
        assert planes == bytes([1]) * (4096 // width) + bytes(4096 - 4096 // width)


@pytest.mark.parametrize("name", WAKEWORD_MODELS)
def test_a_warm_started_int8_head_travels_as_sub_and_costs_less_than_its_changed_bytes(name):
    base = wakeword_model(name)
    target = head_warm_retrain(base)
    run_once(target)
    changed = int((np.frombuffer(base, np.uint8) != np.frombuffer(target, np.uint8)).sum())
    delta = _round_trip(base, target)
    assert SUB in _segment_kinds(delta)
    # int8 values moved by a few quantization steps: small differences, not new bytes.
    assert len(make_delta(base, target)) < 0.75 * changed


def test_the_re_quantized_scales_in_the_skeleton_are_coded_against_the_base():
    base = wakeword_model("hey_jarvis")
    target = head_warm_retrain(base)
    kinds = _segment_kinds(make_delta(base, target, level=3))
    assert LITERAL not in kinds, kinds  # the changed scales are SUB/XOR against their old bytes


def test_a_delta_without_hashes_needs_and_checks_the_signed_target_hash():
    base, target = DIGITS["int8"], head_warm_retrain(DIGITS["int8"])
    delta = make_delta(base, target, level=3, embed_hashes=False)
    header = read_header(delta)
    assert not header.flags & FLAG_HASHES and header.target_sha256 is None
    assert header.base_sha256 == hashlib.sha256(base).hexdigest()[:16]
    target_sha256 = hashlib.sha256(target).hexdigest()
    with pytest.raises(DeltaError, match="names no target sha256") as caught:
        apply_delta(base, delta, max_output=len(target))
    assert caught.value.code == DeltaFailure.UNSUPPORTED
    with pytest.raises(DeltaError) as caught:
        apply_delta(base, delta, max_output=len(target), target_sha256=hashlib.sha256(base).hexdigest())
    assert caught.value.code == DeltaFailure.TARGET_MISMATCH
    with pytest.raises(DeltaError) as caught:
        apply_delta(fine_tune(base), delta, max_output=len(target), target_sha256=target_sha256)
    assert caught.value.code == DeltaFailure.WRONG_BASE
    assert apply_delta(base, delta, max_output=len(target), target_sha256=target_sha256) == target


def test_a_caller_target_hash_that_differs_from_the_embedded_one_is_refused():
    base, target = DIGITS["int8"], head_warm_retrain(DIGITS["int8"])
    delta = make_delta(base, target, level=3)
    with pytest.raises(DeltaError) as caught:
        apply_delta(base, delta, max_output=len(target), target_sha256="0" * 64)
    assert caught.value.code == DeltaFailure.TARGET_MISMATCH
    target_sha256 = hashlib.sha256(target).hexdigest()
    assert apply_delta(base, delta, max_output=len(target), target_sha256=target_sha256) == target


def test_every_truncation_of_a_delta_is_refused():
    base, target = wakeword_model("okay_nabu"), head_warm_retrain(wakeword_model("okay_nabu"))
    delta = make_delta(base, target, level=3)
    for cut in range(len(delta)):
        with pytest.raises(DeltaError) as caught:
            apply_delta(base, delta[:cut], max_output=len(target))
        assert caught.value.code in (DeltaFailure.CORRUPT, DeltaFailure.UNSUPPORTED), cut
    assert apply_delta(base, delta, max_output=len(target)) == target  # positive control


def test_a_zstd_bomb_in_the_table_is_refused_before_it_inflates():
    base, target = DIGITS["float32"], fine_tune(DIGITS["float32"])
    delta = make_delta(base, target, level=3)
    header = read_header(delta)
    flags, digests, _, payload = _parts(delta)
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(256 << 20))
    sizes = [header.base_size, header.target_size, header.segments, len(bomb), header.table_size]
    sizes += [header.payload_size] + ([header.payload_zsize] if flags & FLAG_PAYLOAD_ZSTD else [])
    with pytest.raises(DeltaError, match="holds 268435456 bytes") as caught:
        apply_delta(
            base, _assemble(flags | FLAG_TABLE_ZSTD, sizes, digests, bomb, payload), max_output=1 << 20
        )
    assert caught.value.code == DeltaFailure.CORRUPT
    # A table that declares more than the format's rows could take is refused from the header.
    sizes[4] = 1 << 40
    with pytest.raises(DeltaError, match="more table entries") as caught:
        apply_delta(
            base, _assemble(flags | FLAG_TABLE_ZSTD, sizes, digests, bomb, payload), max_output=1 << 20
        )
    assert caught.value.code == DeltaFailure.CORRUPT


def test_a_segment_that_reads_outside_the_base_is_refused():
    base = DIGITS["int8"]
    digests = hashlib.sha256(base).digest() + hashlib.sha256(base).digest()
    # One COPY row (kind 1) of the whole base, shifted by +1 (zigzag 2): ends past the base.
    for shift, code in ((2, DeltaFailure.CORRUPT), (0, None)):
        table = bytes([COPY]) + _varint(shift) + _varint(len(base))
        delta = _assemble(FLAG_HASHES, [len(base), len(base), 1, len(table), 0], digests, table, b"")
        if code is None:  # positive control: the same row unshifted copies the base
            assert apply_delta(base, delta, max_output=len(base)) == base
            continue
        with pytest.raises(DeltaError, match="outside the base") as caught:
            apply_delta(base, delta, max_output=len(base))
        assert caught.value.code == code


def test_an_overlong_size_is_refused():
    base = DIGITS["int8"]
    digests = hashlib.sha256(base).digest() * 2
    overlong = b"\xff" * 10 + b"\x01"  # eleven bytes: more than a u64
    delta = MAGIC + bytes([2, FLAG_HASHES]) + overlong + bytes(80)
    with pytest.raises(DeltaError, match="malformed size") as caught:
        apply_delta(base, delta, max_output=1 << 20)
    assert caught.value.code == DeltaFailure.CORRUPT
    good = _assemble(
        FLAG_HASHES, [len(base), len(base), 1, 3, 0], digests, bytes([COPY, 0]) + _varint(0), b""
    )
    with pytest.raises(DeltaError):  # control for the helper: a 0-byte copy is refused as well
        apply_delta(base, good, max_output=1 << 20)
